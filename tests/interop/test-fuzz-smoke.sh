#!/usr/bin/env bash
# Fuzz smoke test: mutate images qemu-img makes (plain, compressed, zstd,
# extended L2, v2, with bitmaps) thousands of times each with a fixed seed
# and feed them to the reader (tests/fuzz/fuzz-qcow2.c).  In the sanitizer
# build any out-of-bounds access, leak or UB fails the test; everywhere a
# crash or hang (ctest timeout) does.
set -euo pipefail
source "$(dirname "$0")/../functions.sh"

fuzz=${QCBT_BUILD_DIR:?}/tests/fuzz/fuzz-qcow2
[[ -x $fuzz ]] || fail "missing $fuzz"
cd "$TMPD"

qemu-img create -q -f qcow2 -o cluster_size=4096 plain.qcow2 1M
qemu-io -f qcow2 -c 'write -P 1 0 64k' -c 'write -z 128k 64k' \
    -c 'write -P 2 900k 4k' plain.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=4096,compat=0.10 v2.qcow2 1M
qemu-io -f qcow2 -c 'write -P 3 4k 8k' v2.qcow2 >/dev/null
qemu-img convert -c -O qcow2 -o cluster_size=4096 plain.qcow2 zlib.qcow2
qemu-img convert -c -O qcow2 -o cluster_size=4096,compression_type=zstd \
    plain.qcow2 zstd.qcow2
qemu-img create -q -f qcow2 -o cluster_size=16384,extended_l2=on extl2.qcow2 1M
qemu-io -f qcow2 -c 'write -P 4 2k 1k' -c 'write -z 40k 2k' extl2.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=4096 bm.qcow2 1M
qemu-img bitmap --add -g 4096 bm.qcow2 b0
qemu-img bitmap --add -g 65536 bm.qcow2 b1
qemu-io -f qcow2 -c 'write -P 5 8k 8k' -c 'write 512k 4k' bm.qcow2 >/dev/null

ITERS=${QCBT_FUZZ_ITERS:-3000}
QCBT_FUZZ_ITERS=$ITERS QCBT_FUZZ_SEED=0x5eed "$fuzz" \
    plain.qcow2 v2.qcow2 zlib.qcow2 zstd.qcow2 extl2.qcow2 bm.qcow2
echo "fuzz smoke: 6 seeds x $ITERS mutations, no crash"
