#!/bin/bash
# qcbt grows the refcount table when what it allocates lies past what the
# table counts (qcow2-alloc.c; QEMU's alloc_refcount_block()).
#
#   - bitmap add on a 512-byte-cluster image one cluster short of the
#     8 MiB its one-cluster table counts (fs_setup_reftable): the header
#     points at a larger table, `qemu-img check` finds neither errors
#     nor leaks (the old table is freed), `qemu-img info` lists the
#     bitmaps qemu-img bitmap --add gives on a twin, the guest data is
#     unchanged (qemu-img compare); QEMU then writes through the new table
#     (qemu-io), records the write in our bitmap (qemu-nbd -B + nbdinfo
#     --map), and the image stays clean; a second add moves nothing.
#   - qcbt commit into such a base: in test-commit.sh ("reftable").
#   - Faults at every write and flush of the growth: test-fault-sweep.sh
#     (bitmap-add-reftable).

. "$(dirname "$0")/../functions.sh"
. "$TESTS_DIR/interop/fault-lib.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo

# header IMG: refcount table offset and clusters (header bytes 48..59).
header() {
    od -An -tx1 -j48 -N12 "$1" | tr -d ' \n'
}

# clean IMG: exit 0 and no leak.
clean() {
    local c=0
    qemu-img check "$1" >check.out 2>&1 || c=$?
    if [[ $c -ne 0 ]] || grep -q leaked check.out; then
        note "[$CASE] qemu-img check $1 (exit $c): $(tr '\n' ' ' <check.out)"
        return 1
    fi
}

bitmaps() {
    qemu-img info -U --output=json "$1" | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)["format-specific"]["data"]
for b in sorted(d.get("bitmaps", []), key=lambda b: b["name"]):
    print(b["name"], b["granularity"], ",".join(sorted(b["flags"])))'
}

begin_case bitmap-add
rc=0
recipe_note "fs_setup_reftable (tests/interop/fault-lib.sh)"
fs_setup_reftable
run cp before.qcow2 ours.qcow2
run cp before.qcow2 theirs.qcow2
h0=$(header ours.qcow2)
[[ ${h0:16:8} == 00000001 ]] || fail "[$CASE] setup broke: refcount table header $h0"
if ! "$QCBT" bitmap add -g 64K ours.qcow2 s1 2>err; then
    note "[$CASE] qcbt bitmap add: $(cat err)"
    rc=1
fi
run qemu-img bitmap --add -g 64K theirs.qcow2 s1
h1=$(header ours.qcow2)
recipe_note "header: $h0 -> $h1"
if [[ $h1 == "$h0" ]] || ((16#${h1:16:8} < 2)); then
    note "[$CASE] the refcount table did not grow: header $h0 -> $h1"
    rc=1
fi
clean ours.qcow2 || rc=1
[[ $(bitmaps ours.qcow2) == "$(bitmaps theirs.qcow2)" ]] ||
    { note "[$CASE] bitmaps: ours '$(bitmaps ours.qcow2)', theirs '$(bitmaps theirs.qcow2)'"; rc=1; }
qemu-img compare -q before.qcow2 ours.qcow2 || { note "[$CASE] the guest data changed"; rc=1; }
# QEMU goes on with our table: a write past the old 8 MiB, recorded in s1.
run qemu-io -c 'write -P 9 40M 1M' ours.qcow2
clean ours.qcow2 || rc=1
got=$(nbdinfo --map=qemu:dirty-bitmap:s1 -- [ qemu-nbd -r -f qcow2 -B s1 ours.qcow2 ] |
    awk '$4 == "dirty" { printf "%s+%s;", $1, $2 }') || fail "oracle broke: qemu-nbd -B s1"
[[ $got == "41943040+1048576;" ]] || { note "[$CASE] s1 after a QEMU write: '$got'"; rc=1; }
qemu-io -c 'read -P 9 40M 1M' -c 'read -P 7 0 4M' ours.qcow2 >read.out 2>&1 ||
    { note "[$CASE] qemu-io read back: $(cat read.out)"; rc=1; }
# Room now: another add leaves the table where it is.
"$QCBT" bitmap add ours.qcow2 s2 2>err || { note "[$CASE] second add: $(cat err)"; rc=1; }
[[ $(header ours.qcow2) == "$h1" ]] || { note "[$CASE] the table moved again: $(header ours.qcow2)"; rc=1; }
clean ours.qcow2 || rc=1
case_result "$rc"

finish_cases
