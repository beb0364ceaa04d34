#!/bin/bash
# qcbt-server against hostile NBD clients: every item of the reliability
# catalogue 3(b) that applies without TLS (B1-B13, B18-B28, B30, B31),
# driven byte by byte by hostile.py (raw sockets, no libnbd).  After each
# case a fresh well-behaved client must still be served and the server's
# RSS must stay bounded.  Then the signals: SIGPIPE is ignored, SIGHUP /
# SIGINT / SIGTERM (with clients mid-handshake, mid-block-status and hung)
# end the server with status 0 within a bound, and no image changes.
#
# QCBT_KEEP_TMP=1 keeps the images; HOSTILE_CASES=REGEX runs matching
# hostile.py cases only; HOSTILE_TRACE=1 prints Python tracebacks.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io sha256sum timeout

SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER"
HOSTILE=$TESTS_DIR/interop/hostile.py
MiB=$((1024 * 1024))
HS_TIMEOUT=2
MAX_CONN=8
rc=0
SECONDS=0

cd "$TMPD"

# --- images ----------------------------------------------------------------
# main.qcow2: 64 MiB + 2.5 KiB (not a multiple of the cluster or the
# granularity), data before and after the bitmaps, the in-use bitmap
# "inuse" (qemu-io killed), b0 (64 KiB) and b1 (4 KiB granularity).
qemu-img create -q -f qcow2 main.qcow2 $((64 * MiB + 2560))
qemu-io -f qcow2 -c 'write -P 0x11 0 1M' -c 'write -P 0x12 63M 1M' \
    main.qcow2 >/dev/null
qemu-img bitmap --add main.qcow2 inuse
sh -c 'qemu-io -f qcow2 -c "write -P 0x22 2M 64k" -c flush -c "sigraise 9" main.qcow2 >/dev/null 2>&1; exit 0'
qemu-img info -U --output=json main.qcow2 | grep '"in-use"' >/dev/null ||
    fail "could not leave bitmap 'inuse' in use"
qemu-img bitmap --add main.qcow2 b0
qemu-img bitmap --add -g 4096 main.qcow2 b1
qemu-io -f qcow2 -c 'write -P 0xab 64k 64k' -c 'write -P 0xcd 10M 192k' \
    -c 'write -P 0xef 40M 4k' -c 'write -P 0x5c 66047 3000' \
    -c "write -P 0x7e $((64 * MiB)) 2560" main.qcow2 >/dev/null
qemu-img convert -f qcow2 -O raw main.qcow2 main.raw

# other.qcow2: a second export with its own bitmap c0.
qemu-img create -q -f qcow2 other.qcow2 8M
qemu-img bitmap --add other.qcow2 c0
qemu-io -f qcow2 -c 'write -P 0x44 1M 64k' other.qcow2 >/dev/null

# big: the worst-case bitmap.  base.qcow2 holds an empty bitmap "alt"
# (512-byte granularity); the overlay has no bitmap and allocates every
# other 512-byte cluster over ALT_SPAN, so the tolerant merge publishes
# "alt" = alternating dirty/clean every 512 bytes (and base:allocation
# alternates too): 147456 extents, more than one chunk may carry.
ALT_SPAN=$((72 * MiB))
BIG_SIZE=$((100 * MiB + 1536))
qemu-img create -q -f qcow2 base.qcow2 $BIG_SIZE
qemu-img bitmap --add -g 512 base.qcow2 alt
"$PYTHON" - "$ALT_SPAN" "$BIG_SIZE" <<'EOF'
import sys
span, size = int(sys.argv[1]), int(sys.argv[2])
with open("alt.raw", "wb") as f:
    blk = (b"\x5a" * 512 + b"\0" * 512) * 1024
    for _ in range(span // len(blk)):
        f.write(blk)
    f.truncate(size)
EOF
qemu-img convert -q -S 512 -f raw -O qcow2 -o cluster_size=512 alt.raw big.qcow2
qemu-img rebase -u -f qcow2 -b base.qcow2 -F qcow2 big.qcow2
rm -f alt.raw
note "images ready (${SECONDS}s)"

declare -A SHA
for f in main.qcow2 other.qcow2 base.qcow2 big.qcow2; do
    SHA[$f]=$(sha256sum "$f" | cut -d' ' -f1)
done
images_unchanged() {
    local f now
    for f in "${!SHA[@]}"; do
        now=$(sha256sum "$f" | cut -d' ' -f1)
        if [[ $now != "${SHA[$f]}" ]]; then
            note "FAIL: $f changed while served read-only ($1)"
            rc=1
        fi
    done
}

SERVER_ARGS=(-t -e "$MAX_CONN" --handshake-timeout "$HS_TIMEOUT" -T 4
    -A -B b0 -B b1
    --export "name=other,image=other.qcow2,bitmap=c0"
    --export "name=big,image=big.qcow2,bitmap=alt"
    main.qcow2)

# start_server LOG ARGS...: sets SPID; waits until the unix socket $SOCK
# accepts connections.  With TCP=1: a TCP port on 127.0.0.1 bound before
# the server starts (socket activation, no -k/-b/-p, no wait); sets PORT.
start_server() {
    local log=$1
    shift
    if [[ -n ${TCP:-} ]]; then
        serve_activated "$log" "$SERVER" "$@"
        SPID=$ACT_PID
        PORT=$ACT_PORT
        return 0
    fi
    rm -f "$SOCK"
    "$SERVER" -k "$SOCK" "$@" 2>"$log" &
    SPID=$!
    cleanup_pid "$SPID"
    wait_nbd "$SOCK" "$SPID" || fail "server did not start listening: $(cat "$log")"
}

# stop_server SIG BOUND: send SIG, expect exit status 0 within BOUND s (a
# generous bound: it catches a server that ignores SIG, not a slow one).
stop_server() {
    local sig=$1 bound=$2 st=0 t0=$SECONDS
    kill -"$sig" "$SPID"
    if ! wait_gone "$SPID" "$bound"; then
        note "FAIL: server still running ${bound}s after SIG$sig"
        rc=1
        kill -KILL "$SPID"
    fi
    wait "$SPID" || st=$?
    if [[ $st -ne 0 ]]; then
        note "FAIL: server exit status $st after SIG$sig (expected 0)"
        rc=1
    else
        note "ok: SIG$sig -> exit 0 after $((SECONDS - t0))s"
    fi
}

# hostile [timeout SECS] ARGS...: hostile.py against the current server
# ($SPID), under an outer wall-clock limit.
hostile() {
    local limit=300
    if [[ $1 == timeout ]]; then
        limit=$2
        shift 2
    fi
    timeout "$limit" "$PYTHON" "$HOSTILE" --pid "$SPID" --ref main.raw \
        --big-size $((BIG_SIZE & ~511)) --alt-period 512 \
        --alt-span $ALT_SPAN --max-conn $MAX_CONN --hs-timeout $HS_TIMEOUT "$@"
}

# --- 1. the catalogue over a unix socket -----------------------------------
start_server server1.log "${SERVER_ARGS[@]}"
if ! hostile timeout 600 --socket "$SOCK" ${HOSTILE_CASES:+--cases "$HOSTILE_CASES"}; then
    note "FAIL: hostile cases over the unix socket (see above)"
    rc=1
fi
# SIGPIPE is ignored; then SIGHUP ends the server cleanly.
if kill -0 "$SPID" 2>/dev/null; then
    kill -PIPE "$SPID"
    sleep 0.3
    if kill -0 "$SPID" 2>/dev/null; then
        note "ok: SIGPIPE ignored"
    else
        note "FAIL: SIGPIPE killed the server"
        rc=1
    fi
    stop_server HUP "$QCBT_WAIT"
else
    note "FAIL: the server died during the hostile cases: $(tail -n 5 server1.log)"
    rc=1
    wait "$SPID" || true
fi
images_unchanged "unix socket run"

if [[ -n ${HOSTILE_CASES:-} ]]; then
    note "HOSTILE_CASES set: skipping the TCP and signal runs"
    [[ $rc -eq 0 ]] || fail "some hostile-client checks failed (see above)"
    exit 0
fi

# --- 2. TCP: the cases where the transport matters ------------------------
TCP=1 start_server server2.log "${SERVER_ARGS[@]}"
if ! hostile timeout 300 --socket "127.0.0.1:$PORT" \
        --cases 'b01_idle|not_reading|b02|b03_export_name|b20|b25|b26|b27|b28'; then
    note "FAIL: hostile cases over TCP (see above)"
    rc=1
fi
stop_server INT "$QCBT_WAIT"

# --- 2b. descriptor exhaustion (EMFILE) -------------------------------------
# RLIMIT_NOFILE 32 and no connection cap below it: accept() fails with
# EMFILE while the sockets are held; no spinning, no log flood.
rm -f "$SOCK"
(
    ulimit -n 32
    exec "$SERVER" -k "$SOCK" "${SERVER_ARGS[@]}" -e 1000 2>server-emfile.log
) &
SPID=$!
cleanup_pid "$SPID"
wait_nbd "$SOCK" "$SPID" || fail "server (ulimit -n 32) did not start: $(cat server-emfile.log)"
if ! hostile timeout 300 --socket "$SOCK" --cases 'b02_fd_exhaustion'; then
    note "FAIL: descriptor exhaustion (see above)"
    rc=1
fi
n=$(grep -c '' server-emfile.log || true)
if [[ $n -gt 50 ]]; then
    note "FAIL: $n log lines during descriptor exhaustion: $(sort server-emfile.log | uniq -c | sort -rn | head -n 3)"
    rc=1
fi
stop_server TERM "$QCBT_WAIT"

# --- 3. SIGTERM with clients mid-handshake, mid-block-status and hung -------
# (a hung client -- not reading its replies -- may hold the shutdown for
# the server's 30 s grace; the bound, 120 s, leaves room for ASan and load)
start_server server3.log "${SERVER_ARGS[@]}"
if ! hostile timeout 300 --socket "$SOCK" --sigterm --shutdown-bound 120; then
    note "FAIL: SIGTERM with clients in every state (see above)"
    rc=1
fi
# The process is gone (or was reported as still running): reap it.
kill -0 "$SPID" 2>/dev/null && { sleep 1; kill -KILL "$SPID" 2>/dev/null; }
st=0
wait "$SPID" || st=$?
if [[ $st -ne 0 ]]; then
    note "FAIL: exit status $st after SIGTERM with clients connected"
    rc=1
else
    note "ok: SIGTERM with clients in every state -> exit 0"
fi
images_unchanged "after SIGTERM"

# --- 4. kill -9 changes nothing; the bitmaps still export afterwards ---------
start_server server4.log "${SERVER_ARGS[@]}"
hostile --socket "$SOCK" --cases 'b24_req_one' >/dev/null ||
    { note "FAIL: REQ_ONE case before kill -9"; rc=1; }
kill -KILL "$SPID"
wait "$SPID" 2>/dev/null || true
images_unchanged "after kill -9"
start_server server5.log "${SERVER_ARGS[@]}"
hostile --socket "$SOCK" --cases 'b24_req_one|b12' ||
    { note "FAIL: restart after kill -9 cannot export the bitmaps"; rc=1; }
stop_server TERM "$QCBT_WAIT"
images_unchanged "after the restart"

note "done in ${SECONDS}s"
[[ $rc -eq 0 ]] || fail "some hostile-client checks failed (see above)"
note "PASS"
