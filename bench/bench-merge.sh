#!/bin/bash
# Bitmap load + merge time: `qcbt bitmap dump/check/sha256` over a 10-layer
# qcow2 chain of 16 TiB virtual disks whose bitmaps are fully populated.
#
#   bench/bench-merge.sh [SCRATCH_DIR]      (default /tmp/qcbt-bench-merge)
#
# Env: QCBT (default: <repo>/build/client/qcbt), RUNS (default 5),
#      KEEP=1 keeps the images (they are rebuilt unless REUSE=1).
#
# The chain (deterministic; ~2 GB of scratch, ~1-2 min to build):
#   l9.qcow2 (base) <- l8 <- ... <- l0.qcow2 (top), 16 TiB each, 64 KiB
#   clusters; bitmap X (64 KiB granularity) added to every layer right after
#   it is created (libvirt's rule); then in every layer one 4 KiB write in
#   every 16 GiB of the disk (1024 writes per layer, offsets varying by layer)
#   -> each X is 256 Mi bits = 32 MiB, in 512 bitmap data clusters of
#   32 GiB each, every one of them allocated (two set bits per cluster).
#   l0p.qcow2: one more overlay on top of l0 made with plain qemu-img create
#   -b (no bitmap) and the same kind of writes: tolerant mode falls back to
#   its allocation map.
#
# Measured (warm page cache: one untimed warm-up run each, then RUNS timed
# runs under /usr/bin/time): median/min/max wall time and peak RSS of
#   qcbt bitmap check l0.qcow2 X          (load + merge 10 bitmaps)
#   qcbt bitmap dump --json l0.qcow2 X    (+ extents out)
#   qcbt bitmap sha256 l0.qcow2 X         (+ digest of 32 MiB)
#   the same with --strict, and on l0p.qcow2 (tolerant, allocation fallback)
# Target: < 1 s warm.  Correctness is checked once: the dump equals the
# union computed from the write pattern, and sha256 --layer 0 equals QEMU's
# x-debug-block-dirty-bitmap-sha256 (read-only qemu-storage-daemon).

set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
scratch=${1:-/tmp/qcbt-bench-merge}
QCBT=${QCBT:-$here/../build/client/qcbt}
RUNS=${RUNS:-5}
PYTHON=/usr/bin/python3
MODEL=$here/../tests/interop/bitmap-model.py
TiB=$((1024 * 1024 * 1024 * 1024))
SIZE=$((16 * TiB))
LAYERS=10

die() { echo "bench-merge: $*" >&2; exit 1; }
for t in qemu-img qemu-io qemu-storage-daemon /usr/bin/time; do
    command -v "$t" >/dev/null || die "missing $t"
done
[[ -x $QCBT ]] || die "qcbt not found at $QCBT (build it or set QCBT)"
QCBT=$(cd "$(dirname "$QCBT")" && pwd)/$(basename "$QCBT")
"$QCBT" bitmap --help >/dev/null 2>&1 || die "$QCBT has no 'bitmap' command"

mkdir -p "$scratch"
cd "$scratch"

# gen LAYER: qemu-io commands, one 4 KiB write in every 16 GiB.
gen() {
    "$PYTHON" - "$1" "$SIZE" <<'EOF'
import sys
layer, size = int(sys.argv[1]), int(sys.argv[2])
step = 16 << 30
for m in range(size // step):
    slot = (m * 7919 + layer * 104729) % (step // 65536)
    off = m * step + slot * 65536 + (layer % 4) * 512
    print("write -q -P 0x%02x %d 4096" % (0x10 + layer, off))
EOF
}

# expected: the union of the writes of layers FIRST..LAST at 64 KiB.
expected() {
    "$PYTHON" - "$SIZE" "$@" <<'EOF'
import json, sys
size, layers = int(sys.argv[1]), [int(a) for a in sys.argv[2:]]
step, g = 16 << 30, 65536
bits = set()
for layer in layers:
    for m in range(size // step):
        slot = (m * 7919 + layer * 104729) % (step // 65536)
        off = m * step + slot * 65536 + (layer % 4) * 512
        bits.update(range(off // g, (off + 4096 + g - 1) // g))
ext, pos = [], 0
for b in sorted(bits):
    a = b * g
    if ext and ext[-1]["type"] == 1 and ext[-1]["offset"] + ext[-1]["length"] == a:
        ext[-1]["length"] += g
        pos = a + g
        continue
    if a > pos:
        ext.append({"offset": pos, "length": a - pos, "type": 0, "description": "clean"})
    ext.append({"offset": a, "length": g, "type": 1, "description": "dirty"})
    pos = a + g
if pos < size:
    ext.append({"offset": pos, "length": size - pos, "type": 0, "description": "clean"})
print(json.dumps(ext))
EOF
}

if [[ ${REUSE:-} != 1 || ! -f l0p.qcow2 ]]; then
    rm -f l*.qcow2
    t0=$SECONDS
    below=
    for ((i = LAYERS - 1; i >= 0; i--)); do
        img=l$i.qcow2
        if [[ -z $below ]]; then
            qemu-img create -q -f qcow2 -o cluster_size=64k "$img" "$SIZE"
        else
            qemu-img create -q -f qcow2 -o cluster_size=64k -b "$below" -F qcow2 "$img" "$SIZE"
        fi
        qemu-img bitmap --add -g 64K "$img" X
        gen "$i" | qemu-io -f qcow2 "$img" >/dev/null
        below=$img
    done
    qemu-img create -q -f qcow2 -o cluster_size=64k -b l0.qcow2 -F qcow2 l0p.qcow2 "$SIZE"
    gen 10 | qemu-io -f qcow2 l0p.qcow2 >/dev/null
    echo "built the chain in $((SECONDS - t0)) s: $(du -shc l*.qcow2 | tail -n 1 | cut -f1) on disk" >&2
fi
qemu-img info -U l0.qcow2 | grep -q 'name: X' || die "l0.qcow2 has no bitmap X"

# --- correctness, once ------------------------------------------------------------

"$QCBT" bitmap dump --json l0.qcow2 X >dump-l0.json
expected 0 1 2 3 4 5 6 7 8 9 >expected-l0.json
"$PYTHON" "$MODEL" compare --context "bench l0 X" expected-l0.json dump-l0.json ||
    die "qcbt bitmap dump l0.qcow2 X differs from the write pattern"
"$QCBT" bitmap dump --json l0p.qcow2 X >dump-l0p.json
expected 0 1 2 3 4 5 6 7 8 9 10 >expected-l0p.json # l0p: 64 KiB clusters = bits
"$PYTHON" "$MODEL" compare --context "bench l0p X" expected-l0p.json dump-l0p.json ||
    die "qcbt bitmap dump l0p.qcow2 X (tolerant) differs from the write pattern"
ndirty=$("$PYTHON" -c 'import json,sys; print(sum(1 for e in json.load(open(sys.argv[1])) if e["type"]))' dump-l0.json)
q=$("$PYTHON" "$MODEL" qemu-sha256 --alone l0.qcow2 X | cut -d' ' -f2)
s=$("$QCBT" bitmap sha256 --layer 0 l0.qcow2 X)
[[ $q == "$s" ]] || die "sha256 --layer 0: qcbt $s, QEMU $q"
echo "correctness: dumps of l0 and l0p = union of the layers' writes ($ndirty dirty runs in l0); sha256 --layer 0 = QEMU's" >&2

# --- timing ---------------------------------------------------------------------------

# measure LABEL CMD...: warm-up, then RUNS runs; prints one table row.
measure() {
    local label=$1 i
    shift
    "$@" >/dev/null 2>warmup.err || die "$* failed: $(cat warmup.err)"
    : >times.txt
    for ((i = 0; i < RUNS; i++)); do
        /usr/bin/time -f '%e %M %U %S' -o time.out "$@" >/dev/null 2>&1
        cat time.out >>times.txt
    done
    "$PYTHON" - "$label" times.txt <<'EOF'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[2]) if l.strip()]
wall = [r[0] for r in rows]; rss = [r[1] for r in rows]; cpu = [r[2] + r[3] for r in rows]
print("| %s | %.3f | %.3f | %.3f | %.3f | %.1f |" % (
    sys.argv[1], statistics.median(wall), min(wall), max(wall),
    statistics.median(cpu), max(rss) / 1024))
EOF
}

echo
echo "### qcbt bitmap load + merge: 10 layers x 16 TiB, 64 KiB granularity"
echo
echo "Each layer's X: 268,435,456 bits (32 MiB) in 512 allocated bitmap data clusters."
echo "Warm page cache, $RUNS runs after one warm-up; wall and CPU in seconds."
echo
echo "| command | median wall | min | max | median CPU | peak RSS (MiB) |"
echo "|---|---:|---:|---:|---:|---:|"
measure "bitmap check l0 X (tolerant)" "$QCBT" bitmap check l0.qcow2 X
measure "bitmap check --strict l0 X" "$QCBT" bitmap check --strict l0.qcow2 X
measure "bitmap dump --json l0 X" "$QCBT" bitmap dump --json l0.qcow2 X
measure "bitmap dump l0 X (text)" "$QCBT" bitmap dump l0.qcow2 X
measure "bitmap sha256 l0 X" "$QCBT" bitmap sha256 l0.qcow2 X
measure "bitmap sha256 --layer 9 l0 X" "$QCBT" bitmap sha256 --layer 9 l0.qcow2 X
measure "bitmap list --json l0" "$QCBT" bitmap list --json l0.qcow2
measure "bitmap check l0p X (alloc fallback)" "$QCBT" bitmap check l0p.qcow2 X
measure "bitmap dump --json l0p X (alloc fallback)" "$QCBT" bitmap dump --json l0p.qcow2 X
echo
echo "Commands (in $scratch):"
echo
echo '    bench/bench-merge.sh '"$scratch"
echo "    $QCBT bitmap check l0.qcow2 X"
echo "    $QCBT bitmap dump --json l0.qcow2 X > /dev/null"
echo "    /usr/bin/time -f '%e s %M KiB' $QCBT bitmap sha256 l0.qcow2 X"
echo
echo "Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(uname -r)"
echo "qemu: $(qemu-img --version | head -n 1)"
bt=$(sed -n 's/^CMAKE_BUILD_TYPE:STRING=//p' "$(dirname "$QCBT")/../CMakeCache.txt" 2>/dev/null || true)
echo "qcbt: $QCBT${bt:+ (CMAKE_BUILD_TYPE $bt)}"

if [[ -z ${KEEP:-} ]]; then
    cd /
    rm -rf "$scratch"
fi
