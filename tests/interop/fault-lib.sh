# shellcheck shell=bash
# Fault sweeps of the commands that change an image in place, sourced after
# ../functions.sh by tests/interop/test-fault-sweep.sh (a fixed subset, in
# CI) and scripts/fault-sweep.sh (every point, by hand).
#
# The hook (common/io/io.c, docs/qcbt.pod "ENVIRONMENT"):
# QCBT_TEST_FAIL_AT=KIND-OP:N acts at the Nth image write or flush (OP) of
# the process: KIND eio and enospc fail it and every later one with that
# errno, kill kills the process with SIGKILL before it happens (a crash).
#
# After each run (DESIGN.md "Loading and storing"):
#   - every bitmap is exactly as before, exactly as after a run without
#     faults, or in use (name, granularity, flags, and the dirty map QEMU
#     exports: qemu-img info + qemu-nbd -B + nbdinfo --map);
#   - the guest data is unchanged (qemu-img compare against the image
#     before);
#   - `qemu-img check` finds no error (leaks allowed: exit 0 or 3);
#   - the exit status says what happened: 137 for kill (SIGKILL), 1 with one
#     "qcbt: " line naming the errno ("Input/output error", "No space left
#     on device") for eio and enospc, and an image that is new after a
#     failure must be said to be changed (the message names the leak or the
#     flush); 0 only once N is past the last write/flush, and then the
#     image is new.
#
# THE TABLE: one line per operation, "NAME|SETUP|ARGS".  SETUP is a
# function run once in an empty directory that leaves before.qcow2 there
# (and any file ARGS names); ARGS are qcbt's arguments with IMG standing
# for the image under test (run in that directory).  To sweep a new
# command, add its line (and a setup if none fits), e.g.
#     "checkpoint-create|fs_setup_bitmaps|checkpoint create IMG c1"
# An operation that writes another file than IMG (convert DST) needs its
# setup to leave that file's "before" state too: fs_check looks at IMG.
# shellcheck disable=SC2034 # for the sourcing scripts
FAULT_OPS=(
    "bitmap-add|fs_setup_bitmaps|bitmap add IMG s1"
    "bitmap-add-disabled|fs_setup_bitmaps|bitmap add -g 1M --disabled IMG s2"
    "bitmap-remove|fs_setup_bitmaps|bitmap remove IMG q1"
    "bitmap-remove-last|fs_setup_one_bitmap|bitmap remove IMG q1"
    "bitmap-clear|fs_setup_bitmaps|bitmap clear IMG q1"
    "bitmap-enable|fs_setup_bitmaps|bitmap enable IMG q2"
    "bitmap-disable|fs_setup_bitmaps|bitmap disable IMG q1"
    "bitmap-merge|fs_setup_bitmaps|bitmap merge IMG q2 q1"
    "bitmap-merge-file|fs_setup_bitmaps|bitmap merge -b other.qcow2 IMG q1 o1"
    "bitmap-add-refblock|fs_setup_refblock|bitmap add IMG s1"
    "bitmap-add-reftable|fs_setup_reftable|bitmap add IMG s1"
    "checkpoint-create|fs_setup_bitmaps|checkpoint create IMG c1"
    "checkpoint-create-keep|fs_setup_bitmaps|checkpoint create --keep 1 IMG c1"
    "checkpoint-delete|fs_setup_bitmaps|checkpoint delete IMG q2"
)
# shellcheck disable=SC2034
FAULT_KINDS=(kill eio enospc)
# shellcheck disable=SC2034
FAULT_POINTS=(write flush)

# --- setups -------------------------------------------------------------

# Two bitmaps QEMU made and filled: q1 enabled (64 KiB), q2 disabled (1 MiB)
# with other writes; other.qcow2 holds o1.
fs_setup_bitmaps() {
    qemu-img create -q -f qcow2 before.qcow2 1G
    qemu-img bitmap --add before.qcow2 q1
    qemu-img bitmap --add -g 1M before.qcow2 q2
    qemu-io -c 'write -P 0x5a 0 64k' -c 'write -P 0x33 300M 1M' before.qcow2 >/dev/null ||
        fail "oracle broke: qemu-io write"
    qemu-img bitmap --disable before.qcow2 q2
    qemu-io -c 'write -P 0x44 700M 8k' before.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
    qemu-img create -q -f qcow2 other.qcow2 1G
    qemu-img bitmap --add -g 4k other.qcow2 o1
    qemu-io -c 'write 900M 4k' other.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
}

# One bitmap: removing it drops the bitmaps extension.
fs_setup_one_bitmap() {
    qemu-img create -q -f qcow2 before.qcow2 1G
    qemu-img bitmap --add before.qcow2 q1
    qemu-io -c 'write -P 0x5a 0 64k' before.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
}

# 512-byte clusters, the file one cluster short of what the first refcount
# block covers (128 KiB): an add needs a new refcount block.
fs_setup_refblock() {
    local off
    qemu-img create -q -f qcow2 -o cluster_size=512 before.qcow2 64M
    for ((off = 0; $(stat -c %s before.qcow2) < 130560; off += 512)); do
        qemu-io -c "write -P 7 $off 512" before.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
    done
}

# 512-byte clusters, the file one or two clusters short of the 8 MiB the
# one-cluster refcount table counts (64 blocks of 256 clusters), with a
# bitmap: an add needs a block past the table, so a larger table.  Each
# write fills half the gap (data and L2 clusters), never past the table.
fs_setup_reftable() {
    local off=0 n gap end=$((16383 * 512))
    qemu-img create -q -f qcow2 -o cluster_size=512 before.qcow2 64M
    qemu-img bitmap --add before.qcow2 q1
    while (($(stat -c %s before.qcow2) < end)); do
        gap=$(((end - $(stat -c %s before.qcow2)) / 512))
        n=$((gap > 2 ? gap / 2 : 1))
        qemu-io -c "write -P 7 $((off * 512)) $((n * 512))" before.qcow2 >/dev/null ||
            fail "oracle broke: qemu-io write"
        off=$((off + n))
    done
    [[ $(od -An -tx1 -j56 -N4 before.qcow2 | tr -d ' ') == 00000001 ]] ||
        fail "setup broke: qemu grew the refcount table itself"
}

# --- checks -------------------------------------------------------------

# fs_state IMG: one line per bitmap: name, granularity, flags and (unless
# in use) the dirty extents qemu-nbd exports.
fs_state() {
    local b g f m
    qemu-img info -U --output=json "$1" >state.json 2>state.err ||
        { echo "unreadable: $(head -n 1 state.err)"; return 0; }
    while read -r b g f; do
        m=-
        if [[ $f != *in-use* ]]; then
            m=$(nbdinfo --map=qemu:dirty-bitmap:"$b" -- [ qemu-nbd -r -f qcow2 -B "$b" "$1" ] |
                awk '$4 == "dirty" { printf "%s+%s;", $1, $2 }') ||
                fail "oracle broke: qemu-nbd -B $b $1"
        fi
        printf '%s %s %s %s\n' "$b" "$g" "$f" "${m:--}"
    done < <("$PYTHON" -c '
import json, sys
d = json.load(open(sys.argv[1]))["format-specific"]["data"]
for b in sorted(d.get("bitmaps", []), key=lambda b: b["name"]):
    print(b["name"], b["granularity"], ",".join(sorted(b["flags"])) or "-")' state.json)
}

# fs_bitmaps_ok OLD NEW NOW: every bitmap of NOW (and every one of OLD or
# NEW missing from NOW) is exactly old, exactly new or in use.  Prints the
# offending bitmap.
fs_bitmaps_ok() {
    "$PYTHON" - "$1" "$2" "$3" <<'EOF'
import sys
def load(p):
    return {l.split(" ", 1)[0]: l for l in open(p).read().splitlines() if l}
old, new, now = (load(p) for p in sys.argv[1:])
bad = []
for name in sorted(set(old) | set(new) | set(now)):
    o, n, x = old.get(name), new.get(name), now.get(name)
    if x == o or x == n:
        continue
    if x is not None and "in-use" in x.split(" ")[2]:
        continue
    bad.append("%s: %s (old %s, new %s)" % (name, x or "absent", o or "absent", n or "absent"))
if bad:
    print("; ".join(bad))
    sys.exit(1)
EOF
}

FS_CASES=0
FS_FAILURES=0
fs_bad() {
    note "FAIL: $*"
    FS_FAILURES=$((FS_FAILURES + 1))
}

# fs_prepare DIR NAME SETUP ARGS: run SETUP in DIR, then the operation once
# without faults: DIR/old.state, DIR/new.state.
fs_prepare() {
    local dir=$1 name=$2 setup=$3 args=$4 rc=0
    mkdir -p "$dir"
    (
        cd "$dir" || return 1
        "$setup"
        fs_state before.qcow2 >old.state
        cp before.qcow2 img.qcow2
        # shellcheck disable=SC2086 # ARGS are words
        "$QCBT" ${args//IMG/img.qcow2} 2>err || fail "$name: qcbt ${args//IMG/img.qcow2} fails without faults: $(cat err)"
        fs_state img.qcow2 >new.state
        cmp -s old.state new.state && fail "$name: nothing changes, the sweep would prove nothing"
        qemu-img check img.qcow2 >check.out 2>&1 || fail "$name: qemu-img check after a run without faults: $(cat check.out)"
        true
    ) || rc=$?
    return "$rc"
}

# fs_check ID KIND RC: check the run that left f.qcow2, err (its stderr)
# and exit status RC in the current (prepared) directory, as the header
# says; KIND (kill, eio, enospc) is the fault it was given.  Returns 0 when
# the fault fired, 1 when the operation completed.
fs_check() {
    local id=$1 kind=$2 rc=$3 crc=0 why err fired=0
    FS_CASES=$((FS_CASES + 1))
    err=$(cat err)
    case $kind:$rc in
    *:0) ;;
    kill:137) fired=1 ;;
    eio:1 | enospc:1)
        fired=1
        why=$([[ $kind == eio ]] && echo "Input/output error" || echo "No space left on device")
        if [[ $(wc -l <err) -ne 1 || $err != "qcbt: "* || $err != *"$why"* ]]; then
            fs_bad "$id: the message does not say '$why' in one 'qcbt: ' line: $err"
        fi
        ;;
    *) fs_bad "$id: exit $rc: $err" ;;
    esac
    [[ $kind == kill && $rc -eq 137 && -n $err ]] && fs_bad "$id: killed, yet it printed: $err"
    qemu-img check f.qcow2 >check.out 2>&1 || crc=$?
    [[ $crc -eq 0 || $crc -eq 3 ]] || fs_bad "$id: qemu-img check (exit $crc): $(tr '\n' ' ' <check.out)"
    fs_state f.qcow2 >now.state
    why=$(fs_bitmaps_ok old.state new.state now.state) || fs_bad "$id: bitmaps neither old, new nor in use: $why"
    if [[ $rc -eq 0 ]] && ! cmp -s now.state new.state; then
        fs_bad "$id: exit 0 but the bitmaps are not the new ones: $(tr '\n' ';' <now.state)"
    fi
    if [[ $rc -eq 1 ]] && cmp -s now.state new.state &&
        [[ $err != *"may be leaked"* && $err != *"flush"* ]]; then
        fs_bad "$id: the change is done, but the error does not say so: $err"
    fi
    qemu-img compare -q before.qcow2 f.qcow2 || fs_bad "$id: guest data changed"
    [[ $fired -eq 1 ]]
}

# fs_case DIR NAME ARGS KIND POINT N: one run with KIND-POINT:N in DIR
# (prepared), checked.  Returns 0 when the fault fired, 1 when N is past
# the last POINT (the operation completed); failures are counted.
fs_case() {
    local dir=$1 name=$2 args=$3 kind=$4 point=$5 n=$6 rc=0 words fired=0
    cd "$dir" || return 1
    cp before.qcow2 f.qcow2
    words=${args//IMG/f.qcow2}
    # In a subshell whose stderr is dropped: the shell's "Killed" report.
    # shellcheck disable=SC2086 # ARGS are words
    (
        QCBT_TEST_FAIL_AT="$kind-$point:$n" "$QCBT" $words 2>err </dev/null
        exit $?
    ) 2>/dev/null || rc=$?
    fs_check "$name $kind-$point:$n" "$kind" "$rc" && fired=1
    cd - >/dev/null || return 1
    [[ $fired -eq 1 ]]
}

# A real full file system: a tmpfs in a private mount namespace
# (unshare -rm; no privilege needed where user namespaces are allowed).
fs_have_tmpfs() {
    unshare -rm sh -c 'mount -t tmpfs -o size=64k tmpfs "$1"' sh "$TMPD" 2>/dev/null
}

# fs_real_enospc DIR NAME ARGS [STEP]: the operation on a tmpfs holding
# the image (and the files ARGS name) with F bytes free, for F = 0, STEP,
# 2 STEP ... (STEP 4 KiB, a page, by default) until it succeeds; each run
# checked as fs_check says.
# Prints "NAME real-enospc: K points".
fs_real_enospc() {
    local dir=$1 name=$2 args=$3 step=${4:-4096} f rc before=$FS_FAILURES words n=0
    cd "$dir" || return 1
    mkdir -p mnt
    words=${args//IMG/mnt/f.qcow2}
    words=${words//other.qcow2/mnt/other.qcow2}
    for ((f = 0; ; f += step)); do
        rc=0
        rm -f f.qcow2 err
        # shellcheck disable=SC2016,SC2086 # expanded by the inner shell; ARGS are words
        unshare -rm bash -c '
            set -e
            free=$1 qcbt=$2
            shift 2
            mount -t tmpfs -o size=$(( $(stat -c %s before.qcow2) + 4 * 1024 * 1024 )) tmpfs mnt
            cp before.qcow2 mnt/f.qcow2
            [ ! -e other.qcow2 ] || cp other.qcow2 mnt/
            avail=$(( $(stat -f -c "%a * %S" mnt) ))
            [ "$avail" -ge "$free" ]
            [ "$avail" -eq "$free" ] || fallocate -l $((avail - free)) mnt/fill
            rc=0
            "$qcbt" "$@" 2>err </dev/null || rc=$?
            cp --sparse=always mnt/f.qcow2 f.qcow2
            exit $rc' sh "$f" "$QCBT" $words || rc=$?
        [[ -s f.qcow2 ]] || fail "$name real-enospc: the tmpfs run failed (exit $rc)"
        fs_check "$name real-enospc free=$f" enospc "$rc" || break
        n=$((n + 1))
        ((f < 64 * 1024 * 1024)) || { fs_bad "$name real-enospc: never completes"; break; }
    done
    cd - >/dev/null || return 1
    printf '%-22s %-13s %3d points  %s\n' "$name" "real-enospc" "$n" \
        "$([[ $FS_FAILURES -eq $before ]] && echo ok || echo "$((FS_FAILURES - before)) FAILED")"
}

# fs_sweep DIR NAME ARGS KIND POINT: every N from 1 until the operation
# completes; prints "NAME KIND-POINT: K points".
fs_sweep() {
    local dir=$1 name=$2 args=$3 kind=$4 point=$5 n before=$FS_FAILURES
    for ((n = 1; ; n++)); do
        fs_case "$dir" "$name" "$args" "$kind" "$point" "$n" || break
        ((n < 500)) || { fs_bad "$name $kind-$point: never completes"; break; }
    done
    printf '%-22s %-13s %3d points  %s\n' "$name" "$kind-$point" $((n - 1)) \
        "$([[ $FS_FAILURES -eq $before ]] && echo ok || echo "$((FS_FAILURES - before)) FAILED")"
}
