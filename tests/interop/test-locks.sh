#!/bin/bash
# QEMU-compatible image locks (common/io: qcbt_io_lock) against real QEMU
# processes, both ways.
#
# qcbt-lock-tool (tests/unit/lock-tool.c) takes qcbt's locks in a mode:
# read (what qemu-img info and qemu-nbd -r hold), shared (-U/--force-share)
# or write (what qemu-io and qemu-img bitmap hold).
#   - A running qemu-io or qemu-nbd holds the image: our read and write
#     are refused with "held by another process" and the permission QEMU
#     would name; shared reads.  qemu-nbd -r lets us read, not write.
#   - We hold the image: `qemu-img bitmap --add` fails with QEMU's "Failed
#     to get "write" lock"; `qemu-img info` fails while we write and works
#     while we read; with shared, qemu-img bitmap works.
# Each QEMU process is known to hold the image when /proc/locks shows its
# write lock (qemu-io) or when it serves (qemu-nbd); after each holder
# exits, the operation it blocked succeeds (so the lock was the reason).
#
# QCBT_KEEP_TMP=1 keeps the images.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd

TOOL=${QCBT_LOCK_TOOL:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/tests/unit/qcbt-lock-tool}
[[ -x $TOOL ]] || fail "qcbt-lock-tool not found: $TOOL (build the tree or set \$QCBT_LOCK_TOOL)"

cd "$TMPD"
img=$TMPD/disk.qcow2
qemu-img create -q -f qcow2 "$img" 64M || fail "oracle broke: qemu-img create"
failures=0

bad() {
    note "FAIL: $*"
    failures=$((failures + 1))
}

# expect_ours_refused MODE NEEDLE: our lock in MODE fails, one line, held
# by another process, naming NEEDLE.
expect_ours_refused() {
    local mode=$1 needle=$2 rc=0 err
    "$TOOL" "$mode" "$img" >out 2>err || rc=$?
    err=$(cat err)
    if [[ $rc -ne 1 ]]; then
        bad "$CASE: our $mode lock: exit $rc, expected 1 ($err)"
    elif [[ $(wc -l <err) -ne 1 ]]; then
        bad "$CASE: our $mode lock: not one line: $err"
    elif [[ $err != *"$img: held by another process (failed to get $needle)"* ]]; then
        bad "$CASE: our $mode lock: unexpected message: $err"
    fi
}

expect_ours_ok() {
    local mode=$1
    "$TOOL" "$mode" "$img" >out 2>err || bad "$CASE: our $mode lock refused: $(cat err)"
}

# expect_qemu_refused NEEDLE CMD...: CMD fails and says NEEDLE.
expect_qemu_refused() {
    local needle=$1 rc=0
    shift
    "$@" >qout 2>&1 || rc=$?
    if [[ $rc -eq 0 ]]; then
        bad "$CASE: '$*' succeeded while we hold the image"
    elif ! grep -qF -- "$needle" qout; then
        bad "$CASE: '$*' failed without '$needle': $(cat qout)"
    fi
}

expect_qemu_ok() {
    "$@" >qout 2>&1 || bad "$CASE: '$*' failed: $(cat qout)"
}

info_fails() { ! qemu-img info "$img" >/dev/null 2>&1; }

# qemu_holds_write: an OFD lock on the image covers byte 101 (the "write"
# permission held), as /proc/locks shows it.  Used to wait for qemu-io to
# take the image: polling with qemu-img info would race with qemu-io's own
# start (qemu-io fails if qemu-img info holds its locks at that moment).
qemu_holds_write() {
    local id
    id=$(printf '%02x:%02x:%s' "$(stat -c %Hd "$img")" "$(stat -c %Ld "$img")" "$(stat -c %i "$img")")
    awk -v id="$id" '$2 == "OFDLCK" && $6 == id && $7 <= 101 && $8 >= 101 { f = 1 }
                     END { exit !f }' /proc/locks
}

# stop PID: TERM it and wait until it has exited.
stop() {
    kill -TERM "$1" 2>/dev/null || true
    wait_gone "$1" || fail "$CASE: process $1 does not exit"
    wait "$1" 2>/dev/null || true
}

qemu-img info "$img" >/dev/null || fail "oracle broke: qemu-img info on an idle image"

# --- QEMU holds the image ---------------------------------------------------

CASE=qemu-io
qemu-io -c 'sleep 3600000' "$img" </dev/null >qemu-io.log 2>&1 &
pid=$!
cleanup_pid "$pid"
wait_until -p "$pid" -- qemu_holds_write || fail "oracle broke: qemu-io never held the image: $(cat qemu-io.log)"
info_fails || bad "$CASE: oracle: qemu-img info works while qemu-io writes"
expect_ours_refused read 'shared "write" lock'
expect_ours_refused write '"write" lock'
expect_ours_ok shared
stop "$pid"
expect_ours_ok write

CASE=qemu-nbd
qemu-nbd -t -k "$SOCK" -f qcow2 "$img" </dev/null >qemu-nbd.log 2>&1 &
pid=$!
cleanup_pid "$pid"
wait_nbd "$SOCK" "$pid" || fail "oracle broke: qemu-nbd did not start: $(cat qemu-nbd.log)"
info_fails || bad "$CASE: oracle: qemu-img info works while qemu-nbd writes"
expect_ours_refused read 'shared "write" lock'
expect_ours_refused write '"write" lock'
expect_ours_ok shared
stop "$pid"
expect_ours_ok read

CASE=qemu-nbd-r
qemu-nbd -r -t -k "$SOCK" -f qcow2 "$img" </dev/null >qemu-nbd.log 2>&1 &
pid=$!
cleanup_pid "$pid"
wait_nbd "$SOCK" "$pid" || fail "oracle broke: qemu-nbd -r did not start: $(cat qemu-nbd.log)"
expect_ours_ok read
expect_ours_refused write '"write" lock'
stop "$pid"
expect_ours_ok write

# --- we hold the image --------------------------------------------------------

# hold MODE: start qcbt-lock-tool holding the image; sets $pid.
hold() {
    # A hold.out left by the previous hold says "locked" already: the
    # redirection below truncates it only once the child runs.
    rm -f hold.out hold.err
    "$TOOL" "$1" "$img" hold >hold.out 2>hold.err &
    pid=$!
    cleanup_pid "$pid"
    wait_until -p "$pid" -- grep -qx locked hold.out ||
        fail "$CASE: qcbt-lock-tool $1 did not lock: $(cat hold.err)"
}

CASE=ours-write
hold write
expect_qemu_refused 'Failed to get "write" lock' qemu-img bitmap --add "$img" b0
expect_qemu_refused 'Failed to get shared "write" lock' qemu-img info "$img"
expect_qemu_ok qemu-img info -U "$img"
expect_qemu_refused 'Failed to get "write" lock' qemu-io -c 'write 0 64k' "$img"
stop "$pid"
expect_qemu_ok qemu-img bitmap --add "$img" b0

CASE=ours-read
hold read
expect_qemu_refused 'Failed to get "write" lock' qemu-img bitmap --add "$img" b1
expect_qemu_ok qemu-img info "$img"
expect_qemu_ok qemu-io -r -c 'read 0 64k' "$img"
stop "$pid"
expect_qemu_ok qemu-img bitmap --add "$img" b1

CASE=ours-shared
hold shared
expect_qemu_ok qemu-img bitmap --add "$img" b2
expect_qemu_ok qemu-io -c 'write 0 64k' "$img"
stop "$pid"

qemu-img info --output=json "$img" | grep '"name": "b2"' >/dev/null ||
    bad "oracle: bitmap b2 not in the image"
qemu-img check -q "$img" || bad "qemu-img check after the lock tests"

[[ $failures -eq 0 ]] || fail "$failures check(s) failed"
note "all lock checks passed"
