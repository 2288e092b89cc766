#!/usr/bin/env bash
# On the GPU machine: the full check of one preset (FUSED_MOE_CHECK_PRESET=PRESET) ROUNDS times with
# dist/fused-moe, and with dist-ab/fused-moe-old when present, for a failure seen once in a full check.
# Prints each round's summary and failures; outputs under $OUT: recheck-BIN-ROUND.txt.
source "$(dirname "$0")/device-env.sh"
for round in $(seq 1 ${ROUNDS:-2}); do
  for bin in dist/fused-moe dist-ab/fused-moe-old; do
    [[ -x $bin ]] || continue
    name=$(basename "$bin")
    FUSED_MOE_CHECK_PRESET=${PRESET:-dsv3_tp4} timeout 200 "$bin" check > "$OUT/recheck-$name-$round.txt" 2>&1 || status=1
    echo "$round $name: $(tail -1 "$OUT/recheck-$name-$round.txt")"
    grep -E "^FAIL" "$OUT/recheck-$name-$round.txt" | cut -c1-250 | head -5
  done
done
exit $status
