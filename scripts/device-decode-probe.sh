#!/usr/bin/env bash
# On the GPU machine: where the memory-bound decode rows lose to the copy ceiling. The read bandwidth
# of the weight-streaming pattern (scripts/read_bandwidth.py), per-stage times of ROWS, and Nsight
# Compute's DRAM and L2 throughput of their two GEMMs (NCU_ROWS). Outputs under $OUT: read.txt,
# stages.txt, ncu-SHAPE-M.txt.
source "$(dirname "$0")/device-env.sh"
device_ceilings
timeout 120 python3 scripts/read_bandwidth.py 2>&1 | tee "$OUT/read.txt" || status=1
for row in ${ROWS:-mixtral_tp2:8 mixtral_tp2:512 dsv3_tp4:512 qwen235_tp2:8}; do
  line=$(timeout 100 dist/fused-moe bench --plan-only --stages --shape "${row%%:*}" --batch-sizes "${row##*:}" 2>&1 |
    grep -E "stages:" | head -1) || status=1
  echo "$row: ${line## }" | tee -a "$OUT/stages.txt"
done
for row in ${NCU_ROWS:-mixtral_tp2:8 dsv3_tp4:512}; do
  shape=${row%%:*}; m=${row##*:}
  timeout 200 ncu --clock-control none --kernel-name regex:moe_gemm --launch-skip ${NCU_SKIP:-6} --launch-count 2 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    dist/fused-moe bench --plan-only --shape "$shape" --batch-sizes "$m" > "$OUT/ncu-$shape-$m.txt" 2>&1 || status=1
  grep -E "moe_gemm|Duration|DRAM Throughput|Memory Throughput|L2 Cache Throughput|L2 Hit|Mem Busy|Max Bandwidth|Grid Size|Waves|Achieved Occupancy" \
    "$OUT/ncu-$shape-$m.txt" | cut -c1-150 | head -40
done
exit $status
