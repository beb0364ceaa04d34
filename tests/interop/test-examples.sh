#!/bin/bash
# The examples run (issue 5): examples/backup-offline-vm.sh end to end,
# and examples/read-dirty-bitmap.py against qcbt-server, its dirty extents
# checked against 'qcbt bitmap dump --json' and 'nbdinfo --map' (and every
# extent it labels "zero" against the guest view).
. "$(dirname "$0")/../functions.sh"

requires qemu-img qemu-io nbdinfo
SRC=${QCBT_SRC_DIR:-$TESTS_DIR/..}
EXAMPLES=$(cd "$SRC/examples" && pwd)
SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER (set QCBT_SERVER or QCBT_BUILD_DIR)"
SERVER=$(cd "$(dirname "$SERVER")" && pwd)/$(basename "$SERVER")
CHECK="$PYTHON $TESTS_DIR/interop/backup-check.py"

# ---- backup-offline-vm.sh ----------------------------------------------
begin_case backup-offline-vm
rc=0
recipe_note "QCBT=$QCBT QCBT_SERVER=$SERVER $EXAMPLES/backup-offline-vm.sh $CASE_DIR/work"
QCBT=$QCBT QCBT_SERVER=$SERVER bash "$EXAMPLES/backup-offline-vm.sh" "$CASE_DIR/work" \
    >out.txt 2>&1 || rc=$?
if [[ $rc -ne 0 ]]; then
    note "[$CASE] exit status $rc"
    tail -n 15 out.txt | sed 's/^/    /' >&2
elif ! grep -q '^identical: ' out.txt; then
    note "[$CASE] no 'identical' line"
    rc=1
elif ! grep -q 'incremental backup' out.txt; then
    note "[$CASE] the second backup was not incremental"
    rc=1
fi
case_result "$rc"

# ---- read-dirty-bitmap.py ------------------------------------------------
begin_case read-dirty-bitmap
rc=0
# base <- mid <- top, checkpoint ckpt created in base and propagated to each
# new overlay; writes, zero writes and discards in every layer.
run qemu-img create -q -f qcow2 base.qcow2 128M
run qemu-io -f qcow2 -c 'write -P 1 0 64M' base.qcow2
run qemu-img bitmap --add base.qcow2 ckpt
run qemu-io -f qcow2 -c 'write -P 2 1M 1M' -c 'write -z 4M 512k' base.qcow2
run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
run qemu-img bitmap --add mid.qcow2 ckpt
run qemu-io -f qcow2 -c 'write -P 3 10M 3M' -c 'discard 20M 1M' -c 'write -P 3 100M 4k' mid.qcow2
run qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
run qemu-img bitmap --add top.qcow2 ckpt
run qemu-io -f qcow2 -c 'write -P 4 11M 64k' -c 'write -z 30M 2M' -c 'write -P 5 127M 1M' top.qcow2
run qemu-img convert -f qcow2 -O raw top.qcow2 guest.raw
recipe_note "qcbt bitmap dump --json top.qcow2 ckpt >dump.json"
"$QCBT" bitmap dump --json top.qcow2 ckpt >dump.json || fail "qcbt bitmap dump failed"

sock=$CASE_DIR/nbd.sock
recipe_note "$SERVER -t -B ckpt -k $sock top.qcow2 &"
"$SERVER" -t -B ckpt -k "$sock" top.qcow2 >server.log 2>&1 &
pid=$!
cleanup_pid "$pid"
uri="nbd+unix:///?socket=$sock"
wait_nbd "$uri" "$pid" || fail "qcbt-server did not start: $(cat server.log)"

recipe_note "$EXAMPLES/read-dirty-bitmap.py $uri ckpt >example.txt"
"$PYTHON" "$EXAMPLES/read-dirty-bitmap.py" "$uri" ckpt >example.txt 2>example.err ||
    { note "[$CASE] the example failed: $(cat example.err)"; rc=1; }
recipe_note "nbdinfo --json --map=qemu:dirty-bitmap:ckpt $uri >nbdinfo.json"
nbdinfo --json --map=qemu:dirty-bitmap:ckpt "$uri" >nbdinfo.json ||
    fail "[$CASE] oracle broke: nbdinfo --map failed"
# map_compare OUT ARGS...: backup-check.py map-compare; exit 3 means the
# reference map (qcbt bitmap dump, nbdinfo) is broken: no verdict.
map_compare() {
    local out=$1 st=0
    shift
    $CHECK map-compare "$@" >"$out" || st=$?
    [[ $st -le 1 ]] || fail "[$CASE] $(cat "$out") (exit $st)"
    return "$st"
}
if ! map_compare cmp1.out dump.json example.txt guest.raw; then
    note "[$CASE] example vs qcbt bitmap dump: $(cat cmp1.out)"
    rc=1
fi
if ! map_compare cmp2.out nbdinfo.json example.txt; then
    note "[$CASE] example vs nbdinfo --map: $(cat cmp2.out)"
    rc=1
fi
# The zero writes and the discard are reported as dirty and zero.
for r in "4194304 524288" "20971520 1048576" "31457280 2097152"; do
    read -r off len <<<"$r"
    awk -v o="$off" -v l="$len" '$1 == "dirty" && $4 == "zero" && $2 <= o && $2 + $3 >= o + l { f = 1 }
        END { exit !f }' example.txt ||
        { note "[$CASE] [$off, +$len) is not reported as dirty and zero"; rc=1; }
done
# A bitmap the server does not publish: a clear refusal, exit 1.
if "$PYTHON" "$EXAMPLES/read-dirty-bitmap.py" "$uri" nosuch >/dev/null 2>nosuch.err; then
    note "[$CASE] an unknown bitmap was not refused"
    rc=1
fi
kill "$pid"
wait "$pid" 2>/dev/null || true
[[ $rc -eq 0 ]] && note "[$CASE] $(wc -l <example.txt) dirty extents, equal to qcbt bitmap dump and nbdinfo --map"
case_result "$rc"

finish_cases
