#!/usr/bin/env bash
# Runs on the GPU machine (no Swift there) with the static binary carried in dist/.
# Build it here first:  scripts/build-dist.sh
# Usage: scripts/device-run.sh smoke|check|bench|all [extra bench args...]
#   smoke: info, the ceilings, `check --quick` twice (the second must compile nothing), kernel_check.py --quick
#   check: the full `fused-moe check`
#   bench: `fused-moe bench` (the PR's table on seed4096 and seed8192) with ceilings from torch
# Everything it prints is also written under $OUT.
source "$(dirname "$0")/device-env.sh"
mode=${1:-smoke}; shift || true
mkdir -p "$OUT"
bin=dist/fused-moe

step() { echo; echo "=== $*"; }

if [[ $mode == smoke || $mode == all ]]; then
  step "machine"; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  step "info"; $bin info 2>&1 | tee "$OUT/info.txt"
  step "ceilings (torch)"; python3 scripts/ceilings.py "$OUT/ceilings.json" || status=1
  step "check --quick (first run: compiles)"; $bin check --quick --json "$OUT/check-quick-1.json" 2>&1 | tee "$OUT/check-quick-1.txt" || status=1
  step "check --quick (second run: must compile nothing)"; $bin check --quick --json "$OUT/check-quick-2.json" 2>&1 | tee "$OUT/check-quick-2.txt" || status=1
  grep -E "compiled [0-9]+" "$OUT/check-quick-2.txt" | head -3
  if [[ -f scripts/kernel_check.py ]]; then
    step "kernel_check.py --quick"; PYTHONUNBUFFERED=1 timeout 300 python3 scripts/kernel_check.py --quick --json "$OUT/kernel-check.json" 2>&1 | tail -60 || status=1
  fi
fi
if [[ $mode == check || $mode == all ]]; then
  step "check (full)"; $bin check --json "$OUT/check.json" 2>&1 | tee "$OUT/check.txt" || status=1
  step "fused-moe run on safetensors (CUDA and CPU backends vs torch)"
  mkdir -p /tmp/run-check && python3 scripts/run_check.py $bin /tmp/run-check || status=1
  if [[ -f dist/libFusedMoEC.so ]]; then
    step "python package on the GPU (C ABI through ctypes, against torch)"
    FUSED_MOE_LIBRARY=dist/libFusedMoEC.so timeout 300 python3 -m pytest python/tests -q -x -p no:cacheprovider 2>&1 | tail -15 || status=1
  fi
fi
if [[ $mode == bench || $mode == all ]]; then
  [[ -f $OUT/ceilings.json ]] || python3 scripts/ceilings.py "$OUT/ceilings.json"
  step "bench"; $bin bench --ceilings "$OUT/ceilings.json" --json "$OUT/bench.json" "$@" 2>"$OUT/bench-progress.txt" | tee "$OUT/bench.txt" || status=1
  tail -5 "$OUT/bench-progress.txt"
fi
exit $status
