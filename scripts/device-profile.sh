#!/usr/bin/env bash
# On the GPU machine: Nsight Compute on the GEMM kernels of chosen (shape, M) forwards, to place the
# time inside them (tensor-pipe use, L2/DRAM throughput, warp stall reasons). Arguments: pairs
# SHAPE:M (default: the large-M rows furthest from their floor). Clocks left alone
# (--clock-control none, METHOD.md). One text report per pair under $OUT.
source "$(dirname "$0")/device-env.sh"
pairs=("$@")
[[ ${#pairs[@]} -gt 0 ]] || pairs=(mixtral_tp2:2048 seed4096:4096)
for pair in "${pairs[@]}"; do
  shape=${pair%%:*}; m=${pair##*:}
  # The bench's correctness pass and warm-up come first: skip into the timed launches.
  timeout 240 ncu --clock-control none --kernel-name regex:moe_gemm --launch-skip ${NCU_SKIP:-6} --launch-count ${NCU_COUNT:-2} \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy \
    dist/fused-moe bench --plan-only --shape "$shape" --batch-sizes "$m" > "$OUT/ncu-$shape-$m.txt" 2>&1 || status=1
  grep -E "moe_gemm|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|DRAM Throughput|Tensor|Stall|Warp Cycles Per Issued|Issued Ipc" "$OUT/ncu-$shape-$m.txt" | cut -c1-160 | head -60
done
exit $status
