#!/usr/bin/env bash
# The whole test suite: install dependencies, check formatting, build with
# ASan+UBSan and run every test there, then build normally and run every
# test again.  The output ends with ctest's summary.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
cd "$src"

bash scripts/setup.sh

echo "== format check (clang-format $(clang-format --version | sed 's/.*version //'))"
git ls-files -- '*.c' '*.h' | xargs clang-format --dry-run --Werror

echo "== ASan+UBSan build"
bash scripts/build.sh "$src/build-asan" -DQCBT_SANITIZE=ON \
    -DCMAKE_BUILD_TYPE=Debug
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir "$src/build-asan" --output-on-failure -j2 -LE slow

echo "== release build"
bash scripts/build.sh "$src/build"
ctest --test-dir "$src/build" --output-on-failure -j2
