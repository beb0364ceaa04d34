#!/bin/bash
# qcbt bitmap add/remove/clear/enable/disable/merge against qemu-img bitmap.
#
#   - Twins: each operation done by qcbt on one copy and by qemu-img on
#     the other gives identical bitmaps in `qemu-img info` (name,
#     granularity, flags) and a `qemu-img check` with no error and no
#     leak; ours on images whose bitmaps QEMU made, theirs on ours.
#   - QEMU records guest writes into a bitmap we created (qemu-io write,
#     then qemu-nbd -B + nbdinfo --map), and our clear empties it.
#   - Without -g, add and checkpoint create take QEMU's default
#     granularity on 512 B, 4K, 16K, 64K and 2M clusters.
#   - Refusals: one line, exit 1: a running qemu-io holds the image, name
#     exists / not found, bad names, bad granularity, version 2, in-use
#     bitmaps (clear/enable/disable; remove works, as in qemu-img), a
#     file we may not write.
#   - A file past what the refcount table covers: the add grows the table
#     (refcount widths 1, 16, 64).
#   - merge (qcbt bitmap merge [-b FILE] IMAGE NAME SOURCE) against
#     qemu-img bitmap --merge SOURCE [-b FILE] IMAGE NAME: coarse into fine,
#     fine into coarse, from another file: the same dirty maps.
#   - Faults (kill, EIO, ENOSPC at every write and flush): in
#     test-fault-sweep.sh.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo

cd "$TMPD"
failures=0
bad() {
    note "FAIL: $*"
    failures=$((failures + 1))
}

# bitmaps IMG: name, granularity and flags of every bitmap, sorted.
bitmaps() {
    qemu-img info -U --output=json "$1" | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)["format-specific"]["data"]
for b in sorted(d.get("bitmaps", []), key=lambda b: b["name"]):
    print(b["name"], b["granularity"], ",".join(sorted(b["flags"])))'
}

# clean IMG: qemu-img check finds neither errors nor leaks.
clean() {
    qemu-img check "$1" >check.out 2>&1 || { bad "$CASE: qemu-img check $1: $(cat check.out)"; return 1; }
}

# dirty_map IMG NAME: the dirty extents qemu-nbd exports for NAME.
dirty_map() {
    nbdinfo --map=qemu:dirty-bitmap:"$2" -- [ qemu-nbd -r -f qcow2 -B "$2" "$1" ] |
        awk '$4 == "dirty" { print $1, $2 }'
}

# ours OP NAME [OPTS...]: qcbt on a.qcow2.  theirs OPTS... NAME: qemu-img
# bitmap on b.qcow2.  same: both give the same bitmaps, ours is clean.
ours() {
    local op=$1 name=$2
    shift 2
    "$QCBT" bitmap "$op" "$@" "$A" "$name" 2>err || bad "$CASE: qcbt bitmap $op $name: $(cat err)"
}
theirs() {
    local name=${*: -1}
    qemu-img bitmap "${@:1:$#-1}" "$B" "$name" || fail "oracle broke: qemu-img bitmap $*"
}
same() {
    bitmaps "$A" >a.bm
    bitmaps "$B" >b.bm
    cmp -s a.bm b.bm || bad "$CASE: bitmaps differ: ours [$(tr '\n' ';' <a.bm)] qemu [$(tr '\n' ';' <b.bm)]"
    clean "$A"
    clean "$B"
}

# --- twins ------------------------------------------------------------------

qemu-img create -q -f qcow2 base.qcow2 1G
qemu-io -c 'write -P 0x5a 0 1M' base.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
A=a.qcow2 B=b.qcow2
cp base.qcow2 "$A"
cp base.qcow2 "$B"
CASE=add;            ours add c1;                      theirs --add c1;                      same
CASE=add-g-disabled; ours add c2 -g 1M --disabled;     theirs --add -g 1M --disable c2;      same
CASE=add-512;        ours add c3 --granularity 512;    theirs --add -g 512 c3;               same
[[ $(wc -l <a.bm) -eq 3 ]] || bad "$CASE: expected 3 bitmaps: $(cat a.bm)"
CASE=disable;        ours disable c1;                  theirs --disable c1;                  same
CASE=enable;         ours enable c2;                   theirs --enable c2;                   same
CASE=clear;          ours clear c1;                    theirs --clear c1;                    same
CASE=remove;         ours remove c3;                   theirs --remove c3;                   same

# Swap: ours on QEMU's bitmaps, theirs on ours.
A=b.qcow2 B=a.qcow2
CASE=ours-on-qemu-add;  ours add d1 -g 128K;   theirs --add -g 128K d1;  same
CASE=ours-on-qemu-dis;  ours disable c2;       theirs --disable c2;      same
CASE=ours-on-qemu-rm;   ours remove c1;        theirs --remove c1;       same
CASE=ours-on-qemu-last; ours remove c2;        theirs --remove c2;       same
ours remove d1; theirs --remove d1
CASE=none-left; same
[[ ! -s a.bm ]] || bad "$CASE: bitmaps left: $(cat a.bm)"
qemu-img compare -q base.qcow2 a.qcow2 || bad "$CASE: guest data changed"

# A backing file name after the extensions moves when the bitmaps
# extension comes and goes; with no bitmap left, the header cluster is
# byte for byte what qemu-img leaves.
CASE=backing
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 bk.qcow2
A=bka.qcow2 B=bkb.qcow2
cp bk.qcow2 "$A"
cp bk.qcow2 "$B"
ours add x; theirs --add x; same
backing() { qemu-img info -U --output=json "$1" | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin); print(d.get("backing-filename"), d.get("backing-filename-format"))'; }
[[ $(backing "$A") == "base.qcow2 qcow2" ]] || bad "$CASE: backing after add: $(backing "$A")"
ours remove x; theirs --remove x; same
[[ $(backing "$A") == "base.qcow2 qcow2" ]] || bad "$CASE: backing after remove: $(backing "$A")"
cmp -s <(head -c 65536 "$A") <(head -c 65536 "$B") || bad "$CASE: header cluster differs from qemu-img's"

# Every refcount width (sub-byte widths update one byte of a block).
for bits in 1 2 8 64; do
    CASE=refcount-bits-$bits
    qemu-img create -q -f qcow2 -o refcount_bits=$bits rb.qcow2 1G
    qemu-io -c 'write 0 1M' rb.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
    cp rb.qcow2 rb0.qcow2
    A=rb.qcow2
    ours add x; ours add y -g 1M; ours remove x
    qemu-img compare -q rb0.qcow2 rb.qcow2 || bad "$CASE: guest data changed"
    qemu-io -c 'write 5M 64k' rb.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
    cp rb.qcow2 rb0.qcow2
    ours clear y
    ours add z; clean rb.qcow2
    [[ $(bitmaps rb.qcow2 | tr '\n' ';') == "y 1048576 auto;z 65536 auto;" ]] || bad "$CASE: bitmaps $(bitmaps rb.qcow2)"
    qemu-img compare -q rb0.qcow2 rb.qcow2 || bad "$CASE: guest data changed"
done

# Default granularity (no -g): QEMU's, the cluster size clamped to
# 4K..64K, for `qcbt bitmap add` and `qcbt checkpoint create` alike.
for cs in 512 4096 16384 65536 2097152; do
    CASE=default-granularity-$cs
    want=$((cs < 4096 ? 4096 : cs > 65536 ? 65536 : cs))
    qemu-img create -q -f qcow2 -o cluster_size=$cs dg.qcow2 1G
    A=dga.qcow2 B=dgb.qcow2
    cp dg.qcow2 "$A"
    cp dg.qcow2 "$B"
    ours add x; theirs --add x; same
    [[ $(cat b.bm) == "x $want auto" ]] || fail "oracle broke: qemu-img bitmap --add on $cs-byte clusters: $(cat b.bm)"
    [[ $(cat a.bm) == "x $want auto" ]] || bad "$CASE: ours $(cat a.bm), want x $want auto"
    "$QCBT" checkpoint create "$A" y 2>err || bad "$CASE: checkpoint create: $(cat err)"
    theirs --add y; same
done

# --- QEMU records into our bitmap; our clear empties it -------------------

CASE=qemu-records
cp base.qcow2 r.qcow2
"$QCBT" bitmap add r.qcow2 ck 2>err || bad "$CASE: add: $(cat err)"
qemu-io -c 'write -P 1 4M 64k' -c 'write -P 2 100M 1M' r.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
got=$(dirty_map r.qcow2 ck | tr '\n' ';')
[[ $got == "4194304 65536;104857600 1048576;" ]] || bad "$CASE: dirty map after qemu-io writes: $got"
clean r.qcow2
"$QCBT" bitmap clear r.qcow2 ck 2>err || bad "$CASE: clear: $(cat err)"
got=$(dirty_map r.qcow2 ck | tr '\n' ';')
[[ -z $got ]] || bad "$CASE: dirty map after our clear: $got"
clean r.qcow2
# Disabled: QEMU records nothing.
"$QCBT" bitmap disable r.qcow2 ck 2>err || bad "$CASE: disable: $(cat err)"
qemu-io -c 'write -P 3 0 64k' r.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
got=$(dirty_map r.qcow2 ck | tr '\n' ';')
[[ -z $got ]] || bad "$CASE: a disabled bitmap recorded: $got"

# --- merge -----------------------------------------------------------------

# maps IMG NAME...: the dirty map qemu-nbd exports for each NAME.
maps() {
    local img=$1 b
    shift
    for b in "$@"; do printf '%s: %s\n' "$b" "$(dirty_map "$img" "$b" | tr '\n' ';')"; done
}
CASE=merge
qemu-img create -q -f qcow2 m0.qcow2 1G
qemu-img bitmap --add m0.qcow2 a
qemu-img bitmap --add -g 1M m0.qcow2 c
qemu-img bitmap --add -g 4K m0.qcow2 d
qemu-io -c 'write 0 4k' -c 'write 300M 2M' m0.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
qemu-img bitmap --disable m0.qcow2 c
qemu-io -c 'write 900M 8k' m0.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
qemu-img create -q -f qcow2 mf.qcow2 1G
qemu-img bitmap --add -g 512 mf.qcow2 f
qemu-io -c 'write 700M 512' mf.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
A=m1.qcow2 B=m2.qcow2
cp m0.qcow2 "$A"
cp m0.qcow2 "$B"
# Coarse into fine, fine into a disabled coarse one, from another file.
# ours_merge NAME SOURCE [-b FILE]
ours_merge() {
    "$QCBT" bitmap merge "${@:3}" "$A" "$1" "$2" 2>err || bad "$CASE: qcbt bitmap merge $*: $(cat err)"
}
CASE=merge-coarse; ours_merge a c;               theirs --merge c a;               same
CASE=merge-fine;   ours_merge c d;               theirs --merge d c;               same
CASE=merge-file;   ours_merge d f -b mf.qcow2;   theirs --merge f -b mf.qcow2 d;   same
CASE=merge-self;   ours_merge a a;               theirs --merge a a;               same
CASE=merge-maps
maps "$A" a c d >a.maps
maps "$B" a c d >b.maps
cmp -s a.maps b.maps || bad "$CASE: dirty maps differ: ours $(cat a.maps) qemu $(cat b.maps)"
grep -q '^d: .*;734003200 4096;' a.maps || bad "$CASE: the bit from mf.qcow2 is missing: $(cat a.maps)"
qemu-img create -q -f qcow2 m2g.qcow2 2G
qemu-img bitmap --add m2g.qcow2 big
expect_qcbt_error "different sizes" -- bitmap merge -b m2g.qcow2 "$A" a big || bad "$CASE: sizes"
expect_qcbt_error "bitmap 'nope' not found" -- bitmap merge "$A" a nope || bad "$CASE: source not found"
expect_qcbt_error "bitmap 'nope' not found" -- bitmap merge "$A" nope a || bad "$CASE: target not found"
expect_qcbt_error "-b is only for merge" -- bitmap clear -b mf.qcow2 "$A" a || bad "$CASE: -b elsewhere"
expect_qcbt_error "IMAGE NAME SOURCE" -- bitmap merge "$A" a || bad "$CASE: two arguments"
clean "$A"

# --- refusals -----------------------------------------------------------------

CASE=refusals
cp base.qcow2 e.qcow2
"$QCBT" bitmap add e.qcow2 x 2>err || bad "$CASE: add x: $(cat err)"
expect_qcbt_error "bitmap 'x' already exists" -- bitmap add e.qcow2 x || bad "$CASE: exists"
for op in remove clear enable disable; do
    expect_qcbt_error "bitmap 'y' not found" -- bitmap $op e.qcow2 y || bad "$CASE: $op not found"
done
expect_qcbt_error "1023" -- bitmap add e.qcow2 "$(printf 'n%.0s' {1..1024})" || bad "$CASE: long name"
"$QCBT" bitmap add e.qcow2 "$(printf 'n%.0s' {1..1023})" 2>err || bad "$CASE: 1023-byte name refused: $(cat err)"
expect_qcbt_error "UTF-8" -- bitmap add e.qcow2 "$(printf 'a\377')" || bad "$CASE: bad UTF-8"
expect_qcbt_error "name size 0" -- bitmap add e.qcow2 "" || bad "$CASE: empty name"
for g in 256 3K 4G x; do
    expect_qcbt_error "granularity" -- bitmap add -g $g e.qcow2 g || bad "$CASE: granularity $g"
done
expect_qcbt_error "only for add" -- bitmap remove -g 1M e.qcow2 x || bad "$CASE: -g on remove"
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1G
qemu-img bitmap --add v2.qcow2 x 2>/dev/null && fail "oracle broke: qemu-img adds a bitmap to a v2 image"
expect_qcbt_error "version 2" -- bitmap add v2.qcow2 x || bad "$CASE: v2"
truncate -s 1M raw.img
expect_qcbt_error "re:(qcow2|magic|format)" -- bitmap add raw.img x || bad "$CASE: not qcow2"
expect_qcbt_error "not a regular file" -- bitmap add /dev/null x || bad "$CASE: /dev/null"
clean e.qcow2

# A file we may not write (as root: run as nobody, who may read it).
CASE=read-only
cp base.qcow2 ro.qcow2
chmod 444 ro.qcow2
as_user=()
if [[ $EUID -eq 0 ]]; then
    chmod 755 "$TMPD"
    as_user=(setpriv --reuid=65534 --regid=65534 --clear-groups)
fi
rc=0
"${as_user[@]}" "$QCBT" bitmap add ro.qcow2 x 2>err || rc=$?
if [[ $rc -ne 1 || $(wc -l <err) -ne 1 || $(cat err) != "qcbt: ro.qcow2: Permission denied" ]]; then
    bad "$CASE: exit $rc: $(cat err)"
fi
[[ -z $(bitmaps ro.qcow2) ]] || bad "$CASE: a bitmap appeared"

# In use: qemu-io killed while it holds an enabled bitmap leaves it in_use.
CASE=in-use
cp base.qcow2 u.qcow2
"$QCBT" bitmap add u.qcow2 u 2>err || bad "$CASE: add: $(cat err)"
"$QCBT" bitmap add u.qcow2 keep 2>err || bad "$CASE: add: $(cat err)"
qemu-io -c 'sleep 3600000' u.qcow2 </dev/null >qemu-io.log 2>&1 &
pid=$!
cleanup_pid "$pid"
# (qemu-img info -U may see QEMU's header half written: its warnings are
# dropped.)
in_use_shown() { qemu-img info -U --output=json u.qcow2 2>/dev/null | grep in-use >/dev/null; }
wait_until -p "$pid" -- in_use_shown ||
    fail "oracle broke: qemu-io never marked the bitmaps in use: $(cat qemu-io.log)"
# The lock: while qemu-io holds the image we refuse to write it.
expect_qcbt_error "held by another process" -- bitmap add u.qcow2 z || bad "$CASE: locked image written"
disown "$pid"
kill -KILL "$pid"
wait_gone "$pid" || fail "qemu-io does not die"
for op in clear enable disable; do
    qemu-img bitmap --$op u.qcow2 u 2>/dev/null && fail "oracle broke: qemu-img $op on an in-use bitmap works"
    expect_qcbt_error "in use" -- bitmap $op u.qcow2 u || bad "$CASE: $op in use"
done
cp u.qcow2 uq.qcow2
qemu-img bitmap --remove uq.qcow2 u || fail "oracle broke: qemu-img cannot remove an in-use bitmap"
"$QCBT" bitmap remove u.qcow2 u 2>err || bad "$CASE: remove of an in-use bitmap: $(cat err)"
bitmaps u.qcow2 >u.bm
[[ $(cat u.bm) == "keep 65536 auto,in-use" ]] || bad "$CASE: after remove: $(cat u.bm)"
expect_qcbt_error "'keep' is in use" -- bitmap merge -b u.qcow2 e.qcow2 x keep || bad "$CASE: in-use source"
expect_qcbt_error "'keep' is in use" -- bitmap merge u.qcow2 keep keep || bad "$CASE: in-use target"

# --- faults: tests/interop/test-fault-sweep.sh (scripts/fault-sweep.sh) ------

# A bitmap table longer than one refcount block's range (64 GiB at
# granularity 512 with 512-byte clusters: 512 table clusters): the new
# blocks go before the run.
CASE=long-table
qemu-img create -q -f qcow2 -o cluster_size=512 lt.qcow2 64G
A=lt.qcow2
ours add fine -g 512; clean lt.qcow2
[[ $(bitmaps lt.qcow2) == "fine 512 auto" ]] || bad "$CASE: $(bitmaps lt.qcow2)"
qemu-io -c 'write 40G 4k' lt.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
[[ $(dirty_map lt.qcow2 fine) == "42949672960 4096" ]] || bad "$CASE: QEMU's write: $(dirty_map lt.qcow2 fine)"
ours remove fine; clean lt.qcow2

# A file reaching past what the one-cluster refcount table covers (64
# blocks of 4096/BITS clusters), for the narrowest, default and widest
# refcounts: the add grows the table (qcow2-alloc.c; every write and
# flush of it swept in test-fault-sweep.sh), the image stays clean and
# QEMU goes on with the new table.
for bits in 1 16 64; do
    CASE=reftable-grows-$bits
    qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=$bits t5.qcow2 64M
    [[ $(od -An -tx1 -j56 -N4 t5.qcow2 | tr -d ' ') == 00000001 ]] ||
        fail "oracle broke: qemu-img made a refcount table of more than one cluster"
    # One cluster short: the bitmap table fits, the directory not.
    truncate -s $((64 * 4096 / bits * 512 - 512)) t5.qcow2
    A=t5.qcow2
    ours add x -g 64K
    clean t5.qcow2
    [[ $(od -An -tx1 -j56 -N4 t5.qcow2 | tr -d ' ') != 00000001 ]] || bad "$CASE: the table did not grow"
    [[ $(bitmaps t5.qcow2) == "x 65536 auto" ]] || bad "$CASE: $(bitmaps t5.qcow2)"
    qemu-io -c 'write -P 3 40M 64k' t5.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
    clean t5.qcow2
    [[ $(dirty_map t5.qcow2 x) == "41943040 65536" ]] || bad "$CASE: QEMU's write: $(dirty_map t5.qcow2 x)"
done

if ((failures)); then
    fail "$failures failure(s)"
fi
note "all cases passed"
