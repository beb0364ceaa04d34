#!/bin/bash
# bench-backup.sh SCRATCH -- qcbt backup vs a virtnbdbackup-style client
# vs nbdcopy, one run, same images, same server (issue 5, "Proof").
#
# Images: the anchor harness's (/work/shared/bench/mkimage.sh, built into
# SCRATCH if missing): a.qcow2 (16 GiB, 4 GiB of data, bitmap b0 with ~5 %
# scattered dirty runs) and frag.qcow2 (4 GiB, bitmap f0 with every other
# 64 KiB granule dirty: the worst case).  Each is served by qcbt-server
# -B b0 / -B f0 on a unix socket in SCRATCH.
#
# Measurements (timeit.py from the anchor harness: median of N=5 after one
# warm-up, wall seconds; page cache warm, as in the anchor's warm runs):
#   incremental, per bitmap:
#     qcbt          qcbt backup --since b0|f0 into a copy (hard links) of a
#                   prepared DIR holding a full backup: the default, with
#                   the guest digest, and --no-digest
#     vnb           bench/bench-backup-vnb.py: virtnbdbackup's client
#                   (python3 nbd, one synchronous request at a time, 32 MiB
#                   max, whole map first, sparse raw output, fsync)
#     qcbt, previous backup evicted
#                   the same, with every file of the prepared DIR evicted
#                   from the page cache first (posix_fadvise DONTNEED via
#                   dd iflag=nocache, as the anchor's COLD rows): the
#                   normal case, qcbt writes backups with FADV_DONTNEED
#     qcbt-base     the same two with QCBT_BASE, a qcbt from before the
#                   digest index (issue 13), when given
#     floor         dd of a file of the incremental's data bytes, in the
#                   page cache, to a new file with conv=fdatasync: reading
#                   the dirty bytes from the page cache, writing them and
#                   making them durable
#     read back     (untimed, one run under strace) bytes pread from the
#                   earlier backup files by qcbt and qcbt-base
#   full copy of a.qcow2:
#     nbdcopy       nbdcopy URI out.raw (and --flush, durable like qcbt)
#     qcbt --full   into an empty DIR (default, and --no-digest)
# Targets: qcbt >= 3x vnb on frag/f0, >= 1.5x on a/b0, >= 0.9x nbdcopy on
# the full copy.
#
# Across a link (first, unless LINK=0; issue 13): link.qcow2 (1 GiB,
# 544 MiB of data, bitmap b0 with ~5 % scattered dirty runs), served by
# qcbt-server behind the anchor's latency_proxy.py (--delay-ms 5 --mbps
# 1000: 10 ms round trip, 1 Gbit/s), N rounds with the contenders
# interleaved (each once per round): qcbt incremental (default
# connections, and --connections 1), qcbt-base, the vnb-style client;
# qcbt --full (both), qcbt-base --full, nbdcopy --flush; and an
# incremental of sparse.qcow2 (256 GiB, 64 dirty runs of 64 KiB, one per
# 4 GiB: bound by the map: 256 windows of 1 GiB, 2 round trips since the
# windows grow on sparse replies) by qcbt, qcbt-base and the
# vnb-style client.  Medians
# against the floor (bytes / rate + 10 round trips: connect, handshake,
# map) and the target (1.1 x bytes / rate + 10 round trips); vnb-style /
# qcbt >= 3x.
#
# Environment: QCBT, QCBT_SERVER (default ../build/{client,server}/),
# QCBT_BASE (optional), N (runs, 5), ANCHOR (/work/shared/bench), KEEP=1
# keeps the outputs, NOFULL=1 skips the full copies, LINK=0 / LOCAL=0
# skip the link / local cases, LINK_DELAY_MS (5), LINK_MBPS (1000).
# Output: a markdown table on stdout; raw records in
# SCRATCH/bench-backup.jsonl.
set -euo pipefail
S=${1:?usage: bench-backup.sh SCRATCH}
HERE=$(cd "$(dirname "$0")" && pwd)
ANCHOR=${ANCHOR:-/work/shared/bench}
PY=/usr/bin/python3
N=${N:-5}
LINK_DELAY_MS=${LINK_DELAY_MS:-5}
LINK_MBPS=${LINK_MBPS:-1000}
QCBT=${QCBT:-$HERE/../build/client/qcbt}
QCBT_SERVER=${QCBT_SERVER:-$HERE/../build/server/qcbt-server}
for t in "$QCBT" "$QCBT_SERVER" "$ANCHOR/timeit.py" "$ANCHOR/mkimage.sh"; do
    [[ -x $t || -f $t ]] || { echo "bench-backup.sh: missing $t" >&2; exit 1; }
done
QCBT=$(readlink -f "$QCBT")
QCBT_SERVER=$(readlink -f "$QCBT_SERVER")
[[ -z ${QCBT_BASE:-} ]] || QCBT_BASE=$(readlink -f "$QCBT_BASE")
mkdir -p "$S"
S=$(cd "$S" && pwd)
cd "$S"


OUT=$S/bench-backup.jsonl
: >"$OUT"
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -f "$S"/bk-a.sock "$S"/bk-f.sock "$S"/bk-[ls].sock "$S"/bk-[ls]p.sock
    [[ -n ${KEEP:-} ]] || rm -rf "$S"/bk-run "$S"/vnb.raw "$S"/nbdcopy.raw "$S"/floor-out.raw "$S"/link-run "$S"/link-out.raw
}
trap cleanup EXIT

# serve NAME IMAGE BITMAP: qcbt-server on $S/bk-NAME.sock; sets PID_NAME.
serve() {
    local sock=$S/bk-$1.sock
    rm -f "$sock"
    "$QCBT_SERVER" -t -f qcow2 -B "$3" -k "$sock" "$S/$2" 2>"$S/bk-$1.log" &
    pids+=($!)
    eval "PID_$1=$!"
    for _ in $(seq 200); do [[ -S $sock ]] && return; sleep 0.05; done
    echo "bench-backup.sh: qcbt-server on $2 did not start" >&2
    exit 1
}
uri() { printf 'nbd+unix:///?socket=%s/bk-%s.sock' "$S" "$1"; }
T() { "$PY" "$ANCHOR/timeit.py" --out "$OUT" -n "$N" -w 1 "$@"; }

# ---- across a link ------------------------------------------------------
[[ ${LINK:-1} == 0 ]] || {
    # link.qcow2: 1 GiB, 544 MiB of data (64 x 8.5 MiB), then bitmap b0 and
    # ~5 % scattered dirty runs of 64 KiB-1 MiB (gen_writes.py, seed 42).
    if [[ ! -f link.qcow2 ]]; then
        echo "== building link.qcow2 in $S" >&2
        qemu-img create -q -f qcow2 -o cluster_size=64k link.tmp.qcow2 1G
        "$PY" "$ANCHOR/gen_writes.py" fill 1G 16M 8704K 0x10 | qemu-io -f qcow2 link.tmp.qcow2 >/dev/null
        qemu-img bitmap --add -g 64K link.tmp.qcow2 b0
        "$PY" "$ANCHOR/gen_writes.py" scatter 1G 42 5 0x80 link.b0.ext | qemu-io -f qcow2 link.tmp.qcow2 >/dev/null
        mv link.tmp.qcow2 link.qcow2
    fi
    # sparse.qcow2: 256 GiB, bitmap b0, 64 dirty runs of 64 KiB, one per
    # 4 GiB: an incremental bound by the map (its round trips).
    if [[ ! -f sparse.qcow2 ]]; then
        qemu-img create -q -f qcow2 -o cluster_size=64k sparse.tmp.qcow2 256G
        qemu-img bitmap --add -g 64K sparse.tmp.qcow2 b0
        for i in $(seq 0 63); do echo "write -q -P $((i + 1)) $((i * 4 + 1))G 64K"; done |
            qemu-io -f qcow2 sparse.tmp.qcow2 >/dev/null
        mv sparse.tmp.qcow2 sparse.qcow2
    fi
    for x in l s; do
        serve $x "$([[ $x == l ]] && echo link.qcow2 || echo sparse.qcow2)" b0
        rm -f "$S/bk-${x}p.sock"
        "$PY" "$ANCHOR/latency_proxy.py" "$S/bk-${x}p.sock" "$S/bk-$x.sock" \
            --delay-ms "$LINK_DELAY_MS" --mbps "$LINK_MBPS" 2>"$S/bk-${x}p.log" &
        pids+=($!)
        for _ in $(seq 200); do [[ -S $S/bk-${x}p.sock ]] && break; sleep 0.05; done
        img=$([[ $x == l ]] && echo link.qcow2 || echo sparse.qcow2)
        if [[ ! -f $S/bk-prep-$x/manifest.json || $S/$img -nt $S/bk-prep-$x/manifest.json ]]; then
            rm -rf "$S/bk-prep-$x"
            echo "== preparing a full backup of $img (untimed)" >&2
            "$QCBT" backup --full --no-progress "$(uri $x)" "$S/bk-prep-$x" >&2
        fi
    done
    echo "== link: ${LINK_DELAY_MS} ms each way, ${LINK_MBPS} Mbit/s, N=$N rounds, contenders interleaved" >&2
    "$PY" - "$S" "$N" "$QCBT" "${QCBT_BASE:-}" "$HERE/bench-backup-vnb.py" \
        "$LINK_DELAY_MS" "$LINK_MBPS" <<'PYEOF'
import json, os, statistics, subprocess, sys, time
S, N, new, base, vnb = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
delay_ms, mbps = float(sys.argv[6]), float(sys.argv[7])
rtt, rate = 2 * delay_ms / 1000, mbps * 1e6 / 8
uri = f"nbd+unix:///?socket={S}/bk-lp.sock"
uri_s = f"nbd+unix:///?socket={S}/bk-sp.sock"

def run(cmd, pre):
    subprocess.run(pre, shell=True, check=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    t = time.perf_counter() - t0
    out = p.stdout.strip().splitlines()
    j = json.loads(out[-1]) if out and out[-1].startswith("{") else {}
    return t, j

fresh = f"rm -rf {S}/link-run && cp -al {S}/bk-prep-l {S}/link-run"
fresh_s = f"rm -rf {S}/link-run && cp -al {S}/bk-prep-s {S}/link-run"
empty = f"rm -rf {S}/link-run {S}/link-out.raw"
cases = []   # (kind, label, cmd, pre)
def qcbt(kind, who, q, extra):
    c = [q, "backup", "--json", "--no-progress"] + extra
    if kind == "incremental":
        cases.append((kind, f"{who} {' '.join(extra)}".strip(), c + ["--since", "b0", uri, f"{S}/link-run"], fresh))
    else:
        cases.append((kind, f"{who} --full {' '.join(extra)}".strip(), c + ["--full", uri, f"{S}/link-run"], empty))
qcbt("incremental", "qcbt", new, [])
qcbt("incremental", "qcbt", new, ["--connections", "1"])
if base:
    qcbt("incremental", "qcbt-base", base, [])
cases.append(("incremental", "vnb-style (python, 1 sync request)",
              ["/usr/bin/python3", vnb, uri, "b0", f"{S}/link-out.raw"], empty))
qcbt("full", "qcbt", new, [])
qcbt("full", "qcbt", new, ["--connections", "1"])
if base:
    qcbt("full", "qcbt-base", base, [])
cases.append(("full", "nbdcopy --flush (4 conns x 64 in flight)",
              ["nbdcopy", "--flush", uri, f"{S}/link-out.raw"], empty))
for who, q in (("qcbt", new), ("qcbt-base", base)):
    if q:
        cases.append(("sparse", who, [q, "backup", "--json", "--no-progress", "--since", "b0",
                                      uri_s, f"{S}/link-run"], fresh_s))
cases.append(("sparse", "vnb-style (python, 1 sync request)",
              ["/usr/bin/python3", vnb, uri_s, "b0", f"{S}/link-out.raw"], empty))

res = {(c[0], c[1]): [] for c in cases}
data = {}
for r in range(N):
    for kind, label, cmd, pre in cases:
        t, j = run(cmd, pre)
        res[(kind, label)].append(t)
        if "data-bytes" in j:
            data[kind] = j["data-bytes"]
        if "bytes" in j and kind not in data:
            data[kind] = j["bytes"]
    print(f"   round {r + 1}/{N} done", file=sys.stderr)
subprocess.run(empty, shell=True, check=True)

print(f"Link: latency_proxy.py --delay-ms {delay_ms:g} --mbps {mbps:g} "
      f"({rtt * 1000:g} ms round trip, {mbps:g} Mbit/s); floor = bytes / rate + "
      f"10 round trips, target = 1.1 x bytes / rate + 10 round trips.")
print()
print("| case | median s | min-max | data bytes | floor s | target s | median / floor | target met |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
med = {}
for kind, label, cmd, pre in cases:
    w = res[(kind, label)]
    m = med[(kind, label)] = statistics.median(w)
    b = data[kind]
    fl = b / rate + 10 * rtt
    tg = 1.1 * b / rate + 10 * rtt
    met = "yes" if m <= tg else "no"
    kname = {"sparse": "256 GiB, 64 x 64 KiB dirty"}.get(kind, kind)
    print(f"| {kname}: {label} | {m:.3f} | {min(w):.3f}-{max(w):.3f} | {b} | {fl:.3f} | {tg:.3f} | {m / fl:.2f}x | {met} |")
print()
V = "vnb-style (python, 1 sync request)"
one = med[("incremental", V)]
print("| comparison | ratio (higher = qcbt faster) | target |")
print("|---|---:|---:|")
for label in ("qcbt", "qcbt --connections 1"):
    r = one / med[("incremental", label)]
    print(f"| incremental: vnb-style / {label} | {r:.2f}x | >= 3x ({'met' if r >= 3 else 'MISSED'}) |")
if base:
    print(f"| incremental: qcbt-base / qcbt | {med[('incremental', 'qcbt-base')] / med[('incremental', 'qcbt')]:.2f}x | |")
    print(f"| full: qcbt-base / qcbt | {med[('full', 'qcbt-base --full')] / med[('full', 'qcbt --full')]:.2f}x | |")
print(f"| full: nbdcopy --flush / qcbt | {med[('full', 'nbdcopy --flush (4 conns x 64 in flight)')] / med[('full', 'qcbt --full')]:.2f}x | |")
print(f"| 256 GiB sparse: vnb-style / qcbt | {med[('sparse', V)] / med[('sparse', 'qcbt')]:.2f}x | |")
if base:
    print(f"| 256 GiB sparse: qcbt-base / qcbt | {med[('sparse', 'qcbt-base')] / med[('sparse', 'qcbt')]:.2f}x | |")
# Where the sparse incremental's time goes: qcbt's QCBT_DEBUG timeline of
# three more (untimed) runs, ms from the start of the command.
print()
for _ in range(3):
    subprocess.run(fresh_s, shell=True, check=True)
    p = subprocess.run([new, "backup", "--no-progress", "--since", "b0", uri_s, f"{S}/link-run"],
                       env=dict(os.environ, QCBT_DEBUG="1"), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in p.stderr.splitlines():
        if "timeline" in line or "debug: connections" in line:
            print(f"    {line}")
subprocess.run(empty, shell=True, check=True)
PYEOF
    kill "$PID_l" "$PID_s" 2>/dev/null || true
}
[[ ${LOCAL:-1} == 0 ]] && exit 0

if [[ ! -f a.qcow2 || ! -f frag.qcow2 ]]; then
    echo "== building the anchor images in $S (mkimage.sh)" >&2
    "$ANCHOR/mkimage.sh" "$S" >&2
fi
serve a a.qcow2 b0
serve f frag.qcow2 f0

# Prepared DIRs with one full backup each (untimed, kept in SCRATCH for
# the next run unless the image is newer); every timed incremental runs
# in a fresh hard-linked copy (the backup never writes the old files: it
# adds a new one and replaces manifest.json by rename).
img_of() { [[ $1 == a ]] && echo a.qcow2 || echo frag.qcow2; }
for x in a f; do
    if [[ ! -f $S/bk-prep-$x/manifest.json || $S/$(img_of $x) -nt $S/bk-prep-$x/manifest.json ]]; then
        rm -rf "$S/bk-prep-$x"
        echo "== preparing a full backup of $x (untimed)" >&2
        "$QCBT" backup --full --no-progress "$(uri $x)" "$S/bk-prep-$x" >&2
    fi
done
fresh() { echo "rm -rf $S/bk-run && cp -al $S/bk-prep-$1 $S/bk-run"; }
# evict: the prepared backup (hard links of the same files) leaves the
# page cache.
evict() { echo "for f in $S/bk-run/*; do dd if=\$f iflag=nocache count=0 status=none; done"; }

# read_back LABEL QCBT X BITMAP: one untimed incremental under strace; the
# bytes pread64 from the earlier backups (bk-run/backup-NNNN.qcow2) and
# from digest indexes, as a JSON line in $S/bench-readback.jsonl.
RB=$S/bench-readback.jsonl
: >"$RB"
read_back() {
    eval "$(fresh "$3")"
    QCBT_DEBUG=1 strace -f -qq -s 0 -e trace=openat,pread64,close -o "$S/rb.strace" \
        "$2" backup --json --no-progress --since "$4" "$(uri "$3")" "$S/bk-run" >"$S/rb.json" 2>"$S/rb.err"
    "$PY" - "$1" "$S/rb.strace" "$S/rb.json" >>"$RB" <<'PYEOF'
import json, re, sys
label, trace, out = sys.argv[1:4]
fds, pending, qcow2, dgi, n = {}, {}, 0, 0, 0
for line in open(trace):
    m = re.match(r"(\d+)\s+(.*)$", line.rstrip())
    if not m:
        continue
    pid, rest = m.groups()
    o = re.match(r'openat\([^,]*, "([^"]*)", .*\)\s+= (\d+)$', rest)
    c = re.match(r"close\((\d+)\)", rest)
    p = re.match(r"pread64\((\d+), (.*)", rest)
    r = re.match(r"<\.\.\. pread64 resumed>.* = (\d+)$", rest)
    if o:
        fds[int(o.group(2))] = o.group(1)
        continue
    if c:
        fds.pop(int(c.group(1)), None)
        continue
    if p:
        fd = int(p.group(1))
        d = re.search(r"\)\s+= (\d+)$", p.group(2))
        if not d:
            pending[pid] = fd
            continue
        k = int(d.group(1))
    elif r and pid in pending:
        fd, k = pending.pop(pid), int(r.group(1))
    else:
        continue
    name = fds.get(fd, "")
    if re.search(r"bk-run/backup-\d{4}\.qcow2$", name):
        qcow2 += k
        n += 1
    elif re.search(r"bk-run/backup-\d{4}\.dgi$", name):
        dgi += k
data = json.loads(open(out).read().splitlines()[-1])["data-bytes"]
print(json.dumps({"label": label, "data": data, "qcow2": qcow2,
                  "preads": n, "dgi": dgi}))
PYEOF
}

for x in f a; do
    bm=$([[ $x == a ]] && echo b0 || echo f0)
    pid=PID_$x
    T --label "$x/$bm qcbt incremental" --pre "$(fresh $x)" --server-pid "${!pid}" -- \
        "$QCBT" backup --json --no-progress --since "$bm" "$(uri $x)" "$S/bk-run"
    T --label "$x/$bm qcbt incremental, previous evicted" --pre "$(fresh $x); $(evict)" --server-pid "${!pid}" -- \
        "$QCBT" backup --json --no-progress --since "$bm" "$(uri $x)" "$S/bk-run"
    read_back "$x/$bm qcbt" "$QCBT" "$x" "$bm"
    if [[ -n ${QCBT_BASE:-} ]]; then
        T --label "$x/$bm qcbt-base incremental" --pre "$(fresh $x)" --server-pid "${!pid}" -- \
            "$QCBT_BASE" backup --json --no-progress --since "$bm" "$(uri $x)" "$S/bk-run"
        T --label "$x/$bm qcbt-base incremental, previous evicted" --pre "$(fresh $x); $(evict)" --server-pid "${!pid}" -- \
            "$QCBT_BASE" backup --json --no-progress --since "$bm" "$(uri $x)" "$S/bk-run"
        read_back "$x/$bm qcbt-base" "$QCBT_BASE" "$x" "$bm"
    fi
    T --label "$x/$bm qcbt incremental --no-digest" --pre "$(fresh $x)" --server-pid "${!pid}" -- \
        "$QCBT" backup --json --no-progress --no-digest --since "$bm" "$(uri $x)" "$S/bk-run"
    # The floor: the incremental's data bytes, from the page cache, written
    # and made durable.
    dbytes=$("$PY" -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["data-bytes"])' "$S/rb.json")
    [[ -f $S/floor-src-$x.raw && $(stat -c %s "$S/floor-src-$x.raw") == "$dbytes" ]] ||
        head -c "$dbytes" "$S/$(img_of $x)" >"$S/floor-src-$x.raw"
    T --label "$x/$bm floor: dd of the data bytes, conv=fdatasync" \
        --pre "rm -f $S/floor-out.raw; cat $S/floor-src-$x.raw >/dev/null" -- \
        dd if="$S/floor-src-$x.raw" of="$S/floor-out.raw" bs=2M conv=fdatasync status=none
    T --label "$x/$bm vnb-style (python, 1 sync request)" --pre "rm -f $S/vnb.raw" --server-pid "${!pid}" -- \
        "$PY" "$HERE/bench-backup-vnb.py" "$(uri $x)" "$bm" "$S/vnb.raw"
done

[[ -n ${NOFULL:-} ]] || {
T --label "a full: nbdcopy" --pre "rm -f $S/nbdcopy.raw" --server-pid "$PID_a" -- \
    nbdcopy "$(uri a)" "$S/nbdcopy.raw"
T --label "a full: nbdcopy --flush" --pre "rm -f $S/nbdcopy.raw" --server-pid "$PID_a" -- \
    nbdcopy --flush "$(uri a)" "$S/nbdcopy.raw"
T --label "a full: qcbt backup --full" --pre "rm -rf $S/bk-run" --server-pid "$PID_a" -- \
    "$QCBT" backup --json --no-progress --full "$(uri a)" "$S/bk-run"
T --label "a full: qcbt backup --full --no-digest" --pre "rm -rf $S/bk-run" --server-pid "$PID_a" -- \
    "$QCBT" backup --json --no-progress --no-digest --full "$(uri a)" "$S/bk-run"
[[ -z ${QCBT_BASE:-} ]] ||
    T --label "a full: qcbt-base backup --full" --pre "rm -rf $S/bk-run" --server-pid "$PID_a" -- \
        "$QCBT_BASE" backup --json --no-progress --full "$(uri a)" "$S/bk-run"
}

# ---- report -------------------------------------------------------------
"$PY" - "$OUT" "$RB" <<'PYEOF'
import json, statistics, sys
recs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    recs[r["label"]] = r
med = lambda l: statistics.median(recs[l]["metrics"]["wall_s"])
def row(label):
    m = recs[label]["metrics"]
    w = m["wall_s"]
    extra = []
    for k in ("data-bytes", "bytes", "requests", "map_s", "pull_s", "seconds"):
        if k in m:
            v = statistics.median(m[k])
            extra.append(f"{k}={v/2**20:.0f}MiB" if k.endswith("bytes") else f"{k}={v:g}")
    srv = statistics.median(m["srv_cpu_s"]) if "srv_cpu_s" in m else 0
    cpu = statistics.median(m["cpu_s"])
    print(f"| {label} | {statistics.median(w):.3f} | {min(w):.3f}-{max(w):.3f} "
          f"| {cpu:.2f} | {srv:.2f} | {' '.join(extra)} |")
print("| measurement | median wall s | min-max | client CPU s | server CPU s | details |")
print("|---|---:|---:|---:|---:|---|")
for l in recs:
    row(l)
print()
print("| comparison | ratio (higher = qcbt faster) | target |")
print("|---|---:|---:|")
for x, bm, tgt in (("f", "f0", 3.0), ("a", "b0", 1.5)):
    vnb = med(f"{x}/{bm} vnb-style (python, 1 sync request)")
    for v in ("", " --no-digest"):
        q = med(f"{x}/{bm} qcbt incremental{v}")
        ok = "met" if vnb / q >= tgt else "MISSED"
        print(f"| {x}/{bm}: vnb-style / qcbt incremental{v} | {vnb / q:.2f}x | >= {tgt}x ({ok}) |")
print()
print("| incremental | wall s: warm / previous evicted | floor s | warm / floor | evicted / floor | read from earlier backups (preads) | digest index read |")
print("|---|---:|---:|---:|---:|---:|---:|")
rb = {}
for line in open(sys.argv[2]):
    r = json.loads(line)
    rb[r["label"]] = r
for x, bm in (("f", "f0"), ("a", "b0")):
    fl = med(f"{x}/{bm} floor: dd of the data bytes, conv=fdatasync")
    for who in ("qcbt", "qcbt-base"):
        if f"{x}/{bm} {who} incremental" not in recs:
            continue
        w = med(f"{x}/{bm} {who} incremental")
        e = med(f"{x}/{bm} {who} incremental, previous evicted")
        r = rb[f"{x}/{bm} {who}"]
        print(f"| {x}/{bm} {who} | {w:.3f} / {e:.3f} | {fl:.3f} | {w/fl:.2f}x | {e/fl:.2f}x "
              f"| {r['qcow2']/2**20:.1f} MiB of {r['data']/2**20:.0f} MiB data ({r['preads']}) "
              f"| {r['dgi']/2**10:.0f} KiB |")
if "a full: nbdcopy" not in recs:
    sys.exit(0)
print()
print("| comparison | ratio (higher = qcbt faster) | target |")
print("|---|---:|---:|")
for n in ("nbdcopy", "nbdcopy --flush"):
    for v in ("", " --no-digest"):
        r = med(f"a full: {n}") / med(f"a full: qcbt backup --full{v}")
        ok = "met" if r >= 0.9 else "MISSED"
        print(f"| a full: {n} / qcbt --full{v} | {r:.2f}x | >= 0.9x ({ok}) |")
PYEOF
