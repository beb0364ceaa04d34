#!/bin/bash
# qcbt bitmap add/merge/clear/remove vs qemu-img bitmap on a 1 TiB image,
# one run each (issue 12's figures).
#
#   bench/bench-bitmap-write.sh [SCRATCH_DIR]   (default /tmp/qcbt-bench-bmw)
#
# Env: QCBT (default: <repo>/build/client/qcbt).
#
# Images: two copies of a 1 TiB qcow2 (64 KiB clusters) with bitmap "src"
# (64 KiB granularity) holding one 4 KiB write in every GiB (1024 set bits,
# 32 bitmap data clusters); qcbt works on one copy, qemu-img on the other,
# the same operations in the same order:
#   add ck            (empty bitmap, default granularity)
#   add -g 512 fine   (the largest table: 4096 entries, 32 KiB)
#   merge src -> ck   (32 data clusters written)
#   clear ck, remove fine, remove ck
# Printed: wall time of each (ms, date +%s%N around the command), and a
# check that both copies end with the same bitmaps and qemu-img check is
# clean.  Floor: qemu-img on the same machine, same page cache state.
#
# Two more copies (ours-dense, theirs-dense) also hold "dense" (4 KiB
# granularity, every bit set: 32 MiB in 512 data clusters), merged in
# from a 2 MiB-cluster image zeroed whole by qemu-io (kept in the scratch
# dir; the first run takes ~15 s more for it).
#
# Then checkpoints, ROUNDS (default 21) interleaved rounds on the same two
# copies, the first to run alternating: `qcbt checkpoint create` vs
# `qemu-img bitmap --add` (the same bitmap: enabled, 64 KiB), then
# `qcbt checkpoint delete` vs `qemu-img bitmap --remove`, then (between
# an untimed add and remove of "m") `qcbt bitmap merge IMG m dense` vs
# `qemu-img bitmap --merge dense IMG m` on the dense copies (the dense
# source into 64 KiB: 32 MiB read, 2 MiB written; qemu-img also loads
# and rewrites "dense" itself, as it does every bitmap); median and minimum of each, and the
# process floor (`qcbt --version`, `qemu-img --version`) measured the
# same way.

set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
scratch=${1:-/tmp/qcbt-bench-bmw}
ROUNDS=${ROUNDS:-21}
QCBT=${QCBT:-$here/../build/client/qcbt}
mkdir -p "$scratch"
cd "$scratch"
rm -f ours.qcow2 theirs.qcow2 ours-dense.qcow2 theirs-dense.qcow2

qemu-img create -q -f qcow2 ours.qcow2 1T
qemu-img bitmap --add ours.qcow2 src
cmds=()
for ((g = 0; g < 1024; g++)); do cmds+=(-c "write $((g * 1024 * 1024 * 1024)) 4k"); done
qemu-io "${cmds[@]}" ours.qcow2 >/dev/null
if [[ ! -s dense-src.qcow2 ]]; then
    qemu-img create -q -f qcow2 -o cluster_size=2M dense-src.tmp 1T
    qemu-img bitmap --add -g 4K dense-src.tmp src
    cmds=()
    for ((g = 0; g < 1024; g++)); do cmds+=(-c "write -z $((g * 1024 * 1024 * 1024)) 1G"); done
    qemu-io "${cmds[@]}" dense-src.tmp >/dev/null
    mv dense-src.tmp dense-src.qcow2
fi
cp ours.qcow2 theirs.qcow2
cp ours.qcow2 ours-dense.qcow2
qemu-img bitmap --add -g 4K ours-dense.qcow2 dense
qemu-img bitmap --merge src -b dense-src.qcow2 ours-dense.qcow2 dense
cp ours-dense.qcow2 theirs-dense.qcow2

ms() { echo $(($(date +%s%N) / 1000000)); }
row() {
    local what=$1 t0 t1 t2
    shift
    local ours=() theirs=()
    while [[ $1 != -- ]]; do ours+=("$1"); shift; done
    shift
    theirs=("$@")
    t0=$(ms)
    "$QCBT" bitmap "${ours[@]}"
    t1=$(ms)
    qemu-img bitmap "${theirs[@]}"
    t2=$(ms)
    printf '%-22s qcbt %5d ms   qemu-img %5d ms\n' "$what" $((t1 - t0)) $((t2 - t1))
}
row "add ck" add ours.qcow2 ck -- --add theirs.qcow2 ck
row "add -g 512 fine" add -g 512 ours.qcow2 fine -- --add -g 512 theirs.qcow2 fine
row "merge src into ck" merge ours.qcow2 ck src -- --merge src theirs.qcow2 ck
row "clear ck" clear ours.qcow2 ck -- --clear theirs.qcow2 ck
row "remove fine" remove ours.qcow2 fine -- --remove theirs.qcow2 fine
row "remove ck" remove ours.qcow2 ck -- --remove theirs.qcow2 ck

for f in ours theirs; do
    qemu-img check -q "$f.qcow2" || { echo "qemu-img check $f.qcow2 failed"; exit 1; }
    qemu-img info --output=json "$f.qcow2" |
        /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["format-specific"]["data"].get("bitmaps"))' >"$f.bm"
done
cmp -s ours.bm theirs.bm || { echo "bitmaps differ: $(cat ours.bm) vs $(cat theirs.bm)"; exit 1; }
echo "same bitmaps, qemu-img check clean"

# --- checkpoints: interleaved rounds, medians ---------------------------------

ns() { date +%s%N; }
# stat FILE: "median min" in ms (3 decimals) of the nanosecond samples.
stat_ms() {
    sort -n "$1" | awk '{ v[NR] = $1 } END {
        m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "median %8.3f ms  min %8.3f ms", m / 1e6, v[1] / 1e6 }'
}
# time_to FILE CMD...: append CMD's wall time (ns) to FILE.
time_to() {
    local f=$1 t0 t1
    shift
    t0=$(ns)
    "$@" >/dev/null
    t1=$(ns)
    echo $((t1 - t0)) >>"$f"
}
rm -f t.*
for ((r = 0; r < ROUNDS; r++)); do
    ours_c=("$QCBT" checkpoint create ours.qcow2 "cp$r")
    theirs_c=(qemu-img bitmap --add theirs.qcow2 "cp$r")
    ours_d=("$QCBT" checkpoint delete ours.qcow2 "cp$r")
    theirs_d=(qemu-img bitmap --remove theirs.qcow2 "cp$r")
    ours_m=("$QCBT" bitmap merge ours-dense.qcow2 m dense)
    theirs_m=(qemu-img bitmap --merge dense theirs-dense.qcow2 m)
    qemu-img bitmap --add ours-dense.qcow2 m
    qemu-img bitmap --add theirs-dense.qcow2 m
    if ((r % 2)); then
        time_to t.qc "${ours_c[@]}"
        time_to t.qi "${theirs_c[@]}"
        time_to t.qd "${ours_d[@]}"
        time_to t.qr "${theirs_d[@]}"
        time_to t.qm "${ours_m[@]}"
        time_to t.im "${theirs_m[@]}"
        time_to t.qv "$QCBT" --version
        time_to t.iv qemu-img --version
    else
        time_to t.qi "${theirs_c[@]}"
        time_to t.qc "${ours_c[@]}"
        time_to t.qr "${theirs_d[@]}"
        time_to t.qd "${ours_d[@]}"
        time_to t.im "${theirs_m[@]}"
        time_to t.qm "${ours_m[@]}"
        time_to t.iv qemu-img --version
        time_to t.qv "$QCBT" --version
    fi
    qemu-img bitmap --remove ours-dense.qcow2 m
    qemu-img bitmap --remove theirs-dense.qcow2 m
done
echo "1 TiB image, $ROUNDS interleaved rounds:"
printf '  %-34s %s\n' "qcbt checkpoint create" "$(stat_ms t.qc)"
printf '  %-34s %s\n' "qemu-img bitmap --add" "$(stat_ms t.qi)"
printf '  %-34s %s\n' "qcbt checkpoint delete" "$(stat_ms t.qd)"
printf '  %-34s %s\n' "qemu-img bitmap --remove" "$(stat_ms t.qr)"
printf '  %-34s %s\n' "qcbt bitmap merge (dense 4K->64K)" "$(stat_ms t.qm)"
printf '  %-34s %s\n' "qemu-img bitmap --merge" "$(stat_ms t.im)"
printf '  %-34s %s\n' "floor: qcbt --version" "$(stat_ms t.qv)"
printf '  %-34s %s\n' "floor: qemu-img --version" "$(stat_ms t.iv)"
for f in ours theirs ours-dense theirs-dense; do
    qemu-img check -q "$f.qcow2" || { echo "qemu-img check $f.qcow2 failed"; exit 1; }
    qemu-img info --output=json "$f.qcow2" |
        /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["format-specific"]["data"].get("bitmaps"))' >"$f.bm"
done
cmp -s ours-dense.bm theirs-dense.bm || { echo "dense copies differ after the rounds"; exit 1; }
cmp -s ours.bm theirs.bm || { echo "bitmaps differ after the rounds: $(cat ours.bm) vs $(cat theirs.bm)"; exit 1; }
echo "same bitmaps after the rounds, qemu-img check clean"
