#!/bin/bash
# Chain merge: `qcbt bitmap dump/check/sha256` (strict and tolerant) on
# backing chains built with qemu-img/qemu-io, against
#   * QEMU's own union for chains QEMU can merge: a fresh disabled bitmap in
#     a copy of the top filled by `qemu-img bitmap --merge NAME -b LAYER`
#     from every layer, exported by qemu-nbd -B, and its
#     x-debug-block-dirty-bitmap-sha256 digest;
#   * bitmap-model.py (per-layer QEMU facts + DESIGN.md's merge rules) for
#     everything, including the tolerant fallbacks QEMU cannot compute;
#   * the refusal rules (exit 2, the rule and layer named on stderr).
# Cases: valid 3/4-layer chains (mixed cluster sizes), overlays made without
# the bitmap (top, middle, all), gaps, in-use bitmaps in the top, middle and
# deepest layer, the name missing everywhere, mixed granularities both ways,
# disabled bitmaps, a raw base, a layer whose bitmaps extension QEMU ignores
# (autoclear bit clear), other bitmaps around.
#
# QCBT_KEEP_TMP=1 keeps the images.  QCBT_CASES=REGEX runs matching cases.

# shellcheck source=../functions.sh
. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo sha256sum
requires qemu-storage-daemon
# shellcheck source=bitmap-lib.sh
. "$TESTS_DIR/interop/bitmap-lib.sh"

SIZE=$((48 * MiB + 1536)) # not a multiple of any granularity above 512

# mk IMG [BACKING] [CLUSTER]: a qcow2 layer of $SIZE.
mk() {
    local img=$1 backing=${2:-} c=${3:-65536} bopt=()
    [[ -n $backing ]] && bopt=(-b "$backing" -F "$(fmt_of "$backing")")
    run qemu-img create -q -f qcow2 -o cluster_size="$c" "${bopt[@]}" "$img" "$SIZE"
}
fmt_of() { [[ $1 == *.raw ]] && echo raw || echo qcow2; }

# bm IMG NAME GRAN [--disable]: qemu-img bitmap --add.
bm() {
    local d=()
    [[ -n ${4:-} ]] && d=("$4")
    run qemu-img bitmap --add "${d[@]}" -g "$3" "$1" "$2"
}

# writes IMG I: deterministic writes for layer number I (0 = base), mixing
# data, zero writes (-z and -z -u), a discard of data an earlier layer
# wrote, sub-granule writes, ranges overlapping other layers' writes, and
# the last byte of the disk for I = 3.
writes() {
    local img=$1 i=$2 p
    p=$(printf '0x%02x' $((0x40 + i)))
    local c=(
        -c "write -P $p $((i * MiB + i * 4096 + 100)) $((5000 + i * 3000))"
        -c "write -P $p $((6 * MiB + i * 96 * KiB)) $((160 * KiB))"
        -c "write -z $(((8 + i) * MiB)) $((64 * KiB + i * 4096))"
        -c "write -z -u $(((12 + 2 * i) * MiB + 512)) $((3 * 64 * KiB))"
        -c "discard $(((16 + i) * MiB)) $((128 * KiB))"
        -c "write -P $p $((20 * MiB + i * 70 * KiB)) 1"
        -c "write -P $p $((30 * MiB + i * 32 * KiB)) $((40 * KiB))"
        -c "write -P $p $(((33 + 3 * i) * MiB - 512)) 1024"
    )
    ((i == 0)) && c+=(-c "write -P 0x3f $((16 * MiB)) $((6 * MiB))") # discarded above
    ((i == 3)) && c+=(-c "write -P $p $((SIZE - 1)) 1")
    run qemu-io -f qcow2 "${c[@]}" "$img"
}

# base IMG GRAN [CLUSTER]: base layer: untracked data, then bitmap X, writes.
base() {
    mk "$1" "" "${3:-65536}"
    run qemu-io -f qcow2 -c "write -P 0x33 0 $((4 * MiB))" -c "write -P 0x34 $((40 * MiB)) $((2 * MiB))" "$1"
    bm "$1" X "$2"
    writes "$1" 0
}

# overlay IMG BACKING I GRAN|plain [CLUSTER]: libvirt-style overlay with X
# added right after creation, or a plain one (no bitmap); then writes.
overlay() {
    mk "$1" "$2" "${5:-65536}"
    [[ $4 == plain ]] || bm "$1" X "$4"
    writes "$1" "$3"
}

check() { # check TOP STRICT TOLERANT
    local rc=0
    verify_merge "$1" X "$2" "$3" || rc=1
    case_result "$rc"
}

# --- valid chains -------------------------------------------------------------

if want valid-3; then
    begin_case valid-3
    base base.qcow2 65536
    overlay mid.qcow2 base.qcow2 1 65536
    overlay top.qcow2 mid.qcow2 2 65536
    check top.qcow2 ok ok
fi

if want valid-3-clusters; then
    begin_case valid-3-clusters
    base base.qcow2 65536 4096
    overlay mid.qcow2 base.qcow2 1 65536 512
    overlay top.qcow2 mid.qcow2 2 65536 $((2 * MiB))
    check top.qcow2 ok ok
fi

if want valid-4-other-bitmaps; then
    begin_case valid-4-other-bitmaps
    base l3.qcow2 4096
    bm l3.qcow2 other 512
    overlay l2.qcow2 l3.qcow2 1 4096
    bm l2.qcow2 Y 65536
    overlay l1.qcow2 l2.qcow2 2 4096
    bm l1.qcow2 Z $((1 * MiB)) --disable
    overlay l0.qcow2 l1.qcow2 3 4096
    bm l0.qcow2 other 65536
    run qemu-io -f qcow2 -c "write -P 0x5e $((44 * MiB)) 4096" l0.qcow2
    check l0.qcow2 ok ok
fi

# --- mixed granularities (result granularity = the top bitmap's) ------------

for spec in 65536:65536:4096 4096:4096:65536 $((1 * MiB)):512:65536 512:$((1 * MiB)):4096; do
    IFS=: read -r g2 g1 g0 <<<"$spec"
    want "mixgran-$g2-$g1-$g0" || continue
    begin_case "mixgran-$g2-$g1-$g0"
    base base.qcow2 "$g2"
    overlay mid.qcow2 base.qcow2 1 "$g1"
    overlay top.qcow2 mid.qcow2 2 "$g0"
    check top.qcow2 ok ok
done

# --- disabled bitmaps ---------------------------------------------------------

if want disabled; then
    begin_case disabled
    base base.qcow2 65536
    run qemu-img bitmap --disable base.qcow2 X
    run qemu-io -f qcow2 -c "write -P 0x61 $((3 * MiB)) 64k" base.qcow2 # not recorded
    mk mid.qcow2 base.qcow2
    bm mid.qcow2 X 65536 --disable # disabled from the start: stays empty
    writes mid.qcow2 1
    overlay top.qcow2 mid.qcow2 2 4096
    run qemu-img bitmap --disable top.qcow2 X
    run qemu-io -f qcow2 -c "write -P 0x62 $((5 * MiB)) 64k" top.qcow2 # not recorded
    check top.qcow2 ok ok
fi

# --- overlays made without the bitmap (tolerant falls back to allocation) ---

if want plain-top; then
    begin_case plain-top
    base base.qcow2 65536
    overlay mid.qcow2 base.qcow2 1 65536
    overlay top.qcow2 mid.qcow2 2 plain
    check top.qcow2 "refuse:missing in top" ok
fi

if want plain-all; then
    begin_case plain-all
    base base.qcow2 65536
    overlay mid.qcow2 base.qcow2 1 plain 4096
    overlay top.qcow2 mid.qcow2 2 plain $((2 * MiB))
    check top.qcow2 "refuse:missing in top" ok
fi

if want gap-3; then
    begin_case gap-3
    base base.qcow2 65536
    overlay mid.qcow2 base.qcow2 1 plain
    overlay top.qcow2 mid.qcow2 2 65536
    check top.qcow2 "refuse:gap at layer 1" ok
fi

if want gap-4; then
    begin_case gap-4
    base l3.qcow2 65536
    overlay l2.qcow2 l3.qcow2 1 plain 512
    overlay l1.qcow2 l2.qcow2 2 4096
    overlay l0.qcow2 l1.qcow2 3 65536
    check l0.qcow2 "refuse:gap at layer 2" ok
fi

# Fallback layers with cluster sizes unlike the granularity: 2 MiB clusters
# over a 64 KiB result (each cluster dirties 32 bits), 512 B clusters under
# a 1 MiB result, 4 KiB clusters over 4 KiB.
for spec in 4096:65536:$((2 * MiB)) 65536:4096:4096 $((1 * MiB)):plain:512; do
    IFS=: read -r g2 g1 c0 <<<"$spec"
    want "plain-mixgran-$g2-$g1-c$c0" || continue
    begin_case "plain-mixgran-$g2-$g1-c$c0"
    base base.qcow2 "$g2"
    overlay mid.qcow2 base.qcow2 1 "$g1" "$c0"
    overlay top.qcow2 mid.qcow2 2 plain "$c0"
    check top.qcow2 "refuse:missing in top" ok
done

# Fallback layers of other kinds: a v2 (compat=0.10) overlay, which cannot
# hold bitmaps; an extended-L2 overlay (allocation per 2 KiB subcluster)
# over a 512 B-granularity bitmap; compressed clusters and zero clusters.
if want plain-v2-top; then
    begin_case plain-v2-top
    base base.qcow2 4096
    overlay mid.qcow2 base.qcow2 1 4096
    run qemu-img create -q -f qcow2 -o compat=0.10 -b mid.qcow2 -F qcow2 top.qcow2 "$SIZE"
    writes top.qcow2 2
    check top.qcow2 "refuse:missing in top" ok
fi

if want plain-extl2-top; then
    begin_case plain-extl2-top
    base base.qcow2 512
    run qemu-img create -q -f qcow2 -o cluster_size=64k,extended_l2=on -b base.qcow2 -F qcow2 top.qcow2 "$SIZE"
    run qemu-io -f qcow2 -c "write -P 0x81 $((1 * MiB + 2048)) 2048" \
        -c "write -P 0x82 $((2 * MiB + 100)) 10" -c "write -z $((3 * MiB + 4096)) 4096" \
        -c "discard $((16 * MiB + 6144)) 2048" top.qcow2
    check top.qcow2 "refuse:missing in top" ok
fi

if want plain-compressed-top; then
    begin_case plain-compressed-top
    base base.qcow2 4096
    overlay mid.qcow2 base.qcow2 1 plain
    mk top.qcow2 mid.qcow2
    run qemu-io -f qcow2 -c "write -c -P 0x83 $((2 * MiB)) 64k" -c "write -c -P 0x84 $((5 * MiB)) 128k" \
        -c "write -z $((7 * MiB)) 64k" -c "write -z -u $((40 * MiB)) 128k" top.qcow2
    check top.qcow2 "refuse:missing in top" ok
fi

# Layers of different sizes (overlay larger / smaller than its backing
# file): bits of a lower layer past the top's end are dropped, the top's
# tail beyond a shorter layer has no bits from it.  qemu-img bitmap --merge
# refuses bitmaps of different sizes, so the model is the only oracle.
for spec in grown:$((64 * MiB + 512)) shrunk:$((20 * MiB + 1024)); do
    IFS=: read -r kind tsize <<<"$spec"
    want "size-$kind-top" || continue
    begin_case "size-$kind-top"
    base base.qcow2 65536
    overlay mid.qcow2 base.qcow2 1 4096
    run qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 "$tsize"
    bm top.qcow2 X 65536
    run qemu-io -f qcow2 -c "write -P 0x91 $((tsize - 4096)) 4096" -c "write -P 0x92 $((3 * MiB)) 512" top.qcow2
    NO_QEMU_UNION=1
    check top.qcow2 ok ok
    NO_QEMU_UNION=
done

if want top-only; then
    begin_case top-only
    mk base.qcow2
    writes base.qcow2 0
    overlay mid.qcow2 base.qcow2 1 plain
    overlay top.qcow2 mid.qcow2 2 65536
    check top.qcow2 ok ok # lower layers are not part of "since X"
fi

# --- in-use bitmaps -----------------------------------------------------------

# The crashed session writes too, so the in-use layer allocates more than
# its bitmap (stale on disk) says.
if want inuse-top; then
    begin_case inuse-top
    base base.qcow2 65536
    overlay mid.qcow2 base.qcow2 1 4096
    overlay top.qcow2 mid.qcow2 2 65536
    crash top.qcow2 -c "write -P 0x71 $((26 * MiB)) 8k"
    check top.qcow2 "refuse:in use at layer 0" ok # result granularity: mid's 4 KiB
fi

if want inuse-mid; then
    begin_case inuse-mid
    base base.qcow2 65536
    overlay mid.qcow2 base.qcow2 1 65536
    crash mid.qcow2 -c "write -P 0x72 $((27 * MiB)) 8k"
    overlay top.qcow2 mid.qcow2 2 65536
    check top.qcow2 "refuse:in use at layer 1" ok
fi

if want inuse-deepest; then
    begin_case inuse-deepest
    base base.qcow2 65536
    crash base.qcow2 -c "write -P 0x73 $((28 * MiB)) 8k"
    overlay mid.qcow2 base.qcow2 1 65536
    overlay top.qcow2 mid.qcow2 2 65536
    check top.qcow2 "refuse:in use at layer 2" "refuse:in use at layer 2"
fi

if want inuse-top-plain-mid; then
    begin_case inuse-top-plain-mid
    base base.qcow2 $((1 * MiB))
    overlay mid.qcow2 base.qcow2 1 plain
    overlay top.qcow2 mid.qcow2 2 512
    crash top.qcow2 -c "write -P 0x74 $((29 * MiB)) 512"
    check top.qcow2 "refuse:in use at layer 0" ok # tolerant: alloc, alloc, base 1 MiB
fi

# --- missing --------------------------------------------------------------------

if want missing; then
    begin_case missing
    mk base.qcow2
    bm base.qcow2 Y 65536
    writes base.qcow2 0
    overlay mid.qcow2 base.qcow2 1 plain
    overlay top.qcow2 mid.qcow2 2 plain
    bm top.qcow2 Z 65536
    check top.qcow2 "refuse:missing everywhere" "refuse:missing everywhere"
fi

# --- raw base, ignored extension -------------------------------------------------

if want raw-base; then
    begin_case raw-base
    run qemu-img create -q -f raw base.raw "$SIZE"
    run qemu-io -f raw -c "write -P 0x7a 0 $((8 * MiB))" base.raw
    overlay l2.qcow2 base.raw 0 65536 # X starts here
    overlay l1.qcow2 l2.qcow2 1 65536
    overlay l0.qcow2 l1.qcow2 2 plain
    check l0.qcow2 "refuse:missing in top" ok
fi

# qcow2-format.md 14.5/14.6: with autoclear bit 0 clear QEMU ignores the
# whole bitmaps extension (a bitmap-unaware program wrote the layer after X
# was stored).  QEMU's tools then show no bitmap at all; a copy with the bit
# set again proves X is there.  Expected: X counts as present but invalid
# in that layer (strict refuses "invalid at layer N"; tolerant falls back to
# the layer's allocation above Lk and refuses at Lk).  Merely ignoring it
# would be unsound at Lk: the base's writes after checkpoint X would be
# lost from "changes since X".
autoclear() { # autoclear IMG: clear autoclear bit 0 (header byte 95)
    recipe_note "clear autoclear bit 0 (header byte 95) of $1"
    run "$PYTHON" -c '
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(95); b = f.read(1)[0]; f.seek(95); f.write(bytes([b ^ 1]))
' "$1"
}
proves_x() { # proves_x IMG: a copy with the bit set again lists X
    run cp "$1" "proof-$1"
    autoclear "proof-$1"
    qemu-img info -U --output=json "proof-$1" 2>>run.log | grep '"name": "X"' >/dev/null ||
        fail "[$CASE] $1 does not hold X behind its cleared autoclear bit"
    rm -f "proof-$1"
}

if want autoclear-mid; then
    begin_case autoclear-mid
    base base.qcow2 65536
    overlay mid.qcow2 base.qcow2 1 65536
    overlay top.qcow2 mid.qcow2 2 65536
    autoclear mid.qcow2
    proves_x mid.qcow2
    MODEL_OPTS=(--invalid 1)
    check top.qcow2 "refuse:invalid at layer 1" ok
    MODEL_OPTS=()
fi

if want autoclear-base; then
    begin_case autoclear-base
    base base.qcow2 65536
    autoclear base.qcow2
    proves_x base.qcow2
    overlay mid.qcow2 base.qcow2 1 65536
    overlay top.qcow2 mid.qcow2 2 65536
    MODEL_OPTS=(--invalid 2)
    check top.qcow2 "refuse:invalid at layer 2" "refuse:invalid at layer 2"
    MODEL_OPTS=()
fi

finish_cases
