#!/bin/bash
# Where does an NBD server spend its CPU during one dirty-bitmap pull?
#
#   bench/bench-server-profile.sh SCRATCH_DIR SERVER BITMAP [SERVER_OPTS...]
#
# SERVER: qcbt (QCBT_SERVER, default <repo>/build-bench/server/qcbt-server)
# or qemu (qemu-nbd); BITMAP: b0 (a.qcow2) or f0 (frag.qcow2), images from
# bench-server.sh / mkimage.sh in SCRATCH_DIR.  Starts a private server on
# SCRATCH_DIR/prof.sock, does one untimed warm-up pull, then RUNS (3) pulls
# under `perf stat` (software counters: this VM has no hardware counters) and
# one under `perf record -e cpu-clock -g`, and prints: server CPU ticks per
# pull, context switches, the top self-time symbols and the inclusive time of
# the syscalls that matter.  Client: client_pull.py $PULL_OPTS (default
# --conns 4 --depth 8).  Env QCBT_SERVER, PULL_OPTS, RUNS, TOP (25).
# Extra env (e.g. BS_SNDBUF for a patched build) passes to the server.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,16p' "$0" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
SB=${SHARED_BENCH:-/work/shared/bench}
PY=/usr/bin/python3
S=$(cd "$1" && pwd) srv=$2 bm=$3; shift 3
PULL_OPTS=${PULL_OPTS:---conns 4 --depth 8} RUNS=${RUNS:-3} TOP=${TOP:-25}
QCBT_SERVER=${QCBT_SERVER:-$HERE/../build-bench/server/qcbt-server}
case $bm in b0) img=a.qcow2 ;; f0) img=frag.qcow2 ;; *) echo "BITMAP: b0 or f0" >&2; exit 2 ;; esac
command -v perf >/dev/null || { echo "no perf; try: strace -c -f -p PID" >&2; exit 1; }
cd "$S"
sock=$S/prof.sock out=$S/prof-pull.out data=$S/prof-$srv-$bm.perf.data
rm -f "$sock"
case $srv in
qcbt) "$QCBT_SERVER" -r -f qcow2 -t -e 16 -k "$sock" -B "$bm" "$@" "$img" & ;;
qemu) qemu-nbd -r -f qcow2 --persistent --shared=16 -k "$sock" -B "$bm" "$@" "$img" & ;;
*) echo "SERVER: qcbt or qemu" >&2; exit 2 ;;
esac
P=$!
trap 'kill $P 2>/dev/null || true; wait $P 2>/dev/null || true; rm -f "$sock" "$out"' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
U="nbd+unix:///?socket=$sock"
ticks() { awk '{print $14 + $15}' "/proc/$P/stat"; }
pull() { rm -f "$out"; $PY "$SB/client_pull.py" "$U" "$bm" "$out" $PULL_OPTS --no-hash; }

pull >/dev/null                                          # warm-up
echo "## $srv $bm ($img), client_pull $PULL_OPTS, server opts: ${*:-none}"
perf stat -e task-clock,context-switches,cpu-migrations,page-faults -p $P \
    -o "$S/prof-stat.txt" 2>/dev/null & R=$!
sleep 0.3
c0=$(ticks)
for _ in $(seq "$RUNS"); do
    pull | $PY -c 'import json,sys; d=json.load(sys.stdin); print("  pull_s", d["pull_s"], "conns", d["conns"], "depth", d["depth"])'
done
c1=$(ticks)
kill -INT $R; wait $R || true
echo "  server CPU: $((c1 - c0)) ticks ($(getconf CLK_TCK)/s) over $RUNS pulls"
grep -E 'task-clock|context-switches|cpu-migrations|page-faults' "$S/prof-stat.txt" | sed 's/^/  /'

perf record -e cpu-clock -g -o "$data" -p $P >/dev/null 2>&1 & R=$!
sleep 0.3
pull >/dev/null
sleep 0.2
kill -INT $R; wait $R || true
echo; echo "### self time, top $TOP symbols (perf record -e cpu-clock -g; $data)"
perf report -i "$data" --stdio --no-children --sort sym 2>/dev/null |
    grep -E '^ +[0-9]' | head -"$TOP" || true       # head closes the pipe early
echo; echo "### inclusive time of the paths that matter"
perf report -i "$data" --stdio --children --sort sym -g none 2>/dev/null |
    grep -E '^ +[0-9]' |
    grep -E '\] (__libc_pread|__send|__libc_recv|sendfile|__GI___lll_lock_wait|__GI___lll_lock_wake|worker_loop|qcow2_map|chain_block_status|chain_read|bitmap_extent|schedule|filemap_read|filemap_splice_read|unix_stream_sendmsg|unix_stream_recvmsg|do_futex)$' |
    head -20 || true
