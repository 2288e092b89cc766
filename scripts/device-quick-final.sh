#!/usr/bin/env bash
# On the GPU machine, when little device time is left: ceilings, the full check, then the shipped
# plans on every preset (bench --plan-only, all batch sizes), each step under its own timeout.
# Outputs under $OUT: ceilings.json, check.txt, bench-presets.json, bench-presets.txt.
source "$(dirname "$0")/device-env.sh"
device_ceilings
device_check "${CHECK_TIMEOUT:-300}"
timeout ${BENCH_TIMEOUT:-200} dist/fused-moe bench --plan-only --shape seed4096 --shape seed8192 --shape mixtral_tp2 \
  --shape qwen235_tp2 --shape dsv3_tp4 --ceilings "$OUT/ceilings.json" --json "$OUT/bench-presets.json" \
  2>/dev/null > "$OUT/bench-presets.txt" || status=1
exit $status
