#!/usr/bin/env bash
# Format every C source with the house .clang-format (CI checks this).
set -euo pipefail
cd "$(dirname "$0")/.."
git ls-files -co --exclude-standard -- '*.c' '*.h' | xargs clang-format -i
