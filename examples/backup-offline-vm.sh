#!/bin/bash
# Incremental backup of an offline VM's disk chain with qcbt alone.
#
#   examples/backup-offline-vm.sh [WORKDIR]
#
# Self-contained: makes a scratch directory (WORKDIR, default a new
# mktemp -d that is removed at the end), builds a small VM disk, and walks
# the whole job:
#
#   1. the VM's disk: base.qcow2 with an "installed system";
#   2. VM off: a full backup that creates checkpoint "ckpt" (a persistent,
#      enabled dirty bitmap, as libvirt makes one for a checkpoint):
#      `qcbt backup --full --checkpoint ckpt base.qcow2 backups`; qcbt
#      serves the image with a qcbt-server of its own and keeps writers out
#      until the checkpoint exists;
#   3. the VM runs: writes to base.qcow2, then an external snapshot
#      (overlay.qcow2, backing base.qcow2) gets a same-named "ckpt" bitmap
#      (libvirt's rule when it snapshots a disk with checkpoints), and the
#      guest writes, zeroes and discards in the overlay;
#   4. VM off again: an incremental backup of the chain since "ckpt"
#      (merged over both layers) that creates the next checkpoint,
#      "ckpt2", in the top layer: one command;
#   5. the VM runs once more, and the next cycle is `--auto`: it starts
#      from the checkpoint the manifest recorded (ckpt2) and creates ckpt3;
#   6. restore the newest backup and check with qemu-img compare that it is
#      identical to the disk.
#
# Needs qemu-img and qemu-io, and qcbt / qcbt-server: $QCBT and
# $QCBT_SERVER, else ../build/{client,server}/ next to this script, else
# PATH.  Exit 0 when the restored disk is identical to the VM's disk.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
find_tool() { # NAME ENV-VALUE BUILD-PATH
    if [[ -n $2 ]]; then
        echo "$2"
    elif [[ -x $here/../build/$3 ]]; then
        echo "$here/../build/$3"
    else
        command -v "$1" || { echo "$0: $1 not found (set \$QCBT / \$QCBT_SERVER)" >&2; exit 1; }
    fi
}
QCBT=$(find_tool qcbt "${QCBT:-}" client/qcbt)
# qcbt backup of an image starts this server itself.
QCBT_SERVER=$(find_tool qcbt-server "${QCBT_SERVER:-}" server/qcbt-server)
export QCBT_SERVER

remove_work=
if [[ -n ${1:-} ]]; then
    work=$(mkdir -p "$1" && cd "$1" && pwd)
else
    work=$(mktemp -d "${TMPDIR:-/tmp}/qcbt-example.XXXXXX")
    remove_work=1
fi
cd "$work"
rm -rf base.qcow2 overlay.qcow2 backups restored.raw
trap 'if [[ -n $remove_work ]]; then rm -rf "$work"; fi' EXIT
step() { printf '\n== %s\n' "$*"; }

step "1. the VM's disk: base.qcow2, 256 MiB, 64 MiB 'installed'"
qemu-img create -q -f qcow2 base.qcow2 256M
qemu-io -f qcow2 -c 'write -P 0x11 0 48M' -c 'write -P 0x22 128M 16M' base.qcow2 >/dev/null

step "2. VM off: a full backup that creates checkpoint 'ckpt'"
"$QCBT" backup --full --checkpoint ckpt base.qcow2 backups

step "3. the VM runs: writes, an external snapshot with 'ckpt' propagated, more writes"
qemu-io -f qcow2 -c 'write -P 0x33 4M 1M' -c 'write -z 8M 2M' base.qcow2 >/dev/null
"$QCBT" snapshot base.qcow2 overlay.qcow2 # carries 'ckpt' (libvirt's rule)
qemu-io -f qcow2 \
    -c 'write -P 0x44 16M 3M' \
    -c 'write -P 0x55 130M 4k' \
    -c 'write -z 20M 1M' \
    -c 'discard 140M 2M' \
    -c 'write -P 0x66 200M 8M' overlay.qcow2 >/dev/null
"$QCBT" bitmap check overlay.qcow2 ckpt || true

step "4. VM off: incremental backup of the whole chain since 'ckpt', creating 'ckpt2'"
"$QCBT" backup --since ckpt --checkpoint ckpt2 overlay.qcow2 backups
qemu-img info --backing-chain backups/backup-0001.qcow2 | grep -E '^(image|backing file):'

step "5. the VM runs again; the next cycle starts from the checkpoint recorded"
qemu-io -f qcow2 -c 'write -P 0x77 64M 2M' overlay.qcow2 >/dev/null
"$QCBT" backup --auto --checkpoint ckpt3 overlay.qcow2 backups
"$QCBT" bitmap list overlay.qcow2
"$QCBT" verify backups

step "6. restore and compare with the VM's disk"
"$QCBT" restore backups restored.raw
if qemu-img compare -f raw -F qcow2 restored.raw overlay.qcow2; then
    echo "identical: the restored disk equals the VM's disk"
else
    echo "DIFFERENT: the restored disk does not equal the VM's disk" >&2
    exit 1
fi
