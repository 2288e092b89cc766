#!/usr/bin/env bash
# On the GPU machine (NOTES v33): the full check with the A-resident walk storing from registers
# (MOE_SM90_A_RESIDENT_DIRECT=1) and 8 A slots (dsv3's K = 512 resident), on the shipped tables with dsv3
# 8192's GEMM2 on a 4-stage ring (bench/patches/s23-dsv3-gemm2-s4.json); then device-ab.sh's A/B of the
# shipped path against the direct store with 6 and with 8 slots, without the check (it ran here).
# Outputs under $OUT: check-direct.txt, ab.txt, ceilings.json.
source "$(dirname "$0")/device-env.sh"
patch=bench/patches/s23-dsv3-gemm2-s4.json
dir=$(table_dir "patch:$patch")
python3 scripts/exp_tables.py "$dir" "patch:$patch" > /dev/null || status=1
FUSED_MOE_CONFIG_DIR=$dir FUSED_MOE_KERNEL_DEFINES="MOE_SM90_A_RESIDENT_DIRECT=1 MOE_SM90_A_RESIDENT=8" \
  timeout ${CHECK_TIMEOUT:-300} dist/fused-moe check --json /tmp/check-direct.json > "$OUT/check-direct.txt" 2>&1 || status=1
tail -1 "$OUT/check-direct.txt"; grep -E FAIL "$OUT/check-direct.txt" | cut -c1-300 | head -20
[[ $status == 0 ]] || { echo "check failed: no A/B"; exit 1; }
SKIP_CHECK=1 ROUNDS=${ROUNDS:-2} SETTINGS="shipped shipped+define:MOE_SM90_A_RESIDENT_DIRECT=1 patch:$patch patch:$patch+define:MOE_SM90_A_RESIDENT_DIRECT=1,MOE_SM90_A_RESIDENT=8" \
  ROWS="${ROWS:-seed4096:1024,2048,4096,8192 seed8192:2048,4096 dsv3_tp4:2048,4096,8192}" \
  bash "$(dirname "$0")/device-ab.sh" | tail -80 || status=1
exit $status
