#!/bin/bash
# Incremental backup of an offline VM's disk chain with qcbt.
#
#   examples/backup-offline-vm.sh [WORKDIR]
#
# Self-contained: makes a scratch directory (WORKDIR, default a new
# mktemp -d that is removed at the end), builds a small VM disk, and walks
# the whole job:
#
#   1. the VM's disk: base.qcow2 with an "installed system";
#   2. checkpoint "ckpt" (a persistent, enabled dirty bitmap, as libvirt
#      makes one for a checkpoint) and a full backup, served by qcbt-server;
#   3. the VM runs: writes to base.qcow2, then an external snapshot
#      (overlay.qcow2, backing base.qcow2) gets a same-named "ckpt" bitmap
#      (libvirt's rule when it snapshots a disk with checkpoints), and the
#      guest writes, zeroes and discards in the overlay;
#   4. the VM is off again: qcbt-server exports the chain and publishes
#      "ckpt" merged over both layers as qemu:dirty-bitmap:ckpt; an
#      incremental backup copies only what changed;
#   5. restore the newest backup and check with qemu-img compare that it is
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
QCBT_SERVER=$(find_tool qcbt-server "${QCBT_SERVER:-}" server/qcbt-server)

remove_work=
if [[ -n ${1:-} ]]; then
    work=$(mkdir -p "$1" && cd "$1" && pwd)
else
    work=$(mktemp -d "${TMPDIR:-/tmp}/qcbt-example.XXXXXX")
    remove_work=1
fi
cd "$work"
rm -rf base.qcow2 overlay.qcow2 backups restored.raw nbd.sock server.pid
server_pid=
stop_server() {
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        # not our child (--fork): wait for it to go, at most a minute
        for _ in $(seq 600); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        server_pid=
    fi
}
trap 'stop_server; if [[ -n $remove_work ]]; then rm -rf "$work"; fi' EXIT
serve() { # IMAGE: export IMAGE's chain with checkpoint ckpt on ./nbd.sock
    # --fork returns once the server accepts connections: no waiting.
    "$QCBT_SERVER" --fork --pid-file "$work/server.pid" -t -B ckpt \
        -k "$work/nbd.sock" "$1"
    server_pid=$(cat "$work/server.pid")
}
uri="nbd+unix:///?socket=$work/nbd.sock"
step() { printf '\n== %s\n' "$*"; }

step "1. the VM's disk: base.qcow2, 256 MiB, 64 MiB 'installed'"
qemu-img create -q -f qcow2 base.qcow2 256M
qemu-io -f qcow2 -c 'write -P 0x11 0 48M' -c 'write -P 0x22 128M 16M' base.qcow2 >/dev/null

step "2. checkpoint 'ckpt' (VM off) and a full backup"
qemu-img bitmap --add base.qcow2 ckpt
serve base.qcow2
"$QCBT" backup --since ckpt "$uri" backups     # no previous backup: full
stop_server

step "3. the VM runs: writes, an external snapshot with 'ckpt' propagated, more writes"
qemu-io -f qcow2 -c 'write -P 0x33 4M 1M' -c 'write -z 8M 2M' base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
qemu-img bitmap --add overlay.qcow2 ckpt
qemu-io -f qcow2 \
    -c 'write -P 0x44 16M 3M' \
    -c 'write -P 0x55 130M 4k' \
    -c 'write -z 20M 1M' \
    -c 'discard 140M 2M' \
    -c 'write -P 0x66 200M 8M' overlay.qcow2 >/dev/null
"$QCBT" bitmap check overlay.qcow2 ckpt || true

step "4. VM off: incremental backup since 'ckpt' of the whole chain"
serve overlay.qcow2
"$QCBT" backup --since ckpt "$uri" backups
"$QCBT" verify --against "$uri" backups
stop_server
qemu-img info --backing-chain backups/backup-0001.qcow2 | grep -E '^(image|backing file):'

step "5. restore and compare with the VM's disk"
"$QCBT" restore backups restored.raw
if qemu-img compare -f raw -F qcow2 restored.raw overlay.qcow2; then
    echo "identical: the restored disk equals the VM's disk"
else
    echo "DIFFERENT: the restored disk does not equal the VM's disk" >&2
    exit 1
fi
