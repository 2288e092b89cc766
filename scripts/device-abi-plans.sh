#!/usr/bin/env bash
# On the GPU machine: what the C ABI's per-run plans cost to make, and their GPU tests.
#   1. Each preset's layer (bf16, max_tokens MAX_TOKENS, default 8192) made through the Python package
#      on an empty kernel cache, then again on the warm one: seconds, plan_count, scratch MiB
#      ($OUT/abi-make.txt).
#   2. The Python GPU tests matching PYTEST_K (default: the per-run plans, the presets, graphs, k = 2)
#      ($OUT/pytest-gpu.txt).
# Carry ["dist/fused-moe", "dist/COMMIT", "dist/libFusedMoEC.so.gz"].
source "$(dirname "$0")/device-env.sh"
[[ -f dist/libFusedMoEC.so ]] || gunzip -kf dist/libFusedMoEC.so.gz
export FUSED_MOE_LIBRARY=dist/libFusedMoEC.so
export FUSED_MOE_CACHE_DIR=/tmp/fused-moe-abi-cache-$$
timeout ${MAKE_TIMEOUT:-300} python3 - "${MAX_TOKENS:-8192}" > "$OUT/abi-make.txt" 2>&1 <<'PY' || status=1
import sys, time
sys.path.insert(0, "python")
import torch, fused_moe
presets = {"seed4096": (128, 8, 4096, 384), "seed8192": (128, 8, 8192, 384), "mixtral_tp2": (8, 2, 4096, 7168),
           "qwen235_tp2": (128, 8, 4096, 768), "dsv3_tp4": (256, 8, 7168, 512)}
max_tokens = int(sys.argv[1])
for state in ["cold cache", "warm cache"]:
    for name, (e, k, h, i) in presets.items():
        start = time.time()
        layer = fused_moe.Layer(e, k, h, i, torch.bfloat16, max_tokens=max_tokens)
        seconds = time.time() - start
        print(f"{state} {name:12} max_tokens {max_tokens}: {seconds:6.1f} s, plan_count {layer.info['plan_count']}, "
              f"scratch {layer.info['scratch_bytes'] / 2**20:.1f} MiB", flush=True)
        layer.close()
PY
cat "$OUT/abi-make.txt"
timeout ${PYTEST_TIMEOUT:-250} python3 -m pytest python/tests/test_gpu.py -q -p no:cacheprovider \
  -k "${PYTEST_K:-each_batch or preset or graph or two_slots or chunks}" > "$OUT/pytest-gpu.txt" 2>&1 || status=1
tail -5 "$OUT/pytest-gpu.txt"
exit $status
