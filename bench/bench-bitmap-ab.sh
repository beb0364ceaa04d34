#!/bin/bash
# Two qcbt builds and qemu-img, interleaved, on the images of
# bench-bitmap-write.sh (run it first; same SCRATCH_DIR):
#
#   QCBT_A=old/qcbt QCBT_B=new/qcbt bench/bench-bitmap-ab.sh [SCRATCH_DIR]
#
# Env: ROUNDS (default 21).  Each round runs, for each of A, B and
# qemu-img in an order rotated every round, on its own copy of the 1 TiB
# image (ours.qcow2 before the bench's rounds; 1024 L2 tables):
# checkpoint create / bitmap --add, checkpoint delete / --remove, bitmap
# add ck / --add, bitmap remove ck / --remove, --version (the floor); and
# on its own copy of ours-dense.qcow2 (bitmap "dense", 4 KiB, every bit
# set): bitmap merge m dense / --merge dense (m added and removed
# untimed).  Printed: median and minimum wall time (ms) of each.

set -euo pipefail

scratch=${1:-/tmp/qcbt-bench-bmw}
ROUNDS=${ROUNDS:-21}
: "${QCBT_A:?QCBT_A: the first qcbt binary}" "${QCBT_B:?QCBT_B: the second}"
cd "$scratch"
[[ -s ours.qcow2 && -s ours-dense.qcow2 ]] || { echo "run bench/bench-bitmap-write.sh $scratch first"; exit 1; }
# ours.qcow2 after the bench holds no bitmap from its rounds, as before.
who=(A B qemu)
for w in "${who[@]}"; do
    cp ours.qcow2 "ab-$w.qcow2"
    cp ours-dense.qcow2 "ab-$w-dense.qcow2"
done
rm -f ab-t.*

ns() { date +%s%N; }
tt() {
    local f=$1 t0 t1
    shift
    t0=$(ns)
    "$@" >/dev/null
    t1=$(ns)
    echo $((t1 - t0)) >>"ab-t.$f"
}
stat_ms() {
    sort -n "$1" | awk '{ v[NR] = $1 } END {
        m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "median %7.1f ms  min %7.1f ms", m / 1e6, v[1] / 1e6 }'
}
# one KIND R: the three, in an order rotated by R.
one() {
    local kind=$1 r=$2 i w q img
    for ((i = 0; i < 3; i++)); do
        w=${who[$(((i + r) % 3))]}
        img=ab-$w.qcow2
        q=$QCBT_A
        [[ $w == B ]] && q=$QCBT_B
        if [[ $w == qemu ]]; then
            case $kind in
            cc) tt "$w-$kind" qemu-img bitmap --add "$img" "cp$r" ;;
            cd) tt "$w-$kind" qemu-img bitmap --remove "$img" "cp$r" ;;
            ba) tt "$w-$kind" qemu-img bitmap --add "$img" ck ;;
            br) tt "$w-$kind" qemu-img bitmap --remove "$img" ck ;;
            bm) tt "$w-$kind" qemu-img bitmap --merge dense "ab-$w-dense.qcow2" m ;;
            fv) tt "$w-$kind" qemu-img --version ;;
            esac
        else
            case $kind in
            cc) tt "$w-$kind" "$q" checkpoint create "$img" "cp$r" ;;
            cd) tt "$w-$kind" "$q" checkpoint delete "$img" "cp$r" ;;
            ba) tt "$w-$kind" "$q" bitmap add "$img" ck ;;
            br) tt "$w-$kind" "$q" bitmap remove "$img" ck ;;
            bm) tt "$w-$kind" "$q" bitmap merge "ab-$w-dense.qcow2" m dense ;;
            fv) tt "$w-$kind" "$q" --version ;;
            esac
        fi
    done
}
for ((r = 0; r < ROUNDS; r++)); do
    for w in "${who[@]}"; do qemu-img bitmap --add "ab-$w-dense.qcow2" m; done
    for k in cc cd ba br bm fv; do one "$k" "$r"; done
    for w in "${who[@]}"; do qemu-img bitmap --remove "ab-$w-dense.qcow2" m; done
done
echo "$ROUNDS interleaved rounds; A=$QCBT_A B=$QCBT_B"
for k in "cc:checkpoint create / --add" "cd:checkpoint delete / --remove" \
    "ba:bitmap add / --add" "br:bitmap remove / --remove" \
    "bm:bitmap merge (dense 4K into 64K)" "fv:--version (floor)"; do
    echo "${k#*:}"
    for w in "${who[@]}"; do printf '  %-5s %s\n' "$w" "$(stat_ms "ab-t.$w-${k%%:*}")"; done
done
for w in "${who[@]}"; do
    for f in "ab-$w.qcow2" "ab-$w-dense.qcow2"; do
        qemu-img check -q "$f" || { echo "qemu-img check $f failed"; exit 1; }
    done
done
echo "qemu-img check clean"
