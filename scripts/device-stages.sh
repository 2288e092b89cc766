#!/usr/bin/env bash
# On the GPU machine: per-stage times (bench --stages: one forward, events between the stages) of
# each setting, interleaved per row. Settings as in device-ab.sh: shipped, a variant of
# scripts/exp_tables.py (e.g. patch:FILE), X+define:D for kernels compiled with -D options, X+env:V
# for environment variables and X+args:A for more bench arguments.
# Outputs under $OUT: stages.txt. SETTINGS (default "shipped"), ROWS (default below), ROUNDS (1).
source "$(dirname "$0")/device-env.sh"
settings=${SETTINGS:-shipped}
for setting in $settings; do
  tables=$(tables_of "$setting")
  [[ $tables == shipped ]] || python3 scripts/exp_tables.py "$(table_dir "$tables")" "$tables" > /dev/null || status=1
done
rows=(${ROWS:-seed4096:4096 dsv3_tp4:8192 qwen235_tp2:2048})
for round in $(seq 1 ${ROUNDS:-1}); do
  for row in "${rows[@]}"; do
    for setting in $settings; do
      env=(FUSED_MOE_KERNEL_DEFINES="$(defines_of "$setting")" $(env_of "$setting")); tables=$(tables_of "$setting")
      [[ $tables == shipped ]] || env+=(FUSED_MOE_CONFIG_DIR=$(table_dir "$tables"))
      line=$(env "${env[@]}" timeout 100 dist/fused-moe bench --plan-only --stages --shape "${row%%:*}" $(args_of "$setting") \
        --batch-sizes "${row##*:}" 2>&1 | grep -E "stages:" | head -1) || status=1
      echo "$round $row ${setting##*/}: ${line## }" | tee -a "$OUT/stages.txt"
    done
  done
done
exit $status
