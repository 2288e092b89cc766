#!/usr/bin/env bash
# On the GPU machine (bench/NOTES.md v29): why the persistent GEMM1 with the activation fused streams its
# weights slower than without. Per-stage times of the fused and unfused layer (bench --fusion-ab --stages)
# under each MOE_SM90_FUSED_DIAG value in DIAGS (default "0 1 2 3"; 1-3 give wrong results: timing
# only), ROUNDS rounds (default 2), for the rows in ROWS (default seed4096:1024); then, unless
# PROFILE=0, the source-level profile of the fused and unfused GEMM1 kernel (device-source-profile.sh).
# Outputs under $OUT: diag.txt and the profiles.
source "$(dirname "$0")/device-env.sh"
for round in $(seq 1 "${ROUNDS:-2}"); do
  for row in ${ROWS:-seed4096:1024}; do
    for d in ${DIAGS:-0 1 2 3}; do
      FUSED_MOE_KERNEL_DEFINES="MOE_SM90_FUSED_DIAG=$d" timeout 150 dist/fused-moe bench --plan-only --fusion-ab \
        --stages --shape "${row%%:*}" --batch-sizes "${row##*:}" > /tmp/diag.txt 2>&1 || status=1
      grep -E "stages:|\] " /tmp/diag.txt | sed "s/^/$round $row diag $d: /" | cut -c1-220 | tee -a "$OUT/diag.txt"
    done
  done
done
if [[ ${PROFILE:-1} != 0 ]]; then
  row=${ROWS:-seed4096:1024}; row=${row%% *}
  args=(--plan-only --shape "${row%%:*}" --batch-sizes "${row##*:}")
  scripts/device-source-profile.sh fused 'persistent<moe_bf16.*\(bool\)0, \(int\)1, \(bool\)0' "${args[@]}" --fusion-ab || status=1
  scripts/device-source-profile.sh unfused 'persistent<moe_bf16, 128, 256, 4, 0, \(bool\)0, \(int\)0' "${args[@]}" || status=1
fi
exit $status
