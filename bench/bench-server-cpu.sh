#!/bin/bash
# bench-server-cpu.sh SCRATCH -- what a backup's requests cost the NBD
# server, per byte, against nbdcopy's (issue 13).
#
# Image: the anchor's a.qcow2 (16 GiB, 4.6 GiB allocated, bitmap b0 with
# 820 MiB of scattered dirty runs; /work/shared/bench/mkimage.sh, built
# into SCRATCH if missing) and its raw copy a.raw (sparse).  Servers, all
# up for the whole run, each on a unix socket in SCRATCH:
#   qemu-nbd     qemu-nbd -r -f qcow2 --persistent --shared=16 -B b0 a.qcow2
#   qcbt-server  qcbt-server -t -f qcow2 -e 16 -B b0 a.qcow2
#   nbdkit-qcbt  nbdkit -f -r PLUGIN file=a.qcow2 (our plugin: the qcow2
#                allocation, no bitmap context)
#   nbdkit-dirty nbdkit -f -r PLUGIN file=a.qcow2 bitmap=b0 dirty-only=true
#                (the plugin's dirty view: b0 as base:allocation, clean
#                reads as zeros; a "full" copy of it pulls the dirty data,
#                nbdkit's equivalent of an incremental)
#   nbdkit-file  nbdkit -f -r file a.raw (nbdkit's own file plugin)
# Contenders, each once per round (in an order rotated per round, each
# after a sync), rounds interleaved (N, default 5):
#   full (every server):
#     qcbt --full      qcbt backup --full --json URI DIR (DIR empty)
#     nbdcopy          nbdcopy URI out.raw (4 connections x 64 requests
#                      of 256 KiB, its default)
#     nbdcopy --flush  the same, made durable as qcbt's backup is
#   incremental (qemu-nbd, qcbt-server: they publish b0):
#     qcbt --since     qcbt backup --since b0 into a copy (hard links) of
#                      a prepared DIR holding one full backup
#     nbdcopy-style    the anchor's client_pull.py URI b0 out.raw --conns 4
#                      --depth 64 --max-req 262144: nbdcopy's pattern on
#                      the dirty runs (whole map first, then the reads);
#                      nbdcopy itself cannot follow a bitmap
# Figure: the server's CPU (utime + stime of its process, all threads,
# from /proc/PID/stat, the delta around each client run) per GiB the
# client read; medians and min-max over the rounds, the ratio qcbt /
# nbdcopy per server.  Floors, measured in the same rounds: the CPU of
# `cat a.qcow2 >/dev/null` (reading the bytes from the page cache) and of
# `cat a.qcow2 | cat >/dev/null`'s first cat (reading them and copying
# them into a pipe: what a server that copies does at least), per GiB.
#
# Then (COUNT=1, default) the server's view of each contender's requests,
# one untimed run each against a fresh counting instance: qemu-nbd with
# its trace events (-T: request types, block status replies, read
# chunks), nbdkit with --filter=stats, qcbt-server with QCBT_DEBUG=1
# (its per-connection request summary).  Reads, block status requests, bytes
# of each, extents answered.
#
# Environment: QCBT, QCBT_SERVER, PLUGIN (default ../build/...), QCBT_BASE
# (another qcbt: its --full and --since join the contenders), N (5),
# SERVERS (space-separated subset of the names above), COUNT (1),
# NODIGEST=1 adds the contender qcbt --full --no-digest, ANCHOR
# (/work/shared/bench).  Output: markdown on stdout; raw records in
# SCRATCH/bench-server-cpu.jsonl and SCRATCH/bench-server-count.jsonl.
set -euo pipefail
S=${1:?usage: bench-server-cpu.sh SCRATCH}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=bench-lib.sh
. "$HERE/bench-lib.sh"
PY=/usr/bin/python3
N=${N:-5}
COUNT=${COUNT:-1}
QCBT=$(readlink -f "${QCBT:-$HERE/../build/client/qcbt}")
[[ -z ${QCBT_BASE:-} ]] || QCBT_BASE=$(readlink -f "$QCBT_BASE")
QCBT_SERVER=$(readlink -f "${QCBT_SERVER:-$HERE/../build/server/qcbt-server}")
PLUGIN=$(readlink -f "${PLUGIN:-$HERE/../build/plugins/qcbt/nbdkit-qcbt-plugin.so}")
SERVERS=${SERVERS:-qemu-nbd qcbt-server nbdkit-qcbt nbdkit-dirty nbdkit-file}
for t in "$QCBT" "$QCBT_SERVER" "$PLUGIN" "$ANCHOR/mkimage.sh" "$ANCHOR/client_pull.py"; do
    [[ -f $t ]] || { echo "bench-server-cpu.sh: missing $t" >&2; exit 1; }
done
for t in qemu-nbd nbdkit nbdcopy; do
    command -v $t >/dev/null || { echo "bench-server-cpu.sh: missing $t" >&2; exit 1; }
done
mkdir -p "$S"
S=$(cd "$S" && pwd)
cd "$S"
bench_images "$S"

pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -f "$S"/cpu-*.sock "$S"/cnt.sock
    rm -rf "$S"/cpu-run "$S"/cpu-out.raw
}
trap cleanup EXIT

# server_cmd NAME SOCK [EXTRA...]: the command line that serves a.qcow2
# (or a.raw) as NAME on SOCK; EXTRA adds counting options (nbdkit: a
# filter, with TAIL, its parameter, after the plugin's).
server_cmd() {
    local name=$1 sock=$2
    shift 2
    case $name in
    qemu-nbd) echo qemu-nbd -r -f qcow2 --persistent --shared=16 -B b0 -k "$sock" "$@" a.qcow2 ;;
    qcbt-server) echo "$QCBT_SERVER" -t -f qcow2 -e 16 -B b0 -k "$sock" "$@" a.qcow2 ;;
    nbdkit-qcbt) echo nbdkit -f -r -U "$sock" "$@" "$PLUGIN" file=a.qcow2 ${TAIL:-} ;;
    nbdkit-dirty) echo nbdkit -f -r -U "$sock" "$@" "$PLUGIN" file=a.qcow2 bitmap=b0 dirty-only=true ${TAIL:-} ;;
    nbdkit-file) echo nbdkit -f -r -U "$sock" "$@" file a.raw ${TAIL:-} ;;
    *) echo "bench-server-cpu.sh: unknown server $name" >&2; return 1 ;;
    esac
}
has_bitmap() { [[ $1 == qemu-nbd || $1 == qcbt-server ]]; }
uri() { printf 'nbd+unix:///?socket=%s' "$1"; }

# The contenders of server NAME on URI, one per line:
# kind<TAB>label<TAB>pre (shell)<TAB>command (shell).
contenders() {
    local name=$1 u=$2
    printf 'full\tqcbt --full\trm -rf cpu-run\t%q backup --json --no-progress --full %q cpu-run\n' "$QCBT" "$u"
    [[ -z ${NODIGEST:-} ]] ||
        printf 'full\tqcbt --full --no-digest\trm -rf cpu-run\t%q backup --json --no-progress --no-digest --full %q cpu-run\n' "$QCBT" "$u"
    [[ -z ${QCBT_BASE:-} ]] ||
        printf 'full\tqcbt-base --full\trm -rf cpu-run\t%q backup --json --no-progress --full %q cpu-run\n' "$QCBT_BASE" "$u"
    printf 'full\tnbdcopy\trm -f cpu-out.raw\tnbdcopy %q cpu-out.raw\n' "$u"
    printf 'full\tnbdcopy --flush\trm -f cpu-out.raw\tnbdcopy --flush %q cpu-out.raw\n' "$u"
    if has_bitmap "$name"; then
        printf 'incremental\tqcbt --since\trm -rf cpu-run && cp -al bk-prep cpu-run\t%q backup --json --no-progress --since b0 %q cpu-run\n' "$QCBT" "$u"
        [[ -z ${QCBT_BASE:-} ]] ||
            printf 'incremental\tqcbt-base --since\trm -rf cpu-run && cp -al bk-prep cpu-run\t%q backup --json --no-progress --since b0 %q cpu-run\n' "$QCBT_BASE" "$u"
        printf 'incremental\tnbdcopy-style pull\trm -f cpu-out.raw\t%q %q %q b0 cpu-out.raw --conns 4 --depth 64 --max-req 262144 --no-hash\n' "$PY" "$ANCHOR/client_pull.py" "$u"
    fi
}

# ---- timing: every server up, contenders interleaved ---------------------
PLAN=$S/bench-server-cpu.plan
: >"$PLAN"
for name in $SERVERS; do
    sock=$S/cpu-$name.sock
    rm -f "$sock"
    # shellcheck disable=SC2046
    $(server_cmd "$name" "$sock") 2>"$S/cpu-$name.log" &
    p=$!
    pids+=($p)
    bench_wait_sock "$sock" $p
    contenders "$name" "$(uri "$sock")" | sed "s|^|$name\t$p\t|" >>"$PLAN"
done
if [[ " $SERVERS " == *" qcbt-server "* || " $SERVERS " == *" qemu-nbd "* ]]; then
    first=$(for n in qcbt-server qemu-nbd; do [[ " $SERVERS " == *" $n "* ]] && echo "$n" && break; done)
    bench_full_prep "$QCBT" "$(uri "$S/cpu-$first.sock")" "$S/bk-prep" "$S/a.qcow2"
fi
cat a.qcow2 >/dev/null # warm the page cache
echo "== $N rounds over: $SERVERS" >&2
"$PY" - "$PLAN" "$N" "$S/bench-server-cpu.jsonl" <<'PYEOF'
import json, os, resource, subprocess, sys, time
plan, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tck = os.sysconf("SC_CLK_TCK")

def srv_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / tck

def kids_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime

cases = []
for line in open(plan):
    server, pid, kind, label, pre, cmd = line.rstrip("\n").split("\t")
    cases.append((server, int(pid), kind, label, pre, cmd))

def floor_runs(rec):
    # cat alone; then the first cat of a pipe (its CPU from wait4)
    c0 = kids_cpu()
    subprocess.run("cat a.qcow2 >/dev/null", shell=True, check=True)
    rec.append({"server": "floor", "kind": "floor", "label": "cat a.qcow2 >/dev/null",
                "srv_cpu": kids_cpu() - c0, "bytes": os.path.getsize("a.qcow2")})
    a = subprocess.Popen(["cat", "a.qcow2"], stdout=subprocess.PIPE)
    b = subprocess.Popen(["cat"], stdin=a.stdout, stdout=subprocess.DEVNULL)
    a.stdout.close()
    _, st, ru = os.wait4(a.pid, 0)
    b.wait()
    a.returncode = 0
    rec.append({"server": "floor", "kind": "floor", "label": "cat a.qcow2, piped to cat (first cat)",
                "srv_cpu": ru.ru_utime + ru.ru_stime, "bytes": os.path.getsize("a.qcow2")})

with open(out, "w") as f:
    for r in range(n):
        recs = []
        floor_runs(recs)
        # Each server's contenders in an order rotated per round, each
        # run after a sync: a run must not pay for the writeback of the
        # one before it, nor always follow the same one.
        order = []
        for srv in dict.fromkeys(c[0] for c in cases):
            mine = [c for c in cases if c[0] == srv]
            order += mine[r % len(mine):] + mine[:r % len(mine)]
        for server, pid, kind, label, pre, cmd in order:
            subprocess.run(pre, shell=True, check=True)
            subprocess.run(["sync"], check=True)
            s0, c0, t0 = srv_cpu(pid), kids_cpu(), time.perf_counter()
            p = subprocess.run(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            t1, c1, s1 = time.perf_counter(), kids_cpu(), srv_cpu(pid)
            if p.returncode:
                sys.exit(f"{server} {label}: exit {p.returncode}: {p.stderr.strip()[-500:]}")
            j = {}
            lines = p.stdout.strip().splitlines()
            if lines and lines[-1].startswith("{"):
                j = json.loads(lines[-1])
            b = j.get("data-bytes", j.get("bytes"))
            recs.append({"server": server, "kind": kind, "label": label, "wall": t1 - t0,
                         "client_cpu": c1 - c0, "srv_cpu": s1 - s0, "bytes": b})
        for x in recs:
            x["round"] = r
            f.write(json.dumps(x) + "\n")
        f.flush()
        print(f"   round {r + 1}/{n} done", file=sys.stderr)
PYEOF
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
pids=()

# ---- counting: the server's view of each contender's requests ------------
CNT=$S/bench-server-count.jsonl
: >"$CNT"
if [[ $COUNT == 1 ]]; then
    printf '%s\n' nbd_co_receive_request_decode_type nbd_co_send_extents \
        nbd_co_send_structured_read nbd_co_send_structured_read_hole >"$S/cnt-events"
    sock=$S/cnt.sock
    for name in $SERVERS; do
        while IFS=$'\t' read -r kind label pre cmd; do
            [[ $label == "nbdcopy --flush" ]] && continue # nbdcopy's requests again
            rm -f "$sock" "$S/cnt.log" "$S/cnt.stats"
            case $name in
            qemu-nbd) extra=(-T "events=$S/cnt-events") ;;
            qcbt-server) extra=() ;;
            *) extra=(--filter=stats) ;;
            esac
            # shellcheck disable=SC2046
            TAIL=statsfile=$S/cnt.stats
            QCBT_DEBUG=1 $(server_cmd "$name" "$sock" "${extra[@]}") 2>"$S/cnt.log" &
            TAIL=
            p=$!
            pids+=($p)
            bench_wait_sock "$sock" $p
            eval "$pre"
            eval "$cmd" >/dev/null
            kill "$p"
            wait "$p" || true
            "$PY" - "$name" "$kind" "$label" "$S/cnt.log" "$S/cnt.stats" >>"$CNT" <<'PYEOF'
import json, os, re, sys
name, kind, label, log, stats = sys.argv[1:6]
c = {"server": name, "kind": kind, "label": label, "reads": 0, "read_bytes": 0,
     "bs": 0, "bs_bytes": None, "extents": None}
unit = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
if name == "qemu-nbd":
    c["extents"], ctx = 0, {}
    for l in open(log):
        if "type = 0 (read)" in l:
            c["reads"] += 1
        elif "(block status)" in l:
            c["bs"] += 1
        elif l.startswith("nbd_co_send_extents"):
            m = re.search(r"extents = (\d+), context = (\d+) \(extents cover (\d+)", l)
            c["extents"] += int(m.group(1))
            ctx[m.group(2)] = ctx.get(m.group(2), 0) + int(m.group(3))
        elif l.startswith("nbd_co_send_structured_read"):
            c["read_bytes"] += int(re.search(r"len = (\d+)", l).group(1))
    c["bs_bytes"] = max(ctx.values(), default=0)  # answered, per context
elif name == "qcbt-server":
    for l in open(log):
        m = re.search(r"served (\d+) reads? \((\d+) bytes\), (\d+) block status "
                      r"\((\d+) bytes asked", l)
        if m:
            c["reads"] += int(m.group(1)); c["read_bytes"] += int(m.group(2))
            c["bs"] += int(m.group(3)); c["bs_bytes"] = (c["bs_bytes"] or 0) + int(m.group(4))
else:
    txt = open(stats).read() if os.path.exists(stats) else ""
    for op, kr, kb in (("read", "reads", "read_bytes"), ("extents", "bs", "bs_bytes")):
        m = re.search(rf"^{op}: (\d+) ops, [0-9.]+ s, ([0-9.]+) (\w+)", txt, re.M)
        if m:
            c[kr], c[kb] = int(m.group(1)), round(float(m.group(2)) * unit[m.group(3)])
print(json.dumps(c))
PYEOF
            pids=("${pids[@]/$p/}")
        done < <(contenders "$name" "$(uri "$sock")")
    done
fi

# ---- report ---------------------------------------------------------------
"$PY" - "$S/bench-server-cpu.jsonl" "$CNT" "$N" <<'PYEOF'
import json, statistics as st, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
cnt = {(c["server"], c["label"]): c for c in map(json.loads, open(sys.argv[2]))}
n = sys.argv[3]
G = 2**30
keys = []
for r in recs:
    k = (r["server"], r["kind"], r["label"])
    if k not in keys:
        keys.append(k)
def runs(k):
    return [r for r in recs if (r["server"], r["kind"], r["label"]) == k]
def nbytes(k):
    # what the client read: qcbt's data-bytes, client_pull's bytes; for
    # nbdcopy (--flush: the same requests) the server's count, else
    # qcbt's of the same server and kind
    b = [r["bytes"] for r in runs(k) if r["bytes"]]
    if b:
        return b[0]
    c = cnt.get((k[0], k[2].replace(" --flush", "")))
    if c and c["read_bytes"]:
        return c["read_bytes"]
    for kk in keys:
        if kk[:2] == k[:2] and kk[2].startswith("qcbt"):
            return nbytes(kk)
    return None
per = {}
print(f"Server CPU per GiB read (utime+stime from /proc/PID/stat around each run), "
      f"median and min-max of {n} interleaved rounds.")
print()
print("| server | case | contender | GiB read | server CPU s | server CPU s/GiB (min-max) | client CPU s | wall s |")
print("|---|---|---|---:|---:|---:|---:|---:|")
for k in keys:
    rr, b = runs(k), nbytes(k)
    cpu = [r["srv_cpu"] for r in rr]
    pg = [x / (b / G) for x in cpu]
    per[k] = st.median(pg)
    cc = st.median([r["client_cpu"] for r in rr]) if "client_cpu" in rr[0] else None
    w = st.median([r["wall"] for r in rr]) if "wall" in rr[0] else None
    print(f"| {k[0]} | {k[1]} | {k[2]} | {b / G:.2f} | {st.median(cpu):.2f} | "
          f"{per[k]:.3f} ({min(pg):.3f}-{max(pg):.3f}) | "
          f"{'' if cc is None else f'{cc:.2f}'} | {'' if w is None else f'{w:.2f}'} |")
print()
print("| server | case | contender | / nbdcopy (server CPU per GiB, medians) |")
print("|---|---|---|---:|")
for k in keys:
    if k[2] in ("qcbt --full", "qcbt --since", "qcbt-base --full", "qcbt-base --since"):
        other = "nbdcopy" if k[1] == "full" else "nbdcopy-style pull"
        o = (k[0], k[1], other)
        if o in per:
            print(f"| {k[0]} | {k[1]} | {k[2]} | {per[k] / per[o]:.2f}x |")
if cnt:
    print()
    print("Requests as the server saw them (one untimed run each, COUNT=1).")
    print()
    print("| server | contender | reads | MiB read | KiB per read | block status | GiB asked/answered | extents | reads per GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in cnt.values():
        kb = c["read_bytes"] / c["reads"] / 1024 if c["reads"] else 0
        bb = "" if c["bs_bytes"] is None else f"{c['bs_bytes'] / G:.1f}"
        ex = "" if c["extents"] is None else c["extents"]
        rpg = c["reads"] / (c["read_bytes"] / G) if c["read_bytes"] else 0
        print(f"| {c['server']} | {c['label']} | {c['reads']} | {c['read_bytes'] / 2**20:.0f} | "
              f"{kb:.0f} | {c['bs']} | {bb} | {ex} | {rpg:.0f} |")
PYEOF
