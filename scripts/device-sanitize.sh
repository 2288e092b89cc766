#!/usr/bin/env bash
# On the GPU machine: `fused-moe check --small` (every kernel and plan kind on a small shape) under
# compute-sanitizer tools: TOOLS (default "memcheck racecheck synccheck"), each
# under SANITIZER_TIMEOUT seconds (default 280). Outputs under $OUT: check-small.txt, TOOL.txt.
source "$(dirname "$0")/device-env.sh"
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
dist/fused-moe check --small --seed 1 > "$OUT/check-small.txt" 2>&1 || status=1   # compiles, so the tools time kernels only
tail -1 "$OUT/check-small.txt"
for tool in ${TOOLS:-memcheck racecheck synccheck}; do
  timeout ${SANITIZER_TIMEOUT:-280} "$sanitizer" --tool $tool --error-exitcode 9 dist/fused-moe check --small --seed 1 > "$OUT/$tool.txt" 2>&1
  rc=$?; echo "$tool exit $rc"; [[ $rc == 0 ]] || status=1
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed, " "$OUT/$tool.txt" | tail -3
done
exit $status
