#!/usr/bin/env bash
# On the GPU machine: fp16 against bf16. The sustained 8192^3 matrix rate of each dtype (torch, the
# ceilings' protocol, three rounds interleaved: $OUT/matmul-rates.txt), then the layer's rows ROWS
# (default Mixtral 2048 and 4096, seed4096 4096) in each dtype, interleaved, ROUNDS rounds (default 2;
# $OUT/ab.txt), and bf16 once more with the kernels under FP16_AB_DEFINE (default
# MOE_SM90_SWAP_PAIRED_ACT=0: the fp32-staged epilogue that fp16 takes above 128 tokens).
source "$(dirname "$0")/device-env.sh"
device_ceilings
python3 - > "$OUT/matmul-rates.txt" 2>&1 <<'PY' || status=1
import sys
sys.path.insert(0, "scripts")
import torch
from ceilings import sustained_median_ms
n = 8192
for rnd in range(3):
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        ms = sustained_median_ms(lambda: torch.mm(a, b))
        print(f"round {rnd + 1} {str(dtype):15} {2 * n ** 3 / ms / 1e9:.0f} TFLOP/s sustained ({ms:.3f} ms)", flush=True)
PY
cat "$OUT/matmul-rates.txt"
for round in $(seq 1 ${ROUNDS:-2}); do
  for row in ${ROWS:-mixtral_tp2:2048,4096 seed4096:4096}; do
    for setting in bf16 fp16 bf16-staged; do
      dtype=${setting%%-*}; defines=""
      [[ $setting == bf16-staged ]] && defines=${FP16_AB_DEFINE:-MOE_SM90_SWAP_PAIRED_ACT=0}
      FUSED_MOE_KERNEL_DEFINES="$defines" timeout 120 dist/fused-moe bench --plan-only --dtype "$dtype" \
        --shape "${row%%:*}" --batch-sizes "${row##*:}" --ceilings "$OUT/ceilings.json" \
        --json "$OUT/ab-$round-${row%%:*}-$setting.json" > /dev/null 2>&1 || status=1
      python3 -c "
import json, sys
for r in json.load(open(sys.argv[1]))['rows']:
    print(sys.argv[2], r['shape'], r['M'], sys.argv[3], f\"{r['ms']:.4f} ms\", f\"{100 * r['floor_ms'] / r['ms']:.1f}%\", f\"rel_err {r['rel_err']:.2e}\")
" "$OUT/ab-$round-${row%%:*}-$setting.json" "$round" "$setting" >> "$OUT/ab.txt" || status=1
    done
  done
done
sort -k2,2 -k3,3n -k4,4 -k1,1n "$OUT/ab.txt"
exit $status
