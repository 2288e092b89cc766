#!/usr/bin/env bash
# On the GPU machine: the full check, the PR's table for the seed shapes (every split setting plus
# the shipped plan), the shipped plan for the other presets, the Python package against torch, and
# compute-sanitizer (memcheck, racecheck) on `check --small`. At most 8 files under $OUT: ceilings.json,
# check.txt, bench-seed.json, bench-presets.json, bench-torch.txt, check-small.txt, memcheck.txt,
# racecheck.txt (bench tables as text and check.json go to /tmp).
source "$(dirname "$0")/device-env.sh"
python3 scripts/ceilings.py "$OUT/ceilings.json"
dist/fused-moe check --json /tmp/check.json > "$OUT/check.txt" 2>&1 || status=1
tail -1 "$OUT/check.txt"; grep FAIL "$OUT/check.txt" | cut -c1-300 | head
dist/fused-moe bench --ceilings "$OUT/ceilings.json" --json "$OUT/bench-seed.json" 2>/dev/null > /tmp/bench-seed.txt || status=1
dist/fused-moe bench --plan-only --shape mixtral_tp2 --shape qwen235_tp2 --shape dsv3_tp4 --ceilings "$OUT/ceilings.json" \
  --json "$OUT/bench-presets.json" 2>/dev/null > /tmp/bench-presets.txt || status=1
FUSED_MOE_LIBRARY=dist/libFusedMoEC.so timeout 240 python3 -m pytest python/tests -q -x -p no:cacheprovider 2>&1 | tail -3 || status=1
FUSED_MOE_LIBRARY=dist/libFusedMoEC.so timeout 240 python3 python/bench_torch.py --tokens 1,8,128,1024,8192 > "$OUT/bench-torch.txt" 2>&1 || status=1
tail -12 "$OUT/bench-torch.txt"
SANITIZER_TIMEOUT=${SANITIZER_TIMEOUT:-150} bash scripts/device-sanitize.sh || status=1
exit $status
