#!/usr/bin/env bash
# On the GPU machine: same-call A/B of config-table folders on bench/models shapes (shapes without a
# shipped table, so an empty folder means the heuristic). MODELS "file:tp ..." (bench/models), DIRS
# (folders for FUSED_MOE_CONFIG_DIR; one holding no table for a shape gives the heuristic's plan),
# BATCHES (default 1), ROUNDS (default 2), ARGS (more bench arguments for every run, e.g. "--combine atomic").
# Output: $OUT/model-ab.txt (appended), one line per round, model, folder (and ARGS).
source "$(dirname "$0")/device-env.sh"
[[ -f $OUT/ceilings.json ]] || device_ceilings
for round in $(seq 1 ${ROUNDS:-2}); do
  for model in $MODELS; do
    file=${model%%:*}; tp=${model##*:}
    for dir in $DIRS; do
      FUSED_MOE_CONFIG_DIR=$dir timeout 100 dist/fused-moe bench --plan-only --model "bench/models/$file" --tp "$tp" \
        --batch-sizes "${BATCHES:-1}" ${ARGS:-} --ceilings "$OUT/ceilings.json" --json /tmp/model-ab.json > /dev/null 2>&1 || status=1
      python3 - "$round" "$file" "$dir${ARGS:+ $ARGS}" >> "$OUT/model-ab.txt" <<'PY'
import json, sys
rnd, file, folder = sys.argv[1:]
try:
    rows = json.load(open("/tmp/model-ab.json"))["rows"]
except (OSError, ValueError, KeyError):
    rows = []
    print(f"{rnd} {file} {folder}: no result")
for r in rows:
    print(f"{rnd} {file:28} M={r['M']:5} {folder:40} {r['ms']:.4f} ms  floor {100 * r['floor_ms'] / r['ms']:.0f}%  "
          f"rel_err {r['rel_err']:.2e}  {r['variant']} {r['split_mode']}")
PY
      rm -f /tmp/model-ab.json
    done
  done
done
cat "$OUT/model-ab.txt"
exit $status
