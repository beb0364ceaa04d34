#!/bin/bash
# Differential oracles for qcbt-server, with qemu as the reference:
#
# - single images: our `nbdinfo --map` of base:allocation,
#   qemu:allocation-depth and every qemu:dirty-bitmap context equals
#   `qemu-nbd -r -f qcow2 -A -B NAME`'s, for bitmaps of granularity 512 B
#   .. 2 GiB, enabled and disabled, disk sizes that are not a multiple of
#   the granularity or the cluster size, cluster sizes 512 B .. 2 MiB,
#   compressed and zero clusters, a > 4 GiB disk;
# - valid chains (the bitmap in every layer from the top down to the
#   deepest that holds it, libvirt's model): our merged bitmap equals
#   QEMU's own merge -- `qemu-img bitmap --merge NAME -b LAYER -F FMT` of
#   every layer into a fresh disabled bitmap (the granularity of the top
#   bitmap) in a copy of the top, exported by `qemu-nbd -B`; --strict
#   gives the same answer; base:allocation and allocation-depth equal
#   qemu-nbd's on the chain;
# - data: nbdcopy from our server equals `qemu-img convert -O raw`.
#
# Maps are compared over the whole disk after merging adjacent extents
# with equal flags (qemu may split differently).
#
# QCBT_KEEP_TMP=1 keeps the images; QCBT_CASES=REGEX runs matching cases.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo nbdcopy cmp timeout

SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER"

KiB=1024
MiB=$((1024 * 1024))
GiB=$((1024 * MiB))
rc=0
ncmp=0
cd "$TMPD"

want() { [[ -z ${QCBT_CASES:-} || $1 =~ $QCBT_CASES ]]; }
bad() {
    note "FAIL: $*"
    rc=1
}

cat >nmap.py <<'EOF'
"""nmap.py LABEL SIZE REF.json OURS.json  (nbdinfo --map --json output)
Merge adjacent extents with equal type, check both cover [0, SIZE)
exactly, compare.  Exit 1 with the first differing range; 3 when REF
(qemu's answer) is not a map of the export: the oracle broke."""
import json, sys

label, size = sys.argv[1], int(sys.argv[2])

def load(path, who):
    out, pos = [], 0
    try:
        exts = json.load(open(path))
        for e in exts:
            o, l, t = e["offset"], e["length"], e["type"]
            if o != pos:
                raise ValueError(f"extent at {o}, expected {pos}")
            if l <= 0:
                raise ValueError(f"extent of length {l} at {o}")
            if out and out[-1][2] == t:
                out[-1][1] += l
            else:
                out.append([o, l, t])
            pos += l
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{label}: {who}: {path}: {e}")
    if pos != size:
        raise ValueError(f"{label}: {who}: map ends at {pos}, export size {size}")
    return out

try:
    ref = load(sys.argv[3], "qemu")
except ValueError as e:
    print(f"oracle broke: {e}", file=sys.stderr)
    sys.exit(3)
try:
    ours = load(sys.argv[4], "qcbt")
except ValueError as e:
    sys.exit(str(e))
if ref != ours:
    def at(m, x):
        for o, l, t in m:
            if o <= x < o + l:
                return (o, l, t)
    for x in sorted({e[0] for e in ref} | {e[0] for e in ours}):
        a, b = at(ref, x), at(ours, x)
        if a[2] != b[2]:
            print(f"{label}: first difference at offset {x} (0x{x:x}): "
                  f"qemu extent {a}, qcbt extent {b}", file=sys.stderr)
            break
    ndiff = sum(1 for x in sorted({e[0] for e in ref} | {e[0] for e in ours})
                if at(ref, x)[2] != at(ours, x)[2])
    print(f"{label}: {len(ref)} qemu runs, {len(ours)} qcbt runs, "
          f"{ndiff} differing boundaries", file=sys.stderr)
    sys.exit(1)
print(f"{len(ref)} runs")
EOF

cat >union.py <<'EOF2'
"""union.py SIZE GRAN LAYERMAP.json...  The union of the per-layer bitmaps
(nbdinfo --map --json of qemu-nbd -B X on each layer), each dirty byte
marking the GRAN-sized bit of the result that holds it, as nbdinfo JSON
over [0, SIZE)."""
import json, sys
size, gran = int(sys.argv[1]), int(sys.argv[2])
bits = set()
for path in sys.argv[3:]:
    for e in json.load(open(path)):
        if e["type"] & 1:
            o, l = e["offset"], e["length"]
            bits.update(range(o // gran, (o + l - 1) // gran + 1))
out = []
for b in range((size + gran - 1) // gran):
    o = b * gran
    t = 1 if b in bits else 0
    l = min(gran, size - o)
    if out and out[-1]["type"] == t:
        out[-1]["length"] += l
    else:
        out.append({"offset": o, "length": l, "type": t})
json.dump(out, sys.stdout)
EOF2

# serve NAME CMD...: start a server on $TMPD/NAME.sock, wait until it
# accepts connections; sets SPIDS[NAME].  qemu-nbd is the oracle: if it
# does not start, the test is broken ("oracle broke"), not qcbt.
declare -A SPIDS
serve() {
    local name=$1 sock=$TMPD/$1.sock
    shift
    rm -f "$sock"
    "$@" -k "$sock" 2>"$name.log" &
    SPIDS[$name]=$!
    cleanup_pid "${SPIDS[$name]}"
    wait_nbd "nbd+unix:///?socket=$sock" "${SPIDS[$name]}" 2>>"$name.log" && return 0
    [[ $1 != qemu-nbd ]] || fail "oracle broke: $name: qemu-nbd did not start: $(cat "$name.log")"
    bad "$name: server did not start: $(cat "$name.log")"
    return 1
}
unserve() {
    local name
    for name in "$@"; do
        [[ -n ${SPIDS[$name]:-} ]] || continue
        kill -TERM "${SPIDS[$name]}" 2>/dev/null || true
        wait_gone "${SPIDS[$name]}" || kill -KILL "${SPIDS[$name]}" 2>/dev/null || true
        wait "${SPIDS[$name]}" 2>/dev/null || true
        unset "SPIDS[$name]"
    done
}
uri() { echo "nbd+unix:///?socket=$TMPD/$1.sock"; }

# cmp_ctx TAG REFSRV REFCTX OURSRV OURCTX: nbdinfo --map of both, compared.
cmp_ctx() {
    local tag=$1 rs=$2 rctx=$3 os=$4 octx=$5 size out
    size=$(nbdinfo --size "$(uri "$rs")")
    if [[ $(nbdinfo --size "$(uri "$os")") != "$size" ]]; then
        bad "$tag: export size qemu $size, qcbt $(nbdinfo --size "$(uri "$os")")"
        return
    fi
    if ! nbdinfo --map="$rctx" --json "$(uri "$rs")" >"$tag.qemu.json" 2>"$tag.err"; then
        fail "oracle broke: $tag: nbdinfo --map of qemu-nbd's $rctx failed: $(cat "$tag.err")"
    fi
    if ! nbdinfo --map="$octx" --json "$(uri "$os")" >"$tag.qcbt.json" 2>"$tag.err"; then
        bad "$tag: qcbt map of $octx failed: $(cat "$tag.err")"
        return
    fi
    ncmp=$((ncmp + 1))
    nmap "$tag: $octx" "$size" "$tag.qemu.json" "$tag.qcbt.json" "qemu-nbd's $rctx"
}

# nmap LABEL SIZE REF OURS WHAT: compare with nmap.py, report.
nmap() {
    local out st=0
    out=$("$PYTHON" nmap.py "$1" "$2" "$3" "$4" 2>&1) || st=$?
    case $st in
    0) note "ok: $1 equals $5 ($out)" ;;
    1) bad "$out" ;;
    *) fail "$out" ;;
    esac
}

# cmp_data TAG SRV IMG [FMT]: nbdcopy from our server == qemu-img convert
# -O raw.
cmp_data() {
    local tag=$1 srv=$2 img=$3 fmt=${4:-qcow2} size
    size=$(nbdinfo --size "$(uri "$srv")")
    qemu-img convert -f "$fmt" -O raw "$img" "$tag.ref.raw" ||
        fail "oracle broke: $tag: qemu-img convert -O raw $img failed"
    truncate -s "$size" "$tag.ref.raw"   # qemu exports whole sectors
    rm -f "$tag.copy.raw"
    if nbdcopy "$(uri "$srv")" "$tag.copy.raw" 2>"$tag.err" &&
        cmp "$tag.ref.raw" "$tag.copy.raw" >"$tag.cmp" 2>&1; then
        note "ok: $tag: data equals qemu-img convert -O raw ($size bytes)"
    else
        bad "$tag: data differs from qemu-img convert -O raw: $(cat "$tag.err" "$tag.cmp" 2>/dev/null | head -n 3)"
    fi
    rm -f "$tag.ref.raw" "$tag.copy.raw"
}

# bitmaps IMG: names of the bitmaps of IMG that are not in use.
bitmaps() {
    qemu-img info -U --output=json "$1" | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)
for b in d.get("format-specific", {}).get("data", {}).get("bitmaps", []):
    if "in-use" not in b["flags"]:
        print(b["name"])'
}

# oracle_single TAG IMG [FMT]: qemu-nbd -r -A -B every bitmap vs ours.
oracle_single() {
    local tag=$1 img=$2 fmt=${3:-qcow2} bms=() b bargs=()
    [[ $fmt == qcow2 ]] && mapfile -t bms < <(bitmaps "$img")
    for b in "${bms[@]}"; do bargs+=(-B "$b"); done
    serve "$tag-q" qemu-nbd -r -f "$fmt" -t -A "${bargs[@]}" "$img" || return
    serve "$tag-c" "$SERVER" -f "$fmt" -t -A "${bargs[@]}" "$img" || { unserve "$tag-q"; return; }
    cmp_ctx "$tag-alloc" "$tag-q" base:allocation "$tag-c" base:allocation
    cmp_ctx "$tag-depth" "$tag-q" qemu:allocation-depth "$tag-c" qemu:allocation-depth
    for b in "${bms[@]}"; do
        cmp_ctx "$tag-$b" "$tag-q" "qemu:dirty-bitmap:$b" "$tag-c" "qemu:dirty-bitmap:$b"
    done
    cmp_data "$tag" "$tag-c" "$img" "$fmt"
    unserve "$tag-q" "$tag-c"
}

# oracle_chain TAG TOP BITMAP LAYER...: LAYER... are the layers from the
# top down that hold BITMAP (valid chain).  QEMU merges them into a fresh
# disabled bitmap in a copy of TOP; qemu-nbd exports it.
oracle_chain() {
    local tag=$1 top=$2 bm=$3 gran l fmt dir
    shift 3
    dir=$(dirname "$top")
    gran=$(qemu-img info -U --output=json "$top" | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)
for b in d["format-specific"]["data"].get("bitmaps", []):
    if b["name"] == sys.argv[1]:
        print(b["granularity"])' "$bm")
    [[ -n $gran ]] || fail "TEST BUG: $tag: $bm not in $top"
    cp "$top" "$dir/qemu-merged.qcow2"
    qemu-img bitmap --add -g "$gran" --disable "$dir/qemu-merged.qcow2" __merged
    for l in "$@"; do
        fmt=$(qemu-img info -U --output=json "$l" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["format"])')
        qemu-img bitmap --merge "$bm" -b "$l" -F "$fmt" "$dir/qemu-merged.qcow2" __merged ||
            fail "oracle broke: $tag: qemu-img bitmap --merge $bm -b $l failed"
    done
    serve "$tag-q" qemu-nbd -r -f qcow2 -t -A -B __merged "$dir/qemu-merged.qcow2" || return
    serve "$tag-c" "$SERVER" -t -A -B "$bm" "$top" || { unserve "$tag-q"; return; }
    serve "$tag-s" "$SERVER" -t --strict -B "$bm" "$top" || { unserve "$tag-q" "$tag-c"; return; }
    cmp_ctx "$tag-$bm" "$tag-q" qemu:dirty-bitmap:__merged "$tag-c" "qemu:dirty-bitmap:$bm"
    cmp_ctx "$tag-$bm-strict" "$tag-q" qemu:dirty-bitmap:__merged "$tag-s" "qemu:dirty-bitmap:$bm"
    cmp_ctx "$tag-alloc" "$tag-q" base:allocation "$tag-c" base:allocation
    cmp_ctx "$tag-depth" "$tag-q" qemu:allocation-depth "$tag-c" qemu:allocation-depth
    cmp_data "$tag" "$tag-c" "$top"
    unserve "$tag-q" "$tag-c" "$tag-s"
    # For the record: what qemu-nbd -B publishes on the chain itself (the
    # first bitmap of that name walking down), compared with the union.
    if serve "$tag-first" qemu-nbd -r -f qcow2 -t -B "$bm" "$top"; then
        nbdinfo --map="qemu:dirty-bitmap:$bm" --totals "$(uri "$tag-first")" >"$tag.first" 2>&1 || true
        note "   ($tag: for comparison, qemu-nbd -B $bm on the chain itself (first bitmap found): $(awk '$3 == 1 {print $1}' "$tag.first") bytes dirty; the union: $("$PYTHON" -c 'import json,sys; print(sum(e["length"] for e in json.load(open(sys.argv[1])) if e["type"] == 1))' "$tag-$bm.qemu.json"))"
        unserve "$tag-first"
    fi
    rm -f "$dir/qemu-merged.qcow2"
}

# --- single images -------------------------------------------------------------
# qio IMG CMD...: qemu-io on a qcow2 image (bitmaps record the writes).
qio() {
    local img=$1
    shift
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f qcow2 "${args[@]}" "$img" >/dev/null
}

if want s1-granularities; then
    # 64 MiB + 2.5 KiB: a multiple of 512 only; every granularity from
    # 512 B to 2 GiB; an enabled and a disabled bitmap.
    qemu-img create -q -f qcow2 s1.qcow2 $((64 * MiB + 2560))
    qio s1.qcow2 'write -P 0x11 0 1M'
    for g in 512 4096 65536 1048576 2097152 2147483648; do
        qemu-img bitmap --add -g $g s1.qcow2 "g$g"
    done
    qio s1.qcow2 'write -P 0xab 64k 64k' 'write -P 0xcd 10M 192k' \
        'write -P 0xef 40M 4k' 'write -P 0x5c 66047 3000' 'write -P 0x3 1023 2'
    qemu-img bitmap --disable s1.qcow2 g4096
    qio s1.qcow2 "write -P 0x7e $((64 * MiB)) 2560" 'write -P 0x44 20M 512' \
        'write -z 30M 1M' 'discard 1M 64k'
    oracle_single s1 s1.qcow2
fi

if want s2-clusters; then
    # Cluster sizes 512 B and 2 MiB, sizes not a multiple of the cluster.
    for cs in 512 2097152; do
        qemu-img create -q -f qcow2 -o cluster_size=$cs "s2-$cs.qcow2" $((33 * MiB + 1536))
        qio "s2-$cs.qcow2" 'write -P 0x21 3M 100k'
        qemu-img bitmap --add -g 65536 "s2-$cs.qcow2" a
        qemu-img bitmap --add -g 8192 "s2-$cs.qcow2" b
        qio "s2-$cs.qcow2" 'write -P 0x22 0 700' 'write -P 0x23 5M 3M' \
            "write -P 0x24 $((33 * MiB)) 1536" 'write -z 16M 2M' 'write -P 0x25 17M 5000'
        oracle_single "s2-$cs" "s2-$cs.qcow2"
    done
fi

if want s3-compressed; then
    # Compressed clusters from convert -c, then a bitmap and new writes
    # over compressed, zero and unallocated clusters.
    qemu-img create -q -f qcow2 s3-src.qcow2 16M
    qio s3-src.qcow2 'write -P 0x31 0 4M' 'write -P 0x32 8M 1M'
    qemu-img convert -c -O qcow2 s3-src.qcow2 s3.qcow2
    qemu-img bitmap --add s3.qcow2 c
    qio s3.qcow2 'write -P 0x33 1M 64k' 'write -z 2M 128k' 'write -P 0x34 12M 4k'
    oracle_single s3 s3.qcow2
fi

if want s4-big; then
    # Beyond 4 GiB: lengths of 32 bits cannot cover the disk in one request.
    qemu-img create -q -f qcow2 s4.qcow2 $((6 * GiB + 512))
    qemu-img bitmap --add s4.qcow2 big
    qemu-img bitmap --add -g 512 s4.qcow2 fine
    qio s4.qcow2 'write -P 0x41 0 64k' "write -P 0x42 $((4 * GiB - 512)) 1024" \
        "write -P 0x43 $((5 * GiB)) 1M" "write -P 0x44 $((6 * GiB)) 512"
    oracle_single s4 s4.qcow2
fi

if want s5-many; then
    # Many short runs: every other 64 KiB cluster over 32 MiB (dirty in
    # "alt" at 64 KiB, and a 1 MiB bitmap that sees it all).
    qemu-img create -q -f qcow2 s5.qcow2 $((40 * MiB))
    qemu-img bitmap --add s5.qcow2 alt
    qemu-img bitmap --add -g 1048576 s5.qcow2 coarse
    cmds=()
    for ((o = 0; o < 32 * MiB; o += 128 * KiB)); do cmds+=("write -P 0x51 $o 4k"); done
    qio s5.qcow2 "${cmds[@]}"
    oracle_single s5 s5.qcow2
fi

if want s6-raw; then
    # A sparse raw file of 5 MiB + 1000 bytes (qemu exports 5 MiB + 1 KiB:
    # whole sectors, the tail reading as zeros).
    truncate -s $((5 * MiB + 1000)) s6.raw
    printf 'hello' | dd of=s6.raw bs=1 seek=$MiB conv=notrunc status=none
    head -c 40960 /dev/urandom | dd of=s6.raw bs=4096 seek=300 conv=notrunc status=none
    printf 'tail' | dd of=s6.raw bs=1 seek=$((5 * MiB + 990)) conv=notrunc status=none
    oracle_single s6 s6.raw raw
fi

# --- valid chains ------------------------------------------------------------

if want c1-three-qcow2; then
    mkdir -p c1
    qemu-img create -q -f qcow2 c1/base.qcow2 $((48 * MiB))
    qio c1/base.qcow2 'write -P 0x01 0 8M'                     # before X
    qemu-img bitmap --add c1/base.qcow2 X
    qio c1/base.qcow2 'write -P 0x02 8M 128k' 'write -P 0x03 30M 4k'
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 c1/mid.qcow2
    qemu-img bitmap --add c1/mid.qcow2 X
    qio c1/mid.qcow2 'write -P 0x11 1M 64k' 'write -z 9M 64k' 'write -P 0x12 20M 3000'
    qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 c1/top.qcow2
    qemu-img bitmap --add c1/top.qcow2 X
    qio c1/top.qcow2 'write -P 0x21 2M 4k' 'write -P 0x22 47M 1M' 'discard 8M 64k'
    oracle_chain c1 c1/top.qcow2 X c1/top.qcow2 c1/mid.qcow2 c1/base.qcow2
fi

if want c2-raw-base-granularities; then
    # Raw base; the checkpoint bitmap has 64 KiB granularity in mid and
    # 4 KiB in top (the result has the top's; mid's bits map to every
    # 4 KiB bit they cover).  The disk size is not a multiple of 64 KiB.
    mkdir -p c2
    qemu-img create -q -f raw c2/base.raw $((24 * MiB + 4096 + 512))
    qemu-io -f raw -c 'write -P 0x01 0 24M' c2/base.raw >/dev/null
    qemu-img create -q -f qcow2 -b base.raw -F raw c2/mid.qcow2
    qemu-img bitmap --add c2/mid.qcow2 ck
    qio c2/mid.qcow2 'write -P 0x11 100k 8k' 'write -P 0x12 5M 1M' \
        "write -P 0x13 $((24 * MiB)) 4608"
    qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 c2/top.qcow2
    qemu-img bitmap --add -g 4096 c2/top.qcow2 ck
    qio c2/top.qcow2 'write -P 0x21 300k 4k' 'write -P 0x22 7M 12k' 'write -z 10M 64k'
    oracle_chain c2 c2/top.qcow2 ck c2/top.qcow2 c2/mid.qcow2
fi

if want c3-deep-coarse-top; then
    # Four layers, X only in the top three (the base predates the
    # checkpoint); the top's bitmap is coarser (1 MiB) than the others
    # (512 B, 64 KiB).
    mkdir -p c3
    qemu-img create -q -f qcow2 c3/l3.qcow2 $((20 * MiB))
    qio c3/l3.qcow2 'write -P 0x01 0 20M'
    qemu-img create -q -f qcow2 -b l3.qcow2 -F qcow2 c3/l2.qcow2
    qemu-img bitmap --add -g 512 c3/l2.qcow2 X
    qio c3/l2.qcow2 'write -P 0x11 513 1' 'write -P 0x12 3M 1536'
    qemu-img create -q -f qcow2 -b l2.qcow2 -F qcow2 c3/l1.qcow2
    qemu-img bitmap --add c3/l1.qcow2 X
    qio c3/l1.qcow2 'write -P 0x21 5M 64k' 'write -P 0x22 19M 4k'
    qemu-img create -q -f qcow2 -b l1.qcow2 -F qcow2 c3/l0.qcow2
    qemu-img bitmap --add -g 1048576 c3/l0.qcow2 X
    qemu-img bitmap --add -g 65536 c3/l0.qcow2 Y      # only in the top
    qio c3/l0.qcow2 'write -P 0x31 12M 4k'
    oracle_chain c3 c3/l0.qcow2 X c3/l0.qcow2 c3/l1.qcow2 c3/l2.qcow2
    oracle_chain c3y c3/l0.qcow2 Y c3/l0.qcow2
fi

if want c4-short-backing; then
    # Layers of different sizes: the base (with X at 64 KiB) is 10 MiB +
    # 512 B, the top (X at 4 KiB) 16 MiB.  QEMU cannot merge bitmaps of
    # different sizes, so the reference is the union of what qemu-nbd
    # -B X publishes for each layer, each dirty byte marking the top's
    # 4 KiB bit that holds it.  Allocation past the backing file's end and
    # the data are compared with qemu-nbd on the chain.
    mkdir -p c4
    qemu-img create -q -f qcow2 c4/base.qcow2 $((10 * MiB + 512))
    qio c4/base.qcow2 'write -P 0x01 0 10M'
    qemu-img bitmap --add c4/base.qcow2 X
    qio c4/base.qcow2 'write -P 0x02 1M 4k' "write -P 0x03 $((10 * MiB)) 512"
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 c4/top.qcow2 $((16 * MiB))
    qemu-img bitmap --add -g 4096 c4/top.qcow2 X
    qio c4/top.qcow2 'write -P 0x11 12M 4k' 'write -P 0x12 10M 1024' 'write -z 2M 8k'
    size=$((16 * MiB))
    maps=()
    for l in c4/top.qcow2 c4/base.qcow2; do
        n=c4-layer-$(basename "$l" .qcow2)
        serve "$n" qemu-nbd -r -f qcow2 -t -B X "$l"
        nbdinfo --map=qemu:dirty-bitmap:X --json "$(uri "$n")" >"$n.json" 2>"$n.err" ||
            fail "oracle broke: c4: nbdinfo --map of qemu-nbd -B X $l failed: $(cat "$n.err")"
        maps+=("$n.json")
        unserve "$n"
    done
    "$PYTHON" union.py $size 4096 "${maps[@]}" >c4-X.qemu.json ||
        fail "oracle broke: c4: the union of qemu-nbd's per-layer maps failed"
    serve c4-q qemu-nbd -r -f qcow2 -t -A c4/top.qcow2
    serve c4-c "$SERVER" -t -A -B X c4/top.qcow2
    if nbdinfo --map=qemu:dirty-bitmap:X --json "$(uri c4-c)" >c4-X.qcbt.json 2>c4-X.err; then
        ncmp=$((ncmp + 1))
        nmap "c4: qemu:dirty-bitmap:X" $size c4-X.qemu.json c4-X.qcbt.json \
            "the union of qemu-nbd's per-layer maps"
    else
        bad "c4: qcbt map of X failed: $(cat c4-X.err)"
    fi
    cmp_ctx c4-alloc c4-q base:allocation c4-c base:allocation
    cmp_ctx c4-depth c4-q qemu:allocation-depth c4-c qemu:allocation-depth
    cmp_data c4 c4-c c4/top.qcow2
    unserve c4-q c4-c
fi

if want c5-short-layers; then
    # Three layers that grow: raw base 6 MiB, mid 12 MiB, top 16 MiB
    # (qemu counts the zeros past a backing layer's end as allocated in
    # that layer: allocation-depth 3 past the base, 2 past mid).
    mkdir -p c5
    qemu-img create -q -f raw c5/base.raw $((6 * MiB))
    qemu-io -f raw -c 'write -P 0x01 0 6M' c5/base.raw >/dev/null
    qemu-img create -q -f qcow2 -b base.raw -F raw c5/mid.qcow2 $((12 * MiB))
    qio c5/mid.qcow2 'write -P 0x11 1M 64k' 'write -P 0x12 7M 64k'
    qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 c5/top.qcow2 $((16 * MiB))
    qio c5/top.qcow2 'write -P 0x21 2M 4k' 'write -P 0x22 8M 4k' 'write -P 0x23 13M 4k'
    serve c5-q qemu-nbd -r -f qcow2 -t -A c5/top.qcow2
    serve c5-c "$SERVER" -t -A c5/top.qcow2
    cmp_ctx c5-alloc c5-q base:allocation c5-c base:allocation
    cmp_ctx c5-depth c5-q qemu:allocation-depth c5-c qemu:allocation-depth
    cmp_data c5 c5-c c5/top.qcow2
    unserve c5-q c5-c
fi

note "$ncmp map comparisons"
[[ $rc -eq 0 ]] || fail "qcbt-server disagrees with qemu (see above)"
note "PASS"
