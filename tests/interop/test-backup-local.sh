#!/bin/bash
# qcbt backup of a local image, with --checkpoint NEW (issue 12): an
# offline VM's backup cycle in one command per backup, qcbt starting and
# stopping its own qcbt-server.
#
#   - cycle: --full --checkpoint C1, qemu-io writes, --since C1
#     --checkpoint C2, writes, --auto --checkpoint C3 (2 connections):
#     each 'qcbt restore --at N' == the image at backup N (qemu-img
#     compare against qemu-img convert -O raw taken right after it); qemu-img
#     info shows C1..C3 with flags [auto]; qemu-img check clean; each
#     increment holds exactly the writes made before it and after the
#     previous backup (data-bytes, zero-bytes, qemu-img map of each backup
#     file): the new checkpoint starts at the backup's point in time; a
#     manifest without the new fields still reads and --auto goes on;
#   - chain: a 2-layer chain (checkpoint propagated to the overlay with
#     qcbt bitmap add): the incremental merges both layers, the new
#     checkpoint is in the top layer only;
#   - multi-conn: --connections 2 uses 2 connections, restores equal;
#   - lookup: qcbt-server beside the qcbt binary, then on PATH; neither is
#     one line and no checkpoint;
#   - refusals before anything is written (DIR byte-identical, no server
#     left): NEW already exists; --since a checkpoint not in the chain
#     (exit 2, the merge engine's reason); --checkpoint with a URI; TLS
#     options with an IMAGE; a qemu-io holding the image (QEMU's lock
#     message); no qcbt-server ($QCBT_SERVER wrong);
#   - failures: DIR not a directory, the manifest cannot be written
#     (QCBT_TEST_FAIL_AT=manifest-enospc), the server killed during the
#     backup (kill-server), SIGTERM and SIGHUP from outside while the
#     server runs (qcbt stopped by the hook stop-after-connect), qcbt killed
#     (kill-before-commit): exit status and message, no checkpoint, no
#     qcbt-server process left, qcbt's temporary directory removed (but for
#     the SIGKILL), the image clean;
#   - lock-window: qcbt stopped (test hook) after the backup is recorded
#     and the server is gone, before the checkpoint: a qemu-io write is
#     refused on the lock, so no write escapes both backup and checkpoint;
#   - checkpoint-eio: the backup is recorded but NEW cannot be created:
#     exit 1, one line saying so, the manifest names OLD again and --auto
#     starts from it; if that manifest write fails too, --auto makes a
#     full backup (NEW does not exist).
#
# Environment: QCBT (client; qcbt-server is found beside it),
# CASES=REGEX to run some cases only, QCBT_KEEP_TMP=1 to keep the files.
. "$(dirname "$0")/../functions.sh"

requires qemu-img qemu-io qemu-nbd pgrep sha256sum
unset QCBT_SERVER QCBT_TEST_FAIL_AT
MiB=$((1 << 20))
want() { [[ -z ${CASES:-} || $1 =~ $CASES ]]; }

# qcbt's private directories go here, so the test sees what is left.
export TMPDIR=$TMPD/tmp
mkdir -p "$TMPDIR"

# The bitmaps of IMG as "NAME:FLAGS" lines (qemu-img info, the oracle).
bitmaps() {
    qemu-img info -U --output=json "$1" | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin).get("format-specific", {}).get("data", {})
for b in d.get("bitmaps", []):
    print("%s:%s" % (b["name"], ",".join(b["flags"])))'
}

# manifest_field N KEY DIR
manifest_field() {
    "$PYTHON" -c '
import json, sys
print(json.load(open(sys.argv[3] + "/manifest.json"))["backups"][int(sys.argv[1])][sys.argv[2]])' "$1" "$2" "$3"
}

# top_allocated FILE OFF LEN: FILE itself (not its backing) allocates
# every byte of [OFF, OFF+LEN).
top_allocated() {
    qemu-img map -f qcow2 --output=json "$1" | "$PYTHON" -c '
import json, sys
off, ln = int(sys.argv[1]), int(sys.argv[2])
cov = 0
for e in json.load(sys.stdin):
    if e["depth"] == 0 and e["present"]:
        lo, hi = max(off, e["start"]), min(off + ln, e["start"] + e["length"])
        cov += max(0, hi - lo)
sys.exit(0 if cov == ln else 1)' "$2" "$3"
}
top_free() { # FILE OFF LEN: FILE allocates no byte of the range
    qemu-img map -f qcow2 --output=json "$1" | "$PYTHON" -c '
import json, sys
off, ln = int(sys.argv[1]), int(sys.argv[2])
for e in json.load(sys.stdin):
    if e["depth"] == 0 and e["present"] and \
       e["start"] < off + ln and off < e["start"] + e["length"]:
        sys.exit(1)' "$2" "$3"
}

# stopped PID: the process is stopped (SIGSTOP).
stopped() {
    local st
    st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    st=${st##*) }
    [[ ${st:0:1} == T ]]
}

# No qcbt-server of this test is running (its command line names an
# image in $TMPD).
no_server() { ! pgrep -f "qcbt-server .*$TMPD" >/dev/null; }
check_no_server() {
    wait_until -- no_server || fail "[$CASE] a qcbt-server is left: $(pgrep -af "qcbt-server .*$TMPD")"
}
check_tmp_clean() {
    [[ -z $(ls -A "$TMPDIR") ]] || fail "[$CASE] qcbt left $(ls -A "$TMPDIR") in TMPDIR"
}
dir_sum() { (cd "$1" && find . -type f ! -name .lock -print0 | sort -z | xargs -0 sha256sum); }

# compare_at DIR N RAW: restore --at N equals RAW.
compare_at() {
    rm -f "$TMPD/r.raw"
    "$QCBT" restore --at "$2" "$1" "$TMPD/r.raw" >/dev/null ||
        fail "[$CASE] restore --at $2 failed"
    qemu-img compare -q -f raw -F raw "$TMPD/r.raw" "$3" ||
        fail "[$CASE] restore --at $2 differs from the image at backup $2"
}

expect_eq() { [[ $1 == "$2" ]] || fail "[$CASE] $3: expected '$2', got '$1'"; }

img=$TMPD/disk.qcow2
B=$TMPD/backups
cd "$TMPD"

# --- cycle --------------------------------------------------------------
CASE=cycle
qemu-img create -q -f qcow2 "$img" 64M
qemu-io -f qcow2 -c 'write -P 0x11 0 8M' -c 'write -P 0x12 32M 4M' "$img" >/dev/null

"$QCBT" backup --full --checkpoint C1 "$img" "$B" >out0 2>err0 ||
    fail "[$CASE] full backup: $(cat err0)"
grep -q "checkpoint C1 created" out0 || fail "[$CASE] no 'created' line: $(cat out0)"
qemu-img convert -U -O raw "$img" "$TMPD/at0.raw"
expect_eq "$(bitmaps "$img")" "C1:auto" "bitmaps after backup 0"
check_no_server
check_tmp_clean

# W1: after backup 0, before backup 1.
qemu-io -f qcow2 -c 'write -P 0x21 1M 1M' -c 'write -z 33M 64k' "$img" >/dev/null
"$QCBT" backup --since C1 --checkpoint C2 "$img" "$B" >out1 2>err1 ||
    fail "[$CASE] --since C1: $(cat err1)"
qemu-img convert -U -O raw "$img" "$TMPD/at1.raw"
expect_eq "$(manifest_field 1 type "$B")" incremental "backup 1 type"
# C1 holds exactly W1: the full backup's data is not copied again.
expect_eq "$(manifest_field 1 data-bytes "$B")" $((1 * MiB)) "backup 1 data-bytes"
expect_eq "$(manifest_field 1 zero-bytes "$B")" 65536 "backup 1 zero-bytes"
expect_eq "$(manifest_field 1 checkpoint "$B")" C2 "backup 1 checkpoint"
expect_eq "$(manifest_field 1 since "$B")" qemu:dirty-bitmap:C1 "backup 1 since"

# W2: after backup 1.
qemu-io -f qcow2 -c 'write -P 0x31 16M 128k' "$img" >/dev/null
"$QCBT" backup --auto --checkpoint C3 --json "$img" "$B" >out2 2>err2 ||
    fail "[$CASE] --auto: $(cat err2)"
qemu-img convert -U -O raw "$img" "$TMPD/at2.raw"
"$PYTHON" -c '
import json, sys
j = json.load(open(sys.argv[1]))
assert j["type"] == "incremental", j
assert j["data-bytes"] == 131072 and j["zero-bytes"] == 0, j
assert j["checkpoint-created"] == "C3", j' out2 || fail "[$CASE] --json of backup 2: $(cat out2)"
expect_eq "$(manifest_field 2 since "$B")" qemu:dirty-bitmap:C2 "backup 2 since (--auto)"

# Each write lands only in the increment after it.
top_allocated "$B/backup-0001.qcow2" $((1 * MiB)) $((1 * MiB)) || fail "[$CASE] W1 not in backup 1"
top_free "$B/backup-0001.qcow2" $((16 * MiB)) 131072 || fail "[$CASE] W2 in backup 1"
top_allocated "$B/backup-0002.qcow2" $((16 * MiB)) 131072 || fail "[$CASE] W2 not in backup 2"
top_free "$B/backup-0002.qcow2" $((1 * MiB)) $((1 * MiB)) || fail "[$CASE] W1 in backup 2"
# The full backup's data is not copied again.
top_free "$B/backup-0001.qcow2" 0 $MiB || fail "[$CASE] old data in backup 1"
top_free "$B/backup-0002.qcow2" 0 $MiB || fail "[$CASE] old data in backup 2"

for n in 0 1 2; do compare_at "$B" "$n" "$TMPD/at$n.raw"; done
expect_eq "$(bitmaps "$img" | tr '\n' ' ')" "C1:auto C2:auto C3:auto " "bitmaps after the cycle"
qemu-img check -q "$img" || fail "[$CASE] qemu-img check: not clean"
"$QCBT" verify "$B" >/dev/null || fail "[$CASE] verify failed"
check_no_server
check_tmp_clean

# A manifest written before 'since' and 'source-image' existed still
# reads, and --auto goes on from its checkpoint.
cp -a "$B" "$TMPD/old"
"$PYTHON" -c '
import json, sys
p = sys.argv[1] + "/manifest.json"
m = json.load(open(p))
for b in m["backups"]:
    del b["since"], b["source-image"]
json.dump(m, open(p, "w"), indent=2)' "$TMPD/old"
# (No write since backup 2: the increment is empty.)
"$QCBT" backup --auto --json "$img" "$TMPD/old" >"$TMPD/out" 2>"$TMPD/err" ||
    fail "[$CASE] --auto on an older manifest: $(cat "$TMPD/err")"
"$PYTHON" -c '
import json, sys
j = json.load(open(sys.argv[1]))
assert j["type"] == "incremental" and j["data-bytes"] == 0, j' "$TMPD/out" ||
    fail "[$CASE] --auto on an older manifest: $(cat "$TMPD/out")"
expect_eq "$(manifest_field 3 since "$TMPD/old")" qemu:dirty-bitmap:C3 "since, after an older manifest"
compare_at "$TMPD/old" 3 "$TMPD/at2.raw"
note "PASS $CASE"

# --- refusals: nothing written ------------------------------------------
if want refusals; then
    CASE=refusals
    before=$(dir_sum "$B")
    expect_qcbt_error "checkpoint 'C2' already exists" -- \
        backup --auto --checkpoint C2 "$img" "$B" || fail "[$CASE] existing NEW"
    expect_qcbt_error "needs a local IMAGE" "libvirt" -- \
        backup --checkpoint C9 "nbd+unix:///?socket=$SOCK" "$B" || fail "[$CASE] URI"
    # A checkpoint not in the chain: exit 2 with the merge engine's reason.
    rc=0
    "$QCBT" backup --since NOPE --checkpoint C9 "$img" "$B" >/dev/null 2>"$TMPD/err" || rc=$?
    expect_eq "$rc" 2 "exit status of --since NOPE ($(cat "$TMPD/err"))"
    grep -q "bitmap 'NOPE' cannot be used (tolerant mode)" "$TMPD/err" ||
        fail "[$CASE] --since NOPE: $(cat "$TMPD/err")"
    expect_qcbt_error "TLS options" -- \
        backup --tls=require --checkpoint C9 "$img" "$B" || fail "[$CASE] TLS"
    QCBT_SERVER=/nonexistent expect_qcbt_error 'QCBT_SERVER' -- \
        backup --auto --checkpoint C9 "$img" "$B" || fail "[$CASE] no server"
    # On a copy: qemu-io killed leaves its bitmaps in use.
    held=$TMPD/held.qcow2
    cp "$img" "$held"
    qemu-io -f qcow2 -c 'sleep 3600000' "$held" </dev/null >"$TMPD/qemu-io.log" 2>&1 &
    qpid=$!
    cleanup_pid "$qpid"
    qemu_holds() {
        local id
        id=$(printf '%02x:%02x:%s' "$(stat -c %Hd "$held")" "$(stat -c %Ld "$held")" "$(stat -c %i "$held")")
        awk -v id="$id" '$2 == "OFDLCK" && $6 == id && $7 <= 101 && $8 >= 101 { f = 1 }
                         END { exit !f }' /proc/locks
    }
    wait_until -p "$qpid" -- qemu_holds || fail "oracle broke: qemu-io never held the image"
    expect_qcbt_error 'held by another process' 'write' -- \
        backup --auto --checkpoint C9 "$held" "$B" || fail "[$CASE] qemu-io holds the image"
    kill "$qpid"
    wait "$qpid" 2>/dev/null || true
    expect_eq "$(dir_sum "$B")" "$before" "DIR after the refusals"
    expect_eq "$(bitmaps "$img" | tr '\n' ' ')" "C1:auto C2:auto C3:auto " "bitmaps after the refusals"
    check_no_server
    check_tmp_clean
    note "PASS $CASE"
fi

# --- failures: no checkpoint, no server ---------------------------------
if want failures; then
    CASE=failures
    : >"$TMPD/afile"
    expect_qcbt_error "afile" -- backup --auto --checkpoint C9 "$img" "$TMPD/afile/sub" ||
        fail "[$CASE] DIR under a file"
    before=$(dir_sum "$B")
    export QCBT_TEST_FAIL_AT
    QCBT_TEST_FAIL_AT=manifest-enospc
    expect_qcbt_error "No space left on device" -- \
        backup --auto --checkpoint C9 "$img" "$B" || fail "[$CASE] manifest-enospc"
    QCBT_TEST_FAIL_AT=kill-server
    expect_qcbt_error "the server closed the connection" "qcbt-server was killed by signal 9" -- \
        backup --auto --checkpoint C9 "$img" "$B" || fail "[$CASE] kill-server"
    expect_eq "$(dir_sum "$B")" "$before" "DIR after the failures"
    check_tmp_clean
    # A signal from outside while the server runs (qcbt stopped by a test
    # hook, so that it comes in the middle of the backup): qcbt kills and
    # reaps the server, removes its directory and dies of the signal.
    # (Not SIGINT: bash starts background commands with SIGINT ignored,
    # and qcbt leaves an ignored signal ignored.)
    for sig in TERM HUP; do
        QCBT_TEST_FAIL_AT=stop-after-connect "$QCBT" backup --auto --checkpoint C9 "$img" "$B" \
            >/dev/null 2>"$TMPD/err" &
        bpid=$!
        cleanup_pid "$bpid"
        wait_until -p "$bpid" -- stopped "$bpid" || fail "[$CASE] qcbt never stopped: $(cat "$TMPD/err")"
        no_server && fail "[$CASE] oracle broke: no qcbt-server while qcbt is stopped"
        kill -"$sig" "$bpid"
        kill -CONT "$bpid"
        rc=0
        { wait "$bpid"; } 2>/dev/null || rc=$? # (bash would say "Hangup")
        expect_eq "$rc" $((128 + $(kill -l "$sig"))) "exit status after SIG$sig"
        no_server || fail "[$CASE] SIG$sig: a qcbt-server is left: $(pgrep -af "qcbt-server .*$TMPD")"
        check_tmp_clean
    done
    QCBT_TEST_FAIL_AT=kill-before-commit
    rc=0
    "$QCBT" backup --auto --checkpoint C9 "$img" "$B" >/dev/null 2>"$TMPD/err" || rc=$?
    expect_eq "$rc" 137 "exit status after SIGKILL"
    unset QCBT_TEST_FAIL_AT
    check_no_server # it dies with qcbt (PR_SET_PDEATHSIG)
    rm -rf "${TMPDIR:?}"/qcbt-backup.* # what a SIGKILLed qcbt cannot remove
    expect_eq "$(bitmaps "$img" | tr '\n' ' ')" "C1:auto C2:auto C3:auto " "bitmaps after the failures"
    qemu-img check -q "$img" || fail "[$CASE] qemu-img check: not clean"
    # The next run removes what the killed one left, and is correct.
    qemu-io -f qcow2 -c 'write -P 0x41 40M 64k' "$img" >/dev/null
    "$QCBT" backup --auto --checkpoint C4 --json "$img" "$B" >out3 2>err3 ||
        fail "[$CASE] the run after the failures: $(cat err3)"
    qemu-img convert -U -O raw "$img" "$TMPD/at3.raw"
    "$PYTHON" -c '
import json, sys
j = json.load(open(sys.argv[1]))
assert j["type"] == "incremental" and j["data-bytes"] == 65536, j' out3 ||
        fail "[$CASE] the run after the failures: $(cat out3)"
    compare_at "$B" 3 "$TMPD/at3.raw"
    check_no_server
    check_tmp_clean
    note "PASS $CASE"
fi

# --- the checkpoint cannot be made after the backup is recorded ------------
if want checkpoint-eio; then
    CASE=checkpoint-eio
    D=$TMPD/eio
    "$QCBT" backup --full --checkpoint E1 "$img" "$D" >/dev/null 2>"$TMPD/err" ||
        fail "[$CASE] full: $(cat "$TMPD/err")"
    qemu-io -f qcow2 -c 'write -P 0x51 2M 64k' "$img" >/dev/null
    export QCBT_TEST_FAIL_AT=checkpoint-eio
    expect_qcbt_error "backup-0001.qcow2 is recorded in" "checkpoint 'E2' was not created" \
        "must be --since E1 again (--auto does so)" -- \
        backup --since E1 --checkpoint E2 "$img" "$D" || fail "[$CASE] message"
    unset QCBT_TEST_FAIL_AT
    expect_eq "$(manifest_field 1 file "$D")" backup-0001.qcow2 "the backup is recorded"
    # The manifest names the checkpoint that still exists.
    expect_eq "$(manifest_field 1 checkpoint "$D")" E1 "backup 1's checkpoint"
    bitmaps "$img" | grep -q '^E2:' && fail "[$CASE] E2 was created"
    qemu-img check -q "$img" || fail "[$CASE] qemu-img check: not clean"
    # --auto starts from E1 again.
    qemu-io -f qcow2 -c 'write -P 0x52 3M 64k' "$img" >/dev/null
    "$QCBT" backup --auto --checkpoint E2 --json "$img" "$D" >"$TMPD/out" 2>"$TMPD/err" ||
        fail "[$CASE] --auto after the failure: $(cat "$TMPD/err")"
    "$PYTHON" -c '
import json, sys
j = json.load(open(sys.argv[1]))
assert j["type"] == "incremental" and j["data-bytes"] == 131072, j' "$TMPD/out" ||
        fail "[$CASE] --auto after the failure: $(cat "$TMPD/out")"
    expect_eq "$(manifest_field 2 since "$D")" qemu:dirty-bitmap:E1 "backup 2 since"
    qemu-img convert -U -O raw "$img" "$TMPD/eio.raw"
    compare_at "$D" 2 "$TMPD/eio.raw"
    bitmaps "$img" | grep -qx 'E2:auto' || fail "[$CASE] E2 missing after the retry"

    # Neither the checkpoint nor the manifest's correction: --auto cannot
    # start from a checkpoint that does not exist, and makes a full backup.
    export QCBT_TEST_FAIL_AT=checkpoint-eio-manifest
    expect_qcbt_error "checkpoint 'E3' was not created" "--auto would make a full backup" -- \
        backup --auto --checkpoint E3 "$img" "$D" || fail "[$CASE] message (manifest)"
    unset QCBT_TEST_FAIL_AT
    expect_eq "$(manifest_field 3 checkpoint "$D")" E3 "backup 3's checkpoint"
    "$QCBT" backup --auto --json "$img" "$D" >"$TMPD/out" 2>"$TMPD/err" ||
        fail "[$CASE] --auto after the second failure: $(cat "$TMPD/err")"
    grep -q "full backup: bitmap 'E3' cannot be used" "$TMPD/err" ||
        fail "[$CASE] no notice of the full backup: $(cat "$TMPD/err")"
    "$PYTHON" -c '
import json, sys
j = json.load(open(sys.argv[1]))
assert j["type"] == "full", j' "$TMPD/out" || fail "[$CASE] not full: $(cat "$TMPD/out")"
    compare_at "$D" 4 "$TMPD/eio.raw"
    check_no_server
    check_tmp_clean
    note "PASS $CASE"
fi

# --- no writer between the backup and its checkpoint ----------------------
if want lock-window; then
    CASE=lock-window
    D=$TMPD/lockwin
    # Stopped (SIGSTOP, a test hook) after the backup is recorded and the
    # server is gone, before the checkpoint exists: the image is still
    # locked, so a write now, which neither the backup nor the new
    # checkpoint would hold, is refused.
    QCBT_TEST_FAIL_AT=stop-before-checkpoint "$QCBT" backup --full --checkpoint L1 "$img" "$D" \
        >"$TMPD/out" 2>"$TMPD/err" &
    bpid=$!
    cleanup_pid "$bpid"
    wait_until -p "$bpid" -- stopped "$bpid" || fail "[$CASE] qcbt never stopped: $(cat "$TMPD/err")"
    check_no_server
    [[ -n $(manifest_field 0 file "$D") ]] || fail "[$CASE] oracle broke: the backup is not recorded yet"
    if qemu-io -f qcow2 -c 'write -P 0x81 44M 64k' "$img" >"$TMPD/qemu-io.out" 2>&1; then
        fail "[$CASE] qemu-io wrote between the backup and its checkpoint"
    fi
    grep -q 'Failed to get "write" lock' "$TMPD/qemu-io.out" ||
        fail "[$CASE] qemu-io failed, but not on the lock: $(cat "$TMPD/qemu-io.out")"
    kill -CONT "$bpid"
    rc=0
    wait "$bpid" || rc=$?
    expect_eq "$rc" 0 "qcbt's exit status after SIGCONT ($(cat "$TMPD/err"))"
    bitmaps "$img" | grep -qx 'L1:auto' || fail "[$CASE] L1 not created"
    # And now the writer gets in, into L1.
    qemu-io -f qcow2 -c 'write -P 0x81 44M 64k' "$img" >/dev/null
    "$QCBT" backup --since L1 --json "$img" "$D" >"$TMPD/out" 2>"$TMPD/err" ||
        fail "[$CASE] --since L1: $(cat "$TMPD/err")"
    "$PYTHON" -c '
import json, sys
j = json.load(open(sys.argv[1]))
assert j["type"] == "incremental" and j["data-bytes"] == 65536, j' "$TMPD/out" ||
        fail "[$CASE] --since L1: $(cat "$TMPD/out")"
    qemu-img convert -U -O raw "$img" "$TMPD/lw.raw"
    compare_at "$D" 1 "$TMPD/lw.raw"
    check_tmp_clean
    note "PASS $CASE"
fi

# --- a 2-layer chain ------------------------------------------------------
if want chain; then
    CASE=chain
    base=$TMPD/base.qcow2 top=$TMPD/top.qcow2 D=$TMPD/chain
    qemu-img create -q -f qcow2 "$base" 64M
    qemu-io -f qcow2 -c 'write -P 0x61 0 4M' "$base" >/dev/null
    "$QCBT" backup --full --checkpoint K1 "$base" "$D" >/dev/null 2>"$TMPD/err" ||
        fail "[$CASE] full: $(cat "$TMPD/err")"
    qemu-img convert -U -O raw "$base" "$TMPD/c0.raw"
    qemu-io -f qcow2 -c 'write -P 0x62 8M 1M' "$base" >/dev/null
    # External snapshot, the checkpoint propagated (libvirt's rule).
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$top"
    "$QCBT" bitmap add "$top" K1
    qemu-io -f qcow2 -c 'write -P 0x63 20M 2M' -c 'write -P 0x64 0 64k' "$top" >/dev/null
    "$QCBT" backup --since K1 --checkpoint K2 --json "$top" "$D" >"$TMPD/out" 2>"$TMPD/err" ||
        fail "[$CASE] --since K1: $(cat "$TMPD/err")"
    qemu-img convert -U -O raw "$top" "$TMPD/c1.raw"
    "$PYTHON" -c '
import json, sys
j = json.load(open(sys.argv[1]))
assert j["type"] == "incremental" and j["data-bytes"] == (1 << 20) + (2 << 20) + 65536, j' "$TMPD/out" ||
        fail "[$CASE] the increment is not both layers' changes: $(cat "$TMPD/out")"
    compare_at "$D" 0 "$TMPD/c0.raw"
    compare_at "$D" 1 "$TMPD/c1.raw"
    expect_eq "$(bitmaps "$top" | tr '\n' ' ')" "K1:auto K2:auto " "top layer's bitmaps"
    expect_eq "$(bitmaps "$base" | tr '\n' ' ')" "K1:auto " "base layer's bitmaps"
    qemu-img check -q "$top" || fail "[$CASE] qemu-img check top: not clean"
    qemu-img check -q "$base" || fail "[$CASE] qemu-img check base: not clean"
    check_no_server
    check_tmp_clean
    note "PASS $CASE"
fi

# --- where qcbt finds qcbt-server -------------------------------------------
if want lookup; then
    CASE=lookup
    srv=$(dirname "$QCBT")/../server/qcbt-server
    [[ -x $srv ]] || fail "oracle broke: no qcbt-server beside the build's qcbt ($srv)"
    l=$TMPD/lookup.qcbt
    qemu-img create -q -f qcow2 "$l" 16M
    qemu-io -f qcow2 -c 'write -P 0x91 0 1M' "$l" >/dev/null
    mkdir -p "$TMPD/beside" "$TMPD/alone" "$TMPD/onpath"
    cp "$QCBT" "$srv" "$TMPD/beside/"
    cp "$QCBT" "$TMPD/alone/"
    cp "$srv" "$TMPD/onpath/"
    # Beside the binary.
    "$TMPD/beside/qcbt" backup --full --checkpoint P1 "$l" "$TMPD/lk1" >/dev/null 2>"$TMPD/err" ||
        fail "[$CASE] qcbt-server beside qcbt not found: $(cat "$TMPD/err")"
    # Nowhere (a copy of qcbt alone, an empty PATH): one line, nothing
    # written, no checkpoint.
    mkdir -p "$TMPD/empty"
    printf '#!/bin/bash\nexec /usr/bin/env PATH=%q %q "$@"\n' "$TMPD/empty" "$TMPD/alone/qcbt" \
        >"$TMPD/alone-nopath"
    chmod +x "$TMPD/alone-nopath"
    QCBT=$TMPD/alone-nopath expect_qcbt_error "qcbt-server not found" -- \
        backup --full --checkpoint P2 "$l" "$TMPD/lk2" || fail "[$CASE] nowhere"
    [[ ! -e $TMPD/lk2/manifest.json ]] || fail "[$CASE] a backup without a server"
    bitmaps "$l" | grep -q '^P2:' && fail "[$CASE] P2 created without a server"
    # On PATH.
    PATH=$TMPD/onpath:/usr/bin:/bin "$TMPD/alone/qcbt" backup --full --checkpoint P2 "$l" "$TMPD/lk2" \
        >/dev/null 2>"$TMPD/err" || fail "[$CASE] qcbt-server on PATH not found: $(cat "$TMPD/err")"
    expect_eq "$(bitmaps "$l" | tr '\n' ' ')" "P1:auto P2:auto " "bitmaps"
    check_no_server
    check_tmp_clean
    note "PASS $CASE"
fi

# --- multi-conn -------------------------------------------------------------
if want multi-conn; then
    CASE=multi-conn
    m=$TMPD/multi.qcow2 D=$TMPD/multi
    qemu-img create -q -f qcow2 "$m" 128M
    qemu-io -f qcow2 -c 'write -P 0x71 0 48M' -c 'write -P 0x72 64M 48M' "$m" >/dev/null
    "$QCBT" backup --full --checkpoint M1 --connections 2 --json "$m" "$D" >"$TMPD/out" 2>"$TMPD/err" ||
        fail "[$CASE] full: $(cat "$TMPD/err")"
    "$PYTHON" -c '
import json, sys
j = json.load(open(sys.argv[1]))
assert j["connections"] == 2 and j["checkpoint-created"] == "M1", j' "$TMPD/out" ||
        fail "[$CASE] not 2 connections: $(cat "$TMPD/out")"
    qemu-img convert -U -O raw "$m" "$TMPD/m0.raw"
    compare_at "$D" 0 "$TMPD/m0.raw"
    check_no_server
    check_tmp_clean
    note "PASS $CASE"
fi
