#!/usr/bin/env bash
# On the GPU machine: does where the weights (or a row's buffers) land move a row's time? (bench/NOTES.md
# v25: Mixtral 256 and 512 read 4-7% apart depending on the batch sizes one process ran.) For each pad in
# PADS (bytes; default 0, 1, 2, 4, 6, 8, 16 and 32 MiB), one `bench --plan-only` process per pad with
# FUSED_MOE_BENCH_WEIGHT_PAD_BYTES (KIND=weight, default) or FUSED_MOE_BENCH_PAD_BYTES (KIND=row) set,
# on SHAPE (default mixtral_tp2) at BATCHES (default 256,512); ROUNDS rounds (default 2).
# Output: $OUT/placement.txt, one line per row: round, pad, M, ms.
source "$(dirname "$0")/device-env.sh"
device_ceilings
case ${KIND:-weight} in
  weight) var=FUSED_MOE_BENCH_WEIGHT_PAD_BYTES ;;
  row) var=FUSED_MOE_BENCH_PAD_BYTES ;;
  *) echo "KIND: weight or row, got ${KIND}"; exit 2 ;;
esac
shape=${SHAPE:-mixtral_tp2}
for round in $(seq 1 ${ROUNDS:-2}); do
  for pad in ${PADS:-0 1048576 2097152 4194304 6291456 8388608 16777216 33554432}; do
    env $var=$pad timeout 60 dist/fused-moe bench --plan-only --shape "$shape" --batch-sizes "${BATCHES:-256,512}" \
      --ceilings "$OUT/ceilings.json" 2>/dev/null | awk -v r=$round -v p=$pad -v s="$shape" \
      '$1 == s { printf "%s %s pad %10d M=%5d %s ms\n", r, s, p, $2, $6 }' | tee -a "$OUT/placement.txt"
  done
done
[[ -s $OUT/placement.txt ]] || status=1
exit $status
