#!/bin/bash
# qcbt convert vs qemu-img convert -O qcow2 on one backing chain, one run
# each (issue 12's convert figure).
#
#   bench/bench-convert.sh [SCRATCH_DIR]   (default /tmp/qcbt-bench-convert)
#
# Env: QCBT (default: <repo>/build/client/qcbt), SIZE_G (virtual size in
# GiB, default 2).
#
# Chain: base <- mid <- top, 64 KiB clusters, SIZE_G GiB virtual; base
# holds data in every other 1 MiB (half the disk), mid rewrites one MiB in
# eight, zeroes one in sixteen and compresses 64 MiB, top rewrites one MiB
# in thirty-two.  Checkpoint X is in all three layers (propagated, 64 KiB
# granularity), Y only in base (tolerant: mid and top contribute their
# allocation).  Compressed and zero writes come first in their qemu-io
# run (QEMU never compresses into an allocated cluster).  The page cache is warmed with the chain first.
#
# Printed: wall time (ms, date +%s%N around each command) of
#   qcbt convert SRC ours.qcow2           (data + merged X and Y)
#   qemu-img convert -O qcow2 SRC a.qcow2 (data only)
#   qemu-img convert -O qcow2 --bitmaps SRC b.qcow2 (data + the top
#                                          layer's bitmaps only)
# and that ours equals the source (qemu-img compare) and is clean.  Floor:
# qemu-img convert on the same machine, same page cache state.

set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
scratch=${1:-/tmp/qcbt-bench-convert}
QCBT=${QCBT:-$here/../build/client/qcbt}
G=${SIZE_G:-2}
mkdir -p "$scratch"
cd "$scratch"
rm -f base.qcow2 mid.qcow2 top.qcow2 ours.qcow2 a.qcow2 b.qcow2

MiB=$((1024 * 1024))
n=$((G * 1024)) # MiB
extra=()
io() {
    local img=$1 step=$2 first=$3 pat=$4 cmds=() m
    for ((m = first; m < n; m += step)); do
        cmds+=(-c "write -P $pat $((m * MiB)) 1M")
    done
    qemu-io -f qcow2 "${extra[@]}" "${cmds[@]}" "$img" >/dev/null
    extra=()
}
qemu-img create -q -f qcow2 base.qcow2 "${G}G"
qemu-img bitmap --add base.qcow2 Y
qemu-img bitmap --add base.qcow2 X
io base.qcow2 2 0 0x11
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
qemu-img bitmap --add mid.qcow2 X
for ((m = 0; m < 64; m++)); do extra+=(-c "write -c -P 0x33 $(((n / 2 + m) * MiB + 65536)) 64k"); done
for ((m = 3; m < n; m += 16)); do extra+=(-c "write -z $((m * MiB)) 1M"); done
io mid.qcow2 8 1 0x22
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
qemu-img bitmap --add top.qcow2 X
io top.qcow2 32 5 0x44
cat base.qcow2 mid.qcow2 top.qcow2 >/dev/null

ms() { echo $(($(date +%s%N) / 1000000)); }
t0=$(ms)
"$QCBT" convert top.qcow2 ours.qcow2 2>/dev/null
t1=$(ms)
qemu-img convert -O qcow2 top.qcow2 a.qcow2
t2=$(ms)
qemu-img convert -O qcow2 --bitmaps top.qcow2 b.qcow2
t3=$(ms)
printf 'chain %d GiB, %d MiB allocated in the files\n' "$G" \
    $(($(du -cm base.qcow2 mid.qcow2 top.qcow2 | tail -n 1 | cut -f1)))
printf '%-44s %6d ms\n' "qcbt convert (data + merged X, Y)" $((t1 - t0)) \
    "qemu-img convert -O qcow2 (data only)" $((t2 - t1)) \
    "qemu-img convert -O qcow2 --bitmaps (top X)" $((t3 - t2))
qemu-img compare -q top.qcow2 ours.qcow2 || { echo "ours differs from the chain"; exit 1; }
qemu-img check -q ours.qcow2 || { echo "qemu-img check ours.qcow2 failed"; exit 1; }
for f in ours a b; do
    printf '%-10s %6d MiB on disk, bitmaps: %s\n' "$f.qcow2" "$(du -m "$f.qcow2" | cut -f1)" \
        "$(qemu-img info --output=json "$f.qcow2" | /usr/bin/python3 -c 'import json,sys; print([b["name"] for b in json.load(sys.stdin)["format-specific"]["data"].get("bitmaps") or []])')"
done
echo "ours equals the chain, qemu-img check clean"
