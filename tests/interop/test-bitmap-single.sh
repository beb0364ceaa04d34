#!/bin/bash
# Single-layer bitmaps: qcbt against QEMU's own view of the same bitmap.
#
#  * `qcbt bitmap dump --json IMG B` equals `nbdinfo --map=qemu:dirty-bitmap:B
#    --json` of `qemu-nbd -r -B B IMG` (and the human output equals
#    `nbdinfo --map`) for granularities 512 B .. 2 GiB, disk sizes that are
#    not a multiple of the granularity, several cluster sizes (one bitmap
#    table entry or many, with all-clean data clusters between), empty and
#    disabled bitmaps;
#  * `qcbt bitmap sha256 --layer 0` (and the merged digest of a one-layer
#    chain) equals x-debug-block-dirty-bitmap-sha256 from a read-only
#    qemu-storage-daemon, and the model's digest of the NBD map;
#  * `qcbt bitmap list --json` matches qemu-img info and QEMU's
#    query-named-block-nodes (granularity, recording, count, inconsistent);
#  * in-use bitmaps and missing names are refused with exit 2;
#  * 1100 bitmaps on one layer;
#  * no qcbt command (nor QEMU's read-only opens) changes a byte of the image.
#
# QCBT_KEEP_TMP=1 keeps the images.  QCBT_CASES=REGEX runs matching cases.

# shellcheck source=../functions.sh
. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo sha256sum
requires qemu-storage-daemon

# shellcheck source=bitmap-lib.sh
. "$TESTS_DIR/interop/bitmap-lib.sh"

# ref_map IMG NAME OUT: QEMU's map of NAME (json); OUT.txt gets the text form.
ref_map() {
    cap "$3" nbdinfo --map="qemu:dirty-bitmap:$2" --json -- [ qemu-nbd -r -f qcow2 -B "$2" "$1" ]
    cap "$3.txt" nbdinfo --map="qemu:dirty-bitmap:$2" -- [ qemu-nbd -r -f qcow2 -B "$2" "$1" ]
}


# check_dump IMG NAME: qcbt dump (json and text) == qemu-nbd -B.  rc 0/1.
check_dump() {
    local img=$1 b=$2 size rc=0 st=0
    size=$(virtual_size "$img" qcow2)
    ref_map "$img" "$b" "ref-$b.json"
    if qc "qcbt-$b.json" bitmap dump --json "$img" "$b"; then
        mcompare --size "$size" --context "$CASE dump --json $b" \
            "ref-$b.json" "qcbt-$b.json" || rc=1
    else
        st=$?
        note "[$CASE] qcbt bitmap dump --json $b failed (exit $st): $(cat "qcbt-$b.json.err")"
        rc=1
    fi
    if qc "qcbt-$b.txt" bitmap dump "$img" "$b"; then
        if model text2json <"qcbt-$b.txt" >"qcbt-$b.txt.json" 2>"qcbt-$b.txt.json.err"; then
            mcompare --size "$size" --context "$CASE dump (text) $b" \
                "ref-$b.json" "qcbt-$b.txt.json" || rc=1
            if ! cmp -s "ref-$b.json.txt" "qcbt-$b.txt"; then
                note "[$CASE] note: text output differs from nbdinfo --map in layout only:"
                diff "ref-$b.json.txt" "qcbt-$b.txt" | head -n 6 | sed 's/^/    /' >&2 || true
            fi
        else
            note "[$CASE] qcbt bitmap dump (text) is not nbdinfo-like: $(cat "qcbt-$b.txt.json.err")"
            head -n 3 "qcbt-$b.txt" | sed 's/^/    /' >&2
            rc=1
        fi
    else
        st=$?
        note "[$CASE] qcbt bitmap dump $b failed (exit $st): $(cat "qcbt-$b.txt.err")"
        rc=1
    fi
    return "$rc"
}

# check_sha IMG NAME GRAN: qcbt sha256 --layer 0 / merged == QEMU == model.
check_sha() {
    local img=$1 b=$2 g=$3 size rc=0 q m s0 sm
    size=$(virtual_size "$img" qcow2)
    qemu_digest "qemu-$b.sha" --alone "$img" "$b"
    q=$(hex64 "qemu-$b.sha")
    [[ -f ref-$b.json ]] || ref_map "$img" "$b" "ref-$b.json"
    cap "model-$b.sha" model digest --granularity "$g" --size "$size" "ref-$b.json"
    m=$(hex64 "model-$b.sha")
    if [[ $m != "$q" ]]; then
        note "[$CASE] MODEL BUG: model digest $m != QEMU $q for $b"
        rc=1
    fi
    if qc "qcbt-$b.sha" bitmap sha256 --layer 0 "$img" "$b"; then
        s0=$(hex64 "qcbt-$b.sha")
        if [[ $s0 != "$q" ]]; then
            note "[$CASE] qcbt bitmap sha256 --layer 0 $b = '$(cat "qcbt-$b.sha")', QEMU x-debug-block-dirty-bitmap-sha256 = $q"
            rc=1
        fi
    else
        note "[$CASE] qcbt bitmap sha256 --layer 0 $b failed: $(cat "qcbt-$b.sha.err")"
        rc=1
    fi
    if qc "qcbt-$b.msha" bitmap sha256 "$img" "$b"; then
        sm=$(hex64 "qcbt-$b.msha")
        if [[ $sm != "$q" ]]; then
            note "[$CASE] qcbt bitmap sha256 (merged, one layer) $b = '$(cat "qcbt-$b.msha")', QEMU = $q"
            rc=1
        fi
    else
        note "[$CASE] qcbt bitmap sha256 $b failed: $(cat "qcbt-$b.msha.err")"
        rc=1
    fi
    return "$rc"
}

# check_list IMG: qcbt bitmap list --json == qemu-img info + QEMU's view.
check_list() {
    local img=$1
    cap qemu-info.json qemu-img info -U --output=json "$img"
    cap qemu-bitmaps.json model qemu-bitmaps "$img"
    if ! qc qcbt-list.json bitmap list --json "$img"; then
        note "[$CASE] qcbt bitmap list --json failed: $(cat qcbt-list.json.err)"
        return 1
    fi
    "$PYTHON" - "$CASE" qemu-info.json qemu-bitmaps.json qcbt-list.json <<'EOF'
import json, sys
case, info, qb, ql = sys.argv[1:]
info = json.load(open(info)); qb = json.load(open(qb))
try:
    got = json.load(open(ql))
except ValueError as e:
    sys.exit("[%s] qcbt bitmap list --json: invalid JSON: %s" % (case, e))
bad = []
def err(m):
    bad.append(m)
ibm = info.get("format-specific", {}).get("data", {}).get("bitmaps") or []
layers = got.get("layers") if isinstance(got, dict) else None
if not isinstance(layers, list) or len(layers) != 1:
    sys.exit("[%s] list: expected 1 layer, got %r" % (case, layers if not isinstance(layers, list) else len(layers)))
L = layers[0]
if L.get("depth") != 0: err("layer depth %r" % L.get("depth"))
if not isinstance(L.get("filename"), str): err("layer filename %r" % L.get("filename"))
if ibm and L.get("usable") is not True: err("layer usable %r (QEMU loads %d bitmaps)" % (L.get("usable"), len(ibm)))
bms = L.get("bitmaps")
if not isinstance(bms, list):
    sys.exit("[%s] list: bitmaps is %r" % (case, bms))
names = [b.get("name") for b in bms]
want = [b["name"] for b in ibm]
if names != want:
    if sorted(names) == sorted(want):
        err("bitmap order differs from the directory order qemu-img info shows: first difference at index %d: qcbt %r, qemu %r"
            % (next(i for i in range(len(names)) if names[i] != want[i]), names[:5], want[:5]))
    else:
        err("bitmap names: qcbt %r, qemu %r" % (names[:10], want[:10]))
qmap = {b["name"]: b for b in qb}
def nbd_dirty(n):
    # ref-NAME.json: nbdinfo --map of qemu-nbd -B NAME, when the case made it;
    # else QEMU's count with the last bit clipped at the disk end
    try:
        return sum(e["length"] for e in json.load(open("ref-%s.json" % n)) if e["type"] & 1)
    except OSError:
        return None
keys = {"name", "granularity", "in-use", "enabled", "dirty-bytes", "status"}
for b in bms:
    n = b.get("name")
    i = next((x for x in ibm if x["name"] == n), None)
    q = qmap.get(n)
    if i is None or q is None:
        continue
    missing = keys - set(b)
    if missing: err("%s: missing keys %s" % (n, sorted(missing)))
    extra = set(b) - keys - {"reason"}
    if extra: err("%s: unexpected keys %s" % (n, sorted(extra)))
    inuse = "in-use" in i["flags"]
    # dirty-bytes: the guest bytes the bitmap marks dirty = the dirty total
    # of qemu-nbd's map (clipped at the disk end).  QEMU's own "count"
    # (query-named-block-nodes) counts whole bits, so it is larger by the
    # part of a dirty last bit beyond the end; reported, not an error.
    exp = {"granularity": i["granularity"], "in-use": inuse,
           "enabled": "auto" in i["flags"],
           "status": "in-use" if inuse else "ok",
           "dirty-bytes": None if inuse else nbd_dirty(n)}
    if not inuse and b.get("dirty-bytes") != q["count"] and b.get("dirty-bytes") == exp["dirty-bytes"]:
        print("[%s] info: %s dirty-bytes %d (clipped at the disk end); QEMU count %d (whole bits)"
              % (case, n, exp["dirty-bytes"], q["count"]), file=sys.stderr)
    if q["granularity"] != i["granularity"]: err("QEMU disagrees with itself on granularity of %s" % n)
    if bool(q.get("inconsistent")) != inuse: err("QEMU disagrees with itself on in-use of %s" % n)
    for k, v in exp.items():
        if k == "dirty-bytes" and v is None and not inuse:
            # no map made: QEMU's count, less the tail of the last bit if set
            g, size = q["granularity"], info["virtual-size"]
            if b.get(k) not in (q["count"], q["count"] - (-(-size // g) * g - size)):
                err("%s: dirty-bytes = %r, QEMU count %d" % (n, b.get(k), q["count"]))
            continue
        if b.get(k) != v or type(b.get(k)) != type(v):
            src = "QEMU query-named-block-nodes count" if k == "dirty-bytes" else "qemu-img info"
            err("%s: %s = %r, expected %r (%s)" % (n, k, b.get(k), v, src))
    if inuse and not isinstance(b.get("reason"), str):
        err("%s: in-use bitmap without a reason" % n)
if bad:
    print("[%s] qcbt bitmap list --json disagrees (%d problems):" % (case, len(bad)), file=sys.stderr)
    for m in bad[:20]:
        print("    " + m, file=sys.stderr)
    sys.exit(1)
EOF
}

# pattern IMG G: writes scaled to granularity G in a disk of 7G+1536 bytes
# (or the given size): first byte, a write straddling bits 0/1, a 2G write
# straddling three bits, a zero write, a discard of written data, the last
# byte (partial last bit).
pattern() {
    local img=$1 g=$2 size long
    size=$(virtual_size "$img" qcow2)
    long=(-c "write -P 0x13 $((3 * g + 100)) $((2 * g))")
    # no GiBs of data for 2 GiB granularity (qemu-io caps a request below
    # 2 GiB anyway): small writes in bits 3, 3|4 (straddling) and 5 instead
    ((g <= MiB)) || long=(-c "write -P 0x13 $((3 * g + 100)) 4096"
                          -c "write -z $((4 * g - 2048)) 4096" -c "write -P 0x15 $((5 * g)) 512")
    run qemu-io -f qcow2 -c "write -P 0x11 0 1" -c "write -P 0x12 $((g - 1)) 2" \
        "${long[@]}" \
        -c "write -z $((6 * g)) 512" \
        -c "write -P 0x14 $((size - 1)) 1" "$img"
}

# --- granularity x cluster size, odd disk sizes ----------------------------

for spec in 512:65536 4096:4096 4096:512 65536:65536 $((1 * MiB)):$((2 * MiB)) \
            $((2 * GiB)):65536; do
    IFS=: read -r g c <<<"$spec"
    name=gran$g-c$c
    want "$name" || continue
    begin_case "$name"
    size=$((7 * g + 1536))
    run qemu-img create -q -f qcow2 -o cluster_size="$c" img.qcow2 "$size"
    run qemu-io -f qcow2 -c "write -P 0x01 $((4 * g)) $((g < 4096 ? g : 4096))" img.qcow2  # before the bitmap: not dirty
    run qemu-img bitmap --add -g "$g" img.qcow2 b
    pattern img.qcow2 "$g"
    # discard data that was written before the bitmap existed: dirty now
    run qemu-io -f qcow2 -c "discard $((4 * g)) $((g < 4096 ? g : 4096))" img.qcow2
    before=$(sha_file img.qcow2)
    rc=0
    check_dump img.qcow2 b || rc=1
    check_sha img.qcow2 b "$g" || rc=1
    check_list img.qcow2 || rc=1
    unchanged img.qcow2 "$before" || rc=1
    case_result "$rc"
done

# Many bitmap table entries: 512 B clusters, 4 KiB granularity (16 MiB per
# bitmap data cluster), writes every 40 MiB -> allocated and unallocated
# (all-clean) data clusters alternate; and a 100 GiB disk with 64 KiB
# clusters (32 GiB per data cluster).
for spec in 4096:512:$((400 * MiB + 512)):$((40 * MiB)) \
            65536:65536:$((100 * GiB + 512)):$((35 * GiB)) \
            512:4096:$((64 * MiB)):$((3 * MiB + 512)); do
    IFS=: read -r g c size step <<<"$spec"
    name=table-g$g-c$c
    want "$name" || continue
    begin_case "$name"
    run qemu-img create -q -f qcow2 -o cluster_size="$c" img.qcow2 "$size"
    run qemu-img bitmap --add -g "$g" img.qcow2 b
    cmds=()
    for ((o = 0; o + 8192 <= size; o += 2 * step)); do
        cmds+=(-c "write -P 0x21 $((o + 100)) 3000")
    done
    cmds+=(-c "write -P 0x22 $((size - 512)) 512")
    run qemu-io -f qcow2 "${cmds[@]}" img.qcow2
    before=$(sha_file img.qcow2)
    rc=0
    check_dump img.qcow2 b || rc=1
    check_sha img.qcow2 b "$g" || rc=1
    check_list img.qcow2 || rc=1
    unchanged img.qcow2 "$before" || rc=1
    case_result "$rc"
done

# --- empty, disabled, several bitmaps on one layer ---------------------------

if want states; then
    begin_case states
    size=$((10 * MiB + 512))
    run qemu-img create -q -f qcow2 img.qcow2 $size
    run qemu-io -f qcow2 -c "write -P 0x31 0 1M" img.qcow2
    run qemu-img bitmap --add -g 65536 img.qcow2 empty          # never written after
    run qemu-img bitmap --add --disable -g 4096 img.qcow2 off   # disabled from the start
    run qemu-img bitmap --add -g 4096 img.qcow2 frozen          # records, then disabled
    run qemu-img bitmap --add -g $((1 * MiB)) img.qcow2 on      # always recording
    run qemu-img bitmap --clear img.qcow2 empty
    run qemu-io -f qcow2 -c "write -P 0x32 $((2 * MiB + 4095)) 2" -c "write -z $((5 * MiB)) 4096" img.qcow2
    run qemu-img bitmap --disable img.qcow2 frozen
    run qemu-img bitmap --add -g 512 img.qcow2 late              # after the writes above
    run qemu-io -f qcow2 -c "write -P 0x33 $((7 * MiB)) 512" -c "discard 0 64k" \
        -c "write -P 0x34 $((size - 512)) 512" img.qcow2
    run qemu-img bitmap --remove img.qcow2 empty
    run qemu-img bitmap --add -g 65536 img.qcow2 empty          # re-added: appended, empty
    before=$(sha_file img.qcow2)
    rc=0
    for b in empty off frozen on late; do
        check_dump img.qcow2 $b || rc=1
    done
    check_sha img.qcow2 empty 65536 || rc=1
    check_sha img.qcow2 off 4096 || rc=1
    check_sha img.qcow2 frozen 4096 || rc=1
    check_sha img.qcow2 on $((1 * MiB)) || rc=1
    check_sha img.qcow2 late 512 || rc=1
    check_list img.qcow2 || rc=1
    # check --json on a valid single layer
    if qc check.json bitmap check --json img.qcow2 frozen; then
        "$PYTHON" - "$CASE" check.json <<'EOF' || rc=1
import json, sys
case, p = sys.argv[1:]
d = json.load(open(p))
exp = {"name": "frozen", "mode": "tolerant", "usable": True, "granularity": 4096,
       "deepest-layer": 0}
bad = ["%s = %r, expected %r" % (k, d.get(k), v) for k, v in exp.items() if d.get(k) != v]
ls = d.get("layers")
if not (isinstance(ls, list) and len(ls) == 1 and ls[0].get("depth") == 0
        and ls[0].get("source") == "bitmap"):
    bad.append("layers = %r, expected one layer, depth 0, source bitmap" % ls)
if "error" in d: bad.append("error present: %r" % d["error"])
if bad:
    print("[%s] qcbt bitmap check --json: %s" % (case, "; ".join(bad)), file=sys.stderr)
    sys.exit(1)
EOF
    else
        note "[$CASE] qcbt bitmap check --json img.qcow2 frozen: exit $?: $(cat check.json.err)"
        rc=1
    fi
    for m in "" --strict; do
        qc check.out bitmap check $m img.qcow2 on ||
            { note "[$CASE] qcbt bitmap check $m on: exit $? $(cat check.out.err)"; rc=1; }
    done
    unchanged img.qcow2 "$before" || rc=1
    case_result "$rc"
fi

# --- awkward names: JSON escaping, UTF-8, control bytes, 1023 bytes -----------

if want names; then
    begin_case names
    run qemu-img create -q -f qcow2 img.qcow2 $((8 * MiB))
    names=('with space' 'quote"and\backslash' 'ünïcødé-名前' $'tab\there' $'ctl\001x'
           "$(printf 'n%.0s' {1..1023})" ':colon/slash')
    for n in "${names[@]}"; do
        run qemu-img bitmap --add -g 65536 img.qcow2 "$n"
    done
    run qemu-io -f qcow2 -c "write -P 0x35 $((1 * MiB)) 4k" img.qcow2
    before=$(sha_file img.qcow2)
    rc=0
    check_list img.qcow2 || rc=1
    i=0
    for n in "${names[@]}"; do
        # files are named by index; check_dump names them after the bitmap
        mkdir -p "n$i" && (cd "n$i" && ln -sf ../img.qcow2 img.qcow2)
        pushd "n$i" >/dev/null
        ref_map img.qcow2 "$n" ref.json
        if qc dump.json bitmap dump --json img.qcow2 "$n"; then
            mcompare --context "$CASE name #$i" ref.json dump.json || rc=1
        else
            note "[$CASE] qcbt bitmap dump --json of bitmap #$i failed: $(cat dump.json.err)"
            rc=1
        fi
        popd >/dev/null
        i=$((i + 1))
    done
    unchanged img.qcow2 "$before" || rc=1
    case_result "$rc"
fi

# --- in-use and missing -------------------------------------------------------

if want in-use; then
    begin_case in-use
    run qemu-img create -q -f qcow2 img.qcow2 $((8 * MiB))
    run qemu-img bitmap --add -g 65536 img.qcow2 bad
    run qemu-io -f qcow2 -c "write -P 0x41 0 64k" img.qcow2
    crash img.qcow2 -c "write -P 0x42 1M 64k"
    # every loaded bitmap is in-use now; a fresh one is stored cleanly on
    # the next rw open while the in-use one is left untouched
    run qemu-img bitmap --add -g 65536 img.qcow2 good
    run qemu-io -f qcow2 -c "write -P 0x43 2M 64k" img.qcow2
    qemu-img info img.qcow2 | grep in-use >/dev/null || fail "[$CASE] could not make an in-use bitmap"
    before=$(sha_file img.qcow2)
    rc=0
    check_list img.qcow2 || rc=1
    check_dump img.qcow2 good || rc=1
    expect_exit2 "in use at layer 0" -- bitmap check img.qcow2 bad || rc=1
    expect_exit2 "in use at layer 0" -- bitmap check --strict img.qcow2 bad || rc=1
    expect_exit2 "in use" -- bitmap dump --json img.qcow2 bad || rc=1
    expect_exit2 "in use" -- bitmap dump --strict img.qcow2 bad || rc=1
    expect_exit2 nosuch -- bitmap check --strict img.qcow2 nosuch || rc=1
    expect_exit2 nosuch -- bitmap check img.qcow2 nosuch || rc=1
    expect_exit2 nosuch -- bitmap dump img.qcow2 nosuch || rc=1
    if qc check.json bitmap check --json img.qcow2 bad; then
        note "[$CASE] bitmap check --json on an in-use bitmap exited 0"
        rc=1
    else
        st=$?
        [[ $st -eq 2 ]] || { note "[$CASE] bitmap check --json in-use: exit $st, expected 2"; rc=1; }
        "$PYTHON" -c '
import json, sys
d = json.load(open(sys.argv[1]))
ok = d.get("usable") is False and isinstance(d.get("error"), str)
if not ok:
    sys.exit("[in-use] check --json: usable=%r error=%r" % (d.get("usable"), d.get("error")))
' check.json || rc=1
    fi
    # QEMU hashes an in-use bitmap as all zeros (it never loads it); qcbt
    # may refuse instead, but must not print some other digest.
    qemu_digest qemu-bad.sha --alone img.qcow2 bad
    if qc qcbt-bad.sha bitmap sha256 --layer 0 img.qcow2 bad; then
        if [[ $(hex64 qcbt-bad.sha) != "$(hex64 qemu-bad.sha)" ]]; then
            note "[$CASE] sha256 --layer 0 of in-use bitmap: qcbt $(cat qcbt-bad.sha), QEMU $(cat qemu-bad.sha)"
            rc=1
        fi
    else
        note "[$CASE] (info) qcbt bitmap sha256 --layer 0 of an in-use bitmap: exit $?: $(cat qcbt-bad.sha.err)"
    fi
    unchanged img.qcow2 "$before" || rc=1
    case_result "$rc"
fi

# --- many bitmaps on one layer ------------------------------------------------

if want many; then
    begin_case many
    run qemu-img create -q -f qcow2 img.qcow2 $((3 * GiB + 512))
    t0=$SECONDS
    run model qemu-add img.qcow2 65536 e 600
    run model qemu-add --disabled img.qcow2 $((1 * MiB)) d 300
    run model qemu-add img.qcow2 512 s 200
    run qemu-io -f qcow2 -c "write -P 0x51 $((GiB - 512)) 1024" -c "write -z $((2 * GiB)) 1M" \
        -c "write -P 0x52 $((3 * GiB)) 512" img.qcow2
    note "[$CASE] 1100 bitmaps created and written in $((SECONDS - t0)) s"
    before=$(sha_file img.qcow2)
    rc=0
    t0=$SECONDS
    check_list img.qcow2 || rc=1
    for b in e0 e599 d0 d299 s0 s199 e300; do
        check_dump img.qcow2 $b || rc=1
    done
    check_sha img.qcow2 s199 512 || rc=1
    check_sha img.qcow2 d150 $((1 * MiB)) || rc=1
    note "[$CASE] checks took $((SECONDS - t0)) s"
    unchanged img.qcow2 "$before" || rc=1
    case_result "$rc"
fi

# --- guest data on the bitmap's data cluster (made by QEMU, then damaged) ----
# The guest L2 entry of cluster 0 is pointed at the data cluster of X: QEMU
# opens the image and reads the bitmap's bits as guest data (only
# qemu-img check finds it); qcbt must refuse X naming the overlap, not
# publish bits the guest has been writing over.

if want guest-overlap; then
    begin_case guest-overlap
    rc=0
    run qemu-img create -q -f qcow2 img.qcow2 64M
    run qemu-io -f qcow2 -c "write -P 0x11 0 64k" img.qcow2
    run qemu-img bitmap --add img.qcow2 X
    run qemu-io -f qcow2 -c "write -P 0x22 1M 64k" img.qcow2
    run "$PYTHON" - img.qcow2 <<'PYEOF'
import struct, sys
f = open(sys.argv[1], "r+b")
h = f.read(4096)
cbits = struct.unpack(">I", h[20:24])[0]
l1_off = struct.unpack(">Q", h[40:48])[0]
hlen = struct.unpack(">I", h[100:104])[0]
pos, dir_off = hlen, None
while pos + 8 <= len(h):
    t, n = struct.unpack(">II", h[pos:pos + 8])
    if t == 0:
        break
    if t == 0x23852875:
        dir_off = struct.unpack(">Q", h[pos + 8 + 16:pos + 8 + 24])[0]
    pos += 8 + (n + 7) // 8 * 8
assert dir_off, "no bitmaps extension"
f.seek(dir_off)
table_off = struct.unpack(">Q", f.read(8))[0]
f.seek(table_off)
data = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
assert data, "bitmap X has no data cluster"
f.seek(l1_off)
l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
f.seek(l2)
f.write(struct.pack(">Q", data | (1 << 63)))
PYEOF
    if qemu-img check -q img.qcow2 >check.out 2>&1; then
        note "[$CASE] FAIL: qemu-img check found nothing wrong"
        rc=1
    fi
    out=$("$QCBT" bitmap check img.qcow2 X 2>&1) && st=0 || st=$?
    if [[ $st -ne 2 || $out != *"also guest data"* ]]; then
        note "[$CASE] FAIL: qcbt bitmap check: exit $st (expected 2): $out"
        rc=1
    fi
    case_result "$rc"
fi

# --- the QEMU oracle itself -------------------------------------------------
# A stand-in qemu-storage-daemon ($QCBT_QSD) misbehaves as QEMU 7.2 did when
# its monitor raised "opened" twice: after qmp_capabilities a second
# greeting, then every command refused as in capabilities negotiation, and
# (like QEMU) it keeps running when its monitor goes away.  The oracle must
# fail at once saying so, kill the daemon, and its callers must report
# "oracle broke", never a qcbt mismatch.  A daemon that never answers must
# die with the oracle, even when the oracle is killed (SIGKILL).

if want oracle-qmp; then
    begin_case oracle-qmp
    rc=0
    cat >fake-qsd.py <<'PYEOF'
import json, os, socket, sys, time
mode, state = os.environ["FAKE_QSD_MODE"], os.environ["FAKE_QSD_STATE"]
spec = sys.argv[sys.argv.index("--chardev") + 1]
opts = dict(kv.split("=", 1) for kv in spec.split(",")[1:])
with open(state, "w") as f:
    f.write("%d\n" % os.getpid())
if "fd" in opts:
    s = socket.socket(fileno=int(opts["fd"]))
else:                               # the old way: a listening socket
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(opts["path"])
    ls.listen(1)
    s, _ = ls.accept()
greeting = {"QMP": {"version": {}, "capabilities": ["oob"]}}
send = lambda m: s.sendall((json.dumps(m) + "\r\n").encode())
send(greeting)
ready = False
for line in s.makefile("r"):
    m = json.loads(line)
    ex, i = m.get("execute"), m.get("id")
    if ex == "qmp_capabilities":
        send({"return": {}, "id": i})
        if mode == "double-greeting":
            send(greeting)          # and back in capabilities negotiation
        else:
            ready = True
    elif not ready:
        send({"error": {"class": "CommandNotFound", "desc":
              "Expecting capabilities negotiation with 'qmp_capabilities'"},
              "id": i})
    elif ex == "quit":
        send({"return": {}, "id": i})
        sys.exit(0)
    else:                           # mode "hang": no answer, ever
        with open(state, "a") as f:
            f.write("hung\n")
while True:                         # the monitor is gone; QEMU runs on
    time.sleep(60)
PYEOF
    run qemu-img create -q -f qcow2 img.qcow2 1M
    run qemu-img bitmap --add img.qcow2 b0
    export QCBT_QSD=$CASE_DIR/fake-qsd.py FAKE_QSD_STATE=$CASE_DIR/qsd.state
    chmod +x fake-qsd.py
    sed -i "1i #!$PYTHON" fake-qsd.py

    # A second greeting: the oracle fails at once, saying why, no orphan.
    t0=$EPOCHSECONDS
    st=0
    FAKE_QSD_MODE=double-greeting model qemu-sha256 --alone img.qcow2 b0 >oracle.out 2>oracle.err || st=$?
    qpid=$(head -n 1 qsd.state)
    if [[ $st -eq 0 || -s oracle.out ]] || ! grep -q "second greeting" oracle.err; then
        note "[$CASE] FAIL: a second QMP greeting: exit $st, stdout '$(cat oracle.out)', stderr '$(cat oracle.err)'"
        rc=1
    fi
    if ((EPOCHSECONDS - t0 > 60)); then
        note "[$CASE] FAIL: the oracle took $((EPOCHSECONDS - t0)) s to give up"
        rc=1
    fi
    pid_alive "$qpid" && { note "[$CASE] FAIL: the daemon $qpid outlived the oracle"; kill -KILL "$qpid"; rc=1; }
    # ... and its callers say "oracle broke", not that qcbt is wrong.
    st=0
    (FAKE_QSD_MODE=double-greeting qemu_digest caller.sha --alone img.qcow2 b0) 2>caller.err || st=$?
    if [[ $st -eq 0 ]] || ! grep -q "oracle broke: .*second greeting" caller.err; then
        note "[$CASE] FAIL: qemu_digest with a broken oracle: exit $st: $(cat caller.err)"
        rc=1
    fi

    # A daemon that never answers dies with the oracle, even on SIGKILL.
    rm -f qsd.state
    FAKE_QSD_MODE=hang "$PYTHON" "$MODEL" qemu-sha256 --alone img.qcow2 b0 >/dev/null 2>hang.err &
    opid=$!
    if wait_until -p "$opid" -- grep -qs hung qsd.state; then
        qpid=$(head -n 1 qsd.state)
        kill -KILL "$opid"
        wait "$opid" 2>/dev/null || true
        wait_gone "$qpid" || { note "[$CASE] FAIL: the daemon $qpid outlived the killed oracle"; kill -KILL "$qpid"; rc=1; }
    else
        note "[$CASE] FAIL: the stand-in daemon never got the digest command: $(cat hang.err)"
        rc=1
    fi
    unset QCBT_QSD FAKE_QSD_STATE
    case_result "$rc"
fi

finish_cases
