#!/usr/bin/env bash
# On the GPU machine: tune the given shapes, then bench the tuned plans (plan only, with stage
# timings) reading the new tables through FUSED_MOE_CONFIG_DIR. Outputs under $OUT.
# Usage: scripts/device-tune.sh SHAPE... [-- extra bench args]; TUNE_ARGS (e.g. "--refine
# --batch-sizes 2048,4096") go to tune.
source "$(dirname "$0")/device-env.sh"
mkdir -p "$OUT/configs"
shapes=(); while [[ $# -gt 0 && $1 != -- ]]; do shapes+=(--shape "$1"); shift; done; [[ ${1:-} == -- ]] && shift
python3 scripts/ceilings.py "$OUT/ceilings.json"
dist/fused-moe tune "${shapes[@]}" ${TUNE_ARGS:-} --out "$OUT/configs.json" --sglang-dir "$OUT/configs" 2>"$OUT/tune.log" | tee "$OUT/tune.txt"
tail -3 "$OUT/tune.log"
FUSED_MOE_CONFIG_DIR="$OUT/configs" dist/fused-moe bench "${shapes[@]}" --plan-only --stages --ceilings "$OUT/ceilings.json" \
  --json "$OUT/bench-tuned.json" "$@" 2>"$OUT/bench-progress.txt" | tee "$OUT/bench-tuned.txt"
