#!/bin/bash
# bench-vnb-import.sh SCRATCH -- qcbt import of a virtnbdbackup set vs
# virtnbdrestore of the same set, uncompressed and lz4 (issue 15).
#
# The set (built once into SCRATCH, untimed): a 1 GiB qcow2 disk with
# 384 MiB of random data and 384 MiB of text (lz4 halves it), in 8 MiB
# runs; a private session libvirtd (as nobody, state in SCRATCH) holds a
# shut-off domain with that disk, and Debian's virtnbdbackup backs it up
# offline (level copy: it starts qemu-nbd itself), once plain and once
# with --compress.
#
# Measurements: each variant 1 warm-up, then N=3 runs, interleaved, warm
# page cache for the inputs, outputs removed before each run (untimed).
# Median and min-max wall seconds.  Both sides end with their data on
# disk: qcbt import fsyncs its files; virtnbdrestore's qemu-nbd target is
# flushed when it disconnects (and `sync -f` is timed with it).
#
#   qcbt import             qcbt import SET D   (reads and checks every
#                           stream, writes a qcow2 chain, re-reads it for
#                           the digest)
#   virtnbdrestore          virtnbdrestore -U URI -i SET -o OUT (qemu-img
#                           create, qemu-nbd, NBD writes) && sync -f OUT
#   floor: read             cat SET/*.data >/dev/null
#   floor: write qcow2      qemu-img convert -t writeback -O qcow2 of the
#                           disk (the same data as a synced qcow2 file)
#
# Environment: QCBT (default ../build/client/qcbt), N (3).  Output:
# markdown on stdout.
set -euo pipefail

S=${1:?usage: bench-vnb-import.sh SCRATCH}
N=${N:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
QCBT=${QCBT:-$HERE/../build/client/qcbt}
MIB=$((1024 * 1024))

mkdir -p "$S"
S=$(cd "$S" && pwd)
LV=$S/lv
rm -rf "$LV" "$S/img" "$S/plain" "$S/lz4"
mkdir -p "$LV"/{home,cfg/libvirt,cache,run} "$S/img"
echo 'stdio_handler = "file"' >"$LV/cfg/libvirt/qemu.conf"
chmod 0711 "$S"

# The disk.
qemu-img create -q -f qcow2 "$S/img/vda.qcow2" 1G
/usr/bin/python3 - "$S/img/vda.raw" <<'EOF'
import os, sys
text = open("/usr/share/common-licenses/GPL-3", "rb").read()
with open(sys.argv[1], "wb") as f:
    f.truncate(1 << 30)
    for i in range(96):                      # 96 runs of 8 MiB: 768 MiB
        f.seek(i * (10 << 20))
        if i % 2:
            f.write(os.urandom(8 << 20))
        else:
            f.write((text * (8 * 1048576 // len(text) + 1))[: 8 << 20])
EOF
qemu-img convert -q -f raw -O qcow2 "$S/img/vda.raw" "$S/img/vda.qcow2"
chown -R 65534:65534 "$LV" "$S/img"

env -i PATH="$PATH" HOME="$LV/home" XDG_CONFIG_HOME="$LV/cfg" \
    XDG_CACHE_HOME="$LV/cache" XDG_RUNTIME_DIR="$LV/run" \
    setpriv --reuid=65534 --regid=65534 --clear-groups libvirtd \
    >"$S/libvirtd.log" 2>&1 </dev/null &
LV_PID=$!
trap 'kill $LV_PID 2>/dev/null' EXIT
URI="qemu:///session?socket=$LV/run/libvirt/libvirt-sock"
export XDG_CONFIG_HOME=$S/virsh-cfg XDG_CACHE_HOME=$S/virsh-cache
for _ in $(seq 300); do
    virsh -c "$URI" uri >/dev/null 2>&1 && break
    sleep 0.1
done
cat >"$S/dom.xml" <<EOF
<domain type='qemu'>
  <name>bench-vnb</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$S/img/vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
EOF
virsh -q -c "$URI" define "$S/dom.xml" >/dev/null
for set in plain lz4; do
    opt=()
    [[ $set == lz4 ]] && opt=(--compress)
    virtnbdbackup -U "$URI" -d bench-vnb -l full -o "$S/$set" -f "$S/vnb.sock" \
        --noprogress "${opt[@]}" >"$S/vnb-$set.log" 2>&1
done

wall() { # wall seconds of "$@"
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null 2>&1
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc
}
declare -A T
run() { # NAME COMMAND...
    local name=$1
    shift
    T[$name]+="$(wall "$@") "
}
v_import() { rm -rf "$S/D"; "$QCBT" import "$S/$1" "$S/D"; }
v_restore() {
    rm -rf "$S/OUT"
    virtnbdrestore -U "$URI" -i "$S/$1" -o "$S/OUT" -n -f "$S/r.sock" &&
        sync -f "$S/OUT/vda.qcow2"
}
v_floor_read() { cat "$S/$1"/*.data >/dev/null; }
v_floor_write() {
    rm -f "$S/w.qcow2"
    qemu-img convert -t writeback -f raw -O qcow2 "$S/img/vda.raw" "$S/w.qcow2"
}
variants=("qcbt import plain|v_import plain" "virtnbdrestore plain|v_restore plain"
    "qcbt import lz4|v_import lz4" "virtnbdrestore lz4|v_restore lz4"
    "floor: read plain set|v_floor_read plain" "floor: read lz4 set|v_floor_read lz4"
    "floor: write qcow2|v_floor_write")
for i in $(seq 0 "$N"); do
    for v in "${variants[@]}"; do
        name=${v%%|*}
        # shellcheck disable=SC2086
        if [[ $i -eq 0 ]]; then ${v#*|} >/dev/null 2>&1; else run "$name" ${v#*|}; fi
    done
done
# Both restores are the disk.
v_import plain >/dev/null && "$QCBT" restore "$S/D" "$S/check.raw" >/dev/null &&
    cmp "$S/check.raw" "$S/img/vda.raw"
v_restore lz4 >/dev/null 2>&1 &&
    qemu-img compare -q -f raw -F qcow2 "$S/img/vda.raw" "$S/OUT/vda.qcow2"
rm -f "$S/check.raw"

echo "| measurement | median wall s | min-max |"
echo "|---|---:|---:|"
for v in "${variants[@]}"; do
    name=${v%%|*}
    read -r -a xs <<<"${T[$name]}"
    mapfile -t s < <(printf '%s\n' "${xs[@]}" | sort -g)
    printf '| %s | %.3f | %.3f-%.3f |\n' "$name" "${s[$((${#s[@]} / 2))]}" \
        "${s[0]}" "${s[-1]}"
done
echo
du -b "$S/plain/vda.copy.data" "$S/lz4/vda.copy.data" | sed 's/^/    /'
