#!/usr/bin/env bash
# On the GPU machine: same-call A/B of binaries and config tables. The full check with dist/fused-moe,
# then the large-M rows of every preset under each setting, interleaved per shape:
#   old          dist-ab/fused-moe-old (a binary from before the change) with the shipped tables
#   shipped      dist/fused-moe with the shipped tables
#   VARIANT      dist/fused-moe with scripts/exp_tables.py's tables of that variant (groups, groups:1,
#                cluster, cluster-all, cluster-deep, deep, patch:FILE: see exp_tables.py)
#   X+define:D   setting X with the kernels compiled under FUSED_MOE_KERNEL_DEFINES="D" (D: NAME=VALUE
#                words joined by commas, e.g. shipped+define:MOE_SM90_EARLY_SCHEDULE=0)
#   X+env:V      setting X with the environment variables V (NAME=VALUE words joined by commas, e.g.
#                shipped+env:FUSED_MOE_SELF_ROUTE=0)
#   X+args:A     setting X with more bench arguments A (words joined by commas, e.g.
#                shipped+args:--combine,atomic); +define:, +env: and +args: combine in any order
# Outputs under $OUT: check.txt, ab.txt (one line per row and setting), ceilings.json.
# For "old": here, before rebuilding, mkdir -p dist-ab && cp dist/fused-moe dist-ab/fused-moe-old
# (ignored by git); then scripts/build-dist.sh and carry ["dist/fused-moe", "dist/COMMIT", "dist-ab"]
# (63 MB of 64 MiB). Otherwise carry ["dist"].
# SETTINGS (default "shipped cluster cluster-all"), ROUNDS (default 1), ROWS (default: below),
# SKIP_CHECK=1, CHECK_GREP (lines of the check to print besides FAIL; default "FAIL|cluster").
source "$(dirname "$0")/device-env.sh"
device_ceilings
if [[ ${SKIP_CHECK:-0} != 1 ]]; then
  device_check 300 "${CHECK_GREP:-FAIL|cluster}"
  # A failed or hung check: timing the kernels would say nothing (and a hang would eat the call).
  if [[ $status != 0 ]]; then echo "check failed: no A/B"; exit 1; fi
fi
settings=${SETTINGS:-shipped cluster cluster-all}
for setting in $settings; do
  tables=$(tables_of "$setting")
  [[ $tables == old || $tables == shipped ]] || python3 scripts/exp_tables.py "$(table_dir "$tables")" "$tables" > /dev/null || status=1
done
rows=(${ROWS:-mixtral_tp2:512,1024,2048,4096,8192 seed4096:1024,2048,4096,8192 seed8192:2048,4096,8192
      qwen235_tp2:1024,2048,4096,8192 dsv3_tp4:2048,4096,8192})
for round in $(seq 1 ${ROUNDS:-1}); do
  for row in "${rows[@]}"; do
    shape=${row%%:*}; ms=${row##*:}
    for setting in $settings; do
      bin=dist/fused-moe; env=(FUSED_MOE_KERNEL_DEFINES="$(defines_of "$setting")" $(env_of "$setting"))
      tables=$(tables_of "$setting")
      [[ $tables == old ]] && bin=dist-ab/fused-moe-old
      [[ $tables == old || $tables == shipped ]] || env+=(FUSED_MOE_CONFIG_DIR=$(table_dir "$tables"))
      env "${env[@]}" timeout 100 "$bin" bench --plan-only --shape "$shape" --batch-sizes "$ms" $(args_of "$setting") \
        --ceilings "$OUT/ceilings.json" --json "$(table_dir "ab-$round-$shape-$setting").json" > /dev/null 2>&1 || status=1
      python3 - "$round" "${setting##*/}" "$(table_dir "ab-$round-$shape-$setting").json" >> "$OUT/ab.txt" <<'PY'
import json, sys
rnd, setting, path = sys.argv[1:]
try:
    rows = json.load(open(path))["rows"]
except (OSError, ValueError, KeyError):
    print(f"{rnd} {setting}: no result ({path})")
    rows = []
for r in rows:
    # A diagnostic's wrong results can leave no finite error (rel_err null): the time still counts.
    err = f"{r['rel_err']:.2e}" if isinstance(r.get('rel_err'), (int, float)) else str(r.get('rel_err'))
    print(f"{rnd} {r['shape']:12} M={r['M']:5} {setting:22} {r['ms']:.4f} ms  floor {100 * r['floor_ms'] / r['ms']:.0f}%  "
          f"rel_err {err}  {r['variant']}")
PY
    done
  done
done
sort -k2,2 -k3,3 -k4,4 -s "$OUT/ab.txt" | cut -c1-180
exit $status
