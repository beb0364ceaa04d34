#!/bin/bash
# bench-backup-il.sh SCRATCH -- the incrementals of bench-backup.sh, with
# and without the digest index, interleaved: round after round, each
# contender once (warm, then with the previous backup evicted), then the
# floor, so that a loaded machine's drift falls on all of them alike.
#
# Needs SCRATCH prepared by bench-backup.sh (images, bk-prep-{a,f}) and
# QCBT_BASE (a qcbt from before the digest index).  Environment: QCBT,
# QCBT_SERVER, QCBT_BASE, N (rounds, 5).  Output: a markdown table of
# medians (min-max) on stdout.
set -euo pipefail
S=$(cd "${1:?usage: bench-backup-il.sh SCRATCH}" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
N=${N:-5}
QCBT=$(readlink -f "${QCBT:-$HERE/../build/client/qcbt}")
QCBT_SERVER=$(readlink -f "${QCBT_SERVER:-$HERE/../build/server/qcbt-server}")
QCBT_BASE=$(readlink -f "${QCBT_BASE:?set QCBT_BASE}")
for x in a f; do
    [[ -f $S/bk-prep-$x/manifest.json ]] || { echo "bench-backup-il.sh: run bench-backup.sh $S first" >&2; exit 1; }
done
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$S/il-run" "$S/il-floor.raw"' EXIT
for x in a f; do
    img=$([[ $x == a ]] && echo a.qcow2 || echo frag.qcow2)
    bm=$([[ $x == a ]] && echo b0 || echo f0)
    rm -f "$S/il-$x.sock"
    "$QCBT_SERVER" -t -f qcow2 -B "$bm" -k "$S/il-$x.sock" "$S/$img" 2>/dev/null &
    pids+=($!)
    until [[ -S $S/il-$x.sock ]]; do sleep 0.05; done
done

/usr/bin/python3 - "$S" "$N" "$QCBT" "$QCBT_BASE" <<'PYEOF'
import os, statistics, subprocess, sys, time
S, N, new, base = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

def fresh(x):
    subprocess.run(f"rm -rf {S}/il-run && cp -al {S}/bk-prep-{x} {S}/il-run",
                   shell=True, check=True)

def evict():
    for n in os.listdir(f"{S}/il-run"):
        fd = os.open(f"{S}/il-run/{n}", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)

def timed(cmd):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0

res = {}
for x, bm in (("f", "f0"), ("a", "b0")):
    uri = f"nbd+unix:///?socket={S}/il-{x}.sock"
    src = f"{S}/floor-src-{x}.raw"
    for _ in range(N):
        for who, q in (("qcbt", new), ("qcbt-base", base)):
            for mode in ("warm", "evicted"):
                fresh(x)
                if mode == "evicted":
                    evict()
                t = timed([q, "backup", "--no-progress", "--since", bm, uri,
                           f"{S}/il-run"])
                res.setdefault((x, who, mode), []).append(t)
        subprocess.run(f"rm -f {S}/il-floor.raw; cat {src} >/dev/null",
                       shell=True, check=True)
        res.setdefault((x, "floor", ""), []).append(timed(
            ["dd", f"if={src}", f"of={S}/il-floor.raw", "bs=2M",
             "conv=fdatasync", "status=none"]))

f = lambda l: f"{statistics.median(l):.3f} ({min(l):.2f}-{max(l):.2f})"
print(f"| incremental (N={N}, interleaved) | warm s | previous evicted s | warm / floor | evicted / floor |")
print("|---|---:|---:|---:|---:|")
for x, bm in (("f", "f0"), ("a", "b0")):
    fl = statistics.median(res[(x, "floor", "")])
    for who in ("qcbt", "qcbt-base"):
        w, e = res[(x, who, "warm")], res[(x, who, "evicted")]
        print(f"| {x}/{bm} {who} | {f(w)} | {f(e)} | {statistics.median(w)/fl:.2f}x "
              f"| {statistics.median(e)/fl:.2f}x |")
    print(f"| {x}/{bm} floor (dd, fdatasync) | {f(res[(x, 'floor', '')])} | | | |")
PYEOF
