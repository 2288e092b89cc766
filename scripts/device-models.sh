#!/usr/bin/env bash
# On the GPU machine: the layer on the model shapes of bench/models (no tuned table: the Hopper
# heuristic's plans), each at MODEL_BATCHES (default 1,8,64,512,2048,8192), plan only.
# Outputs under $OUT: ceilings.json (measured unless present), models.txt (the tables), models-*.json.
# MODELS: "file:tp ..." (default: the six files of bench/models, the three largest at tp 8).
source "$(dirname "$0")/device-env.sh"
[[ -f $OUT/ceilings.json ]] || device_ceilings
models=${MODELS:-qwen3-30b-a3b.json:1 qwen1.5-moe-a2.7b.json:1 deepseek-v2-lite.json:1 mixtral-8x22b.json:8
        kimi-k2.json:8 qwen3-coder-480b-a35b.json:8}
for model in $models; do
  file=${model%%:*}; tp=${model##*:}
  echo "== ${file} tp=${tp}" >> "$OUT/models.txt"
  timeout ${MODEL_TIMEOUT:-150} dist/fused-moe bench --plan-only --model "bench/models/$file" --tp "$tp" \
    --batch-sizes "${MODEL_BATCHES:-1,8,64,512,2048,8192}" --ceilings "$OUT/ceilings.json" \
    --json "$OUT/models-${file%.json}-tp$tp.json" >> "$OUT/models.txt" 2> "$OUT/models-${file%.json}-tp$tp.log" || status=1
  grep "kernel programs ready" "$OUT/models-${file%.json}-tp$tp.log"
done
exit $status
