#!/bin/bash
# qcbt-server with the real NBD clients backup tools use: nbdinfo (--list
# --content, --map of base:allocation, qemu:allocation-depth and every
# qemu:dirty-bitmap context), nbdcopy, qemu-img convert/compare/map (with
# x-dirty-bitmap), qemu-io, and python3 libnbd negotiating base:allocation
# and a bitmap together the way virtnbdbackup does (with and without
# REQ_ONE) -- over a private unix socket, and once over TCP on 127.0.0.1.
#
# Images (generated here): a single qcow2 with bitmaps of 64 KiB and 4 KiB
# granularity (one disabled) and a size that is not a multiple of either;
# a 3-layer chain (raw base <- mid <- top) with the bitmap propagated to
# every qcow2 layer; a chain whose overlay has no bitmap (tolerant merge).
# Expected bitmaps come from the writes this script made (a model), and
# every client must agree with it.  Then the command line: aliases,
# several exports, -x, --all-bitmaps with an in-use bitmap, bitmaps that
# cannot be merged (exit 1 with the reason), --fork/--pid-file, SIGTERM
# with a client connected (exit 0), exit after the last client without -t.
#
# QCBT_KEEP_TMP=1 keeps the images.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io nbdinfo nbdcopy cmp timeout

SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER"
"$PYTHON" -c 'import nbd' 2>/dev/null || fail "python3-libnbd missing for $PYTHON"

MiB=$((1024 * 1024))
rc=0
cd "$TMPD"

ok() { note "ok: $*"; }
bad() {
    note "FAIL: $*"
    rc=1
}

# --- helpers -----------------------------------------------------------------

cat >maps.py <<'EOF'
"""Extent maps normalised to [[offset, length, value], ...], adjacent equal
values merged, checked to cover [0, size) exactly.

  maps.py norm KIND FILE SIZE   KIND: nbdinfo (nbdinfo --map --json),
      qdirty (qemu-img map of x-dirty-bitmap: dirty = not data),
      qdepth (qemu-img map: depth + 1 when present, else 0), libnbd (ours)
  maps.py model GRAN SIZE OFF+LEN...   dirty bits set by those writes
  maps.py cmp WHAT A B          exit 1 and print the first difference
"""
import json, sys

def merge(ext, size, what):
    out, pos = [], 0
    for off, ln, v in ext:
        if off != pos:
            sys.exit(f"{what}: extent at {off}, expected {pos} (gap/overlap)")
        if ln <= 0:
            sys.exit(f"{what}: extent of length {ln} at {off}")
        if out and out[-1][2] == v:
            out[-1][1] += ln
        else:
            out.append([off, ln, v])
        pos += ln
    if pos != size:
        sys.exit(f"{what}: extents end at {pos}, size is {size}")
    return out

def norm(kind, path, size):
    data = json.load(open(path))
    if kind in ("nbdinfo", "libnbd"):
        ext = [(e["offset"], e["length"], e["type"]) for e in data]
    elif kind == "qdirty":
        ext = [(e["start"], e["length"], 0 if e["data"] else 1) for e in data]
    elif kind == "qdepth":
        ext = [(e["start"], e["length"], e["depth"] + 1 if e["present"] else 0)
               for e in data]
    else:
        sys.exit(f"unknown kind {kind}")
    return merge(ext, size, f"{kind} {path}")

def model(gran, size, writes):
    bits = set()
    for w in writes:
        off, ln = (int(x, 0) for x in w.split("+"))
        for b in range(off // gran, (off + ln - 1) // gran + 1):
            bits.add(b)
    ext = []
    nb = (size + gran - 1) // gran
    for b in range(nb):
        s = b * gran
        ext.append((s, min(gran, size - s), 1 if b in bits else 0))
    return merge(ext, size, "model")

cmd = sys.argv[1]
if cmd == "norm":
    json.dump(norm(sys.argv[2], sys.argv[3], int(sys.argv[4])), sys.stdout)
elif cmd == "model":
    json.dump(model(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]),
              sys.stdout)
elif cmd == "cmp":
    what, a, b = sys.argv[2], json.load(open(sys.argv[3])), json.load(open(sys.argv[4]))
    if a != b:
        # first differing byte range
        def at(m, o):
            for off, ln, v in m:
                if off <= o < off + ln:
                    return v
        pts = sorted({e[0] for e in a} | {e[0] for e in b})
        for p in pts:
            if at(a, p) != at(b, p):
                print(f"{what}: differ at offset {p}: {at(a, p)} vs {at(b, p)}",
                      file=sys.stderr)
                break
        print(f"{what}:\n  expected {a[:12]}{'...' if len(a) > 12 else ''}\n"
              f"  got      {b[:12]}{'...' if len(b) > 12 else ''}",
              file=sys.stderr)
        sys.exit(1)
EOF

# virtnbdbackup's way: add_meta_context(base:allocation) and the bitmap,
# then block_status over the whole disk, callbacks per context.
cat >nbdpy.py <<'EOF'
"""nbdpy.py URI EXPORT BITMAPCTX OUTPREFIX [--req-one]
Writes OUTPREFIX.base.json and OUTPREFIX.bitmap.json ({offset,length,type}).
Checks per reply: one callback per context, extents non-zero, flags in
range, all contexts end at the same offset, REQ_ONE: one extent each,
no longer than the request."""
import json, sys
import nbd

uri, export, bmctx, out = sys.argv[1:5]
req_one = "--req-one" in sys.argv
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.add_meta_context(bmctx)
h.set_export_name(export)
h.connect_uri(uri)
ctxs = [h.get_meta_context(i) for i in range(h.get_nr_meta_contexts())]
for c in (nbd.CONTEXT_BASE_ALLOCATION, bmctx):
    if not h.can_meta_context(c):
        sys.exit(f"context {c} not negotiated (have {ctxs})")
size = h.get_size()
align = h.get_block_size(nbd.SIZE_MINIMUM) or 512
maps = {nbd.CONTEXT_BASE_ALLOCATION: [], bmctx: []}
off, calls = 0, 0
while off < size:
    count = min(size - off, 2**32 - 1 - align + 1)
    got = {}
    def cb(metacontext, offset, entries, err):
        if metacontext in got:
            raise RuntimeError(f"two callbacks for {metacontext}")
        got[metacontext] = (offset, list(entries))
        return 0
    h.block_status(count, off, cb, nbd.CMD_FLAG_REQ_ONE if req_one else 0)
    calls += 1
    if set(got) != set(maps):
        sys.exit(f"block status at {off}: contexts {sorted(got)}")
    ends = set()
    for ctx, (o, e) in got.items():
        if o != off:
            sys.exit(f"{ctx}: callback offset {o} != {off}")
        pairs = list(zip(e[0::2], e[1::2]))
        if not pairs:
            sys.exit(f"{ctx}: no extent at {off}")
        if req_one and (len(pairs) != 1 or pairs[0][0] > count):
            sys.exit(f"{ctx}: REQ_ONE reply {pairs[:3]} for count {count}")
        pos = off
        for ln, fl in pairs:
            if ln == 0:
                sys.exit(f"{ctx}: zero-length extent at {pos}")
            if ctx == bmctx and fl not in (0, 1):
                sys.exit(f"{ctx}: flags {fl}")
            if ctx == nbd.CONTEXT_BASE_ALLOCATION and fl not in (0, 1, 2, 3):
                sys.exit(f"{ctx}: flags {fl}")
            ln = min(ln, size - pos)
            if ln > 0:
                maps[ctx].append({"offset": pos, "length": ln, "type": fl})
            pos += ln
        ends.add(min(pos, off + count))
    if req_one:
        # REQ_ONE lengths may differ per context; go on from the shortest
        # and drop what the others said past it (asked again next time).
        end = min(ends)
        for ctx in maps:
            m = maps[ctx]
            while m and m[-1]["offset"] >= end:
                m.pop()
            if m and m[-1]["offset"] + m[-1]["length"] > end:
                m[-1]["length"] = end - m[-1]["offset"]
    else:
        if len(ends) != 1:
            sys.exit(f"contexts end at different offsets {ends} (request {off}+{count})")
        end = ends.pop()
    if end <= off:
        sys.exit("no progress")
    off = end
json.dump(maps[nbd.CONTEXT_BASE_ALLOCATION], open(out + ".base.json", "w"))
json.dump(maps[bmctx], open(out + ".bitmap.json", "w"))
h.shutdown()
print(f"{calls} block status calls", file=sys.stderr)
EOF

# start_server LOG ARGS...: run qcbt-server in the background (SPID) and
# wait until its unix socket $SOCKP accepts connections.  With TCP=1 it
# serves a TCP port on 127.0.0.1 bound before it starts (socket activation:
# no -k/-b/-p, no wait), and sets PORT.
start_server() {
    local log=$1
    shift
    if [[ -n ${TCP:-} ]]; then
        serve_activated "$log" "$SERVER" "$@"
        SPID=$ACT_PID
        PORT=$ACT_PORT
        return 0
    fi
    rm -f "$SOCKP"
    "$SERVER" "$@" 2>"$log" &
    SPID=$!
    cleanup_pid "$SPID"
    wait_nbd "nbd+unix:///?socket=$SOCKP" "$SPID" ||
        fail "server did not start ($*): $(cat "$log")"
}

# stop_server: SIGTERM, expect exit status 0 (the bound only catches a
# server that ignores it).
stop_server() {
    local st=0
    kill -TERM "$SPID" 2>/dev/null || true
    wait_gone "$SPID" || { bad "server ignores SIGTERM"; kill -KILL "$SPID"; }
    wait "$SPID" || st=$?
    [[ $st -eq 0 ]] || bad "server exit status $st after SIGTERM"
}

norm() { "$PYTHON" maps.py norm "$@"; }
cmpmap() { "$PYTHON" maps.py cmp "$@"; }

# check_bitmap URI EXPORT CTX SIZE MODEL.json TAG: nbdinfo --map, qemu-img
# map x-dirty-bitmap and libnbd (with and without REQ_ONE) all equal MODEL.
check_bitmap() {
    local uri=$1 exp=$2 ctx=$3 size=$4 model=$5 tag=$6 iopts
    if nbdinfo --map="$ctx" --json "$uri" >"$tag.nbdinfo.json" 2>"$tag.err" &&
        norm nbdinfo "$tag.nbdinfo.json" "$size" >"$tag.n1.json" &&
        cmpmap "$tag: nbdinfo --map=$ctx" "$model" "$tag.n1.json"; then
        ok "$tag: nbdinfo --map=$ctx equals the model"
    else
        bad "$tag: nbdinfo --map=$ctx ($(cat "$tag.err"))"
    fi
    if [[ $uri == nbd+unix://* ]]; then
        iopts="driver=nbd,server.type=unix,server.path=${uri#*socket=}"
    else
        local hp=${uri#nbd://}
        hp=${hp%%/*}
        iopts="driver=nbd,server.type=inet,server.host=${hp%:*},server.port=${hp##*:}"
    fi
    [[ -n $exp ]] && iopts+=",export=$exp"
    if qemu-img map --output=json --image-opts "$iopts,x-dirty-bitmap=$ctx" \
            >"$tag.qmap.json" 2>"$tag.err" &&
        norm qdirty "$tag.qmap.json" "$size" >"$tag.n2.json" &&
        cmpmap "$tag: qemu-img map x-dirty-bitmap=$ctx" "$model" "$tag.n2.json"; then
        ok "$tag: qemu-img map x-dirty-bitmap=$ctx equals the model"
    else
        bad "$tag: qemu-img map x-dirty-bitmap=$ctx ($(cat "$tag.err"))"
    fi
    local r1
    for r1 in "" --req-one; do
        if "$PYTHON" nbdpy.py "$uri" "$exp" "$ctx" "$tag.py$r1" $r1 2>"$tag.err" &&
            norm libnbd "$tag.py$r1.bitmap.json" "$size" >"$tag.n3.json" &&
            cmpmap "$tag: libnbd $ctx $r1" "$model" "$tag.n3.json" &&
            norm libnbd "$tag.py$r1.base.json" "$size" >"$tag.n4.json" &&
            nbdinfo --map --json "$uri" >"$tag.base.json" &&
            norm nbdinfo "$tag.base.json" "$size" >"$tag.n5.json" &&
            cmpmap "$tag: libnbd base:allocation $r1 vs nbdinfo" "$tag.n5.json" "$tag.n4.json"; then
            ok "$tag: python libnbd base:allocation + $ctx ${r1:-(no REQ_ONE)}: $(tail -n1 "$tag.err")"
        else
            bad "$tag: python libnbd base:allocation + $ctx ${r1:-(no REQ_ONE)}: $(tail -n3 "$tag.err")"
        fi
    done
}

# check_data URI REF.raw TAG: nbdcopy, qemu-img convert and compare.
check_data() {
    local uri=$1 ref=$2 tag=$3
    rm -f "$tag.copy.raw" "$tag.conv.raw"
    if nbdcopy "$uri" "$tag.copy.raw" 2>"$tag.err" && cmp "$ref" "$tag.copy.raw"; then
        ok "$tag: nbdcopy equals qemu-img convert -O raw"
    else
        bad "$tag: nbdcopy $uri ($(cat "$tag.err"))"
    fi
    if qemu-img convert -f raw -O raw "$uri" "$tag.conv.raw" 2>"$tag.err" &&
        cmp "$ref" "$tag.conv.raw"; then
        ok "$tag: qemu-img convert over NBD equals the local convert"
    else
        bad "$tag: qemu-img convert $uri ($(cat "$tag.err"))"
    fi
    if qemu-img compare -f raw -F raw "$uri" "$ref" >"$tag.cmp" 2>&1; then
        ok "$tag: qemu-img compare: $(cat "$tag.cmp")"
    else
        bad "$tag: qemu-img compare $uri: $(cat "$tag.cmp")"
    fi
    rm -f "$tag.copy.raw" "$tag.conv.raw"
}

# check_depth URI IMG SIZE TAG [FMT]: qemu:allocation-depth equals
# qemu-img map's depth/present; base:allocation covers the disk.
check_depth() {
    local uri=$1 img=$2 size=$3 tag=$4
    qemu-img map --output=json "$img" >"$tag.qdepth.json"
    norm qdepth "$tag.qdepth.json" "$size" >"$tag.d1.json"
    if nbdinfo --map=qemu:allocation-depth --json "$uri" >"$tag.depth.json" 2>"$tag.err" &&
        norm nbdinfo "$tag.depth.json" "$size" >"$tag.d2.json" &&
        cmpmap "$tag: qemu:allocation-depth vs qemu-img map" "$tag.d1.json" "$tag.d2.json"; then
        ok "$tag: nbdinfo --map=qemu:allocation-depth equals qemu-img map depth"
    else
        bad "$tag: qemu:allocation-depth ($(cat "$tag.err"))"
    fi
    if nbdinfo --map --json "$uri" >"$tag.alloc.json" 2>"$tag.err" &&
        norm nbdinfo "$tag.alloc.json" "$size" >/dev/null; then
        ok "$tag: nbdinfo --map (base:allocation) covers the disk"
    else
        bad "$tag: nbdinfo --map base:allocation ($(cat "$tag.err"))"
    fi
}

# contexts URI: the contexts nbdinfo --list --content shows, one a line.
contexts() {
    nbdinfo --list --content "$1" | awk '/contexts:/ {on=1; next}
        on && /^\t\t/ {gsub(/\t/, ""); print; next} {on=0}'
}

# --- images --------------------------------------------------------------
SINGLE_SIZE=$((96 * MiB + 2560))   # a multiple of 512 only
qemu-img create -q -f qcow2 single.qcow2 $SINGLE_SIZE
qemu-io -f qcow2 -c 'write -P 0x11 0 2M' single.qcow2 >/dev/null   # before any bitmap
qemu-img bitmap --add single.qcow2 b0
qemu-img bitmap --add -g 4096 single.qcow2 b1
W_BOTH=("1048576+65536" "10485760+196608" "66047+3000")
W_B0=("52428800+4096" "$((SINGLE_SIZE - 2560))+2560")   # after b1 is disabled
qemu-io -f qcow2 -c 'write -P 0xab 1M 64k' -c 'write -P 0xcd 10M 192k' \
    -c 'write -P 0x5c 66047 3000' single.qcow2 >/dev/null
qemu-img bitmap --disable single.qcow2 b1
qemu-io -f qcow2 -c 'write -P 0xef 50M 4k' \
    -c "write -P 0x7e $((SINGLE_SIZE - 2560)) 2560" single.qcow2 >/dev/null
qemu-img convert -O raw single.qcow2 single.raw
"$PYTHON" maps.py model 65536 $SINGLE_SIZE "${W_BOTH[@]}" "${W_B0[@]}" >single.b0.model
"$PYTHON" maps.py model 4096 $SINGLE_SIZE "${W_BOTH[@]}" >single.b1.model

# 3 layers, raw base, bitmap ck propagated (mid: created with the
# checkpoint; top: the external snapshot gets an empty ck), plus "late"
# only in top.
CHAIN_SIZE=$((48 * MiB))
qemu-img create -q -f raw base.raw $CHAIN_SIZE
qemu-io -f raw -c 'write -P 0x01 0 8M' -c 'write -P 0x02 40M 1M' base.raw >/dev/null
qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2
qemu-io -f qcow2 -c 'write -P 0x20 1M 64k' mid.qcow2 >/dev/null   # before ck
qemu-img bitmap --add mid.qcow2 ck
qemu-io -f qcow2 -c 'write -P 0x21 4M 128k' -c 'write -P 0x22 20M 4k' \
    -c 'write -z 41M 64k' mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
qemu-img bitmap --add top.qcow2 ck
qemu-img bitmap --add -g 32768 top.qcow2 late
qemu-io -f qcow2 -c 'write -P 0x31 6M 64k' -c 'write -P 0x32 30M 1M' \
    -c 'write -P 0x33 4M 4k' top.qcow2 >/dev/null
qemu-img convert -O raw top.qcow2 chain.raw
"$PYTHON" maps.py model 65536 $CHAIN_SIZE "4194304+131072" "20971520+4096" \
    "42991616+65536" "6291456+65536" "31457280+1048576" "4194304+4096" >chain.ck.model
"$PYTHON" maps.py model 32768 $CHAIN_SIZE "6291456+65536" "31457280+1048576" \
    "4194304+4096" >chain.late.model

# A chain whose overlay was made without the bitmap (qemu-img create -b).
qemu-img create -q -f qcow2 lower.qcow2 $CHAIN_SIZE
qemu-img bitmap --add lower.qcow2 ck
qemu-io -f qcow2 -c 'write -P 0x41 2M 64k' lower.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b lower.qcow2 -F qcow2 ovl.qcow2
qemu-io -f qcow2 -c 'write -P 0x51 8M 4k' -c 'write -P 0x52 16777316 200' \
    ovl.qcow2 >/dev/null
qemu-img convert -O raw ovl.qcow2 ovl.raw
# Tolerant: ck@lower plus everything the overlay allocates (whole clusters).
"$PYTHON" maps.py model 65536 $CHAIN_SIZE "2097152+65536" "8388608+65536" \
    "16777216+65536" >ovl.ck.model

# An image with an in-use bitmap (qemu-io killed) and a good one.
qemu-img create -q -f qcow2 inuse.qcow2 16M
qemu-img bitmap --add inuse.qcow2 broken
sh -c 'qemu-io -f qcow2 -c "write -P 0x61 1M 64k" -c flush -c "sigraise 9" inuse.qcow2 >/dev/null 2>&1; exit 0'
qemu-img info -U --output=json inuse.qcow2 | grep '"in-use"' >/dev/null ||
    fail "could not leave a bitmap in use"
qemu-img bitmap --add inuse.qcow2 good
qemu-io -f qcow2 -c 'write -P 0x62 3M 64k' inuse.qcow2 >/dev/null
note "images ready"

declare -A SHA
for f in single.qcow2 base.raw mid.qcow2 top.qcow2 lower.qcow2 ovl.qcow2 inuse.qcow2; do
    SHA[$f]=$(sha256sum "$f" | cut -d' ' -f1)
done

U=$TMPD/s.sock
uri() { echo "nbd+unix:///${1:-}?socket=$U"; }

# --- 1. single image, every client -----------------------------------------
SOCKP=$U start_server single.log -k "$U" -t -A -B b0 -B b1 single.qcow2
want=$'base:allocation\nqemu:allocation-depth\nqemu:dirty-bitmap:b0\nqemu:dirty-bitmap:b1'
got=$(contexts "$(uri)" | sort)
[[ $got == "$want" ]] && ok "single: nbdinfo --list --content contexts" ||
    bad "single: contexts: $(echo $got)"
nbdinfo --list --content "$(uri)" | grep 'is_read_only: true' >/dev/null &&
    ok "single: read-only" || bad "single: not advertised read-only"
[[ $(nbdinfo --size "$(uri)") -eq $SINGLE_SIZE ]] && ok "single: size" ||
    bad "single: size $(nbdinfo --size "$(uri)") != $SINGLE_SIZE"
check_bitmap "$(uri)" "" qemu:dirty-bitmap:b0 $SINGLE_SIZE single.b0.model single-b0
check_bitmap "$(uri)" "" qemu:dirty-bitmap:b1 $SINGLE_SIZE single.b1.model single-b1
check_depth "$(uri)" single.qcow2 $SINGLE_SIZE single
check_data "$(uri)" single.raw single
if qemu-io -r -f raw "$(uri)" -c 'read -P 0x11 0 64k' -c 'read -P 0xab 1M 64k' \
        -c 'read -P 0xcd 10M 192k' -c 'read -P 0x5c 66047 3000' \
        -c 'read -P 0xef 50M 4k' -c 'read -P 0 60M 1M' \
        -c "read -P 0x7e $((SINGLE_SIZE - 2560)) 2560" >qemu-io.out 2>&1 &&
    ! grep -qiE 'fail|error|mismatch' qemu-io.out; then
    ok "single: qemu-io -r reads with -P patterns"
else
    bad "single: qemu-io: $(grep -iE 'fail|error' qemu-io.out | head -n3)"
fi
# A bitmap that is not published cannot be mapped.
if nbdinfo --map=qemu:dirty-bitmap:nosuch "$(uri)" >/dev/null 2>&1; then
    bad "single: an unpublished bitmap could be mapped"
else
    ok "single: nbdinfo --map of an unpublished bitmap fails"
fi
stop_server

# --- 2. the 3-layer chain, over unix and TCP ---------------------------------
SOCKP=$U start_server chain.log -k "$U" -t -A -B ck -B late top.qcow2
got=$(contexts "$(uri)" | sort)
want=$'base:allocation\nqemu:allocation-depth\nqemu:dirty-bitmap:ck\nqemu:dirty-bitmap:late'
[[ $got == "$want" ]] && ok "chain: contexts" || bad "chain: contexts: $(echo $got)"
check_bitmap "$(uri)" "" qemu:dirty-bitmap:ck $CHAIN_SIZE chain.ck.model chain-ck
check_bitmap "$(uri)" "" qemu:dirty-bitmap:late $CHAIN_SIZE chain.late.model chain-late
check_depth "$(uri)" top.qcow2 $CHAIN_SIZE chain
check_data "$(uri)" chain.raw chain
if qemu-io -r -f raw "$(uri)" -c 'read -P 0x01 0 1M' -c 'read -P 0x20 1M 64k' \
        -c 'read -P 0x33 4M 4k' -c 'read -P 0x21 4100k 124k' \
        -c 'read -P 0x31 6M 64k' -c 'read -P 0x02 40M 1M' -c 'read -P 0 41M 64k' \
        >qemu-io.out 2>&1 && ! grep -qiE 'fail|error|mismatch' qemu-io.out; then
    ok "chain: qemu-io -r reads every layer's pattern"
else
    bad "chain: qemu-io: $(grep -iE 'fail|error' qemu-io.out | head -n3)"
fi
stop_server

TCP=1 start_server tcp.log -t -A -B ck top.qcow2
T=nbd://127.0.0.1:$PORT
got=$(contexts "$T/" | sort)
want=$'base:allocation\nqemu:allocation-depth\nqemu:dirty-bitmap:ck'
[[ $got == "$want" ]] && ok "tcp: contexts" || bad "tcp: contexts: $(echo $got)"
check_bitmap "$T/" "" qemu:dirty-bitmap:ck $CHAIN_SIZE chain.ck.model tcp-ck
check_data "$T/" chain.raw tcp
stop_server

# Socket activation (used above): the inherited socket replaces -k, which
# is neither created nor removed; LISTEN_PID naming another process is not
# for us; an inherited descriptor that is not listening is an error.
rm -f "$TMPD/unused.sock"
TCP=1 start_server act.log -t -k "$TMPD/unused.sock" -B b0 single.qcow2
[[ $(nbdinfo --size "nbd://127.0.0.1:$PORT/") -eq $SINGLE_SIZE ]] &&
    ok "socket activation: served on the inherited socket" ||
    bad "socket activation: nbdinfo --size on the inherited socket"
stop_server
[[ -e $TMPD/unused.sock ]] && bad "socket activation: -k $TMPD/unused.sock was created" ||
    ok "socket activation: -k ignored ($(grep -m1 'socket activation' act.log))"
SOCKP=$U LISTEN_PID=1 LISTEN_FDS=1 start_server notme.log -t -k "$U" -B b0 single.qcow2
[[ $(nbdinfo --size "$(uri)") -eq $SINGLE_SIZE ]] &&
    ok "socket activation: LISTEN_PID of another process is ignored" ||
    bad "socket activation: LISTEN_PID=1 not ignored: $(cat notme.log)"
stop_server
st=0
timeout 300 bash -c 'exec 3</dev/null; LISTEN_FDS=1 LISTEN_PID=$$ exec "$0" "$@"' \
    "$SERVER" -t single.qcow2 >notlistening.out 2>&1 </dev/null || st=$?
[[ $st -eq 1 ]] && grep -q "descriptor 3 is not a listening socket" notlistening.out &&
    ok "socket activation: a descriptor that is not listening: $(cat notlistening.out)" ||
    bad "socket activation: a descriptor that is not listening: exit $st: $(cat notlistening.out)"

# --- 3. a bitmap-less overlay (tolerant), and --strict refusing it ----------
SOCKP=$U start_server ovl.log -k "$U" -t -B ck ovl.qcow2
grep -q "layer 0 (ovl.qcow2) contributes its allocation map" ovl.log &&
    ok "overlay: the fallback is reported: $(grep -m1 contributes ovl.log)" ||
    bad "overlay: no warning about the bitmap-less layer: $(cat ovl.log)"
check_bitmap "$(uri)" "" qemu:dirty-bitmap:ck $CHAIN_SIZE ovl.ck.model ovl-ck
check_data "$(uri)" ovl.raw ovl
stop_server

# expect_refused TAG NEEDLE... -- SERVER-ARGS...: exit 1 at start, with one
# "qcbt-server: " line on stderr containing every NEEDLE ("A|B": either).
expect_refused() {
    local tag=$1 needles=() n st=0 alt found alts
    shift
    while [[ $1 != -- ]]; do needles+=("$1"); shift; done
    shift
    rm -f "$U"
    timeout 300 "$SERVER" -k "$U" "$@" >refused.out 2>refused.err </dev/null || st=$?
    if [[ $st -ne 1 ]]; then
        bad "$tag: exit status $st (expected 1): $(cat refused.err)"
        return
    fi
    [[ -S $U ]] && { bad "$tag: listened before refusing"; return; }
    if [[ $(grep -c '' refused.err) -ne 1 || $(head -c13 refused.err) != "qcbt-server: " ]]; then
        bad "$tag: expected one 'qcbt-server: ' line, got: $(cat refused.err)"
        return
    fi
    for n in "${needles[@]}"; do
        found=
        IFS='|' read -r -a alts <<<"$n"
        for alt in "${alts[@]}"; do grep -qiF -- "$alt" refused.err && found=1; done
        [[ -n $found ]] || { bad "$tag: message lacks '$n': $(cat refused.err)"; return; }
    done
    ok "$tag: exit 1: $(cat refused.err)"
}
expect_refused "strict, overlay without ck" "ck" "ovl.qcow2" "strict" -- --strict -B ck ovl.qcow2
expect_refused "in-use bitmap" "broken" "in use|in-use|inconsistent" -- -B broken inuse.qcow2
expect_refused "unknown bitmap" "nosuch" "not found" -- -B nosuch single.qcow2
expect_refused "in-use bitmap, --export" "broken" -- --export name=x,image=inuse.qcow2,bitmap=broken
expect_refused "missing image" "nosuch.qcow2" -- nosuch.qcow2

# --- 4. --all-bitmaps skips the in-use bitmap with a warning ------------------
SOCKP=$U start_server all.log -k "$U" -t --all-bitmaps inuse.qcow2
got=$(contexts "$(uri)" | sort)
[[ $got == $'base:allocation\nqemu:dirty-bitmap:good' ]] &&
    ok "--all-bitmaps: publishes good only" || bad "--all-bitmaps: contexts $(echo $got)"
grep -i "warning" all.log | grep "broken" >/dev/null &&
    ok "--all-bitmaps: warns: $(grep -i -m1 warning all.log)" ||
    bad "--all-bitmaps: no warning naming the in-use bitmap: $(cat all.log)"
"$PYTHON" maps.py model 65536 $((16 * MiB)) "3145728+65536" >inuse.good.model
check_bitmap "$(uri)" "" qemu:dirty-bitmap:good $((16 * MiB)) inuse.good.model all-good
stop_server

# --- 5. aliases, several exports, -x ----------------------------------------
SOCKP=$U start_server multi.log -k "$U" -t -x single -D "the single image" \
    -B b0 -B b1=backup-vda \
    --export "name=chain,image=top.qcow2,bitmap=ck=backup-vdb,allocation-depth=on,description=three layers" \
    --export "name=ovl,image=ovl.qcow2,format=qcow2,bitmap=ck" \
    single.qcow2
nbdinfo --list --json "$(uri)" >list.json
if "$PYTHON" - list.json <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
ex = {e["export-name"]: e for e in d["exports"]}
want = {
    "single": ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:backup-vda"],
    "chain": ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:backup-vdb"],
    "ovl": ["base:allocation", "qemu:dirty-bitmap:ck"],
}
if sorted(ex) != sorted(want):
    sys.exit(f"exports listed: {sorted(ex)}")
for n, ctx in want.items():
    if sorted(ex[n].get("contexts", [])) != sorted(ctx):
        sys.exit(f"export {n}: contexts {ex[n].get('contexts')}")
if ex["single"].get("description") != "the single image":
    sys.exit(f"single: description {ex['single'].get('description')!r}")
if ex["chain"].get("description") != "three layers":
    sys.exit(f"chain: description {ex['chain'].get('description')!r}")
EOF
then
    ok "nbdinfo --list: three exports, their contexts, aliases and descriptions"
else
    bad "nbdinfo --list --json: $(cat list.json | head -c 400)"
fi
check_bitmap "$(uri single)" single qemu:dirty-bitmap:backup-vda $SINGLE_SIZE single.b1.model alias-vda
check_bitmap "$(uri chain)" chain qemu:dirty-bitmap:backup-vdb $CHAIN_SIZE chain.ck.model alias-vdb
nbdinfo --map=qemu:dirty-bitmap:b1 "$(uri single)" >/dev/null 2>&1 &&
    bad "alias: the source name b1 is published too" ||
    ok "alias: qemu:dirty-bitmap:b1 is not published under its source name"
nbdinfo --size "$(uri)" >/dev/null 2>&1 &&
    bad "-x single: the empty export name is served too" ||
    ok "-x single: the empty export name is refused"
[[ $(nbdinfo --size "$(uri chain)") -eq $CHAIN_SIZE ]] &&
    ok "export chain: size" || bad "export chain: size"
check_data "$(uri ovl)" ovl.raw export-ovl
stop_server

# --- 6. --fork --pid-file; without -t the server exits after its last client ---
rm -f "$U" pidfile
st=0
timeout 300 "$SERVER" --fork --pid-file "$TMPD/pidfile" -k "$U" -B b0 single.qcow2 \
    2>fork.log || st=$?
if [[ $st -ne 0 ]]; then
    bad "--fork: exit status $st: $(cat fork.log)"
else
    FPID=$(cat pidfile 2>/dev/null || true)
    if [[ -S $U && -n $FPID ]] && kill -0 "$FPID" 2>/dev/null; then
        ok "--fork: returned once listening; pid file names a live server ($FPID)"
        cleanup_pid "$FPID"
        # It does not exit before its first client ...
        sleep 1
        kill -0 "$FPID" 2>/dev/null && ok "--fork: waits for a client" ||
            bad "--fork: server gone before any client"
        [[ $(nbdinfo --size "$(uri)") -eq $SINGLE_SIZE ]] || bad "--fork: nbdinfo --size"
        # ... and exits after the last one (no -t).
        if ! wait_gone "$FPID"; then
            bad "--fork without -t: still running after its only client left"
        else
            ok "--fork without -t: exited after the last client"
            [[ -e pidfile ]] && bad "--fork: pid file left behind" ||
                ok "--fork: pid file removed at exit"
        fi
    else
        bad "--fork: socket ${U} or pid file missing, or server not running: $(cat fork.log)"
    fi
fi

# Without -t, clients that never reach transmission (nbdinfo --list ends
# with NBD_OPT_ABORT; a port scan; a bad handshake) do not end the server
# (qemu-nbd neither); two overlapping clients: it stays until both are gone.
SOCKP=$U start_server last.log -k "$U" -B b0 single.qcow2
nbdinfo --list "$(uri)" >/dev/null || bad "no -t: nbdinfo --list failed"
"$PYTHON" -c 'import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(18); s.close()
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(18)
s.send(b"\0\0\0\x08"); s.recv(1); s.close()' "$U" 2>/dev/null ||
    note "(could not connect after nbdinfo --list)"
sleep 0.5
if kill -0 "$SPID" 2>/dev/null; then
    ok "no -t: nbdinfo --list and failed handshakes do not end the server"
else
    bad "no -t: the server exited after nbdinfo --list / a failed handshake"
    wait "$SPID" || true
    SOCKP=$U start_server last.log -k "$U" -B b0 single.qcow2
fi
cat >hold.py <<'EOF'
import sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
open(sys.argv[2], "w").write("connected\n")
# Hold the connection until told to go, then disconnect; or notice the
# server going away.  The bound only catches a test that never says "go".
end = time.monotonic() + 600
while time.monotonic() < end:
    if open(sys.argv[2]).read().strip() == "go":
        h.shutdown()
        sys.exit(0)
    try:
        h.pread(512, 0)
    except nbd.Error as e:
        print(f"server went away: {e}", file=sys.stderr)
        sys.exit(3)
    time.sleep(0.1)
sys.exit(2)
EOF
"$PYTHON" hold.py "$(uri)" hold.state 2>hold.err &
HPID=$!
cleanup_pid "$HPID"
wait_until -p "$HPID" -- test -s hold.state || bad "last client: the first client did not connect: $(cat hold.err)"
nbdinfo --size "$(uri)" >/dev/null || bad "last client: second client failed"
sleep 0.5
kill -0 "$SPID" 2>/dev/null && ok "no -t: still serving while a client remains" ||
    bad "no -t: exited while a client was still connected"
echo go >hold.state
wait "$HPID" || bad "hold.py exit status $? ($(cat hold.err))"
st=0
if ! wait_gone "$SPID"; then
    bad "no -t: still running $QCBT_WAIT s after the last client left"
    stop_server
else
    wait "$SPID" || st=$?
    [[ $st -eq 0 ]] && ok "no -t: exit 0 after the last client" ||
        bad "no -t: exit status $st after the last client"
fi

# --- 7. SIGTERM with a client connected -> exit 0 ----------------------------
SOCKP=$U start_server term.log -k "$U" -t -B b0 single.qcow2
rm -f hold.state
"$PYTHON" hold.py "$(uri)" hold.state 2>hold.err &
HPID=$!
cleanup_pid "$HPID"
wait_until -p "$HPID" -- test -s hold.state || bad "SIGTERM: the client did not connect: $(cat hold.err)"
kill -TERM "$SPID"
st=0
if ! wait_gone "$SPID"; then
    bad "SIGTERM with a client connected: still running after $QCBT_WAIT s"
    kill -KILL "$SPID"
fi
wait "$SPID" || st=$?
[[ $st -eq 0 ]] && ok "SIGTERM with a client connected: exit 0" ||
    bad "SIGTERM with a client connected: exit status $st"
hst=0
wait "$HPID" || hst=$?
[[ $hst -eq 3 ]] && ok "SIGTERM: the client saw the server go ($(tail -n1 hold.err))" ||
    bad "SIGTERM: client exit status $hst ($(cat hold.err))"
[[ -e $U ]] && bad "SIGTERM: socket $U left behind" || ok "SIGTERM: socket removed"

# --- the images were never written -------------------------------------------
for f in "${!SHA[@]}"; do
    [[ $(sha256sum "$f" | cut -d' ' -f1) == "${SHA[$f]}" ]] ||
        bad "$f changed while served read-only"
done

[[ $rc -eq 0 ]] || fail "some checks failed (see above)"
note "PASS"
