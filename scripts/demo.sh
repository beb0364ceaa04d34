#!/usr/bin/env bash
# The demo: install dependencies, build, and run qcbt's main job end to
# end on a generated 3-layer backing chain (raw base <- qcow2 <- qcow2)
# with libvirt-style checkpoints (one bitmap per checkpoint), qcbt alone:
#   a full backup that creates checkpoint ckpt, guest-like writes, an
#   external snapshot with the checkpoint propagated, more writes,
#   qcbt info / map / cat (checked against qemu-img convert),
#   qcbt bitmap check, an incremental backup of the chain since ckpt that
#   creates the next checkpoint, a restore, and qemu-img compare.
# Usage: scripts/demo.sh [WORKDIR]   (default: a fresh temporary directory)
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)

bash "$src/scripts/setup.sh"
echo "== building"
bash "$src/scripts/build.sh" "$src/build"
qcbt=$src/build/client/qcbt   # it finds ../server/qcbt-server itself

work=${1:-$(mktemp -d /tmp/qcbt-demo.XXXXXX)}
mkdir -p "$work/base" "$work/snap"
cd "$work"
echo "== making a 3-layer chain in $work"
# Base: a raw disk with some data (written before the checkpoint).
qemu-img create -q -f raw base/disk.raw 256M
qemu-io -f raw -c 'write -P 0x11 0 64M' -c 'write -P 0x12 128M 32M' \
    base/disk.raw >/dev/null
# First external snapshot, in a sub-directory, naming its backing file
# relative to itself.
qemu-img create -q -f qcow2 -b ../base/disk.raw -F raw snap/mid.qcow2 256M
qemu-io -f qcow2 -c 'write -P 0x21 1M 3M' -c 'write -z 130M 2M' \
    -c 'write -P 0x22 200M 1M' snap/mid.qcow2 >/dev/null

# The VM is off: a full backup of the chain, which creates checkpoint
# "ckpt" in its active layer (libvirt's model: one bitmap per checkpoint).
# qcbt serves the chain with a qcbt-server of its own and keeps writers
# out until the checkpoint exists, so ckpt holds exactly what changes
# after the backup.
echo
echo "\$ qcbt backup --full --checkpoint ckpt snap/mid.qcow2 backups"
"$qcbt" backup --full --checkpoint ckpt --no-progress snap/mid.qcow2 backups

echo
echo "== the VM runs: writes, an external snapshot (ckpt propagated), writes"
qemu-io -f qcow2 -c 'write -P 0x23 3M 128k' -c 'write -z 2M 64k' \
    snap/mid.qcow2 >/dev/null
# The snapshot: the new active layer gets a same-named empty bitmap for
# every checkpoint still recording (libvirt's rule).
echo "\$ qcbt snapshot snap/mid.qcow2 top.qcow2"
"$qcbt" snapshot snap/mid.qcow2 top.qcow2
qemu-io -f qcow2 -c 'write -P 0x31 2M 64k' -c 'discard 10M 1M' \
    -c 'write -z 20M 4M' -c 'write -P 0x32 255M 1M' \
    -c 'write -P 0x42 200M 2M' top.qcow2 >/dev/null

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
echo "\$ qcbt checkpoint list top.qcow2"
"$qcbt" checkpoint list top.qcow2
echo
echo "\$ qcbt bitmap check top.qcow2 ckpt"
"$qcbt" bitmap check top.qcow2 ckpt

echo
echo "\$ qcbt backup --since ckpt --checkpoint ckpt2 top.qcow2 backups"
"$qcbt" backup --since ckpt --checkpoint ckpt2 --no-progress top.qcow2 backups
echo "\$ qcbt bitmap list top.qcow2"
"$qcbt" bitmap list top.qcow2

echo
echo "\$ qcbt verify backups"
"$qcbt" verify backups
echo "\$ qcbt restore backups restored.raw"
"$qcbt" restore backups restored.raw
echo "\$ qemu-img compare top.qcow2 restored.raw"
qemu-img compare -f qcow2 -F raw top.qcow2 restored.raw
echo
echo "demo OK (files in $work)"
