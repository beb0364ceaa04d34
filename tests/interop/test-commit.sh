#!/bin/bash
# qcbt commit [-b BASE] IMAGE: upper layers into the base, in place, with
# merged bitmaps.
#
#   - Random chains (commit-random.py, QCBT_COMMIT_SEEDS="FIRST LAST",
#     default "1 16"): 2-4 qcow2 layers of mixed cluster sizes, data, zero
#     and compressed clusters, discards, bitmaps X and Y absent, enabled,
#     disabled, added late or in use per layer.  Committed into the deepest
#     qcow2 layer.  Then: the base reads as the image read before
#     (qemu-img compare with the saved guest data) and as qemu-img commit
#     -d's base; the image still reads the same; qemu-img check finds
#     neither errors nor leaks; each bitmap of the base is the merge
#     engine's answer computed before (qcbt bitmap dump) seen at the
#     base's granularity (qemu-nbd -B), created bitmaps have the top-most
#     usable holder's granularity and recording state; refused merges
#     leave the base's bitmap as it was.
#   - A middle base: l0 into l1 over l2; the expected bitmaps are the dump
#     of l0..l1 alone.
#   - Refusals, one line, nothing written: single layer, base not in the
#     chain, raw base, version 2, internal snapshot, extended L2, sizes
#     differ, corrupt base; a running qemu-io holding the base or the top.
#   - A 512-byte-cluster base whose one-cluster refcount table counts
#     8 MiB of file, under 12 MiB of new data: the commit grows the table
#     (the header points at a larger one) and everything above holds
#     (seeds 1 and 7 of 1..16 need it too; check_commit notes a growth).
#   - Faults: QCBT_TEST_FAIL_AT=write:N and flush:N at every N of a small
#     commit: each base cluster exactly old or new, the image reading the
#     same, qemu-img check clean but for leaks, each base bitmap exactly
#     old or new, the exit status 0 only for a complete commit, one line
#     saying to run it again otherwise; and run again, it completes.

. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo

CHECK=$TESTS_DIR/interop/commit-check.py
cc() { "$PYTHON" "$CHECK" "$@"; }

# qc OUT ARGS...: qcbt ARGS, stdout to OUT, stderr to OUT.err, logged in
# the recipe.
qc() {
    local out=$1
    shift
    { printf '%q ' "$QCBT" "$@"; printf '> %q\n' "$out"; } >>"$CASE_DIR/recipe.txt"
    "$QCBT" "$@" >"$out" 2>"$out.err" </dev/null
}

# digest_files: one digest of every image file here.
digest_files() {
    local f
    for f in ./*.qcow2 ./*.raw; do
        [[ -e $f ]] || continue
        sha256sum "$f"
    done | sha256sum
}

# state IMG: each bitmap's name, granularity, flags and dirty map.
state() {
    qemu-img info -U --output=json "$1" | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)["format-specific"]["data"]
for b in sorted(d.get("bitmaps", []), key=lambda b: b["name"]):
    print(b["name"], b["granularity"], ",".join(sorted(b["flags"])))' |
        while read -r b g f; do
            if [[ $f == *in-use* ]]; then
                printf '%s %s %s\n' "$b" "$g" "$f"
            else
                printf '%s %s %s %s\n' "$b" "$g" "$f" "$(dirty_map "$1" "$b" | tr '\n' ';')"
            fi
        done
}

dirty_map() {
    nbdinfo --map=qemu:dirty-bitmap:"$2" -- [ qemu-nbd -r -f qcow2 -B "$2" "$1" ] |
        awk '$4 == "dirty" { print $1, $2 }'
}

# reftable IMG: the refcount table's offset and clusters, as in the header.
reftable() {
    od -An -tu8 --endian=big -j48 -N8 "$1" | tr -d ' \n'
    printf ' '
    od -An -tu4 --endian=big -j56 -N4 "$1" | tr -d ' \n'
}

# check_commit TOP BASE B [DUMPTOP]: commit TOP's layers above BASE (layer
# B of TOP's chain) and check everything against the oracles.  The
# expected bitmaps are qcbt bitmap dump's of DUMPTOP (default TOP: BASE
# is its deepest layer with bitmaps).  The chain's directory is copied
# first to ../theirs for qemu-img commit -d.  Returns 1 with notes on a
# difference.
check_commit() {
    local top=$1 base=$2 b=$3 dumptop=${4:-$1} rc=0 crc name exp g auto got size
    size=$(virtual_size "$top")
    run cp -a . ../theirs
    qemu-img info -U --backing-chain --output=json "$top" >chain.json
    "$PYTHON" -c 'import json,sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[1], "w"))' chain.json
    run qemu-img convert -O raw "$top" before.raw
    crc=0
    qemu-img check "$base" >check0.out 2>&1 || crc=$?
    [[ $crc -eq 0 || $crc -eq 3 ]] || fail "[$CASE] oracle broke: the base is corrupt before: $(cat check0.out)"
    mapfile -t names < <(cc names chain.json "$b")
    for name in "${names[@]}"; do
        if "$QCBT" bitmap dump "$dumptop" "$name" >"exp-$name" 2>/dev/null; then
            :
        else
            rm -f "exp-$name"
            state "$base" | awk -v n="$name" '$1 == n' >"keep-$name"
        fi
    done
    local rt0
    rt0=$(reftable "$base")
    if ! qc commit.out commit -b "$base" "$top"; then
        note "[$CASE] qcbt commit failed: $(cat commit.out.err)"
        return 1
    fi
    [[ $(reftable "$base") == "$rt0" ]] || note "[$CASE] the base's refcount table grew: $rt0 -> $(reftable "$base")"
    local c2=0
    qemu-img check "$base" >check.out 2>&1 || c2=$?
    if [[ $c2 -ne 0 && ! ($crc -eq 3 && $c2 -eq 3) ]]; then
        note "[$CASE] qemu-img check $base: $(cat check.out)"
        rc=1
    fi
    qemu-img compare -q -f raw before.raw "$base" || { note "[$CASE] the base does not read as the image did"; rc=1; }
    qemu-img compare -q -f raw before.raw "$top" || { note "[$CASE] the image reads differently after the commit"; rc=1; }
    (cd ../theirs && qemu-img commit -q -d -b "$base" "$top") >>run.log 2>&1 ||
        fail "[$CASE] oracle broke: qemu-img commit -d: $(tail -n 3 run.log)"
    qemu-img compare -q "$base" "../theirs/$base" || { note "[$CASE] our base differs from qemu-img commit -d's"; rc=1; }
    for name in "${names[@]}"; do
        if [[ ! -e exp-$name ]]; then
            grep "^bitmap $name: not committed: " commit.out >/dev/null ||
                { note "[$CASE] $name: the output does not say it was not committed: $(cat commit.out)"; rc=1; }
            got=$(state "$base" | awk -v n="$name" '$1 == n')
            [[ $got == "$(cat "keep-$name")" ]] || { note "[$CASE] $name: refused merge, but the base's bitmap changed: '$got'"; rc=1; }
            continue
        fi
        exp=$(cc expect chain.json "$b" "$name")
        read -r g auto < <(qemu-img info -U --output=json "$base" | "$PYTHON" -c '
import json, sys
for bm in json.load(sys.stdin)["format-specific"]["data"].get("bitmaps", []):
    if bm["name"] == sys.argv[1]:
        print(bm["granularity"], "auto" if "auto" in bm["flags"] else "-")' "$name") ||
            { note "[$CASE] $name: not in the base after the commit"; rc=1; continue; }
        grep "^bitmap $name: $([[ $exp == inbase ]] && echo merged || echo created) (granularity $g)\$" commit.out >/dev/null ||
            { note "[$CASE] $name: the output says: $(grep "^bitmap $name:" commit.out)"; rc=1; }
        if [[ $exp != inbase && $exp != "$g $auto" ]]; then
            note "[$CASE] $name: created as '$g $auto', expected '$exp'"
            rc=1
        fi
        dirty_map "$base" "$name" | awk '{ print $1, $2, 1, "dirty" }' >"got-$name"
        if [[ $(cc norm "$g" "$size" "got-$name") != "$(cc norm "$g" "$size" "exp-$name")" ]]; then
            note "[$CASE] $name: the base's bitmap is not the merge of the chain before"
            diff <(cc norm "$g" "$size" "exp-$name") <(cc norm "$g" "$size" "got-$name") | head -n 6 >&2 || true
            rc=1
        fi
    done
    return "$rc"
}

# --- random chains ------------------------------------------------------------

read -r first last <<<"${QCBT_COMMIT_SEEDS:-1 16}"
for ((seed = first; seed <= last; seed++)); do
    begin_case "seed$seed"
    mkdir src
    json=$("$PYTHON" "$TESTS_DIR/interop/commit-random.py" "$seed" "$CASE_DIR/src") ||
        fail "[$CASE] could not build the chain"
    note "[$CASE] $("$PYTHON" -c 'import json,sys; print(json.loads(sys.argv[1])["desc"])' "$json")"
    base=$("$PYTHON" -c 'import json,os,sys; print(os.path.basename(json.loads(sys.argv[1])["base"]))' "$json")
    b=${base#l}
    b=${b%.qcow2}
    cd src
    rc=0
    check_commit l0.qcow2 "$base" "$b" || rc=1
    cd "$CASE_DIR"
    case_result "$rc"
done

# --- a base whose refcount table must grow -------------------------------------

# 512-byte clusters: the one-cluster refcount table counts 8 MiB of file,
# 12 MiB are committed.
begin_case reftable
mkdir src && cd src
run qemu-img create -q -f qcow2 -o cluster_size=512 rt.qcow2 16M
run qemu-img bitmap --add -g 64K rt.qcow2 X
run qemu-io -c 'write -P 8 4M 1M' rt.qcow2
run qemu-img create -q -f qcow2 -b rt.qcow2 -F qcow2 onrt.qcow2 16M
run qemu-img bitmap --add -g 4K onrt.qcow2 X
run qemu-io -c 'write -P 1 0 12M' onrt.qcow2
rt0=$(reftable rt.qcow2)
[[ ${rt0#* } == 1 ]] || fail "[$CASE] oracle broke: qemu-img made a refcount table of $rt0"
rc=0
check_commit onrt.qcow2 rt.qcow2 1 || rc=1
rt1=$(reftable rt.qcow2)
((${rt1#* } >= 2)) || { note "[$CASE] the refcount table did not grow: $rt0 -> $rt1"; rc=1; }
cd "$CASE_DIR"
case_result "$rc"

# --- a middle base ----------------------------------------------------------------

begin_case middle
mkdir src && cd src
run qemu-img create -q -f qcow2 -o cluster_size=4096 l2.qcow2 8M
run qemu-img bitmap --add l2.qcow2 X
run qemu-io -c 'write -P 1 0 8M' l2.qcow2
run qemu-img create -q -f qcow2 -b l2.qcow2 -F qcow2 l1.qcow2 8M
run qemu-img bitmap --add -g 4096 l1.qcow2 X
run qemu-io -c 'write -P 2 1M 100k' -c 'write -c -P 3 4M 64k' l1.qcow2
run qemu-img create -q -f qcow2 -o cluster_size=512 -b l1.qcow2 -F qcow2 l0.qcow2 8M
run qemu-io -c 'write -P 4 1000k 50k' -c 'write -z 4M 4k' -c 'write -P 5 7M 3k' l0.qcow2
run qemu-img bitmap --add l0.qcow2 Y
run qemu-io -c 'write -P 6 6M 1k' l0.qcow2
# X@l2 is all dirty, so the merge over the whole chain is not that over
# l0..l1: the expectations come from a copy of l0..l1 cut below l1.
mkdir ../sub && cp l0.qcow2 l1.qcow2 ../sub/
(cd ../sub && qemu-img rebase -q -u -b '' l1.qcow2) || fail "oracle broke: qemu-img rebase -u"
[[ $("$QCBT" bitmap dump ../sub/l0.qcow2 X) != "$("$QCBT" bitmap dump l0.qcow2 X)" ]] ||
    fail "[$CASE] the whole chain and l0..l1 give the same X: the case proves nothing"
rc=0
check_commit l0.qcow2 l1.qcow2 1 ../sub/l0.qcow2 || rc=1
cd "$CASE_DIR"
case_result "$rc"

# --- refusals ---------------------------------------------------------------------

begin_case refusals
rc=0
refused() {
    local needle=$1 before
    shift
    before=$(digest_files)
    expect_qcbt_error "$needle" -- commit "$@" || { note "[$CASE] $* not refused with '$needle'"; rc=1; }
    [[ $before == "$(digest_files)" ]] ||
        { note "[$CASE] $*: a refused commit changed a file"; rc=1; }
}
run qemu-img create -q -f qcow2 one.qcow2 1M
refused "no backing file" one.qcow2
run qemu-img create -q -f raw r.raw 1M
run qemu-img create -q -f qcow2 -b r.raw -F raw onraw.qcow2 1M
refused "raw base" onraw.qcow2
refused "not in the backing chain" -b one.qcow2 onraw.qcow2
refused "not the image itself" -b onraw.qcow2 onraw.qcow2
run qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M
run qemu-img create -q -f qcow2 -b v2.qcow2 -F qcow2 onv2.qcow2 1M
refused "version 2" onv2.qcow2
run qemu-img create -q -f qcow2 snap.qcow2 1M
run qemu-img snapshot -c s1 snap.qcow2
run qemu-img create -q -f qcow2 -b snap.qcow2 -F qcow2 onsnap.qcow2 1M
refused "internal snapshot" onsnap.qcow2
run qemu-img create -q -f qcow2 -o extended_l2=on xl2.qcow2 1M
run qemu-img create -q -f qcow2 -b xl2.qcow2 -F qcow2 onxl2.qcow2 1M
refused "subclusters" onxl2.qcow2
run qemu-img create -q -f qcow2 small.qcow2 1M
run qemu-img create -q -f qcow2 -b small.qcow2 -F qcow2 big.qcow2 2M
refused "different sizes" big.qcow2
run qemu-img create -q -f qcow2 bad.qcow2 1M
run qemu-img create -q -f qcow2 -b bad.qcow2 -F qcow2 onbad.qcow2 1M
set_header_bit bad.qcow2 72 1
refused "marked corrupt" onbad.qcow2
# A running qemu-io holds the base, then the top.
run qemu-img create -q -f qcow2 lb.qcow2 1M
run qemu-img create -q -f qcow2 -b lb.qcow2 -F qcow2 lt.qcow2 1M
run qemu-io -c 'write -P 1 0 64k' lt.qcow2
for held in lb.qcow2 lt.qcow2; do
    qemu-io -c 'sleep 3600000' "$held" </dev/null >qemu-io.log 2>&1 &
    pid=$!
    cleanup_pid "$pid"
    img=$held
    holds() {
        local id
        id=$(printf '%02x:%02x:%s' "$(stat -c %Hd "$img")" "$(stat -c %Ld "$img")" "$(stat -c %i "$img")")
        awk -v id="$id" '$2 == "OFDLCK" && $6 == id && $7 <= 101 && $8 >= 101 { f = 1 } END { exit !f }' /proc/locks
    }
    wait_until -p "$pid" -- holds || fail "oracle broke: qemu-io never held $held: $(cat qemu-io.log)"
    refused "held by another process" lt.qcow2
    kill -TERM "$pid"
    wait_gone "$pid" || fail "qemu-io does not exit"
    wait "$pid" 2>/dev/null || true
done
case_result "$rc"

# --- faults -----------------------------------------------------------------------

# sweep_faults CS: in src/ (l0.qcow2 over the base l1.qcow2 of CS-byte
# clusters), fail the commit at every write, then every flush (EIO,
# ENOSPC and SIGKILL in turn), and check each run as the top of this
# section says.  Sets rc=1 on a difference.
FAULT_KINDS_COMMIT=(eio enospc kill)
sweep_faults() {
    local cs=$1 old new kind n frc where c2 now line name fk want_err
    cd src
    run qemu-img convert -O raw l0.qcow2 ../image.raw
    run qemu-img convert -O raw l1.qcow2 ../old.raw
    old=$(state l1.qcow2)
    cd "$CASE_DIR"
    cp -a src done
    (cd done && "$QCBT" commit -q l0.qcow2) || fail "[$CASE] the commit without faults failed"
    qemu-img convert -O raw done/l1.qcow2 new.raw
    new=$(state done/l1.qcow2)
    [[ $old != "$new" ]] || fail "[$CASE] the bitmaps do not change: the sweep would prove nothing"
    for kind in write flush; do
        for ((n = 1; ; n++)); do
            rm -rf f && cp -a src f
            frc=0
            # One fault per point, the kinds in turn (scripts/fault-sweep.sh
            # style): an I/O error, a full disk, a crash (SIGKILL).
            fk=${FAULT_KINDS_COMMIT[n % 3]}
            (cd f && QCBT_TEST_FAIL_AT=$fk-$kind:$n "$QCBT" commit -q l0.qcow2) 2>err || frc=$?
            where="$fk-$kind:$n (exit $frc)"
            if [[ $fk == kill ]]; then
                [[ $frc -eq 0 || $frc -eq 137 ]] || { note "[$CASE] $where: exit status, want 137"; rc=1; }
            else
                [[ $frc -eq 0 || $frc -eq 1 ]] || { note "[$CASE] $where: exit status"; rc=1; }
                if [[ $frc -eq 1 && ($(wc -l <err) -ne 1 || $(cat err) != *"stopped (l0.qcow2 still reads as before; run qcbt commit again)"*) ]]; then
                    note "[$CASE] $where: not the one line saying what happened: $(cat err)"
                    rc=1
                fi
                want_err=$([[ $fk == eio ]] && echo "Input/output error" || echo "No space left on device")
                if [[ $frc -eq 1 && $(cat err) != *"$want_err"* ]]; then
                    note "[$CASE] $where: the error does not name $want_err: $(cat err)"
                    rc=1
                fi
            fi
            c2=0
            qemu-img check f/l1.qcow2 >check.out 2>&1 || c2=$?
            [[ $c2 -eq 0 || $c2 -eq 3 ]] || { note "[$CASE] $where: qemu-img check: $(cat check.out)"; rc=1; }
            qemu-img convert -O raw f/l1.qcow2 now.raw
            cc clusters "$cs" old.raw new.raw now.raw >nnew 2>cl.err || { note "[$CASE] $where: $(cat cl.err)"; rc=1; }
            qemu-img compare -q -f raw image.raw f/l0.qcow2 || { note "[$CASE] $where: the image reads differently"; rc=1; }
            now=$(state f/l1.qcow2)
            while read -r line; do
                name=${line%% *}
                if [[ $line != "$(grep "^$name " <<<"$new")" && $line != "$(grep "^$name " <<<"$old" || true)" ]]; then
                    note "[$CASE] $where: bitmap neither old nor new: $line"
                    rc=1
                fi
            done <<<"$now"
            if [[ $frc -eq 0 ]]; then
                [[ $now == "$new" && $(cat nnew) -eq $(($(stat -c %s new.raw) / cs)) ]] ||
                    { note "[$CASE] $where: success but not the whole commit"; rc=1; }
                [[ $c2 -eq 0 ]] || { note "[$CASE] $where: success with leaks"; rc=1; }
                break
            fi
            # As the message says: running it again finishes the commit.
            if ! (cd f && "$QCBT" commit -q l0.qcow2) 2>err2; then
                note "[$CASE] $where: the commit run again fails: $(cat err2)"
                rc=1
            else
                c2=0
                qemu-img check f/l1.qcow2 >check.out 2>&1 || c2=$?
                [[ $c2 -eq 0 || $c2 -eq 3 ]] || { note "[$CASE] $where, run again: qemu-img check: $(cat check.out)"; rc=1; }
                qemu-img compare -q -f raw new.raw f/l1.qcow2 || { note "[$CASE] $where, run again: the base is not the committed one"; rc=1; }
                [[ $(state f/l1.qcow2) == "$new" ]] || { note "[$CASE] $where, run again: bitmaps $(state f/l1.qcow2)"; rc=1; }
            fi
            ((n < 400)) || fail "[$CASE] $kind: never succeeds"
        done
        note "[$CASE] $kind faults swept at $((n - 1)) points"
    done
}

begin_case faults
mkdir src && cd src
# 4 KiB base clusters: an L2 table covers 2 MiB, so 6 MiB has three, the
# last with an empty L1 entry.  In the base: data to overwrite in place, a
# compressed cluster to replace, a bitmap X; above: data, zeros, X and Y.
run qemu-img create -q -f qcow2 -o cluster_size=4096 l1.qcow2 6M
run qemu-img bitmap --add -g 4096 l1.qcow2 X
run qemu-io -c 'write -P 1 0 64k' -c 'write -c -P 2 1M 4k' -c 'write -P 3 2M 8k' l1.qcow2
run qemu-img create -q -f qcow2 -o cluster_size=65536 -b l1.qcow2 -F qcow2 l0.qcow2 6M
run qemu-img bitmap --add l0.qcow2 X
run qemu-img bitmap --add -g 512 l0.qcow2 Y
run qemu-io -c 'write -P 4 0 64k' -c 'write -P 5 1M 64k' -c 'write -z 2M 64k' -c 'write -P 6 5M 128k' l0.qcow2
cd "$CASE_DIR"
rc=0
sweep_faults 4096
case_result "$rc"

# The same where the commit grows the base's refcount table: 512-byte
# clusters, the file 40 clusters short of the 8 MiB its one-cluster
# table counts, 32 KiB of new data and a merged bitmap above.
begin_case faults-reftable
mkdir src && cd src
run qemu-img create -q -f qcow2 -o cluster_size=512 l1.qcow2 16M
run qemu-img bitmap --add -g 64K l1.qcow2 X
off=0
while (($(stat -c %s l1.qcow2) < (16384 - 40) * 512)); do
    gap=$((((16384 - 40) * 512 - $(stat -c %s l1.qcow2)) / 512))
    n=$((gap > 2 ? gap / 2 : 1))
    run qemu-io -c "write -P 1 $((off * 512)) $((n * 512))" l1.qcow2
    off=$((off + n))
done
run qemu-img create -q -f qcow2 -b l1.qcow2 -F qcow2 l0.qcow2 16M
run qemu-img bitmap --add l0.qcow2 X
run qemu-io -c 'write -P 4 10M 32k' -c 'write -P 5 0 4k' l0.qcow2
rt0=$(reftable l1.qcow2)
[[ ${rt0#* } == 1 ]] || fail "[$CASE] oracle broke: the base's refcount table is $rt0"
cd "$CASE_DIR"
rc=0
sweep_faults 512
rt1=$(reftable done/l1.qcow2)
((${rt1#* } >= 2)) || { note "[$CASE] the commit did not grow the refcount table: $rt0 -> $rt1"; rc=1; }
case_result "$rc"

finish_cases
