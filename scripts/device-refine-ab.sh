#!/usr/bin/env bash
# On the GPU machine: `tune --refine` around the shipped plans for the rows ROWS (SHAPE:M,M,... words;
# default: the compute-bound large-M rows), merged into one tables file, then a same-call A/B of the
# shipped tables against those tables on the same rows (device-ab.sh, SETTINGS "shipped patch:FILE",
# ROUNDS rounds, default 2, no check). TUNE_ARGS go to every tune (session 21 ran it with "--sustain-ms 100").
# Outputs under $OUT: ceilings.json, refine.txt (the tuner's summaries), refined.json, ab.txt.
source "$(dirname "$0")/device-env.sh"
device_ceilings
rows=${ROWS:-mixtral_tp2:1024,2048,4096,8192 seed4096:4096,8192 seed8192:4096,8192 qwen235_tp2:4096,8192 dsv3_tp4:8192}
for row in $rows; do
  shape=${row%%:*}; ms=${row##*:}
  timeout ${TUNE_TIMEOUT:-150} dist/fused-moe tune --refine --shape "$shape" --batch-sizes "$ms" ${TUNE_ARGS:-} \
    --out "$OUT/refined.json" 2> "/tmp/refine-$shape.log" | tee -a "$OUT/refine.txt" || status=1
  tail -2 "/tmp/refine-$shape.log"
done
[[ -s $OUT/refined.json ]] || { echo "no refined tables"; exit 1; }
SKIP_CHECK=1 ROUNDS=${ROUNDS:-2} ROWS="$rows" SETTINGS="shipped patch:$OUT/refined.json" \
  bash "$(dirname "$0")/device-ab.sh" > /dev/null || status=1
sort -k2,2 -k3,3 -k4,4 -s "$OUT/ab.txt" | cut -c1-160
exit $status
