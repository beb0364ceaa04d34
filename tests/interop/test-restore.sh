#!/bin/bash
# qcbt restore (issue 11): what a restore leaves behind, and how sparse
# and exact its output is.
#
# The backups: a 64 MiB qcow2 disk with a 20 MiB run of data, 64 KiB
# pieces every 4 MiB, 2 MiB of zeros written as data and a 4 KiB write;
# a full backup, then writes, zero writes and discards and an
# incremental, both with 'qcbt backup' from qcbt-server -B X on a unix
# socket.  The oracles are the source's guest view at each backup
# (qemu-img convert of the source) and qemu-img convert of the backup.
#
#   raw, qcow2   the restore equals qemu-img convert -O raw of the backup
#                (cmp) and the source (qemu-img compare); the qcow2 is
#                qemu-img check clean; both allocate no more than the
#                data (qemu-img map) plus slack, and no more than
#                qemu-img convert's output plus slack (du -B1)
#   exists       an existing OUT is refused without --force and left as
#                it was; --force replaces it (its mode kept)
#   digest       a backup with a flipped data byte: the restore fails,
#                leaves no OUT and no temporary file, and a pre-existing
#                OUT (--force) is untouched; an NBD target says it has
#                been written to
#   efbig        a write past the file size limit (ulimit -f: EFBIG) in
#                the middle of the restore: exit 1, one line naming OUT
#                and the cause, nothing left, a pre-existing OUT untouched
#   small        too small an NBD target (nbdkit memory) or block device:
#                the message gives both sizes
#   blockdev     (root with loop devices only) a block device needs
#                --force, is written in place, zeros included
#
# Environment: QCBT, QCBT_SERVER or QCBT_BUILD_DIR, CASES=REGEX,
# QCBT_KEEP_TMP=1.
. "$(dirname "$0")/../functions.sh"

requires qemu-img qemu-io nbdinfo nbdkit
SERVER=${QCBT_SERVER:-${QCBT_BUILD_DIR:-$TESTS_DIR/../build}/server/qcbt-server}
[[ -x $SERVER ]] || fail "qcbt-server not found: $SERVER (set QCBT_SERVER or QCBT_BUILD_DIR)"
SERVER=$(cd "$(dirname "$SERVER")" && pwd)/$(basename "$SERVER")
SIZE=$((64 << 20))
M=$((1 << 20))

want() { [[ -z ${CASES:-} || $1 =~ $CASES ]]; }
uri() { printf 'nbd+unix:///?socket=%s' "$1"; }

# start_srv LOG SOCK CMD...: start CMD in the background and wait until a
# client can connect to SOCK (nbdinfo --size), at most 120 s; fail at
# once if the server exits.
SRV_PID=
start_srv() {
    local log=$1 sock=$2 i
    shift 2
    rm -f "$sock"
    { printf '%q ' "$@"; printf '&\n'; } >>"$CASE_DIR/recipe.txt"
    "$@" >"$CASE_DIR/$log.log" 2>&1 &
    SRV_PID=$!
    cleanup_pid "$SRV_PID"
    for ((i = 0; i < 1200; i++)); do
        nbdinfo --size "$(uri "$sock")" >/dev/null 2>&1 && return 0
        kill -0 "$SRV_PID" 2>/dev/null ||
            fail "[$CASE] $log exited at start: $(tail -n 5 "$CASE_DIR/$log.log")"
        sleep 0.1
    done
    fail "[$CASE] $log did not accept a connection on $sock in 120 s"
}

stop_srv() {
    [[ -n $SRV_PID ]] || return 0
    kill -TERM "$SRV_PID" 2>/dev/null || true
    wait "$SRV_PID" 2>/dev/null || true
    SRV_PID=
}

# ---- checks: record a failure and go on --------------------------------
CASE_RC=0
bad() {
    note "[$CASE] FAIL: $*"
    CASE_RC=1
}
# ck WHAT CMD...: CMD must succeed.
ck() {
    local what=$1
    shift
    { printf '%q ' "$@"; printf '\n'; } >>"$CASE_DIR/recipe.txt"
    if ! "$@" >"$CASE_DIR/ck.out" 2>&1; then
        bad "$what"
        sed 's/^/    /' "$CASE_DIR/ck.out" | tail -n 8 >&2
        return 1
    fi
}
# ck_err WHAT NEEDLE... -- ARGS...: qcbt ARGS must fail with one line
# holding every NEEDLE (expect_qcbt_error).
ck_err() {
    local what=$1 a args=()
    shift
    for a in "$@"; do
        [[ $a == -- ]] && args=() || args+=("$a")
    done
    { printf '! qcbt '; printf '%q ' "${args[@]}"; printf ' # must fail\n'; } >>"$CASE_DIR/recipe.txt"
    expect_qcbt_error "$@" || bad "$what"
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

# no_leftovers DIR WHAT: no temporary file of a restore in DIR.
no_leftovers() {
    local left
    left=$(ls -A "$1" | grep -E '\.qcbt-' || true)
    [[ -z $left ]] || bad "$2: temporary files left in $1: $left"
}
# untouched FILE SUM INODE WHAT: FILE still has checksum SUM and inode INODE.
untouched() {
    [[ -f $1 ]] || { bad "$4: $1 is gone"; return; }
    [[ $(sha256sum <"$1") == "$2" ]] || bad "$4: the content of $1 changed"
    [[ $(stat -c %i "$1") == "$3" ]] || bad "$4: $1 was replaced (new inode)"
}
# garbage FILE BYTES: a file of pseudo-random bytes.
garbage() {
    "$PYTHON" -c 'import random, sys
random.seed(11)
open(sys.argv[1], "wb").write(random.randbytes(int(sys.argv[2])))' "$1" "$2"
}
# alloc FILE: bytes allocated (du -B1).
alloc() { du -B1 "$1" | cut -f1; }
# data_bytes IMG: bytes qemu-img map says hold data in IMG's chain.
data_bytes() {
    qemu-img map --output=json -f qcow2 "$1" |
        "$PYTHON" -c 'import json, sys
print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))'
}

# ======================================================================
# The backups, shared by every case.
begin setup
run qemu-img create -q -f qcow2 disk.qcow2 "$SIZE"
ops=(-c "write -P 1 0 $((20 * M))" -c "write -P 0 $((40 * M)) $((2 * M))"
    -c "write -P 3 $((50 * M + 4096)) 4096")
for ((k = 6; k < 16; k++)); do ops+=(-c "write -P $k $((k * 4 * M)) 65536"); done
run qemu-io -f qcow2 "${ops[@]}" disk.qcow2
run qemu-img bitmap --add disk.qcow2 X
run qemu-img convert -f qcow2 -O raw disk.qcow2 ref0.raw
sock=$CASE_DIR/src.sock
start_srv qcbt-server "$sock" "$SERVER" -t -f qcow2 -B X -k "$sock" disk.qcow2
run "$QCBT" backup --no-progress --since X "$(uri "$sock")" D
stop_srv
run qemu-io -f qcow2 -c "write -P 5 $M $M" -c "write -z $((4 * M)) $M" \
    -c "discard $((8 * M)) $M" -c "write -P 6 $((60 * M)) 131072" disk.qcow2
run qemu-img convert -f qcow2 -O raw disk.qcow2 ref1.raw
start_srv qcbt-server "$sock" "$SERVER" -t -f qcow2 -B X -k "$sock" disk.qcow2
run "$QCBT" backup --no-progress --since X "$(uri "$sock")" D
stop_srv
NEWEST=$CASE_DIR/D/backup-0001.qcow2
[[ -f $NEWEST ]] || fail "[$CASE] no second backup: $(ls D)"
run qemu-img convert -f qcow2 -O raw "$NEWEST" conv.raw
run qemu-img convert -f qcow2 -O qcow2 "$NEWEST" conv.qcow2
SETUP=$CASE_DIR
DATA=$(data_bytes "$NEWEST")
note "[$CASE] the backup chain holds $DATA bytes of data; qemu-img convert allocates $(alloc conv.raw) (raw), $(alloc conv.qcow2) (qcow2)"
# A copy of D whose newest backup has a flipped byte in a data cluster.
cp -a D "$SETUP/flip"
off=$(qemu-img map --output=json -f qcow2 "$SETUP/flip/backup-0001.qcow2" |
    "$PYTHON" -c 'import json, sys
print(next(e["offset"] for e in json.load(sys.stdin) if e["data"] and e["depth"] == 0) + 100)')
recipe_note "flip the byte at host offset $off of flip/backup-0001.qcow2"
"$PYTHON" -c 'import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2])); b = f.read(1); f.seek(int(sys.argv[2])); f.write(bytes([b[0] ^ 0x40]))' \
    "$SETUP/flip/backup-0001.qcow2" "$off"
end

SLACK=$M
# ======================================================================
if want raw; then
    begin raw
    if ck "restore to a raw file" "$QCBT" restore "$SETUP/D" out.raw; then
        ck "raw == qemu-img convert -O raw of the backup" cmp out.raw "$SETUP/conv.raw"
        ck "raw == the source at backup 1" qemu-img compare -q -f raw -F raw out.raw "$SETUP/ref1.raw"
        a=$(alloc out.raw)
        note "[$CASE] restore allocates $a bytes; data $DATA; qemu-img convert $(alloc "$SETUP/conv.raw")"
        ((a <= DATA + SLACK)) || bad "restore allocates $a bytes, more than the $DATA bytes of data + $SLACK"
        ((a <= $(alloc "$SETUP/conv.raw") + SLACK)) ||
            bad "restore allocates $a bytes, more than qemu-img convert's $(alloc "$SETUP/conv.raw") + $SLACK"
        [[ $(stat -c %s out.raw) -eq $SIZE ]] || bad "size $(stat -c %s out.raw), expected $SIZE"
        [[ $(stat -c %a out.raw) == "$(printf '%o' $((0666 & ~$(umask))))" ]] ||
            bad "mode $(stat -c %a out.raw), expected 0666 & ~umask"
    fi
    ck "restore --at 0" "$QCBT" restore --at 0 "$SETUP/D" out0.raw &&
        ck "restore --at 0 == the source at backup 0" qemu-img compare -q -f raw -F raw out0.raw "$SETUP/ref0.raw"
    no_leftovers . "raw"
    end
fi

if want qcow2; then
    begin qcow2
    for out in out.qcow2 out-O.img; do
        fopt=()
        [[ $out == *.img ]] && fopt=(-O qcow2)
        if ck "restore ${fopt[*]} to $out" "$QCBT" restore "${fopt[@]}" "$SETUP/D" "$out"; then
            ck "qemu-img check $out" qemu-img check -q -f qcow2 "$out"
            ck "$out == qemu-img convert -O raw of the backup" \
                qemu-img compare -q -f qcow2 -F raw "$out" "$SETUP/conv.raw"
            ck "$out == the source at backup 1" qemu-img compare -q -f qcow2 -F raw "$out" "$SETUP/ref1.raw"
            a=$(alloc "$out")
            note "[$CASE] $out allocates $a bytes; qemu-img convert -O qcow2 $(alloc "$SETUP/conv.qcow2")"
            ((a <= $(alloc "$SETUP/conv.qcow2") + SLACK)) ||
                bad "$out allocates $a bytes, more than qemu-img convert's $(alloc "$SETUP/conv.qcow2") + $SLACK"
        fi
    done
    no_leftovers . "qcow2"
    end
fi

# ======================================================================
if want exists; then
    begin exists
    garbage old.raw $((3 * M))
    chmod 0640 old.raw
    sum=$(sha256sum <old.raw)
    ino=$(stat -c %i old.raw)
    ck_err "an existing OUT is refused" "old.raw: exists" "--force" -- restore "$SETUP/D" old.raw
    untouched old.raw "$sum" "$ino" "refused restore"
    ck_err "an existing qcow2 OUT is refused" "exists" -- restore -O qcow2 "$SETUP/D" old.raw
    untouched old.raw "$sum" "$ino" "refused restore"
    mkdir sub
    ck_err "a directory is not a target" "not a regular file or a block device" -- restore "$SETUP/D" sub
    if ck "--force replaces an existing file" "$QCBT" restore --force "$SETUP/D" old.raw; then
        ck "the replaced file == the source" cmp old.raw "$SETUP/conv.raw"
        [[ $(stat -c %a old.raw) == 640 ]] || bad "--force did not keep the mode: $(stat -c %a old.raw)"
    fi
    # Through a symlink: the file it points to is replaced, the link stays.
    garbage target.raw $M
    ln -s target.raw link.raw
    if ck "--force through a symlink" "$QCBT" restore --force "$SETUP/D" link.raw; then
        [[ -L link.raw ]] || bad "the symlink was replaced by a file"
        ck "the symlink's target == the source" cmp target.raw "$SETUP/conv.raw"
    fi
    no_leftovers . "exists"
    end
fi

# ======================================================================
if want digest; then
    begin digest
    ck_err "a flipped byte fails the raw restore" "does not match" -- restore "$SETUP/flip" out.raw
    [[ ! -e out.raw ]] || bad "a restore that failed its digest left out.raw ($(stat -c %s out.raw) bytes)"
    ck_err "a flipped byte fails the qcow2 restore" "does not match" -- restore "$SETUP/flip" out.qcow2
    [[ ! -e out.qcow2 ]] || bad "a restore that failed its digest left out.qcow2"
    garbage old.raw $((2 * M))
    sum=$(sha256sum <old.raw)
    ino=$(stat -c %i old.raw)
    ck_err "a flipped byte fails --force over an existing file" "does not match" -- \
        restore --force "$SETUP/flip" old.raw
    untouched old.raw "$sum" "$ino" "failed digest"
    no_leftovers . "digest"
    # An NBD target is written in place: the message says so.
    start_srv nbdkit-memory "$CASE_DIR/m.sock" nbdkit -f -U "$CASE_DIR/m.sock" memory "$SIZE"
    ck_err "a flipped byte fails the restore to NBD, saying the export was written" \
        "does not match" "has been written to" -- restore "$SETUP/flip" "$(uri "$CASE_DIR/m.sock")"
    stop_srv
    # The intact older backup still restores.
    ck "restore --at 0 of the intact backup" "$QCBT" restore --at 0 "$SETUP/flip" r0.raw &&
        ck "restore --at 0 == the source at backup 0" cmp r0.raw "$SETUP/ref0.raw"
    end
fi

# ======================================================================
# A file size limit of 16 MiB: the raw restore fails writing at 16 MiB,
# the qcow2 one once its file reaches 16 MiB.  qcbt must not die of
# SIGXFSZ (it is not ignored here) and must clean up.
if want efbig; then
    begin efbig
    for out in out.raw out.qcow2; do
        (
            ulimit -f 16384
            ck_err "$out over the file size limit" "$out" "File too large" -- restore "$SETUP/D" "$out"
            exit "$CASE_RC"
        ) || CASE_RC=1
        [[ ! -e $out ]] || bad "a restore that hit EFBIG left $out ($(stat -c %s "$out") bytes)"
    done
    garbage old.raw $M
    sum=$(sha256sum <old.raw)
    ino=$(stat -c %i old.raw)
    (
        ulimit -f 16384
        ck_err "--force over an existing file, over the file size limit" "old.raw" "File too large" -- \
            restore --force "$SETUP/D" old.raw
        exit "$CASE_RC"
    ) || CASE_RC=1
    untouched old.raw "$sum" "$ino" "EFBIG"
    no_leftovers . "efbig"
    end
fi

# ======================================================================
if want small; then
    begin small
    start_srv nbdkit-memory "$CASE_DIR/m.sock" nbdkit -f -U "$CASE_DIR/m.sock" memory "$M"
    ck_err "too small an NBD target gives both sizes" "smaller than the disk" "$M bytes" "$SIZE bytes" -- \
        restore "$SETUP/D" "$(uri "$CASE_DIR/m.sock")"
    stop_srv
    end
fi

# ======================================================================
if want blockdev; then
    begin blockdev
    if [[ $(id -u) -eq 0 ]] && command -v losetup >/dev/null &&
        garbage dev.img "$SIZE" && LOOP=$(losetup -f --show dev.img 2>/dev/null); then
        recipe_note "losetup -f --show dev.img -> $LOOP"
        ck_err "a block device needs --force" "block device" "--force" -- restore "$SETUP/D" "$LOOP"
        if ck "restore --force to $LOOP" "$QCBT" restore --force "$SETUP/D" "$LOOP"; then
            ck "$LOOP (was garbage) == the source" cmp "$LOOP" "$SETUP/conv.raw"
        fi
        ck_err "a block device takes raw only" "written raw" -- restore --force -O qcow2 "$SETUP/D" "$LOOP"
        losetup -d "$LOOP" || bad "losetup -d $LOOP"
        truncate -s $((SIZE / 2)) half.img
        if LOOP=$(losetup -f --show half.img 2>/dev/null); then
            ck_err "too small a block device gives both sizes" "smaller than the disk" \
                "$((SIZE / 2)) bytes" "$SIZE bytes" -- restore --force "$SETUP/D" "$LOOP"
            losetup -d "$LOOP" || bad "losetup -d $LOOP"
        fi
    else
        note "[$CASE] not run: needs root and a free loop device"
    fi
    end
fi

finish_cases
