# shellcheck shell=bash
# Helpers shared by tests/interop/test-bitmap-*.sh; sourced after
# ../functions.sh (which provides $QCBT, $PYTHON, begin_case, run, ...).
#
# Oracles: QEMU's tools (qemu-nbd -B + nbdinfo --map, qemu-img bitmap
# --merge, x-debug-block-dirty-bitmap-sha256 via qemu-storage-daemon) and
# bitmap-model.py (a reference model fed only with QEMU facts).

MODEL=$TESTS_DIR/interop/bitmap-model.py
# shellcheck disable=SC2034 # for the sourcing scripts
KiB=1024 MiB=$((1024 * 1024)) GiB=$((1024 * 1024 * 1024))

want() { [[ -z ${QCBT_CASES:-} || $1 =~ $QCBT_CASES ]]; }

model() { "$PYTHON" "$MODEL" "$@"; }

# qc OUT ARGS...: run qcbt ARGS with stdout to OUT and stderr to OUT.err,
# logged in the recipe; returns qcbt's exit status.
qc() {
    local out=$1 rc=0
    shift
    { printf '%q ' "$QCBT" "$@"; printf '> %q\n' "$out"; } >>"$CASE_DIR/recipe.txt"
    "$QCBT" "$@" >"$out" 2>"$out.err" </dev/null || rc=$?
    return "$rc"
}

# cap OUT CMD...: run a reference command (an oracle) with stdout to OUT
# (logged); a failure or no output is a broken test: "oracle broke".
cap() {
    local out=$1
    shift
    { printf '%q ' "$@"; printf '> %q\n' "$out"; } >>"$CASE_DIR/recipe.txt"
    "$@" >"$out" 2>>"$CASE_DIR/run.log" ||
        fail "[$CASE] oracle broke: $* failed ($(tail -n 3 "$CASE_DIR/run.log"))"
    [[ -s $out ]] || fail "[$CASE] oracle broke: $* printed nothing ($(tail -n 3 "$CASE_DIR/run.log"))"
}

sha_file() { sha256sum "$1" | cut -d' ' -f1; }
hex64() { grep -oE '\b[0-9a-f]{64}\b' "$1" | head -n 1; }

# An oracle (QEMU's tools, the model) that fails or gives no answer is a
# broken test, never a qcbt mismatch: the script stops with
# "oracle broke: ..." and what the oracle said.

# qemu_digest OUT [--alone] IMAGE NAME: x-debug-block-dirty-bitmap-sha256
# of NAME from a read-only qemu-storage-daemon (model qemu-sha256), the
# line "NAME DIGEST" in OUT (read it with hex64 OUT).  Every caller asks for
# a bitmap QEMU sees, so "NAME error: ..." is no answer either.
qemu_digest() {
    local out=$1 name=${!#} rc=0
    shift
    { printf '%q ' model qemu-sha256 "$@"; printf '> %q\n' "$out"; } >>"$CASE_DIR/recipe.txt"
    model qemu-sha256 "$@" >"$out" 2>"$out.err" || rc=$?
    if [[ $rc -ne 0 ]] ||
        ! awk -v n="$name" '$1 == n && NF == 2 && length($2) == 64 && $2 ~ /^[0-9a-f]+$/ { ok = 1 } END { exit !ok }' "$out"; then
        fail "[$CASE] oracle broke: model qemu-sha256 $* (exit $rc) gave no digest for $name: $(cat "$out" "$out.err" | tail -n 5)"
    fi
}

# mcompare ARGS...: model compare ARGS (exit 0 equal, 1 different: the
# difference is on stderr); an EXPECTED map that is not a map (the oracle's
# answer) stops the test as "oracle broke".
mcompare() {
    local rc=0
    model compare "$@" || rc=$?
    [[ $rc -le 1 ]] || fail "[$CASE] oracle broke: model compare $* (exit $rc, see above)"
    return "$rc"
}

# crash IMG QEMU-IO-ARGS...: a qemu-io session killed by SIGKILL after a
# flush: every bitmap it loaded stays in-use on disk.
crash() {
    local img=$1
    shift
    { printf '%q ' qemu-io -f qcow2 "$@" -c flush -c "sigraise 9" "$img"; printf ' # killed\n'; } >>"$CASE_DIR/recipe.txt"
    sh -c '"$@" >/dev/null 2>&1; exit 0' sh qemu-io -f qcow2 "$@" -c flush -c "sigraise 9" "$img" || true
    qemu-img info -U --output=json "$img" | grep '"in-use"' >/dev/null ||
        fail "[$CASE] could not leave a bitmap in-use in $img"
}

# unchanged IMG SHA: the image file still has digest SHA.
unchanged() {
    local now
    now=$(sha_file "$1")
    if [[ $now != "$2" ]]; then
        note "[$CASE] $1 CHANGED by a read-only operation (sha256 $2 -> $now)"
        return 1
    fi
}

# rule_regex RULE: the extended regex a refusal message must match for a
# model rule ("missing in top", "gap at layer N", "in use at layer N").
rule_regex() {
    case $1 in
    "missing in top") printf '%s' 'missing in (the )?top' ;;
    "missing everywhere") printf '%s' 'not found|missing' ;;
    *) printf '%s' "$1" ;;
    esac
}

# expect_exit2 REGEX... -- ARGS: qcbt ARGS exits 2 with one "qcbt: " line
# on stderr matching every REGEX (grep -E).
expect_exit2() {
    local needles=() a rc=0 n
    while [[ $# -gt 0 ]]; do
        a=$1
        shift
        [[ $a == -- ]] && break
        needles+=("$a")
    done
    qc refusal.out "$@" || rc=$?
    if [[ $rc -ne 2 ]]; then
        note "[$CASE] expected exit 2, got $rc: qcbt $* (stderr: $(cat refusal.out.err))"
        [[ $rc -eq 0 ]] && head -c 300 refusal.out | sed 's/^/    stdout: /' >&2
        return 1
    fi
    if [[ $(wc -l <refusal.out.err) -ne 1 || $(head -c6 refusal.out.err) != "qcbt: " ]]; then
        note "[$CASE] expected one 'qcbt: ' stderr line: qcbt $*"
        sed 's/^/    stderr: /' refusal.out.err >&2
        return 1
    fi
    for n in "${needles[@]}"; do
        if ! grep -qE -- "$n" refusal.out.err; then
            note "[$CASE] stderr does not match /$n/: $(cat refusal.out.err)  (qcbt $*)"
            return 1
        fi
    done
    return 0
}

# qemu_union TOP NAME G K OUT: QEMU's own union of NAME over layers 0..K of
# TOP's chain: a fresh disabled bitmap of granularity G in a copy of TOP,
# filled with qemu-img bitmap --merge NAME -b LAYER from every layer, then
# exported by qemu-nbd -B (map in OUT, digest in OUT.sha).
qemu_union() {
    local top=$1 b=$2 g=$3 k=$4 out=$5 u i layers
    u=$(dirname "$top")/union-$(basename "$top")
    mapfile -t layers < <(qemu-img info -U --backing-chain --output=json "$top" 2>>"$CASE_DIR/run.log" |
        "$PYTHON" -c 'import json,sys; [print(l["filename"]) for l in json.load(sys.stdin)]')
    run cp "$top" "$u"
    run qemu-img bitmap --add --disable -g "$g" "$u" qcbt-union
    for ((i = 0; i <= k; i++)); do
        run qemu-img bitmap --merge "$b" -b "${layers[i]}" -F qcow2 "$u" qcbt-union
    done
    cap "$out" nbdinfo --map=qemu:dirty-bitmap:qcbt-union --json -- [ qemu-nbd -r -f qcow2 -B qcbt-union "$u" ]
    qemu_digest "$out.sha" "$u" qcbt-union
}

# info_get FILE KEY: a top-level field of a model --info file.
info_get() {
    "$PYTHON" -c 'import json,sys; v = json.load(open(sys.argv[1])).get(sys.argv[2]); print("" if v is None else v)' "$1" "$2"
}

MODEL_OPTS=() # extra facts for the model (dump --invalid N)
NO_QEMU_UNION= # set for chains qemu-img bitmap --merge refuses (layer sizes differ)

# verify_merge TOP NAME STRICT TOLERANT
# Checks qcbt bitmap dump/check/sha256 in both modes.  STRICT and TOLERANT
# say what the case was built to give: "ok", "refuse:RULE" (a model rule,
# e.g. "gap at layer 1") or "model" (whatever the model says: random tests).
# The model must agree with the case's expectation (else the test is wrong).
# When strict succeeds, QEMU's own union (qemu-img bitmap --merge) is a
# second oracle for the dump and the digest.  Returns 0/1.
verify_merge() {
    local top=$1 b=$2 rc=0 mode want mopt mrc qrc size g k rule first digest i chain
    local -A expect=([strict]=$3 [tolerant]=$4)
    local sums=() f
    # every file of the chain, to prove nothing is modified
    mapfile -t chain < <(qemu-img info -U --backing-chain --output=json "$top" 2>>"$CASE_DIR/run.log" |
        "$PYTHON" -c 'import json,sys; [print(l["filename"]) for l in json.load(sys.stdin)]')
    for f in "${chain[@]}"; do sums+=("$(sha_file "$f")"); done
    size=$(qemu-img info -U --output=json "$top" 2>>"$CASE_DIR/run.log" |
        "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
    for mode in strict tolerant; do
        want=${expect[$mode]}
        mopt=()
        [[ $mode == strict ]] && mopt=(--strict)
        mrc=0
        { printf 'model dump %s %s --info model-%s.info %q %q > model-%s.json\n' "${mopt[*]}" "${MODEL_OPTS[*]}" "$mode" "$top" "$b" "$mode"; } >>"$CASE_DIR/recipe.txt"
        model dump "${mopt[@]}" "${MODEL_OPTS[@]}" --info "model-$mode.info" "$top" "$b" >"model-$mode.json" 2>"model-$mode.err" || mrc=$?
        [[ $mrc -eq 0 || $mrc -eq 2 ]] || fail "[$CASE] oracle broke: model dump (exit $mrc): $(tail -n 5 "model-$mode.err")"
        first=$("$PYTHON" -c 'import json,sys; v = json.load(open(sys.argv[1]))["violations"]; print(v[0] if v else "")' "model-$mode.info")
        case $want in
        ok) [[ $mrc -eq 0 ]] || fail "[$CASE] TEST BUG: model refuses $mode merge ($first), case expects ok" ;;
        refuse:*)
            [[ $mrc -eq 2 && $first == "${want#refuse:}" ]] ||
                fail "[$CASE] TEST BUG: model $mode gives '${first:-ok}', case expects '${want#refuse:}'" ;;
        model) ;;
        *) fail "[$CASE] bad expectation '$want'" ;;
        esac
        if [[ $mrc -eq 0 ]]; then
            g=$(info_get "model-$mode.info" granularity)
            k=$(info_get "model-$mode.info" deepest-layer)
            qrc=0
            qc "qcbt-$mode.json" bitmap dump --json "${mopt[@]}" "$top" "$b" || qrc=$?
            if [[ $qrc -ne 0 ]]; then
                note "[$CASE] qcbt bitmap dump --json ${mopt[*]} exit $qrc, the model merges: $(cat "qcbt-$mode.json.err")"
                rc=1
            else
                mcompare --size "$size" --context "$CASE $mode: model vs qcbt dump" \
                    "model-$mode.json" "qcbt-$mode.json" || rc=1
            fi
            cap "model-$mode.sha" model digest --granularity "$g" --size "$size" "model-$mode.json"
            qrc=0
            qc "qcbt-$mode.sha" bitmap sha256 "${mopt[@]}" "$top" "$b" || qrc=$?
            digest=$(hex64 "qcbt-$mode.sha")
            if [[ $qrc -ne 0 || $digest != "$(hex64 "model-$mode.sha")" ]]; then
                note "[$CASE] qcbt bitmap sha256 ${mopt[*]}: exit $qrc '$(cat "qcbt-$mode.sha" "qcbt-$mode.sha.err")', model digest (granularity $g) $(hex64 "model-$mode.sha")"
                rc=1
            fi
            qrc=0
            qc "qcbt-$mode.check" bitmap check --json "${mopt[@]}" "$top" "$b" || qrc=$?
            if [[ $qrc -ne 0 ]]; then
                note "[$CASE] qcbt bitmap check --json ${mopt[*]} exit $qrc: $(cat "qcbt-$mode.check.err")"
                rc=1
            else
                check_json_ok "qcbt-$mode.check" "model-$mode.info" || rc=1
            fi
            # QEMU's own union, for chains QEMU can merge (strict ok)
            if [[ $mode == strict && -z ${NO_QEMU_UNION:-} ]]; then
                qemu_union "$top" "$b" "$g" "$k" qemu-union.json
                mcompare --loose --size "$size" --context "$CASE MODEL vs QEMU union" \
                    qemu-union.json model-strict.json || { note "[$CASE] MODEL BUG (model != QEMU)"; rc=1; }
                if [[ -s qcbt-strict.json ]]; then
                    mcompare --size "$size" --context "$CASE strict: QEMU union vs qcbt dump" \
                        qemu-union.json qcbt-strict.json || rc=1
                fi
                if [[ $digest != "$(hex64 qemu-union.json.sha)" ]]; then
                    note "[$CASE] qcbt bitmap sha256 --strict '$digest' != QEMU digest of the qemu-img-merged bitmap $(hex64 qemu-union.json.sha)"
                    rc=1
                fi
            fi
        else
            rule=$(rule_regex "$first")
            expect_exit2 "$rule" -- bitmap dump --json "${mopt[@]}" "$top" "$b" || rc=1
            expect_exit2 "$rule" -- bitmap dump "${mopt[@]}" "$top" "$b" || rc=1
            expect_exit2 "$rule" -- bitmap check "${mopt[@]}" "$top" "$b" || rc=1
            expect_exit2 "$rule" -- bitmap sha256 "${mopt[@]}" "$top" "$b" || rc=1
            qrc=0
            qc "qcbt-$mode.check" bitmap check --json "${mopt[@]}" "$top" "$b" || qrc=$?
            if [[ $qrc -ne 2 ]]; then
                note "[$CASE] qcbt bitmap check --json ${mopt[*]}: exit $qrc, expected 2 ($first)"
                rc=1
            else
                check_json_refused "qcbt-$mode.check" "model-$mode.info" || rc=1
            fi
        fi
    done
    check_chain_list "$top" "$b" model-tolerant.info || rc=1
    check_layer_digests "$top" "$b" || rc=1
    for i in "${!chain[@]}"; do
        unchanged "${chain[i]}" "${sums[i]}" || rc=1
    done
    return "$rc"
}

# check_layer_digests TOP NAME: for every layer where QEMU sees NAME,
# `qcbt bitmap sha256 --layer I` equals x-debug-block-dirty-bitmap-sha256 of
# that layer opened alone (read-only).  For an in-use bitmap QEMU hashes
# zeros (it never loads it); qcbt may refuse it instead (noted only).
check_layer_digests() {
    local top=$1 b=$2 rc=0 i qrc q s infos
    mapfile -t infos < <(qemu-img info -U --backing-chain --output=json "$top" 2>>"$CASE_DIR/run.log" |
        "$PYTHON" -c '
import json, sys
for l in json.load(sys.stdin):
    bms = l.get("format-specific", {}).get("data", {}).get("bitmaps") or []
    x = [b for b in bms if b["name"] == sys.argv[1]]
    print("%s %s" % ("in-use" if x and "in-use" in x[0]["flags"] else "ok" if x else "-", l["filename"]))
' "$b")
    for i in "${!infos[@]}"; do
        read -r st f <<<"${infos[i]}"
        [[ $st == - ]] && continue
        qemu_digest "qemu-layer$i.sha" --alone "$f" "$b"
        q=$(hex64 "qemu-layer$i.sha")
        qrc=0
        qc "qcbt-layer$i.sha" bitmap sha256 --layer "$i" "$top" "$b" || qrc=$?
        s=$(hex64 "qcbt-layer$i.sha")
        if [[ $qrc -ne 0 && $st == in-use ]]; then
            note "[$CASE] (info) sha256 --layer $i of an in-use bitmap: exit $qrc: $(cat "qcbt-layer$i.sha.err")"
        elif [[ $qrc -ne 0 || $s != "$q" ]]; then
            note "[$CASE] qcbt bitmap sha256 --layer $i ($f, $st): exit $qrc '$s$(cat "qcbt-layer$i.sha.err")', QEMU $q"
            rc=1
        fi
    done
    return "$rc"
}

# check_chain_list TOP NAME MODEL.info: qcbt bitmap list --json over the
# chain against qemu-img info --backing-chain (names in directory order,
# granularity, in-use, enabled, status) and, for NAME where the model read
# it, dirty-bytes = the dirty bytes of qemu-nbd's map.  Layers the model was
# told are invalid (--invalid N) must be unusable with NAME "invalid".
check_chain_list() {
    local top=$1 b=$2 minfo=$3
    qemu-img info -U --backing-chain --output=json "$top" >qemu-chain.json 2>>"$CASE_DIR/run.log"
    if ! qc qcbt-list.json bitmap list --json "$top"; then
        note "[$CASE] qcbt bitmap list --json failed: $(cat qcbt-list.json.err)"
        return 1
    fi
    "$PYTHON" - "$CASE" "$b" qemu-chain.json qcbt-list.json "$minfo" <<'EOF'
import json, sys
case, name, qi, ql, mi = sys.argv[1:]
chain = json.load(open(qi))
m = json.load(open(mi))
try:
    got = json.load(open(ql))
except ValueError as e:
    sys.exit("[%s] bitmap list --json: invalid JSON: %s" % (case, e))
bad = []
layers = got.get("layers", [])
if len(layers) != len(chain):
    bad.append("%d layers, qemu-img info shows %d" % (len(layers), len(chain)))
for d, (q, L) in enumerate(zip(chain, layers)):
    ml = m["layers"][d]
    if L.get("depth") != d:
        bad.append("layer %d: depth %r" % (d, L.get("depth")))
    qb = (q.get("format-specific", {}).get("data", {}).get("bitmaps") or []) if q["format"] == "qcow2" else []
    gb = L.get("bitmaps") or []
    if ml.get("invalid"):
        if L.get("usable") is not False or not isinstance(L.get("error"), str):
            bad.append("layer %d: ignored extension: usable %r error %r" % (d, L.get("usable"), L.get("error")))
        x = [x for x in gb if x.get("name") == name]
        if not x or x[0].get("status") != "invalid":
            bad.append("layer %d: %s behind a clear autoclear bit: %r" % (d, name, x))
        continue
    if qb and L.get("usable") is not True:
        bad.append("layer %d: usable %r, QEMU loads its bitmaps" % (d, L.get("usable")))
    if [x.get("name") for x in gb] != [x["name"] for x in qb]:
        bad.append("layer %d: names %r, qemu-img info %r" % (d, [x.get("name") for x in gb], [x["name"] for x in qb]))
        continue
    for x, y in zip(gb, qb):
        inuse = "in-use" in y["flags"]
        exp = {"granularity": y["granularity"], "in-use": inuse, "enabled": "auto" in y["flags"],
               "status": "in-use" if inuse else "ok"}
        if inuse:
            exp["dirty-bytes"] = None
        elif x.get("name") == name and "bitmap" in ml:
            exp["dirty-bytes"] = sum(b - a for a, b in ml["bitmap"])
        for k, v in exp.items():
            if x.get(k) != v or type(x.get(k)) != type(v):
                bad.append("layer %d bitmap %s: %s = %r, expected %r" % (d, x.get("name"), k, x.get(k), v))
if bad:
    print("[%s] qcbt bitmap list --json disagrees with QEMU: %s" % (case, "; ".join(bad[:10])), file=sys.stderr)
    sys.exit(1)
EOF
}

# check_json_ok QCBT-CHECK.json MODEL.info: fields of a successful check.
check_json_ok() {
    "$PYTHON" - "$CASE" "$1" "$2" <<'EOF'
import json, sys
case, q, m = sys.argv[1:]
try:
    d = json.load(open(q))
except ValueError as e:
    sys.exit("[%s] check --json: invalid JSON: %s" % (case, e))
m = json.load(open(m))
bad = []
exp = {"name": m["name"], "mode": m["mode"], "usable": True,
       "granularity": m["granularity"], "deepest-layer": m["deepest-layer"]}
for k, v in exp.items():
    if d.get(k) != v:
        bad.append("%s = %r, model %r" % (k, d.get(k), v))
if "error" in d:
    bad.append("error = %r on success" % d["error"])
ls = d.get("layers") or []
names = [l["filename"] for l in m["layers"]]
if len(ls) != len(names):
    bad.append("%d layers, chain has %d" % (len(ls), len(names)))
for i, l in enumerate(ls[:len(names)]):
    src = m["sources"].get(str(i), "none")
    if l.get("depth") != i or l.get("source") != src:
        bad.append("layer %d: depth %r source %r, model source %r" % (i, l.get("depth"), l.get("source"), src))
    if src == "allocation" and not isinstance(l.get("reason"), str):
        bad.append("layer %d: fallback to allocation without a reason" % i)
if bad:
    print("[%s] qcbt bitmap check --json (%s) disagrees with the model: %s" % (case, m["mode"], "; ".join(bad)), file=sys.stderr)
    sys.exit(1)
EOF
}

# check_json_refused QCBT-CHECK.json MODEL.info
check_json_refused() {
    "$PYTHON" - "$CASE" "$1" "$2" <<'EOF'
import json, sys
case, q, m = sys.argv[1:]
try:
    d = json.load(open(q))
except ValueError as e:
    sys.exit("[%s] check --json (refused): invalid JSON: %s" % (case, e))
m = json.load(open(m))
bad = []
if d.get("usable") is not False: bad.append("usable = %r" % d.get("usable"))
if not isinstance(d.get("error"), str): bad.append("error = %r" % d.get("error"))
if d.get("mode") != m["mode"]: bad.append("mode = %r" % d.get("mode"))
if d.get("name") != m["name"]: bad.append("name = %r" % d.get("name"))
if bad:
    print("[%s] qcbt bitmap check --json (%s, refused: %s): %s" % (case, m["mode"], m["violations"][0], "; ".join(bad)), file=sys.stderr)
    sys.exit(1)
EOF
}
