#!/bin/bash
# Reads in flight follow the link (issue 13, client/pace.h): qcbt-server
# behind link-proxy.py, a 50 ms round trip without a rate limit, holds
# far more than the 32 reads of 256 KiB per connection the backup starts
# with.
#
#   - one-conn: a full backup with --connections 1: the window grows past
#     its floor (QCBT_DEBUG's window and peak reads in flight), and the
#     backup restores to the source (qemu-img compare);
#   - two-conns: an incremental over two connections (bitmap b0 after
#     scattered writes): the second connection starts while the first
#     negotiates (QCBT_DEBUG's count), the window grows past two
#     connections' floor, verify passes, the restore equals the source;
#   - granted-one: --connections 2 through a server that grants one
#     connection (qcbt-server -e 1, which then offers no multi-conn): one
#     notice, and the one connection carries the whole window (more than
#     two connections' floor in flight on it);
#   - map-ahead: an incremental of a 64 GiB disk with 8 dirty runs: the
#     map (64 block status requests of 1 GiB, a round trip each) is asked
#     with many requests in flight (QCBT_DEBUG's count: at least 16 at
#     once), not one after the other, and takes at most 2 round trips
#     (QCBT_DEBUG's count of the map's own round trips, one per reply
#     each request waited for); the backup chain equals the source
#     (qemu-img compare) and verify passes;
#   - map-sparse: the same on a 1 TiB disk with 6 dirty runs: the
#     windows grow once the replies come back sparse, so the map takes at
#     most 3 round trips (1 GiB windows 32 at a time: 32) and fewer than
#     300 requests (1 GiB windows: 1024); the chain equals the source;
#   - map-qemu-nbd: the same served by qemu-nbd, which takes the large
#     windows (4 GiB - 64 KiB) as qcbt-server does;
#   - map-dense: a 64 GiB disk whose map turns fragmented after sparse
#     windows (4096 dirty runs of 64 KiB, every other one, at 40 GiB): a
#     large window meets them and is cut short, the rest asked again in
#     1 GiB windows; the extent lists never hold room for more than the
#     16 MiB budget (2 x 32 x 32768 extents), and the chain equals the
#     source.
#
# Environment: QCBT (client), QCBT_SERVER or QCBT_BUILD_DIR (server),
# CASES=REGEX to run some cases only, QCBT_KEEP_TMP=1 to keep the files.
. "$(dirname "$0")/../functions.sh"

requires qemu-img qemu-io
SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER (set QCBT_SERVER or QCBT_BUILD_DIR)"
SERVER=$(cd "$(dirname "$SERVER")" && pwd)/$(basename "$SERVER")
PROXY=$TESTS_DIR/interop/link-proxy.py
CHUNK=$((256 << 10))
DEPTH=32 # reads per connection the window starts with (client/backup.c)

want() { [[ -z ${CASES:-} || $1 =~ $CASES ]]; }
uri() { printf 'nbd+unix:///?socket=%s' "$1"; }

CASE_RC=0
bad() {
    note "[$CASE] FAIL: $*"
    CASE_RC=1
}

PIDS=()
# bg LOG SOCK CMD...: start CMD, wait until SOCK answers as an NBD server.
bg() {
    local log=$1 sock=$2
    shift 2
    { printf '%q ' "$@"; printf '&\n'; } >>"$CASE_DIR/recipe.txt"
    "$@" >>"$CASE_DIR/$log" 2>&1 &
    PIDS+=($!)
    cleanup_pid "$!"
    wait_nbd "$sock" "$!" ||
        fail "[$CASE] $1 did not start: $(tail -n 5 "$CASE_DIR/$log")"
}

stop_all() {
    local p
    for p in "${PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
        wait_gone "$p" || kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    PIDS=()
}

# make_image IMG: 128 MiB, 96 MiB of data in 4 MiB writes of varying
# bytes: enough reads to outlast the floor (two connections' 16 MiB) by
# more than a round trip, so the grown window shows in flight.
make_image() {
    local i
    run qemu-img create -q -f qcow2 "$1" 128M
    for i in $(seq 0 23); do
        printf 'write -q -P %d %dM 4M\n' $((i + 1)) $((i * 4))
    done >"$CASE_DIR/fill.qio"
    run sh -c "qemu-io -f qcow2 '$1' <'$CASE_DIR/fill.qio'"
}

# serve_linked IMG [SERVER ARGS...]: qcbt-server on srv.sock, the link on
# px.sock.
serve_linked() {
    local img=$1
    shift
    bg server.log "$CASE_DIR/srv.sock" "$SERVER" -t -f qcow2 "$@" \
        -k "$CASE_DIR/srv.sock" "$img"
    bg proxy.log "$CASE_DIR/px.sock" "$PYTHON" "$PROXY" \
        "$CASE_DIR/px.sock" "$CASE_DIR/srv.sock" 25
}

# backup_linked LOG ARGS...: qcbt backup through the link, with the debug
# line; sets WINDOW, FLOOR (bytes) and PEAK (reads).
backup_linked() {
    local log=$1 line
    shift
    { printf 'QCBT_DEBUG=1 '; printf '%q ' "$QCBT" backup --no-progress "$@"; printf '\n'; } \
        >>"$CASE_DIR/recipe.txt"
    QCBT_DEBUG=1 "$QCBT" backup --no-progress "$@" \
        "$(uri "$CASE_DIR/px.sock")" "$CASE_DIR/bk" >"$CASE_DIR/$log" 2>&1 ||
        fail "[$CASE] qcbt backup failed: $(tail -n 5 "$CASE_DIR/$log")"
    line=$(grep 'debug: window ' "$CASE_DIR/$log") ||
        fail "[$CASE] oracle broke: no window line in $log"
    [[ $line =~ window\ ([0-9]+)\ bytes\ \(([0-9]+)\ to\ ([0-9]+)\ reads\ of\ ([0-9]+)\ bytes\),\ peak\ ([0-9]+)\ reads ]] ||
        fail "[$CASE] oracle broke: cannot parse '$line'"
    WINDOW=${BASH_REMATCH[1]}
    FLOOR=$((BASH_REMATCH[2] * BASH_REMATCH[4]))
    PEAK=${BASH_REMATCH[5]}
    line=$(grep 'debug: map: ' "$CASE_DIR/$log") ||
        fail "[$CASE] oracle broke: no map line in $log"
    [[ $line =~ map:\ ([0-9]+)\ block\ status\ requests,\ at\ most\ ([0-9]+)\ in\ flight ]] ||
        fail "[$CASE] oracle broke: cannot parse '$line'"
    MAP_REQS=${BASH_REMATCH[1]}
    MAP_PEAK=${BASH_REMATCH[2]}
    [[ $line =~ in\ flight,\ ([0-9]+)\ round\ trips,\ room\ for\ at\ most\ ([0-9]+)\ extents ]] ||
        fail "[$CASE] oracle broke: cannot parse '$line'"
    MAP_ROUNDS=${BASH_REMATCH[1]}
    MAP_HELD=${BASH_REMATCH[2]}
    recipe_note "window $WINDOW bytes, floor $FLOOR, peak $PEAK reads, map $MAP_REQS requests, $MAP_PEAK at once, $MAP_ROUNDS round trips, room for $MAP_HELD extents"
}

# restores_to IMG: the newest backup restores to IMG's guest view.
restores_to() {
    rm -f "$CASE_DIR/out.raw"
    run "$QCBT" restore "$CASE_DIR/bk" "$CASE_DIR/out.raw"
    qemu-img compare -q -f raw -F qcow2 "$CASE_DIR/out.raw" "$1" ||
        bad "the restore differs from $1"
}

if want one-conn; then
    begin_case one-conn
    CASE_RC=0
    make_image "$CASE_DIR/src.qcow2"
    serve_linked "$CASE_DIR/src.qcow2"
    backup_linked full.log --full --connections 1
    ((FLOOR == DEPTH * CHUNK)) || bad "floor $FLOOR, expected $((DEPTH * CHUNK))"
    ((WINDOW > FLOOR)) || bad "the window stayed at $WINDOW bytes over a 50 ms link"
    ((PEAK > DEPTH)) || bad "at most $PEAK reads in flight over a 50 ms link"
    stop_all
    restores_to "$CASE_DIR/src.qcow2"
    case_result $CASE_RC
fi

if want two-conns; then
    begin_case two-conns
    CASE_RC=0
    make_image "$CASE_DIR/src.qcow2"
    run qemu-img bitmap --add -g 64K "$CASE_DIR/src.qcow2" b0
    serve_linked "$CASE_DIR/src.qcow2"
    backup_linked full.log --full --connections 2
    stop_all
    # 24 runs of 2 MiB, every other 4 MiB, over the data and beyond it.
    for i in $(seq 0 23); do
        printf 'write -q -P %d %dM 2M\n' $((i + 100)) $((i * 4 + 7))
    done >"$CASE_DIR/dirty.qio"
    run sh -c "qemu-io -f qcow2 '$CASE_DIR/src.qcow2' <'$CASE_DIR/dirty.qio'"
    serve_linked "$CASE_DIR/src.qcow2" -B b0
    backup_linked incr.log --since b0 --connections 2
    ((FLOOR == 2 * DEPTH * CHUNK)) || bad "floor $FLOOR, expected $((2 * DEPTH * CHUNK))"
    ((WINDOW > FLOOR)) || bad "the window stayed at $WINDOW bytes over a 50 ms link"
    ((PEAK > 2 * DEPTH)) || bad "at most $PEAK reads in flight over a 50 ms link"
    # The second connection starts while the first negotiates, not after.
    grep -q 'debug: connections: 1 opened while the first negotiated' "$CASE_DIR/incr.log" ||
        bad "the second connection did not start during the first one's handshake: $(grep 'debug: connections' "$CASE_DIR/incr.log")"
    grep -q '"connections": 2\|incremental' "$CASE_DIR/incr.log" ||
        bad "not an incremental: $(cat "$CASE_DIR/incr.log")"
    stop_all
    run "$QCBT" verify "$CASE_DIR/bk"
    restores_to "$CASE_DIR/src.qcow2"
    case_result $CASE_RC
fi

if want granted-one; then
    begin_case granted-one
    CASE_RC=0
    make_image "$CASE_DIR/src.qcow2"
    serve_linked "$CASE_DIR/src.qcow2" -e 1
    backup_linked full.log --full --connections 2
    grep -q 'multi-conn: using one connection' "$CASE_DIR/full.log" ||
        bad "no notice of the connection the server did not grant: $(cat "$CASE_DIR/full.log")"
    ((PEAK > 2 * DEPTH)) || bad "at most $PEAK reads in flight on the one connection granted"
    stop_all
    restores_to "$CASE_DIR/src.qcow2"
    case_result $CASE_RC
fi

if want map-ahead; then
    begin_case map-ahead
    CASE_RC=0
    run qemu-img create -q -f qcow2 "$CASE_DIR/src.qcow2" 64G
    run qemu-img bitmap --add -g 64K "$CASE_DIR/src.qcow2" b0
    serve_linked "$CASE_DIR/src.qcow2"
    backup_linked full.log --full
    stop_all
    for i in $(seq 0 7); do
        printf 'write -q -P %d %dG 1M\n' $((i + 1)) $((i * 8 + 3))
    done >"$CASE_DIR/dirty.qio"
    run sh -c "qemu-io -f qcow2 '$CASE_DIR/src.qcow2' <'$CASE_DIR/dirty.qio'"
    serve_linked "$CASE_DIR/src.qcow2" -B b0
    backup_linked incr.log --since b0
    ((MAP_PEAK >= 16)) || bad "at most $MAP_PEAK block status requests in flight"
    ((MAP_ROUNDS >= 1 && MAP_ROUNDS <= 2)) || bad "the map took $MAP_ROUNDS round trips"
    stop_all
    run "$QCBT" verify "$CASE_DIR/bk"
    qemu-img compare -q -f qcow2 -F qcow2 "$CASE_DIR/bk/backup-0001.qcow2" "$CASE_DIR/src.qcow2" ||
        bad "the backup chain differs from the source"
    case_result $CASE_RC
fi

# serve_qemu_linked IMG [QEMU-NBD ARGS...]: serve_linked with qemu-nbd.
serve_qemu_linked() {
    local img=$1
    shift
    bg server.log "$CASE_DIR/srv.sock" qemu-nbd -r -t -f qcow2 "$@" \
        -k "$CASE_DIR/srv.sock" "$img"
    bg proxy.log "$CASE_DIR/px.sock" "$PYTHON" "$PROXY" \
        "$CASE_DIR/px.sock" "$CASE_DIR/srv.sock" 25
}

# map_case NAME SIZE QIO: an incremental of a SIZE disk (bitmap b0 after
# a full backup) with the writes in QIO through the link, served by
# ${SERVE:-serve_linked}; sets the map's figures (backup_linked), checks
# verify and the backup chain.
map_case() {
    local size=$1 qio=$2 serve=${SERVE:-serve_linked}
    run qemu-img create -q -f qcow2 "$CASE_DIR/src.qcow2" "$size"
    run qemu-io -f qcow2 -c 'write -q -P 9 0 1M' "$CASE_DIR/src.qcow2"
    run qemu-img bitmap --add -g 64K "$CASE_DIR/src.qcow2" b0
    $serve "$CASE_DIR/src.qcow2"
    backup_linked full.log --full
    stop_all
    run sh -c "qemu-io -f qcow2 '$CASE_DIR/src.qcow2' <'$qio'"
    $serve "$CASE_DIR/src.qcow2" -B b0
    backup_linked incr.log --since b0
    stop_all
    run "$QCBT" verify "$CASE_DIR/bk"
    qemu-img compare -q -f qcow2 -F qcow2 "$CASE_DIR/bk/backup-0001.qcow2" "$CASE_DIR/src.qcow2" ||
        bad "the backup chain differs from the source"
}

if want map-sparse; then
    begin_case map-sparse
    CASE_RC=0
    for i in 0 1 2 3 4 5; do
        printf 'write -q -P %d %dG 1M\n' $((i + 1)) $((i * 170 + 5))
    done >"$CASE_DIR/dirty.qio"
    map_case 1T "$CASE_DIR/dirty.qio"
    ((MAP_ROUNDS >= 1 && MAP_ROUNDS <= 3)) || bad "the map took $MAP_ROUNDS round trips for 1 TiB"
    ((MAP_REQS < 300)) || bad "$MAP_REQS block status requests for a sparse 1 TiB"
    case_result $CASE_RC
fi

if want map-qemu-nbd; then
    begin_case map-qemu-nbd
    CASE_RC=0
    requires qemu-nbd
    for i in 0 1 2 3 4 5; do
        printf 'write -q -P %d %dG 1M\n' $((i + 1)) $((i * 170 + 5))
    done >"$CASE_DIR/dirty.qio"
    SERVE=serve_qemu_linked map_case 1T "$CASE_DIR/dirty.qio"
    ((MAP_ROUNDS >= 1 && MAP_ROUNDS <= 3)) || bad "the map took $MAP_ROUNDS round trips for 1 TiB"
    ((MAP_REQS < 300)) || bad "$MAP_REQS block status requests for a sparse 1 TiB"
    case_result $CASE_RC
fi

if want map-dense; then
    begin_case map-dense
    CASE_RC=0
    {
        printf 'write -q -P 1 3G 1M\n'
        for i in $(seq 0 4095); do
            printf 'write -q -P %d %d 64K\n' $((i % 200 + 2)) $(((40 << 30) + i * (128 << 10)))
        done
    } >"$CASE_DIR/dirty.qio"
    map_case 64G "$CASE_DIR/dirty.qio"
    ((MAP_HELD > 0 && MAP_HELD <= 2 * 32 * 32768)) ||
        bad "the extent lists held room for $MAP_HELD extents"
    case_result $CASE_RC
fi

finish_cases
