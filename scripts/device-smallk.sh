#!/usr/bin/env bash
# On the GPU machine (NOTES v38): the sum at k <= 2 in GEMM2 checked, then timed against the combine kernel.
#   1. check --small (the atomic and small-k cases: bit for bit the combine kernel's) -> check-small.txt
#   2. the full check narrowed to mixtral_tp2 (k = 2: every plan compared with the combine kernel) -> check-mixtral.txt
#      (MIXTRAL_CHECK=0 skips it)
#   3. python/tests/test_gpu.py -k "two_slots or atomic" against dist/libFusedMoEC.so -> pytest-gpu.txt
#   4. scripts/device-ab.sh (SKIP_CHECK=1): shipped against FUSED_MOE_SMALL_K_SUM=0, ROUNDS (default 2),
#      ROWS (default: Mixtral at every batch) -> ab.txt
# Carry ["dist/fused-moe", "dist/COMMIT", "dist/libFusedMoEC.so.gz"].
source "$(dirname "$0")/device-env.sh"
timeout ${SMALL_TIMEOUT:-150} dist/fused-moe check --small > "$OUT/check-small.txt" 2>&1 || status=1
tail -1 "$OUT/check-small.txt"; grep -E "FAIL|small-k|atomic" "$OUT/check-small.txt" | cut -c1-220 | head -40
if [[ ${MIXTRAL_CHECK:-1} != 0 ]]; then
  FUSED_MOE_CHECK_PRESET=mixtral_tp2 timeout ${MIXTRAL_TIMEOUT:-200} dist/fused-moe check > "$OUT/check-mixtral.txt" 2>&1 || status=1
  tail -1 "$OUT/check-mixtral.txt"; grep -E "FAIL" "$OUT/check-mixtral.txt" | cut -c1-300 | head -20
  grep -c "= with the combine kernel" "$OUT/check-mixtral.txt"
fi
[[ -f dist/libFusedMoEC.so ]] || gunzip -kf dist/libFusedMoEC.so.gz
FUSED_MOE_LIBRARY=dist/libFusedMoEC.so timeout 150 python3 -m pytest python/tests/test_gpu.py -q -p no:cacheprovider \
  -k "${PYTEST_K:-two_slots or atomic}" > "$OUT/pytest-gpu.txt" 2>&1 || status=1
tail -3 "$OUT/pytest-gpu.txt"
export SKIP_CHECK=1 ROUNDS=${ROUNDS:-2} SETTINGS=${SETTINGS:-"shipped shipped+env:FUSED_MOE_SMALL_K_SUM=0"}
export ROWS=${ROWS:-"mixtral_tp2:1,8,32,128,256,512,1024,2048,4096,8192"}
bash scripts/device-ab.sh || status=1
# A second A/B (SETTINGS2 on ROWS2), appended to ab.txt.
if [[ -n ${ROWS2:-} ]]; then SETTINGS=$SETTINGS2 ROWS=$ROWS2 bash scripts/device-ab.sh || status=1; fi
cat "$OUT/ab.txt"
exit $status
