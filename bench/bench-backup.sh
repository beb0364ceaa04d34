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
#   full copy of a.qcow2:
#     nbdcopy       nbdcopy URI out.raw (and --flush, durable like qcbt)
#     qcbt --full   into an empty DIR (default, and --no-digest)
# Targets: qcbt >= 3x vnb on frag/f0, >= 1.5x on a/b0, >= 0.9x nbdcopy on
# the full copy.
#
# Environment: QCBT, QCBT_SERVER (default ../build/{client,server}/),
# N (runs, 5), ANCHOR (/work/shared/bench), KEEP=1 keeps the outputs.
# Output: a markdown table on stdout; raw records in
# SCRATCH/bench-backup.jsonl.
set -euo pipefail
S=${1:?usage: bench-backup.sh SCRATCH}
HERE=$(cd "$(dirname "$0")" && pwd)
ANCHOR=${ANCHOR:-/work/shared/bench}
PY=/usr/bin/python3
N=${N:-5}
QCBT=${QCBT:-$HERE/../build/client/qcbt}
QCBT_SERVER=${QCBT_SERVER:-$HERE/../build/server/qcbt-server}
for t in "$QCBT" "$QCBT_SERVER" "$ANCHOR/timeit.py" "$ANCHOR/mkimage.sh"; do
    [[ -x $t || -f $t ]] || { echo "bench-backup.sh: missing $t" >&2; exit 1; }
done
QCBT=$(readlink -f "$QCBT")
QCBT_SERVER=$(readlink -f "$QCBT_SERVER")
mkdir -p "$S"
S=$(cd "$S" && pwd)
cd "$S"

if [[ ! -f a.qcow2 || ! -f frag.qcow2 ]]; then
    echo "== building the anchor images in $S (mkimage.sh)" >&2
    "$ANCHOR/mkimage.sh" "$S" >&2
fi

OUT=$S/bench-backup.jsonl
: >"$OUT"
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -f "$S"/bk-a.sock "$S"/bk-f.sock
    [[ -n ${KEEP:-} ]] || rm -rf "$S"/bk-run "$S"/vnb.raw "$S"/nbdcopy.raw
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

for x in f a; do
    bm=$([[ $x == a ]] && echo b0 || echo f0)
    pid=PID_$x
    T --label "$x/$bm qcbt incremental" --pre "$(fresh $x)" --server-pid "${!pid}" -- \
        "$QCBT" backup --json --no-progress --since "$bm" "$(uri $x)" "$S/bk-run"
    T --label "$x/$bm qcbt incremental --no-digest" --pre "$(fresh $x)" --server-pid "${!pid}" -- \
        "$QCBT" backup --json --no-progress --no-digest --since "$bm" "$(uri $x)" "$S/bk-run"
    T --label "$x/$bm vnb-style (python, 1 sync request)" --pre "rm -f $S/vnb.raw" --server-pid "${!pid}" -- \
        "$PY" "$HERE/bench-backup-vnb.py" "$(uri $x)" "$bm" "$S/vnb.raw"
done

T --label "a full: nbdcopy" --pre "rm -f $S/nbdcopy.raw" --server-pid "$PID_a" -- \
    nbdcopy "$(uri a)" "$S/nbdcopy.raw"
T --label "a full: nbdcopy --flush" --pre "rm -f $S/nbdcopy.raw" --server-pid "$PID_a" -- \
    nbdcopy --flush "$(uri a)" "$S/nbdcopy.raw"
T --label "a full: qcbt backup --full" --pre "rm -rf $S/bk-run" --server-pid "$PID_a" -- \
    "$QCBT" backup --json --no-progress --full "$(uri a)" "$S/bk-run"
T --label "a full: qcbt backup --full --no-digest" --pre "rm -rf $S/bk-run" --server-pid "$PID_a" -- \
    "$QCBT" backup --json --no-progress --no-digest --full "$(uri a)" "$S/bk-run"

# ---- report -------------------------------------------------------------
"$PY" - "$OUT" <<'PYEOF'
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
for n in ("nbdcopy", "nbdcopy --flush"):
    for v in ("", " --no-digest"):
        r = med(f"a full: {n}") / med(f"a full: qcbt backup --full{v}")
        ok = "met" if r >= 0.9 else "MISSED"
        print(f"| a full: {n} / qcbt --full{v} | {r:.2f}x | >= 0.9x ({ok}) |")
PYEOF
