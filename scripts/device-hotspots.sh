#!/usr/bin/env bash
# On the GPU machine: source-level profiles (scripts/device-source-profile.sh) of the GEMM kernels of the
# rows furthest from their floors, to look for instruction-level costs (slow-path calls, waits) the
# stage times cannot show (bench/NOTES.md v29 found one that way). Outputs under $OUT: src-*.
source "$(dirname "$0")/device-env.sh"
profile() { scripts/device-source-profile.sh "$@" || status=1; }
profile seed4096-4096-gemm1 'swap<moe_bf16.*\(bool\)0, \(int\)1>' --plan-only --shape seed4096 --batch-sizes 4096
profile seed4096-4096-gemm2 'persistent<moe_bf16.*\(bool\)1, \(int\)0' --plan-only --shape seed4096 --batch-sizes 4096
profile mixtral-512-gemm1 'swap<moe_bf16.*\(bool\)0, \(int\)1>' --plan-only --shape mixtral_tp2 --batch-sizes 512
profile mixtral-512-gemm2 'swap<moe_bf16.*\(bool\)1, \(int\)0>' --plan-only --shape mixtral_tp2 --batch-sizes 512
exit $status
