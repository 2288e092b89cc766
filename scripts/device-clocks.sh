#!/usr/bin/env bash
# On the GPU machine: the SM clock and power the card holds while it runs a row, against a dense bf16
# product run back to back (bench/NOTES.md v30: under load the H200 sits at its power cap). For each
# SHAPE:M in ROWS, RUNS `bench --plan-only` processes back to back with nvidia-smi sampling every 50 ms;
# summarized over the samples above 300 W and above 550 W (the timed replays; set-up draws less). Output: $OUT/clocks.txt.
source "$(dirname "$0")/device-env.sh"
device_ceilings
summary() {  # name, csv: median SM MHz, median and max power over the loaded samples
  python3 - "$1" "$2" <<'PY' | tee -a "$OUT/clocks.txt"
import statistics, sys
rows = []
for line in open(sys.argv[2]):
    parts = [p.strip() for p in line.split(",")]
    try:
        rows.append((float(parts[1]), float(parts[2]), parts[4]))  # SM MHz, W, throttle reasons
    except (IndexError, ValueError):
        pass
for floor in (300, 550):
    busy = [r for r in rows if r[1] > floor]
    if not busy:
        print(f"{sys.argv[1]:28s} > {floor} W: no samples ({len(rows)})")
        continue
    capped = sum(1 for r in busy if r[2].endswith("4"))
    print(f"{sys.argv[1]:28s} > {floor} W: {len(busy):4d} samples, SM MHz median {statistics.median(r[0] for r in busy):.0f} "
          f"(min {min(r[0] for r in busy):.0f}), power W median {statistics.median(r[1] for r in busy):.0f} "
          f"(max {max(r[1] for r in busy):.0f}), at the power cap {capped}")
PY
}
pid=$(device_smi_log /tmp/clocks-mm.csv 50)
python3 scripts/ceiling_sustain.py --windows 3 | tail -1 | tee -a "$OUT/clocks.txt"
kill $pid; summary "bf16 8192^3 back to back" /tmp/clocks-mm.csv
for row in ${ROWS:-mixtral_tp2:1024 mixtral_tp2:8192 seed4096:4096 qwen235_tp2:8192}; do
  shape=${row%%:*}; m=${row##*:}
  csv=/tmp/clocks-$shape-$m.csv
  pid=$(device_smi_log "$csv" 50)
  for run in $(seq 1 ${RUNS:-4}); do
    dist/fused-moe bench --plan-only --shape "$shape" --batch-sizes "$m" --ceilings "$OUT/ceilings.json" 2>/dev/null \
      | awk -v s="$shape" '$1 == s { printf "  %s M=%s %s ms %s%%\n", $1, $2, $6, $8 }' | tee -a "$OUT/clocks.txt"
  done
  kill $pid; summary "$shape M=$m" "$csv"
done
exit $status
