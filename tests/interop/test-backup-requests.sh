#!/bin/bash
# What a backup asks the server, seen from the server (issue 13: the
# request pattern decides what a backup costs the server per byte;
# bench/bench-server-cpu.sh measures it).  qcbt-server with QCBT_DEBUG=1
# logs one line per connection when it ends: reads and their bytes, block
# status requests, the bytes they asked about, how many with REQ_ONE.
#
#   - counters: a python nbd client makes 3 reads and 2 block status
#     requests (one with REQ_ONE) whose sizes it knows: the line says
#     exactly that;
#   - full, incremental: qcbt backup --full, then --since b0, over two
#     connections, of a 3 GiB disk whose data and dirty runs start and end
#     off the 256 KiB grid: the server read each byte once (its read bytes
#     are the backup's data bytes), in reads of at most 256 KiB, short only
#     at the end of a run (reads <= bytes / 256 KiB + runs + map windows);
#     the disk was mapped once, in windows of at least 1 GiB, without
#     REQ_ONE; one line per connection the backup reports; and the backup
#     started with 32 reads in flight per connection (QCBT_DEBUG's floor):
#     16 cost nbdkit 12 % more CPU per byte.
#
# Environment: QCBT (client), QCBT_SERVER or QCBT_BUILD_DIR (server),
# QCBT_KEEP_TMP=1 to keep the files.
. "$(dirname "$0")/../functions.sh"

requires qemu-img qemu-io
SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER (set QCBT_SERVER or QCBT_BUILD_DIR)"
SERVER=$(cd "$(dirname "$SERVER")" && pwd)/$(basename "$SERVER")
CHUNK=$((256 << 10))
DEPTH=32 # reads per connection the backup starts with (client/backup.c)
GIB=$((1 << 30))

want() { [[ -z ${CASES:-} || $1 =~ $CASES ]]; }

CASE_RC=0
bad() {
    note "[$CASE] FAIL: $*"
    CASE_RC=1
}

# serve IMG ARGS...: qcbt-server with QCBT_DEBUG=1 on srv.sock, its
# stderr in server.log; sets SRV_PID.
serve() {
    local img=$1
    shift
    { printf 'QCBT_DEBUG=1 '; printf '%q ' "$SERVER" -t -f qcow2 "$@" -k "$CASE_DIR/srv.sock" "$img"; printf '&\n'; } >>"$CASE_DIR/recipe.txt"
    : >"$CASE_DIR/server.log"
    QCBT_DEBUG=1 "$SERVER" -t -f qcow2 "$@" -k "$CASE_DIR/srv.sock" "$img" 2>"$CASE_DIR/server.log" &
    SRV_PID=$!
    cleanup_pid "$SRV_PID"
    wait_nbd "$CASE_DIR/srv.sock" "$SRV_PID" ||
        fail "[$CASE] qcbt-server did not start: $(tail -n 5 "$CASE_DIR/server.log")"
}

stop() {
    kill -TERM "$SRV_PID" 2>/dev/null || true
    wait_gone "$SRV_PID" || kill -KILL "$SRV_PID" 2>/dev/null || true
    wait "$SRV_PID" 2>/dev/null || true
}

uri() { printf 'nbd+unix:///?socket=%s' "$CASE_DIR/srv.sock"; }
served_lines() { (($(grep -c ': served ' "$CASE_DIR/server.log") >= $1)); }

# totals: the sums over the server's lines: READS RBYTES BS BSBYTES ONE.
totals() {
    local r=0 b=0 s=0 a=0 o=0 x1 x2 x3 x4 x5
    while read -r x1 x2 x3 x4 x5; do
        r=$((r + x1)) b=$((b + x2)) s=$((s + x3)) a=$((a + x4)) o=$((o + x5))
    done < <(sed -n 's/.*: served \([0-9]*\) reads (\([0-9]*\) bytes), \([0-9]*\) block status (\([0-9]*\) bytes asked, \([0-9]*\) with REQ_ONE)$/\1 \2 \3 \4 \5/p' \
        "$CASE_DIR/server.log")
    echo "$r $b $s $a $o"
}

if want counters; then
    begin_case counters
    CASE_RC=0
    run qemu-img create -q -f qcow2 "$CASE_DIR/src.qcow2" 8M
    serve "$CASE_DIR/src.qcow2"
    "$PYTHON" - "$(uri)" >"$CASE_DIR/client.log" 2>&1 <<'PYEOF' || fail "[$CASE] oracle broke: the python client failed: $(cat "$CASE_DIR/client.log")"
import sys, nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
h.pread(4096, 0)
h.pread(65536, 1 << 20)
h.pread(1, 2 << 20)
h.block_status(1 << 20, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
h.block_status(2 << 20, 0, lambda *a: 0)
h.shutdown()
PYEOF
    wait_until -p "$SRV_PID" -- served_lines 1 ||
        fail "[$CASE] no request summary in the server's log: $(tail -n 5 "$CASE_DIR/server.log")"
    grep -q ': served 3 reads (69633 bytes), 2 block status (3145728 bytes asked, 1 with REQ_ONE)$' "$CASE_DIR/server.log" ||
        bad "the summary is wrong: $(grep ': served ' "$CASE_DIR/server.log")"
    stop
    case_result $CASE_RC
fi

# check_pattern LOG: the backup's JSON and debug lines in LOG against the
# server's lines.
check_pattern() {
    local log=$1 data ext conns size line floor reads rbytes bs asked one
    read -r data ext conns < <("$PYTHON" -c '
import json, sys
j = json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])
print(j["data-bytes"], j["extents"], j["connections"])' "$CASE_DIR/$log") ||
        fail "[$CASE] oracle broke: no JSON result in $log"
    size=$((3 * GIB))
    wait_until -p "$SRV_PID" -- served_lines "$conns" ||
        fail "[$CASE] fewer than $conns request summaries in the server's log"
    (($(grep -c ': served ' "$CASE_DIR/server.log") == conns)) ||
        bad "$(grep -c ': served ' "$CASE_DIR/server.log") connections served, the backup used $conns"
    read -r reads rbytes bs asked one < <(totals)
    recipe_note "$log: $reads reads, $rbytes bytes; $bs block status, $asked bytes asked, $one REQ_ONE; $data data bytes, $ext extents, $conns connections"
    ((rbytes == data)) || bad "the server sent $rbytes bytes for $data bytes of data"
    ((reads <= rbytes / CHUNK + ext + bs)) ||
        bad "$reads reads for $rbytes bytes in $ext runs: reads shorter than 256 KiB"
    ((reads * CHUNK >= rbytes)) || bad "$reads reads for $rbytes bytes: reads longer than 256 KiB"
    ((asked == size)) || bad "block status asked about $asked bytes of a $size-byte disk"
    ((bs <= size / GIB)) || bad "$bs block status requests for $((size / GIB)) GiB"
    ((one == 0)) || bad "$one block status requests with REQ_ONE"
    line=$(grep 'debug: window ' "$CASE_DIR/$log") || fail "[$CASE] oracle broke: no window line in $log"
    [[ $line =~ \(([0-9]+)\ to\ [0-9]+\ reads\ of\ ([0-9]+)\ bytes\) ]] ||
        fail "[$CASE] oracle broke: cannot parse '$line'"
    floor=${BASH_REMATCH[1]}
    ((floor == conns * DEPTH && BASH_REMATCH[2] == CHUNK)) ||
        bad "started with $floor reads of ${BASH_REMATCH[2]} bytes in flight over $conns connections"
}

# backup LOG ARGS...: qcbt backup --json over two connections, debug on.
backup() {
    local log=$1
    shift
    { printf 'QCBT_DEBUG=1 '; printf '%q ' "$QCBT" backup --json --no-progress --connections 2 "$@" "$(uri)" "$CASE_DIR/bk"; printf '\n'; } >>"$CASE_DIR/recipe.txt"
    QCBT_DEBUG=1 "$QCBT" backup --json --no-progress --connections 2 "$@" "$(uri)" "$CASE_DIR/bk" \
        >"$CASE_DIR/$log" 2>&1 || fail "[$CASE] qcbt backup failed: $(tail -n 5 "$CASE_DIR/$log")"
}

if want full || want incremental; then
    begin_case full
    CASE_RC=0
    img=$CASE_DIR/src.qcow2
    run qemu-img create -q -f qcow2 "$img" 3G
    # 12 runs of data, 64 KiB-aligned, off the 256 KiB grid, some across
    # the 1 GiB map windows.
    for i in $(seq 0 11); do
        printf 'write -q -P %d %d %d\n' $((i + 1)) $((i * 256 * 1048576 + (i % 3 + 1) * 65536)) $((3 * 1048576 + i * 65536))
    done >"$CASE_DIR/fill.qio"
    printf 'write -q -P 99 %d %d\n' $((GIB - 65536)) $((1048576)) >>"$CASE_DIR/fill.qio"
    run sh -c "qemu-io -f qcow2 '$img' <'$CASE_DIR/fill.qio'"
    run qemu-img bitmap --add -g 64K "$img" b0
    serve "$img" -B b0
    backup full.log --full
    check_pattern full.log
    stop
    case_result $CASE_RC

    begin_case incremental
    CASE_RC=0
    mv "$TMPD/full/bk" "$CASE_DIR/bk"
    # 40 dirty runs of 64 KiB-832 KiB, 64 KiB-aligned, off the 256 KiB
    # grid, over the data and beyond it.
    for i in $(seq 0 39); do
        printf 'write -q -P %d %d %d\n' $((i + 100)) $((i * 75 * 1048576 + (i % 4) * 65536 + 196608)) $(((i % 13 + 1) * 65536))
    done >"$CASE_DIR/dirty.qio"
    run sh -c "qemu-io -f qcow2 '$img' <'$CASE_DIR/dirty.qio'"
    serve "$img" -B b0
    backup incr.log --since b0
    grep -q '"type": "incremental"' "$CASE_DIR/incr.log" ||
        bad "not an incremental: $(cat "$CASE_DIR/incr.log")"
    check_pattern incr.log
    stop
    run "$QCBT" verify "$CASE_DIR/bk"
    case_result $CASE_RC
fi

finish_cases
