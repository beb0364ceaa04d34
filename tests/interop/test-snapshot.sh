#!/bin/bash
# qcbt snapshot IMAGE NEW: an external snapshot of an offline disk that
# keeps the checkpoints (libvirt's rule: an empty enabled bitmap in NEW
# for every healthy enabled bitmap of IMAGE).
#
#   - NEW as qemu-img sees it: backing file and format, size, cluster
#     size, bitmaps X and Y (auto, same granularity), not D (disabled) nor
#     U (in use), each left out with a warning; qemu-img check clean.
#   - qemu-io writes into NEW (QEMU records into our bitmaps); then the
#     strict merge over the chain (qcbt bitmap dump --strict, and
#     qcbt-server --strict -B read with nbdinfo --map) equals QEMU's own
#     union (qemu-img bitmap --merge from each layer, read back with
#     qemu-nbd -B), and qemu-img check stays clean.
#   - the backing name resolves from NEW's directory: relative in the same
#     directory, absolute otherwise; a raw IMAGE.
#   - refusals leave no NEW: NEW exists, IMAGE missing, IMAGE held by a
#     writer (qemu-nbd), and an injected write failure at every step.

# shellcheck source=../functions.sh
. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo
# shellcheck source=bitmap-lib.sh
. "$TESTS_DIR/interop/bitmap-lib.sh"

# bitmaps_of IMG: "NAME GRANULARITY FLAGS" per bitmap, from qemu-img info.
bitmaps_of() {
    qemu-img info -U --output=json "$1" | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)
for b in d.get("format-specific", {}).get("data", {}).get("bitmaps") or []:
    print(b["name"], b["granularity"], ",".join(b["flags"]) or "-")
'
}

# info_field IMG KEY: a top-level field of qemu-img info --output=json.
info_field() {
    qemu-img info -U --output=json "$1" | "$PYTHON" -c '
import json, sys; print(json.load(sys.stdin).get(sys.argv[1], ""))' "$2"
}

# check_clean IMG: qemu-img check finds no errors and no leaks.
check_clean() {
    local out rc=0
    out=$(qemu-img check "$1" 2>&1) || rc=$?
    if [[ $rc -ne 0 || $out != *"No errors were found"* || $out == *leak* ]]; then
        note "[$CASE] qemu-img check $1 (exit $rc): $out"
        return 1
    fi
}

# --- the rule, then QEMU writes through it ---------------------------------
begin_case basic
rc=0
run qemu-img create -q -f qcow2 -o cluster_size=4096 base.qcow2 $((32 * MiB + 512))
run qemu-img bitmap --add base.qcow2 U
run qemu-io -f qcow2 -c 'write -P 0x11 0 1M' base.qcow2
crash base.qcow2 -c 'write -P 0x12 2M 64k'
run qemu-img bitmap --add -g 65536 base.qcow2 X
run qemu-io -f qcow2 -c 'write -P 0x13 3M 100k' -c 'write -z 8M 1M' base.qcow2
run qemu-img bitmap --add -g 512 base.qcow2 Y
run qemu-img bitmap --add --disable base.qcow2 D
run qemu-io -f qcow2 -c 'write -P 0x14 5M 3000' -c 'write -c -P 0x15 12M 4k' base.qcow2
base_sha=$(sha_file base.qcow2)

qc snap.out snapshot base.qcow2 snap.qcow2 || { note "[$CASE] snapshot failed: $(cat snap.out.err)"; rc=1; }
[[ -f snap.qcow2 ]] || fail "[$CASE] no snap.qcow2: $(cat snap.out.err)"
unchanged base.qcow2 "$base_sha" || rc=1
for b in U D; do
    grep -q "qcbt: warning: bitmap '$b' is not carried" snap.out.err ||
        { note "[$CASE] no warning for $b: $(cat snap.out.err)"; rc=1; }
done
grep -q "'U' .*in use" snap.out.err || { note "[$CASE] U: reason not 'in use'"; rc=1; }
grep -q "'D' .*disabled" snap.out.err || { note "[$CASE] D: reason not 'disabled'"; rc=1; }
[[ $(wc -l <snap.out.err) -eq 2 ]] || { note "[$CASE] stderr: $(cat snap.out.err)"; rc=1; }
got=$(bitmaps_of snap.qcow2 | sort)
want=$'X 65536 auto\nY 512 auto'
[[ $got == "$want" ]] || { note "[$CASE] NEW's bitmaps: '$got', want '$want'"; rc=1; }
[[ $(info_field snap.qcow2 backing-filename) == base.qcow2 ]] || { note "[$CASE] backing $(info_field snap.qcow2 backing-filename)"; rc=1; }
[[ $(info_field snap.qcow2 backing-filename-format) == qcow2 ]] || { note "[$CASE] backing format"; rc=1; }
[[ $(info_field snap.qcow2 virtual-size) == "$(info_field base.qcow2 virtual-size)" ]] || { note "[$CASE] size"; rc=1; }
[[ $(info_field snap.qcow2 cluster-size) == 4096 ]] || { note "[$CASE] cluster size $(info_field snap.qcow2 cluster-size)"; rc=1; }
check_clean snap.qcow2 || rc=1
run qemu-img compare base.qcow2 snap.qcow2
# strict merges are valid right away, and hold only base's changes
for b in X Y; do
    qc "strict-$b.json" bitmap dump --json --strict snap.qcow2 "$b" ||
        { note "[$CASE] strict dump $b: $(cat "strict-$b.json.err")"; rc=1; }
done

# QEMU writes into NEW: its writes land in our X and Y
run qemu-io -f qcow2 -c 'write -P 0x21 1536k 70k' -c 'write -z 20M 4k' -c 'write -P 0x22 31M 513' snap.qcow2
got=$(bitmaps_of snap.qcow2 | sort)
[[ $got == "$want" ]] || { note "[$CASE] after qemu-io: '$got'"; rc=1; }
check_clean snap.qcow2 || rc=1
size=$(info_field snap.qcow2 virtual-size)
for b in X Y; do
    g=$(bitmaps_of snap.qcow2 | awk -v n="$b" '$1 == n { print $2 }')
    qemu_union snap.qcow2 "$b" "$g" 1 "union-$b.json"
    qc "dump-$b.json" bitmap dump --json --strict snap.qcow2 "$b" ||
        { note "[$CASE] strict dump $b after writes: $(cat "dump-$b.json.err")"; rc=1; continue; }
    mcompare --size "$size" --context "$CASE $b: QEMU union vs qcbt" "union-$b.json" "dump-$b.json" || rc=1
    # the overlay's own bitmap holds exactly QEMU's writes into it
    cap "top-$b.json" nbdinfo --map=qemu:dirty-bitmap:"$b" --json -- [ qemu-nbd -r -f qcow2 -B "$b" snap.qcow2 ]
    "$PYTHON" - "top-$b.json" "$g" <<'PYEOF' || { note "[$CASE] $b in NEW does not hold qemu-io's writes"; rc=1; }
import json, sys
g = int(sys.argv[2])
dirty = [(e["offset"], e["offset"] + e["length"]) for e in json.load(open(sys.argv[1])) if e["type"] & 1]
def cover(a, b):
    return (a // g * g, -(-b // g) * g)
want = [cover(1536 << 10, (1536 << 10) + 70 * 1024), cover(20 << 20, (20 << 20) + 4096),
        cover(31 << 20, (31 << 20) + 513)]
merged = []
for a, b in sorted(want):
    if merged and a <= merged[-1][1]:
        merged[-1] = (merged[-1][0], max(merged[-1][1], b))
    else:
        merged.append((a, b))
sys.exit(0 if dirty == merged else "dirty %r, want %r" % (dirty, merged))
PYEOF
done
# qcbt-server publishes the same merged bitmaps over NBD (strict mode)
SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER"
"$SERVER" -t -k "$CASE_DIR/srv.sock" --strict -B X -B Y snap.qcow2 2>server.log &
spid=$!
cleanup_pid "$spid"
wait_nbd "nbd+unix:///?socket=$CASE_DIR/srv.sock" "$spid" || fail "[$CASE] qcbt-server did not start: $(cat server.log)"
for b in X Y; do
    nbdinfo --map=qemu:dirty-bitmap:"$b" --json "nbd+unix:///?socket=$CASE_DIR/srv.sock" >"srv-$b.json" ||
        { note "[$CASE] nbdinfo --map $b from qcbt-server failed"; rc=1; continue; }
    mcompare --loose --size "$size" --context "$CASE $b: QEMU union vs qcbt-server" "union-$b.json" "srv-$b.json" || rc=1
done
kill -TERM "$spid"
wait "$spid" 2>/dev/null || true
case_result "$rc"

# --- backing names, --json, raw IMAGE ---------------------------------------
begin_case names
rc=0
mkdir -p d1 d2
run qemu-img create -q -f qcow2 d1/a.qcow2 4M
run qemu-img bitmap --add d1/a.qcow2 ck
qc j.out snapshot --json d1/a.qcow2 d1/b.qcow2 || { note "[$CASE] $(cat j.out.err)"; rc=1; }
"$PYTHON" - j.out <<'PYEOF' || rc=1
import json, sys
d = json.load(open(sys.argv[1]))
want = {"backing-filename": "a.qcow2", "backing-filename-format": "qcow2", "virtual-size": 4 << 20,
        "cluster-size": 65536, "bitmaps": [{"name": "ck", "granularity": 65536}], "skipped": []}
bad = {k: d.get(k) for k in want if d.get(k) != want[k]}
sys.exit("snapshot --json: %r" % bad if bad else 0)
PYEOF
[[ $(info_field d1/b.qcow2 backing-filename) == a.qcow2 ]] || { note "[$CASE] same dir: not relative"; rc=1; }
qc o.out snapshot d1/b.qcow2 d2/c.qcow2 || { note "[$CASE] $(cat o.out.err)"; rc=1; }
[[ $(info_field d2/c.qcow2 backing-filename) == "$CASE_DIR/d1/b.qcow2" ]] ||
    { note "[$CASE] other dir: backing '$(info_field d2/c.qcow2 backing-filename)'"; rc=1; }
# QEMU resolves the whole chain from any working directory
(cd / && qemu-img info --backing-chain "$CASE_DIR/d2/c.qcow2" >/dev/null) || { note "[$CASE] qemu-img cannot follow d2/c.qcow2"; rc=1; }
[[ $(bitmaps_of d2/c.qcow2) == "ck 65536 auto" ]] || { note "[$CASE] c: $(bitmaps_of d2/c.qcow2)"; rc=1; }
qc s.out bitmap dump --strict d2/c.qcow2 ck || { note "[$CASE] strict over 3 layers: $(cat s.out.err)"; rc=1; }
qc abs.out snapshot "$CASE_DIR/d1/a.qcow2" d2/e.qcow2 || rc=1
[[ $(info_field d2/e.qcow2 backing-filename) == "$CASE_DIR/d1/a.qcow2" ]] || { note "[$CASE] absolute not kept"; rc=1; }
run qemu-img create -q -f raw r.raw 3M
qc raw.out snapshot -f raw r.raw r.qcow2 || { note "[$CASE] raw: $(cat raw.out.err)"; rc=1; }
[[ $(info_field r.qcow2 backing-filename-format) == raw && -z $(bitmaps_of r.qcow2) ]] || { note "[$CASE] raw overlay"; rc=1; }
check_clean r.qcow2 || rc=1
check_clean d2/c.qcow2 || rc=1
# a bitmap-unaware writer cleared the autoclear bit: nothing is healthy
run qemu-img create -q -f qcow2 ac.qcow2 4M
run qemu-img bitmap --add ac.qcow2 ck
recipe_note "clear autoclear bit 0 (header byte 95) of ac.qcow2"
"$PYTHON" -c 'import sys; f = open(sys.argv[1], "r+b"); f.seek(95); b = f.read(1)[0]; f.seek(95); f.write(bytes([b & ~1]))' ac.qcow2
qc ac.out snapshot ac.qcow2 ac-new.qcow2 || { note "[$CASE] autoclear: $(cat ac.out.err)"; rc=1; }
grep -q "bitmap 'ck' is not carried .*unusable" ac.out.err || { note "[$CASE] autoclear: $(cat ac.out.err)"; rc=1; }
[[ -z $(bitmaps_of ac-new.qcow2) ]] || { note "[$CASE] autoclear: NEW has $(bitmaps_of ac-new.qcow2)"; rc=1; }
case_result "$rc"

# --- refusals: NEW never left behind ----------------------------------------
begin_case refusals
rc=0
run qemu-img create -q -f qcow2 img.qcow2 8M
run qemu-img bitmap --add img.qcow2 ck
run qemu-img bitmap --add -g 512 img.qcow2 ck2
touch exists.qcow2
expect_qcbt_error "already exists" -- snapshot img.qcow2 exists.qcow2 || rc=1
[[ ! -s exists.qcow2 ]] || { note "[$CASE] exists.qcow2 was written"; rc=1; }
expect_qcbt_error "missing.qcow2" -- snapshot missing.qcow2 new1.qcow2 || rc=1
expect_qcbt_error "expected IMAGE NEW" -- snapshot img.qcow2 || rc=1
expect_qcbt_error "no/such" -- snapshot img.qcow2 no/such/new.qcow2 || rc=1
[[ ! -e new1.qcow2 ]] || { note "[$CASE] new1.qcow2 left behind"; rc=1; }
# a writer holds IMAGE: refused, nothing created
qemu-nbd -f qcow2 -k "$CASE_DIR/nbd.sock" img.qcow2 </dev/null >nbd.log 2>&1 &
npid=$!
cleanup_pid "$npid"
wait_nbd "nbd+unix:///?socket=$CASE_DIR/nbd.sock" "$npid" || fail "[$CASE] oracle broke: qemu-nbd: $(cat nbd.log)"
expect_qcbt_error "held by another process" -- snapshot img.qcow2 held.qcow2 || rc=1
[[ ! -e held.qcow2 ]] || { note "[$CASE] held.qcow2 left behind"; rc=1; }
kill "$npid"
wait "$npid" 2>/dev/null || true
# an I/O failure at every write: exit 1, one line, no file; then success
n=1
while :; do
    erc=0
    QCBT_TEST_FAIL_AT=write:$n "$QCBT" snapshot img.qcow2 f.qcow2 >/dev/null 2>f.err || erc=$?
    [[ $erc -eq 0 ]] && break
    if [[ $erc -ne 1 || $(wc -l <f.err) -ne 1 || -e f.qcow2 ]]; then
        note "[$CASE] write:$n: exit $erc, file $([[ -e f.qcow2 ]] && echo left || echo gone): $(cat f.err)"
        rc=1
        rm -f f.qcow2
    fi
    n=$((n + 1))
    ((n < 200)) || fail "[$CASE] snapshot still fails after 200 injected writes"
done
note "[$CASE] failed cleanly at each of $((n - 1)) writes"
((n > 3)) || { note "[$CASE] only $((n - 1)) writes: the hook did not reach the bitmaps"; rc=1; }
[[ $(bitmaps_of f.qcow2 | sort) == $'ck 65536 auto\nck2 512 auto' ]] || { note "[$CASE] f.qcow2: $(bitmaps_of f.qcow2)"; rc=1; }
check_clean f.qcow2 || rc=1
case_result "$rc"

finish_cases
