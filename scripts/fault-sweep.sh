#!/bin/bash
# The exhaustive fault sweep, by hand: every operation of the table in
# tests/interop/fault-lib.sh, killed (SIGKILL) and failed with EIO and
# ENOSPC at every write and every flush it does, each run checked as
# fault-lib.sh says (bitmaps old/new/in use, guest data unchanged,
# qemu-img check clean but for leaks, the exit status).  CI runs a fixed
# subset (tests/interop/test-fault-sweep.sh).
#
#   scripts/fault-sweep.sh [-k KIND,...] [-p POINT,...] [OP-REGEX]
#
# KIND: kill, eio, enospc, real-enospc (a tmpfs with 0, 4 KiB, 8 KiB ...
# free, in a private mount namespace; left out where unshare -rm is not
# allowed) (default all); POINT: write, flush (default
# both); OP-REGEX selects table lines by name.  The qcbt binary is
# $QCBT, or $QCBT_BUILD_DIR/client/qcbt (default build/client/qcbt).
# Prints one line per operation, fault and point, then a summary; exit 1
# on any failure.  QCBT_KEEP_TMP=1 keeps the images.

usage() {
    sed -n '/^#   scripts/p' "$0" >&2
    exit 2
}
kinds=() points=() re=
while getopts k:p:h opt; do
    case $opt in
    k) IFS=, read -r -a kinds <<<"$OPTARG" ;;
    p) IFS=, read -r -a points <<<"$OPTARG" ;;
    *) usage ;;
    esac
done
shift $((OPTIND - 1))
[[ $# -le 1 ]] || usage
re=${1:-}

. "$(dirname "$0")/../tests/functions.sh"
. "$TESTS_DIR/interop/fault-lib.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo
if [[ ${#kinds[@]} -eq 0 ]]; then
    kinds=("${FAULT_KINDS[@]}")
    if fs_have_tmpfs; then
        kinds+=(real-enospc)
    else
        note "no tmpfs in a private mount namespace here (unshare -rm): real-enospc left out"
    fi
fi
[[ ${#points[@]} -gt 0 ]] || points=("${FAULT_POINTS[@]}")

start=$SECONDS
nops=0
for line in "${FAULT_OPS[@]}"; do
    IFS='|' read -r name setup args <<<"$line"
    [[ -z $re || $name =~ $re ]] || continue
    nops=$((nops + 1))
    fs_prepare "$TMPD/$name" "$name" "$setup" "$args"
    for kind in "${kinds[@]}"; do
        if [[ $kind == real-enospc ]]; then
            fs_real_enospc "$TMPD/$name" "$name" "$args"
            continue
        fi
        for point in "${points[@]}"; do
            fs_sweep "$TMPD/$name" "$name" "$args" "$kind" "$point"
        done
    done
done
[[ $nops -gt 0 ]] || fail "no operation matches '$re'"
printf '\n%d operations, %d runs, %d failures, %d s\n' "$nops" "$FS_CASES" "$FS_FAILURES" $((SECONDS - start))
[[ $FS_FAILURES -eq 0 ]] || fail "$FS_FAILURES failure(s)"
