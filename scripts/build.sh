#!/usr/bin/env bash
# Configure and build qcbt into a build directory.
#   scripts/build.sh [BUILD_DIR] [extra cmake arguments...]
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$src/build}
shift || true
cmake -S "$src" -B "$build" -DQCBT_WERROR=ON "$@" >/dev/null
cmake --build "$build" -j"$(nproc)"
