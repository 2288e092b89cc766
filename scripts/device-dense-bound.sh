#!/usr/bin/env bash
# On the GPU machine: PyTorch's products on the layer's shapes (scripts/dense_bound.py: cuBLAS dense and
# CUTLASS grouped GEMMs, the top-k sum as a batched product) and, in the same call, our stages on the
# same rows (bench --stages), so the two sets of GEMM times share a machine and a clock.
# Outputs under $OUT: dense-bound.json, dense-bound.txt, stages.txt. DENSE_ROWS: dense_bound.py's
# arguments (default its own rows); STAGE_ROWS: device-stages.sh's ROWS (default the same rows).
source "$(dirname "$0")/device-env.sh"
python3 scripts/dense_bound.py "$OUT/dense-bound.json" ${DENSE_ROWS:-} 2>&1 | tee "$OUT/dense-bound.txt"
[[ ${PIPESTATUS[0]} == 0 ]] || status=1
rows=${STAGE_ROWS:-"seed4096:1024 seed4096:2048 seed4096:4096 seed4096:8192 seed8192:1024 seed8192:2048 seed8192:4096 qwen235_tp2:1024 qwen235_tp2:2048 qwen235_tp2:4096 qwen235_tp2:8192 dsv3_tp4:1024 dsv3_tp4:2048 dsv3_tp4:4096 dsv3_tp4:8192 mixtral_tp2:512 mixtral_tp2:1024"}
ROWS="$rows" bash scripts/device-stages.sh || status=1
exit $status
