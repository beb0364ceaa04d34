#!/bin/bash
# qcbt backup / restore / verify against real servers (issue 5, "Proof").
#
# Sources: qemu-nbd -r -f qcow2 -B X (libvirt's offline recipe: bitmap X
# in the image) and qcbt-server -B X, also on a 3-/4-layer chain whose
# checkpoint bitmaps were propagated to every new overlay (libvirt's
# snapshot rule; only qcbt-server merges them, qemu-nbd exports the top
# layer's X alone).  Rounds of qemu-io write / write -z / discard run on
# the image with its server stopped (offline VM); the guest view after each
# round is saved with qemu-img convert -O raw and is the oracle:
#
#   - a full + N incrementals, each 'qcbt restore --at i' == the source at
#     backup i (qemu-img compare), and each backup file read by qemu-img
#     as a qcow2 chain == the same;
#   - 'qemu-img check' clean on every backup file; the newest boots as an
#     image for qemu-img convert and for qemu-nbd -r + nbdcopy;
#   - dirty-but-zero (write -z) and dirty-then-discarded ranges restore as
#     zeros, never as the older data;
#   - qcbt verify DIR and qcbt verify --against URI DIR pass (and
#     --against fails once the source has moved on);
#   - restore to raw, to qcow2 and to NBD (qemu-nbd -f raw over a file
#     full of garbage, nbdkit memory) all equal;
#   - --auto: full the first time, incremental after, full after a resize
#     and when the context is not granted; the --json fields;
#   - kill -9 in the middle of a backup (nbdkit's delay filter in front of
#     qcbt-server) leaves DIR as it was and the next --auto is correct;
#   - a write error (EFBIG) does the same, with the file named;
#   - verify/restore catch a flipped data byte, a changed digest and a
#     digest algorithm they do not know.
#
# Environment: QCBT (client), QCBT_SERVER or QCBT_BUILD_DIR (server),
# CASES=REGEX to run some cases only, QCBT_KEEP_TMP=1 to keep the files.
. "$(dirname "$0")/../functions.sh"

requires qemu-img qemu-io qemu-nbd nbdcopy nbdinfo nbdkit
SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER (set QCBT_SERVER or QCBT_BUILD_DIR)"
SERVER=$(cd "$(dirname "$SERVER")" && pwd)/$(basename "$SERVER")
CHECK="$PYTHON $TESTS_DIR/interop/backup-check.py"
SIZE=$((64 << 20))

want() { [[ -z ${CASES:-} || $1 =~ $CASES ]]; }
uri() { printf 'nbd+unix:///?socket=%s' "$1"; }

# ---- servers (started in the background, stopped by PID) --------------

SRV_PID=
# start_srv LOG SOCK CMD...: start CMD, wait until SOCK accepts
# connections (the socket file alone exists before listen()).
start_srv() {
    local log=$1 sock=$2
    shift 2
    rm -f "$sock"
    { printf '%q ' "$@"; printf '&\n'; } >>"$CASE_DIR/recipe.txt"
    "$@" >"$CASE_DIR/$log.log" 2>&1 &
    SRV_PID=$!
    cleanup_pid "$SRV_PID"
    wait_nbd "$sock" "$SRV_PID" ||
        fail "[$CASE] $1 did not start: $(tail -n 5 "$CASE_DIR/$log.log")"
}

stop_srv() {
    [[ -n $SRV_PID ]] || return 0
    kill -TERM "$SRV_PID" 2>/dev/null || true
    wait_gone "$SRV_PID" || kill -KILL "$SRV_PID" 2>/dev/null || true
    wait "$SRV_PID" 2>/dev/null || true
    SRV_PID=
}

# read_bytes_at_least LOG N: nbdkit's log filter (LOG) shows reads of N
# bytes or more completed.
read_bytes_at_least() {
    "$PYTHON" - "$@" <<'PYEOF'
import re, sys
count, done = {}, 0
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"(connection=\d+) (\.\.\.)?Read id=(\d+)", line)
    if not m:
        continue
    key = (m.group(1), m.group(3))
    if not m.group(2):
        c = re.search(r"count=(0x[0-9a-f]+|\d+)", line)
        count[key] = int(c.group(1), 0) if c else 0
    elif "return=0" in line:
        done += count.pop(key, 0)
sys.exit(0 if done >= int(sys.argv[2]) else 1)
PYEOF
}

# nbdkit_pause SOCK p|r: pause (after the requests in flight) or resume
# nbdkit's pause filter, waiting for its acknowledgement.
nbdkit_pause() {
    "$PYTHON" - "$@" <<'PYEOF'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(300)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode())
sys.exit(0 if s.recv(1) == sys.argv[2].upper().encode() else 1)
PYEOF
}

# ---- checks (record a failure, go on) ---------------------------------

CASE_RC=0
# try WHAT CMD...: run CMD; on failure record it (the case fails) and
# return 1, so dependent steps can be skipped (try A && ck B).
try() {
    local what=$1
    shift
    { printf '%q ' "$@"; printf '\n'; } >>"$CASE_DIR/recipe.txt"
    if ! "$@" >"$CASE_DIR/ck.out" 2>&1; then
        note "[$CASE] FAIL: $what"
        sed 's/^/    /' "$CASE_DIR/ck.out" | tail -n 8 >&2
        CASE_RC=1
        return 1
    fi
    return 0
}

# ck WHAT CMD...: like try, but always returns 0 (set -e).
ck() {
    try "$@" || true
}

# ck_fails WHAT CMD...: CMD must fail.
ck_fails() {
    local what=$1
    shift
    { printf '! %q ' "$@"; printf '\n'; } >>"$CASE_DIR/recipe.txt"
    if "$@" >"$CASE_DIR/ck.out" 2>&1; then
        note "[$CASE] FAIL: $what (it succeeded)"
        CASE_RC=1
    fi
    return 0
}

# ck_fails_with WHAT REGEX CMD...: CMD must fail and say REGEX.
ck_fails_with() {
    local what=$1 re=$2
    shift 2
    { printf '! %q ' "$@"; printf '\n'; } >>"$CASE_DIR/recipe.txt"
    if "$@" >"$CASE_DIR/ck.out" 2>&1; then
        note "[$CASE] FAIL: $what (it succeeded)"
        CASE_RC=1
    elif ! grep -Eq "$re" "$CASE_DIR/ck.out"; then
        note "[$CASE] FAIL: $what (no /$re/ in: $(head -c 300 "$CASE_DIR/ck.out"))"
        CASE_RC=1
    fi
    return 0
}

begin() {
    begin_case "$1"
    CASE_RC=0
    SRV_PID=
}

end() {
    stop_srv
    case_result "$CASE_RC"
}

# backup OUT ARGS...: qcbt backup --json ARGS... > OUT (stderr OUT.err).
backup() {
    local out=$1
    shift
    { printf 'qcbt backup --json '; printf '%q ' "$@"; printf '>%q\n' "$out"; } >>"$CASE_DIR/recipe.txt"
    if ! "$QCBT" backup --json "$@" >"$out" 2>"$out.err"; then
        note "[$CASE] FAIL: qcbt backup $* exited non-zero: $(cat "$out.err")"
        CASE_RC=1
        return 1
    fi
}

# snap IMG N [PREFIX]: the guest view of IMG now is the oracle for backup
# N (PREFIXrefN.raw).
snap() {
    run qemu-img convert -f qcow2 -O raw "$1" "${3:-}ref$2.raw"
}

# qio IMG CMD...: one qemu-io session on IMG (server stopped).
qio() {
    local img=$1 args=() c
    shift
    for c in "$@"; do args+=(-c "$c"); done
    run qemu-io -f qcow2 "${args[@]}" "$img"
}

# round_ops N: deterministic pseudo-random qemu-io commands for round N:
# writes (some unaligned), zero writes (with and without unmap) and
# discards, over SIZE.
round_ops() {
    local n=$1 k op off len
    RANDOM=$((4242 + n))
    OPS=()
    for ((k = 0; k < 14; k++)); do
        op=$((RANDOM % 5))
        off=$(((RANDOM * 32768 + RANDOM) % (SIZE - (4 << 20))))
        len=$((RANDOM % (512 << 10) + 1))
        case $op in
        0 | 1) OPS+=("write -P $((16 + n * 7 + k)) $off $len") ;;
        2) OPS+=("write -z $((off & ~511)) $(((len + 511) & ~511))") ;;
        3) OPS+=("write -z -u $((off & ~65535)) $(((len + 65535) & ~65535))") ;;
        4) OPS+=("discard $((off & ~65535)) $(((len + 65535) & ~65535))") ;;
        esac
    done
    # Always a little of each, at fixed places, so no round is empty.
    OPS+=("write -P $((100 + n)) $((n << 20)) 65536"
        "write -P $((110 + n)) $(((n << 20) + 70000)) 3000"
        "write -z $(((8 + n) << 20)) 131072"
        "discard $(((16 + n) << 20)) 131072")
}

# check_dir DIR N [PREFIX]: backups 0..N-1 of DIR against PREFIXref0.raw
# .. PREFIXref(N-1).raw.
check_dir() {
    local dir=$1 n=$2 p=${3:-} i files f newest
    mapfile -t files < <($CHECK files "$dir")
    if [[ ${#files[@]} -ne $n ]]; then
        note "[$CASE] FAIL: $dir holds ${#files[@]} backups, expected $n"
        CASE_RC=1
        return
    fi
    for ((i = 0; i < n; i++)); do
        f=$dir/${files[i]}
        ck "qemu-img check ${files[i]}" qemu-img check -q -f qcow2 "$f"
        ck "${files[i]}: qemu-img reads the chain as the source at $i" \
            qemu-img compare -q -f qcow2 -F raw "$f" "${p}ref$i.raw"
        rm -f restored.raw
        try "qcbt restore --at $i" "$QCBT" restore --at "$i" "$dir" restored.raw &&
            ck "restore --at $i == source at backup $i" \
                qemu-img compare -q -f raw -F raw restored.raw "${p}ref$i.raw"
    done
    newest=$dir/${files[n - 1]}
    # The newest file is the disk: for qemu-img convert ...
    rm -f conv.raw
    try "qemu-img convert of the newest backup" \
        qemu-img convert -f qcow2 -O raw "$newest" conv.raw &&
        ck "converted newest == source" qemu-img compare -q -f raw -F raw conv.raw "${p}ref$((n - 1)).raw"
    # ... and for qemu-nbd + nbdcopy.
    local sp=$SRV_PID
    start_srv qemu-nbd-newest "$CASE_DIR/newest.sock" \
        qemu-nbd -t -r -f qcow2 -k "$CASE_DIR/newest.sock" "$newest"
    rm -f nbdcopy.raw
    try "nbdcopy from qemu-nbd -r on the newest backup" \
        nbdcopy "$(uri "$CASE_DIR/newest.sock")" nbdcopy.raw &&
        ck "qemu-nbd view of the newest == source" \
            qemu-img compare -q -f raw -F raw nbdcopy.raw "${p}ref$((n - 1)).raw"
    stop_srv
    SRV_PID=$sp
    ck "qcbt verify $dir" "$QCBT" verify "$dir"
}

# ======================================================================
# Rounds: a full, then an incremental after each round of writes.  The
# checkpoints rotate as libvirt's do: c0 is created with the full backup,
# c(i) with backup i, and backup i is "since c(i-1)".
# rounds_case SERVER-KIND GRANULARITY NROUNDS
rounds_case() {
    local kind=$1 gran=$2 n=$3 i img=disk.qcow2 sock conns=(1 4 2 8 3)
    sock=$CASE_DIR/src.sock
    run qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" "$SIZE"
    qio "$img" "write -P 1 0 $((40 << 20))" "write -P 2 $((48 << 20)) 1000000"
    run qemu-img bitmap --add -g "$gran" "$img" c0
    snap "$img" 0
    serve() {   # serve CHECKPOINT...
        local b=() c
        if [[ $kind == qemu-nbd ]]; then
            start_srv qemu-nbd "$sock" qemu-nbd -t -r -f qcow2 -B "$1" -k "$sock" "$img"
        else
            for c in "$@"; do b+=(-B "$c"); done
            start_srv qcbt-server "$sock" "$SERVER" -t -f qcow2 "${b[@]}" -k "$sock" "$img"
        fi
    }
    serve c0
    backup b0.json --since c0 "$(uri "$sock")" D &&
        ck "backup 0 is full (--json)" $CHECK json b0.json D type=full "reason~no previous backup"
    stop_srv
    for ((i = 1; i <= n; i++)); do
        round_ops "$i"
        qio "$img" "${OPS[@]}"
        snap "$img" "$i"
        run qemu-img bitmap --add -g "$gran" "$img" "c$i"
        serve "c$((i - 1))" "c$i"
        backup "b$i.json" --since "c$((i - 1))" --connections "${conns[i % 5]}" "$(uri "$sock")" D &&
            ck "backup $i is incremental (--json)" \
                $CHECK json "b$i.json" D type=incremental reason=null virtual-size=$SIZE \
                zero-bytes\>=131072 data-bytes\>=65536
        ck "verify --against the source after backup $i" \
            "$QCBT" verify --against "$(uri "$sock")" D
        stop_srv
    done
    check_dir D $((n + 1))
    # The oracle has teeth: once the source moves on, --against fails.
    qio "$img" "write -P 99 $((2 << 20)) 512"
    serve "c$n"
    ck_fails "verify --against a source that changed after the backup" \
        "$QCBT" verify --against "$(uri "$sock")" D
    stop_srv
}

if want rounds-qemu-nbd; then
    begin rounds-qemu-nbd
    rounds_case qemu-nbd 64K 4
    end
fi

if want rounds-qcbt-server; then
    # 4 KiB bitmap granularity: dirty runs smaller than the backup's
    # cluster, so incrementals fill partial clusters from the previous one.
    begin rounds-qcbt-server
    rounds_case qcbt-server 4K 4
    end
fi

# ======================================================================
# A chain made by external snapshots, the checkpoint bitmaps propagated to
# every new overlay (same name, libvirt's rule).
if want chain-qcbt-server; then
    begin chain-qcbt-server
    sock=$CASE_DIR/src.sock
    run qemu-img create -q -f qcow2 base.qcow2 "$SIZE"
    qio base.qcow2 "write -P 1 0 $((32 << 20))"
    run qemu-img bitmap --add -g 64K base.qcow2 c0
    snap base.qcow2 0
    start_srv qcbt-server "$sock" "$SERVER" -t -B c0 -k "$sock" base.qcow2
    backup b0.json --since c0 "$(uri "$sock")" D &&
        ck "backup 0 is full" $CHECK json b0.json D type=full
    stop_srv
    # base <- mid <- top, c0 in each, writes in each layer after c0.
    qio base.qcow2 "write -P 3 $((4 << 20)) 1M" "write -z $((6 << 20)) 64K"
    run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
    run qemu-img bitmap --add -g 64K mid.qcow2 c0
    qio mid.qcow2 "write -P 4 $((10 << 20)) 2M" "write -z $((12 << 20)) 1M" \
        "discard $((14 << 20)) 1M" "write -P 5 $((40 << 20)) 100000"
    run qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
    run qemu-img bitmap --add -g 64K top.qcow2 c0
    qio top.qcow2 "write -P 6 $((20 << 20)) 1M" "write -z $((22 << 20)) 1M" \
        "discard $((24 << 20)) 1M" "write -P 7 $((10 << 20)) 4096"
    snap top.qcow2 1
    start_srv qcbt-server "$sock" "$SERVER" -t -B c0 -k "$sock" top.qcow2
    backup b1.json --since c0 "$(uri "$sock")" D &&
        ck "backup 1 (3-layer chain) is incremental" \
            $CHECK json b1.json D type=incremental zero-bytes\>=$((3 << 20))
    ck "verify --against the 3-layer chain" "$QCBT" verify --against "$(uri "$sock")" D
    stop_srv
    # Checkpoint c1 at backup 1, more writes, another snapshot (4 layers).
    run qemu-img bitmap --add -g 64K top.qcow2 c1
    qio top.qcow2 "write -P 8 $((30 << 20)) 1M" "write -z $((0 << 20)) 512K"
    run qemu-img create -q -f qcow2 -b top.qcow2 -F qcow2 top2.qcow2
    run qemu-img bitmap --add -g 64K top2.qcow2 c0
    run qemu-img bitmap --add -g 64K top2.qcow2 c1
    qio top2.qcow2 "write -P 9 $((50 << 20)) 1M" "discard $((4 << 20)) 1M" \
        "write -z $((10 << 20)) 64K"
    snap top2.qcow2 2
    start_srv qcbt-server "$sock" "$SERVER" -t -B c0 -B c1 -k "$sock" top2.qcow2
    backup b2.json --since c1 "$(uri "$sock")" D &&
        ck "backup 2 (4-layer chain, since c1) is incremental" \
            $CHECK json b2.json D type=incremental
    ck "verify --against the 4-layer chain" "$QCBT" verify --against "$(uri "$sock")" D
    stop_srv
    check_dir D 3

    # For contrast (not a check): qemu-nbd -B c0 on top.qcow2 exports only
    # the top layer's c0, so its incremental misses mid's writes.
    start_srv qemu-nbd "$sock" qemu-nbd -t -r -f qcow2 -k "$sock" base.qcow2
    "$QCBT" backup --full "$(uri "$sock")" Q >/dev/null 2>&1 || true
    stop_srv
    start_srv qemu-nbd "$sock" qemu-nbd -t -r -f qcow2 -B c0 -k "$sock" top.qcow2
    "$QCBT" backup --since c0 "$(uri "$sock")" Q >/dev/null 2>&1 || true
    stop_srv
    # (base.qcow2 changed after backup 0 too; compare with ref1 anyway.)
    if "$QCBT" restore Q q.raw >/dev/null 2>&1 &&
        ! qemu-img compare -q -f raw -F raw q.raw ref1.raw 2>/dev/null; then
        note "[$CASE] as expected, qemu-nbd -B c0 on the chain gives a wrong incremental"
    fi
    end
fi

# ======================================================================
# Dirty but zero now, and dirty then discarded: restored as zeros.
if want dirty-zero; then
    begin dirty-zero
    for kind in qcbt-server qemu-nbd; do
        sock=$CASE_DIR/$kind.sock
        img=$kind.qcow2
        run qemu-img create -q -f qcow2 "$img" "$SIZE"
        qio "$img" "write -P 0xaa $((1 << 20)) $((4 << 20))"
        run qemu-img bitmap --add "$img" X
        mkdir -p "$kind"
        snap "$img" 0 "$kind/"
        srv() {
            if [[ $kind == qemu-nbd ]]; then
                start_srv "$kind" "$sock" qemu-nbd -t -r -f qcow2 -B X -k "$sock" "$img"
            else
                start_srv "$kind" "$sock" "$SERVER" -t -B X -k "$sock" "$img"
            fi
        }
        srv
        backup "$kind/b0.json" --since X "$(uri "$sock")" "$kind/D" || true
        stop_srv
        # Zero [1M, 2M) (write -z), discard [2M, 3M), and zero+unmap
        # [3M, 3.5M); the data at [3.5M, 5M) stays.
        qio "$img" "write -z $((1 << 20)) $((1 << 20))" \
            "discard $((2 << 20)) $((1 << 20))" \
            "write -z -u $((3 << 20)) $((512 << 10))"
        snap "$img" 1 "$kind/"
        srv
        backup "$kind/b1.json" --since X "$(uri "$sock")" "$kind/D" &&
            ck "$kind: incremental records the zeros" \
                $CHECK json "$kind/b1.json" "$kind/D" type=incremental \
                zero-bytes\>=$((5 << 19)) data-bytes=0
        stop_srv
        rm -f "$kind/r.raw"
        if ck "$kind: restore" "$QCBT" restore "$kind/D" "$kind/r.raw"; then
            ck "$kind: [1M, 3.5M) restored as zeros" \
                $CHECK zeros "$kind/r.raw" $((1 << 20)) $((5 << 19))
            ck "$kind: restore == source" \
                qemu-img compare -q -f raw -F raw "$kind/r.raw" "$kind/ref1.raw"
        fi
        ck "$kind: qemu-img reads zeros from the incremental" \
            qemu-img compare -q -f qcow2 -F raw "$kind/D/backup-0001.qcow2" "$kind/ref1.raw"
        check_dir "$kind/D" 2 "$kind/"
    done
    end
fi

# ======================================================================
# One backup chain restored to a raw file, a qcow2 file, and two NBD
# targets (one full of garbage: zeros must be written, not skipped).
if want restore-targets; then
    begin restore-targets
    sock=$CASE_DIR/src.sock
    run qemu-img create -q -f qcow2 disk.qcow2 "$SIZE"
    qio disk.qcow2 "write -P 1 0 $((20 << 20))" "write -P 2 $((60 << 20)) 1M"
    run qemu-img bitmap --add disk.qcow2 X
    start_srv qcbt-server "$sock" "$SERVER" -t -B X -k "$sock" disk.qcow2
    backup b0.json --since X "$(uri "$sock")" D || true
    stop_srv
    round_ops 1
    qio disk.qcow2 "${OPS[@]}"
    snap disk.qcow2 1
    start_srv qcbt-server "$sock" "$SERVER" -t -B X -k "$sock" disk.qcow2
    backup b1.json --since X "$(uri "$sock")" D || true
    stop_srv

    rm -f out.raw out.qcow2 out-O.img
    try "restore to raw" "$QCBT" restore D out.raw &&
        ck "raw == source" qemu-img compare -q -f raw -F raw out.raw ref1.raw
    try "restore to x.qcow2" "$QCBT" restore D out.qcow2 &&
        try "qemu-img check of the restored qcow2" qemu-img check -q out.qcow2 &&
        ck "qcow2 == source" qemu-img compare -q -f qcow2 -F raw out.qcow2 ref1.raw
    try "restore -O qcow2" "$QCBT" restore -O qcow2 D out-O.img &&
        ck "-O qcow2 == source" qemu-img compare -q -f qcow2 -F raw out-O.img ref1.raw
    ck "restored raw file is sparse" \
        test "$(du -k out.raw | cut -f1)" -lt $((SIZE / 1024))

    # qemu-nbd over a raw file of garbage.
    run "$PYTHON" -c "import random,sys; random.seed(7); open(sys.argv[1],'wb').write(random.randbytes($SIZE))" target.raw
    start_srv qemu-nbd-target "$CASE_DIR/t.sock" qemu-nbd -t -f raw -k "$CASE_DIR/t.sock" target.raw
    ck "restore to qemu-nbd (writable raw)" "$QCBT" restore D "$(uri "$CASE_DIR/t.sock")"
    stop_srv
    ck "NBD target (qemu-nbd, was garbage) == source" \
        qemu-img compare -q -f raw -F raw target.raw ref1.raw

    # nbdkit memory.
    start_srv nbdkit-memory "$CASE_DIR/m.sock" nbdkit -f -U "$CASE_DIR/m.sock" memory "$SIZE"
    rm -f mem.raw
    try "restore to nbdkit memory" "$QCBT" restore D "$(uri "$CASE_DIR/m.sock")" &&
        try "read the nbdkit target back" nbdcopy "$(uri "$CASE_DIR/m.sock")" mem.raw &&
        ck "NBD target (nbdkit memory) == source" qemu-img compare -q -f raw -F raw mem.raw ref1.raw
    stop_srv
    end
fi

# ======================================================================
# --auto: full, incremental, incremental (context from the manifest),
# full after a resize, incremental, full when the context is not granted,
# incremental again.
if want auto; then
    begin auto
    sock=$CASE_DIR/src.sock
    run qemu-img create -q -f qcow2 disk.qcow2 "$SIZE"
    qio disk.qcow2 "write -P 1 0 $((8 << 20))"
    run qemu-img bitmap --add disk.qcow2 X
    step=0
    # auto_step WHAT EXPECT-TYPE REASON-SUBSTRING SERVER-BITMAP-ARGS -- BACKUP-ARGS
    auto_step() {
        local what=$1 type=$2 reason=$3 sargs=() bargs=() conds
        shift 3
        while [[ $1 != -- ]]; do sargs+=("$1"); shift; done
        shift
        bargs=("$@")
        round_ops $((step + 10))
        ((step == 0)) || qio disk.qcow2 "${OPS[@]}"
        snap disk.qcow2 "$step"
        start_srv qcbt-server "$sock" "$SERVER" -t "${sargs[@]}" -k "$sock" disk.qcow2
        if [[ $type == full ]]; then
            conds=(type=full "reason~$reason")
        else
            conds=(type=incremental reason=null)
        fi
        backup "b$step.json" --auto "${bargs[@]}" "$(uri "$sock")" D &&
            ck "--auto step $step ($what): $type" \
                $CHECK json "b$step.json" D "${conds[@]}" virtual-size="$(virtual_size disk.qcow2)"
        stop_srv
        step=$((step + 1))
    }
    auto_step "first backup" full "no previous backup" -B X -- --bitmap X
    auto_step "second" incremental "" -B X -- --bitmap X
    auto_step "context from the manifest" incremental "" -B X --
    run qemu-img resize -f qcow2 disk.qcow2 $((SIZE + (16 << 20)))
    auto_step "after a resize" full "size changed" -B X --
    auto_step "after the resize" incremental "" -B X -- --bitmap X
    auto_step "context not granted" full "did not grant" -- --bitmap X
    auto_step "context granted again" incremental "" -B X -- --bitmap X
    auto_step "unknown bitmap" full "did not grant" -B X -- --bitmap nosuch
    check_dir D "$step"
    end
fi

# ======================================================================
# kill -9 in the middle of a backup: DIR is left as it was, the next
# --auto run is correct.
if want interrupted; then
    begin interrupted
    sock=$CASE_DIR/src.sock
    slow=$CASE_DIR/slow.sock
    run qemu-img create -q -f qcow2 disk.qcow2 "$SIZE"
    qio disk.qcow2 "write -P 1 0 $((48 << 20))"
    run qemu-img bitmap --add disk.qcow2 X
    snap disk.qcow2 0
    start_srv qcbt-server "$sock" "$SERVER" -t -B X -k "$sock" disk.qcow2
    backup b0.json --since X "$(uri "$sock")" D || true
    stop_srv
    round_ops 1
    qio disk.qcow2 "${OPS[@]}"
    snap disk.qcow2 1
    start_srv qcbt-server "$sock" "$SERVER" -t -B X -k "$sock" disk.qcow2
    backup b1.json --since X "$(uri "$sock")" D || true
    cp D/manifest.json manifest.before
    ls D >ls.before
    # nbdkit in front of qcbt-server (it does not pass qemu:dirty-bitmap
    # contexts on, so --auto falls back to a full backup: 48 MiB): the rate
    # filter lets the data through at 4 MB/s; once its log shows the client
    # has 8 MiB, the pause filter holds every further read, so the backup
    # is stuck mid-way when it is killed, however loaded the machine is.
    sp=$SRV_PID
    start_srv nbdkit-slow "$slow" nbdkit -f -U "$slow" --filter=log --filter=rate --filter=pause \
        nbd socket="$sock" rate=32M logfile="$CASE_DIR/requests.log" pause-control="$CASE_DIR/pause.sock"
    np=$SRV_PID
    recipe_note "qcbt backup --auto $(uri "$slow") D &  # then pause nbdkit after 8 MiB of reads and kill -9"
    "$QCBT" backup --auto --no-progress "$(uri "$slow")" D >killed.out 2>&1 &
    bp=$!
    if wait_until -p "$bp" -- read_bytes_at_least "$CASE_DIR/requests.log" $((8 << 20)) &&
        nbdkit_pause "$CASE_DIR/pause.sock" p && kill -0 "$bp" 2>/dev/null; then
        kill -KILL "$bp"
        wait "$bp" 2>/dev/null || true
        ck "manifest unchanged after kill -9" cmp manifest.before D/manifest.json
        ck "no new backup file after kill -9" \
            test -z "$(ls D | grep -v '^\.' | grep -vxF -f ls.before || true)"
        ck "verify passes after kill -9" "$QCBT" verify D
        rm -f r.raw
        try "restore after kill -9" "$QCBT" restore D r.raw &&
            ck "restore after kill -9 == source at backup 1" \
                qemu-img compare -q -f raw -F raw r.raw ref1.raw
    else
        wait "$bp" || true
        note "[$CASE] FAIL: the backup ended before it was stuck mid-way: $(cat killed.out)"
        CASE_RC=1
    fi
    nbdkit_pause "$CASE_DIR/pause.sock" r || true
    SRV_PID=$np
    stop_srv
    SRV_PID=$sp
    stop_srv
    # The next --auto run (context from the manifest) is incremental and
    # correct, and no temporary file is left behind.
    round_ops 2
    qio disk.qcow2 "${OPS[@]}"
    snap disk.qcow2 2
    start_srv qcbt-server "$sock" "$SERVER" -t -B X -k "$sock" disk.qcow2
    backup b2.json --auto "$(uri "$sock")" D &&
        ck "the run after kill -9 is incremental" $CHECK json b2.json D type=incremental
    ck "verify --against after the next run" "$QCBT" verify --against "$(uri "$sock")" D
    stop_srv
    ck "no temporary file left" test -z "$(ls -A D | grep '\.part$' || true)"
    check_dir D 3
    end
fi

# first_backup SOCK: a new disk.qcow2 with 8 MiB of data and bitmap X
# (the oracle ref0.raw), and its first backup in D through qcbt-server on
# SOCK (stopped again).
first_backup() {
    run qemu-img create -q -f qcow2 disk.qcow2 "$SIZE"
    qio disk.qcow2 "write -P 1 0 $((8 << 20))"
    run qemu-img bitmap --add disk.qcow2 X
    snap disk.qcow2 0
    start_srv qcbt-server "$1" "$SERVER" -t -B X -k "$1" disk.qcow2
    backup b0.json --since X "$(uri "$1")" D || true
    stop_srv
}

# ======================================================================
# The file system refuses a write in the middle of a backup (a file size
# limit: EFBIG, as ENOSPC would be): the writer thread's error stops the
# backup with a message naming the file, DIR is left as it was, and the
# next run is correct.
if want write-error; then
    begin write-error
    sock=$CASE_DIR/src.sock
    first_backup "$sock"
    qio disk.qcow2 "write -P 2 $((16 << 20)) $((40 << 20))"
    snap disk.qcow2 1
    cp D/manifest.json manifest.before
    ls D >ls.before
    start_srv qcbt-server "$sock" "$SERVER" -t -B X -k "$sock" disk.qcow2
    recipe_note "(trap '' XFSZ; ulimit -f 16384; qcbt backup --since X $(uri "$sock") D)"
    rc=0
    (trap '' XFSZ; ulimit -f 16384; exec "$QCBT" backup --no-progress --since X "$(uri "$sock")" D) \
        >efbig.out 2>&1 || rc=$?
    ck "backup over the file size limit exits 1 (got $rc: $(head -c 300 efbig.out))" test "$rc" -eq 1
    ck "the error names the file and the cause" grep -q 'backup-0001.qcow2.part.*File too large' efbig.out
    ck "manifest unchanged after a write error" cmp manifest.before D/manifest.json
    ck "no file left after a write error" test -z "$(ls -A D | grep -vxF -f ls.before | grep -vx '.lock' || true)"
    ck "verify passes after a write error" "$QCBT" verify D
    backup b1.json --auto "$(uri "$sock")" D &&
        ck "the next run is incremental" $CHECK json b1.json D type=incremental
    stop_srv
    check_dir D 2
    end
fi

# ======================================================================
# verify and restore catch what the manifest's digests are for: a flipped
# byte in a backup's data cluster, a changed digest, a digest of an
# algorithm this qcbt does not know; the intact older backup still
# restores.
if want verify-detects; then
    begin verify-detects
    sock=$CASE_DIR/src.sock
    first_backup "$sock"
    qio disk.qcow2 "write -P 2 $((4 << 20)) $((8 << 20))"
    snap disk.qcow2 1
    start_srv qcbt-server "$sock" "$SERVER" -t -B X -k "$sock" disk.qcow2
    backup b1.json --since X "$(uri "$sock")" D || true
    stop_srv
    ck "verify of the intact DIR" "$QCBT" verify D

    # A data cluster of backup-0001.qcow2 (its own layer, depth 0).
    cp -a D flip
    off=$(qemu-img map --output=json -f qcow2 flip/backup-0001.qcow2 |
        "$PYTHON" -c 'import json,sys; print(next(e["offset"] for e in json.load(sys.stdin) if e["data"] and e["depth"] == 0) + 1000)')
    recipe_note "flip the byte at host offset $off of flip/backup-0001.qcow2"
    "$PYTHON" -c 'import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2])); b = f.read(1); f.seek(int(sys.argv[2])); f.write(bytes([b[0] ^ 0x40]))' flip/backup-0001.qcow2 "$off"
    ck "qemu-img check still passes (the metadata is intact)" qemu-img check -q flip/backup-0001.qcow2
    ck_fails_with "verify finds the flipped byte" 'backup-0001.qcow2.*digest' "$QCBT" verify flip
    ck_fails_with "restore refuses the flipped byte" 'does not match' "$QCBT" restore flip r1.raw
    rm -f r0.raw
    try "restore --at 0 of the intact full backup" "$QCBT" restore --at 0 flip r0.raw &&
        ck "restore --at 0 == source at backup 0" qemu-img compare -q -f raw -F raw r0.raw ref0.raw

    cp -a D sum
    "$PYTHON" -c 'import json,sys
p = sys.argv[1]; m = json.load(open(p))
d = m["backups"][1]["guest-digest"]
m["backups"][1]["guest-digest"] = ("1" if d[0] != "1" else "2") + d[1:]
json.dump(m, open(p, "w"), indent=2)' sum/manifest.json
    ck_fails_with "verify finds a changed digest" 'backup-0001.qcow2.*digest' "$QCBT" verify sum

    cp -a D alg
    "$PYTHON" -c 'import json,sys
p = sys.argv[1]; m = json.load(open(p))
m["backups"][1]["digest-algorithm"] = "sha256-sum-4096"
json.dump(m, open(p, "w"), indent=2)' alg/manifest.json
    ck_fails_with "verify names an unknown digest algorithm" 'digest algorithm "sha256-sum-4096" is not supported' \
        "$QCBT" verify alg
    ck_fails_with "backup refuses to continue an unknown digest" 'digest algorithm' \
        "$QCBT" backup --no-progress --since X "$(uri "$sock")" alg
    end
fi

finish_cases
