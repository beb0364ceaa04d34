#!/bin/bash
# Back up a running libvirt domain with libvirt checkpoints and qcbt:
# libvirt's pull-mode backup (virsh backup-begin) exports a point-in-time
# view of each disk over NBD, and qcbt copies it into a chain of qcow2
# files, one directory per disk.
#
#   examples/libvirt-pull-backup.sh [--full] DOMAIN DIR
#
# One run makes one backup of every disk of DOMAIN (device "disk"; set
# DISKS="vda vdb" to choose):
#
#   1. the checkpoint of the previous run is read from DIR/checkpoint; when
#      it is missing, or libvirt no longer has that checkpoint, or --full
#      is given, the backup is full;
#   2. virsh backup-begin DOMAIN with a pull-mode backup XML (a unix socket,
#      <incremental>PREVIOUS</incremental> when incremental) and a
#      checkpoint XML creating checkpoint NEW (qcbt-<UTC time>), which
#      starts recording the writes after this point;
#   3. for each disk T: qcbt backup --full, or
#      qcbt backup --since backup-T, of nbd+unix:///T?socket=SOCKET into
#      DIR/T.  libvirt names the export after the disk target and the
#      dirty bitmap "backup-T" (qemu:dirty-bitmap:backup-T): it holds the
#      changes since checkpoint PREVIOUS, which is the point of the newest
#      backup in DIR/T.  --since makes qcbt exit 2 instead of guessing when
#      the bitmap is not there;
#   4. virsh domjobabort DOMAIN ends the backup job (and its NBD server);
#   5. DIR/checkpoint := NEW, and the older checkpoints this script made
#      (qcbt-*) are deleted: the next incremental needs NEW only.
#
# If anything fails, the job is ended, checkpoint NEW is deleted again
# (libvirt folds its bitmap into the older one) and DIR/checkpoint is left
# as it was, so the next run copies everything since PREVIOUS: a backup
# that succeeded for some disks is copied again, never lost.
#
# Restore disk T as it was at backup N:  qcbt restore --at N DIR/T OUT
# A disk whose size changed makes qcbt exit 2 (no incremental possible):
# run once with --full.
#
# The domain must be running (for a shut-off domain, export its disks
# with qcbt-server: examples/backup-offline-vm.sh) and its disks qcow2
# (checkpoints are persistent bitmaps).  One DIR per domain: two DIRs
# rotating the same domain's checkpoints would delete each other's.
#
# Environment: LIBVIRT_DEFAULT_URI (virsh's connection, e.g.
# qemu:///system), DISKS, QCBT (else ../build/client/qcbt next to this
# script, else PATH), QCBT_PULL_TMPDIR (where QEMU creates the NBD socket
# and libvirt the scratch files that keep the data the guest overwrites
# while the backup runs; by default a new directory in ${TMPDIR:-/tmp},
# mode 1733 so that QEMU, which may run as another user, can create them
# and nobody else list them).
# Exit 0 when every disk was backed up and the checkpoint rotated.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
if [[ -n ${QCBT:-} ]]; then
    :
elif [[ -x $here/../build/client/qcbt ]]; then
    QCBT=$here/../build/client/qcbt
else
    QCBT=$(command -v qcbt) || { echo "$0: qcbt not found (set \$QCBT)" >&2; exit 1; }
fi

full=
if [[ ${1:-} == --full ]]; then
    full=1
    shift
fi
if [[ $# -ne 2 ]]; then
    echo "usage: $0 [--full] DOMAIN DIR" >&2
    exit 1
fi
dom=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)
say() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

if [[ -n ${DISKS:-} ]]; then
    read -r -a disks <<<"$DISKS"
else
    # "Type Device Target Source" after two header lines.
    mapfile -t disks < <(virsh domblklist "$dom" --details |
        awk 'NR > 2 && $2 == "disk" { print $3 }')
fi
[[ ${#disks[@]} -gt 0 ]] || { say "$dom has no disks to back up"; exit 1; }
all=$(virsh domblklist "$dom" --details | awk 'NR > 2 && NF >= 3 { print $3 }')

prev=
if [[ -z $full && -s $dir/checkpoint ]]; then
    prev=$(<"$dir/checkpoint")
    if ! virsh checkpoint-info "$dom" "$prev" >/dev/null 2>&1; then
        say "checkpoint $prev is gone from $dom: full backup"
        prev=
    fi
fi
new=qcbt-$(date -u +%Y%m%dT%H%M%S.%N)

sockdir=${QCBT_PULL_TMPDIR:-}
made_sockdir=
if [[ -z $sockdir ]]; then
    sockdir=$(mktemp -d "${TMPDIR:-/tmp}/qcbt-pull.XXXXXX")
    chmod 1733 "$sockdir"
    made_sockdir=1
fi
# The domain's name in file names, without what XML or a shell would mind.
safe=${dom//[^A-Za-z0-9._-]/_}
sock=$sockdir/$safe.nbd
work=$(mktemp -d "${TMPDIR:-/tmp}/qcbt-pull-xml.XXXXXX")

# Which of the domain's disks take part: the chosen ones yes, others no.
in_list() {
    local d
    for d in "${disks[@]}"; do [[ $d == "$1" ]] && return 0; done
    return 1
}
{
    echo "<domainbackup mode='pull'>"
    [[ -n $prev ]] && echo "  <incremental>$prev</incremental>"
    echo "  <server transport='unix' socket='$sock'/>"
    echo "  <disks>"
    for t in $all; do
        if in_list "$t"; then
            echo "    <disk name='$t' backup='yes' type='file'>"
            echo "      <scratch file='$sockdir/$safe.$t.scratch.qcow2'/>"
            echo "    </disk>"
        else
            echo "    <disk name='$t' backup='no'/>"
        fi
    done
    echo "  </disks>"
    echo "</domainbackup>"
} >"$work/backup.xml"
{
    echo "<domaincheckpoint>"
    echo "  <name>$new</name>"
    echo "  <disks>"
    for t in $all; do
        if in_list "$t"; then
            echo "    <disk name='$t' checkpoint='bitmap'/>"
        else
            echo "    <disk name='$t' checkpoint='no'/>"
        fi
    done
    echo "  </disks>"
    echo "</domaincheckpoint>"
} >"$work/checkpoint.xml"

job=
ok=
finish() {
    local rc=$?
    set +e
    if [[ -n $job ]]; then
        virsh domjobabort "$dom" >/dev/null
    fi
    if [[ -z $ok && -n $job ]]; then
        # NEW covers nothing that was recorded: drop it, so the next run
        # starts again from PREVIOUS.
        virsh checkpoint-delete "$dom" "$new" >/dev/null &&
            say "failed: checkpoint $new deleted, the next backup starts from ${prev:-scratch}"
    fi
    rm -rf "$work"
    [[ -n $made_sockdir ]] && rm -rf "$sockdir"
    exit "$rc"
}
trap finish EXIT

if [[ -n $prev ]]; then
    say "incremental backup since checkpoint $prev, new checkpoint $new"
else
    say "full backup, new checkpoint $new"
fi
virsh backup-begin "$dom" "$work/backup.xml" "$work/checkpoint.xml" >/dev/null
job=1

for t in "${disks[@]}"; do
    uri="nbd+unix:///$t?socket=$sock"
    if [[ -n $prev ]]; then
        "$QCBT" backup --since "backup-$t" "$uri" "$dir/$t"
    else
        "$QCBT" backup --full "$uri" "$dir/$t"
    fi
done

virsh domjobabort "$dom" >/dev/null
job=
ok=1
printf '%s\n' "$new" >"$dir/.checkpoint.tmp"
mv -f "$dir/.checkpoint.tmp" "$dir/checkpoint"

# Rotation: only NEW is needed from now on.
for c in $(virsh checkpoint-list "$dom" --name); do
    if [[ $c == qcbt-* && $c != "$new" ]]; then
        virsh checkpoint-delete "$dom" "$c" >/dev/null
    fi
done
say "done: checkpoint $new; restore with: $(basename "$QCBT") restore --at N $dir/TARGET OUT"
