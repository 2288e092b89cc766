#!/usr/bin/env bash
# Builds what the GPU machine runs into dist/ (ignored by git): the self-contained fused-moe binary
# and libFusedMoEC.so (the C ABI, with the Swift runtime linked in) for the Python package, also gzipped.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release --static-swift-stdlib
swift build -c release --scratch-path .build-capi --product FusedMoEC -Xswiftc -static-stdlib
mkdir -p dist
cp .build/release/fused-moe dist/fused-moe
cp "$(swift build -c release --scratch-path .build-capi --product FusedMoEC -Xswiftc -static-stdlib --show-bin-path)/libFusedMoEC.so" dist/
# The binary and the library together pass the device tool's 64 MiB carry limit: carry the library
# gzipped (device scripts unpack it where they need it).
gzip -kf -6 dist/libFusedMoEC.so
git rev-parse HEAD > dist/COMMIT
if [[ -n "$(git status --porcelain -- Sources Package.swift)" ]]; then echo "$(cat dist/COMMIT)+dirty" > dist/COMMIT; fi
ls -la dist/
