#!/bin/bash
# Reader matrix: qcow2 images generated here with qemu-img/qemu-io over
# cluster sizes, compat levels, compression, extended L2, zero clusters,
# discards, odd sizes, external data files and v2 overlays; for each image
# `qcbt cat` must equal `qemu-img convert -O raw` byte for byte, and
# `qcbt map --json` must agree with `qemu-img map --output=json`.
#
# All cases run; the summary names every failing case and its recipe.
# QCBT_KEEP_TMP=1 keeps the images.  QCBT_CASES=REGEX runs matching cases.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io cmp truncate

KiB=1024
MiB=$((1024 * 1024))

want() { [[ -z ${QCBT_CASES:-} || $1 =~ $QCBT_CASES ]]; }

# pattern IMG C [EXTENDED]
# One qemu-io run with deterministic writes scaled to cluster size C:
# full/partial/straddling/sub-sector writes, zero writes on allocated and
# unallocated clusters (with and without -u), discards (whole and partial
# cluster), a multi-cluster write, subcluster-sized operations, and writes
# in the last sector and the last 3 bytes.  Operations that do not fit in
# the image are left out.
pattern() {
    local img=$1 c=$2 size sc cmds=() end
    size=$(virtual_size "$img" qcow2)
    sc=$((c / 32))
    ((sc >= 1)) || sc=1
    end=$((size - 1024))
    add() { # add OFF LEN CMD-FORMAT (with %o %l placeholders)
        local o=$1 l=$2 cmd=$3
        ((o + l <= end)) || return 0
        cmd=${cmd//%o/$o}
        cmd=${cmd//%l/$l}
        cmds+=(-c "$cmd")
    }
    add 0 "$c" 'write -P 0x11 %o %l'
    add $((c + c / 2)) "$c" 'write -P 0x12 %o %l'
    add $((3 * c + 100)) 300 'write -P 0x13 %o %l'
    add $((5 * c - 700)) 1400 'write -P 0x14 %o %l'
    add $((9 * c)) $((2 * c)) 'write -P 0x15 %o %l'
    add $((9 * c)) "$c" 'write -z %o %l'
    add $((10 * c + c / 4)) $((c / 2)) 'write -z %o %l'
    add $((12 * c)) $((2 * c)) 'write -z -u %o %l'
    add $((14 * c)) "$c" 'write -P 0x16 %o %l'
    add $((14 * c)) "$c" 'write -z -u %o %l'
    add $((16 * c)) "$c" 'write -z %o %l'
    add $((17 * c)) $((3 * c)) 'write -P 0x17 %o %l'
    add $((18 * c)) "$c" 'discard %o %l'
    add $((21 * c)) "$c" 'write -P 0x18 %o %l'
    add $((21 * c)) $((c / 2)) 'discard %o %l'
    add $((23 * c)) $((4 * c)) 'write -P 0x19 %o %l'
    add $((28 * c + 3 * sc)) $((2 * sc)) 'write -P 0x1c %o %l'
    add $((28 * c + 10 * sc)) "$sc" 'write -z %o %l'
    add $((28 * c + 20 * sc)) "$sc" 'write -P 0x1d %o %l'
    add $((28 * c + 20 * sc)) "$sc" 'write -z -u %o %l'
    add $((28 * c + 3 * sc)) "$sc" 'discard %o %l'
    add $((29 * c + 5 * sc)) $((2 * sc)) 'write -z -u %o %l'
    add $((30 * c + 7 * sc)) $((3 * sc)) 'write -P 0x1e %o %l'
    cmds+=(-c "write -P 0x1a $((size - 512)) 512" -c "write -P 0x1b $((size - 3)) 3")
    run qemu-io -f qcow2 "${cmds[@]}" "$img"
}

# mixed_raw FILE SIZE: deterministic raw data mixing incompressible
# (seeded random), compressible, zero and half-zero 4 KiB blocks.
mixed_raw() {
    run "$PYTHON" -c '
import random, sys
path, size = sys.argv[1], int(sys.argv[2])
rng = random.Random(20240601)
out = bytearray()
i = 0
while len(out) < size:
    k = i % 6
    if k == 0:
        blk = rng.randbytes(4096)
    elif k == 1:
        blk = bytes([i & 0xff]) * 4096
    elif k == 2:
        blk = bytes(4096)
    elif k == 3:
        blk = rng.randbytes(2048) + bytes(2048)
    elif k == 4:
        blk = (b"qcbt reader matrix %08d " % i) * 200
        blk = blk[:4096]
    else:
        blk = bytes(4096) if (i // 6) % 3 else rng.randbytes(4096)
    out += blk
    i += 1
with open(path, "wb") as f:
    f.write(out[:size])
' "$1" "$2"
}

finish_case() { # finish_case IMG [FMT]
    local rc=0
    check_image "$@" || rc=$?
    case_result "$rc"
}

# --- plain images: cluster size x compat -----------------------------------

for c in 512 4096 65536 $((2 * MiB)); do
    for compat in 1.1 0.10; do
        size=$((4 * MiB))
        ((c == 2 * MiB)) && size=$((64 * MiB))
        # One 2 MiB-cluster image is enough (v3); v2 covers 512 B..64 KiB.
        [[ $c == $((2 * MiB)) && $compat == 0.10 ]] && continue
        name=plain-c$c-compat$compat
        want "$name" || continue
        begin_case "$name"
        run qemu-img create -q -f qcow2 -o cluster_size=$c,compat=$compat img.qcow2 $size
        pattern img.qcow2 $c
        finish_case img.qcow2 qcow2
    done
done

# --- extended L2 (subclusters) ---------------------------------------------

for c in $((16 * KiB)) $((64 * KiB)) $((2 * MiB)); do
    name=extl2-c$c
    want "$name" || continue
    size=$((4 * MiB))
    ((c == 2 * MiB)) && size=$((64 * MiB))
    begin_case "$name"
    run qemu-img create -q -f qcow2 -o cluster_size=$c,extended_l2=on img.qcow2 $size
    pattern img.qcow2 $c
    finish_case img.qcow2 qcow2
done

# --- sizes that are not cluster multiples ------------------------------------

for spec in 1000000:4096 1000000:65536 $((65537 * 512)):65536 $((65537 * 512)):$((2 * MiB)) \
            $((65537 * 512)):512 1000000:$((32 * KiB)):ext; do
    IFS=: read -r size c ext <<<"$spec"
    opts=cluster_size=$c
    [[ $ext == ext ]] && opts+=,extended_l2=on
    name=size$size-c$c${ext:+-extl2}
    want "$name" || continue
    begin_case "$name"
    run qemu-img create -q -f qcow2 -o "$opts" img.qcow2 "$size"
    pattern img.qcow2 "$c"
    finish_case img.qcow2 qcow2
done

# --- compression -------------------------------------------------------------

# Source: mixed data (so some clusters compress and some are stored plain),
# size not a cluster multiple (the last partial cluster is compressed too).
begin_case src
recipe_note "source data for the compress-* cases"
mixed_raw "$TMPD/src/mixed.raw" $((3 * MiB + 5 * 4096 + 512))
for spec in zlib:512:1.1 zlib:4096:1.1 zlib:65536:1.1 zlib:$((2 * MiB)):1.1 \
            zlib:4096:0.10 zlib:65536:0.10 zstd:4096:1.1 zstd:65536:1.1 \
            zstd:$((2 * MiB)):1.1 zstd:65536:1.1:ext zlib:$((32 * KiB)):1.1:ext; do
    IFS=: read -r ctype c compat ext <<<"$spec"
    opts=cluster_size=$c,compat=$compat
    [[ $compat == 1.1 ]] && opts+=,compression_type=$ctype
    [[ $ext == ext ]] && opts+=,extended_l2=on
    name=compress-$ctype-c$c-compat$compat${ext:+-extl2}
    want "$name" || continue
    begin_case "$name"
    recipe_note "mixed.raw: see $TMPD/src/recipe.txt"
    run qemu-img convert -c -f raw -O qcow2 -o "$opts" "$TMPD/src/mixed.raw" img.qcow2
    finish_case img.qcow2 qcow2
    # The same image after writes over compressed clusters: partial
    # overwrite (decompress + COW), zero write, discard, zero-unmap.
    name=$name-rewritten
    want "$name" || continue
    begin_case "$name"
    run cp "$TMPD/compress-$ctype-c$c-compat$compat${ext:+-extl2}/img.qcow2" img.qcow2
    recipe_note "img.qcow2 is the image of case compress-$ctype-c$c-compat$compat${ext:+-extl2}"
    # Unit u: one cluster, or less when the image has fewer than 12 clusters.
    size=$(virtual_size img.qcow2 qcow2)
    u=$c
    ((12 * u <= size)) || u=$((size / 12 / 512 * 512))
    run qemu-io -f qcow2 -c "write -P 0x5a $((u + 100)) 200" -c "write -z $((3 * u)) $u" \
        -c "discard $((5 * u)) $u" -c "write -z -u $((7 * u)) $u" \
        -c "write -P 0x5b $((9 * u - 256)) 512" img.qcow2
    finish_case img.qcow2 qcow2
done

# --- external data file --------------------------------------------------------

# qemu 7.2 opens a relative data-file name relative to its CWD (we are in the
# image directory); qcbt resolves it relative to the image directory, so it
# must also work from elsewhere.
for spec in rel:off:65536 rel:on:65536 abs:off:4096 abs:on:65536 rel:off:65536:ext rel:on:$((32 * KiB)):ext; do
    IFS=: read -r kind raw c ext <<<"$spec"
    name=datafile-$kind-raw$raw-c$c${ext:+-extl2}
    want "$name" || continue
    begin_case "$name"
    if [[ $kind == rel ]]; then
        df=data.raw
    else
        mkdir -p "$TMPD/$name-data"
        df=$TMPD/$name-data/data.raw
    fi
    opts=cluster_size=$c,data_file=$df,data_file_raw=$raw
    [[ $ext == ext ]] && opts+=,extended_l2=on
    run qemu-img create -q -f qcow2 -o "$opts" img.qcow2 $((4 * MiB))
    pattern img.qcow2 "$c"
    rc=0
    if [[ $kind == abs ]]; then
        # A data file outside the image's directory is refused unless the
        # user trusts it (CVE-2024-32498 class).
        if err=$("$QCBT" cat -f qcow2 img.qcow2 2>&1 >/dev/null); then
            note "[$CASE] data file outside the image directory was opened"
            rc=1
        elif [[ $err != *"outside the image's directory"* ]]; then
            note "[$CASE] unexpected refusal: $err"
            rc=1
        fi
        export QCBT_ALLOW_DATA_FILE=1
    fi
    check_image img.qcow2 qcow2 || rc=1
    if ! got=$(cd / && "$QCBT" cat -f qcow2 "$CASE_DIR/img.qcow2" 2>&1 | cmp - "$CASE_DIR/ref.raw" 2>&1); then
        note "[$CASE] qcbt cat run from / (absolute image path) differs: $got"
        rc=1
    fi
    unset QCBT_ALLOW_DATA_FILE
    case_result "$rc"
done

# --- overlays whose unallocated clusters read through a backing file -----------

# base: every byte written (pattern 0xa5 plus a distinct tail), so any
# read-through is visible.
for spec in qcow2:65536:0.10:65536 qcow2:4096:0.10:65536 raw:-:0.10:4096 qcow2:65536:0.10:512 \
            qcow2:65536:1.1:65536 raw:-:1.1:4096 qcow2:4096:1.1:65536:ext qcow2:65536:0.10:$((2 * MiB)); do
    IFS=: read -r bfmt bc compat c ext <<<"$spec"
    bname=$bfmt
    [[ $bc != - ]] && bname+=-c$bc
    name=backing-$bname-overlay-c$c-compat$compat${ext:+-extl2}
    want "$name" || continue
    begin_case "$name"
    size=$((4 * MiB))
    ((c == 2 * MiB)) && size=$((64 * MiB))
    if [[ $bfmt == raw ]]; then
        run qemu-img create -q -f raw base.raw $size
        run qemu-io -f raw -c "write -P 0xa5 0 $size" -c "write -P 0xa6 $((size / 2)) 4096" base.raw
        base=base.raw
    else
        run qemu-img create -q -f qcow2 -o cluster_size="$bc" base.qcow2 $size
        run qemu-io -f qcow2 -c "write -P 0xa5 0 $size" -c "write -P 0xa6 $((size / 2)) 4096" base.qcow2
        base=base.qcow2
    fi
    opts=cluster_size=$c,compat=$compat
    [[ $ext == ext ]] && opts+=,extended_l2=on
    run qemu-img create -q -f qcow2 -o "$opts" -b "$base" -F "$bfmt" img.qcow2
    pattern img.qcow2 "$c"
    finish_case img.qcow2 qcow2
done

# --- odds and ends ---------------------------------------------------------------

if want misc-prealloc-metadata; then
    begin_case misc-prealloc-metadata
    run qemu-img create -q -f qcow2 -o preallocation=metadata img.qcow2 $((4 * MiB))
    pattern img.qcow2 65536
    finish_case img.qcow2 qcow2
fi

if want misc-sparse-copy; then
    # Allocated clusters holding zeros, copied with cp --sparse=always: the
    # host file has holes under allocated clusters (as after rsync -S).
    begin_case misc-sparse-copy
    run qemu-img create -q -f qcow2 orig.qcow2 $((8 * MiB))
    run qemu-io -f qcow2 -c "write -P 0 0 6M" -c "write -P 0x33 1M 64k" -c "write -P 0x34 $((5 * MiB + 100)) 1000" orig.qcow2
    run cp --sparse=always orig.qcow2 img.qcow2
    finish_case img.qcow2 qcow2
fi

if want misc-sparse-copy-dense; then
    # The same, but holes are under <10% of the allocated clusters: qemu's
    # metadata-preallocation heuristic does not fire and qemu-img map does
    # not look at host holes (zero=false there).
    begin_case misc-sparse-copy-dense
    run qemu-img create -q -f qcow2 orig.qcow2 $((8 * MiB))
    run qemu-io -f qcow2 -c "write -P 0x55 0 8M" -c "write -P 0 1M 64k" orig.qcow2
    run cp --sparse=always orig.qcow2 img.qcow2
    finish_case img.qcow2 qcow2
fi

if want misc-prealloc-full; then
    begin_case misc-prealloc-full
    run qemu-img create -q -f qcow2 -o preallocation=full,cluster_size=4096 img.qcow2 $((4 * MiB))
    pattern img.qcow2 4096
    finish_case img.qcow2 qcow2
fi

if want misc-refcount1; then
    begin_case misc-refcount1
    run qemu-img create -q -f qcow2 -o refcount_bits=1,cluster_size=4096 img.qcow2 $((4 * MiB))
    pattern img.qcow2 4096
    finish_case img.qcow2 qcow2
fi

if want misc-internal-snapshot; then
    # An internal snapshot, then overwrites: only the active L1 counts.
    begin_case misc-internal-snapshot
    run qemu-img create -q -f qcow2 -o refcount_bits=64,cluster_size=4096 img.qcow2 $((4 * MiB))
    run qemu-io -f qcow2 -c "write -P 0x31 0 1M" -c "write -P 0x32 3M 64k" img.qcow2
    run qemu-img snapshot -c snap1 img.qcow2
    pattern img.qcow2 4096
    run qemu-io -f qcow2 -c "discard 3M 64k" img.qcow2
    finish_case img.qcow2 qcow2
fi

if want misc-dirty-lazy-refcounts; then
    # qemu-io killed after writes with lazy refcounts: dirty bit left set.
    begin_case misc-dirty-lazy-refcounts
    run qemu-img create -q -f qcow2 -o lazy_refcounts=on img.qcow2 $((4 * MiB))
    pattern img.qcow2 65536
    run sh -c 'qemu-io -f qcow2 -c "write -P 0x21 1M 1M" -c "write -z 2M 64k" -c "sigraise 9" img.qcow2; test $? -eq 137'
    finish_case img.qcow2 qcow2
fi

if want misc-corrupt-bit; then
    # The corrupt bit forbids writing, not reading.
    begin_case misc-corrupt-bit
    run qemu-img create -q -f qcow2 img.qcow2 $((4 * MiB))
    pattern img.qcow2 65536
    set_header_bit img.qcow2 72 1
    finish_case img.qcow2 qcow2
fi

if want misc-unknown-compat-autoclear; then
    # Unknown compatible and autoclear bits must be ignored by readers.
    begin_case misc-unknown-compat-autoclear
    run qemu-img create -q -f qcow2 img.qcow2 $((4 * MiB))
    pattern img.qcow2 65536
    set_header_bit img.qcow2 80 5
    set_header_bit img.qcow2 88 7
    finish_case img.qcow2 qcow2
fi

if want misc-bitmaps; then
    # Persistent bitmaps (extension + autoclear bit) do not change reads.
    begin_case misc-bitmaps
    run qemu-img create -q -f qcow2 img.qcow2 $((4 * MiB))
    run qemu-img bitmap --add img.qcow2 b0
    pattern img.qcow2 65536
    run qemu-img bitmap --add -g 512k img.qcow2 b1
    finish_case img.qcow2 qcow2
fi

if want misc-probe; then
    # No -f anywhere: both tools probe the format.
    begin_case misc-probe
    run qemu-img create -q -f qcow2 img.qcow2 $((4 * MiB))
    pattern img.qcow2 65536
    finish_case img.qcow2
fi

if want misc-huge-sparse; then
    # 2 TiB virtual, a few writes: map over the whole disk, cat on ranges.
    begin_case misc-huge-sparse
    size=$((2 * 1024 * 1024 * MiB))
    run qemu-img create -q -f qcow2 img.qcow2 $size
    run qemu-io -f qcow2 -c "write -P 0x41 0 64k" -c "write -P 0x42 $((size / 2 - 512)) 1k" \
        -c "write -z $((size / 4)) 1M" -c "write -P 0x43 $((size - 512)) 512" img.qcow2
    rc=0
    qemu-img map -f qcow2 --output=json img.qcow2 >qemu-map.json
    if "$QCBT" map --json -f qcow2 img.qcow2 >qcbt-map.json 2>qcbt-map.err; then
        "$PYTHON" "$MAP_COMPARE" --size $size --context "$CASE" qemu-map.json qcbt-map.json || rc=1
    else
        note "[$CASE] qcbt map failed: $(cat qcbt-map.err)"
        rc=1
    fi
    for r in "0 65537" "$((size / 2 - 4096)) 8192" "$((size / 4 - 512)) 4096" "$((size - 65536)) 65536"; do
        read -r off len <<<"$r"
        # Reference slice: qemu's raw driver with offset/size (512-aligned)
        # over the qcow2 node.
        aoff=$((off / 512 * 512))
        alen=$(((off - aoff + len + 511) / 512 * 512))
        ((aoff + alen <= size)) || alen=$((size - aoff))
        rm -f ref-part.raw
        run qemu-img convert --image-opts \
            "driver=raw,offset=$aoff,size=$alen,file.driver=qcow2,file.file.filename=img.qcow2" \
            -O raw ref-part.raw
        if ! "$QCBT" cat -f qcow2 --offset "$off" --length "$len" img.qcow2 >part.raw 2>qcbt-cat.err; then
            note "[$CASE] qcbt cat --offset $off --length $len failed: $(cat qcbt-cat.err)"
            rc=1
        elif ! got=$(cmp -n "$len" -i "$((off - aoff)):0" ref-part.raw part.raw 2>&1) ||
             [[ $(stat -c %s part.raw) -ne $len ]]; then
            note "[$CASE] qcbt cat --offset $off --length $len differs: $got ($(stat -c %s part.raw) bytes)"
            rc=1
        fi
    done
    case_result "$rc"
fi

cd "$TMPD" || exit 1
finish_cases
