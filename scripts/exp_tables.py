#!/usr/bin/env python3
"""Writes experimental config tables (SGLang file format) into a folder, for A/B benches with
FUSED_MOE_CONFIG_DIR=<folder> against the shipped tables (Sources/MoEConfigs/configs.json).

Usage: python3 scripts/exp_tables.py OUT_DIR [CAP]

Variant written (the rest of each table as shipped; edit it for the next A/B): every wide wgmma
entry (kernel wgmma or wgmma_persistent, BLOCK_SIZE_M >= 64, GEMM1 and GEMM2) takes
GROUP_SIZE_M = min(2 * ceil(rows per expert / BLOCK_SIZE_M), CAP) (CAP 32 by default): the
wgmma kernels cut groups at expert boundaries (NOTES v12), so a group as long as an expert's
whole run reads each weight tile from HBM once (measured in NOTES v12: the shipped Mixtral rows
512, 2048-8192 took it; PlanSelector.groupSizeM(kernel: .wgmma) keeps 1 where an expert's tiles
fit in one wave). CAP 1 gives every such entry group 1. Earlier variants (M = 1 swap-AB GEMM2, Mixtral GROUP_SIZE_M 4: NOTES v8, v9) are in
the shipped tables.
"""
import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
tables = json.loads((root / "Sources" / "MoEConfigs" / "configs.json").read_text())
out = Path(sys.argv[1])
cap = int(sys.argv[2]) if len(sys.argv) > 2 else 32
out.mkdir(parents=True, exist_ok=True)


def top_k(name):
    experts = int(name.split(",")[0].removeprefix("E="))
    return 2 if experts == 8 else 8, experts


def group(entry, tokens, k, experts):
    if entry.get("KERNEL") not in ("wgmma", "wgmma_persistent") or entry["BLOCK_SIZE_M"] < 64:
        return
    rows = tokens * k // experts
    block_m = entry["BLOCK_SIZE_M"]
    entry["GROUP_SIZE_M"] = min(2 * max((rows + block_m - 1) // block_m, 1), cap)


for name, table in tables.items():
    k, experts = top_k(name)
    for m, entry in table.items():
        group(entry, int(m), k, experts)
        if "GEMM2" in entry:  # (without one, GEMM2 runs GEMM1's entry, group included)
            group(entry["GEMM2"], int(m), k, experts)
    (out / name).write_text(json.dumps(table, indent=1))
    print("wrote", out / name)
