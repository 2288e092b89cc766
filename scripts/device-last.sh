#!/usr/bin/env bash
# On the GPU machine: the full check (routing, PDL and fused comparisons included), the plan's
# bench for the seed shapes with and without programmatic dependent launch, with a plot, and the
# expert-parallel path on one GPU (ep = 1, loopback exchange).
source "$(dirname "$0")/device-env.sh"
python3 scripts/ceilings.py "$OUT/ceilings.json"
dist/fused-moe check --json "$OUT/check.json" > "$OUT/check.txt" 2>&1 || status=1
tail -1 "$OUT/check.txt"; grep FAIL "$OUT/check.txt" | head -20
dist/fused-moe bench --plan-only --without-pdl --ceilings "$OUT/ceilings.json" --json "$OUT/bench-pdl.json" \
  --plot "$OUT/bench-pdl.svg" 2>/dev/null > "$OUT/bench-pdl.txt" || status=1
cat "$OUT/bench-pdl.txt"
timeout 120 dist/fused-moe ep check --ep 1 > "$OUT/ep.txt" 2>&1 || status=1
timeout 120 dist/fused-moe ep bench --ep 1 --batch-sizes 1,128,2048 >> "$OUT/ep.txt" 2>&1 || status=1
tail -25 "$OUT/ep.txt"
exit $status
