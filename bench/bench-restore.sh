#!/bin/bash
# bench-restore.sh SCRATCH -- qcbt restore vs qemu-img convert of the same
# backup chain, raw and qcow2 output, with the floor (issue 11).
#
# The backup chain (built once into SCRATCH, untimed): a 1 GiB qcow2 disk
# (64 KiB clusters) with ~560 MiB of data in 1-8 MiB runs, 32 MiB of it
# written as zeros (data clusters that read as zeros) and 4 KiB zero
# blocks inside data runs; a full backup, then two rounds of writes,
# zero writes and discards, each followed by an incremental backup, all
# with `qcbt backup` from `qcbt-server -B` on a unix socket.  D/ holds the
# three backups; the newest file is what qemu-img converts.
#
# Measurements: each variant 1 warm-up, then N=5 runs, interleaved (run 1
# of every variant, then run 2, ...), warm page cache for the inputs, the
# output removed before every run (untimed).  Median and min-max wall
# seconds, CPU seconds of the command, and the output's allocation
# (du -B1) are reported.  Equal durability: qcbt restore fsyncs its
# output (and the directory), so the reference is `qemu-img convert -t
# writeback`, which fdatasyncs the output at close; convert's default
# target cache mode writes without syncing (strace: no fdatasync for
# -O raw) and is shown for information only.
#
#   qcbt restore raw         qcbt restore D out.raw
#   qemu-img convert raw     qemu-img convert -t writeback -f qcow2 -O raw
#                            NEWEST out.raw
#   qemu-img convert raw, no sync (default -t)
#   qcbt restore qcow2       qcbt restore -O qcow2 D out.qcow2
#   qemu-img convert qcow2   qemu-img convert -t writeback -f qcow2
#                            -O qcow2 NEWEST out.qcow2
#   floor: read              cat D/backup-*.qcow2 >/dev/null (every byte
#                            of the backup files, from the page cache)
#   floor: write+sync        cp --sparse=always ref.raw out.raw && sync
#                            out.raw (the restored bytes, from the page
#                            cache, written sparse and fsynced)
# Target: qcbt restore <= qemu-img convert -t writeback, raw and qcow2.
#
# Environment: QCBT, QCBT_SERVER (default ../build/{client,server}/),
# N (runs, 5).  Output: markdown on stdout; raw records in
# SCRATCH/bench-restore.jsonl.
set -euo pipefail
S=${1:?usage: bench-restore.sh SCRATCH}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=/usr/bin/python3
N=${N:-5}
QCBT=${QCBT:-$HERE/../build/client/qcbt}
QCBT_SERVER=${QCBT_SERVER:-$HERE/../build/server/qcbt-server}
for t in "$QCBT" "$QCBT_SERVER"; do
    [[ -x $t ]] || { echo "bench-restore.sh: missing $t" >&2; exit 1; }
done
for t in qemu-img qemu-io nbdinfo; do
    command -v "$t" >/dev/null || { echo "bench-restore.sh: missing $t" >&2; exit 1; }
done
QCBT=$(readlink -f "$QCBT")
QCBT_SERVER=$(readlink -f "$QCBT_SERVER")
mkdir -p "$S"
S=$(cd "$S" && pwd)
cd "$S"

SRV=
cleanup() {
    [[ -z $SRV ]] || { kill "$SRV" 2>/dev/null; wait "$SRV" 2>/dev/null; } || true
    rm -f "$S/rs.sock" "$S/out.raw" "$S/out.qcow2"
}
trap cleanup EXIT

URI="nbd+unix:///?socket=$S/rs.sock"
# serve ARGS...: qcbt-server ARGS on $S/rs.sock, waiting until a client
# can connect (bounded; fails early if the server died).
serve() {
    local i
    rm -f "$S/rs.sock"
    "$QCBT_SERVER" -t -f qcow2 -k "$S/rs.sock" "$@" 2>"$S/rs-server.log" &
    SRV=$!
    for ((i = 0; i < 1200; i++)); do
        nbdinfo --size "$URI" >/dev/null 2>&1 && return 0
        kill -0 "$SRV" 2>/dev/null || { echo "bench-restore.sh: qcbt-server died: $(cat "$S/rs-server.log")" >&2; exit 1; }
        sleep 0.1
    done
    echo "bench-restore.sh: qcbt-server did not accept connections in 120 s" >&2
    exit 1
}
unserve() { kill "$SRV"; wait "$SRV" 2>/dev/null || true; SRV=; }

# round R SEED: qemu-io commands for round R (deterministic).
round() {
    "$PY" - "$@" <<'PYEOF'
import random, sys
r, seed = int(sys.argv[1]), int(sys.argv[2])
rnd = random.Random(seed)
M, SIZE = 1 << 20, 1 << 30
if r == 0:
    # ~530 MiB of data in 1-8 MiB runs, 4 KiB zero blocks inside some
    # runs, and 32 MiB of zeros written as data.
    done = 0
    while done < 530 * M:
        ln = rnd.randrange(1, 9) * M
        off = rnd.randrange(0, (SIZE - ln) // M) * M
        print(f"write -P {rnd.randrange(1, 255)} {off} {ln}")
        for _ in range(rnd.randrange(0, 4)):
            print(f"write -P 0 {off + rnd.randrange(0, ln // 4096) * 4096} 4096")
        done += ln
    print(f"write -P 0 {900 * M} {32 * M}")
else:
    for _ in range(40):
        ln = rnd.randrange(1, 3) * M
        off = rnd.randrange(0, (SIZE - ln) // 4096) * 4096
        print(f"write -P {rnd.randrange(1, 255)} {off} {ln}")
    for _ in range(8):
        off = rnd.randrange(0, SIZE // M - 2) * M
        print(f"write -z {off} {2 * M}")
    for _ in range(8):
        off = rnd.randrange(0, SIZE // M - 2) * M
        print(f"discard {off} {2 * M}")
PYEOF
}

if [[ ! -f D/manifest.json || ! -f ref.raw ]]; then
    echo "== building the backup chain in $S (untimed)" >&2
    rm -rf D src.qcow2 ref.raw
    qemu-img create -q -f qcow2 -o cluster_size=64k src.qcow2 1G
    round 0 42 | qemu-io -f qcow2 src.qcow2 >/dev/null
    qemu-img bitmap --add src.qcow2 c0
    serve -B c0 src.qcow2
    "$QCBT" backup --no-progress --since c0 "$URI" D >&2
    unserve
    for r in 1 2; do
        round "$r" $((42 + r)) | qemu-io -f qcow2 src.qcow2 >/dev/null
        qemu-img bitmap --add src.qcow2 "c$r"
        serve -B "c$((r - 1))" -B "c$r" src.qcow2
        "$QCBT" backup --no-progress --since "c$((r - 1))" "$URI" D >&2
        unserve
    done
    qemu-img convert -f qcow2 -O raw src.qcow2 ref.raw
fi
NEWEST=$(ls D/backup-*.qcow2 | tail -n 1)
echo "== chain: $(ls D/backup-*.qcow2 | tr '\n' ' '); ref.raw allocates $(du -B1 ref.raw | cut -f1) bytes" >&2

# Correctness first (untimed): every output equals the source.
rm -f out.raw out.qcow2
"$QCBT" restore D out.raw >/dev/null
cmp out.raw ref.raw
"$QCBT" restore -O qcow2 D out.qcow2 >/dev/null
qemu-img compare -q -f qcow2 -F raw out.qcow2 ref.raw
rm -f out.raw out.qcow2

OUT=$S/bench-restore.jsonl
: >"$OUT"
"$PY" - "$OUT" "$N" "$S" "$QCBT" "$NEWEST" <<'PYEOF'
import json, os, resource, statistics, subprocess, sys, time
out, n, S, qcbt, newest = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
variants = [
    ("qcbt restore raw", "out.raw", [qcbt, "restore", "D", "out.raw"]),
    ("qemu-img convert -t writeback -O raw", "out.raw",
     ["qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O", "raw", newest, "out.raw"]),
    ("qemu-img convert -O raw (default -t: no sync)", "out.raw",
     ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", newest, "out.raw"]),
    ("qcbt restore -O qcow2", "out.qcow2", [qcbt, "restore", "-O", "qcow2", "D", "out.qcow2"]),
    ("qemu-img convert -t writeback -O qcow2", "out.qcow2",
     ["qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O", "qcow2", newest, "out.qcow2"]),
    ("floor: cat D/backup-*.qcow2 >/dev/null", None,
     ["sh", "-c", "cat D/backup-*.qcow2 >/dev/null"]),
    ("floor: cp --sparse=always ref.raw out.raw && sync out.raw", "out.raw",
     ["sh", "-c", "cp --sparse=always ref.raw out.raw && sync out.raw"]),
]
recs = {v[0]: {"label": v[0], "cmd": " ".join(v[2]), "wall_s": [], "cpu_s": [], "du": []}
        for v in variants}

def run(label, outf, cmd):
    if outf and os.path.exists(outf):
        os.unlink(outf)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        sys.exit(f"{label}: exited {p.returncode}: {p.stderr.decode()[-2000:]}")
    du = int(subprocess.run(["du", "-B1", outf], capture_output=True, text=True)
             .stdout.split()[0]) if outf else 0
    if outf:
        os.unlink(outf)
    return wall, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, du

for v in variants:                       # warm-up, not recorded
    run(*v)
for i in range(n):
    for v in variants:
        w, c, du = run(*v)
        recs[v[0]]["wall_s"].append(w)
        recs[v[0]]["cpu_s"].append(c)
        recs[v[0]]["du"].append(du)
    print(f"round {i + 1}/{n} done", file=sys.stderr)
with open(out, "w") as f:
    for r in recs.values():
        f.write(json.dumps(r) + "\n")

med = lambda l: statistics.median(recs[l]["wall_s"])
print("| measurement | median wall s | min-max | CPU s | output allocated (du -B1) |")
print("|---|---:|---:|---:|---:|")
for l, r in recs.items():
    w = r["wall_s"]
    du = f"{statistics.median(r['du']) / 1e6:.1f} MB" if r["du"][0] else "-"
    print(f"| {l} | {statistics.median(w):.3f} | {min(w):.3f}-{max(w):.3f} "
          f"| {statistics.median(r['cpu_s']):.2f} | {du} |")
print()
print("| comparison | ratio (>= 1: qcbt as fast or faster) | target |")
print("|---|---:|---:|")
for q, ref in (("qcbt restore raw", "qemu-img convert -t writeback -O raw"),
               ("qcbt restore -O qcow2", "qemu-img convert -t writeback -O qcow2")):
    x = med(ref) / med(q)
    print(f"| {ref} / {q} | {x:.2f}x | >= 1.0x ({'met' if x >= 1 else 'MISSED'}) |")
PYEOF
