#!/bin/bash
# The qcow2 writer (common/qcow2/qcow2-writer.c) against qemu.
#
# qcbt-writer-tool (tests/unit/writer-tool.c) writes images from a list of
# qemu-io style commands ("write -P PAT OFF LEN", "write -z OFF LEN");
# the same list replayed with qemu-io on an image made by qemu-img create
# is the reference.  For every image: `qemu-img check` exits 0 with no
# errors and no leaks; `qemu-img compare` says identical to the reference;
# `qcbt cat` (our chain_read) == `qemu-img convert -O raw` and `qcbt map`
# == `qemu-img map` (check_image); `qemu-img map --output=json` matches
# a per-cluster model of the commands (written -> data at depth 0, whole
# zero -> zero at depth 0 without data, untouched -> reads through);
# `qemu-img info --backing-chain` shows the backing name exactly as given.
# Cases: cluster sizes 512 B .. 2 MiB on sizes that are not cluster
# multiples, overlays on qcow2 and raw bases (fill from the backing chain,
# bigger than the base, a "../" name), a backup-like 3-image chain, qemu
# writing into our image afterwards, a 4 GiB sparse image with scattered
# writes, and the error messages.
#
# QCBT_KEEP_TMP=1 keeps the images.  QCBT_CASES=REGEX runs matching cases.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io cmp

TOOL=${QCBT_WRITER_TOOL:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/tests/unit/qcbt-writer-tool}
[[ -x $TOOL ]] || fail "qcbt-writer-tool not found: $TOOL (build the tree or set \$QCBT_WRITER_TOOL)"
TOOL=$(cd "$(dirname "$TOOL")" && pwd)/$(basename "$TOOL")

want() { [[ -z ${QCBT_CASES:-} || $1 =~ $QCBT_CASES ]]; }

# check_clean IMG: qemu-img check exits 0 and reports no errors, no
# corruptions and no leaks.
check_clean() {
    local img=$1 rc=0
    qemu-img check --output=json "$img" >check.json 2>check.err || rc=$?
    if [[ $rc -ne 0 ]]; then
        note "[$CASE] qemu-img check $img exit $rc: $(cat check.json check.err)"
        qemu-img check "$img" >&2 || true
        return 1
    fi
    "$PYTHON" - "$CASE" "$img" check.json <<'EOF'
import json, sys
case, img, path = sys.argv[1:4]
c = json.load(open(path))
bad = {k: c.get(k, 0) for k in ("check-errors", "corruptions", "leaks",
                                  "corruptions-fixed", "leaks-fixed")}
bad = {k: v for k, v in bad.items() if v}
if bad:
    sys.exit(f"[{case}] qemu-img check {img}: {bad}")
EOF
}

# compare_ref IMG REF: qemu-img compare (guest contents, through backing
# files) says identical.
compare_ref() {
    local out
    if ! out=$(qemu-img compare "$1" "$2" 2>&1); then
        note "[$CASE] qemu-img compare $1 $2: $out"
        return 1
    fi
}

# map_model IMG CLUSTER SIZE CMD...: qemu-img map of IMG against the
# per-cluster model of the commands.
map_model() {
    local img=$1
    shift
    qemu-img map --output=json "$img" >model-map.json ||
        fail "[$CASE] qemu-img map $img failed"
    "$PYTHON" - "$CASE" model-map.json "$@" <<'EOF'
import json, sys
case, path, cs, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cmds = sys.argv[5:]

def num(s):
    mult = {"k": 1 << 10, "K": 1 << 10, "m": 1 << 20, "M": 1 << 20,
            "g": 1 << 30, "G": 1 << 30}
    if s[-1] in mult:
        return int(s[:-1], 0) * mult[s[-1]]
    return int(s, 0)

n = (size + cs - 1) // cs
kinds = ["U"] * n
for cmd in cmds:
    t = cmd.split()
    zero = "-z" in t
    off, ln = num(t[-2]), num(t[-1])
    if ln == 0:
        continue
    for c in range(off // cs, (off + ln - 1) // cs + 1):
        a, b = c * cs, min((c + 1) * cs, size)
        whole = off <= a and off + ln >= b
        if not zero:
            kinds[c] = "D"
        elif whole:
            kinds[c] = "Z"
        elif kinds[c] == "U":
            kinds[c] = "ZD"   # fill + zeros: zero cluster if all zero

want = {
    "D": ("data at depth 0", lambda e: e["depth"] == 0 and e["present"] and e["data"] and not e["zero"]),
    "Z": ("zero at depth 0, no data", lambda e: e["depth"] == 0 and e["present"] and e["zero"] and not e["data"]),
    "ZD": ("allocated at depth 0", lambda e: e["depth"] == 0 and e["present"]),
    "U": ("not allocated in the top image", lambda e: not (e["depth"] == 0 and e["present"])),
}
errs, end = [], 0
for e in json.load(open(path)):
    if e["start"] != end:
        errs.append(f"map not contiguous at {end}")
    end = e["start"] + e["length"]
    for c in range(e["start"] // cs, (end - 1) // cs + 1):
        what, ok = want[kinds[c]]
        if not ok(e) and len(errs) < 10:
            errs.append(f"cluster {c} (guest {c * cs}): want {what}, qemu-img map says {e}")
if end != size:
    errs.append(f"map ends at {end}, size {size}")
if errs:
    print(f"[{case}] qemu-img map disagrees with the model:", file=sys.stderr)
    for x in errs:
        print("    " + x, file=sys.stderr)
    sys.exit(1)
EOF
}

# qemu_ref REF CMD...: replay the commands with qemu-io.
qemu_ref() {
    local ref=$1 args=() c
    shift
    for c in "$@"; do
        args+=(-c "$c")
    done
    run qemu-io -f qcow2 "${args[@]}" "$ref"
}

# check_all IMG REF CLUSTER SIZE CMD...: every check on one image.
check_all() {
    local img=$1 ref=$2 rc=0
    shift 2
    check_clean "$img" || rc=1
    compare_ref "$img" "$ref" || rc=1
    check_image "$img" || rc=1
    map_model "$img" "$@" || rc=1
    return "$rc"
}

# check_chain_info IMG BACKING_NAME BACKING_FMT DEPTH: what qemu-img info
# --backing-chain says about our headers ("-": no backing file).
check_chain_info() {
    qemu-img info --backing-chain --output=json "$1" >info.json ||
        fail "[$CASE] qemu-img info --backing-chain $1 failed"
    "$PYTHON" - "$CASE" info.json "$2" "$3" "$4" <<'EOF'
import json, sys
case, path, name, fmt, depth = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
q = json.load(open(path))
errs = []
if len(q) != depth:
    errs.append(f"{len(q)} images in the chain, want {depth}")
top = q[0]
if top.get("format") != "qcow2":
    errs.append(f"top format {top.get('format')!r}")
if name == "-":
    name = fmt = None
if top.get("backing-filename") != name:
    errs.append(f"backing-filename {top.get('backing-filename')!r}, want {name!r}")
if top.get("backing-filename-format") != fmt:
    errs.append(f"backing-filename-format {top.get('backing-filename-format')!r}, want {fmt!r}")
spec = top.get("format-specific", {}).get("data", {})
if spec.get("compat") != "1.1" or spec.get("refcount-bits") != 16 or spec.get("corrupt"):
    errs.append(f"format-specific {spec}")
if errs:
    sys.exit(f"[{case}] qemu-img info --backing-chain: " + "; ".join(errs))
EOF
}

MiB=$((1024 * 1024))

# ===========================================================================
# Stand-alone images, every cluster size
# ===========================================================================

for cs in 512 4096 65536 2097152; do
    want "single-$cs" || continue
    begin_case "single-$cs"
    size=$((5 * MiB + 3 * 512))
    cmds=(
        "write -P 0x11 0 1M"
        "write -P 0x22 1000000 77777"
        "write -z 2M 128k"
        "write -z 3000000 1000"
        "write -P 0x33 4M 300k"
        "write -P 0x44 4200000 5000"
        "write -z 4M 64k"
        "write -P 0x55 $((size - 700)) 700"
        "write -P 0x66 100 10"
        "write -z 512k 512"
        "write -P 0x77 $((size - 3 * 512)) 512"
    )
    run "$TOOL" -c "$cs" ours.qcow2 "$size" "${cmds[@]}"
    run qemu-img create -q -f qcow2 -o "cluster_size=$cs" ref.qcow2 "$size"
    qemu_ref ref.qcow2 "${cmds[@]}"
    rc=0
    check_all ours.qcow2 ref.qcow2 "$cs" "$size" "${cmds[@]}" || rc=1
    check_chain_info ours.qcow2 - - 1 || rc=1
    # qemu can go on writing into our layout (metadata at the end,
    # released clusters with refcount 0) and the image stays clean.
    run cp ours.qcow2 rw.qcow2
    run cp ref.qcow2 rw-ref.qcow2
    more=("write -P 0x88 64k 200k" "write -z 1M 64k" "discard 0 64k")
    qemu_ref rw.qcow2 "${more[@]}"
    qemu_ref rw-ref.qcow2 "${more[@]}"
    check_clean rw.qcow2 || rc=1
    compare_ref rw.qcow2 rw-ref.qcow2 || rc=1
    case_result "$rc"
done

# ===========================================================================
# Overlays: partial clusters completed from the backing chain
# ===========================================================================

overlay_case() {
    local cs=$1 basefmt=$2 rc=0 size=$((6 * MiB + 512)) bsize=$((4 * MiB + 1536))
    begin_case "overlay-$cs-$basefmt"
    mkdir -p base top
    local base_cmds=(
        "write -P 0xa1 0 $bsize"
        "write -z 1M 256k"
        "write -P 0xa2 3000000 12345"
    )
    if [[ $basefmt == qcow2 ]]; then
        run "$TOOL" -c "$cs" base/base.img "$bsize" "${base_cmds[@]}"
        check_clean base/base.img || rc=1
    else
        run qemu-img create -q -f raw base/base.img "$bsize"
        local c args=()
        for c in "${base_cmds[@]}"; do
            args+=(-c "$c")
        done
        run qemu-io -f raw "${args[@]}" base/base.img
    fi
    # Partial writes over base data, zeros (whole and partial), untouched
    # ranges, writes past the end of the (smaller) base.
    local cmds=(
        "write -P 0xb1 100 1000"
        "write -P 0xb2 70000 200000"
        "write -z 512k 64k"
        "write -z 900000 3000"
        "write -z 1100000 5000"
        "write -P 0xb3 $((bsize - 1000)) 5000"
        "write -P 0xb4 5M 100k"
        "write -z $((5 * MiB + 200 * 1024)) 1000"
        "write -P 0xb5 $((size - 100)) 100"
        "write -P 0xb6 150 10"
    )
    run "$TOOL" -c "$cs" -b ../base/base.img -F "$basefmt" top/ours.qcow2 "$size" "${cmds[@]}"
    run qemu-img create -q -f qcow2 -o "cluster_size=$cs" -b ../base/base.img -F "$basefmt" top/ref.qcow2 "$size"
    qemu_ref top/ref.qcow2 "${cmds[@]}"
    check_all top/ours.qcow2 top/ref.qcow2 "$cs" "$size" "${cmds[@]}" || rc=1
    check_chain_info top/ours.qcow2 ../base/base.img "$basefmt" 2 || rc=1
    case_result "$rc"
}

for cs in 512 4096 65536; do
    want "overlay-$cs-qcow2" && overlay_case "$cs" qcow2
done
want "overlay-65536-raw" && overlay_case 65536 raw
want "overlay-2097152-qcow2" && overlay_case 2097152 qcow2

# ===========================================================================
# A backup-like chain: full, then two incrementals naming the previous one
# ===========================================================================

if want chain3; then
    begin_case chain3
    size=$((16 * MiB))
    full=("write -P 0x01 0 6M" "write -P 0x02 8M 4M" "write -z 6M 1M")
    inc1=("write -P 0x03 1M 64k" "write -P 0x04 $((2 * MiB + 1000)) 3000" "write -z 8M 128k" "write -z 9M 100")
    inc2=("write -P 0x05 $((1 * MiB + 100)) 200" "write -z 2M 1M" "write -P 0x06 15M 1M")
    run "$TOOL" full.qcow2 "$size" "${full[@]}"
    run "$TOOL" -b full.qcow2 -F qcow2 inc1.qcow2 "$size" "${inc1[@]}"
    run "$TOOL" -b inc1.qcow2 -F qcow2 inc2.qcow2 "$size" "${inc2[@]}"
    run qemu-img create -q -f qcow2 rfull.qcow2 "$size"
    qemu_ref rfull.qcow2 "${full[@]}"
    run qemu-img create -q -f qcow2 -b rfull.qcow2 -F qcow2 rinc1.qcow2 "$size"
    qemu_ref rinc1.qcow2 "${inc1[@]}"
    run qemu-img create -q -f qcow2 -b rinc1.qcow2 -F qcow2 rinc2.qcow2 "$size"
    qemu_ref rinc2.qcow2 "${inc2[@]}"
    rc=0
    check_clean full.qcow2 || rc=1
    check_clean inc1.qcow2 || rc=1
    compare_ref full.qcow2 rfull.qcow2 || rc=1
    compare_ref inc1.qcow2 rinc1.qcow2 || rc=1
    check_all inc2.qcow2 rinc2.qcow2 65536 "$size" "${inc2[@]}" || rc=1
    check_chain_info inc2.qcow2 inc1.qcow2 qcow2 3 || rc=1
    case_result "$rc"
fi

# ===========================================================================
# 4 GiB sparse image, scattered writes
# ===========================================================================

if want sparse-4g; then
    begin_case sparse-4g
    size=$((4 * 1024 * MiB))
    mapfile -t cmds < <("$PYTHON" - "$size" <<'EOF'
import random, sys
size = int(sys.argv[1])
r = random.Random(20240607)
for i in range(300):
    off = r.randrange(0, size - 300000)
    n = r.choice([512, 4096, 65536, 65536 * 3, r.randrange(1, 200000)])
    if r.random() < 0.25:
        print(f"write -z {off} {n}")
    else:
        print(f"write -P {r.randrange(1, 256):#x} {off} {n}")
print(f"write -P 0xee {size - 65536 - 7} 65543")
EOF
)
    recipe_note "commands: $(printf '%q ' "${cmds[@]}")"
    start=$SECONDS
    run "$TOOL" ours.qcow2 "$size" "${cmds[@]}"
    elapsed=$((SECONDS - start))
    run qemu-img create -q -f qcow2 ref.qcow2 "$size"
    qemu_ref ref.qcow2 "${cmds[@]}"
    rc=0
    check_clean ours.qcow2 || rc=1
    compare_ref ours.qcow2 ref.qcow2 || rc=1
    map_model ours.qcow2 65536 "$size" "${cmds[@]}" || rc=1
    used=$(du -k ours.qcow2 | cut -f1)
    if ((used > 64 * 1024)); then
        note "[$CASE] ours.qcow2 occupies ${used} KiB, expected a sparse file"
        rc=1
    fi
    if ((elapsed > 20)); then
        note "[$CASE] writing took ${elapsed}s"
        rc=1
    fi
    case_result "$rc"
fi

# ===========================================================================
# Errors: one line, naming the file
# ===========================================================================

# expect_tool_error NEEDLE -- ARGS...: the tool fails with one stderr line
# containing NEEDLE.
expect_tool_error() {
    local needle=$1 rc=0
    shift 2
    "$TOOL" "$@" >/dev/null 2>err.txt || rc=$?
    if [[ $rc -ne 1 ]]; then
        note "[$CASE] want exit 1, got $rc: $*"
        return 1
    fi
    if [[ $(wc -l <err.txt) -ne 1 ]] || ! grep -qF -- "$needle" err.txt; then
        note "[$CASE] want one line with '$needle': $(cat err.txt)"
        return 1
    fi
}

if want errors; then
    begin_case errors
    rc=0
    expect_tool_error "nodir/x.qcow2: No such file or directory" -- nodir/x.qcow2 1M || rc=1
    expect_tool_error "does not fit in the header cluster" -- \
        -c 512 -b "$(printf 'b%.0s' {1..400})" -F raw x.qcow2 1M || rc=1
    expect_tool_error "cluster size 1000 is not a power of two" -- -c 1000 x.qcow2 1M || rc=1
    expect_tool_error "beyond the virtual size" -- x.qcow2 1M "write 1M 1" || rc=1
    # A failed run leaves no valid image behind.
    if qemu-img info x.qcow2 2>/dev/null | grep 'file format: qcow2' >/dev/null; then
        note "[$CASE] a failed run left a qcow2 image"
        rc=1
    fi
    case_result "$rc"
fi

finish_cases
