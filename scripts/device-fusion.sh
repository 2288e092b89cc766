#!/usr/bin/env bash
# On the GPU machine: the fused epilogues (activation in GEMM1, combine in GEMM2) and early PDL
# triggers. Mode `check` (default): ceilings, the full check, the shipped plans on all presets
# (bench --plan-only). Mode `ab`: the full check, then bench --fusion-ab (each fusion forced on and
# off) at decode and mid batch sizes. Mode `sanitize`: scripts/device-sanitize.sh. Outputs under $OUT.
set -uo pipefail
mode=${1:-check}
OUT=${OUT:-/tmp/fused-moe-out}
export FUSED_MOE_CACHE_DIR=${FUSED_MOE_CACHE_DIR:-/tmp/fused-moe-cache}
export FUSED_MOE_COMMIT=$(cat dist/COMMIT 2>/dev/null || echo unknown)
status=0
if [[ $mode == check || $mode == ab ]]; then
  python3 scripts/ceilings.py "$OUT/ceilings.json" || status=1
  timeout 200 dist/fused-moe check --json "$OUT/check.json" > "$OUT/check.txt" 2>&1 || status=1
  tail -1 "$OUT/check.txt"; grep -E "FAIL|✘" "$OUT/check.txt" | cut -c1-400 | head -20
fi
if [[ $mode == check ]]; then
  timeout 300 dist/fused-moe bench --plan-only --shape seed4096 --shape seed8192 --shape mixtral_tp2 --shape qwen235_tp2 \
    --shape dsv3_tp4 --ceilings "$OUT/ceilings.json" --json "$OUT/bench-presets.json" 2>"$OUT/bench-progress.txt" \
    > "$OUT/bench-presets.txt" || status=1
  tail -3 "$OUT/bench-progress.txt"
fi
if [[ $mode == ab ]]; then
  timeout 330 dist/fused-moe bench --plan-only --fusion-ab --shape seed4096 --shape qwen235_tp2 --shape dsv3_tp4 \
    --batch-sizes 1,4,8,16,32,128,1024 --ceilings "$OUT/ceilings.json" --json "$OUT/bench-ab.json" \
    2>"$OUT/bench-progress.txt" > "$OUT/bench-ab.txt" || status=1
  tail -3 "$OUT/bench-progress.txt"
fi
if [[ $mode == sanitize ]]; then
  bash scripts/device-sanitize.sh || status=1
fi
exit $status
