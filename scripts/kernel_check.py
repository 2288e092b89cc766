#!/usr/bin/env python3
"""GPU check of every MoE kernel against torch references.

Needs a CUDA GPU (sm_90 for the vector f32 reductions of split mode 1), torch with CUDA and
CuPy (cupy-cuda13x). Kernels are compiled by cupy.RawModule (NVRTC) from the sources in
Sources/MoEKernels, with moe_common.cuh pasted in place of its #include; CuPy adds the
-arch option of the current device (and -ftz=true) itself.

Every kernel argument goes through `launch`, which converts it by the kernel's declared
signature (pointers as np.uint64 of data_ptr(), int64 as np.int64, int32 as np.int32, float
as np.float32). torch and CuPy both use the legacy default stream here; launch also
synchronizes around each kernel. Outputs are poisoned (NaN, or 0x7f7f7f7f for int32)
before each run.

Prints `PASS name ...` / `FAIL name ...` per check and `N passed, M failed`; exit 1 on any
failure. --json FILE writes a summary. --quick runs a reduced matrix.

    python3 scripts/kernel_check.py [--quick] [--json out.json] [--only gemm,align,...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

try:
    import cupy as cp
except ImportError:  # pragma: no cover
    print("FAIL setup: cupy is not installed (pip install cupy-cuda13x)")
    print("0 passed, 1 failed")
    sys.exit(1)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nvrtc_compile_check import gemm_name, source_with_header  # noqa: E402

DEV = torch.device("cuda")
TORCH_DTYPE = {"moe_bf16": torch.bfloat16, "moe_fp16": torch.float16, "float": torch.float32}
# Relative spacing of the 16-bit formats (unit roundoff is half of it).
EPS = {"moe_bf16": 2.0**-7, "moe_fp16": 2.0**-10}
POISON_I32 = 0x7F7F7F7F

# Align decomposition constants (moe_align.cu).
ALIGN_CHUNK = 1024  # 256 threads x MOE_ALIGN_CHUNK_ITEMS (4)
ALIGN_CHUNK_THREADS = 256
ALIGN_SCAN_THREADS = 1024
ALIGN_SINGLE_THREADS = 512

# Kernel signatures: p = pointer, i64, i32, f32.
SIGNATURES = {
    "moe_align_single": "p i64 i32 i32 p p p p i64 i32 p p p i64 p i64 i64 i32",
    "moe_align_count": "p i64 i32 p",
    "moe_align_scan": "p i32 i64 i32 i32 p p p p i64 i32 p p p p i64",
    "moe_align_scatter": "p i64 i32 p p p p",
    "moe_topk_softmax": "p i64 i32 i32 i32 p p",
    "moe_gemm": "p p p p p p p i64 i64 i64 i32 i32 i32 i64 i64 i64 i64 i64",
    "moe_silu_and_mul": "p p i64 i64",
    "moe_gelu_and_mul": "p p i64 i64",
    "moe_combine": "p p i64 i32 i64 p",
    "moe_splitk_reduce": "p i64 i32 i64 i64 i64 p",
    "moe_cast_f32": "p p i64",
    "moe_reference_gemm1": "p p p i64 i32 i64 i64 i32 p",
    "moe_reference_gemm2": "p p p p i64 i32 i64 i64 p",
}

# MARK: - Compilation


class Kernels:
    """cupy.RawModule per (source file, group of name expressions), compiled on demand or in bulk."""

    OPTIONS = ("-std=c++17",)

    def __init__(self):
        self.modules: dict[tuple[str, tuple[str, ...]], object] = {}
        self.where: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.functions: dict[str, object] = {}
        self.smem_set: dict[str, int] = {}

    def register(self, cu: str, names: list[str]):
        key = (cu, tuple(names))
        if key in self.modules:
            return
        source = source_with_header(cu)
        templated = [n for n in names if "<" in n]
        kwargs = {"code": source, "options": self.OPTIONS}
        if templated:
            kwargs["name_expressions"] = templated
        self.modules[key] = cp.RawModule(**kwargs)
        for n in names:
            self.where.setdefault(n, key)

    def compile_all(self, jobs: int):
        """Compile every registered module; NVRTC releases the GIL, so threads overlap."""
        def build(key):
            mod = self.modules[key]
            try:
                if hasattr(mod, "compile"):
                    mod.compile()
                else:
                    mod.get_function(key[1][0])
                return key, None
            except Exception as e:  # reported per kernel later
                return key, e

        failed = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for key, err in pool.map(build, list(self.modules)):
                if err is not None:
                    failed.append(key)
        # Retry failures one at a time on a fresh module, in case threads were the problem.
        errors = {}
        for key in failed:
            cu, names = key
            del self.modules[key]
            self.register(cu, list(names))
            _, err = build(key)
            if err is not None:
                errors[key] = err
        return errors

    def get(self, name: str):
        fn = self.functions.get(name)
        if fn is None:
            key = self.where[name]
            fn = self.modules[key].get_function(name)
            self.functions[name] = fn
        return fn

    def set_smem(self, name: str, fn, nbytes: int):
        if self.smem_set.get(name, 0) >= nbytes:
            return
        try:
            fn.max_dynamic_shared_size_bytes = nbytes
        except Exception:
            handle = getattr(fn, "kernel", fn)
            cp.cuda.driver.funcSetAttribute(handle.ptr, 8, nbytes)  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        self.smem_set[name] = nbytes


KERNELS = Kernels()


def convert(kind: str, value):
    if kind == "p":
        if value is None:
            return np.uint64(0)
        if isinstance(value, torch.Tensor):
            assert value.is_cuda, "pointer argument must be a CUDA tensor"
            return np.uint64(value.data_ptr())
        raise TypeError(f"pointer argument must be a tensor or None, got {type(value)}")
    if kind == "i64":
        return np.int64(int(value))
    if kind == "i32":
        v = int(value)
        assert -(2**31) <= v < 2**31, f"int32 argument out of range: {v}"
        return np.int32(v)
    if kind == "f32":
        return np.float32(value)
    raise ValueError(kind)


def launch(name: str, grid, block: int, args: list, smem: int = 0):
    base = name.split("<")[0]
    kinds = SIGNATURES[base].split()
    assert len(kinds) == len(args), f"{base}: {len(args)} arguments for signature of {len(kinds)}"
    typed = tuple(convert(k, a) for k, a in zip(kinds, args))
    fn = KERNELS.get(name)
    if smem > 0:
        # The default limit is 48 KB less the kernel's static shared memory (moe_align_single: 39 KB of it,
        # so its staged launch of 47.5 KB failed with invalid argument until this was set for any size).
        KERNELS.set_smem(name, fn, smem)
    grid = tuple(int(g) for g in (grid if isinstance(grid, tuple) else (grid,)))
    assert all(g >= 1 for g in grid), f"empty grid {grid}"
    torch.cuda.synchronize()
    fn(grid, (int(block), 1, 1), typed, shared_mem=int(smem))
    cp.cuda.runtime.deviceSynchronize()


# MARK: - Reporting


class Report:
    def __init__(self):
        self.checks = []

    def add(self, name: str, ok: bool, detail: str = ""):
        ok = bool(ok)
        self.checks.append({"name": name, "ok": ok, "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'} {name} {detail}".rstrip(), flush=True)

    def guard(self, name: str, fn, *args, **kwargs):
        """Runs one check group; an exception is a failure of that group, not of the script."""
        try:
            fn(*args, **kwargs)
        except Exception as e:
            self.add(name, False, f"exception: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            traceback.print_exc(limit=4)

    @property
    def passed(self):
        return sum(c["ok"] for c in self.checks)

    @property
    def failed(self):
        return sum(not c["ok"] for c in self.checks)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    ref = ref.double()
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    if denom == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / denom


def rounding_ok(out: torch.Tensor, ref64: torch.Tensor, dtype: str, slack: float = 1.05,
                abs_tol: torch.Tensor | float = 0.0) -> tuple[bool, float]:
    """out (rounded once to dtype) is within half a unit of the dtype of the exact ref, with fp32 slack
    (abs_tol: the fp32 arithmetic's own error where it is not relative to the result, e.g. sums)."""
    o = out.double()
    tol = EPS[dtype] / 2 * ref64.abs() * slack + abs_tol + 1e-30
    if dtype == "moe_fp16":
        tol = tol + 2.0**-25  # subnormal spacing
    diff = (o - ref64).abs()
    finite = torch.isfinite(o).all().item()
    worst = (diff / tol).max().item() if diff.numel() else 0.0
    return bool(finite and worst <= 1.0), worst


def poison(shape, dtype) -> torch.Tensor:
    if dtype == torch.int32:
        return torch.full(shape, POISON_I32, dtype=torch.int32, device=DEV)
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


# MARK: - Align


def align_reference(topk_ids: torch.Tensor, E: int, block_m: int, expert_map: torch.Tensor | None):
    flat = topk_ids.flatten().long()
    numel = flat.numel()
    max_padded = numel + E * (block_m - 1)
    max_blocks = (max_padded + block_m - 1) // block_m
    valid = (flat >= 0) & (flat < E)
    key = torch.where(valid, flat, torch.full_like(flat, E))
    order = torch.sort(key, stable=True).indices
    n_valid = int(valid.sum().item())
    pairs = order[:n_valid]
    experts = key[pairs]
    counts = torch.bincount(flat[valid], minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.cumsum(padded, 0) - padded
    count_starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n_valid, device=DEV) - count_starts[experts]
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int64, device=DEV)
    sorted_ids[offsets[experts] + rank] = pairs
    total = int(padded.sum().item())
    expert_ids = torch.full((max_blocks,), -1, dtype=torch.int64, device=DEV)
    block_expert = torch.repeat_interleave(torch.arange(E, device=DEV), padded // block_m)
    if expert_map is not None:
        block_expert = expert_map.long()[block_expert]
    expert_ids[: total // block_m] = block_expert
    return sorted_ids.int(), expert_ids.int(), total


def run_align(topk_ids: torch.Tensor, E: int, block_m: int, expert_map=None, path: str = "auto"):
    """Our align; returns (sorted_ids, expert_ids, total_padded tensor, max_padded)."""
    numel = topk_ids.numel()
    max_padded = numel + E * (block_m - 1)
    max_blocks = (max_padded + block_m - 1) // block_m
    sorted_ids = poison((max_padded,), torch.int32)
    expert_ids = poison((max_blocks,), torch.int32)
    total = poison((1,), torch.int32)
    ids = topk_ids.contiguous()
    if path == "auto":
        path = "single" if numel <= 8192 else "chunked"
    if path in ("single", "single-staged"):
        # single-staged: the runs staged in dynamic shared memory (as the layer launches it where they fit)
        smem = min((max_padded * 4 + 15) // 16 * 16, 160 * 1024) if path == "single-staged" else 0
        launch("moe_align_single", 1, ALIGN_SINGLE_THREADS,
               [ids, numel, E, block_m, expert_map, sorted_ids, expert_ids, total, max_padded,
                0, None, None, None, 0, None, 0, 0, 0], smem=smem)  # one layout (block_m2 = 0), no prefetch
    else:
        chunks = max(1, (numel + ALIGN_CHUNK - 1) // ALIGN_CHUNK)
        scratch = poison((chunks * E,), torch.int32)  # needs no zeroing
        launch("moe_align_count", chunks, ALIGN_CHUNK_THREADS, [ids, numel, E, scratch])
        launch("moe_align_scan", 1, ALIGN_SCAN_THREADS,
               [scratch, chunks, numel, E, block_m, expert_map, sorted_ids, expert_ids, total, max_padded,
                0, None, None, None, None, 0])
        launch("moe_align_scatter", chunks, ALIGN_CHUNK_THREADS, [ids, numel, E, scratch, sorted_ids, None, None])
    return sorted_ids, expert_ids, total, max_padded


def check_align(rep: Report, quick: bool):
    # The documented example, both paths.
    ids = torch.tensor([[2, 3, 4], [1, 2, 4], [1, 3, 4], [1, 2, 3]], dtype=torch.int32, device=DEV)
    want_sorted = [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    for path in ("single", "single-staged", "chunked"):
        s, e, t, max_padded = run_align(ids, 5, 4, path=path)
        tail = [12] * (max_padded - 16)
        ok = (s.tolist() == want_sorted + tail and e.tolist()[:4] == [1, 2, 3, 4]
              and all(v == -1 for v in e.tolist()[4:]) and t.item() == 16)
        rep.add(f"align.example.{path}", ok, f"sorted={s.tolist()[:16]} experts={e.tolist()[:4]} total={t.item()}")

    gen = torch.Generator(device=DEV).manual_seed(1234)
    cases = []  # (label, numel, E, block_m, kind)
    sizes = [1, 7, 100, 4095, 4097, 8192, 20000, 1 << 20] if not quick else [7, 4097, 20000, 1 << 18]
    for E in (128, 256, 512):
        for numel in sizes:
            block_m = (16, 64, 128)[(numel + E) % 3]
            cases.append((f"E{E}.n{numel}.bm{block_m}", numel, E, block_m, "uniform"))
    cases.append(("E256.n300000.bm64.skewed", 300000, 256, 64, "skewed"))
    cases.append(("E8.n50000.bm256.invalid", 50000, 8, 256, "invalid"))
    cases.append(("E256.n6000.bm64.skewed", 6000, 256, 64, "skewed"))  # <= 8192: the one-launch kernel too
    cases.append(("E8.n5000.bm16.invalid", 5000, 8, 16, "invalid"))
    cases.append(("E512.n1000.bm1.uniform", 1000, 512, 1, "uniform"))
    for label, numel, E, block_m, kind in cases:
        if kind == "skewed":  # most pairs on one expert: heavy collisions in the warp ranking
            ids = torch.where(torch.rand(numel, generator=gen, device=DEV) < 0.9,
                              torch.full((numel,), 3, device=DEV, dtype=torch.int64),
                              torch.randint(0, E, (numel,), generator=gen, device=DEV))
        elif kind == "invalid":  # ids outside [0, E) are ignored
            ids = torch.randint(-2, E + 3, (numel,), generator=gen, device=DEV)
        else:
            ids = torch.randint(0, E, (numel,), generator=gen, device=DEV)
        ids = ids.int()
        want_s, want_e, want_t = align_reference(ids, E, block_m, None)
        paths = ["chunked"] + (["single", "single-staged"] if numel <= 8192 else [])  # single traps above 8192
        for path in paths:
            s, e, t, _ = run_align(ids, E, block_m, path=path)
            ok = torch.equal(s, want_s) and torch.equal(e, want_e) and t.item() == want_t
            bad = int((s != want_s).sum().item()) + int((e != want_e).sum().item())
            rep.add(f"align.{label}.{path}", ok, f"total={t.item()} want={want_t} mismatches={bad}")

    # Expert map: odd experts are not owned (-1), even ones map to e // 2.
    E = 64
    expert_map = torch.where(torch.arange(E, device=DEV) % 2 == 0, torch.arange(E, device=DEV) // 2,
                             torch.full((E,), -1, device=DEV)).int()
    ids = torch.randint(0, E, (1000 * 8,), generator=gen, device=DEV).int()  # <= 8192: every path
    want_s, want_e, want_t = align_reference(ids, E, 16, expert_map)
    for path in ("single", "single-staged", "chunked"):
        s, e, t, _ = run_align(ids, E, 16, expert_map=expert_map, path=path)
        ok = torch.equal(s, want_s) and torch.equal(e, want_e) and t.item() == want_t
        rep.add(f"align.expert_map.{path}", ok, f"total={t.item()} want={want_t}")


# MARK: - Top-k softmax


def check_topk(rep: Report, quick: bool):
    gen = torch.Generator(device=DEV).manual_seed(99)
    configs = [(1, 8, 2), (33, 60, 4), (1000, 128, 8), (257, 256, 8), (100, 512, 32), (4000, 512, 8), (50, 32, 32)]
    if quick:
        configs = [(33, 60, 4), (1000, 128, 8), (100, 512, 32)]
    for tname in ("moe_bf16", "moe_fp16", "float"):
        for M, E, k in configs:
            for renorm in (0, 1):
                # Distinct logits i/8 (exact in bf16 and fp16): no ties after the softmax.
                perm = torch.argsort(torch.rand(M, E, generator=gen, device=DEV), dim=1)
                logits = ((perm - E // 2).float() / 8).to(TORCH_DTYPE[tname])
                probs = torch.softmax(logits.float(), dim=-1)
                ref_w, ref_ids = probs.topk(k, dim=-1)
                if renorm:
                    ref_w = ref_w / ref_w.sum(-1, keepdim=True)
                ids = poison((M, k), torch.int32)
                w = poison((M, k), torch.float32)
                grid = max(1, (M + 3) // 4) if M < 1000 else 7  # also exercise the token stride
                launch(f"moe_topk_softmax<{tname}>", grid, 128, [logits, M, E, k, renorm, ids, w])
                ids_ok = torch.equal(ids.long(), ref_ids)
                w_err = (w - ref_w).abs().max().item()
                rep.add(f"topk.{tname}.M{M}.E{E}.k{k}.renorm{renorm}", ids_ok and w_err <= 1e-5,
                        f"ids_equal={ids_ok} max_weight_err={w_err:.2e}")
        # Ties: equal logits pick the lowest expert indices first.
        M, E, k = 5, 64, 8
        logits = torch.zeros(M, E, device=DEV).to(TORCH_DTYPE[tname])
        ids = poison((M, k), torch.int32)
        w = poison((M, k), torch.float32)
        launch(f"moe_topk_softmax<{tname}>", 2, 128, [logits, M, E, k, 0, ids, w])
        ok = ids.tolist() == [list(range(k))] * M and (w - 1.0 / E).abs().max().item() <= 1e-7
        rep.add(f"topk.{tname}.ties", ok, f"ids[0]={ids[0].tolist()}")


# MARK: - GEMM

# (BLOCK_M, BLOCK_N, BLOCK_K, WARPS_M, WARPS_N, STAGES)
TILES_BF16 = [(16, 64, 64, 1, 4, 4), (32, 128, 64, 2, 2, 3), (64, 128, 64, 2, 4, 3), (128, 128, 64, 2, 4, 3),
              (128, 256, 64, 2, 4, 3), (16, 32, 32, 1, 4, 2), (128, 128, 32, 2, 4, 2)]
TILES_FP16 = [(16, 64, 64, 1, 4, 4), (64, 128, 64, 2, 4, 3)]
TILES_BF16_QUICK = [(16, 64, 64, 1, 4, 4), (64, 128, 64, 2, 4, 3), (128, 128, 32, 2, 4, 2)]
TILES_FP16_QUICK = [(16, 64, 64, 1, 4, 4)]
MODE_SPLITS = [(0, 1), (1, 1), (1, 2), (1, 4), (1, 8), (2, 1), (2, 2), (2, 4), (2, 8)]
MODE_SPLITS_QUICK = [(0, 1), (1, 4), (2, 1), (2, 4)]


def gemm_smem(tile) -> int:
    bm, bn, bk, _, _, st = tile
    return st * (bm + bn) * (bk + 8) * 2


def gemm_threads(tile) -> int:
    return tile[3] * tile[4] * 32


class Problem:
    """One MoE shape with inputs and fp32 references of both GEMMs."""

    def __init__(self, name, E, k, M, H, I, dtype, seed, expert_map=None):
        self.name, self.k, self.M, self.H, self.I, self.dtype = name, k, M, H, I, dtype
        td = TORCH_DTYPE[dtype]
        gen = torch.Generator(device=DEV).manual_seed(seed)
        self.E_global = E
        self.expert_map = expert_map
        self.E_local = E if expert_map is None else int((expert_map >= 0).sum().item())
        self.x = torch.randn(M, H, generator=gen, device=DEV).to(td)
        self.topk_ids = torch.rand(M, E, generator=gen, device=DEV).topk(k, dim=-1).indices.int().contiguous()
        self.topk_weights = torch.rand(M, k, generator=gen, device=DEV).float().contiguous()
        self.w1 = (torch.randn(self.E_local, 2 * I, H, generator=gen, device=DEV) / math.sqrt(H)).to(td)
        self.w2 = (torch.randn(self.E_local, H, I, generator=gen, device=DEV) / math.sqrt(I)).to(td)
        self.inter2 = torch.randn(M * k, I, generator=gen, device=DEV).to(td)  # GEMM2 input, independent of GEMM1
        flat = self.topk_ids.flatten().long()
        self.local = flat if expert_map is None else expert_map.long()[flat]
        self.not_owned = (self.local < 0).nonzero().squeeze(1)
        self.ref1 = torch.zeros(M * k, 2 * I, device=DEV)
        self.ref2 = torch.zeros(M * k, H, device=DEV)
        for e in self.local.unique().tolist():
            if e < 0:
                continue
            rows = (self.local == e).nonzero().squeeze(1)
            self.ref1[rows] = self.x[rows // k].float() @ self.w1[e].float().t()
            self.ref2[rows] = (self.inter2[rows].float() @ self.w2[e].float().t()) * self.topk_weights.flatten()[rows, None]
        self.aligned = {}

    def align(self, block_m):
        if block_m not in self.aligned:
            self.aligned[block_m] = run_align(self.topk_ids, self.E_global, block_m, self.expert_map)
        return self.aligned[block_m]

    def gemm_inputs(self, which):
        """(A, B, top_k, N, K, mul, reference) of GEMM1 or GEMM2."""
        if which == 1:
            return self.x, self.w1, self.k, 2 * self.I, self.H, False, self.ref1
        return self.inter2, self.w2, 1, self.H, self.I, True, self.ref2


def run_gemm(p: Problem, which: int, tile, mode: int, split_k: int, group_m: int):
    """Returns the GEMM result as fp32 [M*k, N] (mode 1: the fp32 buffer; mode 2: reduced to T)
    plus, for mode 2, the raw workspace."""
    A, B, top_k, N, K, mul, _ = p.gemm_inputs(which)
    bm, bn = tile[0], tile[1]
    sorted_ids, expert_ids, total, max_padded = p.align(bm)
    rows = p.M * p.k
    td = TORCH_DTYPE[p.dtype]
    name = gemm_name(p.dtype, tile, mode, mul)
    if mode == 0:
        C = poison((rows, N), td)
    elif mode == 1:
        C = torch.zeros(rows, N, dtype=torch.float32, device=DEV)
    else:
        C = poison((split_k, rows, N), torch.float32)
    grid = ((max_padded + bm - 1) // bm * ((N + bn - 1) // bn), split_k)
    launch(name, grid, gemm_threads(tile),
           [A, B, C, p.topk_weights, sorted_ids, expert_ids, total, N, K, rows, top_k, split_k, group_m,
            A.stride(0), B.stride(0), B.stride(1), N, max_padded], smem=gemm_smem(tile))
    if mode == 0:
        return C.float(), None
    if mode == 1:
        return C, None
    out = poison((rows, N), td)
    launch(f"moe_splitk_reduce<{p.dtype}>", elementwise_grid(rows * N, 4), 256,
           [C, rows * N, split_k, rows, N, N, out])
    return out.float(), C


def check_gemm_problem(rep: Report, p: Problem, tiles, mode_splits):
    for which in (1, 2):
        ref = p.gemm_inputs(which)[6]
        for ti, tile in enumerate(tiles):
            worst = 0.0
            problems = []
            for ci, (mode, split_k) in enumerate(mode_splits):
                group_m = (1, 4, 16)[(ti + ci) % 3]
                out, ws = run_gemm(p, which, tile, mode, split_k, group_m)
                err = rel_err(out, ref)
                worst = max(worst, err) if not math.isnan(err) else float("nan")
                if not err < 1e-2:
                    problems.append(f"mode{mode}/split{split_k}: rel_err={err:.3g}")
                if p.not_owned.numel() and out[p.not_owned].abs().max().item() != 0.0:
                    problems.append(f"mode{mode}/split{split_k}: rows of experts not owned are not zero")
                if mode == 2:
                    out2, ws2 = run_gemm(p, which, tile, mode, split_k, group_m)
                    if not (torch.equal(ws.view(torch.int32), ws2.view(torch.int32))
                            and torch.equal(out.view(torch.int32), out2.view(torch.int32))):
                        problems.append(f"mode2/split{split_k}: not bitwise reproducible")
            label = "x".join(map(str, tile[:3])) + f".w{tile[3]}x{tile[4]}.s{tile[5]}"
            rep.add(f"gemm{which}.{p.name}.{p.dtype}.{label}", not problems,
                    f"max_rel_err={worst:.2e} over {len(mode_splits)} mode/split" + ("; " + "; ".join(problems) if problems else ""))


def make_problems(dtype: str, quick: bool):
    emap = torch.where(torch.arange(32, device=DEV) % 2 == 0, torch.arange(32, device=DEV) // 2,
                       torch.full((32,), -1, device=DEV)).int()
    specs = [  # name, E, k, M, H, I, map
        ("E8.k2.M7", 8, 2, 7, 4096, 384, None),
        ("E128.k8.M1", 128, 8, 1, 4096, 384, None),
        ("E128.k8.M128", 128, 8, 128, 4096, 384, None),
        ("E64.k8.M1000", 64, 8, 1000, 4096, 384, None),
        ("E32map.k4.M64", 32, 4, 64, 1024, 256, emap),
        ("E4.k2.M33.odd", 4, 2, 33, 1000, 200, None),  # N = 400 and 1000: partial n tiles; K = 1000, 200: K tails
    ]
    if quick:
        specs = [s for s in specs if s[0] in ("E8.k2.M7", "E128.k8.M128", "E32map.k4.M64", "E4.k2.M33.odd")]
    for i, (name, E, k, M, H, I, m) in enumerate(specs):
        yield Problem(name, E, k, M, H, I, dtype, seed=1000 + i, expert_map=m)


def check_gemm_odd_n(rep: Report, dtype: str, tiles):
    """N odd and stride_cm odd: every scalar store path; top_k = 1."""
    gen = torch.Generator(device=DEV).manual_seed(7)
    td = TORCH_DTYPE[dtype]
    E, M, N, K = 3, 50, 333, 256
    A = torch.randn(M, K, generator=gen, device=DEV).to(td)
    B = (torch.randn(E, N, K, generator=gen, device=DEV) / 16).to(td)
    ids = torch.randint(0, E, (M, 1), generator=gen, device=DEV).int()
    w = torch.rand(M, 1, generator=gen, device=DEV)
    ref = torch.stack([A[t].float() @ B[ids[t, 0]].float().t() for t in range(M)]) * w
    for tile in tiles:
        sorted_ids, expert_ids, total, max_padded = run_align(ids, E, tile[0])
        problems = []
        for mode, split_k in ((0, 1), (1, 3), (2, 3)):
            if mode == 0:
                C = poison((M, N), td)
            elif mode == 1:
                C = torch.zeros(M, N, device=DEV)
            else:
                C = poison((split_k, M, N), torch.float32)
            grid = ((max_padded + tile[0] - 1) // tile[0] * ((N + tile[1] - 1) // tile[1]), split_k)
            launch(gemm_name(dtype, tile, mode, True), grid, gemm_threads(tile),
                   [A, B, C, w, sorted_ids, expert_ids, total, N, K, M, 1, split_k, 2,
                    A.stride(0), B.stride(0), B.stride(1), N, max_padded], smem=gemm_smem(tile))
            if mode == 2:
                out = poison((M, N), td)
                launch(f"moe_splitk_reduce<{dtype}>", 3, 256, [C, M * N, split_k, M, N, N, out])
                C = out
            err = rel_err(C.float(), ref)
            if not err < 1e-2:
                problems.append(f"mode{mode}: rel_err={err:.3g}")
        rep.add(f"gemm.oddN.{dtype}.{'x'.join(map(str, tile[:3]))}", not problems, "; ".join(problems))


# MARK: - Elementwise


def elementwise_grid(work: int, vec: int) -> int:
    return max(1, min((work + 256 * vec - 1) // (256 * vec), 8192))


def check_elementwise(rep: Report, quick: bool):
    gen = torch.Generator(device=DEV).manual_seed(5)
    for dtype in ("moe_bf16", "moe_fp16"):
        td = TORCH_DTYPE[dtype]
        for act in ("silu", "gelu"):
            for rows, I in ((1000, 384), (77, 100), (3, 8)):
                inp = (torch.randn(rows, 2 * I, generator=gen, device=DEV) * 3).to(td)
                out = poison((rows, I), td)
                launch(f"moe_{act}_and_mul<{dtype}>", elementwise_grid(rows * I, 8) if rows > 3 else 1, 256,
                       [inp, out, rows, I])
                g = inp[:, :I].double()
                u = inp[:, I:].double()
                a = g * torch.sigmoid(g) if act == "silu" else 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
                # gelu as 0.5 g (1 + erf(g / sqrt 2)) in fp32 (PyTorch's form): for g below about -4 the sum
                # cancels, leaving erff's error at 1 (a few units of 2^-24) times 0.5 |g u| as absolute error.
                fp32_err = 2.0**-22 * 0.5 * (g * u).abs() if act == "gelu" else 0.0
                ok, worst = rounding_ok(out, a * u, dtype, abs_tol=fp32_err)
                rep.add(f"elementwise.{act}_and_mul.{dtype}.rows{rows}.I{I}", ok, f"worst={worst:.2f} of the tolerance")
        for M, k, H in ((300, 8, 4096), (17, 3, 999), (5, 1, 64)):
            inp = torch.randn(M * k, H, generator=gen, device=DEV).to(td)
            out = poison((M, H), td)
            launch(f"moe_combine<{dtype}>", elementwise_grid(M * H, 8), 256, [inp, out, M, k, H, None])
            ref = inp.double().view(M, k, H).sum(1)
            fp32_err = 2.0**-23 * k * inp.double().abs().view(M, k, H).sum(1)
            ok, worst = rounding_ok(out, ref, dtype, abs_tol=fp32_err)
            rep.add(f"elementwise.combine.{dtype}.M{M}.k{k}.H{H}", ok, f"worst={worst:.2f}")
        for split_k, rows, N, stride in ((1, 500, 768, 768), (3, 500, 768, 800), (8, 64, 333, 333), (2, 10, 4096, 4096)):
            ws = torch.randn(split_k, rows, stride, generator=gen, device=DEV)
            out = poison((rows, stride), td)
            launch(f"moe_splitk_reduce<{dtype}>", elementwise_grid(rows * N, 4), 256,
                   [ws, rows * stride, split_k, rows, N, stride, out])
            ref = torch.zeros(rows, N, dtype=torch.float32, device=DEV)
            for s in range(split_k):  # same order as the kernel, in fp32
                ref = ref + ws[s, :, :N]
            exact = torch.equal(out[:, :N], ref.to(td))
            untouched = torch.isnan(out[:, N:].float()).all().item() if stride > N else True
            rep.add(f"elementwise.splitk_reduce.{dtype}.split{split_k}.rows{rows}.N{N}.stride{stride}",
                    exact and untouched, f"bit_exact={exact} padding_untouched={untouched}")
        for numel in (1, 1_000_003):
            inp = torch.randn(numel, generator=gen, device=DEV) * 100
            if numel > 10:
                inp[5] = float("nan")
                inp[6] = float("inf")
                inp[7] = -float("inf")
                inp[8] = 1e30  # overflows fp16
            out = poison((numel,), td)
            launch(f"moe_cast_f32<{dtype}>", elementwise_grid(numel, 4), 256, [inp, out, numel])
            want = inp.to(td)
            ok = torch.equal(out.view(torch.int16)[~torch.isnan(want)], want.view(torch.int16)[~torch.isnan(want)])
            ok = ok and torch.equal(torch.isnan(out), torch.isnan(want))
            rep.add(f"elementwise.cast_f32.{dtype}.n{numel}", ok, "NaN stays NaN, RNE matches torch")


# MARK: - Reference kernels


def check_reference(rep: Report, quick: bool):
    gen = torch.Generator(device=DEV).manual_seed(11)
    for dtype in ("moe_bf16", "moe_fp16"):
        td = TORCH_DTYPE[dtype]
        E, k, M, H, I = 16, 4, 64, 512, 128
        x = torch.randn(M, H, generator=gen, device=DEV).to(td)
        w1 = (torch.randn(E, 2 * I, H, generator=gen, device=DEV) / math.sqrt(H)).to(td)
        w2 = (torch.randn(E, H, I, generator=gen, device=DEV) / math.sqrt(I)).to(td)
        ids = torch.rand(M, E, generator=gen, device=DEV).topk(k, dim=-1).indices.int()
        ids[::5, 1] = -1  # not owned
        wts = torch.rand(M, k, generator=gen, device=DEV)
        for activation in (0, 1):
            inter = poison((M * k, I), torch.float32)
            outputs = M * k * I
            launch(f"moe_reference_gemm1<{dtype}>", min(65535, (outputs + 7) // 8), 256,
                   [x, w1, ids, M, k, H, I, activation, inter])
            flat = ids.flatten().long()
            h = torch.einsum("ph,pnh->pn", x.double()[torch.arange(M * k, device=DEV) // k],
                             w1.double()[flat.clamp(min=0)])
            g, u = h[:, :I], h[:, I:]
            a = g * torch.sigmoid(g) if activation == 0 else 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
            ref1 = torch.where((flat >= 0)[:, None], a * u, torch.zeros_like(a))
            err = rel_err(inter, ref1)
            rep.add(f"reference.gemm1.{dtype}.act{activation}", err < 1e-5, f"rel_err={err:.2e}")
        inter = torch.randn(M * k, I, generator=gen, device=DEV)
        out = poison((M, H), torch.float32)
        launch(f"moe_reference_gemm2<{dtype}>", min(65535, (M * H + 7) // 8), 256,
               [inter, w2, ids, wts, M, k, H, I, out])
        flat = ids.flatten().long()
        y = torch.einsum("pi,phi->ph", inter.double(), w2.double()[flat.clamp(min=0)])
        y = y * (wts.flatten().double() * (flat >= 0).double())[:, None]
        ref2 = y.view(M, k, H).sum(1)
        err = rel_err(out, ref2)
        rep.add(f"reference.gemm2.{dtype}", err < 1e-5, f"rel_err={err:.2e}")


# MARK: - Whole layer


def check_pipeline(rep: Report, quick: bool):
    """topk -> align -> GEMM1 -> silu_and_mul -> GEMM2 -> combine against the reference kernels."""
    gen = torch.Generator(device=DEV).manual_seed(21)
    dtype = "moe_bf16"
    td = TORCH_DTYPE[dtype]
    E, k, M, H, I = 128, 8, 200, 4096, 384
    x = torch.randn(M, H, generator=gen, device=DEV).to(td)
    logits = torch.randn(M, E, generator=gen, device=DEV).to(td)
    w1 = (torch.randn(E, 2 * I, H, generator=gen, device=DEV) / math.sqrt(H)).to(td)
    w2 = (torch.randn(E, H, I, generator=gen, device=DEV) / math.sqrt(I)).to(td)
    ids = poison((M, k), torch.int32)
    wts = poison((M, k), torch.float32)
    launch(f"moe_topk_softmax<{dtype}>", (M + 3) // 4, 128, [logits, M, E, k, 1, ids, wts])
    tile1, tile2 = (64, 128, 64, 2, 4, 3), (64, 128, 64, 2, 4, 3)
    sorted_ids, expert_ids, total, max_padded = run_align(ids, E, tile1[0], path="chunked")
    rows = M * k
    inter1 = poison((rows, 2 * I), td)
    launch(gemm_name(dtype, tile1, 0, False), ((max_padded + 63) // 64 * ((2 * I + 127) // 128), 1), 256,
           [x, w1, inter1, wts, sorted_ids, expert_ids, total, 2 * I, H, rows, k, 1, 8,
            x.stride(0), w1.stride(0), w1.stride(1), 2 * I, max_padded], smem=gemm_smem(tile1))
    inter2 = poison((rows, I), td)
    launch(f"moe_silu_and_mul<{dtype}>", elementwise_grid(rows * I, 8), 256, [inter1, inter2, rows, I])
    split_k = 2
    ws = poison((split_k, rows, H), torch.float32)
    launch(gemm_name(dtype, tile2, 2, True), ((max_padded + 63) // 64 * ((H + 127) // 128), split_k), 256,
           [inter2, w2, ws, wts, sorted_ids, expert_ids, total, H, I, rows, 1, split_k, 8,
            inter2.stride(0), w2.stride(0), w2.stride(1), H, max_padded], smem=gemm_smem(tile2))
    inter3 = poison((rows, H), td)
    launch(f"moe_splitk_reduce<{dtype}>", elementwise_grid(rows * H, 4), 256,
           [ws, rows * H, split_k, rows, H, H, inter3])
    out = poison((M, H), td)
    launch(f"moe_combine<{dtype}>", elementwise_grid(M * H, 8), 256, [inter3, out, M, k, H, None])

    ref_inter = poison((rows, I), torch.float32)
    launch(f"moe_reference_gemm1<{dtype}>", 65535, 256, [x, w1, ids, M, k, H, I, 0, ref_inter])
    ref_out = poison((M, H), torch.float32)
    launch(f"moe_reference_gemm2<{dtype}>", 65535, 256, [ref_inter, w2, ids, wts, M, k, H, I, ref_out])
    err = rel_err(out.float(), ref_out)
    rep.add(f"pipeline.{dtype}.E{E}.k{k}.M{M}.H{H}.I{I}", err < 2e-2, f"rel_err={err:.2e}")


# MARK: - 64-bit offsets


def check_64bit(rep: Report, quick: bool):
    """Outputs with more than 2^31 elements: GEMM (all modes), reduce, cast, silu_and_mul, combine."""
    gen = torch.Generator(device=DEV).manual_seed(64)
    dtype = "moe_bf16"
    td = torch.bfloat16
    E, k, M, N, K = 8, 8, 66000, 4096, 128
    rows = M * k
    assert rows * N > 2**31
    free, _ = torch.cuda.mem_get_info()
    need = rows * N * (2 + 2 + 8 if not quick else 2 + 2) + (1 << 30)
    if free < need:
        rep.add("bits64.memory", False, f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
        return
    tile = (128, 128, 64, 2, 4, 3)
    x = torch.randn(M, K, generator=gen, device=DEV).to(td)
    B = (torch.randn(E, N, K, generator=gen, device=DEV) / math.sqrt(K)).to(td)
    ids = torch.randint(0, E, (M, k), generator=gen, device=DEV).int()
    w = torch.rand(M, k, generator=gen, device=DEV)
    sorted_ids, expert_ids, total, max_padded = run_align(ids, E, tile[0], path="chunked")
    sample = torch.cat([torch.randint(0, rows, (48,), generator=gen, device=DEV),
                        torch.arange(rows - 16, rows, device=DEV)])
    flat = ids.flatten().long()
    ref = (x[sample // k].float()[:, None, :] @ B[flat[sample]].float().transpose(1, 2)).squeeze(1)
    grid = ((max_padded + 127) // 128 * (N // 128), 1)

    C = poison((rows, N), td)
    launch(gemm_name(dtype, tile, 0, False), grid, 256,
           [x, B, C, w, sorted_ids, expert_ids, total, N, K, rows, k, 1, 8, x.stride(0), B.stride(0), B.stride(1), N,
            max_padded], smem=gemm_smem(tile))
    err = rel_err(C[sample].float(), ref)
    nan_free = not torch.isnan(C[-1000:]).any().item()
    rep.add("bits64.gemm.mode0", err < 1e-2 and nan_free, f"rows*N={rows * N} rel_err={err:.2e} tail_written={nan_free}")

    # silu_and_mul over [rows, 2 * 2048] and combine over [M * k, N] read past 2^31 elements.
    half = N // 2
    act = poison((rows, half), td)
    launch(f"moe_silu_and_mul<{dtype}>", 8192, 256, [C, act, rows, half])
    g = C[sample, :half].double()
    ok, worst = rounding_ok(act[sample], g * torch.sigmoid(g) * C[sample, half:].double(), dtype)
    rep.add("bits64.silu_and_mul", ok, f"worst={worst:.2f}")
    del act
    out = poison((M, N), td)
    launch(f"moe_combine<{dtype}>", 8192, 256, [C, out, M, k, N, None])
    tokens = torch.cat([sample[:16] // k, torch.tensor([M - 1], device=DEV)])
    parts = C.view(M, k, N)[tokens].double()
    ok, worst = rounding_ok(out[tokens], parts.sum(1), dtype, abs_tol=2.0**-23 * k * parts.abs().sum(1))
    rep.add("bits64.combine", ok, f"worst={worst:.2f}")
    del out, C
    torch.cuda.empty_cache()
    if quick:
        return

    Cf = torch.zeros(rows, N, device=DEV)
    launch(gemm_name(dtype, tile, 1, False), (grid[0], 2), 256,
           [x, B, Cf, w, sorted_ids, expert_ids, total, N, K, rows, k, 2, 8, x.stride(0), B.stride(0), B.stride(1), N,
            max_padded], smem=gemm_smem(tile))
    err = rel_err(Cf[sample], ref)
    rep.add("bits64.gemm.mode1.split2", err < 1e-3, f"rel_err={err:.2e}")
    cast = poison((rows, N), td)
    launch(f"moe_cast_f32<{dtype}>", 8192, 256, [Cf, cast, rows * N])
    ok = torch.equal(cast[sample], Cf[sample].to(td)) and torch.equal(cast[-1], Cf[-1].to(td))
    rep.add("bits64.cast_f32", ok, "")
    del Cf, cast
    torch.cuda.empty_cache()

    ws = poison((2, rows, N), torch.float32)
    launch(gemm_name(dtype, tile, 2, False), (grid[0], 2), 256,
           [x, B, ws, w, sorted_ids, expert_ids, total, N, K, rows, k, 2, 8, x.stride(0), B.stride(0), B.stride(1), N,
            max_padded], smem=gemm_smem(tile))
    red = poison((rows, N), td)
    launch(f"moe_splitk_reduce<{dtype}>", 8192, 256, [ws, rows * N, 2, rows, N, N, red])
    err = rel_err(red[sample].float(), ref)
    exact = torch.equal(red[sample], (ws[0, sample] + ws[1, sample]).to(td))
    rep.add("bits64.gemm.mode2.split2+reduce", err < 1e-2 and exact, f"rel_err={err:.2e} reduce_exact={exact}")
    del ws, red
    torch.cuda.empty_cache()


# MARK: - Main


def register_all(quick: bool):
    KERNELS.register("moe_align.cu", ["moe_align_single", "moe_align_count", "moe_align_scan", "moe_align_scatter"])
    KERNELS.register("moe_topk.cu", [f"moe_topk_softmax<{t}>" for t in ("moe_bf16", "moe_fp16", "float")])
    ew = [f"{kname}<{t}>" for t in ("moe_bf16", "moe_fp16")
          for kname in ("moe_silu_and_mul", "moe_gelu_and_mul", "moe_combine", "moe_splitk_reduce", "moe_cast_f32")]
    KERNELS.register("moe_elementwise.cu", ew)
    KERNELS.register("moe_reference.cu", [f"moe_reference_gemm{g}<{t}>" for g in (1, 2) for t in ("moe_bf16", "moe_fp16")])
    for dtype, tiles in (("moe_bf16", TILES_BF16_QUICK if quick else TILES_BF16),
                         ("moe_fp16", TILES_FP16_QUICK if quick else TILES_FP16)):
        for tile in tiles + ([(128, 128, 64, 2, 4, 3)] if dtype == "moe_bf16" else []):
            KERNELS.register("moe_gemm.cu", [gemm_name(dtype, tile, m, mul) for m in (0, 1, 2) for mul in (False, True)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced matrix (about a third of the time)")
    parser.add_argument("--json", default=None, help="write a JSON summary to this path")
    parser.add_argument("--only", default=None,
                        help="comma-separated groups: align,topk,gemm,elementwise,reference,pipeline,bits64")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="parallel NVRTC compiles")
    args = parser.parse_args()
    groups = set((args.only or "align,topk,gemm,elementwise,reference,pipeline,bits64").split(","))

    start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.zeros(1, device=DEV)  # create the primary context before CuPy uses it
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name} (sm_{props.major}{props.minor}), torch {torch.__version__}, cupy {cp.__version__}")

    rep = Report()
    register_all(args.quick)
    errors = KERNELS.compile_all(args.jobs)
    for (cu, names), err in errors.items():
        rep.add(f"compile.{cu}[{names[0]}{' ...' if len(names) > 1 else ''}]", False, str(err)[:2000])
    print(f"compiled {len(KERNELS.modules)} modules in {time.time() - start:.1f} s", flush=True)
    if errors:
        print("compile errors: the checks of those kernels will fail below")

    if "align" in groups:
        rep.guard("align", check_align, rep, args.quick)
    if "topk" in groups:
        rep.guard("topk", check_topk, rep, args.quick)
    if "elementwise" in groups:
        rep.guard("elementwise", check_elementwise, rep, args.quick)
    if "reference" in groups:
        rep.guard("reference", check_reference, rep, args.quick)
    if "gemm" in groups:
        mode_splits = MODE_SPLITS_QUICK if args.quick else MODE_SPLITS
        for dtype, tiles in (("moe_bf16", TILES_BF16_QUICK if args.quick else TILES_BF16),
                             ("moe_fp16", TILES_FP16_QUICK if args.quick else TILES_FP16)):
            def gemm_group(dtype=dtype, tiles=tiles):
                for problem in make_problems(dtype, args.quick):
                    rep.guard(f"gemm.{problem.name}.{dtype}", check_gemm_problem, rep, problem, tiles, mode_splits)
                    del problem
                    torch.cuda.empty_cache()
                check_gemm_odd_n(rep, dtype, tiles)
            rep.guard(f"gemm.{dtype}", gemm_group)
    if "pipeline" in groups:
        rep.guard("pipeline", check_pipeline, rep, args.quick)
    if "bits64" in groups:
        rep.guard("bits64", check_64bit, rep, args.quick)

    seconds = time.time() - start
    failures = [c for c in rep.checks if not c["ok"]]
    if failures:  # repeated here so that the tail of a long log shows them
        print(f"failed checks ({len(failures)}):")
        for c in failures[:40]:
            print(f"  FAIL {c['name']} {c['detail'][:300]}")
    print(f"total time {seconds:.0f} s")
    print(f"{rep.passed} passed, {rep.failed} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "torch": torch.__version__, "cupy": cp.__version__,
                       "quick": args.quick, "seconds": round(seconds, 1), "passed": rep.passed,
                       "failed": rep.failed, "checks": rep.checks}, f, indent=1)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
