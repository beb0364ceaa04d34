#!/bin/bash
# qcbt checkpoint create|list|delete against qemu-img, qemu-io and qemu-nbd.
#
#   - create: qemu-img info shows the bitmap, flags [auto], the granularity
#     QEMU itself picks without -g (qemu-img bitmap --add on a twin) or -g;
#     refused when any layer holds the name; qemu-img check clean after
#     every change.
#   - A qemu-io write after create is recorded: qemu-nbd -B NAME + nbdinfo
#     --map shows it, and list's dirty bytes are exactly its sum (clipped at
#     the end of a disk that is not a multiple of the granularity).
#   - list --json (parsed by /usr/bin/python3): creation order across the
#     chain, health as the merge engine judges it (in use after qemu-io was
#     killed, disabled, missing in a layer, mixed granularity).
#   - delete across a 3-layer chain removes the name from every layer and
#     nothing else; a rerun after an interrupted delete finishes it.
#   - Namespaces: rotation (--keep) and delete of one consumer never touch
#     another consumer's, nor a nested namespace, nor the default one.
#   - Locks: a running qemu-io holding the image (or a lower layer that
#     holds the name) is refused with one line naming it.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo

cd "$TMPD"
failures=0
bad() {
    note "FAIL: $*"
    failures=$((failures + 1))
}

# bitmaps IMG: "name granularity flags" of every bitmap, in directory order.
bitmaps() {
    qemu-img info -U --output=json "$1" | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)["format-specific"]["data"]
for b in d.get("bitmaps", []):
    print(b["name"], b["granularity"], ",".join(sorted(b["flags"])))'
}

# clean IMG...: qemu-img check finds neither errors nor leaks.
clean() {
    local f
    for f in "$@"; do
        qemu-img check "$f" >check.out 2>&1 || bad "$CASE: qemu-img check $f: $(cat check.out)"
    done
}

# cplist IMG [ARGS...]: qcbt checkpoint list --json, as python reads it:
# one line per checkpoint "name usable dirty-bytes granularity layers
# strict", layers joined by ','.
cplist() {
    local img=$1
    shift
    "$QCBT" checkpoint list --json "$@" "$img" >list.json 2>err || {
        bad "$CASE: list $img: $(cat err)"
        return 0
    }
    "$PYTHON" -c '
import json, sys
d = json.load(open("list.json"))
for c in d["checkpoints"]:
    print(c["name"], str(c["usable"]).lower(), c["dirty-bytes"], c["granularity"],
          ",".join(map(str, c["layers"])), str(c["strict"]).lower())' ||
        bad "$CASE: list --json does not parse: $(cat list.json)"
}

# field IMG NAME KEY: one field of checkpoint NAME in list --json.
field() {
    "$QCBT" checkpoint list --json "$1" >f.json 2>err || {
        bad "$CASE: list $1: $(cat err)"
        return 0
    }
    "$PYTHON" -c '
import json, sys
for c in json.load(open("f.json"))["checkpoints"]:
    if c["name"] == sys.argv[1]:
        v = c.get(sys.argv[2])
        print(json.dumps(v) if not isinstance(v, str) else v)' "$2" "$3"
}

# nbd_dirty IMG NAME: total dirty bytes qemu-nbd -B NAME exports.
nbd_dirty() {
    nbdinfo --map=qemu:dirty-bitmap:"$2" -- [ qemu-nbd -r -f qcow2 -B "$2" "$1" ] |
        awk '$4 == "dirty" { n += $2 } END { print n + 0 }'
}

expect_err() {
    expect_qcbt_error "$@" || bad "$CASE: qcbt ${*##*--}"
}

# --- help and usage ----------------------------------------------------------

CASE=help
"$QCBT" checkpoint --help >help.out || bad "$CASE: --help exits non-zero"
grep -F -- "--keep N" help.out >/dev/null || bad "$CASE: --help lacks --keep"
"$QCBT" --help | grep -E '^  checkpoint ' >/dev/null || bad "$CASE: not in qcbt --help"
"$QCBT" help checkpoint | cmp -s - help.out || bad "$CASE: qcbt help checkpoint differs from --help"
expect_err "expected a subcommand" -- checkpoint
expect_err "unknown subcommand 'frob'" -- checkpoint frob x.qcow2
expect_err "expected IMAGE NAME" -- checkpoint create x.qcow2
expect_err "-g and --keep are only for create" -- checkpoint list --keep 2 x.qcow2
expect_err "--json, --namespace and -U are only for list" -- checkpoint create --json x.qcow2 n
expect_err "invalid --keep '0'" -- checkpoint create --keep 0 x.qcow2 n
expect_err "invalid granularity '3K'" -- checkpoint create -g 3K x.qcow2 n

# --- create ------------------------------------------------------------------

CASE=create
qemu-img create -q -f qcow2 c.qcow2 1G
qemu-img create -q -f qcow2 -o cluster_size=4k c4.qcow2 1G
cp c4.qcow2 c4-twin.qcow2
"$QCBT" checkpoint create c.qcow2 daily 2>err || bad "$CASE: create: $(cat err)"
"$QCBT" checkpoint create --granularity 1M c.qcow2 vendorA/weekly 2>err || bad "$CASE: create -g: $(cat err)"
"$QCBT" checkpoint create c4.qcow2 daily 2>err || bad "$CASE: create 4k: $(cat err)"
qemu-img bitmap --add c4-twin.qcow2 daily || fail "oracle broke: qemu-img bitmap --add"
got=$(bitmaps c.qcow2 | tr '\n' ';')
[[ $got == "daily 65536 auto;vendorA/weekly 1048576 auto;" ]] || bad "$CASE: qemu-img info: $got"
# The default is QEMU's (and libvirt's, which passes none): on 4K clusters 4K.
[[ $(bitmaps c4.qcow2) == "$(bitmaps c4-twin.qcow2)" ]] ||
    bad "$CASE: default granularity: ours $(bitmaps c4.qcow2), qemu-img $(bitmaps c4-twin.qcow2)"
[[ $(bitmaps c4.qcow2) == "daily 4096 auto" ]] || bad "$CASE: 4k clusters: $(bitmaps c4.qcow2)"
clean c.qcow2 c4.qcow2
expect_err "checkpoint 'daily' already exists (layer 0: c.qcow2)" -- checkpoint create c.qcow2 daily
expect_err "empty namespace part" -- checkpoint create c.qcow2 vendorA/
expect_err "control characters" -- checkpoint create c.qcow2 $'a\tb'
qemu-img create -q -f raw r.raw 1M
expect_err "r.raw: a raw image cannot hold checkpoints" -- checkpoint create r.raw x
expect_err "nope.qcow2" "No such file" -- checkpoint create nope.qcow2 x
[[ $(bitmaps c.qcow2 | wc -l) -eq 2 ]] || bad "$CASE: a refused create changed the image: $(bitmaps c.qcow2)"
clean c.qcow2

# Names QEMU allows but create refuses still list (escaped in text, exact
# in JSON) and delete.
CASE=odd-names
qemu-img create -q -f qcow2 o.qcow2 1M
odd=$'a\nb"\\/x\e[1m'
qemu-img bitmap --add o.qcow2 "$odd" || fail "oracle broke: qemu-img bitmap --add with a control character"
"$QCBT" checkpoint list o.qcow2 >list.txt 2>err || bad "$CASE: list: $(cat err)"
[[ $(wc -l <list.txt) -eq 1 && $(cat list.txt) == 'a?b"\/x?[1m: usable'* ]] || bad "$CASE: text list: $(cat -v list.txt)"
"$QCBT" checkpoint list --json o.qcow2 >o.json 2>err || bad "$CASE: list --json: $(cat err)"
"$PYTHON" -c '
import json, sys
c = json.load(open("o.json"))["checkpoints"]
sys.exit(not (len(c) == 1 and c[0]["name"] == sys.argv[1] and c[0]["namespace"] == sys.argv[1].rsplit("/", 1)[0]))' "$odd" ||
    bad "$CASE: JSON name or namespace: $(cat o.json)"
"$QCBT" checkpoint delete o.qcow2 "$odd" 2>err || bad "$CASE: delete: $(cat err)"
[[ -z $(bitmaps o.qcow2) ]] || bad "$CASE: not deleted"
clean o.qcow2

# --- writes are recorded, dirty bytes as qemu-nbd sees them --------------------

CASE=recorded
# 10 granules of 64K and 4K more: the last bit covers a partial granule.
qemu-img create -q -f qcow2 w.qcow2 659456
"$QCBT" checkpoint create w.qcow2 cp 2>err || bad "$CASE: create: $(cat err)"
[[ $(cplist w.qcow2) == "cp true 0 65536 0 true" ]] || bad "$CASE: fresh: $(cplist w.qcow2)"
qemu-io -c 'write -P 1 65536 4k' -c 'write -P 2 200k 100k' -c 'write 658944 512' w.qcow2 >/dev/null ||
    fail "oracle broke: qemu-io write"
want=$(nbd_dirty w.qcow2 cp)
# 64K..128K, 192K..320K, and the last 4K: 65536 + 131072 + 4096.
[[ $want == 200704 ]] || fail "oracle broke: qemu-nbd exports $want dirty bytes"
got=$(field w.qcow2 cp dirty-bytes)
[[ $got == "$want" ]] || bad "$CASE: list says $got dirty bytes, qemu-nbd -B $want"
"$QCBT" checkpoint list w.qcow2 >list.txt 2>err || bad "$CASE: list: $(cat err)"
grep -F "cp: usable, dirty 200704 bytes" list.txt >/dev/null || bad "$CASE: text list: $(cat list.txt)"
clean w.qcow2

# --- the chain: order, health, refusals -----------------------------------------

CASE=chain
qemu-img create -q -f qcow2 base.qcow2 64M
qemu-img bitmap --add base.qcow2 old2
qemu-img bitmap --add -g 128k base.qcow2 old1
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
qemu-img bitmap --add mid.qcow2 old2
qemu-img bitmap --add mid.qcow2 old1
qemu-img bitmap --add mid.qcow2 m1
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
qemu-img bitmap --add top.qcow2 m1
qemu-img bitmap --add top.qcow2 old2
"$QCBT" checkpoint create top.qcow2 new 2>err || bad "$CASE: create: $(cat err)"
qemu-io -c 'write 1M 64k' top.qcow2 >/dev/null || fail "oracle broke: qemu-io write"
expect_err "checkpoint 'old1' already exists (layer 1: mid.qcow2)" -- checkpoint create top.qcow2 old1
# Creation order: the oldest layer first, its directory order (old2 was
# added before old1); old1 is missing in the top: tolerant only, and its
# granularity (64K above, 128K in base) merged conservatively.
got=$(cplist top.qcow2 | tr '\n' ';')
want="old2 true 65536 65536 0,1,2 true;old1 true 65536 65536 1,2 false;m1 true 65536 65536 0,1 true;new true 65536 65536 0 true;"
[[ $got == "$want" ]] || bad "$CASE: list: $got, want $want"
note=$(field top.qcow2 old1 notes)
[[ $note == *"layer 0 (top.qcow2) contributes its allocation map"* ]] || bad "$CASE: old1 notes: $note"
[[ $note == *"layer 2 (base.qcow2) has granularity 131072"* ]] || bad "$CASE: old1 notes: $note"
[[ $(field top.qcow2 old1 strict-reason) == *"layer 0 (top.qcow2)"*"missing"* ]] ||
    bad "$CASE: old1 strict-reason: $(field top.qcow2 old1 strict-reason)"
# Disabled in the top layer: it records nothing, not usable.
qemu-img bitmap --disable top.qcow2 m1
[[ $(field top.qcow2 m1 usable) == false ]] || bad "$CASE: disabled m1 usable"
[[ $(field top.qcow2 m1 reason) == *"disabled in the top layer"* ]] || bad "$CASE: m1 reason: $(field top.qcow2 m1 reason)"
qemu-img bitmap --enable top.qcow2 m1
# Namespace filter.
"$QCBT" checkpoint create top.qcow2 vA/x 2>err || bad "$CASE: create vA/x: $(cat err)"
[[ $(cplist top.qcow2 --namespace vA | cut -d' ' -f1 | tr '\n' ' ') == "vA/x " ]] ||
    bad "$CASE: --namespace vA: $(cplist top.qcow2 --namespace vA)"
[[ $(cplist top.qcow2 --namespace '' | cut -d' ' -f1 | tr '\n' ' ') == "old2 old1 m1 new " ]] ||
    bad "$CASE: --namespace '': $(cplist top.qcow2 --namespace '')"
clean top.qcow2 mid.qcow2 base.qcow2

# --- delete across the chain --------------------------------------------------

CASE=delete
for f in top mid base; do cp $f.qcow2 d-$f.qcow2; done
qemu-img rebase -u -F qcow2 -b d-base.qcow2 d-mid.qcow2
qemu-img rebase -u -F qcow2 -b d-mid.qcow2 d-top.qcow2
"$QCBT" checkpoint delete d-top.qcow2 old2 2>err || bad "$CASE: delete: $(cat err)"
got=$(for f in top mid base; do bitmaps d-$f.qcow2 | cut -d' ' -f1 | tr '\n' ' '; echo -n '| '; done)
[[ $got == "m1 new vA/x | old1 m1 | old1 | " ]] || bad "$CASE: after delete old2: $got"
clean d-top.qcow2 d-mid.qcow2 d-base.qcow2
expect_err "checkpoint 'old2' not found in any layer of d-top.qcow2" -- checkpoint delete d-top.qcow2 old2
# An interrupted delete (the top done, the rest not): a rerun finishes it.
qemu-img bitmap --remove d-top.qcow2 m1
"$QCBT" checkpoint delete d-top.qcow2 m1 2>err || bad "$CASE: rerun: $(cat err)"
got=$(for f in top mid base; do bitmaps d-$f.qcow2 | cut -d' ' -f1 | tr '\n' ' '; echo -n '| '; done)
[[ $got == "new vA/x | old1 | old1 | " ]] || bad "$CASE: after rerun: $got"
clean d-top.qcow2 d-mid.qcow2 d-base.qcow2

# A lower layer whose bitmap directory cannot be read may hide the name:
# create and delete refuse, naming it, and change nothing.
CASE=unreadable
for f in top mid base; do cp $f.qcow2 x-$f.qcow2; done
qemu-img rebase -u -F qcow2 -b x-base.qcow2 x-mid.qcow2
qemu-img rebase -u -F qcow2 -b x-mid.qcow2 x-top.qcow2
# The bitmaps extension of x-mid.qcow2: its directory offset made
# unaligned (qcow2.txt "Bitmaps extension": offset 16 of the data).
"$PYTHON" - x-mid.qcow2 <<'PYEOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    h = f.read(65536)
    off = struct.unpack(">I", h[100:104])[0]  # header_length
    while True:
        magic, ln = struct.unpack(">II", h[off:off + 8])
        if magic == 0:
            sys.exit("no bitmaps extension")
        if magic == 0x23852875:
            f.seek(off + 8 + 16)
            f.write(struct.pack(">Q", struct.unpack(">Q", h[off + 24:off + 32])[0] + 8))
            break
        off += 8 + (ln + 7) // 8 * 8
PYEOF
before=$(cat x-top.qcow2 x-mid.qcow2 x-base.qcow2 | sha256sum)
expect_err "layer 1 (x-mid.qcow2): bitmap directory unreadable" "cannot tell whether it holds 'fresh'" -- checkpoint create x-top.qcow2 fresh
expect_err "layer 1 (x-mid.qcow2): bitmap directory unreadable" "cannot tell whether it holds 'old2'" -- checkpoint delete x-top.qcow2 old2
[[ $(cat x-top.qcow2 x-mid.qcow2 x-base.qcow2 | sha256sum) == "$before" ]] ||
    bad "$CASE: a refused create or delete changed a file of the chain"

# --- namespaces: rotation never crosses consumers -------------------------------

CASE=rotate
qemu-img create -q -f qcow2 ns.qcow2 64M
"$QCBT" checkpoint create ns.qcow2 daily 2>err || bad "$CASE: $(cat err)"
"$QCBT" checkpoint create ns.qcow2 vendorA/sub/keepme 2>err || bad "$CASE: $(cat err)"
"$QCBT" checkpoint create ns.qcow2 vendorAB/d0 2>err || bad "$CASE: $(cat err)"
for i in 1 2 3 4; do
    "$QCBT" checkpoint create --keep 5 ns.qcow2 vendorB/d$i 2>err || bad "$CASE: vendorB/d$i: $(cat err)"
    "$QCBT" checkpoint create --keep 2 ns.qcow2 vendorA/d$i >rot.out 2>err || bad "$CASE: vendorA/d$i: $(cat err)"
done
[[ $(cat rot.out) == "rotated out: vendorA/d2" ]] || bad "$CASE: last rotation said: $(cat rot.out)"
got=$(bitmaps ns.qcow2 | cut -d' ' -f1 | tr '\n' ' ')
want="daily vendorA/sub/keepme vendorAB/d0 vendorB/d1 vendorB/d2 vendorB/d3 vendorA/d3 vendorB/d4 vendorA/d4 "
[[ $got == "$want" ]] || bad "$CASE: after rotation: $got, want $want"
clean ns.qcow2
# vendorB rotates down to 1: vendorA's and the rest stay.
"$QCBT" checkpoint create --keep 1 ns.qcow2 vendorB/d5 >rot.out 2>err || bad "$CASE: $(cat err)"
[[ $(tr '\n' ' ' <rot.out) == "rotated out: vendorB/d1 rotated out: vendorB/d2 rotated out: vendorB/d3 rotated out: vendorB/d4 " ]] ||
    bad "$CASE: vendorB rotation said: $(cat rot.out)"
got=$(bitmaps ns.qcow2 | cut -d' ' -f1 | tr '\n' ' ')
want="daily vendorA/sub/keepme vendorAB/d0 vendorA/d3 vendorA/d4 vendorB/d5 "
[[ $got == "$want" ]] || bad "$CASE: after vendorB rotation: $got, want $want"
# Deleting one consumer's checkpoint leaves a same-named one of another.
"$QCBT" checkpoint create ns.qcow2 vendorB/d3 2>err || bad "$CASE: $(cat err)"
"$QCBT" checkpoint delete ns.qcow2 vendorA/d3 2>err || bad "$CASE: $(cat err)"
got=$(bitmaps ns.qcow2 | cut -d' ' -f1 | tr '\n' ' ')
want="daily vendorA/sub/keepme vendorAB/d0 vendorA/d4 vendorB/d5 vendorB/d3 "
[[ $got == "$want" ]] || bad "$CASE: after delete vendorA/d3: $got, want $want"
clean ns.qcow2

# --- locks and in-use bitmaps ---------------------------------------------------

CASE=locks
qemu-img create -q -f qcow2 u.qcow2 64M
"$QCBT" checkpoint create u.qcow2 cp 2>err || bad "$CASE: create: $(cat err)"
qemu-io -c 'sleep 3600000' u.qcow2 </dev/null >qemu-io.log 2>&1 &
pid=$!
cleanup_pid "$pid"
# (qemu-img info -U may see QEMU's header half written: its warnings are
# dropped.)
in_use_shown() { qemu-img info -U --output=json u.qcow2 2>/dev/null | grep in-use >/dev/null; }
wait_until -p "$pid" -- in_use_shown ||
    fail "oracle broke: qemu-io never marked the bitmap in use: $(cat qemu-io.log)"
expect_err "u.qcow2: held by another process" -- checkpoint create u.qcow2 other
expect_err "u.qcow2: held by another process" -- checkpoint delete u.qcow2 cp
expect_err "held by another process" "-U/--force-share" -- checkpoint list u.qcow2
# -U reads it anyway, and sees QEMU's in_use flag.
"$QCBT" checkpoint list -U u.qcow2 >list.txt 2>err || bad "$CASE: list -U: $(cat err)"
grep -F "cp: not usable: bitmap 'cp' is in use" list.txt >/dev/null || bad "$CASE: list -U: $(cat list.txt)"
disown "$pid"
kill -KILL "$pid"
wait_gone "$pid" || fail "qemu-io does not die"
[[ $(field u.qcow2 cp usable) == false ]] || bad "$CASE: an in-use checkpoint is usable"
[[ $(field u.qcow2 cp reason) == *"in use"* ]] || bad "$CASE: in-use reason: $(field u.qcow2 cp reason)"
[[ $(field u.qcow2 cp dirty-bytes) == null ]] || bad "$CASE: in-use dirty bytes: $(field u.qcow2 cp dirty-bytes)"
"$QCBT" checkpoint list u.qcow2 >list.txt 2>err || bad "$CASE: list: $(cat err)"
grep -F "cp: not usable: bitmap 'cp' is in use at layer 0" list.txt >/dev/null || bad "$CASE: text: $(cat list.txt)"
# An in-use checkpoint can still be deleted (as qemu-img bitmap --remove).
"$QCBT" checkpoint delete u.qcow2 cp 2>err || bad "$CASE: delete in use: $(cat err)"
[[ -z $(bitmaps u.qcow2) ]] || bad "$CASE: in-use delete left $(bitmaps u.qcow2)"
clean u.qcow2
# A lower layer holding the name, held by a QEMU: the failure names it,
# and the top (done first) is the only layer changed.
for f in top mid base; do cp $f.qcow2 l-$f.qcow2; done
qemu-img rebase -u -F qcow2 -b l-base.qcow2 l-mid.qcow2
qemu-img rebase -u -F qcow2 -b l-mid.qcow2 l-top.qcow2
# (Read-only, as a VM holds its backing files: killed, it leaves no
# bitmap in use.)
qemu-io -r -c 'sleep 3600000' l-base.qcow2 </dev/null >qemu-io.log 2>&1 &
pid=$!
cleanup_pid "$pid"
# base_locked: /proc/locks shows an OFD lock on l-base.qcow2 (a probe
# that locks would race with qemu-io's open).
base_locked() {
    local id
    id=$(printf '%02x:%02x:%s' "$(stat -c %Hd l-base.qcow2)" "$(stat -c %Ld l-base.qcow2)" "$(stat -c %i l-base.qcow2)")
    awk -v id="$id" '$2 == "OFDLCK" && $6 == id { f = 1 } END { exit !f }' /proc/locks
}
wait_until -p "$pid" -- base_locked || fail "oracle broke: qemu-io never locked l-base.qcow2: $(cat qemu-io.log)"
expect_err "layer 2 (l-base.qcow2)" "held by another process" "run delete again" -- checkpoint delete l-top.qcow2 old2
disown "$pid"
kill -KILL "$pid"
wait_gone "$pid" || fail "qemu-io does not die"
got=$(for f in top mid; do bitmaps l-$f.qcow2 | cut -d' ' -f1 | tr '\n' ' '; echo -n '| '; done)
[[ $got == "m1 new vA/x | old1 m1 | " ]] || bad "$CASE: before the locked layer: $got"
[[ $(field l-top.qcow2 old2 usable) == true ]] || bad "$CASE: a partly deleted checkpoint is not usable (it is sound)"
clean l-top.qcow2 l-mid.qcow2

((failures == 0)) || fail "$failures failure(s)"
note "all checkpoint cases passed"
