#!/usr/bin/env bash
# CI for the C ABI and the Python package: builds libFusedMoEC.so (release, with the Swift runtime
# linked in statically, so it loads on machines without Swift), checks that it needs no Swift
# library, and runs python/tests. Without a GPU or torch, the GPU and torch tests skip and the
# ctypes ABI tests (error paths, the header from C and C++) run.
#
# FUSED_MOE_SCRATCH_PATH: the build folder (default .build).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"
scratch="${FUSED_MOE_SCRATCH_PATH:-.build}"

echo "== building libFusedMoEC (release, -static-stdlib)"
build=(swift build -c release --scratch-path "$scratch" --product FusedMoEC -Xswiftc -static-stdlib)
"${build[@]}"
library="$("${build[@]}" --show-bin-path)/libFusedMoEC.so"

echo "== ldd $library"
ldd "$library"
if ldd "$library" | grep -E 'libswift|libdispatch|libBlocksRuntime|libFoundation|not found'; then
  echo "libFusedMoEC.so needs the libraries above; it must be self-contained" >&2
  exit 1
fi

echo "== python tests"
if ! python3 -c 'import pytest' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check pytest
fi
# Naming the library makes a failure to load it an error rather than a skip.
FUSED_MOE_LIBRARY="$library" python3 -m pytest python/tests -q -p no:cacheprovider
