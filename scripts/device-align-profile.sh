#!/usr/bin/env bash
# On the GPU machine: Nsight Compute on the align kernel of chosen (shape, M) forwards (duration,
# stall reasons), to see what align costs on the layer's critical path (bench/NOTES.md v21).
# Arguments: pairs SHAPE:M (default below). One text report per pair under $OUT; prints the summary.
source "$(dirname "$0")/device-env.sh"
pairs=("$@")
[[ ${#pairs[@]} -gt 0 ]] || pairs=(mixtral_tp2:8 seed4096:128 dsv3_tp4:512)
for pair in "${pairs[@]}"; do
  shape=${pair%%:*}; m=${pair##*:}
  timeout 200 ncu --clock-control none --kernel-name regex:moe_align --launch-skip ${NCU_SKIP:-2} --launch-count ${NCU_COUNT:-1} \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section LaunchStats \
    --section SourceCounters \
    dist/fused-moe bench --plan-only --shape "$shape" --batch-sizes "$m" > "$OUT/ncu-align-$shape-$m.txt" 2>&1 || status=1
  echo "== $pair"
  grep -E "moe_align|Duration|Elapsed Cycles|Stall|Warp Cycles Per Issued|Issued Ipc|Executed Instructions  " "$OUT/ncu-align-$shape-$m.txt" | cut -c1-160 | head -30
done
exit $status
