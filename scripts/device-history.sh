#!/usr/bin/env bash
# On the GPU machine: does a row's time depend on what ran before it, and is that the card's clocks?
# (bench/NOTES.md v25 and v30: Mixtral 1024 read 0.638 ms alone under ncu, 0.71-0.74 in the tables.)
# Logs clocks, power, temperature and throttle reasons with nvidia-smi every 100 ms while it runs a
# sequence of `bench --plan-only` processes, each a phase: ROW alone (default mixtral_tp2:1024), the
# row's whole shape, the table's processes up to and including that shape, the row alone again.
# Output: $OUT/history.txt (per phase: the row's ms, then the clocks over the phase) and smi.csv.
source "$(dirname "$0")/device-env.sh"
device_ceilings
row=${ROW:-mixtral_tp2:1024}; shape=${row%%:*}; m=${row##*:}
smi="$OUT/smi.csv"
smi_pid=$(device_smi_log "$smi")
phase() {
  local name=$1; shift
  local start=$(date +%s.%N)
  timeout ${PHASE_TIMEOUT:-240} dist/fused-moe bench --plan-only --ceilings "$OUT/ceilings.json" "$@" 2>/dev/null \
    > "/tmp/phase-$name.txt" || status=1
  local end=$(date +%s.%N)
  echo "$name $start $end" >> /tmp/phases.txt
  awk -v n="$name" -v s="$shape" -v m="$m" '$1 == s && $2 == m { printf "%-12s %s M=%s %s ms %s%%\n", n, s, m, $6, $8 }' \
    "/tmp/phase-$name.txt" | tee -a "$OUT/history.txt"
}
: > /tmp/phases.txt
phase alone1 --shape "$shape" --batch-sizes "$m"
phase alone2 --shape "$shape" --batch-sizes "$m"
phase shape --shape "$shape"
phase table ${TABLE_SHAPES:---shape seed4096 --shape seed8192 --shape mixtral_tp2}
phase alone3 --shape "$shape" --batch-sizes "$m"
sleep ${COOL_SECONDS:-20}
phase alone4 --shape "$shape" --batch-sizes "$m"
kill $smi_pid 2>/dev/null
python3 - "$smi" /tmp/phases.txt <<'PY' | tee -a "$OUT/history.txt"
import sys, datetime, statistics
rows = []
for line in open(sys.argv[1]):
    parts = [p.strip() for p in line.split(",")]
    if len(parts) < 5: continue  # device_smi_log's fields: time, SM MHz, W, C, throttle reasons
    try:
        t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        rows.append((t, float(parts[1]), float(parts[2]), float(parts[3]), parts[4]))
    except ValueError:
        continue
print(f"{len(rows)} nvidia-smi samples")
for line in open(sys.argv[2]):
    name, start, end = line.split()
    inside = [r for r in rows if float(start) <= r[0] <= float(end)]
    busy = [r for r in inside if r[2] > 150]  # samples under load
    if not busy: print(f"{name:12s} no loaded samples ({len(inside)} in phase)"); continue
    reasons = sorted(set(r[4] for r in busy))
    print(f"{name:12s} loaded {len(busy):4d}: sm MHz median {statistics.median(r[1] for r in busy):.0f} "
          f"min {min(r[1] for r in busy):.0f}, power W median {statistics.median(r[2] for r in busy):.0f} "
          f"max {max(r[2] for r in busy):.0f}, temp C {min(r[3] for r in busy):.0f}-{max(r[3] for r in busy):.0f}, "
          f"throttle {','.join(reasons)}")
PY
exit $status
