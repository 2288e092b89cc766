#!/usr/bin/env bash
# Builds the self-contained fused-moe binary into dist/ (ignored by git) for the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release --static-swift-stdlib
mkdir -p dist
cp .build/release/fused-moe dist/fused-moe
git rev-parse HEAD > dist/COMMIT
if [[ -n "$(git status --porcelain -- Sources Package.swift)" ]]; then echo "$(cat dist/COMMIT)+dirty" > dist/COMMIT; fi
ls -la dist/
