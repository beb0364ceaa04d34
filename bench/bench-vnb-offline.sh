#!/usr/bin/env bash
# One run: full backup of one shut-off libvirt domain's disk (1 GiB
# qcow2, 512 MiB of data in 8 MiB extents with 8 MiB holes), by
#   - virtnbdbackup -l full (offline: it starts qemu-nbd itself), with the
#     real qemu-nbd and with qcbt-server as qemu-nbd (a symlink first in
#     PATH);
#   - qcbt backup --full from qcbt-server -r -k, and from qemu-nbd -r -k
#     (the server's start and stop included);
#   - the floor: qemu-img convert -O qcow2 of the same disk (no NBD).
# Wall seconds, warm page cache (one untimed read of the disk first).
#   bash bench/bench-vnb-offline.sh [BUILD_DIR]
set -euo pipefail
BUILD=$(cd "${1:-build}" && pwd)
SERVER=$BUILD/server/qcbt-server
QCBT=$BUILD/client/qcbt
T=$(mktemp -d /tmp/qcbt-bench-vnb.XXXXXX)
LV_PID=
cleanup() {
    [[ -z $LV_PID ]] || kill "$LV_PID" 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT
MIB=$((1024 * 1024))
mkdir -p "$T"/{bin,img,lv/home,lv/cfg/libvirt,lv/cache,lv/run}
ln -s "$SERVER" "$T/bin/qemu-nbd"
qemu-img create -q -f qcow2 "$T/img/vda.qcow2" $((1024 * MIB))
cmds=()
for ((i = 0; i < 64; i++)); do
    cmds+=(-c "write -P $((i + 1)) $((i * 16 * MIB)) $((8 * MIB))")
done
qemu-io -f qcow2 "${cmds[@]}" "$T/img/vda.qcow2" >/dev/null
echo 'stdio_handler = "file"' >"$T/lv/cfg/libvirt/qemu.conf"
asuser=()
if [[ $(id -u) -eq 0 ]]; then
    chmod 0711 "$T"
    chown -R 65534:65534 "$T/lv" "$T/img"
    asuser=(setpriv --reuid=65534 --regid=65534 --clear-groups)
fi
env -i PATH="$PATH" HOME="$T/lv/home" XDG_CONFIG_HOME="$T/lv/cfg" \
    XDG_CACHE_HOME="$T/lv/cache" XDG_RUNTIME_DIR="$T/lv/run" \
    "${asuser[@]}" libvirtd >"$T/libvirtd.log" 2>&1 </dev/null &
LV_PID=$!
URI="qemu:///session?socket=$T/lv/run/libvirt/libvirt-sock"
export XDG_CONFIG_HOME=$T/virsh-cfg XDG_CACHE_HOME=$T/virsh-cache
for ((i = 0; i < 300; i++)); do
    virsh -q -c "$URI" uri >/dev/null 2>&1 && break
    sleep 0.1
done
cat >"$T/dom.xml" <<XML
<domain type='qemu'><name>bench-vnb</name><memory unit='MiB'>64</memory>
<os><type arch='x86_64'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='$T/img/vda.qcow2'/><target dev='vda' bus='virtio'/></disk>
</devices></domain>
XML
virsh -q -c "$URI" define "$T/dom.xml" >/dev/null
cat "$T/img/vda.qcow2" >/dev/null

timed() { # NAME CMD...
    local name=$1 t0 t1
    shift
    t0=$(date +%s.%N)
    "$@" >"$T/cmd.log" 2>&1 || { tail -n 5 "$T/cmd.log"; exit 1; }
    t1=$(date +%s.%N)
    printf '| %s | %.2f |\n' "$name" "$(echo "$t1 - $t0" | python3 -c 'import sys; print(eval(sys.stdin.read()))')"
}
vnb() { # PATHDIR OUT
    PATH="$1:$PATH" virtnbdbackup -U "$URI" -d bench-vnb -l full -o "$2" \
        -f "$T/vnb.sock" --noprogress
}
via() { # SERVERBIN OUT
    "$1" -r -t -k "$T/s.sock" --fork --pid-file "$T/s.pid" "$T/img/vda.qcow2"
    "$QCBT" backup --full --no-progress "nbd+unix:///?socket=$T/s.sock" "$2"
    kill "$(cat "$T/s.pid")"
}
echo "| measurement (1 GiB disk, 512 MiB data) | wall s |"
echo "|---|---:|"
timed "floor: qemu-img convert -O qcow2" qemu-img convert -O qcow2 "$T/img/vda.qcow2" "$T/floor.qcow2"
timed "virtnbdbackup -l full, real qemu-nbd" vnb /nonexistent "$T/vnb-real"
timed "virtnbdbackup -l full, qcbt-server as qemu-nbd" vnb "$T/bin" "$T/vnb-ours"
timed "qcbt backup --full from qcbt-server" via "$SERVER" "$T/qcbt-ours"
timed "qcbt backup --full from qemu-nbd -r" via "$(type -P qemu-nbd)" "$T/qcbt-real"
# Each result is checked: the qcbt backups equal the disk, and the
# virtnbdbackup sets restore (virtnbdrestore, real qemu-nbd) to it.
for d in qcbt-ours qcbt-real; do
    "$QCBT" restore "$T/$d" "$T/$d.raw" >/dev/null
    qemu-img compare -q -f raw "$T/$d.raw" "$T/img/vda.qcow2" || { echo "$d differs"; exit 1; }
done
for d in vnb-real vnb-ours; do
    virtnbdrestore -U "$URI" -i "$T/$d" -o "$T/$d.rest" >/dev/null 2>&1
    # virtnbdrestore does not wait for its qemu-nbd to exit.
    for ((i = 0; i < 100; i++)); do
        qemu-img info "$T/$d.rest/vda.qcow2" >/dev/null 2>&1 && break
        sleep 0.1
    done
    qemu-img compare -q "$T/$d.rest/vda.qcow2" "$T/img/vda.qcow2" || { echo "$d differs"; exit 1; }
done
echo "(all four results equal the disk)"
