#!/bin/bash
# qcbt-server's memory stays bounded across many connections, and an idle
# connection holds little (issue 11).  Watched from outside, as VmRSS in
# /proc/PID/status, because the defects it guards against are invisible
# to ASan's leak check (buffers of exited threads reachable from their
# thread-local storage; buffers that are freed, but only when the
# connection ends).
#
# 1. Leak per connection: a compressed qcow2 with 2 MiB clusters served by
#    qcbt-server -t; 200 sequential connections each read all of it with
#    4 requests in flight, so every worker thread decompresses clusters.
#    Before the fix each worker thread left its decompression cache
#    behind: about 10 MiB per connection (1.5 MB -> 600 MB after 60
#    nbdcopy runs).
# 2. Idle connections: 16 connections each make every worker hold large
#    buffers (simple replies: 4 x 32 MiB reads in flight; structured
#    replies: 2 MiB chunks and block status), then stay open and idle.
#    Before the fix each held its buffers for its life: 2 GiB for 16.
#
# Bounds (RSS in MiB above a baseline taken after a warm-up):
#   - across connections: LEAK_BOUND_MIB (64).  One live connection holds
#     at most 4 workers x (2 MiB buffer + 2 MiB cluster + 4 MiB scratch,
#     of which only the compressed bytes are touched), about 24 MiB, so
#     64 MiB leaves room for one connection that is still ending while the
#     next starts; the old leak passes it within 10 connections.
#   - idle: IDLE_SLACK_MIB (8) + IDLE_PER_CONN_MIB (1) per idle
#     connection, checked after each new one has gone idle.  An idle
#     connection and its 4 thread stacks take about 150 KiB, and the first
#     connection makes the allocator set up about 4 MiB; a worker that
#     kept its buffers while idle holds 2 MiB (structured) or 32 MiB
#     (simple replies) plus 3 MiB of decompressed cluster and scratch, so
#     the first connections already break the bound.
# Under ASan the server runs with a small quarantine (freed memory ASan
# keeps poisoned before reuse), so that freed buffers leave RSS as they do
# in the release build; the bounds are the same.
#
# QCBT_KEEP_TMP=1 keeps the images and logs.

. "$(dirname "$0")/../functions.sh"
requires qemu-img nbdinfo

SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER"
"$PYTHON" -c 'import nbd' 2>/dev/null || fail "python3-libnbd missing for $PYTHON"

LEAK_BOUND_MIB=64
IDLE_SLACK_MIB=8
IDLE_PER_CONN_MIB=1
cd "$TMPD"

# ASan (if the server is built with it): a small quarantine; keep the
# caller's options (detect_leaks, abort_on_error) after ours.
export ASAN_OPTIONS="quarantine_size_mb=4${ASAN_OPTIONS:+:$ASAN_OPTIONS}"

# A 32 MiB disk (room for 32 MiB reads) whose first 8 MiB hold data that
# deflates to about half (each 4 KiB is a random 1 KiB four times); the
# rest is unallocated, so that reading it costs little.  As qcow2 with
# 2 MiB clusters, the 4 data clusters are compressed.
"$PYTHON" - <<'EOF'
import random
rnd = random.Random(11)
with open("data.raw", "wb") as f:
    for _ in range(8 * 256):
        f.write(rnd.randbytes(1024) * 4)
    f.truncate(32 << 20)
EOF
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=2M data.raw z.qcow2 ||
    fail "qemu-img convert -c failed"
# Sanity: the data really is compressed (else the test proves nothing).
qemu-img check --output=json z.qcow2 >check.json
"$PYTHON" -c 'import json, sys
sys.exit(json.load(open("check.json")).get("compressed-clusters") != 4)' ||
    fail "z.qcow2 does not hold 4 compressed clusters: $(cat check.json)"

cat >client.py <<'EOF'
"""client.py SOCK PID MODE ...: connections to qcbt-server and its RSS.

  leak N WARMUP BOUND_MIB   N sequential connections, each reading the
                            whole export (2 MiB requests, 4 in flight);
                            fail as soon as RSS exceeds the RSS after
                            WARMUP connections by BOUND_MIB.
  idle N SLACK_MIB PER_MIB  N connections that read big (even: simple
                            replies, 4 x 32 MiB in flight; odd: structured
                            replies, 2 MiB chunks, and block status) and
                            then stay open; after each, RSS must come down
                            to baseline + SLACK + PER x connections.
"""
import sys, time
import nbd

sock, pid, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
MiB = 1 << 20

def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    sys.exit("no VmRSS for the server")

def note(msg):
    print(f"client.py: {msg}", file=sys.stderr, flush=True)

buffers = {}

def buffer(n):
    """A read buffer of n bytes, made once (the client's own CPU time
    slows the test under load)."""
    if n not in buffers:
        buffers[n] = nbd.Buffer(n)
    return buffers[n]

def read_all(h, size, reqlen, depth):
    """Read [0, size) in reqlen requests, depth of them in flight (into
    one buffer: the data is not looked at)."""
    off, pending = 0, []
    while off < size or pending:
        while off < size and len(pending) < depth:
            n = min(reqlen, size - off)
            pending.append(h.aio_pread(buffer(n), off))
            off += n
        wait_some(h, pending)

def wait_some(h, pending):
    """Wait until at least one command in pending completes; drop the
    completed ones (each cookie is retired once)."""
    while True:
        done = [c for c in pending if h.aio_command_completed(c)]
        if done:
            for c in done:
                pending.remove(c)
            return
        h.poll(-1)

def connect(structured=True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if structured:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(sock)
    return h

def wait_rss_below(limit_kib, seconds):
    """RSS falls to limit within seconds (freeing is asynchronous: the
    server's threads end after the client hangs up, idle workers free
    their buffers after a second)."""
    end = time.monotonic() + seconds
    while True:
        r = rss_kib()
        if r <= limit_kib or time.monotonic() > end:
            return r
        time.sleep(0.05)

if mode == "leak":
    n, warmup, bound = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    base = None
    peak = 0
    for i in range(1, n + 1):
        h = connect()
        read_all(h, h.get_size(), 2 * MiB, 4)
        h.shutdown()
        del h  # closes the socket
        if i == warmup:
            base = rss_kib()
            note(f"after {warmup} connections: RSS {base} KiB (baseline)")
        elif base is not None:
            # Over the bound: maybe the last connection is still ending;
            # judge once it had time to.
            r = wait_rss_below(base + bound * 1024, 30)
            peak = max(peak, r)
            if r > base + bound * 1024:
                sys.exit(f"RSS after {i} connections is {r} KiB, "
                         f"{(r - base) // 1024} MiB above the baseline "
                         f"(bound {bound} MiB): memory leaks per connection")
    note(f"after {n} connections: RSS {r} KiB "
         f"({(r - base) / 1024:+.1f} MiB), peak {peak} KiB")
    print(r - base)

elif mode == "idle":
    n, slack, per = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    base = rss_kib()
    note(f"baseline RSS {base} KiB")
    conns = []
    for i in range(n):
        if i % 2 == 0:
            # The export is 32 MiB: four whole-disk reads in flight.
            h = connect(structured=False)
            pending = [h.aio_pread(buffer(32 * MiB), 0) for _ in range(4)]
            while pending:
                wait_some(h, pending)
        else:
            h = connect(structured=True)
            read_all(h, h.get_size(), 2 * MiB, 8)
            h.block_status(h.get_size(), 0, lambda *a: 0)
        conns.append(h)
        limit = base + (slack + per * len(conns)) * 1024
        r = wait_rss_below(limit, 30)
        if r > limit:
            sys.exit(f"{len(conns)} idle connection(s) hold "
                     f"{(r - base) // 1024} MiB (RSS {r} KiB, bound "
                     f"{slack} + {per} MiB each): buffers are kept while "
                     f"idle")
    note(f"{n} idle connections: RSS {r} KiB ({(r - base) / 1024:+.1f} MiB)")
    for h in conns:
        h.shutdown()
    print(r - base)
EOF

# start_server LOG ARGS...: qcbt-server in the background ($SPID); ready
# when a client gets the export's size through $SOCK.
start_server() {
    local log=$1 i
    shift
    rm -f "$SOCK"
    "$SERVER" "$@" 2>"$log" &
    SPID=$!
    cleanup_pid "$SPID"
    for i in $(seq 1200); do
        nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1 && return 0
        kill -0 "$SPID" 2>/dev/null || fail "server exited at start: $(cat "$log")"
        sleep 0.05
    done
    fail "no client could connect to the server within 60 s: $(cat "$log")"
}

# stop_server LOG: SIGTERM; exit status 0 (under ASan: no leak either).
stop_server() {
    local st=0
    kill -TERM "$SPID"
    wait "$SPID" || st=$?
    [[ $st -eq 0 ]] || fail "server exit status $st after SIGTERM: $(tail -n 30 "$1")"
}

note "1: 200 connections reading compressed clusters"
start_server leak.log -t -k "$SOCK" z.qcow2
"$PYTHON" client.py "$SOCK" "$SPID" leak 200 10 "$LEAK_BOUND_MIB" >leak.out ||
    fail "RSS grows with connections (see above)"
stop_server leak.log
note "ok: 200 connections, RSS $(cat leak.out) KiB above the level after 10"

note "2: 16 idle connections after large reads"
start_server idle.log -t -k "$SOCK" z.qcow2
"$PYTHON" client.py "$SOCK" "$SPID" idle 16 "$IDLE_SLACK_MIB" "$IDLE_PER_CONN_MIB" >idle.out ||
    fail "idle connections keep their buffers (see above)"
stop_server idle.log
note "ok: 16 idle connections hold $(cat idle.out) KiB"
