#!/usr/bin/env bash
# On the GPU machine, when little device time is left: ceilings, the full check, then the shipped
# plans on every preset (bench --plan-only, all batch sizes), each step under its own timeout.
# Outputs under $OUT: ceilings.json, check.txt, bench-presets.json, bench-presets.txt.
# CHECK_TIMEOUT=0 skips the check. TOUCHED_LIKE=FILE (a peer-timing JSON) adds the batch sizes
# TOUCHED_BATCHES (default 8,32) with each input set's routing drawn to touch that file's
# experts_touched (bench-touched.json/.txt). SANITIZE="racecheck memcheck" adds those
# compute-sanitizer tools on `check --small` (device-sanitize.sh; SANITIZER_TIMEOUT each). ATOMIC=1 adds
# the top-8 presets from 1024 tokens with --combine atomic (bench-atomic.json/.txt); PYTEST_K=EXPR runs
# python/tests/test_gpu.py's tests matching EXPR against dist/libFusedMoEC.so (pytest-gpu.txt).
# More than the device tool's 8 files: all of them in outputs.tar.gz, the main ones beside it (device_fit_out).
# BETWEEN="SHAPE:M,M ..." adds those rows (batch sizes between the tables' keys) to bench-between.json/.txt.
source "$(dirname "$0")/device-env.sh"
presets=(--shape seed4096 --shape seed8192 --shape mixtral_tp2 --shape qwen235_tp2 --shape dsv3_tp4)
device_ceilings
[[ ${CHECK_TIMEOUT:-300} == 0 ]] || device_check "${CHECK_TIMEOUT:-300}"
timeout ${BENCH_TIMEOUT:-200} dist/fused-moe bench --plan-only "${presets[@]}" --ceilings "$OUT/ceilings.json" \
  --json "$OUT/bench-presets.json" 2>/dev/null > "$OUT/bench-presets.txt" || status=1
if [[ -n ${TOUCHED_LIKE:-} ]]; then
  timeout ${TOUCHED_TIMEOUT:-120} dist/fused-moe bench --plan-only "${presets[@]}" --batch-sizes "${TOUCHED_BATCHES:-8,32}" \
    --touched-like "$TOUCHED_LIKE" --ceilings "$OUT/ceilings.json" --json "$OUT/bench-touched.json" \
    2> "$OUT/bench-touched.log" > "$OUT/bench-touched.txt" || status=1
  grep "routing drawn" "$OUT/bench-touched.log"
fi
for row in ${BETWEEN:-}; do  # batch sizes between the tables' keys, one process per shape
  timeout ${BETWEEN_TIMEOUT:-60} dist/fused-moe bench --plan-only --shape "${row%%:*}" --batch-sizes "${row##*:}" \
    --ceilings "$OUT/ceilings.json" --json "$OUT/bench-between-${row%%:*}.json" 2>/dev/null >> "$OUT/bench-between.txt" || status=1
done
if [[ ${ATOMIC:-0} == 1 ]]; then  # the top-8 presets from 1024 tokens again with --combine atomic
  timeout ${ATOMIC_TIMEOUT:-150} dist/fused-moe bench --plan-only --combine atomic --shape seed4096 --shape seed8192 \
    --shape qwen235_tp2 --shape dsv3_tp4 --batch-sizes 1024,2048,4096,8192 --ceilings "$OUT/ceilings.json" \
    --json "$OUT/bench-atomic.json" 2>/dev/null > "$OUT/bench-atomic.txt" || status=1
fi
if [[ -n ${PYTEST_K:-} ]]; then  # the Python package's GPU tests matching PYTEST_K
  [[ -f dist/libFusedMoEC.so ]] || gunzip -kf dist/libFusedMoEC.so.gz  # (carried gzipped: build-dist.sh)
  FUSED_MOE_LIBRARY=dist/libFusedMoEC.so timeout ${PYTEST_TIMEOUT:-200} python3 -m pytest python/tests/test_gpu.py -q \
    -p no:cacheprovider -k "$PYTEST_K" > "$OUT/pytest-gpu.txt" 2>&1 || status=1
  tail -3 "$OUT/pytest-gpu.txt"
fi
if [[ -n ${SANITIZE:-} ]]; then
  TOOLS="$SANITIZE" bash "$(dirname "$0")/device-sanitize.sh" || status=1
fi
device_fit_out check.txt ceilings.json bench-presets.json bench-presets.txt bench-touched.txt bench-atomic.txt pytest-gpu.txt
exit $status
