#!/usr/bin/env python3
"""Writes experimental config tables (SGLang file format) into a folder, for A/B benches with
FUSED_MOE_CONFIG_DIR=<folder> against the shipped tables (Sources/MoEConfigs/configs.json).

Usage: python3 scripts/exp_tables.py OUT_DIR [VARIANT]

Variants (the rest of each table as shipped; every change applies to GEMM1 and GEMM2 entries):
  groups[:CAP]  every wide wgmma entry (kernel wgmma or wgmma_persistent, BLOCK_SIZE_M >= 64) takes
                GROUP_SIZE_M = min(2 * ceil(rows per expert / BLOCK_SIZE_M), CAP) (CAP 32 by
                default; groups:1 gives every such entry group 1). NOTES v12; the shipped tables took
                it where it won.
  cluster       every wgmma entry (BLOCK_SIZE_M >= 64) whose experts get two or more m-blocks on
                average takes CLUSTER_M 2 with an even GROUP_SIZE_M >= 2 (Tuner.clusterAlternative's
                rule). NOTES v13.
  cluster-all   as cluster, and such wgmma_persistent entries become clustered wgmma entries too
                (same tile and ring).
  cluster-deep  as cluster, with the deepest ring of the tile (4 stages for 128x256).
  deep          every wgmma entry (BLOCK_SIZE_M >= 64) takes the deepest ring of its tile (NOTES v13:
                after the producer fix the consumers' remaining waits are load latency; the tables'
                3-stage 128x256 entries were chosen before it).
  streamk       every wgmma_persistent entry becomes wgmma_streamk (same tile and ring; a split entry
                loses its SPLIT_K: stream-K splits K itself). NOTES v17.
  streamk-all   as streamk, and every unclustered wide wgmma entry (BLOCK_SIZE_M >= 64) too, its ring
                cut to the deepest that fits the persistent kernel's shared memory.
  patch:FILE    merges FILE (JSON: {table file name: {batch size: {key: value, ..., "GEMM2": {...}}}})
                into the tables: the given keys replace the shipped ones; a GEMM2 object without
                one in the entry starts from a copy of the entry's GEMM1 keys.
A bare number is read as groups:NUMBER (the older command line).
"""
import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
tables = json.loads((root / "Sources" / "MoEConfigs" / "configs.json").read_text())
out = Path(sys.argv[1])
variant = sys.argv[2] if len(sys.argv) > 2 else "groups"
if variant.isdigit():
    variant = f"groups:{variant}"
kind, _, arg = variant.partition(":")
if kind not in ("groups", "cluster", "cluster-all", "cluster-deep", "deep", "streamk", "streamk-all", "patch"):
    sys.exit(f"exp_tables.py: unknown variant {variant!r} "
             "(groups[:CAP], cluster, cluster-all, cluster-deep, deep, streamk, streamk-all, patch:FILE)")
cap = int(arg) if arg and kind == "groups" else 32
patch = json.loads(Path(arg).read_text()) if kind == "patch" else {}
out.mkdir(parents=True, exist_ok=True)


def top_k(name):
    experts = int(name.split(",")[0].removeprefix("E="))
    return 2 if experts == 8 else 8, experts


def blocks_per_expert(entry, tokens, k, experts):
    rows = tokens * k // experts
    block_m = entry["BLOCK_SIZE_M"]
    return max((rows + block_m - 1) // block_m, 1)


def deepest_ring(entry, persistent=False):
    """moe_gemm_sm90's deepest ring: STAGES * 128 * (BM + BN) + 16 * STAGES + 8 * BM + 1024 <= 232448; the
    persistent kernel adds 256 * BM bytes of output staging."""
    bm, bn = entry["BLOCK_SIZE_M"], entry["BLOCK_SIZE_N"]
    staging = 256 * bm if persistent else 0
    return max(s for s in range(2, 9) if s * 128 * (bm + bn) + 16 * s + 8 * bm + staging + 1024 <= 232448)


def change(entry, tokens, k, experts):
    if kind == "patch":
        return
    if kind in ("streamk", "streamk-all"):
        kernel = entry.get("KERNEL")
        wide = kernel == "wgmma" and entry["BLOCK_SIZE_M"] >= 64 and entry.get("CLUSTER_M", 1) == 1
        if kernel == "wgmma_persistent" or (kind == "streamk-all" and wide):
            entry["KERNEL"] = "wgmma_streamk"
            entry["SPLIT_K"] = 1
            entry["SPLIT_MODE"] = "none"
            entry["num_stages"] = min(deepest_ring(entry, persistent=True), entry["num_stages"])
        return
    if kind == "deep":
        if entry.get("KERNEL") == "wgmma" and entry["BLOCK_SIZE_M"] >= 64:
            entry["num_stages"] = deepest_ring(entry)
        return
    if entry.get("KERNEL") not in ("wgmma", "wgmma_persistent") or entry["BLOCK_SIZE_M"] < 64:
        return
    blocks = blocks_per_expert(entry, tokens, k, experts)
    if kind == "groups":
        entry["GROUP_SIZE_M"] = min(2 * blocks, cap)
        return
    if blocks < 2 or (entry["KERNEL"] == "wgmma_persistent" and kind != "cluster-all"):
        return
    group = entry.get("GROUP_SIZE_M", 1)
    entry["KERNEL"] = "wgmma"
    entry["CLUSTER_M"] = 2
    entry["GROUP_SIZE_M"] = min(max(2, group + group % 2), 32)
    if kind == "cluster-deep":
        entry["num_stages"] = deepest_ring(entry)


for name, table in tables.items():
    k, experts = top_k(name)
    for m, entry in table.items():
        change(entry, int(m), k, experts)
        if "GEMM2" in entry:  # (without one, GEMM2 runs GEMM1's entry, group included)
            change(entry["GEMM2"], int(m), k, experts)
    for m, keys in patch.get(name, {}).items():
        entry = table.setdefault(m, {})
        for key, value in keys.items():
            if key == "GEMM2":
                second = entry.setdefault("GEMM2", {k: v for k, v in entry.items() if k != "GEMM2"})
                second.update(value)
            else:
                entry[key] = value
    (out / name).write_text(json.dumps(table, indent=1))
    print("wrote", out / name)
