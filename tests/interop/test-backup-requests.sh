#!/bin/bash
# What a backup asks the server, seen from the server (issue 13: the
# request pattern decides what a backup costs the server per byte;
# bench/bench-server-cpu.sh measures it).  qcbt-server with QCBT_DEBUG=1
# logs one line per connection when it ends: reads and their bytes, block
# status requests, the bytes they asked about, how many with REQ_ONE.
#
#   - counters: a python nbd client makes 3 reads and 2 block status
#     requests (one with REQ_ONE) whose sizes it knows: the line says
#     exactly that.
#
# Environment: QCBT (client), QCBT_SERVER or QCBT_BUILD_DIR (server),
# QCBT_KEEP_TMP=1 to keep the files.
. "$(dirname "$0")/../functions.sh"

requires qemu-img qemu-io
SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER (set QCBT_SERVER or QCBT_BUILD_DIR)"
SERVER=$(cd "$(dirname "$SERVER")" && pwd)/$(basename "$SERVER")

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

finish_cases
