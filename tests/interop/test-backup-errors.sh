#!/bin/bash
# qcbt backup when things go wrong (issue 11): what DIR holds afterwards,
# and what the user is told.
#
#   - commit-enospc: the manifest cannot be written (QCBT_TEST_FAIL_AT=
#     manifest-enospc, a test-only fault hook): exit 1, one "qcbt: " line
#     naming the cause, DIR byte-identical (names and sha256 of every
#     file), verify passes, the next run is a correct incremental;
#   - commit-enospc-tmpfs: the same on a real tmpfs without a free inode
#     for the manifest's temporary file (when this machine lets us mount);
#   - index-enospc: the digest index cannot be made durable (fault hook
#     index-enospc): the same as commit-enospc;
#   - killed-in-commit-window / killed-before-index-rename /
#     killed-before-rename: SIGKILL (fault hook) after the finished file
#     and its digest index are renamed / after the file only / before
#     both, i.e. just before the commit point: the manifest is unchanged and verify passes; the next
#     run, even one that fails (server gone), removes what was left, and
#     the run after that is a correct incremental;
#   - lost-manifest: DIR holds backup-0000.qcow2 but no manifest.json (and
#     no temporary manifest): the run fails in one line naming the file
#     and leaves DIR byte-identical;
#   - since-unknown: --since/--bitmap naming a context the server does not
#     offer is exit 2 with one line naming the context and what the server
#     offers (qcbt-server and qemu-nbd), and nothing is written; a size
#     change under --since is exit 2 too; --auto and --fallback-full make
#     a full backup and say why in a notice;
#   - multi-conn-*: servers that accept fewer connections than asked for:
#     nbdkit's limit filter (advertises multi-conn, refuses connection 2),
#     qemu-nbd -r -e 2 (advertises multi-conn, leaves connection 3 in its
#     listen queue), qemu-nbd -r -e 1 and qcbt-server -e 1: the backup
#     uses the connections it gets and restores exactly;
#   - server-dies-*: the server closes the connection in the middle of a
#     read (the fake server, deterministic) or is killed while every read
#     is delayed 30 s (nbdkit's delay filter): one line saying that the
#     server closed the connection, where, and what DIR kept;
#   - notices: a successful backup's notices are "qcbt backup: " lines,
#     never "qcbt: " (the error prefix); a failed run prints exactly one
#     line even when notices were due.
#
# Environment: QCBT (client), QCBT_SERVER or QCBT_BUILD_DIR (server),
# CASES=REGEX to run some cases only, QCBT_KEEP_TMP=1 to keep the files.
. "$(dirname "$0")/../functions.sh"

requires qemu-img qemu-io qemu-nbd nbdinfo nbdkit sha256sum timeout
SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER (set QCBT_SERVER or QCBT_BUILD_DIR)"
SERVER=$(cd "$(dirname "$SERVER")" && pwd)/$(basename "$SERVER")
CHECK="$PYTHON $TESTS_DIR/interop/backup-check.py"
FAKE=$TESTS_DIR/interop/backup-fake-server.py
SIZE=$((64 << 20))
MiB=$((1 << 20))

want() { [[ -z ${CASES:-} || $1 =~ $CASES ]]; }
uri() { printf 'nbd+unix:///?socket=%s' "$1"; }

# Mounts made by a case, unmounted on exit before the temp dir goes
# (set +e: "(exit $_rc)" hands the exit status on to _qcbt_cleanup).
MOUNTS=()
trap '_rc=$?; set +e; for _m in "${MOUNTS[@]}"; do umount "$_m" 2>/dev/null; done; (exit $_rc); _qcbt_cleanup' EXIT

# ---- servers ------------------------------------------------------------

SRV_PID=
# start_srv NAME SOCK CMD...: start CMD in the background (SRV_PID) and
# wait until a client can connect to SOCK: at most 120 s, and a server
# that exits meanwhile fails at once.
start_srv() {
    local name=$1 sock=$2 t0=$SECONDS
    shift 2
    rm -f "$sock"
    { printf '%q ' "$@"; printf '&\n'; } >>"$CASE_DIR/recipe.txt"
    "$@" >>"$CASE_DIR/$name.log" 2>&1 &
    SRV_PID=$!
    cleanup_pid "$SRV_PID"
    until nbdinfo --size "$(uri "$sock")" >/dev/null 2>&1; do
        kill -0 "$SRV_PID" 2>/dev/null ||
            fail "[$CASE] $name exited at start: $(tail -n 5 "$CASE_DIR/$name.log")"
        ((SECONDS - t0 < 120)) ||
            fail "[$CASE] $name accepted no connection on $sock in 120 s"
        sleep 0.05
    done
}

stop_srv() {
    [[ -n $SRV_PID ]] || return 0
    kill -TERM "$SRV_PID" 2>/dev/null || true
    wait "$SRV_PID" 2>/dev/null || true
    SRV_PID=
}

# ---- checks ----------------------------------------------------------------
# A failed check is recorded (the case fails) and the case goes on.  The
# checks return 0 (set -e), except try and qb_ok, which return 1 on
# failure so that dependent steps can be skipped: try A && ck B.

CASE_RC=0
bad() {
    note "[$CASE] FAIL: $*"
    CASE_RC=1
}

# try WHAT CMD...: CMD must succeed.
try() {
    local what=$1
    shift
    { printf '%q ' "$@"; printf '\n'; } >>"$CASE_DIR/recipe.txt"
    if ! "$@" >"$CASE_DIR/ck.out" 2>&1; then
        bad "$what: $(tail -n 5 "$CASE_DIR/ck.out")"
        return 1
    fi
}

# ck WHAT CMD...: like try, always returning 0.
ck() {
    try "$@" || true
}

begin() {
    begin_case "$1"
    CASE_RC=0
    SRV_PID=
}

end() {
    stop_srv
    case_result "$CASE_RC"
}

# qb OUT ARGS...: qcbt backup --no-progress ARGS... (stdout OUT, stderr
# OUT.err, exit status RC), with QCBT_TEST_FAIL_AT=$FAULT when FAULT is
# set, and at most 120 s.
FAULT=
qb() {
    local out=$1 env=()
    shift
    [[ -n $FAULT ]] && env=("QCBT_TEST_FAIL_AT=$FAULT")
    { printf '%s' "${env[*]:+${env[*]} }"; printf '%q ' "$QCBT" backup --no-progress "$@"; printf '>%q\n' "$out"; } \
        >>"$CASE_DIR/recipe.txt"
    RC=0
    env "${env[@]}" timeout 120 "$QCBT" backup --no-progress "$@" >"$out" 2>"$out.err" </dev/null || RC=$?
}

# qb_ok OUT ARGS...: qb, which must succeed (else returns 1).
qb_ok() {
    qb "$@"
    [[ $RC -eq 0 ]] || { bad "qcbt backup ${*:2} exited $RC: $(cat "$1.err")"; return 1; }
}

# one_line FILE RC-WANTED REGEX: the run exited RC-WANTED and its stderr
# FILE is exactly one line "qcbt: ..." matching REGEX (extended).
one_line() {
    local f=$1 want_rc=$2 re=$3 n
    [[ $RC -eq $want_rc ]] || { bad "exit status $RC, expected $want_rc (stderr: $(cat "$f"))"; return 0; }
    n=$(wc -l <"$f")
    [[ $n -eq 1 && -z $(tail -c1 "$f") ]] || { bad "expected one stderr line, got $n: $(cat "$f")"; return 0; }
    [[ $(head -c6 "$f") == "qcbt: " ]] || { bad "stderr does not start with 'qcbt: ': $(cat "$f")"; return 0; }
    grep -qE -- "$re" "$f" || { bad "stderr lacks /$re/: $(cat "$f")"; return 0; }
    note "[$CASE] ok: $(cat "$f")"
}

# notices_only FILE REGEX: FILE (the stderr of a successful run) holds
# only notices: every line starts with "qcbt backup: ", none with
# "qcbt: ", and one matches REGEX.
notices_only() {
    local f=$1 re=$2
    if grep -v '^qcbt backup: ' "$f" | grep . >/dev/null; then
        bad "stderr of a successful backup has lines that are not notices: $(cat "$f")"
    elif ! grep -qE -- "$re" "$f"; then
        bad "no notice /$re/ on stderr: $(cat "$f")"
    fi
}

# dir_state DIR: the name and sha256 of every file in DIR, hidden ones too.
dir_state() {
    (cd "$1" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum)
}

# same_state DIR BEFORE: DIR is byte-identical to the state BEFORE.
same_state() {
    dir_state "$1" >"$CASE_DIR/state.now"
    cmp -s "$2" "$CASE_DIR/state.now" ||
        bad "$1 changed: $(diff "$2" "$CASE_DIR/state.now" | grep '^[<>]' | tr '\n' ' ')"
    return 0
}

# qio IMG CMD...: one qemu-io session on IMG (its server stopped).
qio() {
    local img=$1 args=() c
    shift
    for c in "$@"; do args+=(-c "$c"); done
    run qemu-io -f qcow2 "${args[@]}" "$img"
}

# snap IMG N: the guest view of IMG now is the oracle refN.raw.
snap() {
    run qemu-img convert -f qcow2 -O raw "$1" "ref$2.raw"
}

# restores DIR N: the newest backup in DIR restores to refN.raw, and
# verify passes.
restores() {
    rm -f "$CASE_DIR/r.raw"
    ck "verify $1" "$QCBT" verify "$1"
    try "restore $1" "$QCBT" restore "$1" "$CASE_DIR/r.raw" &&
        ck "restore of $1 == the source at backup $2" cmp "$CASE_DIR/r.raw" "ref$2.raw"
    return 0
}

# setup_disk SOCK: disk.qcow2 with 8 MiB of data and bitmap X, served by
# qcbt-server -B X on SOCK (left running), and its first backup in D
# (full, checkpoint X); then a second round of writes (ref1.raw).
setup_disk() {
    run qemu-img create -q -f qcow2 disk.qcow2 "$SIZE"
    qio disk.qcow2 "write -P 1 0 $((8 * MiB))"
    run qemu-img bitmap --add disk.qcow2 X
    snap disk.qcow2 0
    start_srv qcbt-server "$1" "$SERVER" -t -B X -k "$1" disk.qcow2
    qb_ok b0.json --json --since X "$(uri "$1")" D || true
    stop_srv
    qio disk.qcow2 "write -P 2 $((4 * MiB)) $((6 * MiB))" "write -z $((20 * MiB)) 1M" \
        "write -P 3 $((30 * MiB)) 100000"
    snap disk.qcow2 1
    start_srv qcbt-server "$1" "$SERVER" -t -B X -k "$1" disk.qcow2
}

# next_is_incremental SOCK: the next run is incremental and exact, and
# DIR holds exactly the two recorded backups with their digest indexes,
# the manifest and the lock.
next_is_incremental() {
    qb_ok b1.json --json --since X "$(uri "$1")" D &&
        ck "the next run is incremental" $CHECK json b1.json D type=incremental
    restores D 1
    [[ $(ls -A D | tr '\n' ' ') == ".lock backup-0000.dgi backup-0000.qcow2 backup-0001.dgi backup-0001.qcow2 manifest.json " ]] ||
        bad "D holds more than its backups: $(ls -A D | tr '\n' ' ')"
    return 0
}

# ======================================================================
# Item 1: the manifest cannot be written.
if want commit-enospc; then
    begin commit-enospc
    sock=$CASE_DIR/src.sock
    setup_disk "$sock"
    dir_state D >state.before
    FAULT=manifest-enospc qb e.out --since X "$(uri "$sock")" D
    one_line e.out.err 1 'manifest\.json\.tmp: No space left on device'
    same_state D state.before
    restores D 0
    next_is_incremental "$sock"
    end
fi

# The digest index cannot be made durable (QCBT_TEST_FAIL_AT=index-enospc):
# the backup fails like any write, in one line, and DIR is unchanged.
if want index-enospc; then
    begin index-enospc
    sock=$CASE_DIR/src.sock
    setup_disk "$sock"
    dir_state D >state.before
    FAULT=index-enospc qb e.out --since X "$(uri "$sock")" D
    one_line e.out.err 1 '\.backup-0001\.dgi\.part: No space left on device'
    same_state D state.before
    restores D 0
    next_is_incremental "$sock"
    end
fi

# The same with a real file system: a tmpfs whose inodes are all in use
# once the partial file exists, so the manifest's temporary file gets
# ENOSPC (mount needs root; without it the case above stands alone).
if want commit-enospc-tmpfs; then
    begin commit-enospc-tmpfs
    mkdir mnt
    if mount -t tmpfs -o size=256m,nr_inodes=8 qcbt-test mnt 2>mount.err; then
        MOUNTS+=("$CASE_DIR/mnt")
        sock=$CASE_DIR/src.sock
        # Inodes: the root, D, .lock, manifest.json, backup-0000.qcow2,
        # backup-0000.dgi, and the partial file and partial digest index
        # of the second backup: 8.
        run qemu-img create -q -f qcow2 disk.qcow2 "$SIZE"
        qio disk.qcow2 "write -P 1 0 $((8 * MiB))"
        run qemu-img bitmap --add disk.qcow2 X
        snap disk.qcow2 0
        start_srv qcbt-server "$sock" "$SERVER" -t -B X -k "$sock" disk.qcow2
        qb_ok b0.json --since X "$(uri "$sock")" mnt/D || true
        stop_srv
        qio disk.qcow2 "write -P 2 $((4 * MiB)) $((6 * MiB))"
        snap disk.qcow2 1
        start_srv qcbt-server "$sock" "$SERVER" -t -B X -k "$sock" disk.qcow2
        dir_state mnt/D >state.before
        qb e.out --since X "$(uri "$sock")" mnt/D
        one_line e.out.err 1 'manifest\.json\.tmp: No space left on device'
        same_state mnt/D state.before
        ck "verify after ENOSPC" "$QCBT" verify mnt/D
        run mount -o remount,nr_inodes=64 mnt
        qb_ok b1.json --json --since X "$(uri "$sock")" mnt/D &&
            ck "the run with free inodes is incremental" $CHECK json b1.json mnt/D type=incremental
        restores mnt/D 1
        stop_srv
        umount mnt && MOUNTS=()
    else
        note "[$CASE] cannot mount a tmpfs here ($(cat mount.err)): covered by commit-enospc only"
    fi
    end
fi

# ======================================================================
# Item 1: killed just before the commit point, after the rename (the
# window where an unrecorded backup-0001.qcow2 exists) or before it (a
# partial file exists).  The next run cleans up, even when it fails.
for point in kill-before-commit kill-before-rename kill-before-index-rename; do
    name=killed-in-commit-window
    left=backup-0001.dgi
    if [[ $point == kill-before-rename ]]; then
        name=killed-before-rename
        left=.backup-0001.qcow2.part
    elif [[ $point == kill-before-index-rename ]]; then
        # The backup has its name, its digest index not yet.
        name=killed-before-index-rename
        left=.backup-0001.dgi.part
    fi
    want "$name" || continue
    begin "$name"
    sock=$CASE_DIR/src.sock
    setup_disk "$sock"
    dir_state D >state.before
    FAULT=$point qb k.out --since X "$(uri "$sock")" D
    [[ $RC -eq 137 ]] || bad "the backup was not killed by the fault hook (exit $RC: $(cat k.out.err))"
    [[ -e D/$left ]] || bad "no $left after SIGKILL (the hook did not fire where it should): $(ls -A D | tr '\n' ' ')"
    [[ $point == kill-before-rename || -e D/backup-0001.qcow2 ]] ||
        bad "no backup-0001.qcow2 after SIGKILL at $point: $(ls -A D | tr '\n' ' ')"
    dir_state D | grep -F " ./manifest.json" >manifest.after
    grep -F " ./manifest.json" state.before | cmp -s - manifest.after || bad "the manifest changed"
    restores D 0
    # The next run fails (the server is gone) but removes what was left.
    stop_srv
    qb f.out --since X "$(uri "$sock")" D
    one_line f.out.err 1 'src\.sock'
    same_state D state.before
    start_srv qcbt-server "$sock" "$SERVER" -t -B X -k "$sock" disk.qcow2
    next_is_incremental "$sock"
    end
done

# ======================================================================
# A lost manifest: an unrecorded backup-0000.qcow2 without the temporary
# manifest beside it is not a leftover of ours.  The next run must neither
# remove nor replace it, and must say so in one line.
if want lost-manifest; then
    begin lost-manifest
    sock=$CASE_DIR/src.sock
    setup_disk "$sock"
    mv D/manifest.json manifest.saved
    dir_state D >state.before
    qb f.out --full "$(uri "$sock")" D
    one_line f.out.err 1 'backup-0000\.qcow2 exists but manifest\.json does not record it'
    same_state D state.before
    # With the manifest back, the set is whole again.
    mv manifest.saved D/manifest.json
    next_is_incremental "$sock"
    end
fi

# ======================================================================
# Item 2: a named checkpoint the server does not offer.
if want since-unknown; then
    begin since-unknown
    sock=$CASE_DIR/src.sock
    qsock=$CASE_DIR/qemu.sock
    run qemu-img create -q -f qcow2 disk.qcow2 "$SIZE"
    qio disk.qcow2 "write -P 1 0 $((8 * MiB))"
    run qemu-img bitmap --add disk.qcow2 a
    run qemu-img bitmap --add disk.qcow2 b
    snap disk.qcow2 0
    start_srv qcbt-server "$sock" "$SERVER" -t -B a -B b -k "$sock" disk.qcow2
    mkdir E
    # Into an empty DIR (the first backup would be full anyway) ...
    qb e1.out --since nope "$(uri "$sock")" E
    one_line e1.out.err 2 '^qcbt: the server offers no qemu:dirty-bitmap:nope \(it offers: qemu:dirty-bitmap:a, qemu:dirty-bitmap:b\)$'
    [[ -z $(ls E) ]] || bad "E is not empty after the refused backup: $(ls -A E | tr '\n' ' ')"
    qb_ok b0.json --json --since a "$(uri "$sock")" D &&
        ck "the first backup is full and records checkpoint a" \
            $CHECK json b0.json D type=full "reason~no previous backup"
    "$PYTHON" -c 'import json,sys; sys.exit(json.load(open(sys.argv[1]))["backups"][0]["checkpoint"] != "a")' D/manifest.json ||
        bad "the full backup does not record checkpoint a"
    dir_state D >state.before
    # ... and with a previous backup; --bitmap names a context too.
    qb e2.out --since nope "$(uri "$sock")" D
    one_line e2.out.err 2 'offers no qemu:dirty-bitmap:nope \(it offers: .*qemu:dirty-bitmap:a'
    qb e3.out --bitmap nope "$(uri "$sock")" D
    one_line e3.out.err 2 'offers no qemu:dirty-bitmap:nope'
    same_state D state.before
    stop_srv
    # qemu-nbd -B a offers only a.
    start_srv qemu-nbd "$qsock" qemu-nbd -t -r -f qcow2 -B a -k "$qsock" disk.qcow2
    qb e4.out --since nope "$(uri "$qsock")" D
    one_line e4.out.err 2 'offers no qemu:dirty-bitmap:nope \(it offers: qemu:dirty-bitmap:a\)'
    same_state D state.before
    # --fallback-full and --auto turn it into a full backup, and say why.
    qb_ok b1.json --json --since nope --fallback-full "$(uri "$qsock")" D &&
        ck "--fallback-full: full" $CHECK json b1.json D type=full "reason~did not grant qemu:dirty-bitmap:nope"
    notices_only b1.json.err '^qcbt backup: full backup: the server did not grant qemu:dirty-bitmap:nope \(it offers: qemu:dirty-bitmap:a\)$'
    [[ $(wc -l <b1.json.err) -eq 1 ]] || bad "more than one notice: $(cat b1.json.err)"
    qb_ok b2.json --json --auto --bitmap nope "$(uri "$qsock")" D &&
        ck "--auto: full" $CHECK json b2.json D type=full "reason~did not grant"
    notices_only b2.json.err 'full backup: the server did not grant'
    stop_srv
    snap disk.qcow2 2
    # A size change under --since is exit 2, under --auto a full backup.
    run qemu-img resize -f qcow2 disk.qcow2 $((SIZE + 16 * MiB))
    snap disk.qcow2 3
    start_srv qcbt-server "$sock" "$SERVER" -t -B a -k "$sock" disk.qcow2
    dir_state D >state.before
    qb e5.out --since a "$(uri "$sock")" D
    one_line e5.out.err 2 'no incremental backup since a is possible: the disk size changed'
    same_state D state.before
    qb_ok b3.json --json --auto --bitmap a "$(uri "$sock")" D &&
        ck "--auto after a resize: full" $CHECK json b3.json D type=full "reason~size changed"
    restores D 3
    end
fi

# ======================================================================
# Item 3: servers that accept fewer connections than asked for.

# multi_conn NAME CONNS NOTICE SERVER-CMD...: with --connections 4, a
# full backup and then (--auto --bitmap X) an incremental when the server
# offers bitmap X, each exact, each using CONNS connections (a number, or "<4").
# NOTICE: a regex the first run's notices must match ("" for none).  The
# server listens on $CASE_DIR/src.sock ($SOCK_ARG in SERVER-CMD).
multi_conn() {
    local name=$1 conns=$2 notice_re=$3 i a cmd=()
    shift 3
    begin "$name"
    local sock=$CASE_DIR/src.sock
    for a in "$@"; do cmd+=("${a//\$SOCK_ARG/$sock}"); done
    run qemu-img create -q -f qcow2 disk.qcow2 "$SIZE"
    qio disk.qcow2 "write -P 1 0 $((40 * MiB))"
    run qemu-img bitmap --add disk.qcow2 X
    for i in 0 1; do
        if ((i == 1)); then
            qio disk.qcow2 "write -P 2 $((4 * MiB)) $((24 * MiB))" "write -z $((30 * MiB)) 1M"
        fi
        snap disk.qcow2 "$i"
        start_srv "$name" "$sock" "${cmd[@]}"
        if ((i == 0)); then
            nbdinfo --json "$(uri "$sock")" >info.json 2>&1 || true
            note "[$CASE] $(grep -o '"can_multi_conn": [a-z]*' info.json || echo 'can_multi_conn: ?')"
        fi
        qb_ok "b$i.json" --json --auto --bitmap X --connections 4 "$(uri "$sock")" D &&
            ck "backup $i through $name" $CHECK json "b$i.json" D
        if [[ $conns == "<4" ]]; then
            ck "backup $i: fewer than 4 connections" $CHECK json "b$i.json" D "connections<=3"
        else
            ck "backup $i: $conns connection(s)" $CHECK json "b$i.json" D "connections=$conns"
        fi
        if ((i == 0)) && [[ -n $notice_re ]]; then
            notices_only b0.json.err "$notice_re"
        elif [[ -s b$i.json.err ]]; then
            notices_only "b$i.json.err" .
        fi
        restores D "$i"
        stop_srv
    done
    end
}

# Advertises multi-conn, then refuses connection 2 ("too many clients"):
# nbdkit's file plugin serves the guest view as raw.
want multi-conn-nbdkit-limit &&
    multi_conn multi-conn-nbdkit-limit 1 'connections used: the server refused the others' \
        sh -c 'qemu-img convert -f qcow2 -O raw disk.qcow2 disk.raw &&
               exec nbdkit -f -U "$1" --filter=limit file disk.raw limit=1' sh '$SOCK_ARG'
# qemu-nbd -r -e 2 advertises multi-conn (read-only export) and stops
# accepting at 2 clients: connection 3 waits in its listen queue forever.
want multi-conn-qemu-nbd-e2 &&
    multi_conn multi-conn-qemu-nbd-e2 "<4" "" \
        qemu-nbd -t -r -e 2 -f qcow2 -B X -k '$SOCK_ARG' disk.qcow2
# No multi-conn with -e 1: one connection, and a notice since
# --connections asked for more.
want multi-conn-qemu-nbd-e1 &&
    multi_conn multi-conn-qemu-nbd-e1 1 'does not allow multi-conn' \
        qemu-nbd -t -r -e 1 -f qcow2 -B X -k '$SOCK_ARG' disk.qcow2
# qcbt-server -e 1: one connection whether it advertises multi-conn
# (then refuses connection 2) or not.
want multi-conn-qcbt-server-e1 &&
    multi_conn multi-conn-qcbt-server-e1 1 'connection' \
        "$SERVER" -t -e 1 -B X -k '$SOCK_ARG' disk.qcow2

# ======================================================================
# Item 4: the server dies in the middle of a backup.
if want server-dies-fake; then
    # The fake server (tests/interop/backup-fake-server.py) closes the
    # connection in the middle of the first read past 8 MiB.
    begin server-dies-fake
    sock=$CASE_DIR/src.sock
    "$PYTHON" - "$SIZE" <<'PYEOF' || fail "cannot make the test images"
import random, sys
size, M = int(sys.argv[1]), 1 << 20
rnd = random.Random(11)
img = bytearray(size)
img[0:24 * M] = rnd.randbytes(24 * M)
open("ref0.raw", "wb").write(img)
with open("r1.dirty", "w") as d:
    for off, ln in ((2 * M, M), (10 * M, 4 * M), (30 * M, M)):
        img[off:off + ln] = rnd.randbytes(ln)
        d.write(f"{off} {ln}\n")
open("ref1.raw", "wb").write(img)
PYEOF
    start_srv fake "$sock" "$PYTHON" "$FAKE" --socket "$sock" --image ref0.raw --dirty /dev/null
    qb_ok b0.json --since X "$(uri "$sock")" D || true
    stop_srv
    dir_state D >state.before
    start_srv fake-bad "$sock" "$PYTHON" "$FAKE" --socket "$sock" --image ref1.raw --dirty r1.dirty \
        --bad disconnect-read --bad-at $((8 * MiB))
    qb e.out --since X "$(uri "$sock")" D
    one_line e.out.err 1 '^qcbt: the server closed the connection( \(one of [0-9]+ connections\))? while reading at offset 10485760 \([0-9]+ reads? in flight\), [0-9]+ bytes copied; D is unchanged: the next backup starts again from checkpoint X$'
    same_state D state.before
    restores D 0
    stop_srv
    end
fi

if want server-dies-killed; then
    # nbdkit's delay filter in front of qcbt-server delays every read by
    # 30 s; once the partial file exists (the copy has begun) nbdkit is
    # killed: no read can have completed, so the kill always lands in the
    # middle of the backup.
    begin server-dies-killed
    sock=$CASE_DIR/src.sock
    slow=$CASE_DIR/slow.sock
    setup_disk "$sock"
    sp=$SRV_PID
    dir_state D >state.before
    start_srv nbdkit-delay "$slow" nbdkit -f -U "$slow" --filter=delay nbd socket="$sock" rdelay=30
    np=$SRV_PID
    recipe_note "qcbt backup --full $(uri "$slow") D &  # kill -9 nbdkit once D/.backup-0001.qcow2.part exists"
    "$QCBT" backup --full --no-progress "$(uri "$slow")" D >k.out 2>k.err </dev/null &
    bp=$!
    t0=$SECONDS
    until [[ -e D/.backup-0001.qcow2.part ]]; do
        kill -0 "$bp" 2>/dev/null || break
        ((SECONDS - t0 < 120)) || break
        sleep 0.02
    done
    kill -KILL "$np"
    wait "$np" 2>/dev/null || true
    RC=0
    wait "$bp" || RC=$?
    one_line k.err 1 '^qcbt: the server closed the connection( \(one of [0-9]+ connections\))? while (reading at offset [0-9]+ \([0-9]+ reads? in flight\)|mapping the disk at offset [0-9]+), [0-9]+ bytes copied; '
    grep -qF '; D is unchanged: its newest backup is still backup-0000.qcow2' k.err ||
        bad "the message does not say what D kept: $(cat k.err)"
    same_state D state.before
    SRV_PID=$sp
    next_is_incremental "$sock"
    end
fi

# ======================================================================
# Item 5: notices are not errors.
if want notices; then
    begin notices
    sock=$CASE_DIR/src.sock
    qsock=$CASE_DIR/qemu.sock
    run qemu-img create -q -f qcow2 disk.qcow2 "$SIZE"
    qio disk.qcow2 "write -P 1 0 $((8 * MiB))"
    run qemu-img bitmap --add disk.qcow2 X
    snap disk.qcow2 0
    start_srv qcbt-server "$sock" "$SERVER" -t -B X -k "$sock" disk.qcow2
    # A first --auto run: full, with a notice saying why.
    qb_ok b0.json --auto --bitmap X "$(uri "$sock")" D &&
        notices_only b0.json.err '^qcbt backup: full backup: no previous backup$'
    # Not granted, under --auto: full, with a notice.
    stop_srv
    start_srv qcbt-server "$sock" "$SERVER" -t -k "$sock" disk.qcow2
    qb_ok b1.json --auto "$(uri "$sock")" D &&
        notices_only b1.json.err '^qcbt backup: full backup: the server did not grant qemu:dirty-bitmap:X'
    # The same run failing after its notice was due: one line only.
    dir_state D >state.before
    FAULT=manifest-enospc qb e.out --auto "$(uri "$sock")" D
    one_line e.out.err 1 'No space left on device'
    same_state D state.before
    stop_srv
    # --connections 4 and a server without multi-conn: a notice.
    start_srv qemu-nbd "$qsock" qemu-nbd -t -r -e 1 -f qcow2 -B X -k "$qsock" disk.qcow2
    qb_ok b2.json --since X --connections 4 "$(uri "$qsock")" D &&
        notices_only b2.json.err '^qcbt backup: the server does not allow multi-conn: using one connection$'
    stop_srv
    restores D 0
    end
fi

finish_cases
