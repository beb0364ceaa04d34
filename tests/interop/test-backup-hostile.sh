#!/bin/bash
# qcbt backup against a hostile or buggy NBD server (issue 5, "Proof").
#
# nbdkit cannot serve qemu:dirty-bitmap contexts at all, so the server is
# tests/interop/backup-fake-server.py: a small python NBD server that
# serves a raw file with base:allocation and qemu:dirty-bitmap:X and
# misbehaves on request (--bad MODE, see its --help).  DIR first gets a
# good full and a good incremental from well-behaved instances; then, per
# case, a copy of DIR meets a misbehaving one:
#
#   - protocol violations (extent lengths past the request, zero-length
#     extents, flags outside 0/1 for the bitmap and > 3 for
#     base:allocation, a granted context missing from or doubled in a
#     reply, a malformed chunk, block status / read errors (EIO), short
#     reads, reads past the request, a disconnect mid-read): qcbt stops
#     with exit 1 and exactly one line "qcbt: ..." on stderr, and DIR is
#     as it was: manifest byte-identical, no new file (no partial file
#     either), qcbt verify passes, the newest backup still restores to the
#     source at that time;
#   - legal but unusual replies (the last extent past the request, replies
#     covering less than asked): the backup succeeds and restores exactly;
#   - the dirty-bitmap context not granted, under --auto: a full backup
#     (never "nothing changed") that restores exactly (under --since it is
#     exit 2: test-backup-errors.sh);
#   - kill -9 in the middle of an incremental (a slow server): DIR as it
#     was, and the next run is correct.
#
# Environment: QCBT (client), CASES=REGEX, QCBT_KEEP_TMP=1.
. "$(dirname "$0")/../functions.sh"

requires qemu-img
FAKE=$TESTS_DIR/interop/backup-fake-server.py
CHECK="$PYTHON $TESTS_DIR/interop/backup-check.py"
"$PYTHON" -c 'import socket, struct, threading' ||
    fail "$PYTHON cannot run the fake server"
SIZE=$((32 << 20))
MiB=$((1 << 20))

want() { [[ -z ${CASES:-} || $1 =~ $CASES ]]; }
uri() { printf 'nbd+unix:///?socket=%s' "$1"; }

FAKE_PID=
# fake SOCK IMAGE DIRTY-FILE [ARGS...]: start the fake server on SOCK.  SOCK
# listens before the server starts (socket activation), so clients can
# connect at once: no waiting for the server.
fake() {
    local sock=$1 img=$2 dirty=$3
    shift 3
    { printf '%q ' "$PYTHON" "$FAKE" --socket "$sock" --image "$img" --dirty "$dirty" "$@"; printf '&\n'; } \
        >>"$CASE_DIR/recipe.txt"
    serve_activated --unix "$sock" "$CASE_DIR/fake.log" \
        "$PYTHON" "$FAKE" --image "$img" --dirty "$dirty" "$@"
    FAKE_PID=$ACT_PID
}

unfake() {
    [[ -n $FAKE_PID ]] || return 0
    kill -TERM "$FAKE_PID" 2>/dev/null || true
    wait "$FAKE_PID" 2>/dev/null || true
    FAKE_PID=
}

# ---- the images: r0 (full), r1 (after round 1), r2 (after round 2) ------
# d1 / d2: the dirty ranges ("OFFSET LENGTH") of rounds 1 and 2.
begin_case setup
"$PYTHON" - "$SIZE" <<'PYEOF' || fail "cannot make the test images"
import random, sys
size, M = int(sys.argv[1]), 1 << 20
rnd = random.Random(5)
img = bytearray(size)
img[0:24 * M] = rnd.randbytes(24 * M)
open("r0.raw", "wb").write(img)

def round_(name, changes):
    with open(name + ".dirty", "w") as d:
        for off, ln, kind in changes:
            img[off:off + ln] = bytes(ln) if kind == "zero" else rnd.randbytes(ln)
            d.write(f"{off} {ln}\n")
    open(name + ".raw", "wb").write(img)

round_("r1", [(2 * M, M, "data"), (5 * M, 64 << 10, "zero"), (30 * M, M, "data")])
# Many runs on both sides of 8 MiB (where --bad-at makes reads fail), one
# dirty-but-zero run, one run larger than a read request.
round_("r2", [(1 * M, M, "data"), (3 * M, 64 << 10, "data"), (6 * M, 128 << 10, "zero"),
              (9 * M, 5 * M, "data"), (16 * M, 4096, "data"), (20 * M, M, "data"),
              (26 * M, 512 << 10, "data")])
PYEOF
fake "$CASE_DIR/good.sock" r0.raw /dev/null
"$QCBT" backup --since X "$(uri "$CASE_DIR/good.sock")" D >b0.out 2>&1 ||
    fail "good full backup failed: $(cat b0.out)"
unfake
fake "$CASE_DIR/good.sock" r1.raw r1.dirty
"$QCBT" backup --json --since X "$(uri "$CASE_DIR/good.sock")" D >b1.json 2>b1.err ||
    fail "good incremental failed: $(cat b1.err)"
$CHECK json b1.json D type=incremental zero-bytes=65536 data-bytes=$((2 * MiB)) >b1.check ||
    fail "good incremental: $(cat b1.check)"
unfake
"$QCBT" restore D r.raw >/dev/null || fail "restore of the good backups failed"
cmp r.raw r1.raw || fail "restore of the good backups differs from the source"
SETUP=$CASE_DIR
case_result 0

# ---- checks ----------------------------------------------------------------

CASE_RC=0
bad() {
    note "[$CASE] FAIL: $*"
    CASE_RC=1
}

# dir_unchanged E: E is still exactly the good DIR.
dir_unchanged() {
    local e=$1
    cmp -s "$SETUP/D/manifest.json" "$e/manifest.json" || bad "the manifest changed"
    [[ $(ls -A "$e") == $(ls -A "$SETUP/D") ]] ||
        bad "files changed: $(ls -A "$e" | tr '\n' ' ') (were: $(ls -A "$SETUP/D" | tr '\n' ' '))"
    "$QCBT" verify "$e" >verify.out 2>&1 || bad "verify fails: $(tail -n 3 verify.out)"
    rm -f r.raw
    if "$QCBT" restore "$e" r.raw >restore.out 2>&1; then
        cmp -s r.raw "$SETUP/r1.raw" || bad "the newest backup no longer restores to the source"
    else
        bad "restore fails: $(cat restore.out)"
    fi
}

# hostile MODE NEEDLE [FAKE-ARGS...]: the agent must stop cleanly.
hostile() {
    local mode=$1 needle=$2 rc=0 n
    shift 2
    begin_case "$mode"
    CASE_RC=0
    cp -a "$SETUP/D" E
    fake "$CASE_DIR/bad.sock" "$SETUP/r2.raw" "$SETUP/r2.dirty" --bad "$mode" "$@"
    recipe_note "qcbt backup --since X $(uri "$CASE_DIR/bad.sock") E  # must fail: exit 1, one line"
    timeout 300 "$QCBT" backup --since X --no-progress "$(uri "$CASE_DIR/bad.sock")" E \
        >out 2>err </dev/null || rc=$?
    unfake
    if [[ $rc -ne 1 ]]; then
        bad "exit status $rc, expected 1 (stderr: $(cat err))"
    else
        n=$(wc -l <err)
        [[ $n -eq 1 && -z $(tail -c1 err) ]] || bad "expected one stderr line, got $n: $(cat err)"
        [[ $(head -c6 err) == "qcbt: " ]] || bad "stderr does not start with 'qcbt: ': $(cat err)"
        grep -qiE -- "$needle" err || bad "stderr lacks /$needle/: $(cat err)"
        note "[$CASE] $(cat err)"
    fi
    dir_unchanged E
    case_result "$CASE_RC"
}

# legal MODE TYPE [REASON] [FAKE-ARGS...]: the agent must succeed, exactly.
# The backup runs with --since X, or with $LEGAL_ARGS when set.
legal() {
    local mode=$1 type=$2 reason=$3 conds
    shift 3
    begin_case "$mode"
    CASE_RC=0
    cp -a "$SETUP/D" E
    fake "$CASE_DIR/bad.sock" "$SETUP/r2.raw" "$SETUP/r2.dirty" --bad "$mode" "$@"
    local args=(${LEGAL_ARGS:---since X})
    recipe_note "qcbt backup --json ${args[*]} $(uri "$CASE_DIR/bad.sock") E"
    if "$QCBT" backup --json "${args[@]}" "$(uri "$CASE_DIR/bad.sock")" E >b.json 2>b.err; then
        conds=(type="$type")
        [[ -n $reason ]] && conds+=("reason~$reason")
        [[ $type == incremental ]] && conds+=(zero-bytes=$((128 << 10)))
        $CHECK json b.json E "${conds[@]}" >check.out || bad "$(cat check.out)"
        [[ $type == full ]] && ! grep -q "full backup: .*$reason" b.err &&
            bad "no note on stderr saying why the backup is full: $(cat b.err)"
        "$QCBT" verify --against "$(uri "$CASE_DIR/bad.sock")" E >verify.out 2>&1 ||
            bad "verify --against fails: $(tail -n 2 verify.out)"
        rm -f r.raw
        "$QCBT" restore E r.raw >/dev/null 2>&1 || bad "restore failed"
        cmp -s r.raw "$SETUP/r2.raw" || bad "the restore differs from the source"
        rm -f r.raw
        "$QCBT" restore --at 1 E r.raw >/dev/null 2>&1 || bad "restore --at 1 failed"
        cmp -s r.raw "$SETUP/r1.raw" || bad "restore --at 1 differs from the source at backup 1"
        for f in E/*.qcow2; do
            qemu-img check -q "$f" >/dev/null 2>&1 || bad "qemu-img check $f"
        done
    else
        bad "backup failed: $(cat b.err)"
    fi
    unfake
    case_result "$CASE_RC"
}

# Block status: every context's extents are checked against the request.
want bitmap-past-request && hostile bitmap-past-request "past the end"
want alloc-past-request && hostile alloc-past-request "past the end"
want bitmap-zero-length && hostile bitmap-zero-length "length 0"
want alloc-zero-length && hostile alloc-zero-length "length 0"
want bitmap-flags-2 && hostile bitmap-flags-2 "flags 0x2"
want bitmap-flags-3 && hostile bitmap-flags-3 "flags 0x3"
want alloc-flags-4 && hostile alloc-flags-4 "flags 0x4"
want omit-bitmap-chunk && hostile omit-bitmap-chunk "omitted|context"
want dup-bitmap-chunk && hostile dup-bitmap-chunk "block status"
want odd-chunk && hostile odd-chunk "block.status"
want bs-eio && hostile bs-eio "block.status.*(input/output|EIO)"
# Reads: the first reads succeed (data is already in the partial file),
# then the server fails from 8 MiB on.
want read-eio && hostile read-eio "input/output error" --bad-at $((8 * MiB))
want short-read && hostile short-read "read" --bad-at $((8 * MiB))
want read-past-request && hostile read-past-request "out of bounds|read" --bad-at $((8 * MiB))
want disconnect-read && hostile disconnect-read "connection|recv|read" --bad-at $((8 * MiB))

# Legal replies.
want final-past-request && legal final-past-request incremental ""
want short-coverage && legal short-coverage incremental ""
# Not granted, under --auto (the context comes from the manifest): a full
# backup, never "nothing changed".
want no-bitmap-context && LEGAL_ARGS=--auto legal no-bitmap-context full "did not grant"

# kill -9 in the middle of an incremental: the server serves the first
# 2 MiB of reads (of 7.6 MiB), then holds every read back and says so; the
# kill comes after that signal, so it lands mid-backup however slow the
# machine is.
if want killed; then
    begin_case killed
    CASE_RC=0
    cp -a "$SETUP/D" E
    fake "$CASE_DIR/slow.sock" "$SETUP/r2.raw" "$SETUP/r2.dirty" \
        --stall-after $((2 * MiB)) --stall-file "$CASE_DIR/stalled"
    recipe_note "qcbt backup --since X $(uri "$CASE_DIR/slow.sock") E &  # kill -9 once the server stalls"
    "$QCBT" backup --since X --no-progress "$(uri "$CASE_DIR/slow.sock")" E >killed.out 2>&1 &
    bp=$!
    if wait_until -p "$bp" -- test -e "$CASE_DIR/stalled"; then
        kill -KILL "$bp"
        wait "$bp" 2>/dev/null || true
        dir_unchanged_but_part() {
            cmp -s "$SETUP/D/manifest.json" E/manifest.json || bad "the manifest changed"
            [[ $(ls E) == $(ls "$SETUP/D") ]] || bad "new backup file: $(ls E | tr '\n' ' ')"
            "$QCBT" verify E >verify.out 2>&1 || bad "verify fails: $(tail -n 3 verify.out)"
        }
        dir_unchanged_but_part
    else
        wait "$bp" || true
        bad "the backup ended before the server stalled: $(cat killed.out)"
    fi
    unfake
    # The next run (same server, now fast) is incremental and exact, and
    # leaves no temporary file.
    fake "$CASE_DIR/good.sock" "$SETUP/r2.raw" "$SETUP/r2.dirty"
    if "$QCBT" backup --json --auto "$(uri "$CASE_DIR/good.sock")" E >b.json 2>b.err; then
        $CHECK json b.json E type=incremental >check.out || bad "$(cat check.out)"
        rm -f r.raw
        "$QCBT" restore E r.raw >/dev/null 2>&1 && cmp -s r.raw "$SETUP/r2.raw" ||
            bad "the run after kill -9 does not restore to the source"
        [[ -z $(ls -A E | grep '\.part$' || true) ]] || bad "a partial file was left: $(ls -A E)"
        "$QCBT" verify E >verify.out 2>&1 || bad "verify fails: $(tail -n 3 verify.out)"
    else
        bad "the run after kill -9 failed: $(cat b.err)"
    fi
    unfake
    case_result "$CASE_RC"
fi

finish_cases
