#!/bin/bash
# Backing chains: 3-layer chains built with qemu-img/qemu-io (raw or qcow2
# base, relative names across directories, short/long backing files,
# different cluster sizes, a probed backing format, "./" names, 64 layers),
# compared with qemu: `qcbt cat` == `qemu-img convert -O raw`, `qcbt map`
# == `qemu-img map`, and `qcbt info --json` == `qemu-img info
# --backing-chain` on layer count, formats and stored/resolved backing names.
# Then the error cases: each must exit non-zero with exactly one "qcbt: "
# stderr line naming the layer and file.
#
# QCBT_KEEP_TMP=1 keeps the images.  QCBT_CASES=REGEX runs matching cases.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io cmp truncate ln dd

MiB=$((1024 * 1024))

want() { [[ -z ${QCBT_CASES:-} || $1 =~ $QCBT_CASES ]]; }

# check_info IMG [FMT]: qcbt info --json vs qemu-img info --backing-chain.
# Layer count; per layer: the file (same inode), format, virtual size,
# stored backing name (exact string), resolved backing name (same inode as
# the next layer), stored backing format.
check_info() {
    local img=$1 fmt=${2:-} fopt=()
    [[ -n $fmt ]] && fopt=(-f "$fmt")
    qemu-img info "${fopt[@]}" --backing-chain --output=json "$img" >qemu-info.json ||
        fail "[$CASE] qemu-img info --backing-chain failed"
    if ! "$QCBT" info --json "${fopt[@]}" "$img" >qcbt-info.json 2>qcbt-info.err; then
        note "[$CASE] qcbt info --json failed: $(cat qcbt-info.err)"
        return 1
    fi
    "$PYTHON" - "$CASE" qemu-info.json qcbt-info.json <<'EOF'
import json, os, sys

case, qpath, cpath = sys.argv[1:4]
q = json.load(open(qpath))
try:
    c = json.load(open(cpath))
except ValueError as e:
    sys.exit(f"[{case}] qcbt info --json is not JSON: {e}")
errs = []
layers = c.get("layers") if isinstance(c, dict) else None
if not isinstance(layers, list):
    sys.exit(f"[{case}] qcbt info --json has no \"layers\" array")
if len(layers) != len(q):
    errs.append(f"layer count: qemu-img {len(q)}, qcbt {len(layers)}")

def same(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False

for i, (ql, cl) in enumerate(zip(q, layers)):
    def bad(what, qv, cv):
        errs.append(f"layer {i}: {what}: qemu-img {qv!r}, qcbt {cv!r}")
    if cl.get("depth", i) != i:
        bad("depth", i, cl.get("depth"))
    if not same(ql["filename"], cl.get("filename", "")):
        bad("filename (not the same file)", ql["filename"], cl.get("filename"))
    if ql["format"] != cl.get("format"):
        bad("format", ql["format"], cl.get("format"))
    if ql["virtual-size"] != cl.get("virtual-size"):
        bad("virtual-size", ql["virtual-size"], cl.get("virtual-size"))
    if ql.get("backing-filename") != cl.get("backing-filename"):
        bad("backing-filename (stored)", ql.get("backing-filename"), cl.get("backing-filename"))
    if ql.get("backing-filename-format") != cl.get("backing-filename-format"):
        bad("backing-filename-format (stored)", ql.get("backing-filename-format"),
            cl.get("backing-filename-format"))
    qf, cf = ql.get("full-backing-filename"), cl.get("full-backing-filename")
    if (qf is None) != (cf is None) or (qf is not None and not same(qf, cf)):
        bad("full-backing-filename (resolved; not the same file)", qf, cf)
    elif qf is not None and qf != cf:
        print(f"[{case}] note: layer {i} full-backing-filename spelled differently: "
              f"qemu-img {qf!r}, qcbt {cf!r} (same file)", file=sys.stderr)
    if i + 1 < len(layers) and cf is not None and not same(cf, layers[i + 1].get("filename", "")):
        bad("full-backing-filename vs next layer's filename", cf, layers[i + 1].get("filename"))
if errs:
    print(f"[{case}] qcbt info --json disagrees with qemu-img info --backing-chain:", file=sys.stderr)
    for e in errs:
        print("    " + e, file=sys.stderr)
    sys.exit(1)
EOF
}

# finish_chain IMG [FMT]: cat/map/info checks, from the case directory and
# cat from / with the absolute path; records the case result.
finish_chain() {
    local img=$1 fmt=${2:-} rc=0 got fopt=()
    [[ -n $fmt ]] && fopt=(-f "$fmt")
    check_image "$img" "$fmt" || rc=1
    check_info "$img" "$fmt" || rc=1
    if ! got=$(cd / && "$QCBT" cat "${fopt[@]}" "$CASE_DIR/$img" 2>&1 | cmp - "$CASE_DIR/ref.raw" 2>&1); then
        note "[$CASE] qcbt cat run from / (absolute path) differs: $got"
        rc=1
    fi
    case_result "$rc"
}

# strip_backing_format IMG: remove the backing-format header extension
# (0xE2792ACA) so readers must probe the backing file's format, as for
# images made by old qemu-img (today's qemu-img refuses to create them).
strip_backing_format() {
    recipe_note "strip_backing_format $1 (remove header extension 0xE2792ACA, see test script)"
    "$PYTHON" - "$1" <<'EOF'
import struct, sys
path = sys.argv[1]
with open(path, "r+b") as f:
    hdr = f.read(104)
    version = struct.unpack(">I", hdr[4:8])[0]
    hlen = struct.unpack(">I", hdr[100:104])[0] if version >= 3 else 72
    f.seek(hlen)
    exts, pos, found = [], hlen, False
    while True:
        t, n = struct.unpack(">II", f.read(8))
        if t == 0:
            break
        data = f.read((n + 7) & ~7)
        if t == 0xE2792ACA:
            found = True
        else:
            exts.append(struct.pack(">II", t, n) + data)
    end = f.tell()
    if not found:
        sys.exit(f"{path}: no backing format extension")
    blob = b"".join(exts) + bytes(8)
    f.seek(hlen)
    f.write(blob + bytes(end - hlen - len(blob)))
EOF
}

# set_incompat_bit IMG BIT: incompatible_features is the u64 at offset 72.
set_incompat_bit() { set_header_bit "$1" 72 "$2"; }

# ===========================================================================
# Chains that must read like qemu reads them
# ===========================================================================

if want chain-raw-base-subdirs; then
    # base/base.raw <- sub/mid.qcow2 (names ../base/base.raw) <- sub/top.qcow2
    begin_case chain-raw-base-subdirs
    run mkdir -p base sub
    run qemu-img create -q -f raw base/base.raw $((4 * MiB))
    run qemu-io -f raw -c "write -P 0xb0 0 3M" -c "write -P 0xb1 $((4 * MiB - 4096)) 4096" base/base.raw
    run qemu-img create -q -f qcow2 -b ../base/base.raw -F raw sub/mid.qcow2
    run qemu-io -f qcow2 -c "write -P 0xc0 64k 128k" -c "write -z 1M 64k" -c "write -P 0xc1 2000000 3000" sub/mid.qcow2
    run qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 sub/top.qcow2
    run qemu-io -f qcow2 -c "write -P 0xd0 100k 4k" -c "write -z -u 1M 32k" -c "write -z 1100k 64k" \
        -c "write -P 0xd1 $((4 * MiB - 512)) 512" sub/top.qcow2
    rc=0
    check_image sub/top.qcow2 qcow2 || rc=1
    check_info sub/top.qcow2 qcow2 || rc=1
    # Same chain opened from inside sub/ and from / (absolute path).
    got=$(cd sub && "$QCBT" cat top.qcow2 2>&1 | cmp - ../ref.raw 2>&1) ||
        { note "[$CASE] qcbt cat from sub/ differs: $got"; rc=1; }
    got=$(cd / && "$QCBT" cat "$CASE_DIR/sub/top.qcow2" 2>&1 | cmp - "$CASE_DIR/ref.raw" 2>&1) ||
        { note "[$CASE] qcbt cat from / differs: $got"; rc=1; }
    case_result "$rc"
fi

if want chain-qcow2-base; then
    begin_case chain-qcow2-base
    run qemu-img create -q -f qcow2 base.qcow2 $((4 * MiB))
    run qemu-io -f qcow2 -c "write -P 0xb0 0 4M" base.qcow2
    run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
    run qemu-io -f qcow2 -c "write -P 0xc0 0 64k" -c "write -z 128k 128k" -c "discard 512k 64k" \
        -c "write -z -u 1M 1M" mid.qcow2
    run qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
    run qemu-io -f qcow2 -c "write -P 0xd0 32k 64k" -c "write -P 0xd1 1536k 4k" -c "discard 3M 64k" top.qcow2
    finish_chain top.qcow2 qcow2
fi

if want chain-backing-shorter; then
    # base 1 MiB < mid 2 MiB < top 4 MiB: reads past a layer's end are zero,
    # and unallocated ranges there stop at that layer in qemu-img map.
    begin_case chain-backing-shorter
    run qemu-img create -q -f qcow2 base.qcow2 $((1 * MiB))
    run qemu-io -f qcow2 -c "write -P 0xb0 0 1M" base.qcow2
    run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 $((2 * MiB))
    run qemu-io -f qcow2 -c "write -P 0xc0 960k 128k" -c "write -P 0xc1 1600k 4k" mid.qcow2
    run qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 $((4 * MiB))
    run qemu-io -f qcow2 -c "write -P 0xd0 3M 4k" -c "write -P 0xd1 1M 512" top.qcow2
    finish_chain top.qcow2 qcow2
fi

if want chain-backing-longer; then
    # base 8 MiB > mid 6 MiB > top 4 MiB: only [0, 4 MiB) is seen.
    begin_case chain-backing-longer
    run qemu-img create -q -f qcow2 base.qcow2 $((8 * MiB))
    run qemu-io -f qcow2 -c "write -P 0xb0 0 8M" base.qcow2
    run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 $((6 * MiB))
    run qemu-io -f qcow2 -c "write -P 0xc0 1M 64k" -c "write -P 0xc1 5M 64k" mid.qcow2
    run qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 $((4 * MiB))
    run qemu-io -f qcow2 -c "write -P 0xd0 $((4 * MiB - 4096)) 4k" top.qcow2
    finish_chain top.qcow2 qcow2
fi

if want chain-odd-size-raw-base; then
    # A raw base of 1000001 bytes (qemu rounds its size up to 1000448).
    begin_case chain-odd-size-raw-base
    run "$PYTHON" -c 'open("base.raw","wb").write(bytes((i * 7 + 3) & 0xff for i in range(1000001)))'
    run qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 $((2 * MiB))
    run qemu-io -f qcow2 -c "write -P 0xc0 4k 4k" mid.qcow2
    run qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
    run qemu-io -f qcow2 -c "write -P 0xd0 1500k 4k" top.qcow2
    finish_chain top.qcow2 qcow2
fi

if want chain-mixed-cluster-sizes; then
    # base 4 KiB clusters, mid 2 MiB, top 512 B.
    begin_case chain-mixed-cluster-sizes
    run qemu-img create -q -f qcow2 -o cluster_size=4096 base.qcow2 $((4 * MiB))
    run qemu-io -f qcow2 -c "write -P 0xb0 0 4M" -c "write -z 8k 4k" base.qcow2
    run qemu-img create -q -f qcow2 -o cluster_size=$((2 * MiB)) -b base.qcow2 -F qcow2 mid.qcow2
    run qemu-io -f qcow2 -c "write -P 0xc0 $((2 * MiB + 5000)) 3000" mid.qcow2
    run qemu-img create -q -f qcow2 -o cluster_size=512 -b mid.qcow2 -F qcow2 top.qcow2
    run qemu-io -f qcow2 -c "write -P 0xd0 1000 1000" -c "write -z -u $((2 * MiB + 4096)) 2048" top.qcow2
    finish_chain top.qcow2 qcow2
fi

if want chain-extl2-middle; then
    begin_case chain-extl2-middle
    run qemu-img create -q -f qcow2 -o cluster_size=65536 base.qcow2 $((4 * MiB))
    run qemu-io -f qcow2 -c "write -P 0xb0 0 4M" base.qcow2
    run qemu-img create -q -f qcow2 -o cluster_size=32768,extended_l2=on -b base.qcow2 -F qcow2 mid.qcow2
    run qemu-io -f qcow2 -c "write -P 0xc0 1024 1024" -c "write -z 40k 2k" -c "write -z -u 100k 1k" mid.qcow2
    run qemu-img create -q -f qcow2 -o cluster_size=16384,extended_l2=on -b mid.qcow2 -F qcow2 top.qcow2
    run qemu-io -f qcow2 -c "write -P 0xd0 1536 512" -c "write -z -u 40k 1k" top.qcow2
    finish_chain top.qcow2 qcow2
fi

if want chain-probe-backing-format; then
    # No backing-format extension at any level: raw and qcow2 backing files
    # are probed (qemu-img info shows no backing-filename-format).
    begin_case chain-probe-backing-format
    run qemu-img create -q -f raw base.raw $((4 * MiB))
    run qemu-io -f raw -c "write -P 0xb0 0 2M" base.raw
    run qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2
    run qemu-io -f qcow2 -c "write -P 0xc0 1M 64k" mid.qcow2
    run qemu-img create -q -f qcow2 -o compat=0.10 -b mid.qcow2 -F qcow2 top.qcow2
    run qemu-io -f qcow2 -c "write -P 0xd0 1500k 64k" top.qcow2
    strip_backing_format mid.qcow2
    strip_backing_format top.qcow2
    finish_chain top.qcow2 # top probed too
fi

if want chain-dot-names; then
    # Names with "./" and "dir/./" and "dir/../".
    begin_case chain-dot-names
    run mkdir -p d
    run qemu-img create -q -f qcow2 d/base.qcow2 $((4 * MiB))
    run qemu-io -f qcow2 -c "write -P 0xb0 0 4M" d/base.qcow2
    run qemu-img create -q -f qcow2 -b ./base.qcow2 -F qcow2 d/mid.qcow2
    run qemu-io -f qcow2 -c "write -P 0xc0 1M 64k" d/mid.qcow2
    run qemu-img create -q -f qcow2 -b ./d/../d/./mid.qcow2 -F qcow2 top.qcow2
    run qemu-io -f qcow2 -c "write -P 0xd0 2M 64k" top.qcow2
    finish_chain ./top.qcow2 qcow2
fi

if want chain-absolute-names; then
    begin_case chain-absolute-names
    run qemu-img create -q -f qcow2 base.qcow2 $((4 * MiB))
    run qemu-io -f qcow2 -c "write -P 0xb0 0 4M" base.qcow2
    run qemu-img create -q -f qcow2 -b "$CASE_DIR/base.qcow2" -F qcow2 mid.qcow2
    run qemu-io -f qcow2 -c "write -P 0xc0 1M 64k" mid.qcow2
    run qemu-img create -q -f qcow2 -b "$CASE_DIR/mid.qcow2" -F qcow2 top.qcow2
    run qemu-io -f qcow2 -c "write -P 0xd0 2M 64k" top.qcow2
    finish_chain top.qcow2 qcow2
fi

# make_chain N: l0.qcow2 (base) ... l$((N-1)).qcow2 (top), 64 KiB each with
# one distinct sector written per layer.
make_chain() {
    local n=$1 i
    run qemu-img create -q -f qcow2 l0.qcow2 $((1 * MiB))
    run qemu-io -f qcow2 -c "write -P 1 0 512" l0.qcow2
    for ((i = 1; i < n; i++)); do
        qemu-img create -q -f qcow2 -b "l$((i - 1)).qcow2" -F qcow2 "l$i.qcow2" >/dev/null ||
            fail "[$CASE] qemu-img create l$i.qcow2"
        qemu-io -f qcow2 -c "write -P $((i % 256)) $((i * 4096)) 512" "l$i.qcow2" >/dev/null ||
            fail "[$CASE] qemu-io l$i.qcow2"
    done
    recipe_note "for i in 1..$((n - 1)): qemu-img create -f qcow2 -b l\$((i-1)).qcow2 -F qcow2 l\$i.qcow2; qemu-io -f qcow2 -c \"write -P \$((i%256)) \$((i*4096)) 512\" l\$i.qcow2"
}

if want chain-64-layers; then
    # The depth limit is 64 layers: exactly 64 must work.
    begin_case chain-64-layers
    make_chain 64
    finish_chain l63.qcow2 qcow2
fi

# ===========================================================================
# Error cases: non-zero exit, one "qcbt: " line naming the layer and file,
# for each of cat, map and info.
# ===========================================================================

# expect_error_all [--no-layer] NEEDLE... -- [OPTS...] IMG
# Unless --no-layer, the message must also have the chain-error shape
# "qcbt: layer N (PATH): ...".
expect_error_all() {
    local needles=() rc=0 cmd
    if [[ $1 == --no-layer ]]; then
        shift
    else
        needles+=('re:^qcbt: layer [0-9]+ \([^)]+\): ')
    fi
    while [[ $1 != -- ]]; do
        needles+=("$1")
        shift
    done
    shift
    recipe_note "expect failure naming: ${needles[*]}"
    for cmd in cat map info; do
        expect_qcbt_error "${needles[@]}" -- "$cmd" "$@" || rc=1
    done
    case_result "$rc"
}

if want err-missing-top; then
    begin_case err-missing-top
    # Not a chain error: the message need only name the file.
    expect_error_all --no-layer "nope.qcow2" -- nope.qcow2
fi

if want err-missing-backing; then
    begin_case err-missing-backing
    run qemu-img create -q -f qcow2 base.qcow2 $((1 * MiB))
    run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
    run qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
    run rm base.qcow2
    expect_error_all "layer 2" "base.qcow2" -- top.qcow2
fi

if want err-loop-ab; then
    begin_case err-loop-ab
    run qemu-img create -q -f qcow2 -u -b b.qcow2 -F qcow2 a.qcow2 $((1 * MiB))
    run qemu-img create -q -f qcow2 -u -b a.qcow2 -F qcow2 b.qcow2 $((1 * MiB))
    expect_error_all "layer 2" "a.qcow2" -- a.qcow2
fi

if want err-loop-symlink; then
    # a -> b -> link.qcow2, a symlink to a: the same device+inode as layer 0.
    begin_case err-loop-symlink
    run qemu-img create -q -f qcow2 -u -b b.qcow2 -F qcow2 a.qcow2 $((1 * MiB))
    run qemu-img create -q -f qcow2 -u -b link.qcow2 -F qcow2 b.qcow2 $((1 * MiB))
    run ln -s a.qcow2 link.qcow2
    expect_error_all "layer 2" "link.qcow2" -- a.qcow2
fi

if want err-loop-hardlink-dir; then
    # The loop closes through another directory's name for the same file.
    begin_case err-loop-hardlink-dir
    run mkdir d
    run qemu-img create -q -f qcow2 -u -b d/b.qcow2 -F qcow2 a.qcow2 $((1 * MiB))
    run qemu-img create -q -f qcow2 -u -b ../a.qcow2 -F qcow2 d/b.qcow2 $((1 * MiB))
    expect_error_all "layer 2" "a.qcow2" -- ./a.qcow2
fi

if want err-self-loop; then
    begin_case err-self-loop
    run qemu-img create -q -f qcow2 self.qcow2 $((1 * MiB))
    run qemu-img rebase -u -b self.qcow2 -F qcow2 self.qcow2
    expect_error_all "layer 1" "self.qcow2" -- self.qcow2
fi

if want err-65-layers; then
    begin_case err-65-layers
    make_chain 65
    # Either naming is fine: the last allowed layer (63) or the first one
    # over the limit (64).
    expect_error_all "layer 63 (l1.qcow2)|layer 64 (l0.qcow2)" -- l64.qcow2
fi

if want err-70-layers; then
    begin_case err-70-layers
    make_chain 70
    expect_error_all "layer 63 (l6.qcow2)|layer 64 (l5.qcow2)" -- l69.qcow2
fi

if want err-protocol-nbd; then
    begin_case err-protocol-nbd
    run qemu-img create -q -f qcow2 base.qcow2 $((1 * MiB))
    run qemu-img create -q -f qcow2 -u -b nbd://x -F raw mid.qcow2 $((1 * MiB))
    run qemu-img create -q -f qcow2 -u -b mid.qcow2 -F qcow2 top.qcow2 $((1 * MiB))
    expect_error_all "layer 1" "nbd://x" -- top.qcow2
fi

if want err-protocol-nbd-colon; then
    begin_case err-protocol-nbd-colon
    run qemu-img create -q -f qcow2 -u -b nbd:localhost:10809 -F raw top.qcow2 $((1 * MiB))
    expect_error_all "layer 0" "nbd:localhost:10809" -- top.qcow2
fi

if want err-protocol-json; then
    begin_case err-protocol-json
    run qemu-img create -q -f qcow2 -u -b 'json:{}' -F raw top.qcow2 $((1 * MiB))
    expect_error_all "layer 0" "json:" -- top.qcow2
fi

if want err-incompat-bit40-top; then
    begin_case err-incompat-bit40-top
    run qemu-img create -q -f qcow2 top.qcow2 $((1 * MiB))
    set_incompat_bit top.qcow2 40
    expect_error_all "layer 0" "top.qcow2" -- top.qcow2
fi

if want err-incompat-bit40-mid; then
    begin_case err-incompat-bit40-mid
    run qemu-img create -q -f qcow2 base.qcow2 $((1 * MiB))
    run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
    run qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
    set_incompat_bit mid.qcow2 40
    expect_error_all "layer 1" "mid.qcow2" -- top.qcow2
fi

if want err-bad-magic-top; then
    begin_case err-bad-magic-top
    run qemu-img create -q -f qcow2 top.qcow2 $((1 * MiB))
    run dd if=/dev/zero of=top.qcow2 bs=4 count=1 conv=notrunc status=none
    expect_error_all "layer 0" "top.qcow2" -- -f qcow2 top.qcow2
fi

if want err-bad-magic-base; then
    # The overlay records -F qcow2 for its backing file, so no probing.
    begin_case err-bad-magic-base
    run qemu-img create -q -f qcow2 base.qcow2 $((1 * MiB))
    run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
    run qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
    run dd if=/dev/zero of=base.qcow2 bs=4 count=1 conv=notrunc status=none
    expect_error_all "layer 2" "base.qcow2" -- top.qcow2
fi

if want err-truncated-header; then
    begin_case err-truncated-header
    run qemu-img create -q -f qcow2 base.qcow2 $((1 * MiB))
    run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
    run truncate -s 50 base.qcow2
    expect_error_all "layer 1" "base.qcow2" -- top.qcow2
fi

if want err-truncated-tables; then
    # Header intact, but the file ends before its L1/refcount tables.
    begin_case err-truncated-tables
    run qemu-img create -q -f qcow2 top.qcow2 $((1 * MiB))
    run qemu-io -f qcow2 -c "write -P 0x11 0 1M" top.qcow2
    run truncate -s 4096 top.qcow2
    expect_error_all "layer 0" "top.qcow2" -- -f qcow2 top.qcow2
fi

if want err-v2-zero-flag; then
    # qcow2 v2 (compat=0.10) has no zero flag: bit 0 of a standard L2
    # entry is reserved.  QEMU fails the read ("Zero cluster entry found in
    # pre-v3 image"); reading it as a zero cluster would hide the data.
    begin_case err-v2-zero-flag
    run qemu-img create -q -f qcow2 -o compat=0.10 top.qcow2 $((1 * MiB))
    run qemu-io -f qcow2 -c "write -P 0x5a 0 64k" -c "write -P 0x6b 128k 64k" top.qcow2
    recipe_note "set bit 0 of the L2 entry of guest cluster 0 (python)"
    "$PYTHON" - top.qcow2 0 <<'PYEOF' || fail "[$CASE] cannot poke the L2 entry"
import struct, sys
path, gc = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    h = f.read(72)
    assert struct.unpack(">I", h[4:8])[0] == 2, "not a v2 image"
    cbits = struct.unpack(">I", h[20:24])[0]
    l1_off = struct.unpack(">Q", h[40:48])[0]
    l2_bits = cbits - 3
    f.seek(l1_off + 8 * (gc >> l2_bits))
    l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    pos = l2 + 8 * (gc & ((1 << l2_bits) - 1))
    f.seek(pos)
    e = struct.unpack(">Q", f.read(8))[0]
    assert e & 0x00fffffffffffe00, "cluster not allocated"
    f.seek(pos)
    f.write(struct.pack(">Q", e | 1))
PYEOF
    rc=0
    # The oracle: QEMU refuses the read (-r: it would mark a writable
    # image corrupt) but still reads the good cluster.
    if qemu-io -r -f qcow2 -c "read 0 64k" top.qcow2 >qemu-io.out 2>&1; then
        note "[$CASE] qemu-io read of the entry succeeded: $(cat qemu-io.out)"
        rc=1
    fi
    qemu-io -r -f qcow2 -c "read -P 0x6b 128k 64k" top.qcow2 >qemu-io.out 2>&1 ||
        { note "[$CASE] qemu-io read of the good cluster failed: $(cat qemu-io.out)"; rc=1; }
    for cmd in cat map; do
        expect_qcbt_error "top.qcow2" "reserved bit 0" "version 2" \
            "guest offset 0x0" -- "$cmd" top.qcow2 || rc=1
    done
    expect_qcbt_error "top.qcow2" "reserved bit 0" -- \
        cat --offset 4096 --length 1 top.qcow2 || rc=1
    if ! "$QCBT" cat --offset $((128 * 1024)) --length 65536 top.qcow2 >good.raw 2>qcbt-cat.err; then
        note "[$CASE] qcbt cat of the good cluster failed: $(cat qcbt-cat.err)"
        rc=1
    elif [[ $(od -An -v -tx1 good.raw | tr -s ' \n' '\n' | sort -u | tr -d '\n') != 6b ]]; then
        note "[$CASE] qcbt cat of the good cluster read wrong bytes"
        rc=1
    fi
    case_result "$rc"
fi

if want err-hostile-backing-name; then
    # A crafted image names its backing file with an escape sequence and a
    # newline: the error must stay one line without control bytes (no
    # colours, titles or forged second lines on the user's terminal).
    begin_case err-hostile-backing-name
    run qemu-img create -q -f qcow2 -u -F qcow2 -b $'evil\e[31mRED\e]0;owned\a\nforged line' \
        top.qcow2 $((1 * MiB))
    rc=0
    for cmd in cat map info; do
        expect_qcbt_error "layer 1" "evil?[31mRED?]0;owned??forged line" -- "$cmd" top.qcow2 || rc=1
        "$QCBT" "$cmd" top.qcow2 >/dev/null 2>hostile.err || true
        if LC_ALL=C tr -d '\n' <hostile.err | LC_ALL=C grep -q '[[:cntrl:]]'; then
            note "[$CASE] qcbt $cmd printed control bytes: $(od -c hostile.err | head -n 4)"
            rc=1
        fi
    done
    case_result "$rc"
fi

cd "$TMPD" || exit 1
finish_cases
