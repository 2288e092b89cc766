#!/usr/bin/env bash
# On the GPU machine: the v24 racecheck report of the block sync, taken apart (bench/NOTES.md v25).
# Steps, each into $OUT: the full check with the shipped default (check.txt, unless SKIP_CHECK=1); then
# compute-sanitizer racecheck on `check --small` per variant in VARIANTS (default "sync barrier"):
#   sync      the block sync on (FUSED_MOE_BLOCK_SYNC=1): each GEMM1 consumer warp counts itself
#   nopdl     the same with PDL off (kernels do not overlap)
#   barrier   the block sync on, v24's form: a barrier of GEMM1's consumers, then one count
#             (MOE_SM90_BLOCK_SYNC_PER_WARP=0)
#   off       the shipped default
# with DETAIL=1 each report lists its first hazards' threads and blocks (--racecheck-report hazard)
# (racecheck-VARIANT.txt, each under SANITIZER_TIMEOUT seconds, default 200); then the SASS of the
# instantiation v24 named, from the kernel cache, disassembled with the machine's own tools (sass-*.txt).
source "$(dirname "$0")/device-env.sh"
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
[[ ${SKIP_CHECK:-0} == 1 ]] || device_check ${CHECK_TIMEOUT:-200} "FAIL|block sync"
dist/fused-moe check --small --seed 1 > "$OUT/check-small.txt" 2>&1 || status=1   # compiles the default
tail -1 "$OUT/check-small.txt"
detail=(); [[ ${DETAIL:-0} == 1 ]] && detail=(--racecheck-report hazard --print-limit 6)
for variant in ${VARIANTS:-sync barrier}; do
  case $variant in
    nopdl) env=(FUSED_MOE_BLOCK_SYNC=1 FUSED_MOE_PDL=0) ;;
    barrier) env=(FUSED_MOE_BLOCK_SYNC=1 FUSED_MOE_KERNEL_DEFINES=MOE_SM90_BLOCK_SYNC_PER_WARP=0) ;;
    sync) env=(FUSED_MOE_BLOCK_SYNC=1) ;;
    off) env=() ;;
    *) echo "unknown variant $variant"; status=1; continue ;;
  esac
  start=$(date +%s)
  env "${env[@]}" timeout ${SANITIZER_TIMEOUT:-200} "$sanitizer" --tool racecheck "${detail[@]}" --error-exitcode 9 \
    dist/fused-moe check --small --seed 1 > "$OUT/racecheck-$variant.txt" 2>&1
  rc=$?
  echo "racecheck $variant exit $rc in $(( $(date +%s) - start )) s: $(grep -E 'RACECHECK SUMMARY' "$OUT/racecheck-$variant.txt" | tail -1)"
  grep -E "^(PASS|FAIL) gpu small" "$OUT/racecheck-$variant.txt" | grep -c PASS | sed 's/^/  small cases passed: /'
  grep -oE "Race reported between .{0,60}|\+0x[0-9a-f]+ \[[0-9]+ hazards\]" "$OUT/racecheck-$variant.txt" | sort | uniq -c | head -8
done
python3 - "$FUSED_MOE_CACHE_DIR" "$OUT" <<'PY'
import glob, os, struct, subprocess, sys
cache, out = sys.argv[1], sys.argv[2]
want = "moe_gemm_sm90_swapI8moe_bf16Li64ELi16ELi6ELi0ELb0ELi1E"
for i, path in enumerate(sorted(glob.glob(cache + "/*.cubin"))):
    data = open(path, "rb").read()
    if want.encode() not in data: continue
    off = 8; (mlen,) = struct.unpack_from("<Q", data, off); off += 8 + mlen
    (clen,) = struct.unpack_from("<Q", data, off); off += 8
    elf = f"/tmp/sass-{i}.cubin"; open(elf, "wb").write(data[off:off + clen])
    sass = subprocess.run(["/usr/local/cuda/bin/cuobjdump", "-sass", elf], capture_output=True, text=True).stdout
    blocks = sass.split("Function : ")
    for b in blocks:
        if b.startswith("_Z") and want in b.split("\n", 1)[0]:
            name = f"{out}/sass-{i}.txt"; open(name, "w").write(b)
            lines = b.splitlines()
            hits = [k for k, l in enumerate(lines) if "/*6840*/" in l]
            print(f"{os.path.basename(path)}: {len(lines)} lines of SASS -> {name}")
            for k in hits:
                print("\n".join(lines[max(0, k - 12):k + 6]))
PY
exit $status
