#!/bin/bash
# Crash safety of the commands that change an image in place: a fixed,
# representative subset of scripts/fault-sweep.sh (which runs every point
# of every operation with every fault, by hand).  The operations, the
# faults and what is checked after each run: tests/interop/fault-lib.sh.
#
# Subset: every operation of the table, at every write and every flush it
# does, with one fault kind per operation and point, rotating through
# kill, eio and enospc so that every kind meets every operation; the other
# two kinds at the first point.  Then a real full file system (a tmpfs in
# a private mount namespace) with 0, 32 KiB, 64 KiB ... free for add and
# merge.  And the oracle itself: fabricated states it must reject.

. "$(dirname "$0")/../functions.sh"
. "$TESTS_DIR/interop/fault-lib.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo

cd "$TMPD"

# --- the oracle rejects what it must ---------------------------------------

printf 'a 65536 auto 0+65536;\nb 65536 auto -\n' >o.state
printf 'a 65536 auto 0+131072;\nb 65536 auto -\n' >n.state
for now in 'a 65536 auto 0+4096;\nb 65536 auto -\n' \
    'b 65536 auto -\n' \
    'a 65536 auto 0+65536;\nb 65536 auto -\nc 512 auto -\n' \
    'a 65536 - 0+65536;\nb 65536 auto -\n'; do
    printf "$now" >x.state
    fs_bitmaps_ok o.state n.state x.state >/dev/null &&
        fail "oracle: fs_bitmaps_ok accepts $(tr '\n' ';' <x.state)"
done
printf 'a 65536 auto,in-use -\nb 65536 auto -\n' >x.state
fs_bitmaps_ok o.state n.state x.state >/dev/null || fail "oracle: fs_bitmaps_ok refuses an in-use bitmap"
cp n.state x.state
fs_bitmaps_ok o.state n.state x.state >/dev/null || fail "oracle: fs_bitmaps_ok refuses the new state"

# --- injected faults ----------------------------------------------------------

i=0
for line in "${FAULT_OPS[@]}"; do
    IFS='|' read -r name setup args <<<"$line"
    fs_prepare "$TMPD/$name" "$name" "$setup" "$args"
    j=0
    for point in "${FAULT_POINTS[@]}"; do
        k=$(((i + j) % ${#FAULT_KINDS[@]}))
        fs_sweep "$TMPD/$name" "$name" "$args" "${FAULT_KINDS[k]}" "$point" >&2
        for kind in "${FAULT_KINDS[@]}"; do
            [[ $kind == "${FAULT_KINDS[k]}" ]] && continue
            fs_case "$TMPD/$name" "$name" "$args" "$kind" "$point" 1 ||
                fs_bad "$name $kind-$point:1: the fault did not fire"
        done
        j=$((j + 1))
    done
    i=$((i + 1))
done

# The refblock case is what it says: its add made a second refcount block.
refblocks=$("$PYTHON" -c '
import struct, sys
f = open(sys.argv[1], "rb"); h = f.read(64)
off, n = struct.unpack(">QI", h[48:60]); f.seek(off)
t = struct.unpack(">%dQ" % (n * 64), f.read(n * 512))
print(sum(1 for e in t if e))' "$TMPD/bitmap-add-refblock/img.qcow2")
[[ $refblocks -eq 2 ]] || fail "bitmap-add-refblock: expected a second refcount block, found $refblocks"
# And the reftable case: its add grew the one-cluster refcount table.
rtc=$(od -An -tu4 --endian=big -j56 -N4 "$TMPD/bitmap-add-reftable/img.qcow2" | tr -d ' ')
[[ $rtc -ge 2 ]] || fail "bitmap-add-reftable: expected a larger refcount table, found $rtc cluster(s)"

# --- a real full file system --------------------------------------------------

if fs_have_tmpfs; then
    fs_real_enospc "$TMPD/bitmap-add" bitmap-add "bitmap add IMG s1" 32768 >&2
    fs_real_enospc "$TMPD/bitmap-merge" bitmap-merge "bitmap merge IMG q2 q1" 32768 >&2
else
    note "no tmpfs in a private mount namespace (unshare -rm refused): real ENOSPC not tested here"
fi

[[ $FS_FAILURES -eq 0 ]] || fail "$FS_FAILURES of $FS_CASES runs failed"
note "all $FS_CASES runs passed"
