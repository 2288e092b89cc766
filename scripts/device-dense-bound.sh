#!/usr/bin/env bash
# On the GPU machine: PyTorch's products on the layer's shapes (scripts/dense_bound.py: cuBLAS dense and
# CUTLASS grouped GEMMs, the top-k sum as a batched product) and, in the same call, our stages on the
# same rows (bench --stages), so the two sets of GEMM times share a machine and a clock.
# Outputs under $OUT: dense-bound.json, dense-bound.txt, stages.txt. DENSE_ROWS: dense_bound.py's
# arguments (default its own rows); STAGE_ROWS: device-stages.sh's ROWS (default the rows dense_bound.py timed).
source "$(dirname "$0")/device-env.sh"
python3 scripts/dense_bound.py "$OUT/dense-bound.json" ${DENSE_ROWS:-} 2>&1 | tee "$OUT/dense-bound.txt"
[[ ${PIPESTATUS[0]} == 0 ]] || status=1
# The rows dense_bound.py timed, as SHAPE:M words.
rows=${STAGE_ROWS:-$(python3 -c "import json, sys; print(' '.join(f\"{r['shape']}:{r['M']}\" for r in json.load(open(sys.argv[1]))['rows']))" "$OUT/dense-bound.json")}
ROWS="$rows" bash scripts/device-stages.sh || status=1
exit $status
