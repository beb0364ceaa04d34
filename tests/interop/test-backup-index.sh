#!/bin/bash
# The digest index (issue 13): an incremental backup reads nothing of the
# earlier backups but what partial clusters need, and its digest stays
# exact (client/digest-index.h).
#
#   - no-readback (qcbt-server and qemu-nbd -B X, bitmap granularity
#     64 KiB): a full and three incrementals (scattered writes, write -z,
#     discard, a long write); each incremental reads back 0 bytes for the
#     digest (QCBT_DEBUG's count), and strace, the oracle, sees the
#     earlier backup files read only for their metadata, while the same
#     incremental with the indexes removed reads back megabytes of what
#     it replaces (else "oracle broke"); verify passes and each restore equals the source
#     (qemu-img convert) at that point;
#   - partial (bitmap granularity 4 KiB, writes of 4 KiB inside 64 KiB
#     granules): exactly one granule is read back per partial granule;
#     verify and restore exact;
#   - broken-index: an index missing, truncated, with a flipped byte in a
#     block (found in the middle of the run), or another backup's: one
#     notice naming the file and what is wrong, the granules it would
#     have answered for read back, and the same guest digest as the run
#     with intact indexes; verify passes; a manifest naming an index
#     outside DIR is refused in one line;
#   - old-set: a set made before indexes (no index files, no
#     "digest-index" in the manifest) verifies, takes incrementals (one
#     notice, read back, same digests as with indexes) and the new
#     backups get indexes of their own.
#
# Environment: QCBT (client), QCBT_SERVER or QCBT_BUILD_DIR (server),
# CASES=REGEX to run some cases only, QCBT_KEEP_TMP=1 to keep the files.
. "$(dirname "$0")/../functions.sh"

requires qemu-img qemu-io qemu-nbd nbdinfo strace cmp
SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER (set QCBT_SERVER or QCBT_BUILD_DIR)"
SERVER=$(cd "$(dirname "$SERVER")" && pwd)/$(basename "$SERVER")
SIZE=$((64 << 20))
KiB=1024
MiB=$((1 << 20))

want() { [[ -z ${CASES:-} || $1 =~ $CASES ]]; }
uri() { printf 'nbd+unix:///?socket=%s' "$1"; }

SRV_PID=
# start_srv SOCK CMD...: start CMD, wait until SOCK accepts connections.
start_srv() {
    local sock=$1
    shift
    rm -f "$sock"
    { printf '%q ' "$@"; printf '&\n'; } >>"$CASE_DIR/recipe.txt"
    "$@" >>"$CASE_DIR/server.log" 2>&1 &
    SRV_PID=$!
    cleanup_pid "$SRV_PID"
    wait_nbd "$sock" "$SRV_PID" ||
        fail "[$CASE] $1 did not start: $(tail -n 5 "$CASE_DIR/server.log")"
}

stop_srv() {
    [[ -n $SRV_PID ]] || return 0
    kill -TERM "$SRV_PID" 2>/dev/null || true
    wait_gone "$SRV_PID" || kill -KILL "$SRV_PID" 2>/dev/null || true
    wait "$SRV_PID" 2>/dev/null || true
    SRV_PID=
}

CASE_RC=0
bad() {
    note "[$CASE] FAIL: $*"
    CASE_RC=1
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

# serve KIND: the disk, served with bitmap X by qcbt-server or qemu-nbd.
serve() {
    local sock=$CASE_DIR/src.sock
    if [[ $1 == qemu-nbd ]]; then
        start_srv "$sock" qemu-nbd -t -r -f qcow2 -B X -k "$sock" disk.qcow2
    else
        start_srv "$sock" "$SERVER" -t -B X -k "$sock" disk.qcow2
    fi
}

# qio CMD...: one qemu-io session on disk.qcow2 (its server stopped).
qio() {
    local args=() c
    for c in "$@"; do args+=(-c "$c"); done
    run qemu-io -f qcow2 "${args[@]}" disk.qcow2
}

snap() {
    run qemu-img convert -f qcow2 -O raw disk.qcow2 "ref$1.raw"
}

# qb OUT DIR [strace]: qcbt backup --since X with QCBT_DEBUG=1 (stderr
# OUT.err), under strace (OUT.strace) when asked; exit status in RC.
qb() {
    local out=$1 dir=$2 pre=()
    # (LeakSanitizer cannot run under ptrace: the other cases check leaks.)
    [[ ${3:-} == strace ]] &&
        pre=(env "ASAN_OPTIONS=${ASAN_OPTIONS:-}:detect_leaks=0"
            strace -f -qq -s 0 -e trace=openat,pread64,close -o "$out.strace")
    { printf 'QCBT_DEBUG=1 '; printf '%q ' "${pre[@]}" "$QCBT" backup --no-progress --json --since X "$(uri "$CASE_DIR/src.sock")" "$dir"; printf '\n'; } \
        >>"$CASE_DIR/recipe.txt"
    RC=0
    QCBT_DEBUG=1 timeout 300 "${pre[@]}" "$QCBT" backup --no-progress --json --since X \
        "$(uri "$CASE_DIR/src.sock")" "$dir" >"$out" 2>"$out.err" </dev/null || RC=$?
    [[ $RC -eq 0 ]] || bad "backup into $dir exited $RC: $(cat "$out.err")"
    [[ $RC -eq 0 ]]
}

# readback OUT: the bytes the digest read back, from the debug line.
readback() {
    sed -n 's/^qcbt backup: debug: digest read back \([0-9]*\) bytes.*/\1/p' "$1.err"
}

# partial_fill OUT: the bytes the writer read for partial clusters.
partial_fill() {
    sed -n 's/^qcbt backup: debug: .*partial clusters read \([0-9]*\) bytes$/\1/p' "$1.err"
}

# strace_read OUT: bytes pread64 from the earlier backups' qcow2 files,
# and from their digest indexes.
strace_read() {
    "$PYTHON" - "$1.strace" <<'PYEOF'
import re, sys
fds, pending, total, dgi = {}, {}, 0, 0
for line in open(sys.argv[1]):
    m = re.match(r"(\d+)\s+(.*)$", line.rstrip())
    if not m:
        continue
    pid, rest = m.groups()
    o = re.match(r'openat\([^,]*, "([^"]*)", .*\)\s+= (\d+)$', rest)
    if o:
        fds[int(o.group(2))] = o.group(1)
        continue
    c = re.match(r"close\((\d+)\)", rest)
    if c:
        fds.pop(int(c.group(1)), None)
        continue
    p = re.match(r"pread64\((\d+), (.*)", rest)
    r = re.match(r"<\.\.\. pread64 resumed>.* = (\d+)$", rest)
    if p:
        fd = int(p.group(1))
        d = re.search(r"\)\s+= (\d+)$", p.group(2))
        if d:
            n = int(d.group(1))
        else:
            pending[pid] = fd
            continue
    elif r and pid in pending:
        fd, n = pending.pop(pid), int(r.group(1))
    else:
        continue
    if re.search(r"(^|/)backup-\d{4}\.qcow2$", fds.get(fd, "")):
        total += n
    elif re.search(r"(^|/)backup-\d{4}\.dgi$", fds.get(fd, "")):
        dgi += n
print(total, dgi)
PYEOF
}

# restores DIR N: verify passes and restore DIR == refN.raw.
restores() {
    "$QCBT" verify "$1" >"$CASE_DIR/verify.out" 2>&1 || bad "verify $1: $(cat "$CASE_DIR/verify.out")"
    rm -f "$CASE_DIR/r.raw"
    if "$QCBT" restore "$1" "$CASE_DIR/r.raw" >"$CASE_DIR/restore.out" 2>&1; then
        cmp -s "$CASE_DIR/r.raw" "ref$2.raw" || bad "restore of $1 differs from the source at round $2"
    else
        bad "restore $1: $(cat "$CASE_DIR/restore.out")"
    fi
}

# digest_of OUT: the guest digest a --json run reported.
digest_of() {
    "$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["guest-digest"])' "$1"
}

# dirty_of OUT: data and zero bytes a --json run backed up.
dirty_of() {
    "$PYTHON" -c 'import json,sys; j = json.load(open(sys.argv[1])); print(j["data-bytes"] + j["zero-bytes"])' "$1"
}

# round N: writes of round N (64 KiB aligned), with the server stopped.
round() {
    local n=$1 i cmds=()
    for ((i = 0; i < 40; i++)); do
        cmds+=("write -P $((n + 16)) $(((i * 37 + n * 11) % 1000 * 64 * KiB)) 64k")
    done
    case $n in
    1) cmds+=("write -z $((20 * MiB)) 1M" "write -P 9 $((40 * MiB)) $((6 * MiB))") ;;
    2) cmds+=("discard $((2 * MiB)) 2M" "write -P 7 $((10 * MiB)) 128k") ;;
    3) cmds+=("write -P 5 $((60 * MiB)) $((4 * MiB))" "write -z 0 64k") ;;
    esac
    qio "${cmds[@]}"
    snap "$n"
}

# setup_full KIND GRANULARITY: disk.qcow2 with 24 MiB of data and bitmap
# X, served by KIND; its full backup in D (ref0.raw).
setup_full() {
    run qemu-img create -q -f qcow2 disk.qcow2 "$SIZE"
    qio "write -P 1 0 $((24 * MiB))" "write -P 3 $((32 * MiB)) $((8 * MiB))"
    run qemu-img bitmap --add -g "$2" disk.qcow2 X
    snap 0
    serve "$1"
    qb b0.json D || return 1
    restores D 0
    stop_srv
}

# strip_indexes DIR: DIR as a qcbt without digest indexes made it.
strip_indexes() {
    rm -f "$1"/*.dgi
    "$PYTHON" -c 'import json,sys
p = sys.argv[1]; m = json.load(open(p))
for b in m["backups"]:
    b.pop("digest-index", None)
json.dump(m, open(p, "w"), indent=2)' "$1/manifest.json"
}

# ======================================================================
for kind in qcbt-server qemu-nbd; do
    want "no-readback-$kind" || continue
    begin "no-readback-$kind"
    setup_full "$kind" 65536
    for n in 1 2 3; do
        round "$n"
        rm -rf F
        cp -a D F # the same set, its indexes removed: the fallback
        strip_indexes F
        serve "$kind"
        qb "b$n.json" D strace || break
        qb "f$n.json" F strace || break
        stop_srv
        rb=$(readback "b$n.json")
        [[ $rb == 0 ]] || bad "round $n: the digest read back '$rb' bytes of earlier backups"
        pf=$(partial_fill "b$n.json")
        [[ $pf == 0 ]] || bad "round $n: '$pf' bytes read for partial clusters, with none"
        data=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["data-bytes"])' "b$n.json")
        read -r got dgi < <(strace_read "b$n.json")
        read -r fb fdgi < <(strace_read "f$n.json")
        # The oracle: without indexes strace sees megabytes read back
        # (what held data before), and no index; with them the indexes
        # and, of each earlier backup, its metadata (64 KiB of L2 table
        # and headers, at most 128 KiB).
        frb=$(readback "f$n.json")
        if ((fb < MiB || fdgi != 0)); then
            bad "oracle broke: without indexes strace saw $fb bytes read from earlier backups ($fdgi of index), the digest counted '$frb'"
        elif ((dgi == 0)); then
            bad "round $n: strace saw no digest index read"
        elif ((got > 128 * KiB * n)); then
            bad "round $n: $got bytes read from earlier backups (metadata only expected; $fb without indexes, $data dirty)"
        else
            note "[$CASE] round $n: $data bytes dirty, earlier backups read: $got bytes with indexes (and $dgi of index), $fb without"
        fi
        [[ $(digest_of "b$n.json") == $(digest_of "f$n.json") ]] ||
            bad "round $n: the digest with indexes differs from the one read back"
        [[ -s D/backup-000$n.dgi ]] || bad "no backup-000$n.dgi"
        restores D "$n"
        restores F "$n"
    done
    end
done

# ======================================================================
if want partial; then
    begin partial
    setup_full qcbt-server 4096
    # 4 KiB writes in 6 granules (two in one), and a whole granule.
    qio "write -P 2 $((4 * KiB)) 4k" "write -P 2 $((64 * KiB + 8 * KiB)) 4k" \
        "write -P 2 $((64 * KiB + 40 * KiB)) 4k" "write -P 2 $((5 * MiB + 60 * KiB)) 8k" \
        "write -P 2 $((33 * MiB)) 4k" "write -P 2 $((36 * MiB + 12 * KiB)) 4k" \
        "write -P 2 $((8 * MiB)) 64k"
    snap 1
    serve qcbt-server
    if qb b1.json D; then
        # 5 MiB + 60 KiB .. +68 KiB spans two granules: 6 partial ones.
        rb=$(readback b1.json)
        [[ $rb == $((6 * 64 * KiB)) ]] ||
            bad "the digest read back '$rb' bytes, $((6 * 64 * KiB)) expected (6 partial granules)"
        grep -q "(6 granules)" b1.json.err || bad "not 6 granules read back: $(cat b1.json.err)"
    fi
    stop_srv
    restores D 1
    end
fi

# ======================================================================
# Each kind of damage, on a copy of a set of a full and an incremental;
# the next incremental is made into the intact set too, from the same
# source, as the reference.
if want broken-index; then
    begin broken-index
    setup_full qcbt-server 65536
    round 1
    serve qcbt-server
    qb b1.json D
    stop_srv
    round 2
    for k in missing truncated flipped swapped; do
        cp -a D "$k"
    done
    rm "missing/backup-0001.dgi"
    truncate -s -1 truncated/backup-0000.dgi
    # A byte in the second block of the full backup's index (384 granules
    # written: three blocks): found when the lookups get there.
    printf '\xa5' | dd of=flipped/backup-0000.dgi bs=1 seek=$((64 + 4096 + 50)) conv=notrunc status=none
    cp swapped/backup-0000.dgi swapped/backup-0001.dgi
    serve qcbt-server
    qb ref.json D
    for k in missing truncated flipped swapped; do
        qb "$k.json" "$k" || continue
        case $k in
        missing) re='the digest index of backup-0001\.qcow2 is not used \(backup-0001\.dgi: No such file or directory\)' ;;
        truncated) re='the digest index of backup-0000\.qcow2 is not used \(backup-0000\.dgi: [0-9]+ bytes, [0-9]+ expected \(truncated\?\)\)' ;;
        flipped) re='a digest index is not used from here on \(backup-0000\.dgi: block 1: checksum mismatch\)' ;;
        swapped) re='the digest index of backup-0001\.qcow2 is not used \(backup-0001\.dgi: (for a disk of|does not match the manifest)' ;;
        esac
        grep -v '^qcbt backup: debug: ' "$k.json.err" | grep -v '^qcbt backup: full backup' >"$k.notices" || true
        [[ $(wc -l <"$k.notices") -eq 1 ]] && grep -qE "^qcbt backup: $re" "$k.notices" ||
            bad "$k: expected one notice /$re/, got: $(cat "$k.json.err")"
        rb=$(readback "$k.json")
        [[ -n $rb && $rb -gt 0 ]] || bad "$k: nothing read back ('$rb') though an index is not used"
        [[ $(digest_of "$k.json") == $(digest_of ref.json) ]] ||
            bad "$k: digest $(digest_of "$k.json"), with intact indexes $(digest_of ref.json)"
        restores "$k" 2
    done
    [[ $(readback ref.json) == 0 ]] || bad "the intact set read back $(readback ref.json) bytes"
    restores D 2
    # An index named outside DIR is not a file of the set.
    cp -a D esc
    "$PYTHON" -c 'import json,sys
p = sys.argv[1]; m = json.load(open(p))
m["backups"][0]["digest-index"] = "../x.dgi"
json.dump(m, open(p, "w"), indent=2)' esc/manifest.json
    if QCBT_DEBUG= "$QCBT" backup --no-progress --since X "$(uri "$CASE_DIR/src.sock")" esc >esc.out 2>esc.err; then
        bad "a manifest naming ../x.dgi was accepted"
    elif [[ $(wc -l <esc.err) -ne 1 ]] || ! grep -q "^qcbt: .*manifest.json: backup 0: bad file, type, backing file or digest index$" esc.err; then
        bad "a manifest naming ../x.dgi: $(cat esc.err)"
    fi
    end
fi

# ======================================================================
if want old-set; then
    begin old-set
    setup_full qcbt-server 65536
    round 1
    serve qcbt-server
    qb b1.json D
    stop_srv
    cp -a D O
    strip_indexes O
    restores O 1
    for n in 2 3; do
        round "$n"
        serve qcbt-server
        qb "b$n.json" D
        qb "o$n.json" O || break
        stop_srv
        grep -qE '^qcbt backup: the digest index of backup-000[0-9]\.qcow2 is not used \(none recorded\)' "o$n.json.err" ||
            bad "round $n: no notice for the old set: $(cat "o$n.json.err")"
        rb=$(readback "o$n.json")
        [[ -n $rb && $rb -gt 0 ]] || bad "round $n: the old set read nothing back ('$rb')"
        [[ $(digest_of "o$n.json") == $(digest_of "b$n.json") ]] ||
            bad "round $n: the old set's digest differs from the indexed set's"
        [[ -s O/backup-000$n.dgi ]] || bad "round $n: the new backup of the old set has no index"
        restores O "$n"
    done
    # Bitmap X grows: round 3 writes again all that round 2 did, which
    # backup-0002's index lists; only the rest is read back.
    d2=$(dirty_of o2.json)
    d3=$(dirty_of o3.json)
    if (($(readback o3.json) > d3 - d2)); then
        bad "round 3 read back $(readback o3.json) bytes of $d3 dirty, $d2 of them listed in backup-0002.dgi"
    fi
    end
fi

finish_cases
