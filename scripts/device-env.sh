# Sourced by the device scripts (bash): the common set-up on the GPU machine.
#   OUT                   where outputs go ($OUT from the device tool; /tmp/fused-moe-out otherwise)
#   FUSED_MOE_CACHE_DIR   the kernel cache (compiled programs are reused between invocations)
#   FUSED_MOE_COMMIT      the commit dist/ was built from (recorded in bench JSON)
#   status                0; the steps below set it to 1 when they fail, and the script exits with it
# device_ceilings: copy bandwidth and bf16 matrix rate into $OUT/ceilings.json.
# device_check SECONDS [GREP]: the full check into $OUT/check.txt under a timeout; prints its summary
#   and the lines matching FAIL (or GREP).
# device_smi_log FILE [MS]: nvidia-smi samples every MS milliseconds (default 100) into FILE in the
#   background, one CSV line each: timestamp, SM clock (MHz), power (W), temperature (C), throttle reasons
#   (SMI_FIELDS); prints the logger's pid (kill it when done).
# Settings of the A/B scripts, TABLES[+define:D][+env:V][+args:A] (device-ab.sh's header): tables_of,
#   defines_of, env_of and args_of split one; table_dir names a scratch folder for a table variant or an output.
set -uo pipefail
OUT=${OUT:-/tmp/fused-moe-out}
export FUSED_MOE_CACHE_DIR=${FUSED_MOE_CACHE_DIR:-/tmp/fused-moe-cache}
export FUSED_MOE_COMMIT=$(cat dist/COMMIT 2>/dev/null || echo unknown)
status=0

device_ceilings() {
  python3 scripts/ceilings.py "$OUT/ceilings.json" || status=1
}

device_check() {
  timeout "$1" dist/fused-moe check --json /tmp/check.json > "$OUT/check.txt" 2>&1 || status=1
  tail -1 "$OUT/check.txt"; grep -E "${2:-FAIL}" "$OUT/check.txt" | cut -c1-300 | head -20
}

# device_fit_out [FILE...]: the device tool brings back at most 8 files from $OUT. With more, every output
#   goes into $OUT/outputs.tar.gz, and the FILEs named (the first 7 that exist; default check.txt,
#   ceilings.json and the bench JSON/text of the presets) stay beside it as plain files; the rest are
#   removed from $OUT (they are in the archive). Call it last.
device_fit_out() {
  local count name wanted=("$@") keep=() spare=()
  count=$(find "$OUT" -type f | wc -l)
  (( count <= 8 )) && return 0
  tar -czf /tmp/fused-moe-outputs.tar.gz -C "$OUT" . || { status=1; return 1; }
  (( ${#wanted[@]} )) || wanted=(check.txt ceilings.json bench-presets.json bench-presets.txt)
  for name in "${wanted[@]}"; do [[ -f $OUT/$name && ${#keep[@]} -lt 7 ]] && keep+=("$name"); done
  for name in "${keep[@]}"; do spare+=(-not -name "$name"); done
  find "$OUT" -mindepth 1 -maxdepth 1 "${spare[@]}" -exec rm -rf {} +
  mv /tmp/fused-moe-outputs.tar.gz "$OUT/outputs.tar.gz"
  echo "device_fit_out: $count files under \$OUT: all in outputs.tar.gz; beside it: ${keep[*]}"
}

SMI_FIELDS=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active
device_smi_log() {
  nvidia-smi --query-gpu=$SMI_FIELDS --format=csv,noheader,nounits -lms "${2:-100}" > "$1" 2>/dev/null &
  echo $!
}

table_dir() { echo "/tmp/exp-${1//[:\/.]/_}"; }
tables_of() { echo "${1%%+*}"; }
# The part of a setting after +KEY: (up to the next +), commas as spaces.
part_of() { [[ $1 == *+$2:* ]] && { local rest=${1##*+$2:}; echo "${rest%%+*}" | tr , ' '; }; }
defines_of() { part_of "$1" define; }
env_of() { part_of "$1" env; }
args_of() { part_of "$1" args; }
