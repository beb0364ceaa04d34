#!/bin/bash
# qcbt convert SRC DST: squash a chain into one new qcow2 with its merged
# bitmaps.
#
#   - random chains (bitmap-random.py --compress: 2-4 layers, raw bases,
#     propagated and unpropagated X of mixed granularity, in-use, disabled,
#     hidden behind a cleared autoclear bit, zero writes, discards,
#     compressed clusters): qemu-img compare SRC DST equal, qemu-img check
#     DST clean, no backing file; X in DST exactly when the model
#     (bitmap-model.py, QEMU facts only) merges it tolerantly, with the
#     model's bits read back through qemu-nbd -B, the model's granularity
#     and the recording state of the topmost bitmap used; every other
#     bitmap of the chain equals `qcbt bitmap dump` on SRC.
#   - --bitmaps: rename, enabled=on|off, persistent=off, refusals (not
#     found, strict gap, in use, alias twice, bad spec), --no-bitmaps.
#   - DST never left behind: DST exists, a writer holds SRC (-U reads it),
#     an injected write failure at every step, SIGTERM/SIGINT mid-copy;
#     qemu-img cannot open DST while it is being written.
#
# QCBT_RANDOM_SEEDS="FIRST LAST" (default "1 10").

# shellcheck source=../functions.sh
. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo
# shellcheck source=bitmap-lib.sh
. "$TESTS_DIR/interop/bitmap-lib.sh"

# bitmaps_of IMG: "NAME GRANULARITY FLAGS" per bitmap, from qemu-img info.
bitmaps_of() {
    qemu-img info -U --output=json "$1" 2>/dev/null | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)
for b in d.get("format-specific", {}).get("data", {}).get("bitmaps") or []:
    print(b["name"], b["granularity"], ",".join(b["flags"]) or "-")
'
}

# chain_names TOP: every bitmap name of the chain, once.
chain_names() {
    qemu-img info -U --backing-chain --output=json "$1" 2>/dev/null | "$PYTHON" -c '
import json, sys
seen = []
for l in json.load(sys.stdin):
    for b in l.get("format-specific", {}).get("data", {}).get("bitmaps") or []:
        if b["name"] not in seen:
            seen.append(b["name"])
print("\n".join(seen))
'
}

# check_image SRC DST: guest data equal, DST clean, standalone.
check_image() {
    local rc=0 out crc=0
    out=$(qemu-img compare -U "$1" "$2" 2>&1) || crc=$?
    case $crc in
    0) ;;
    1) note "[$CASE] DST differs from SRC: $out"; rc=1 ;;
    *) fail "[$CASE] oracle broke: qemu-img compare (exit $crc): $out" ;;
    esac
    crc=0
    out=$(qemu-img check "$2" 2>&1) || crc=$?
    if [[ $crc -ne 0 || $out != *"No errors were found"* || $out == *leak* ]]; then
        note "[$CASE] qemu-img check $2 (exit $crc): $out"
        rc=1
    fi
    if qemu-img info --output=json "$2" | grep -q backing-filename; then
        note "[$CASE] DST has a backing file"
        rc=1
    fi
    return "$rc"
}

# dst_map DST ALIAS OUT: ALIAS as QEMU exports it from DST.
dst_map() {
    cap "$3" nbdinfo --map=qemu:dirty-bitmap:"$2" --json -- [ qemu-nbd -r -f qcow2 -B "$2" "$1" ]
}

# same_as_dump SRC NAME DST ALIAS SIZE: DST's ALIAS equals qcbt bitmap
# dump of NAME on SRC (tolerant), at the dump's granularity.
same_as_dump() {
    local src=$1 name=$2 dst=$3 alias=$4 size=$5 g dg
    qc "dump-$name.json" bitmap dump --json "$src" "$name" || {
        note "[$CASE] bitmap dump $name: $(cat "dump-$name.json.err")"
        return 1
    }
    qc "check-$name.json" bitmap check --json "$src" "$name" || return 1
    g=$(info_get "check-$name.json" granularity)
    dg=$(bitmaps_of "$dst" | awk -v n="$alias" '$1 == n { print $2 }')
    [[ $dg == "$g" ]] || { note "[$CASE] $alias: granularity $dg, merge gives $g"; return 1; }
    dst_map "$dst" "$alias" "dst-$alias.json"
    mcompare --size "$size" --context "$CASE $name: qcbt dump on SRC vs $alias in DST" \
        "dump-$name.json" "dst-$alias.json"
}

# --- random chains ------------------------------------------------------------
read -r first last <<<"${QCBT_RANDOM_SEEDS:-1 10}"
for ((seed = first; seed <= last; seed++)); do
    want "seed$seed" || continue
    begin_case "seed$seed"
    json=$("$PYTHON" "$TESTS_DIR/interop/bitmap-random.py" "$seed" "$CASE_DIR" --compress) ||
        fail "[$CASE] could not build the chain"
    mapfile -t MODEL_OPTS < <("$PYTHON" -c 'import json,sys; [print(o) for o in json.loads(sys.argv[1])["model_opts"]]' "$json")
    note "[$CASE] $("$PYTHON" -c 'import json,sys; print(json.loads(sys.argv[1])["desc"])' "$json")"
    rc=0
    size=$(qemu-img info -U --output=json l0.qcow2 | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
    if ! qc conv.out convert --json l0.qcow2 dst.qcow2; then
        note "[$CASE] convert failed: $(cat conv.out.err)"
        case_result 1
        continue
    fi
    check_image l0.qcow2 dst.qcow2 || rc=1
    cs=$(qemu-img info -U --output=json l0.qcow2 | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["cluster-size"])')
    [[ $(qemu-img info --output=json dst.qcow2 | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["cluster-size"])') == "$cs" ]] ||
        { note "[$CASE] DST's cluster size is not the top's ($cs)"; rc=1; }
    # X against the model
    mrc=0
    model dump "${MODEL_OPTS[@]}" --info model.info l0.qcow2 X >model.json 2>model.err || mrc=$?
    if [[ $mrc -eq 0 ]]; then
        g=$(info_get model.info granularity)
        line=$(bitmaps_of dst.qcow2 | awk '$1 == "X"')
        want_flags=$(qemu-img info -U --backing-chain --output=json l0.qcow2 | "$PYTHON" -c '
import json, sys
m = json.load(open(sys.argv[1]))
for i, l in enumerate(json.load(sys.stdin)):
    if m["sources"].get(str(i)) == "bitmap":
        x = [b for b in l["format-specific"]["data"]["bitmaps"] if b["name"] == "X"][0]
        print("auto" if "auto" in x["flags"] else "-")
        break
' model.info)
        if [[ $line != "X $g $want_flags" ]]; then
            note "[$CASE] DST's X: '$line', want 'X $g $want_flags'"
            rc=1
        else
            dst_map dst.qcow2 X dst-X.json
            mcompare --size "$size" --context "$CASE X: model vs DST" model.json dst-X.json || rc=1
        fi
    elif [[ $mrc -eq 2 ]]; then
        if bitmaps_of dst.qcow2 | grep -q '^X '; then
            note "[$CASE] X in DST, the model refuses it: $(head -n 1 model.err)"
            rc=1
        fi
        grep -q "qcbt: warning: bitmap 'X'" conv.out.err ||
            { note "[$CASE] X left out without a warning: $(cat conv.out.err)"; rc=1; }
    else
        fail "[$CASE] oracle broke: model dump (exit $mrc): $(tail -n 3 model.err)"
    fi
    # every other bitmap: in DST exactly when qcbt merges it, equal to it
    while read -r b; do
        [[ -z $b || $b == X ]] && continue
        if "$QCBT" bitmap check "l0.qcow2" "$b" >/dev/null 2>&1; then
            same_as_dump l0.qcow2 "$b" dst.qcow2 "$b" "$size" || rc=1
        elif bitmaps_of dst.qcow2 | grep -q "^$b "; then
            note "[$CASE] $b in DST though it cannot be merged"
            rc=1
        fi
    done < <(chain_names l0.qcow2)
    case_result "$rc"
done

# --- --bitmaps --------------------------------------------------------------------
begin_case spec
rc=0
run qemu-img create -q -f qcow2 -o cluster_size=4096 base.qcow2 $((16 * MiB))
run qemu-img bitmap --add base.qcow2 U
crash base.qcow2 -c 'write -P 0x10 0 64k'
run qemu-img bitmap --add -g 4096 base.qcow2 X
run qemu-img bitmap --add -g 65536 base.qcow2 Y
run qemu-io -f qcow2 -c 'write -P 0x11 1M 100k' -c 'write -c -P 0x12 4M 4k' base.qcow2
run qemu-img bitmap --disable base.qcow2 Y
run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
run qemu-img bitmap --add -g 512 top.qcow2 X
run qemu-io -f qcow2 -c 'write -P 0x13 2M 3000' -c 'write -z 1M 4k' -c 'write -P 0 8M 64k' top.qcow2
size=$(qemu-img info --output=json top.qcow2 | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
# the default: X (strict-valid), Y (tolerant: top's allocation), U skipped
qc all.out convert top.qcow2 all.qcow2 || { note "[$CASE] $(cat all.out.err)"; rc=1; }
check_image top.qcow2 all.qcow2 || rc=1
[[ $(bitmaps_of all.qcow2 | sort) == $'X 512 auto\nY 65536 -' ]] || { note "[$CASE] all: $(bitmaps_of all.qcow2)"; rc=1; }
grep -q "warning: bitmap 'U'.*in use" all.out.err || { note "[$CASE] no warning for U: $(cat all.out.err)"; rc=1; }
grep -q "warning: bitmap 'Y': layer 0 .*allocation" all.out.err || { note "[$CASE] no fallback notice for Y"; rc=1; }
same_as_dump top.qcow2 X all.qcow2 X "$size" || rc=1
same_as_dump top.qcow2 Y all.qcow2 Y "$size" || rc=1
# a zero-filled data cluster stays unallocated
qemu-img map --output=json all.qcow2 | "$PYTHON" -c '
import json, sys
for e in json.load(sys.stdin):
    if e["data"] and e["start"] < (8 << 20) + 65536 and e["start"] + e["length"] > 8 << 20:
        sys.exit("8M: data in DST")' || { note "[$CASE] zeros written as data"; rc=1; }

# --json: what was stored, with the merge's dirty bytes
qc j.out convert --json --bitmaps 'X=jx' --bitmaps 'Y,persistent=off' top.qcow2 j.qcow2 || { note "[$CASE] $(cat j.out.err)"; rc=1; }
qc check-X.json bitmap check --json top.qcow2 X || rc=1
qc check-Y.json bitmap check --json top.qcow2 Y || rc=1
"$PYTHON" - j.out check-X.json check-Y.json "$size" <<'PYEOF' || { note "[$CASE] convert --json disagrees"; rc=1; }
import json, sys
d = json.load(open(sys.argv[1]))
cx, cy = (json.load(open(f)) for f in sys.argv[2:4])
want = {"filename": "j.qcow2", "virtual-size": int(sys.argv[4]), "cluster-size": 65536,
        "bitmaps": [{"name": "X", "alias": "jx", "granularity": cx["granularity"], "enabled": True,
                     "persistent": True, "dirty-bytes": cx["dirty-bytes"]},
                    {"name": "Y", "alias": "Y", "granularity": cy["granularity"], "enabled": False,
                     "persistent": False, "dirty-bytes": cy["dirty-bytes"]}]}
bad = {k: (d.get(k), v) for k, v in want.items() if d.get(k) != v}
if not isinstance(d.get("data-bytes"), int) or d["data-bytes"] <= 0:
    bad["data-bytes"] = d.get("data-bytes")
sys.exit("convert --json: %r" % bad if bad else 0)
PYEOF
[[ $(bitmaps_of j.qcow2) == "jx 512 auto" ]] || { note "[$CASE] j: $(bitmaps_of j.qcow2)"; rc=1; }

qc map.out convert --bitmaps 'X=renamed,enabled=off' --bitmaps 'Y,enabled=on' \
    --bitmaps 'X=gone,persistent=off' top.qcow2 map.qcow2 || { note "[$CASE] $(cat map.out.err)"; rc=1; }
[[ $(bitmaps_of map.qcow2 | sort) == $'Y 65536 auto\nrenamed 512 -' ]] || { note "[$CASE] map: $(bitmaps_of map.qcow2)"; rc=1; }
grep -q "gone.*not stored" map.out || { note "[$CASE] persistent=off not reported: $(cat map.out)"; rc=1; }
same_as_dump top.qcow2 X map.qcow2 renamed "$size" || rc=1
check_image top.qcow2 map.qcow2 || rc=1
qc none.out convert --no-bitmaps top.qcow2 none.qcow2 || rc=1
[[ -z $(bitmaps_of none.qcow2) ]] || { note "[$CASE] --no-bitmaps: $(bitmaps_of none.qcow2)"; rc=1; }
qc strict.out convert --strict --bitmaps X top.qcow2 strict.qcow2 || { note "[$CASE] strict X: $(cat strict.out.err)"; rc=1; }

# refusals: exit 1, one line, no DST
refuse() {
    local needle=$1 dst=$2
    shift 2
    expect_qcbt_error "$needle" -- convert "$@" || rc=1
    [[ ! -e $dst ]] || { note "[$CASE] $dst left behind"; rc=1; }
}
refuse "'nosuch' cannot be used" r1.qcow2 --bitmaps nosuch top.qcow2 r1.qcow2
refuse "missing in the top layer" r2.qcow2 --strict --bitmaps Y top.qcow2 r2.qcow2
refuse "in use" r3.qcow2 --bitmaps U top.qcow2 r3.qcow2
refuse "both published as 'a'" r4.qcow2 --bitmaps X=a --bitmaps Y=a top.qcow2 r4.qcow2
refuse "enabled=maybe" r5.qcow2 --bitmaps X,enabled=maybe top.qcow2 r5.qcow2
refuse "conflict" r6.qcow2 --bitmaps X --no-bitmaps top.qcow2 r6.qcow2
refuse "expected SRC DST" r7.qcow2 top.qcow2
touch exists.qcow2
expect_qcbt_error "already exists" -- convert top.qcow2 exists.qcow2 || rc=1
[[ ! -s exists.qcow2 ]] || { note "[$CASE] exists.qcow2 written"; rc=1; }
case_result "$rc"

# --- locks and failures -----------------------------------------------------------
begin_case failures
rc=0
run qemu-img create -q -f qcow2 base.qcow2 4M
run qemu-img bitmap --add base.qcow2 X
run qemu-io -f qcow2 -c 'write -P 0x11 0 1M' base.qcow2
run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
run qemu-img bitmap --add -g 512 top.qcow2 X
run qemu-io -f qcow2 -c 'write -P 0x12 512k 1M' top.qcow2
qemu-nbd -f qcow2 -k "$CASE_DIR/nbd.sock" base.qcow2 </dev/null >nbd.log 2>&1 &
npid=$!
cleanup_pid "$npid"
wait_nbd "nbd+unix:///?socket=$CASE_DIR/nbd.sock" "$npid" || fail "[$CASE] oracle broke: qemu-nbd: $(cat nbd.log)"
expect_qcbt_error "layer 1" "held by another process" "-U/--force-share" -- convert top.qcow2 held.qcow2 || rc=1
[[ ! -e held.qcow2 ]] || { note "[$CASE] held.qcow2 left behind"; rc=1; }
qc u.out convert -U top.qcow2 u.qcow2 || { note "[$CASE] -U: $(cat u.out.err)"; rc=1; }
kill "$npid"
wait "$npid" 2>/dev/null || true
n=1
while :; do
    erc=0
    QCBT_TEST_FAIL_AT=write:$n "$QCBT" convert top.qcow2 f.qcow2 >/dev/null 2>f.err || erc=$?
    [[ $erc -eq 0 ]] && break
    if [[ $erc -ne 1 || $(wc -l <f.err) -ne 1 || -e f.qcow2 ]]; then
        note "[$CASE] write:$n: exit $erc, file $([[ -e f.qcow2 ]] && echo left || echo gone): $(cat f.err)"
        rc=1
        rm -f f.qcow2
    fi
    n=$((n + 1))
    ((n < 300)) || fail "[$CASE] convert still fails after 300 injected writes"
done
note "[$CASE] failed cleanly at each of $((n - 1)) writes"
((n > 5)) || { note "[$CASE] only $((n - 1)) writes"; rc=1; }
check_image top.qcow2 f.qcow2 || rc=1
[[ $(bitmaps_of f.qcow2) == "X 512 auto" ]] || { note "[$CASE] f.qcow2: $(bitmaps_of f.qcow2)"; rc=1; }
# a fatal signal in the middle leaves no DST, and qcbt dies of it.  The
# test hook holds convert at its 5th write (DST exists, half written)
# until the signal has come: no race with a convert that ends first.
run qemu-img create -q -f qcow2 big.qcow2 1G
run qemu-io -f qcow2 -c 'write -P 0x5a 0 512M' big.qcow2
for sig in TERM INT; do
    rm -f "$CASE_DIR/pause" "$CASE_DIR/pause.resume"
    QCBT_TEST_FAIL_AT=pause-write:5 QCBT_TEST_PAUSE_FILE=$CASE_DIR/pause \
        "$QCBT" convert big.qcow2 sig.qcow2 >/dev/null 2>sig.err &
    pid=$!
    wait_until -p "$pid" -- test -e "$CASE_DIR/pause" ||
        fail "[$CASE] oracle broke: convert never reached its 5th write: $(cat sig.err)"
    [[ -e sig.qcow2 ]] || { note "[$CASE] SIG$sig: no sig.qcow2 at the 5th write"; rc=1; }
    # the handler only records the signal; convert acts on it once the
    # write it is in (held by the hook) returns
    kill -"$sig" "$pid"
    touch "$CASE_DIR/pause.resume"
    erc=0
    wait "$pid" || erc=$?
    want_rc=$((128 + $(kill -l "$sig")))
    if [[ $erc -ne $want_rc || -e sig.qcow2 ]]; then
        note "[$CASE] SIG$sig: exit $erc (want $want_rc), sig.qcow2 $([[ -e sig.qcow2 ]] && echo left || echo gone): $(cat sig.err)"
        rc=1
        rm -f sig.qcow2
    fi
done
# while DST is being written, QEMU cannot open it (our write lock).  -f
# qcow2: before its header is written the file probes as raw, and qemu-img
# info of a raw file asks for no lock at all.
rm -f "$CASE_DIR/pause" "$CASE_DIR/pause.resume"
QCBT_TEST_FAIL_AT=pause-write:5 QCBT_TEST_PAUSE_FILE=$CASE_DIR/pause \
    "$QCBT" convert big.qcow2 busy.qcow2 >/dev/null 2>busy.err &
pid=$!
wait_until -p "$pid" -- test -e "$CASE_DIR/pause" ||
    fail "[$CASE] oracle broke: convert never reached its 5th write: $(cat busy.err)"
out=$(qemu-img info -f qcow2 busy.qcow2 2>&1) && { note "[$CASE] qemu-img info opened a DST being written: $out"; rc=1; }
[[ $out == *"Failed to get shared \"write\" lock"* ]] || { note "[$CASE] qemu-img info on a DST being written: $out"; rc=1; }
touch "$CASE_DIR/pause.resume"
erc=0
wait "$pid" || erc=$?
[[ $erc -eq 0 ]] || { note "[$CASE] convert after the pause: exit $erc: $(cat busy.err)"; rc=1; }
check_image big.qcow2 busy.qcow2 || rc=1
case_result "$rc"

finish_cases
