#!/bin/bash
# qcbt backup against libvirt's pull-mode backup export, for real (issue 15):
# a private libvirtd, a running QEMU domain (TCG, idling in SeaBIOS with a
# qcow2 disk it cannot boot), and examples/libvirt-pull-backup.sh driving
# virsh backup-begin (pull mode, <incremental>, a new checkpoint each time),
# qcbt backup --full / --since backup-sda, virsh domjobabort and checkpoint
# rotation.
#
# The guest writes through the monitor (HMP qemu-io on the disk's device,
# so the writes go where the guest's do: through the copy-before-write
# filter of a running backup job): before each backup, and also in the
# middle of each one, after backup-begin, where they must not be in that
# backup but in the next.  The oracle of each point is the disk read
# through libvirt's export by nbdcopy (an independent NBD client), and it
# must equal a model (a raw file the same writes were applied to); if the
# two disagree the oracle broke.  Each 'qcbt restore --at N' must equal
# the oracle of backup N.
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
        fail "$t is missing (scripts/setup.sh installs libvirt-daemon-system, libvirt-clients, qemu-system-x86)"
done
SRC=${QCBT_SRC_DIR:-$TESTS_DIR/..}
EXAMPLE=$(cd "$SRC/examples" && pwd)/libvirt-pull-backup.sh
DOM=qcbt-pull-test
DEV=scsi0-0-0-0 # qdev id of the scsi-hd that holds target sda
SIZE=$((64 << 20))

# ---- a private libvirtd --------------------------------------------------

# As root, libvirtd would be the system instance (/run/libvirt, shared with
# any other); as another user it is a session daemon that keeps all its
# state under XDG_*.  QEMU runs as that user too, so TMPD must be
# traversable and the dirs it uses owned by it.
LV=$TMPD/lv
mkdir -p "$LV"/{home,cfg/libvirt,cache,run} "$TMPD/img"
printf '# no virtlogd: QEMU logs straight to a file\nstdio_handler = "file"\n' \
    >"$LV/cfg/libvirt/qemu.conf"
asuser=()
if [[ $(id -u) -eq 0 ]]; then
    chmod 0711 "$TMPD"
    chown -R 65534:65534 "$LV" "$TMPD/img"
    asuser=(setpriv --reuid=65534 --regid=65534 --clear-groups)
fi
env -i PATH="$PATH" HOME="$LV/home" XDG_CONFIG_HOME="$LV/cfg" \
    XDG_CACHE_HOME="$LV/cache" XDG_RUNTIME_DIR="$LV/run" \
    "${asuser[@]}" libvirtd >"$TMPD/libvirtd.log" 2>&1 </dev/null &
LV_PID=$!
cleanup_pid "$LV_PID"
export LIBVIRT_DEFAULT_URI="qemu+unix:///session?socket=$LV/run/libvirt/libvirt-sock"
# virsh's own files (none expected) stay in TMPD too.
export XDG_CONFIG_HOME=$TMPD/virsh-cfg XDG_CACHE_HOME=$TMPD/virsh-cache
virsh_ok() { virsh uri >/dev/null 2>&1; }
wait_until -p "$LV_PID" -- virsh_ok ||
    fail "the private libvirtd does not answer: $(tail -n 5 "$TMPD/libvirtd.log")"

# The domain is destroyed before the daemon goes (libvirtd leaves its
# domains running when it stops); its QEMU is killed by PID if not.
teardown() {
    if pid_alive "$LV_PID"; then
        timeout 60 virsh destroy "$DOM" >/dev/null 2>&1
    fi
}
# shellcheck disable=SC2154 # _rc is assigned in the trap
trap '_rc=$?; set +e; teardown; (exit $_rc); _qcbt_cleanup' EXIT

qemu-img create -q -f qcow2 "$TMPD/img/disk.qcow2" "$SIZE"
[[ $(id -u) -eq 0 ]] && chown 65534:65534 "$TMPD/img/disk.qcow2"
cat >"$TMPD/dom.xml" <<EOF
<domain type='qemu'>
  <name>$DOM</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>$(command -v qemu-system-x86_64)</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='$TMPD/img/disk.qcow2'/>
      <target dev='sda' bus='scsi'/>
    </disk>
    <controller type='scsi' model='virtio-scsi'/>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
virsh create "$TMPD/dom.xml" >"$TMPD/create.log" 2>&1 ||
    fail "the domain does not start (TCG, <domain type='qemu'>): $(tail -n 3 "$TMPD/create.log") $(tail -n 3 "$LV/cache/libvirt/qemu/log/$DOM.log" 2>/dev/null)"
QEMU_PID=$(cat "$LV/run/libvirt/qemu/run/$DOM.pid" 2>/dev/null) ||
    fail "no pid file for $DOM's QEMU"
cleanup_pid "$QEMU_PID"
note "libvirtd $(libvirtd --version | awk '{print $NF}'), domain $DOM running (QEMU pid $QEMU_PID, TCG)"

# ---- the guest's writes, and the model ------------------------------------

MODEL=$TMPD/model.raw
truncate -s "$SIZE" "$MODEL"
# gw CMD: the guest does CMD (qemu-io write -P/-z, discard) on its disk;
# the model gets the same (a discard on a qcow2 without backing, whole
# clusters, discard=unmap, reads as zeros).  HMP answers errors as text
# with status 0: any output is a failure.
gw() {
    local out mcmd=$1
    out=$(virsh qemu-monitor-command --hmp "$DOM" "qemu-io -d $DEV \"$1\"" 2>&1) ||
        fail "guest write '$1': $out"
    [[ -z ${out//[[:space:]]/} ]] || fail "guest write '$1': $out"
    [[ $mcmd == discard* ]] && mcmd="write -z ${mcmd#discard }"
    qemu-io -f raw -c "$mcmd" "$MODEL" >/dev/null ||
        fail "model write '$mcmd' failed"
}
# The model after the writes made in the middle of backup N is saved as
# model.N before them: those writes belong to backup N+1.
# mid_write N CMD: recorded for the wrapper of round N.
declare -A MID

# ---- the wrapper the example runs as qcbt ----------------------------------
#
# Before 'qcbt backup' (the job has begun): the guest writes MID[N], then
# nbdcopy reads the export (the oracle of point N); optionally it fails
# instead of backing up (FAILNEXT), or also runs a 'qcbt backup --since
# CHECKPOINT' with libvirt's checkpoint name, which must exit 2.
WRAP=$TMPD/qcbt-wrapper
cat >"$WRAP" <<EOF
#!/bin/bash
set -uo pipefail
if [[ \$1 == backup ]]; then
    uri=\${*: -2:1}
    dir=\${*: -1}
    r=\$(<"$TMPD/round")
    echo "\$uri" >"$TMPD/uri.\$r"
    if [[ -s $TMPD/mid.\$r ]]; then
        out=\$(virsh qemu-monitor-command --hmp "$DOM" "qemu-io -d $DEV \\"\$(<"$TMPD/mid.\$r")\\"" 2>&1)
        [[ -z \${out//[[:space:]]/} ]] || { echo "wrapper: mid-job guest write failed: \$out" >&2; exit 1; }
    fi
    nbdcopy "\$uri" "$TMPD/export.\$r.raw" ||
        { echo "wrapper: oracle broke: nbdcopy \$uri failed" >&2; exit 1; }
    nbdinfo --list --json "\$uri" >"$TMPD/contexts.\$r.json" 2>&1
    if [[ -e $TMPD/wrongname.\$r ]]; then
        "$QCBT" backup --since "\$(<"$TMPD/wrongname.\$r")" "\$uri" "$TMPD/wrong" \
            >"$TMPD/wrongname.out" 2>&1
        echo "\$?" >"$TMPD/wrongname.rc"
    fi
    if [[ -e $TMPD/fail.\$r ]]; then
        echo "wrapper: failing on purpose" >&2
        exit 1
    fi
fi
exec "$QCBT" "\$@"
EOF
chmod +x "$WRAP"

BK=$TMPD/backups
RC=0
bad() {
    note "FAIL: $*"
    RC=1
}

# example N [ARGS...]: one run of the example script (round N); returns
# its exit status, output in example.N.out.
example() {
    local r=$1 st=0
    shift
    echo "$r" >"$TMPD/round"
    cp "$MODEL" "$TMPD/model.$r"
    TMPDIR=$TMPD QCBT=$WRAP bash "$EXAMPLE" "$@" "$DOM" "$BK" \
        >"$TMPD/example.$r.out" 2>&1 || st=$?
    if [[ -n ${MID[$r]:-} ]]; then
        local mcmd=${MID[$r]}
        [[ $mcmd == discard* ]] && mcmd="write -z ${mcmd#discard }"
        qemu-io -f raw -c "$mcmd" "$MODEL" >/dev/null || fail "model write '$mcmd' failed"
    fi
    return "$st"
}
mid() {
    MID[$1]=$2
    printf '%s\n' "$2" >"$TMPD/mid.$1"
}

# manifest_field N FIELD: backup N's FIELD in the manifest.
manifest_field() {
    "$PYTHON" -c 'import json,sys; b=json.load(open(sys.argv[1]))["backups"]
print(b[int(sys.argv[2])].get(sys.argv[3]) if int(sys.argv[2]) < len(b) else "none")' \
        "$BK/sda/manifest.json" "$1" "$2"
}
nbackups() {
    "$PYTHON" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["backups"]))' \
        "$BK/sda/manifest.json"
}
checkpoints() { virsh checkpoint-list "$DOM" --name | sed '/^$/d'; }

# check_point R N: round R made backup N: the export read in round R is
# the model of round R (else the oracle broke), and restore --at N equals
# it.
check_point() {
    local r=$1 n=$2
    [[ -f $TMPD/export.$r.raw ]] || { bad "round $r: no export was read"; return; }
    cmp -s "$TMPD/model.$r" "$TMPD/export.$r.raw" ||
        fail "oracle broke: round $r: the disk read through libvirt's export differs from the model of the writes: $(cmp "$TMPD/model.$r" "$TMPD/export.$r.raw" 2>&1 | head -n 1)"
    if ! "$QCBT" restore --at "$n" "$BK/sda" "$TMPD/restore.$n.raw" >"$TMPD/restore.$n.out" 2>&1; then
        bad "restore --at $n: $(cat "$TMPD/restore.$n.out")"
    elif ! cmp "$TMPD/export.$r.raw" "$TMPD/restore.$n.raw" >"$TMPD/cmp.out" 2>&1; then
        bad "restore --at $n differs from the disk at backup $n: $(head -n 1 "$TMPD/cmp.out")"
    else
        note "restore --at $n == the disk at backup $n (round $r)"
    fi
}

# ---- round 0: full ------------------------------------------------------
gw "write -P 0x11 0 16M"
gw "write -P 0x12 24M 4M"
gw "write -P 0x13 40M 1M"
gw "write -P 0x14 $((SIZE - 512)) 512"
mid 0 "write -P 0xa0 2M 1M"
example 0 || fail "round 0: the example failed: $(tail -n 5 "$TMPD/example.0.out")"
[[ $(manifest_field 0 type) == full ]] || bad "round 0: backup 0 is $(manifest_field 0 type), not full"
CK0=$(<"$BK/checkpoint")
[[ $(checkpoints) == "$CK0" ]] || bad "round 0: checkpoints are '$(checkpoints | tr '\n' ' ')', not $CK0"
check_point 0 0
# The data extents QEMU reports: 16M + 4M + 1M, the last sector's 64k
# cluster; M0 came after backup-begin.
[[ $(manifest_field 0 data-bytes) -eq $(((21 << 20) + (64 << 10))) ]] ||
    bad "round 0: the full backup copied $(manifest_field 0 data-bytes) bytes, want 22085632"

# ---- round 1: incremental since CK0 ---------------------------------------
gw "write -P 0x21 1M 64k"
gw "write -z 8M 1M"
gw "discard 12M 512k"
gw "write -P 0x22 $((SIZE - 4096)) 4096"
mid 1 "write -P 0xa1 30M 128k"
echo "$CK0" >"$TMPD/wrongname.1" # libvirt's name, not the exported bitmap's
example 1 || fail "round 1: the example failed: $(tail -n 5 "$TMPD/example.1.out")"
[[ $(manifest_field 1 type) == incremental ]] || bad "round 1: backup 1 is $(manifest_field 1 type), not incremental"
[[ $(manifest_field 1 context) == qemu:dirty-bitmap:backup-sda ]] ||
    bad "round 1: context $(manifest_field 1 context), not qemu:dirty-bitmap:backup-sda"
grep -q '"qemu:dirty-bitmap:backup-sda"' "$TMPD/contexts.1.json" ||
    bad "round 1: nbdinfo --list shows no qemu:dirty-bitmap:backup-sda: $(head -c 400 "$TMPD/contexts.1.json")"
# Copied, at the bitmap's 64k granularity: what the guest wrote since
# CK0 (0x21 64k, 4096 at the end -> 64k, M0's 1M), zeroed (8M +1M) and
# discarded (12M +512k); M1 came after backup-begin, so it is not in.
d1=$(manifest_field 1 data-bytes) z1=$(manifest_field 1 zero-bytes)
[[ $d1 -eq $(((64 << 10) + (64 << 10) + (1 << 20))) && $z1 -eq $(((1 << 20) + (512 << 10))) ]] ||
    bad "round 1: the incremental copied $d1 bytes of data and $z1 of zeros, want 1179648 and 1572864"
if [[ $(<"$TMPD/wrongname.rc") -ne 2 ]] ||
    ! grep -q "qemu:dirty-bitmap:backup-sda" "$TMPD/wrongname.out"; then
    bad "round 1: qcbt backup --since $CK0 (libvirt's checkpoint name) gave exit $(<"$TMPD/wrongname.rc"): $(cat "$TMPD/wrongname.out")"
fi
[[ -e $TMPD/wrong/manifest.json ]] && bad "round 1: the refused --since $CK0 wrote a manifest"
CK1=$(<"$BK/checkpoint")
[[ $CK1 != "$CK0" && $(checkpoints) == "$CK1" ]] ||
    bad "round 1: checkpoints are '$(checkpoints | tr '\n' ' ')', want only $CK1 (rotated)"
check_point 1 1

# ---- round 2: the backup fails after the job began -------------------------
gw "write -P 0x31 20M 2M"
mid 2 "write -P 0xa2 50M 256k"
touch "$TMPD/fail.2"
if example 2; then
    bad "round 2: the example succeeded although qcbt failed"
else
    [[ $(nbackups) -eq 2 ]] || bad "round 2: the manifest holds $(nbackups) backups, not 2"
    [[ $(<"$BK/checkpoint") == "$CK1" ]] || bad "round 2: DIR/checkpoint moved to $(<"$BK/checkpoint")"
    [[ $(checkpoints) == "$CK1" ]] ||
        bad "round 2: checkpoints are '$(checkpoints | tr '\n' ' ')', want $CK1 alone (the new one deleted)"
    job=$(virsh domjobinfo "$DOM")
    grep -Eq '^Job type: +None' <<<"$job" ||
        bad "round 2: the backup job was not ended: $(head -n 2 <<<"$job")"
    grep -q "checkpoint .* deleted" "$TMPD/example.2.out" || bad "round 2: no word of the deleted checkpoint"
fi

# ---- round 3: incremental since CK1 again: round 2's writes are in it ------
gw "write -P 0x41 5M 64k"
mid 3 "write -P 0xa3 9M 64k"
example 3 || fail "round 3: the example failed: $(tail -n 5 "$TMPD/example.3.out")"
[[ $(manifest_field 2 type) == incremental ]] || bad "round 3: backup 2 is $(manifest_field 2 type), not incremental"
# Since CK1: W2 (2M), M2 (256k, written after the deleted checkpoint
# began: libvirt folded its bitmap into CK1), M1 (128k), W3 (64k).
d2=$(manifest_field 2 data-bytes)
[[ $d2 -eq $(((2 << 20) + (256 << 10) + (128 << 10) + (64 << 10))) ]] ||
    bad "round 3: the incremental copied $d2 bytes of data, want 2555904"
check_point 3 2

# ---- round 4: --full --------------------------------------------------------
gw "write -P 0x51 60M 1M"
example 4 --full || fail "round 4: the example failed: $(tail -n 5 "$TMPD/example.4.out")"
[[ $(manifest_field 3 type) == full ]] || bad "round 4: backup 3 is $(manifest_field 3 type), not full"
check_point 4 3

# ---- the whole set ------------------------------------------------------------
# Restores again: later backups changed nothing older (backup N: round).
for nr in 0:0 1:1 2:3; do
    n=${nr%:*} r=${nr#*:}
    rm -f "$TMPD/again.raw"
    if ! "$QCBT" restore --at "$n" "$BK/sda" "$TMPD/again.raw" >/dev/null 2>&1 ||
        ! cmp -s "$TMPD/export.$r.raw" "$TMPD/again.raw"; then
        bad "restore --at $n no longer equals the disk at backup $n"
    fi
done
"$QCBT" verify "$BK/sda" >"$TMPD/verify.out" 2>&1 || bad "qcbt verify: $(tail -n 3 "$TMPD/verify.out")"
for f in "$BK"/sda/backup-*.qcow2; do
    qemu-img check -q "$f" >/dev/null 2>&1 || bad "qemu-img check $f"
done
qemu-img compare -q -f qcow2 -F raw "$BK/sda/backup-0002.qcow2" "$TMPD/export.3.raw" ||
    bad "backup-0002.qcow2 read by qemu-img != the disk at backup 2"
for r in 0 1 3 4; do
    note "round $r: $(grep -E '^backup-[0-9]+\.qcow2: ' "$TMPD/example.$r.out")"
done
[[ -e $LV/run/libvirt/virtlogd-sock ]] && bad "the private libvirtd started a virtlogd"

[[ $RC -eq 0 ]] || fail "see above"
note "PASS: full, incremental (with a failed run between), --full; every restore equals the disk at its point"
