#!/usr/bin/env bash
# On the GPU machine: the full check (persistent kernel included); if it passes, re-tune the large
# batch sizes of seed4096 and mixtral_tp2 with the persistent candidates and bench the new tables.
source "$(dirname "$0")/device-env.sh"
mkdir -p "$OUT/configs"
dist/fused-moe check --json "$OUT/check.json" > "$OUT/check.txt" 2>&1
rc=$?; tail -1 "$OUT/check.txt"; grep FAIL "$OUT/check.txt" | head -20
[[ $rc == 0 ]] || exit 1
python3 scripts/ceilings.py "$OUT/ceilings.json"
dist/fused-moe tune --shape seed4096 --batch-sizes 512,1024,2048,4096,8192 --out "$OUT/configs-a.json" 2>"$OUT/tune-a.log" | tee "$OUT/tune-a.txt"
dist/fused-moe tune --shape mixtral_tp2 --batch-sizes 1024,2048,4096,8192 --out "$OUT/configs-b.json" 2>"$OUT/tune-b.log" | tee "$OUT/tune-b.txt"
