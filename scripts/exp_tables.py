#!/usr/bin/env python3
"""Writes experimental config tables (SGLang file format) into a folder, for A/B benches with
FUSED_MOE_CONFIG_DIR=<folder> against the shipped tables (Sources/MoEConfigs/configs.json).

Usage: python3 scripts/exp_tables.py OUT_DIR

Variants written (the rest of each table as shipped). Both were measured (bench/NOTES.md v8, v9)
and are now in the shipped tables, so today this reproduces them; it stays as the recipe for the
next A/B (edit the variants below):
  - E=128,N=384 and E=256,N=512 at M = 1: GEMM2 on the swap-AB wgmma kernel (16x128, 4 stages)
    instead of mma, so a one-token batch can skip align (identity routing needs both GEMMs on wgmma).
  - E=8,N=7168 at M = 1024 and 2048: GROUP_SIZE_M 4 (the m-blocks of one expert), so the programs
    reading one weight tile run together.
"""
import copy
import json
import os
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
tables = json.loads((root / "Sources" / "MoEConfigs" / "configs.json").read_text())
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
swap2 = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, "num_warps": 8,
         "num_stages": 4, "WARPS_M": 1, "KERNEL": "wgmma_swap", "SPLIT_K": 1, "SPLIT_MODE": "none"}
for name, table in tables.items():
    table = copy.deepcopy(table)
    if name.startswith(("E=128,N=384,", "E=256,N=512,")):
        entry = table["1"]
        assert entry["BLOCK_SIZE_M"] == 16, entry
        entry["GEMM2"] = dict(swap2)
    if name.startswith("E=8,N=7168,"):
        for m in ("1024", "2048"):
            table[m]["GROUP_SIZE_M"] = 4
            if "GEMM2" in table[m]:
                table[m]["GEMM2"]["GROUP_SIZE_M"] = 4
    (out / name).write_text(json.dumps(table, indent=1))
    print("wrote", out / name)
