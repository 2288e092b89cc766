#!/usr/bin/env bash
# On the GPU machine: the fused epilogues (activation in GEMM1, combine in GEMM2) and early PDL
# triggers. Mode `check` (default): ceilings, the full check, the shipped plans on all presets
# (bench --plan-only). Mode `ab`: the full check, then bench --fusion-ab (each fusion forced on and
# off) at decode and mid batch sizes. Mode `decode`: the full check, then one-token batches on every
# preset with the shipped tables and with scripts/exp_tables.py's (swap-AB GEMM2 at M = 1, so align
# can be skipped), and Mixtral's GROUP_SIZE_M 4 at M = 1024, 2048. Mode `sanitize`:
# scripts/device-sanitize.sh. Mode `diag`: the full check, then the sanitizers. Mode `large`: kernel_check.py
# --quick and the full check (SKIP_CHECK=1: neither), then bench --fusion-ab on every preset from 512 tokens,
# ROUNDS times (default 2; ROWS as "shape:M,M ..." to choose; TABLES=VARIANT: scripts/exp_tables.py's
# tables of that variant, e.g. patch:FILE). Outputs under $OUT.
source "$(dirname "$0")/device-env.sh"
mode=${1:-check}
checks=1  # 0: `large` with SKIP_CHECK=1 (the ceilings alone before its A/B)
[[ $mode == large && ${SKIP_CHECK:-0} == 1 ]] && checks=0
if [[ $mode == large && $checks == 1 ]]; then
  PYTHONUNBUFFERED=1 timeout 300 python3 scripts/kernel_check.py --quick --json "$OUT/kernel-check.json" \
    > "$OUT/kernel-check.txt" 2>&1 || status=1
  tail -2 "$OUT/kernel-check.txt"; grep -E "FAIL" "$OUT/kernel-check.txt" | head -10
fi
if [[ $mode == check || $mode == ab || $mode == decode || $mode == diag || $mode == large ]]; then
  python3 scripts/ceilings.py "$OUT/ceilings.json" || status=1
fi
if [[ $checks == 1 && ( $mode == check || $mode == ab || $mode == decode || $mode == diag || $mode == large ) ]]; then
  timeout 200 dist/fused-moe check --json "$OUT/check.json" > "$OUT/check.txt" 2>&1 || status=1
  tail -1 "$OUT/check.txt"; grep -E "FAIL|✘" "$OUT/check.txt" | cut -c1-400 | head -20
fi
if [[ $mode == check ]]; then
  timeout 300 dist/fused-moe bench --plan-only --shape seed4096 --shape seed8192 --shape mixtral_tp2 --shape qwen235_tp2 \
    --shape dsv3_tp4 --ceilings "$OUT/ceilings.json" --json "$OUT/bench-presets.json" 2>"$OUT/bench-progress.txt" \
    > "$OUT/bench-presets.txt" || status=1
  tail -3 "$OUT/bench-progress.txt"
fi
if [[ $mode == ab ]]; then
  timeout 330 dist/fused-moe bench --plan-only --fusion-ab --shape seed4096 --shape qwen235_tp2 --shape dsv3_tp4 \
    --batch-sizes 1,4,8,16,32,128,1024 --ceilings "$OUT/ceilings.json" --json "$OUT/bench-ab.json" \
    2>"$OUT/bench-progress.txt" > "$OUT/bench-ab.txt" || status=1
  tail -3 "$OUT/bench-progress.txt"
fi
if [[ $mode == decode ]]; then
  bench=(dist/fused-moe bench --plan-only --ceilings "$OUT/ceilings.json")
  all=(--shape seed4096 --shape seed8192 --shape mixtral_tp2 --shape qwen235_tp2 --shape dsv3_tp4)
  timeout 150 "${bench[@]}" --fusion-ab "${all[@]}" --batch-sizes 1 2>/dev/null > "$OUT/decode-shipped.txt" || status=1
  python3 scripts/exp_tables.py /tmp/exp-tables > /dev/null
  FUSED_MOE_CONFIG_DIR=/tmp/exp-tables timeout 100 "${bench[@]}" --fusion-ab --shape seed4096 --shape dsv3_tp4 \
    --batch-sizes 1 2>/dev/null > "$OUT/decode-exp.txt" || status=1
  timeout 100 "${bench[@]}" --shape mixtral_tp2 --batch-sizes 1024,2048 2>/dev/null > "$OUT/mixtral-shipped.txt" || status=1
  FUSED_MOE_CONFIG_DIR=/tmp/exp-tables timeout 100 "${bench[@]}" --shape mixtral_tp2 --batch-sizes 1024,2048 \
    2>/dev/null > "$OUT/mixtral-group4.txt" || status=1
  tail -n +1 "$OUT"/decode-*.txt "$OUT"/mixtral-*.txt | cut -c1-150
fi
if [[ $mode == large ]]; then
  if [[ -n ${TABLES:-} ]]; then
    python3 scripts/exp_tables.py /tmp/fusion-tables "$TABLES" > /dev/null || status=1
    export FUSED_MOE_CONFIG_DIR=/tmp/fusion-tables
  fi
  rows=(${ROWS:-seed4096:512,1024,2048,4096,8192 seed8192:1024,2048,4096,8192 qwen235_tp2:1024,2048,4096,8192
        dsv3_tp4:1024,2048,4096,8192 mixtral_tp2:512,1024,2048,4096,8192})
  for round in $(seq 1 "${ROUNDS:-2}"); do
    for row in "${rows[@]}"; do
      timeout 200 dist/fused-moe bench --plan-only --fusion-ab --shape "${row%%:*}" --batch-sizes "${row##*:}" \
        --ceilings "$OUT/ceilings.json" 2>&1 >/dev/null | grep -E "^\[" | sed "s/^/$round /" | cut -c1-150 \
        | tee -a "$OUT/fusion-large.txt" || status=1
    done
  done
fi
if [[ $mode == sanitize || $mode == diag ]]; then
  bash scripts/device-sanitize.sh || status=1
fi
exit $status
