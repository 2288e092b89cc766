#!/usr/bin/env bash
# On the GPU machine: expert-aligned tile groups (NOTES v12). The full check with dist/fused-moe,
# then the large-M rows of every preset, three settings in one call, interleaved per shape:
#   old      dist-ab/fused-moe-old (the binary before the change) with the shipped tables
#   new      dist/fused-moe with the shipped tables (their GROUP_SIZE_M, now cut at experts)
#   new-g    dist/fused-moe with scripts/exp_tables.py's GROUP_SIZE_M (2x the average run)
#   new-g1   dist/fused-moe with every wide wgmma entry at GROUP_SIZE_M 1 (exp_tables.py DIR 1)
# Outputs under $OUT: check.txt, ab.txt (one line per row and setting), ceilings.json.
# Here, before rebuilding: mkdir -p dist-ab && cp dist/fused-moe dist-ab/fused-moe-old (ignored by git);
# then scripts/build-dist.sh and carry ["dist/fused-moe", "dist/COMMIT", "dist-ab"] (63 MB of 64 MiB).
# ROUNDS (default 2), SETTINGS (default "old new new-g new-g1"), SKIP_CHECK=1.
source "$(dirname "$0")/device-env.sh"
device_ceilings
[[ ${SKIP_CHECK:-0} == 1 ]] || device_check 240 "FAIL|expert groups"
python3 scripts/exp_tables.py /tmp/exp-groups > /dev/null
python3 scripts/exp_tables.py /tmp/exp-groups1 1 > /dev/null
rows=(mixtral_tp2:512,1024,2048,4096,8192 seed4096:1024,2048,4096,8192 seed8192:2048,4096,8192
      qwen235_tp2:1024,2048,4096,8192 dsv3_tp4:2048,4096,8192)
for round in $(seq 1 ${ROUNDS:-2}); do
  for row in "${rows[@]}"; do
    shape=${row%%:*}; ms=${row##*:}
    for setting in ${SETTINGS:-old new new-g new-g1}; do
      bin=dist/fused-moe; env=()
      [[ $setting == old ]] && bin=dist-ab/fused-moe-old
      [[ $setting == new-g ]] && env=(FUSED_MOE_CONFIG_DIR=/tmp/exp-groups)
      [[ $setting == new-g1 ]] && env=(FUSED_MOE_CONFIG_DIR=/tmp/exp-groups1)
      env "${env[@]}" timeout 200 "$bin" bench --plan-only --shape "$shape" --batch-sizes "$ms" \
        --ceilings "$OUT/ceilings.json" --json "/tmp/ab-$round-$shape-$setting.json" > /dev/null 2>&1 || status=1
      python3 - "$round" "$setting" "/tmp/ab-$round-$shape-$setting.json" >> "$OUT/ab.txt" <<'PY'
import json, sys
rnd, setting, path = sys.argv[1:]
for r in json.load(open(path))["rows"]:
    print(f"{rnd} {r['shape']:12} M={r['M']:5} {setting:6} {r['ms']:.4f} ms  floor {100 * r['floor_ms'] / r['ms']:.0f}%  {r['variant']}")
PY
    done
  done
done
sort -k2,2 -k3,3 -k4,4 -s "$OUT/ab.txt" | cut -c1-120
exit $status
