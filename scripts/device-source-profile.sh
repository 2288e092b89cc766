#!/usr/bin/env bash
# On the GPU machine: Nsight Compute's source-level view (warp-state samples per SASS instruction) of one
# kernel of one bench forward, to find where its warps wait. Arguments: LABEL REGEX BENCH-ARGS...
#   LABEL       names the outputs: $OUT/src-LABEL.ncu-rep (the report), $OUT/src-LABEL-sass.csv (per SASS
#               line: samples by stall reason), $OUT/src-LABEL.txt (the summary sections)
#   REGEX       the kernel, matched against its demangled name (ncu --kernel-name regex:...)
#   BENCH-ARGS  the arguments of `dist/fused-moe bench` (e.g. --plan-only --shape seed4096 --batch-sizes 1024)
# NCU_SKIP (default 2) launches of the kernel are skipped (the bench's correctness pass), one is profiled.
# The report and log are removed afterwards and the CSV gzipped (the device tool brings back a limited number
# of files) unless KEEP_REPORT=1.
# Clocks left alone (--clock-control none, METHOD.md). Prints the 25 SASS lines with the most samples.
source "$(dirname "$0")/device-env.sh"
label=$1; regex=$2; shift 2
timeout 300 ncu --clock-control none --kernel-name-base demangled --kernel-name "regex:$regex" \
  --launch-skip "${NCU_SKIP:-2}" --launch-count 1 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SourceCounters \
  --import-source no -f -o "$OUT/src-$label" dist/fused-moe bench "$@" > "$OUT/src-$label.log" 2>&1 || status=1
ncu -i "$OUT/src-$label.ncu-rep" > "$OUT/src-$label.txt" 2>&1 || status=1
ncu -i "$OUT/src-$label.ncu-rep" --page source --print-source sass --csv > "$OUT/src-$label-sass.csv" 2>&1 || status=1
grep -E "Duration|DRAM Throughput|Memory Throughput|Warp Cycles Per Issued|Stall" "$OUT/src-$label.txt" | cut -c1-150 | head -20
python3 - "$OUT/src-$label-sass.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1], errors="replace")))
head = next((i for i, r in enumerate(rows) if any("Source" == c.strip() for c in r)), None)
if head is None:
    print("no source table:", *rows[:5], sep="\n"); sys.exit(0)
cols = rows[head]
def col(name):
    return next((i for i, c in enumerate(cols) if c.strip() == name), None)
src, samp = col("Source"), col("Warp Stall Sampling (All Samples)")
if samp is None:
    print("columns:", cols); sys.exit(0)
body = [r for r in rows[head + 1:] if len(r) == len(cols)]
def num(x):
    try: return float(x.replace(",", ""))
    except ValueError: return 0.0
total = sum(num(r[samp]) for r in body) or 1.0
print(f"{len(body)} SASS lines, {total:.0f} samples")
for r in sorted(body, key=lambda r: -num(r[samp]))[:25]:
    print(f"{100 * num(r[samp]) / total:5.1f}%  {r[0]:>6}  {r[src].strip()[:110]}")
PY
if [[ ${KEEP_REPORT:-0} != 1 ]]; then
  rm -f "$OUT/src-$label.ncu-rep" "$OUT/src-$label.log"
  gzip -f "$OUT/src-$label-sass.csv"
fi
exit $status
