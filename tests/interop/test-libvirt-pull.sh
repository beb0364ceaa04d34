#!/bin/bash
# qcbt backup against libvirt's pull-mode backup export, for real (issue 15):
# a private libvirtd, a running QEMU domain (TCG, idling in SeaBIOS with
# qcow2 disks it cannot boot), and examples/libvirt-pull-backup.sh driving
# virsh backup-begin (pull mode, <incremental>, a new checkpoint each time),
# qcbt backup --full / --since backup-TARGET, virsh domjobabort and
# checkpoint rotation, on three disks: sda (virtio-scsi), hda (IDE) and
# vda (virtio-blk, written before the domain starts, never after).
#
# The guest writes through the monitor, HMP qemu-io on the disk's device,
# so the writes go where the guest's do (through the copy-before-write
# filter of a running backup job): before each backup, and on sda also in
# the middle of each one, after backup-begin, where they must not be in
# that backup but in the next.
# The oracle of each point is the disk read through libvirt's export by
# nbdcopy (an independent NBD client), and it must equal a model (a raw
# file the same writes were applied to); if the two disagree the oracle
# broke.  Each 'qcbt restore --at N' must equal the oracle of backup N.
#
# The private daemon: libvirtd in session mode (as root it runs as
# "nobody"), with its own XDG config/cache/runtime dirs under $TMPD, so it
# shares nothing with a system libvirtd or a parallel test; virsh talks to
# its socket.  At exit the domain is destroyed and every process killed,
# also on failure.
#
# Environment: QCBT (client), QCBT_SRC_DIR, QCBT_KEEP_TMP=1.
. "$(dirname "$0")/../functions.sh"

requires qemu-img qemu-io nbdcopy nbdinfo setpriv
# Installed by scripts/setup.sh: missing is a broken setup, not a skip.
for t in libvirtd virsh qemu-system-x86_64; do
    command -v "$t" >/dev/null ||
        fail "$t is missing (scripts/setup.sh installs libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients, qemu-system-x86)"
done
SRC=${QCBT_SRC_DIR:-$TESTS_DIR/..}
EXAMPLE=$(cd "$SRC/examples" && pwd)/libvirt-pull-backup.sh
DOM=qcbt-pull-test
# The qdev ids of the devices that hold the disks: qemu-io writes through
# them.  A virtio-blk disk cannot be written so (the id is its PCI
# proxy's, which has no drive, and its node refuses a second writer):
# vda gets its data before the domain starts, and its incrementals are
# empty.
DISKS=(sda hda vda)
declare -A DEV=([sda]=scsi0-0-0-0 [hda]=ide0-0-0)
declare -A SIZE=([sda]=$((64 << 20)) [hda]=$((32 << 20)) [vda]=$((16 << 20)))

# ---- a private libvirtd --------------------------------------------------

. "$TESTS_DIR/libvirt-lib.sh"
libvirt_start "$TMPD/img"
export LIBVIRT_DEFAULT_URI="qemu+unix:///session?socket=$LV_SOCK"

# The domain is destroyed before the daemon goes (libvirtd leaves its
# domains running when it stops); its QEMU is killed by PID if not.
teardown() {
    if pid_alive "$LV_PID"; then
        timeout 60 virsh destroy "$DOM" >/dev/null 2>&1
    fi
}
# shellcheck disable=SC2154 # _rc is assigned in the trap
trap '_rc=$?; set +e; teardown; (exit $_rc); _qcbt_cleanup' EXIT

for t in "${DISKS[@]}"; do
    qemu-img create -q -f qcow2 "$TMPD/img/$t.qcow2" "${SIZE[$t]}"
    truncate -s "${SIZE[$t]}" "$TMPD/model.$t"
done
for f in "$TMPD/img/vda.qcow2" "$TMPD/model.vda"; do
    qemu-io -c "write -P 0x71 1M 3M" -c "write -P 0x72 $((SIZE[vda] - 65536)) 65536" "$f" >/dev/null ||
        fail "qemu-io on $f failed"
done
libvirt_own "$TMPD"/img/*.qcow2
cat >"$TMPD/dom.xml" <<XML
<domain type='qemu'>
  <name>$DOM</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>$(command -v qemu-system-x86_64)</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='$TMPD/img/sda.qcow2'/>
      <target dev='sda' bus='scsi'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='$TMPD/img/hda.qcow2'/>
      <target dev='hda' bus='ide'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$TMPD/img/vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='scsi' model='virtio-scsi'/>
    <memballoon model='none'/>
  </devices>
</domain>
XML
virsh create "$TMPD/dom.xml" >"$TMPD/create.log" 2>&1 ||
    fail "the domain does not start (TCG, <domain type='qemu'>): $(tail -n 3 "$TMPD/create.log") $(tail -n 3 "$LV/cache/libvirt/qemu/log/$DOM.log" 2>/dev/null)"
QEMU_PID=$(cat "$LV/run/libvirt/qemu/run/$DOM.pid" 2>/dev/null) ||
    fail "no pid file for $DOM's QEMU"
cleanup_pid "$QEMU_PID"
note "libvirtd $(libvirtd --version | awk '{print $NF}'), domain $DOM running (QEMU pid $QEMU_PID, TCG)"

# ---- the guest's writes, and the models ------------------------------------

# model_write T CMD: the model of disk T gets qemu-io CMD (a discard on a
# qcow2 without backing, whole clusters, discard=unmap, reads as zeros).
model_write() {
    local mcmd=$2
    [[ $mcmd == discard* ]] && mcmd="write -z ${mcmd#discard }"
    qemu-io -f raw -c "$mcmd" "$TMPD/model.$1" >/dev/null ||
        fail "model write '$mcmd' failed"
}
# gw T CMD: the guest does CMD (qemu-io write -P/-z, discard) on disk T,
# and its model the same.  HMP answers errors as text with status 0: any
# output is a failure.
gw() {
    local out
    out=$(virsh qemu-monitor-command --hmp "$DOM" "qemu-io -d ${DEV[$1]} \"$2\"" 2>&1) ||
        fail "guest write '$2' on $1: $out"
    [[ -z ${out//[[:space:]]/} ]] || fail "guest write '$2' on $1: $out"
    model_write "$1" "$2"
}
# mid R CMD: the guest does CMD on sda in the middle of round R's backup.
declare -A MID
mid() {
    MID[$1]=$2
    printf '%s\n' "$2" >"$TMPD/mid.$1"
}

# ---- the wrapper the example runs as qcbt ----------------------------------
#
# Before 'qcbt backup' of disk T (the job has begun): on sda the guest
# writes mid.R, then nbdcopy reads the export (the oracle of this point);
# with wrongname.R it also runs 'qcbt backup --since' with libvirt's
# checkpoint name, which must exit 2; with fail.R it fails on the second
# disk instead of backing it up (the first one's backup is recorded).
# After a backup, qcbt verify --against the export, while it is there.
WRAP=$TMPD/qcbt-wrapper
cat >"$WRAP" <<WRAPPER
#!/bin/bash
set -uo pipefail
if [[ \$1 == backup ]]; then
    uri=\${*: -2:1}
    r=\$(<"$TMPD/round")
    t=\${uri#nbd+unix:///}
    t=\${t%%\?*}
    if [[ \$t == sda && -s $TMPD/mid.\$r ]]; then
        out=\$(virsh qemu-monitor-command --hmp "$DOM" "qemu-io -d ${DEV[sda]} \\"\$(<"$TMPD/mid.\$r")\\"" 2>&1)
        [[ -z \${out//[[:space:]]/} ]] || { echo "wrapper: mid-job guest write failed: \$out" >&2; exit 1; }
    fi
    nbdcopy "\$uri" "$TMPD/export.\$r.\$t.raw" ||
        { echo "wrapper: oracle broke: nbdcopy \$uri failed" >&2; exit 1; }
    nbdinfo --list --json "\$uri" >"$TMPD/contexts.\$r.\$t.json" 2>&1
    if [[ \$t == sda && -e $TMPD/wrongname.\$r ]]; then
        "$QCBT" backup --since "\$(<"$TMPD/wrongname.\$r")" "\$uri" "$TMPD/wrong" \\
            >"$TMPD/wrongname.out" 2>&1
        echo "\$?" >"$TMPD/wrongname.rc"
    fi
    echo "\$t" >>"$TMPD/done.\$r"
    if [[ -e $TMPD/fail.\$r && \$(wc -l <"$TMPD/done.\$r") -eq 2 ]]; then
        echo "wrapper: failing on purpose" >&2
        exit 1
    fi
    # The backup, then qcbt verify --against the live export.
    "$QCBT" "\$@" || exit
    "$QCBT" verify --against "\$uri" "\${*: -1}" >"$TMPD/verify.\$r.\$t" 2>&1
    echo "\$?" >>"$TMPD/verify.\$r.\$t"
    exit 0
fi
exec "$QCBT" "\$@"
WRAPPER
chmod +x "$WRAP"

BK=$TMPD/backups
RC=0
bad() {
    note "FAIL: $*"
    RC=1
}

# example R [ARGS...]: one run of the example script (round R); returns
# its exit status, output in example.R.out.  The models are saved as
# model.R.T first; sda's mid-job write goes to its model after the run.
example() {
    local r=$1 st=0 t
    shift
    echo "$r" >"$TMPD/round"
    for t in "${DISKS[@]}"; do
        cp "$TMPD/model.$t" "$TMPD/model.$r.$t"
    done
    TMPDIR=$TMPD QCBT=$WRAP bash "$EXAMPLE" "$@" "$DOM" "$BK" \
        >"$TMPD/example.$r.out" 2>&1 || st=$?
    if [[ -n ${MID[$r]:-} ]]; then
        model_write sda "${MID[$r]}"
    fi
    return "$st"
}

# field T N FIELD: backup N's FIELD in disk T's manifest.
field() {
    "$PYTHON" -c 'import json,sys; b=json.load(open(sys.argv[1]))["backups"]
print(b[int(sys.argv[2])].get(sys.argv[3]) if int(sys.argv[2]) < len(b) else "none")' \
        "$BK/$1/manifest.json" "$2" "$3"
}
nbackups() {
    "$PYTHON" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["backups"]))' \
        "$BK/$1/manifest.json"
}
checkpoints() { virsh checkpoint-list "$DOM" --name | sed '/^$/d'; }

# check_point R T N: round R made backup N of disk T: the export read in
# round R is the model (else the oracle broke), and restore --at N equals
# it.  Recorded in POINTS for the checks at the end.
POINTS=()
check_point() {
    local r=$1 t=$2 n=$3 e=$TMPD/export.$1.$2.raw out=$TMPD/restore.$2.$3.raw
    [[ -f $e ]] || { bad "round $r: $t: no export was read"; return; }
    cmp -s "$TMPD/model.$r.$t" "$e" ||
        fail "oracle broke: round $r: $t read through libvirt's export differs from the model of the writes: $(cmp "$TMPD/model.$r.$t" "$e" 2>&1 | head -n 1)"
    if ! "$QCBT" restore --at "$n" "$BK/$t" "$out" >"$TMPD/restore.out" 2>&1; then
        bad "$t: restore --at $n: $(cat "$TMPD/restore.out")"
    elif ! cmp "$e" "$out" >"$TMPD/cmp.out" 2>&1; then
        bad "$t: restore --at $n differs from the disk at backup $n: $(head -n 1 "$TMPD/cmp.out")"
    else
        note "$t: restore --at $n == the disk at backup $n (round $r)"
    fi
    [[ $(tail -n 1 "$TMPD/verify.$r.$t") == 0 ]] ||
        bad "round $r: $t: qcbt verify --against the export: $(head -n 3 "$TMPD/verify.$r.$t")"
    POINTS+=("$r:$t:$n")
}

# ---- round 0: full ------------------------------------------------------
gw sda "write -P 0x11 0 16M"
gw sda "write -P 0x12 24M 4M"
gw sda "write -P 0x13 40M 1M"
gw sda "write -P 0x14 $((SIZE[sda] - 512)) 512"
gw hda "write -P 0x61 0 4M"
gw hda "write -P 0x62 20M 1M"
mid 0 "write -P 0xa0 2M 1M"
example 0 || fail "round 0: the example failed: $(tail -n 5 "$TMPD/example.0.out")"
for t in "${DISKS[@]}"; do
    [[ $(field "$t" 0 type) == full ]] || bad "round 0: $t: backup 0 is $(field "$t" 0 type), not full"
    check_point 0 "$t" 0
done
CK0=$(<"$BK/checkpoint")
[[ $(checkpoints) == "$CK0" ]] || bad "round 0: checkpoints are '$(checkpoints | tr '\n' ' ')', not $CK0"
# The data extents QEMU reports: 16M + 4M + 1M, the last sector's 64k
# cluster; M0 came after backup-begin.
[[ $(field sda 0 data-bytes) -eq $(((21 << 20) + (64 << 10))) ]] ||
    bad "round 0: the full backup of sda copied $(field sda 0 data-bytes) bytes, want 22085632"

# ---- round 1: incremental since CK0 ---------------------------------------
gw sda "write -P 0x21 1M 64k"
gw sda "write -z 8M 1M"
gw sda "discard 12M 512k"
gw sda "write -P 0x22 $((SIZE[sda] - 4096)) 4096"
gw hda "write -P 0x63 1M 64k"
gw hda "write -z 20M 512k"
mid 1 "write -P 0xa1 30M 128k"
echo "$CK0" >"$TMPD/wrongname.1" # libvirt's name, not the exported bitmap's
example 1 || fail "round 1: the example failed: $(tail -n 5 "$TMPD/example.1.out")"
for t in "${DISKS[@]}"; do
    [[ $(field "$t" 1 type) == incremental ]] || bad "round 1: $t: backup 1 is $(field "$t" 1 type), not incremental"
    [[ $(field "$t" 1 context) == "qemu:dirty-bitmap:backup-$t" ]] ||
        bad "round 1: $t: context $(field "$t" 1 context), not qemu:dirty-bitmap:backup-$t"
    grep -q "\"qemu:dirty-bitmap:backup-$t\"" "$TMPD/contexts.1.$t.json" ||
        bad "round 1: nbdinfo --list shows no qemu:dirty-bitmap:backup-$t: $(head -c 400 "$TMPD/contexts.1.$t.json")"
    check_point 1 "$t" 1
done
# Copied, at the bitmap's 64k granularity: what the guest wrote since
# CK0 (0x21 64k, 4096 at the end -> 64k, M0's 1M), zeroed (8M +1M) and
# discarded (12M +512k); M1 came after backup-begin, so it is not in.
d=$(field sda 1 data-bytes) z=$(field sda 1 zero-bytes)
[[ $d -eq $(((64 << 10) + (64 << 10) + (1 << 20))) && $z -eq $(((1 << 20) + (512 << 10))) ]] ||
    bad "round 1: the incremental of sda copied $d bytes of data and $z of zeros, want 1179648 and 1572864"
d=$(field hda 1 data-bytes) z=$(field hda 1 zero-bytes)
[[ $d -eq $((64 << 10)) && $z -eq $((512 << 10)) ]] ||
    bad "round 1: the incremental of hda copied $d bytes of data and $z of zeros, want 65536 and 524288"
d=$(field vda 1 data-bytes) z=$(field vda 1 zero-bytes)
[[ $d -eq 0 && $z -eq 0 ]] ||
    bad "round 1: the incremental of vda, which nothing wrote, copied $d bytes of data and $z of zeros"
[[ $(field vda 0 data-bytes) -eq $(((3 << 20) + (64 << 10))) ]] ||
    bad "round 0: the full backup of vda copied $(field vda 0 data-bytes) bytes, want 3211264"
if [[ $(<"$TMPD/wrongname.rc") -ne 2 ]] ||
    ! grep -q "qemu:dirty-bitmap:backup-sda" "$TMPD/wrongname.out"; then
    bad "round 1: qcbt backup --since $CK0 (libvirt's checkpoint name) gave exit $(<"$TMPD/wrongname.rc"): $(cat "$TMPD/wrongname.out")"
fi
[[ -e $TMPD/wrong/manifest.json ]] && bad "round 1: the refused --since $CK0 wrote a manifest"
CK1=$(<"$BK/checkpoint")
[[ $CK1 != "$CK0" && $(checkpoints) == "$CK1" ]] ||
    bad "round 1: checkpoints are '$(checkpoints | tr '\n' ' ')', want only $CK1 (rotated)"

# ---- round 2: the second disk's backup fails after the job began -----------
gw sda "write -P 0x31 20M 2M"
gw hda "write -P 0x64 10M 1M"
mid 2 "write -P 0xa2 50M 256k"
touch "$TMPD/fail.2"
if example 2; then
    bad "round 2: the example succeeded although qcbt failed"
else
    # The first disk's backup is recorded, and must be right; the
    # others' are not.
    first=$(head -n 1 "$TMPD/done.2")
    for t in "${DISKS[@]}"; do
        if [[ $t == "$first" ]]; then
            if [[ $(nbackups "$t") -eq 3 ]]; then
                check_point 2 "$t" 2
            else
                bad "round 2: $t, backed up before the failure, holds $(nbackups "$t") backups, not 3"
            fi
        else
            [[ $(nbackups "$t") -eq 2 ]] || bad "round 2: $t holds $(nbackups "$t") backups, not 2"
        fi
    done
    [[ $(<"$BK/checkpoint") == "$CK1" ]] || bad "round 2: DIR/checkpoint moved to $(<"$BK/checkpoint")"
    [[ $(checkpoints) == "$CK1" ]] ||
        bad "round 2: checkpoints are '$(checkpoints | tr '\n' ' ')', want $CK1 alone (the new one deleted)"
    job=$(virsh domjobinfo "$DOM")
    grep -Eq '^Job type: +None' <<<"$job" ||
        bad "round 2: the backup job was not ended: $(head -n 2 <<<"$job")"
    grep -q "checkpoint .* deleted" "$TMPD/example.2.out" || bad "round 2: no word of the deleted checkpoint"
fi

# ---- round 3: incremental since CK1 again: round 2's writes are in it ------
gw sda "write -P 0x41 5M 64k"
gw hda "write -P 0x65 30M 64k"
mid 3 "write -P 0xa3 9M 64k"
declare -A N3
for t in "${DISKS[@]}"; do
    N3[$t]=$(nbackups "$t")
done
example 3 || fail "round 3: the example failed: $(tail -n 5 "$TMPD/example.3.out")"
for t in "${DISKS[@]}"; do
    [[ $(field "$t" "${N3[$t]}" type) == incremental ]] ||
        bad "round 3: $t: backup ${N3[$t]} is $(field "$t" "${N3[$t]}" type), not incremental"
done
# Since CK1, whether the failed run backed the disk up or not: on sda W2
# (2M), M2 (256k, written after the deleted checkpoint began: libvirt
# folded its bitmap into CK1), M1 (128k), W3 (64k); on hda 1M + 64k.
d=$(field sda "${N3[sda]}" data-bytes)
[[ $d -eq $(((2 << 20) + (256 << 10) + (128 << 10) + (64 << 10))) ]] ||
    bad "round 3: the incremental of sda copied $d bytes of data, want 2555904"
d=$(field hda "${N3[hda]}" data-bytes)
[[ $d -eq $(((1 << 20) + (64 << 10))) ]] ||
    bad "round 3: the incremental of hda copied $d bytes of data, want 1114112"
d=$(field vda "${N3[vda]}" data-bytes)
[[ $d -eq 0 ]] || bad "round 3: the incremental of vda copied $d bytes of data, want 0"
for t in "${DISKS[@]}"; do
    check_point 3 "$t" "${N3[$t]}"
done

# ---- round 4: --full --------------------------------------------------------
gw sda "write -P 0x51 60M 1M"
example 4 --full || fail "round 4: the example failed: $(tail -n 5 "$TMPD/example.4.out")"
for t in "${DISKS[@]}"; do
    n=$((N3[$t] + 1))
    [[ $(field "$t" $n type) == full ]] || bad "round 4: $t: backup $n is $(field "$t" $n type), not full"
    check_point 4 "$t" $n
done

# ---- the whole set ----------------------------------------------------------
# Restores again: later backups changed nothing older.
for p in "${POINTS[@]}"; do
    IFS=: read -r r t n <<<"$p"
    rm -f "$TMPD/again.raw"
    if ! "$QCBT" restore --at "$n" "$BK/$t" "$TMPD/again.raw" >/dev/null 2>&1 ||
        ! cmp -s "$TMPD/export.$r.$t.raw" "$TMPD/again.raw"; then
        bad "$t: restore --at $n no longer equals the disk at backup $n"
    fi
done
for t in "${DISKS[@]}"; do
    "$QCBT" verify "$BK/$t" >"$TMPD/verify.out" 2>&1 || bad "qcbt verify $t: $(tail -n 3 "$TMPD/verify.out")"
    for f in "$BK/$t"/backup-*.qcow2; do
        qemu-img check -q "$f" >/dev/null 2>&1 || bad "qemu-img check $f"
    done
done
f=$(printf 'backup-%04d.qcow2' "${N3[sda]}")
qemu-img compare -q -f qcow2 -F raw "$BK/sda/$f" "$TMPD/export.3.sda.raw" ||
    bad "sda's $f read by qemu-img != the disk at backup ${N3[sda]}"
for r in 0 1 2 3 4; do
    note "round $r: $(grep -E '^backup-[0-9]+\.qcow2: ' "$TMPD/example.$r.out" | tr '\n' ' ')"
done
[[ -e $LV/run/libvirt/virtlogd-sock ]] && bad "the private libvirtd started a virtlogd"

[[ $RC -eq 0 ]] || fail "see above"
note "PASS: full, incremental, a failed run, incremental, --full on three disks; every restore equals the disk at its point"
