#!/usr/bin/env bash
# Install everything qcbt's build, tests, demo and benchmarks use, on
# Debian 12.  Safe to run again; uses sudo when not root.
set -euo pipefail

packages=(
    build-essential cmake pkg-config clang-format
    libnbd-dev libnbd-bin nbdkit nbdkit-plugin-dev
    libglib2.0-dev libssl-dev libcmocka-dev zlib1g-dev libzstd-dev libxxhash-dev liblz4-dev
    qemu-utils qemu-system-common python3 python3-libnbd file openssl
    # tests/interop/test-libvirt-pull.sh and test-vnb-import.sh start their
    # own (session) libvirtd and a TCG domain: no system daemon, no KVM.
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86
    virtnbdbackup
)

SUDO=
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
fi

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null |
            grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: all ${#packages[@]} packages already installed"
    exit 0
fi

echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
