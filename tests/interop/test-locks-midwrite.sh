#!/bin/bash
# Image locks in the middle of a write, against real QEMU, both ways.
#
#   - We are writing: `qcbt bitmap merge` (and add) held at a write (or
#     flush) by the test-only hook QCBT_TEST_FAIL_AT=pause-OP:N (it creates
#     $QCBT_TEST_PAUSE_FILE and waits for $QCBT_TEST_PAUSE_FILE.resume,
#     docs/qcbt.pod "ENVIRONMENT").  Meanwhile `qemu-img bitmap --add` and
#     `qemu-io -c write` and a writable qemu-nbd fail with QEMU's 'Failed
#     to get "write" lock',
#     `qemu-img info` with 'Failed to get shared "write" lock', and
#     /proc/locks shows a write lock (byte 101).  Released, the operation completes
#     with the bitmaps qemu-img bitmap gives on a twin, `qemu-img check`
#     finds nothing, and the writes QEMU was refused now work.
#   - QEMU is writing: qemu-io that has written and holds the image (its
#     "write" lock visible in /proc/locks), then qemu-nbd serving it
#     writable: every qcbt bitmap command is refused in one line, "held by
#     another process", and changes nothing; once QEMU is gone, it works.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo

cd "$TMPD"
failures=0
bad() {
    note "FAIL: $*"
    failures=$((failures + 1))
}

# bitmaps IMG: name, granularity and flags of every bitmap, sorted.
bitmaps() {
    qemu-img info -U --output=json "$1" | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)["format-specific"]["data"]
for b in sorted(d.get("bitmaps", []), key=lambda b: b["name"]):
    print(b["name"], b["granularity"], ",".join(sorted(b["flags"])))'
}

# dirty_map IMG NAME: the dirty extents qemu-nbd exports for NAME.
dirty_map() {
    nbdinfo --map=qemu:dirty-bitmap:"$2" -- [ qemu-nbd -r -f qcow2 -B "$2" "$1" ] |
        awk '$4 == "dirty" { printf "%s+%s;", $1, $2 }'
}

# holds_write IMG: an OFD lock on IMG covers byte 101 (QEMU's "write"
# permission held), as /proc/locks shows it (OFD locks show no PID: each
# case has its own image, opened by one process only).
holds_write() {
    local id
    id=$(printf '%02x:%02x:%s' "$(stat -c %Hd "$1")" "$(stat -c %Ld "$1")" "$(stat -c %i "$1")")
    awk -v id="$id" '$2 == "OFDLCK" && $6 == id && $7 <= 101 && $8 >= 101 { f = 1 }
                     END { exit !f }' /proc/locks
}

# expect_qemu_refused NEEDLE CMD...: CMD fails and says NEEDLE.
expect_qemu_refused() {
    local needle=$1 rc=0
    shift
    "$@" >qout 2>&1 || rc=$?
    if [[ $rc -eq 0 ]]; then
        bad "$CASE: '$*' succeeded while qcbt writes the image"
    elif ! grep -qF -- "$needle" qout; then
        bad "$CASE: '$*' failed without '$needle': $(cat qout)"
    fi
}

base=$TMPD/base.qcow2
qemu-img create -q -f qcow2 "$base" 1G
qemu-img bitmap --add "$base" a
qemu-img bitmap --add -g 1M "$base" b
qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 300M 1M' "$base" >/dev/null || fail "oracle broke: qemu-io write"
qemu-img bitmap --disable "$base" b
qemu-io -c 'write -P 3 700M 8k' "$base" >/dev/null || fail "oracle broke: qemu-io write"

# --- qcbt is writing ----------------------------------------------------------

# paused CASE HOOK QCBT-ARGS... -- QEMU-IMG-BITMAP-ARGS...: run qcbt
# bitmap on a copy of base (IMG in the arguments) held at HOOK, check what QEMU can do meanwhile, release it,
# and compare with qemu-img bitmap on a twin.
paused() {
    local hook=$2 a=() q=() pid rc=0 img twin
    CASE=$1
    shift 2
    while [[ $1 != -- ]]; do a+=("$1"); shift; done
    shift
    q=("$@")
    img=$TMPD/$CASE.qcow2 twin=$TMPD/$CASE-twin.qcow2
    cp "$base" "$img"
    cp "$base" "$twin"
    rm -f "$TMPD/paused" "$TMPD/paused.resume"
    QCBT_TEST_FAIL_AT=$hook QCBT_TEST_PAUSE_FILE=$TMPD/paused \
        "$QCBT" bitmap "${a[@]/IMG/$img}" </dev/null >qcbt.out 2>qcbt.err &
    pid=$!
    cleanup_pid "$pid"
    wait_until -p "$pid" -- test -e "$TMPD/paused" ||
        fail "$CASE: qcbt never reached $hook: $(cat qcbt.err)"
    holds_write "$img" || bad "$CASE: /proc/locks shows no write lock on the image"
    expect_qemu_refused 'Failed to get "write" lock' qemu-img bitmap --add "$img" z
    expect_qemu_refused 'Failed to get "write" lock' qemu-io -c 'write -P 9 0 64k' "$img"
    expect_qemu_refused 'Failed to get shared "write" lock' qemu-img info "$img"
    # qemu-nbd (forking once it serves: a refused one never does).
    rm -f qnbd.pid
    expect_qemu_refused 'Failed to get "write" lock' \
        qemu-nbd --fork --pid-file="$TMPD/qnbd.pid" -k "$TMPD/q.sock" -f qcow2 "$img"
    if [[ -s $TMPD/qnbd.pid ]]; then
        kill "$(cat "$TMPD/qnbd.pid")" 2>/dev/null || true
    fi
    pid_alive "$pid" || bad "$CASE: qcbt did not stay paused"
    touch "$TMPD/paused.resume"
    wait "$pid" || rc=$?
    [[ $rc -eq 0 ]] || bad "$CASE: qcbt exit $rc after the pause: $(cat qcbt.err)"
    qemu-img bitmap "${q[@]/IMG/$twin}" 2>qout || fail "oracle broke: qemu-img bitmap ${q[*]}: $(cat qout)"
    qemu-img check "$img" >check.out 2>&1 || bad "$CASE: qemu-img check: $(cat check.out)"
    [[ $(bitmaps "$img") == "$(bitmaps "$twin")" ]] ||
        bad "$CASE: bitmaps [$(bitmaps "$img" | tr '\n' ';')], qemu-img gives [$(bitmaps "$twin" | tr '\n' ';')]"
    for b in $(bitmaps "$twin" | cut -d' ' -f1); do
        [[ $(dirty_map "$img" "$b") == "$(dirty_map "$twin" "$b")" ]] ||
            bad "$CASE: bitmap $b: dirty map $(dirty_map "$img" "$b"), qemu-img gives $(dirty_map "$twin" "$b")"
    done
    qemu-img compare -q "$base" "$img" || bad "$CASE: guest data changed"
    # The refusals were the lock's: now they work.
    qemu-img bitmap --add "$img" z 2>qout || bad "$CASE: qemu-img bitmap --add after qcbt: $(cat qout)"
    qemu-io -c 'write -P 9 0 64k' "$img" >qout 2>&1 || bad "$CASE: qemu-io write after qcbt: $(cat qout)"
}

paused merge-write-3 pause-write:3 merge IMG b a -- --merge a IMG b
paused merge-flush-2 pause-flush:2 merge IMG b a -- --merge a IMG b
paused add-write-1 pause-write:1 add -g 128K IMG c -- --add -g 128K IMG c
paused add-flush-1 pause-flush:1 add IMG c -- --add IMG c

# --- QEMU is writing ----------------------------------------------------------

# refused: every qcbt bitmap command fails, one line, held by another
# process; nothing changes.
refused() {
    local img=$1 before args
    before=$(bitmaps "$img")
    for args in "add IMG n" "remove IMG a" "clear IMG a" "enable IMG b" "disable IMG a" \
        "merge IMG b a" "merge -b $TMPD/base.qcow2 IMG b a"; do
        # shellcheck disable=SC2086 # words
        expect_qcbt_error "held by another process" -- bitmap ${args//IMG/$img} ||
            bad "$CASE: qcbt bitmap $args was not refused"
    done
    [[ $(bitmaps "$img") == "$before" ]] || bad "$CASE: the bitmaps changed: $(bitmaps "$img" | tr '\n' ';')"
}

# in_use IMG: qemu-img info -U shows bitmap a in use (a header QEMU is
# writing may fail to parse: its warnings are dropped).
in_use() {
    qemu-img info -U --output=json "$1" 2>/dev/null | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)["format-specific"]["data"]
sys.exit(not any(b["name"] == "a" and "in-use" in b["flags"] for b in d.get("bitmaps", [])))'
}

# stop PID: TERM it and wait until it has exited.
stop() {
    kill -TERM "$1" 2>/dev/null || true
    wait_gone "$1" || fail "$CASE: process $1 does not exit"
    wait "$1" 2>/dev/null || true
}

CASE=qemu-io
img=$TMPD/qio.qcow2
cp "$base" "$img"
qemu-io -c 'write -P 7 100M 1M' -c 'sleep 3600000' "$img" </dev/null >qemu-io.log 2>&1 &
pid=$!
cleanup_pid "$pid"
wait_until -p "$pid" -- holds_write "$img" ||
    fail "oracle broke: qemu-io never held the image: $(cat qemu-io.log)"
# QEMU marks the bitmaps it loads in use just after it locks: wait for it,
# so that "nothing changes" is about us.
wait_until -p "$pid" -- in_use "$img" || fail "oracle broke: qemu-io never marked the bitmaps in use"
refused "$img"
stop "$pid"
"$QCBT" bitmap add "$img" n 2>err || bad "$CASE: add after qemu-io exits: $(cat err)"
qemu-img check "$img" >check.out 2>&1 || bad "$CASE: qemu-img check: $(cat check.out)"

CASE=qemu-nbd
img=$TMPD/qnbd.qcow2
cp "$base" "$img"
qemu-nbd -t -k "$SOCK" -f qcow2 "$img" </dev/null >qemu-nbd.log 2>&1 &
pid=$!
cleanup_pid "$pid"
wait_nbd "$SOCK" "$pid" || fail "oracle broke: qemu-nbd did not start: $(cat qemu-nbd.log)"
holds_write "$img" || bad "$CASE: oracle: /proc/locks shows no write lock of qemu-nbd"
wait_until -p "$pid" -- in_use "$img" || fail "oracle broke: qemu-nbd never marked the bitmaps in use"
refused "$img"
stop "$pid"
"$QCBT" bitmap add "$img" n 2>err || bad "$CASE: add after qemu-nbd exits: $(cat err)"
qemu-img check "$img" >check.out 2>&1 || bad "$CASE: qemu-img check: $(cat check.out)"

[[ $failures -eq 0 ]] || fail "$failures check(s) failed"
note "all mid-write lock checks passed"
