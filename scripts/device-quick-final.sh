#!/usr/bin/env bash
# On the GPU machine, when little device time is left: ceilings, the full check, then the shipped
# plans on every preset (bench --plan-only, all batch sizes), each step under its own timeout.
# Outputs under $OUT: ceilings.json, check.txt, bench-presets.json, bench-presets.txt.
set -uo pipefail
OUT=${OUT:-/tmp/fused-moe-out}
export FUSED_MOE_CACHE_DIR=${FUSED_MOE_CACHE_DIR:-/tmp/fused-moe-cache}
export FUSED_MOE_COMMIT=$(cat dist/COMMIT 2>/dev/null || echo unknown)
status=0
python3 scripts/ceilings.py "$OUT/ceilings.json" || status=1
timeout ${CHECK_TIMEOUT:-150} dist/fused-moe check --json /tmp/check.json > "$OUT/check.txt" 2>&1 || status=1
tail -1 "$OUT/check.txt"; grep FAIL "$OUT/check.txt" | cut -c1-300 | head
timeout ${BENCH_TIMEOUT:-200} dist/fused-moe bench --plan-only --shape seed4096 --shape seed8192 --shape mixtral_tp2 \
  --shape qwen235_tp2 --shape dsv3_tp4 --ceilings "$OUT/ceilings.json" --json "$OUT/bench-presets.json" \
  2>/dev/null > "$OUT/bench-presets.txt" || status=1
exit $status
