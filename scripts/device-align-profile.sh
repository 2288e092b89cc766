#!/usr/bin/env bash
# On the GPU machine: Nsight Compute on the align kernel of chosen (shape, M) forwards (duration,
# stall reasons, and with SASS=1 the instructions with the most stall samples), to see what align
# costs on the layer's critical path (bench/NOTES.md v21). Arguments: pairs SHAPE:M (default below).
# Self routing skips align: run with FUSED_MOE_SELF_ROUTE=0 where it would apply. One text report per
# pair under $OUT (and ncu-align-sass-SHAPE-M.csv with SASS=1); prints the summary. BIN: the binary
# (default dist/fused-moe); FUSED_MOE_KERNEL_DEFINES passes through. NCU_SKIP align launches are skipped
# (default 2), NCU_COUNT profiled (default 1): NCU_SKIP=3 NCU_COUNT=3 for the three launches of a batch
# above 8192 pairs.
source "$(dirname "$0")/device-env.sh"
pairs=("$@")
bin=${BIN:-dist/fused-moe}
[[ ${#pairs[@]} -gt 0 ]] || pairs=(mixtral_tp2:8 seed4096:128 dsv3_tp4:512)
for pair in "${pairs[@]}"; do
  shape=${pair%%:*}; m=${pair##*:}
  timeout 200 ncu --clock-control none --kernel-name regex:moe_align --launch-skip ${NCU_SKIP:-2} --launch-count ${NCU_COUNT:-1} \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section LaunchStats \
    --section SourceCounters \
    "$bin" bench --plan-only --shape "$shape" --batch-sizes "$m" > "$OUT/ncu-align-$shape-$m.txt" 2>&1 || status=1
  echo "== $pair"
  grep -E "moe_align|Duration|Elapsed Cycles|Stall|Warp Cycles Per Issued|Issued Ipc|Executed Instructions  " "$OUT/ncu-align-$shape-$m.txt" | cut -c1-160 | head -30
  if [[ ${SASS:-0} == 1 ]]; then
    csv="$OUT/ncu-align-sass-$shape-$m.csv"
    timeout 200 ncu --clock-control none --kernel-name regex:moe_align --launch-skip ${NCU_SKIP:-2} --launch-count 1 \
      --section SourceCounters --section WarpStateStats --warp-sampling-interval 0 --page source --print-source sass --csv \
      "$bin" bench --plan-only --shape "$shape" --batch-sizes "$m" > "$csv" 2>/dev/null || status=1
    python3 - "$csv" <<'PY'
import csv, sys
rows = list(csv.reader(l for l in open(sys.argv[1]) if l.count(",") > 3))
if not rows: sys.exit(print("no SASS rows"))
head = rows[0]
col = next((i for i, h in enumerate(head) if "Warp Stall Sampling (All" in h), None)
src = next((i for i, h in enumerate(head) if h.strip() == "Source"), 1)
addr = next((i for i, h in enumerate(head) if "Address" in h), 0)
if col is None: sys.exit(print("columns:", head[:12]))
def num(x):
    try: return float(x.replace(",", ""))
    except ValueError: return 0.0
body = [r for r in rows[1:] if len(r) > col]
total = sum(num(r[col]) for r in body) or 1
for r in sorted(body, key=lambda r: -num(r[col]))[:25]:
    print(f"{100 * num(r[col]) / total:5.1f}%  {r[addr]:>6}  {r[src][:110]}")
PY
  fi
done
exit $status
