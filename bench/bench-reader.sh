#!/bin/bash
# Reader throughput: `qcbt cat` vs `qemu-img convert` over a 4 GiB 3-layer
# qcow2 chain, warm page cache.
#
#   bench/bench-reader.sh [SCRATCH_DIR]     (default /tmp/qcbt-bench-reader)
#
# Env: QCBT (default: <repo>/build/client/qcbt), RUNS (default 5).
#
# The chain (deterministic, rebuilt on every run):
#   base.qcow2  2 GiB, every byte written (1 MiB runs, 255 patterns)
#   mid.qcow2   4 GiB virtual (so [2 GiB, 4 GiB) reads past the base),
#               1500 scattered 64 KiB writes, 300 zero clusters, one
#               contiguous 256 MiB write, 200 unaligned 4 KiB writes
#   top.qcow2   4 GiB, 3000 scattered writes of 4-128 KiB, 200 zero writes,
#               200 zero-unmap writes, 100 discards
# Both tools read the whole guest (4 GiB) of top.qcow2: qcbt writes it to
# /dev/null; qemu-img (which cannot write to /dev/null: "Cannot grow device
# files") converts into a null-co node of the same size, which discards.
# One warm-up run each, then RUNS timed runs; median wall time, guest GB/s
# (1 GB = 1e9 bytes), and the qcbt/qemu-img time ratio.  Finally the sha256
# of both output streams is compared once.

set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
scratch=${1:-/tmp/qcbt-bench-reader}
QCBT=${QCBT:-$here/../build/client/qcbt}
RUNS=${RUNS:-5}
PYTHON=/usr/bin/python3
GiB=$((1024 * 1024 * 1024))
SIZE=$((4 * GiB))

die() { echo "bench-reader: $*" >&2; exit 1; }
for t in qemu-img qemu-io sha256sum; do
    command -v "$t" >/dev/null || die "missing $t"
done
[[ -x $QCBT ]] || die "qcbt not found at $QCBT (build it or set QCBT)"
QCBT=$(cd "$(dirname "$QCBT")" && pwd)/$(basename "$QCBT")

mkdir -p "$scratch"
cd "$scratch"
rm -f base.qcow2 mid.qcow2 top.qcow2 ref.raw ./*.cmds

# --- build the chain ----------------------------------------------------------

# gen WHICH > FILE: qemu-io commands (one per line, read from stdin).
gen() {
    "$PYTHON" - "$1" "$SIZE" <<'EOF'
import random, sys
which, size = sys.argv[1], int(sys.argv[2])
K, M = 1024, 1024 * 1024
out = []
if which == "base":
    for i in range(2048):
        out.append(f"write -P {i % 255 + 1} {i * M} {M}")
elif which == "mid":
    rng = random.Random(1001)
    for i in range(1500):
        out.append(f"write -P {0x40 + i % 64} {rng.randrange(size // (64 * K)) * 64 * K} {64 * K}")
    for i in range(300):
        out.append(f"write -z {rng.randrange(size // (64 * K)) * 64 * K} {64 * K}")
    out.append(f"write -P 0x77 {2560 * M} {256 * M}")
    for i in range(200):
        out.append(f"write -P 0x78 {rng.randrange((size - 4 * K) // 512) * 512} {4 * K}")
else:
    rng = random.Random(2002)
    for i in range(3000):
        ln = rng.randrange(8, 257) * 512
        out.append(f"write -P {0x80 + i % 64} {rng.randrange((size - ln) // 512) * 512} {ln}")
    for kind in ("write -z", "write -z -u", "discard"):
        for i in range(200 if kind != "discard" else 100):
            out.append(f"{kind} {rng.randrange(size // (64 * K)) * 64 * K} {64 * K}")
print("\n".join(out))
EOF
}

echo "bench-reader: building the chain in $scratch ..." >&2
t0=$EPOCHREALTIME
qemu-img create -q -f qcow2 base.qcow2 $((2 * GiB))
gen base >base.cmds
qemu-io -f qcow2 base.qcow2 <base.cmds >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 $SIZE
gen mid >mid.cmds
qemu-io -f qcow2 mid.qcow2 <mid.cmds >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 $SIZE
gen top >top.cmds
qemu-io -f qcow2 top.qcow2 <top.cmds >/dev/null
build_s=$("$PYTHON" -c "print(f'{$EPOCHREALTIME - $t0:.1f}')")
echo "bench-reader: built in ${build_s}s" >&2

# --- timing -------------------------------------------------------------------

qcbt_cmd=("$QCBT" cat top.qcow2)
qemu_cmd=(qemu-img convert -n -f qcow2 top.qcow2 --target-image-opts "driver=null-co,size=$SIZE")

# Warm the page cache with the image files themselves.
cat base.qcow2 mid.qcow2 top.qcow2 >/dev/null

# time_runs CMD...: warm-up + $RUNS runs; prints the wall seconds.
time_runs() {
    local i t
    "$@" >/dev/null
    for ((i = 0; i < RUNS; i++)); do
        t=$EPOCHREALTIME
        "$@" >/dev/null
        "$PYTHON" -c "print($EPOCHREALTIME - $t)"
    done
}

echo "bench-reader: timing ($RUNS runs each after a warm-up) ..." >&2
qcbt_times=$(time_runs "${qcbt_cmd[@]}")
qemu_times=$(time_runs "${qemu_cmd[@]}")

# --- byte identity ---------------------------------------------------------------

echo "bench-reader: checking byte identity (sha256) ..." >&2
qcbt_sha=$("${qcbt_cmd[@]}" | sha256sum | cut -d' ' -f1)
qemu-img convert -f qcow2 -O raw top.qcow2 ref.raw
qemu_sha=$(sha256sum ref.raw | cut -d' ' -f1)
rm -f ref.raw

# --- report -------------------------------------------------------------------------

q1="${qcbt_cmd[*]}"
q2="${qemu_cmd[*]}"
"$PYTHON" - "$SIZE" "$RUNS" "$qcbt_times" "$qemu_times" "$qcbt_sha" "$qemu_sha" "$scratch" "$q1" "$q2" \
    "$(qemu-img --version | head -n1)" "$(nproc)" "$(du -sh --apparent-size base.qcow2 mid.qcow2 top.qcow2 | awk '{printf "%s %s, ", $2, $1}')" <<'EOF'
import statistics, sys
size, runs = int(sys.argv[1]), int(sys.argv[2])
qt = [float(x) for x in sys.argv[3].split()]
mt = [float(x) for x in sys.argv[4].split()]
qsha, msha, scratch, c1, c2, qver, ncpu, files = sys.argv[5:13]
mq, mm = statistics.median(qt), statistics.median(mt)
print(f"## qcbt cat vs qemu-img convert ({size / 2**30:.0f} GiB guest, 3-layer qcow2 chain, warm cache)\n")
print(f"{qver}; {ncpu} CPUs; images: {files.rstrip(', ')}\n")
print("| tool | median wall (s) | guest GB/s | runs (s) |")
print("|---|---:|---:|---|")
print(f"| qcbt cat | {mq:.3f} | {size / 1e9 / mq:.2f} | {' '.join(f'{t:.3f}' for t in qt)} |")
print(f"| qemu-img convert | {mm:.3f} | {size / 1e9 / mm:.2f} | {' '.join(f'{t:.3f}' for t in mt)} |")
print(f"\nratio qcbt/qemu-img (time): {mq / mm:.2f}  (< 1 means qcbt is faster)\n")
print(f"commands (in {scratch}), 1 warm-up + {runs} timed runs each:\n")
print(f"    {c1.strip()} > /dev/null")
print(f"    {c2.strip()}")
print(f"\nsha256 qcbt cat:          {qsha}")
print(f"sha256 qemu-img -O raw:   {msha}")
print("byte identity: " + ("OK" if qsha == msha else "MISMATCH"))
sys.exit(0 if qsha == msha else 1)
EOF
