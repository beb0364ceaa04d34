#!/bin/bash
# qcbt restore to a raw file paces its writes with sync_file_range(2); a
# writeback the kernel reports as failed is an I/O error on the output and
# must fail the restore (the kernel reports it once: a later fsync may not
# see it).  A kernel without the call (ENOSYS) only loses the pacing.
#
# qcbt-fail-sync.so (tests/unit/fail-sync.c), preloaded into qcbt, makes
# the calls that start writeback, or those that wait for it, fail with
# EIO, or every call fail with ENOSYS.  It counts the calls it failed, so
# each case knows its path was taken: a restore that succeeded although
# writeback failed is the bug this test exists for.
#
# QCBT_KEEP_TMP=1 keeps the files.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io nbdinfo cmp

BUILD=${QCBT_BUILD_DIR:-$TESTS_DIR/../build}
SERVER=${QCBT_SERVER:-$BUILD/server/qcbt-server}
SHIM=${QCBT_FAIL_SYNC:-$BUILD/tests/unit/qcbt-fail-sync.so}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER (set \$QCBT_SERVER)"
[[ -f $SHIM ]] || fail "qcbt-fail-sync.so not found: $SHIM (build the tree)"
SHIM=$(cd "$(dirname "$SHIM")" && pwd)/$(basename "$SHIM")

# An ASan-built qcbt wants its runtime first among the loaded libraries;
# the shim is not instrumented and only replaces sync_file_range.
ASAN_OPTS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}verify_asan_link_order=0

cd "$TMPD"
M=$((1024 * 1024))
failures=0
bad() {
    note "FAIL: $*"
    failures=$((failures + 1))
}

# A 512 MiB disk: 128 chunks of 4 MiB, more per restore thread than the
# 32 it starts before it waits for the oldest, so both calls are made.
qemu-img create -q -f qcow2 disk.qcow2 512M || fail "oracle broke: qemu-img create"
ops=()
for ((k = 0; k < 16; k++)); do ops+=(-c "write -P $((k + 1)) $((k * 32 * M)) $M"); done
qemu-io -f qcow2 "${ops[@]}" disk.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
qemu-img convert -f qcow2 -O raw disk.qcow2 ref.raw || fail "oracle broke: qemu-img convert"

"$SERVER" -t -f qcow2 -k "$SOCK" disk.qcow2 </dev/null >server.log 2>&1 &
spid=$!
cleanup_pid "$spid"
wait_nbd "$SOCK" "$spid" || fail "qcbt-server did not start: $(cat server.log)"
"$QCBT" backup --no-progress --full "nbd+unix:///?socket=$SOCK" D >backup.log 2>&1 ||
    fail "qcbt backup failed: $(cat backup.log)"
kill -TERM "$spid"
wait_gone "$spid" || fail "qcbt-server does not exit"

# restore_with MODE OUT: qcbt restore -O raw D OUT with the shim in MODE;
# sets rc, and calls (how many calls the shim failed).
restore_with() {
    rm -f calls "$2"
    rc=0
    env LD_PRELOAD="$SHIM" ASAN_OPTIONS="$ASAN_OPTS" QCBT_FAIL_SYNC="$1" \
        QCBT_FAIL_SYNC_LOG="$TMPD/calls" "$QCBT" restore -O raw D "$2" \
        </dev/null >out 2>err || rc=$?
    calls=$(stat -c %s calls 2>/dev/null || echo 0)
}

# expect_failed MODE: exit 1, one line naming the output and the error,
# no output file left.
expect_failed() {
    local mode=$1
    restore_with "$mode" out.raw
    if [[ $calls -eq 0 ]]; then
        bad "$mode: the shim failed no call (not preloaded?): exit $rc, $(cat err)"
    elif [[ $rc -ne 1 ]]; then
        bad "$mode: exit $rc after $calls failed writeback(s), expected 1: $(cat err)"
    elif [[ $(wc -l <err) -ne 1 ]] ||
        ! grep -qE "^qcbt: .*out\.raw: writing back offset [0-9]+: Input/output error$" err; then
        bad "$mode: unexpected message: $(cat err)"
    elif [[ -e out.raw ]]; then
        bad "$mode: out.raw exists after a failed restore"
    else
        note "$mode: refused after $calls failed call(s): $(cat err)"
    fi
}

restore_with "" base.raw
[[ $rc -eq 0 ]] || fail "restore without a failure failed: $(cat err)"
cmp -s base.raw ref.raw || fail "oracle broke: restored disk differs from qemu-img convert"

expect_failed start:EIO
expect_failed wait:EIO

# ENOSYS: the pacing is lost, the restore is not.
restore_with all:ENOSYS nosys.raw
if [[ $calls -eq 0 ]]; then
    bad "all:ENOSYS: the shim failed no call"
elif [[ $rc -ne 0 ]]; then
    bad "all:ENOSYS: exit $rc: $(cat err)"
elif ! cmp -s nosys.raw ref.raw; then
    bad "all:ENOSYS: restored disk differs"
fi

[[ $failures -eq 0 ]] || fail "$failures check(s) failed"
note "a failed writeback fails the restore; ENOSYS does not"
