#!/usr/bin/env bash
# The demo: install dependencies, build, and run qcbt end to end on a
# generated 3-layer backing chain (raw base <- qcow2 <- qcow2):
#   qcbt info, qcbt map, and a byte-exact check of qcbt cat against
#   qemu-img convert -O raw.
# Usage: scripts/demo.sh [WORKDIR]   (default: a fresh temporary directory)
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)

bash "$src/scripts/setup.sh"
echo "== building"
bash "$src/scripts/build.sh" "$src/build"
qcbt=$src/build/client/qcbt

work=${1:-$(mktemp -d /tmp/qcbt-demo.XXXXXX)}
mkdir -p "$work/base" "$work/snap"
cd "$work"
echo "== making a 3-layer chain in $work"
# Base: a raw disk with some data.
qemu-img create -q -f raw base/disk.raw 256M
qemu-io -f raw -c 'write -P 0x11 0 64M' -c 'write -P 0x12 128M 32M' \
    base/disk.raw >/dev/null
# First external snapshot, in a sub-directory, naming its backing file
# relative to itself.
qemu-img create -q -f qcow2 -b ../base/disk.raw -F raw snap/mid.qcow2 256M
qemu-io -f qcow2 -c 'write -P 0x21 1M 3M' -c 'write -z 130M 2M' \
    -c 'write -P 0x22 200M 1M' snap/mid.qcow2 >/dev/null
# Second snapshot: the active layer.
qemu-img create -q -f qcow2 -b snap/mid.qcow2 -F qcow2 top.qcow2 256M
qemu-io -f qcow2 -c 'write -P 0x31 2M 64k' -c 'discard 10M 1M' \
    -c 'write -z 20M 4M' -c 'write -P 0x32 255M 1M' top.qcow2 >/dev/null

echo
echo "\$ qcbt info top.qcow2"
"$qcbt" info top.qcow2
echo
echo "\$ qcbt map top.qcow2"
"$qcbt" map top.qcow2
echo
echo "\$ qcbt cat top.qcow2 > guest.raw"
"$qcbt" cat top.qcow2 > guest.raw
qemu-img convert -O raw top.qcow2 reference.raw
if cmp guest.raw reference.raw; then
    echo "qcbt cat == qemu-img convert -O raw: identical ($(stat -c %s guest.raw) bytes)"
else
    echo "demo FAILED: qcbt cat differs from qemu-img convert" >&2
    exit 1
fi
echo
echo "demo OK (files in $work)"
