#!/bin/bash
# Randomized chains at fixed seeds (bitmap-random.py): 2-4 layers, random
# writes/zero writes/discards, random presence, state (enabled, disabled,
# added late, in-use, hidden behind a cleared autoclear bit) and granularity
# of bitmap X per layer.  For each chain, qcbt bitmap dump/check/sha256 in
# strict and tolerant mode (dumps, digests, refusals and exit codes) must
# agree with bitmap-model.py; where strict merging succeeds, with QEMU's own
# qemu-img bitmap --merge union too (verify_merge in bitmap-lib.sh).
#
# QCBT_RANDOM_SEEDS="FIRST LAST" (default "1 32") picks the seeds;
# QCBT_KEEP_TMP=1 keeps the chains; every failure prints the recipe.

# shellcheck source=../functions.sh
. "$(dirname "$0")/../functions.sh"
requires qemu-img qemu-io qemu-nbd nbdinfo sha256sum
requires qemu-storage-daemon
# shellcheck source=bitmap-lib.sh
. "$TESTS_DIR/interop/bitmap-lib.sh"

read -r first last <<<"${QCBT_RANDOM_SEEDS:-1 32}"
declare -A tally=()
t0=$SECONDS
for ((seed = first; seed <= last; seed++)); do
    want "seed$seed" || continue
    begin_case "seed$seed"
    json=$("$PYTHON" "$TESTS_DIR/interop/bitmap-random.py" "$seed" "$CASE_DIR") ||
        fail "[$CASE] could not build the chain"
    top=$("$PYTHON" -c 'import json,sys; print(json.loads(sys.argv[1])["top"])' "$json")
    mapfile -t MODEL_OPTS < <("$PYTHON" -c 'import json,sys; [print(o) for o in json.loads(sys.argv[1])["model_opts"]]' "$json")
    desc=$("$PYTHON" -c 'import json,sys; print(json.loads(sys.argv[1])["desc"])' "$json")
    note "[$CASE] $desc"
    rc=0
    verify_merge "$(basename "$top")" X model model || rc=1
    for m in strict tolerant; do
        v=$("$PYTHON" -c 'import json,sys; v = json.load(open(sys.argv[1]))["violations"]; print(v[0] if v else "ok")' "model-$m.info")
        tally[$m:${v//[0-9]/N}]=$((${tally[$m:${v//[0-9]/N}]:-0} + 1))
    done
    case_result "$rc"
done
note "$((last - first + 1)) seeds in $((SECONDS - t0)) s; model outcomes:"
for k in "${!tally[@]}"; do printf '    %-36s %d\n' "$k" "${tally[$k]}"; done | sort >&2
finish_cases
