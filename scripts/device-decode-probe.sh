#!/usr/bin/env bash
# On the GPU machine: where the memory-bound decode rows lose to the copy ceiling. The read bandwidth
# of the weight-streaming pattern (scripts/read_bandwidth.py), then per-stage times of ROWS
# (scripts/device-stages.sh) and Nsight Compute on the GEMMs of NCU_ROWS (scripts/device-profile.sh).
# Outputs under $OUT: ceilings.json, read.txt, stages.txt, ncu-SHAPE-M.txt.
source "$(dirname "$0")/device-env.sh"
device_ceilings
timeout 120 python3 scripts/read_bandwidth.py 2>&1 | tee "$OUT/read.txt" || status=1
ROWS=${ROWS:-mixtral_tp2:8 mixtral_tp2:512 dsv3_tp4:512 qwen235_tp2:8} "$(dirname "$0")/device-stages.sh" || status=1
"$(dirname "$0")/device-profile.sh" ${NCU_ROWS:-mixtral_tp2:8 dsv3_tp4:512} || status=1
exit $status
