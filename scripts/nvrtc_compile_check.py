#!/usr/bin/env python3
"""Compile every kernel family with NVRTC, as the Swift side does, and report ptxas usage.

No GPU needed: NVRTC runs on the CPU and produces a CUBIN for the target architecture.
Each .cu under Sources/MoEKernels is compiled as its own program with moe_common.cuh passed
as a header under that include name, with the options
    -arch=<arch> -std=c++17 -default-device --ptxas-options=-v
and a representative set of template instantiations (name expressions), plus the off-by-default
kernel experiments switched on (experiment_jobs: the half tiles of the persistent kernel, its L2 hints and
fused combine, GEMM2's partial-row store hints and the GEMM2 diagnostic). Prints the
registers, stack and spills of every kernel; exits 1 on any compile failure, and on any
spill in a moe_gemm instantiation whose tile has BLOCK_M * BLOCK_N <= 128 * 128. Every
moe_gemm_sm90 / _swap / _persistent instantiation must also have no spill and no stack frame, no ptxas warning about
setmaxnreg or wgmma (C7508: setmaxnreg ignored; wgmma serialized), and with BLOCK_M = 128 (or a swap-AB BLOCK_N_W = 256) exactly
168 registers at launch (the budget its setmaxnreg split redistributes).

libnvrtc is looked up in $NVRTC_LIBRARY, /usr/local/cuda/lib64, then the pip packages
nvidia/cu13/lib and nvidia/cuda_nvrtc/lib of every site-packages directory.

Also importable: kernel_check.py uses `kernel_dir`, `source_with_header`, and
`name_expressions` from here.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import glob
import os
import re
import site
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
kernel_dir = ROOT / "Sources" / "MoEKernels"
HEADER_NAME = "moe_common.cuh"

DTYPES = ("moe_bf16", "moe_fp16")

# (BLOCK_M, BLOCK_N, BLOCK_K, WARPS_M, WARPS_N, STAGES)
GEMM_TILES = (
    (16, 64, 64, 1, 4, 4),
    (32, 128, 64, 2, 2, 3),
    (64, 128, 64, 2, 4, 3),
    (128, 128, 64, 2, 4, 3),
    (128, 256, 64, 2, 4, 3),
)
# Extra bf16 tiles that take the other code paths: odd n8 count with a partial loader pass
# (16x32x32 1x4), and an output tile larger than the operand ring (2 stages, BLOCK_K 32).
GEMM_EXTRA_TILES = (
    (16, 32, 32, 1, 4, 2),
    (128, 128, 32, 2, 4, 2),
)


# moe_gemm_sm90 tiles (BLOCK_M, BLOCK_N, STAGES): every stage count from 3 that fits in 227 KB
# (STAGES * 128 * (BLOCK_M + BLOCK_N) + 16 * STAGES + 8 * BLOCK_M + 1024 <= 232448), up to 6.
SM90_TILES = tuple(
    (bm, bn, st)
    for bm in (64, 128)
    for bn in (64, 128, 256)
    for st in range(3, 7)
    if st * 128 * (bm + bn) + 16 * st + 8 * bm + 1024 <= 232448
)
# The moe_gemm_sm90 tiles compiled again with CLUSTER 2: the deepest ring of each tile shape.
SM90_CLUSTER_TILES = tuple(
    max((t for t in SM90_TILES if t[:2] == shape), key=lambda t: t[2])
    for shape in sorted({t[:2] for t in SM90_TILES})
)
# moe_gemm_sm90_swap tiles (BLOCK_N_W, TOKENS, STAGES): a middle and the deepest ring (8 fits all)
# for bf16, the middle one for fp16 (the stage count only changes constants).
SM90_SWAP_TILES = {
    "moe_bf16": tuple((bnw, tok, st) for bnw in (64, 128) for tok in (8, 16, 32, 64) for st in (4, 8)),
    "moe_fp16": tuple((bnw, tok, 4) for bnw in (64, 128) for tok in (8, 16, 32, 64)),
}


def swap_fits(bnw: int, tok: int, st: int) -> bool:
    """The swap kernel's ring fits in 227 KB and holds its fp32 output staging [TOKENS][BLOCK_N_W + 4]."""
    ring = st * 128 * (tok + bnw)
    return ring + 16 * st + 8 * tok + 1024 <= 232448 and tok * (bnw + 4) * 4 <= ring


# The wide token tiles of prefill (BLOCK_N_W 256: two consumer warpgroups and setmaxnreg; 128: one):
# the deepest ring that fits each, every width for bf16, two for fp16.
SM90_SWAP_WIDE_TILES = {
    "moe_bf16": tuple((bnw, tok, max(st for st in range(2, 9) if swap_fits(bnw, tok, st)))
                      for bnw in (128, 256) for tok in (80, 96, 112, 128, 144, 160, 176, 192)),
    "moe_fp16": tuple((256, tok, max(st for st in range(2, 9) if swap_fits(256, tok, st))) for tok in (96, 160)),
}
# moe_gemm_sm90_persistent tiles (BLOCK_M, BLOCK_N, STAGES): the deepest ring of each shipped tile
# shape (STAGES * 128 * (BLOCK_M + BLOCK_N) + 16 * STAGES + 268 * BLOCK_M + 64 + 1024 <= 232448) and
# a shallow one; the fused activation needs BLOCK_N >= 128.
SM90_PERSISTENT_TILES = ((128, 256, 4), (128, 256, 3), (128, 128, 6), (64, 256, 5), (64, 128, 8))
# Its ping-pong form (BLOCK_M 128, BLOCK_N 64 or 128): the deepest rings and an odd one.
SM90_PINGPONG_TILES = ((128, 128, 6), (128, 128, 5), (128, 64, 8))
# Its stream-K form (KERNEL wgmma_streamk: mode 0 only): the persistent kernel's tiles.
SM90_STREAM_K_TILES = SM90_PERSISTENT_TILES
# Registers each thread of a moe_gemm_sm90 with BLOCK_M = 128 (384 threads) must be launched with:
# the setmaxnreg split (producer 56, consumers 224) redistributes exactly 384 * 168 registers.
SM90_LAUNCH_REGISTERS = 168


def gemm_sm90_name(dtype: str, tile, mode: int, mul: bool, fused_act: int = 0, cluster: int = 1) -> str:
    bm, bn, st = tile
    return f"moe_gemm_sm90<{dtype}, {bm}, {bn}, {st}, {mode}, {'true' if mul else 'false'}, {fused_act}, {cluster}>"


def gemm_sm90_swap_name(dtype: str, tile, mode: int, mul: bool, fused_act: int = 0) -> str:
    bnw, tok, st = tile
    return f"moe_gemm_sm90_swap<{dtype}, {bnw}, {tok}, {st}, {mode}, {'true' if mul else 'false'}, {fused_act}>"


def gemm_sm90_persistent_name(dtype: str, tile, mode: int, mul: bool, fused_act: int = 0, pingpong: bool = False,
                              stream_k: bool = False) -> str:
    bm, bn, st = tile
    return (f"moe_gemm_sm90_persistent<{dtype}, {bm}, {bn}, {st}, {mode}, {'true' if mul else 'false'}, {fused_act}, "
            f"{'true' if pingpong else 'false'}" + (", true>" if stream_k else ">"))


def gemm_name(dtype: str, tile, mode: int, mul: bool, fused_act: int = 0) -> str:
    bm, bn, bk, wm, wn, st = tile
    return f"moe_gemm<{dtype}, {bm}, {bn}, {bk}, {wm}, {wn}, {st}, {mode}, {'true' if mul else 'false'}, {fused_act}>"


def name_expressions() -> dict[str, list[list[str]]]:
    """Per source file, groups of name expressions; each group is compiled as one program."""
    gemm_groups = []
    for dtype in DTYPES:
        for tile in GEMM_TILES:
            gemm_groups.append([gemm_name(dtype, tile, m, mul) for m in (0, 1, 2) for mul in (False, True)])
    for tile in GEMM_EXTRA_TILES:
        gemm_groups.append([gemm_name("moe_bf16", tile, m, mul) for m in (0, 1, 2) for mul in (False, True)])
    sm90_groups = []
    for dtype in DTYPES:
        for tile in SM90_TILES:
            sm90_groups.append([gemm_sm90_name(dtype, tile, m, mul) for m in (0, 1, 2) for mul in (False, True)]
                               + [gemm_sm90_name(dtype, tile, 0, False, act) for act in (1, 2)]
                               + [gemm_sm90_name(dtype, tile, 3, True)])
        # Clusters of two (CLUSTER_M 2): the deepest ring of each tile shape, every mode.
        for tile in SM90_CLUSTER_TILES:
            sm90_groups.append(
                [gemm_sm90_name(dtype, tile, m, mul, cluster=2) for m in (0, 1, 2) for mul in (False, True)]
                + [gemm_sm90_name(dtype, tile, 0, False, act, cluster=2) for act in (1, 2)])
        for tile in SM90_PERSISTENT_TILES:
            sm90_groups.append(
                [gemm_sm90_persistent_name(dtype, tile, m, mul) for m in (0, 1, 2) for mul in (False, True)]
                + [gemm_sm90_persistent_name(dtype, tile, 0, False, act) for act in (1, 2) if tile[1] >= 128]
                # The atomic top-k sum (split mode 3: GEMM2 only).
                + [gemm_sm90_persistent_name(dtype, tile, 3, True)])
        for tile in SM90_PINGPONG_TILES:
            sm90_groups.append(
                [gemm_sm90_persistent_name(dtype, tile, m, mul, pingpong=True) for m in (0, 1, 2) for mul in (False, True)]
                + [gemm_sm90_persistent_name(dtype, tile, 0, False, act, pingpong=True)
                   for act in (1, 2) if tile[1] >= 128])
        for tile in SM90_STREAM_K_TILES:
            sm90_groups.append(
                [gemm_sm90_persistent_name(dtype, tile, 0, mul, stream_k=True) for mul in (False, True)]
                + [gemm_sm90_persistent_name(dtype, tile, 0, False, act, stream_k=True)
                   for act in (1, 2) if tile[1] >= 128])
        for tile in SM90_SWAP_TILES[dtype] + SM90_SWAP_WIDE_TILES[dtype]:
            sm90_groups.append(
                [gemm_sm90_swap_name(dtype, tile, m, mul) for m in (0, 1, 2) for mul in (False, True)]
                + [gemm_sm90_swap_name(dtype, tile, 0, False, act) for act in (1, 2)]
                # The top-k sum by 16-bit reductions (split mode 3: GEMM2 only).
                + [gemm_sm90_swap_name(dtype, tile, 3, True)])
        # Whole token widths (FIT 0, NOTES v42, v43): GEMM1 in units of 7 (two blocks per expert) and of 4
        # (Mixtral's 512 entry: one block and now and then a short second one), one tile per program (the
        # top-8 tables' 144 and 192), and GEMM2 (its rows to memory, or summed by 16-bit reductions at
        # k <= 2), on the wide tiles that two blocks per expert take.
        sm90_groups.append([gemm_sm90_swap_name(dtype, (256, tok, 4), 0, False, 1)[:-1] + ", 7, false>"
                            for tok in (112, 128, 144, 160, 176)]
                           + [gemm_sm90_swap_name(dtype, (256, 144, 4), 0, False, 1)[:-1] + ", 4, false>"]
                           + [gemm_sm90_swap_name(dtype, (256, tok, 4), 0, False, 1)[:-1] + ", 1, false>"
                              for tok in (144, 192)]
                           + [gemm_sm90_swap_name(dtype, (256, tok, 4), mode, True)[:-1] + ", 1, false>"
                              for tok in (112, 128, 144, 160, 176) for mode in (0, 3)])
    elementwise = []
    for dtype in DTYPES:
        for kernel in ("moe_silu_and_mul", "moe_gelu_and_mul", "moe_combine", "moe_splitk_reduce", "moe_cast_f32"):
            elementwise.append(f"{kernel}<{dtype}>")
    return {
        "moe_align.cu": [[]],  # extern "C" kernels only
        "moe_topk.cu": [[f"moe_topk_softmax<{t}>" for t in ("moe_bf16", "moe_fp16", "float")]],
        "moe_elementwise.cu": [elementwise],
        "moe_reference.cu": [[f"moe_reference_gemm{g}<{t}>" for g in (1, 2) for t in DTYPES]],
        "moe_gemm.cu": gemm_groups,
        "moe_gemm_sm90.cu": sm90_groups,
    }


def source_with_header(cu_name: str) -> str:
    """The .cu text with `#include "moe_common.cuh"` replaced by the header text (for compilers
    that take no header list, such as cupy.RawModule)."""
    header = (kernel_dir / HEADER_NAME).read_text()
    source = (kernel_dir / cu_name).read_text()
    include = f'#include "{HEADER_NAME}"'
    if include not in source:
        raise ValueError(f"{cu_name} does not include {HEADER_NAME}")
    return source.replace(include, header, 1)


# MARK: - NVRTC through ctypes


def find_nvrtc() -> str:
    env = os.environ.get("NVRTC_LIBRARY")
    if env:
        return env
    candidates = sorted(glob.glob("/usr/local/cuda/lib64/libnvrtc.so*"))
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    for root in roots:
        for sub in ("nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"):
            candidates += sorted(glob.glob(os.path.join(root, sub, "libnvrtc.so*")))
    # Prefer the plain soname (libnvrtc.so.13) over builtins or alt libraries.
    candidates = [c for c in candidates if re.search(r"libnvrtc\.so(\.\d+)*$", c)]
    if not candidates:
        raise FileNotFoundError("libnvrtc not found: set NVRTC_LIBRARY")
    return candidates[0]


class NVRTC:
    def __init__(self, path: str):
        self.path = path
        self.lib = ctypes.CDLL(path)
        lib = self.lib
        P = ctypes.c_void_p
        lib.nvrtcCreateProgram.argtypes = [
            ctypes.POINTER(P), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
            ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p)]
        lib.nvrtcAddNameExpression.argtypes = [P, ctypes.c_char_p]
        lib.nvrtcCompileProgram.argtypes = [P, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.nvrtcGetProgramLogSize.argtypes = [P, ctypes.POINTER(ctypes.c_size_t)]
        lib.nvrtcGetProgramLog.argtypes = [P, ctypes.c_char_p]
        lib.nvrtcGetCUBINSize.argtypes = [P, ctypes.POINTER(ctypes.c_size_t)]
        lib.nvrtcGetCUBIN.argtypes = [P, ctypes.c_char_p]
        lib.nvrtcGetLoweredName.argtypes = [P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)]
        lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(P)]
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcVersion.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]

    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        return major.value, minor.value

    def error(self, code: int) -> str:
        return self.lib.nvrtcGetErrorString(code).decode()

    def compile(self, source: str, name: str, headers: dict[str, str], options: list[str],
                expressions: list[str]):
        """Returns (ok, log, cubin or None, {expression: lowered name})."""
        prog = ctypes.c_void_p()
        n = len(headers)
        header_src = (ctypes.c_char_p * n)(*[v.encode() for v in headers.values()])
        header_names = (ctypes.c_char_p * n)(*[k.encode() for k in headers.keys()])
        rc = self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), n, header_src,
                                         header_names)
        if rc != 0:
            return False, f"nvrtcCreateProgram: {self.error(rc)}", None, {}
        try:
            for expr in expressions:
                rc = self.lib.nvrtcAddNameExpression(prog, expr.encode())
                if rc != 0:
                    return False, f"nvrtcAddNameExpression({expr}): {self.error(rc)}", None, {}
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            rc = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            self.lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
            if rc != 0:
                return False, f"nvrtcCompileProgram: {self.error(rc)}\n{log}", None, {}
            lowered = {}
            for expr in expressions:
                out = ctypes.c_char_p()
                rc = self.lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(out))
                if rc != 0:
                    return False, f"nvrtcGetLoweredName({expr}): {self.error(rc)}", None, {}
                lowered[expr] = out.value.decode()
            self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
            cubin = ctypes.create_string_buffer(size.value)
            rc = self.lib.nvrtcGetCUBIN(prog, cubin)
            if rc != 0 or size.value == 0:
                return False, f"nvrtcGetCUBIN: {self.error(rc)}\n{log}", None, {}
            return True, log, cubin.raw, lowered
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


# MARK: - ptxas report


@dataclass
class KernelUsage:
    name: str  # name expression or extern "C" name
    registers: int = -1
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    extra: dict = field(default_factory=dict)


def parse_ptxas(log: str) -> dict[str, KernelUsage]:
    """Mangled (or C) name -> usage, from the --ptxas-options=-v report."""
    usage: dict[str, KernelUsage] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = usage.setdefault(m.group(1), KernelUsage(m.group(1)))
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = usage.setdefault(m.group(1), KernelUsage(m.group(1)))
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            if s:
                current.smem = int(s.group(1))
    return usage


GEMM_RE = re.compile(r"moe_gemm<\w+, (\d+), (\d+), (\d+),")
GEMM_SM90_RE = re.compile(r"moe_gemm_sm90(?:_swap|_persistent)?<\w+, (\d+), (\d+), (\d+),")
GEMM_SM90_MAIN_RE = re.compile(r"moe_gemm_sm90(?:_persistent)?<\w+, (\d+), (\d+), (\d+),")
GEMM_SM90_SWAP_RE = re.compile(r"moe_gemm_sm90_swap<\w+, (\d+), (\d+), (\d+),")
# ptxas warnings that mean a Hopper kernel lost its design: setmaxnreg ignored (C7508), wgmma
# serialized (C7510/C7515/..., "Potential Performance Loss").
SM90_FATAL_WARNINGS = re.compile(r"C7508|setmaxnreg|wgmma|Potential Performance Loss", re.IGNORECASE)


# Known, and open (bench/NOTES.md v34): the persistent kernel with the activation fused, in fp16 at
# BLOCK_N 256, spills. The exact-gelu form spills 48-104 bytes (128 accumulators live while erf runs on
# packed halves). The silu form spills 40 bytes, 92 in the stream-K walk and 28 at BLOCK_M 64. At
# 2d4d5c1 already, so before session 23. In the silu form's SASS (-lineinfo) the spilled values are the
# epilogue's 8 per-pass staging addresses, hoisted out of the tile loop and reloaded once per tile
# (grouping the activations changed nothing). Since v29 every plan fuses where its kernel
# can, so fp16 plans whose GEMM1 is persistent run these. The check covers them for correctness, as
# every instantiation; no table is fp16, and their speed is not measured.
KNOWN_SPILLS = re.compile(r"moe_gemm_sm90_persistent<moe_fp16, \d+, 256, \d+, 0, false, [12], false(, true)?>")


def must_not_spill(expr: str) -> bool:
    if KNOWN_SPILLS.match(expr):
        return False
    if GEMM_SM90_RE.match(expr):
        return True
    m = GEMM_RE.match(expr)
    return bool(m) and int(m.group(1)) * int(m.group(2)) <= 128 * 128


def register_problem(u: "KernelUsage") -> str | None:
    """Why a kernel's register use is wrong, or None: a moe_gemm_sm90 must keep no stack frame
    (local memory), and with BLOCK_M = 128 must be launched with exactly the registers its
    setmaxnreg split redistributes (fewer would leave the consumers' increase waiting forever)."""
    m = GEMM_SM90_RE.match(u.name)
    if not m:
        return None
    # An off-by-default experiment (name with its -D switches) may keep an unused frame: ptxas 13.5
    # reserves 8 bytes, with no local load or store, for the half tiles in split modes (seen at
    # 78ed79f already). The shipped instantiations must have none.
    unused_experiment_frame = " -D" in u.name and not u.spill_stores and not u.spill_loads and u.stack <= 16
    if u.stack and not KNOWN_SPILLS.match(u.name) and not unused_experiment_frame:
        return f"{u.stack} bytes stack frame"
    main = GEMM_SM90_MAIN_RE.match(u.name)
    swap = GEMM_SM90_SWAP_RE.match(u.name)
    rebalanced = (main and int(main.group(1)) == 128) or (swap and int(swap.group(1)) == 256)
    if rebalanced and u.registers != SM90_LAUNCH_REGISTERS:
        return f"launched with {u.registers} registers, setmaxnreg needs {SM90_LAUNCH_REGISTERS}"
    return None


def experiment_jobs() -> list[tuple[str, list[str], list[str]]]:
    """Off-by-default kernel experiments (FUSED_MOE_KERNEL_DEFINES switches), compiled switched on so
    they keep compiling under the same rules: (file, name expressions, extra -D options)."""
    half = [gemm_sm90_persistent_name(dtype, tile, 0, mul)  # the half tiles are unsplit only
            for dtype in DTYPES for tile in SM90_PERSISTENT_TILES if tile[0] == 128 and tile[1] >= 128
            for mul in (False, True)]
    # L2 eviction hints (NOTES v26): the large-M kernels of the tables, weight boxes and row copies hinted.
    hinted = [gemm_sm90_swap_name("moe_bf16", (256, tok, 4), 0, mul, act) for tok in (144, 160, 192)
              for (mul, act) in ((False, 1), (True, 0))]
    hinted += [gemm_sm90_persistent_name("moe_bf16", (128, 256, st), 0, True) for st in (3, 4)]
    # The fused combine (NOTES v27): the A-resident GEMM2 instantiations, and beside the half tiles (where
    # it compiles out).
    combine = [gemm_sm90_persistent_name(dtype, (128, 256, 4), 0, True) for dtype in DTYPES]
    return [("moe_gemm_sm90.cu", half, ["-DMOE_SM90_HALF_TILES=1"]),
            # Each expert's rows split evenly over its blocks (a diagnostic, NOTES v42).
            ("moe_align.cu", [], ["-DMOE_ALIGN_BALANCE=1"]),
            ("moe_gemm_sm90.cu", combine, ["-DMOE_SM90_FUSED_COMBINE=1"]),
            ("moe_gemm_sm90.cu", combine, ["-DMOE_SM90_FUSED_COMBINE=1", "-DMOE_SM90_HALF_TILES=1"]),
            ("moe_gemm_sm90.cu", hinted, ["-DMOE_L2_HINTS=3"]), ("moe_gemm_sm90.cu", hinted, ["-DMOE_L2_HINTS=12"]),
            # GEMM2's partial-row store hints and the GEMM2 diagnostic (NOTES v32): the same kernels.
            ("moe_gemm_sm90.cu", hinted, ["-DMOE_PARTIAL_STORE_HINT=1"]),
            ("moe_gemm_sm90.cu", hinted, ["-DMOE_PARTIAL_STORE_HINT=2"]),
            ("moe_gemm_sm90.cu", hinted, ["-DMOE_SM90_DIAG_GEMM2=15"]),
            ("moe_gemm_sm90.cu", hinted, ["-DMOE_SM90_DIAG_GEMM2=16"]),
            # The diagnostic's bits 5-8 and the pair prefetch switched off (NOTES v35).
            ("moe_gemm_sm90.cu", hinted, ["-DMOE_SM90_DIAG_GEMM2=480"]),
            ("moe_gemm_sm90.cu", hinted, ["-DMOE_SM90_PAIR_PREFETCH=0"]),
            # The swap-AB kernel's per-program timeline (NOTES v39).
            ("moe_gemm_sm90.cu", hinted[:4], ["-DMOE_SM90_DIAG_TIMES=1"]),
            # The swap-AB GEMM1's units of n-blocks (NOTES v39): the paired widths of the tables.
            ("moe_gemm_sm90.cu", [gemm_sm90_swap_name(dtype, (256, tok, 4 if tok > 96 else 5), 0, False, 1)
                                  for dtype in DTYPES for tok in (64, 96, 144, 160, 176, 192)]
             + [gemm_sm90_swap_name("moe_bf16", (128, tok, st), 0, False, 1) for tok, st in ((16, 6), (80, 7), (144, 5))],
             ["-DMOE_SM90_SWAP_UNIT=7"])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90a", help="NVRTC -arch value (default sm_90a)")
    parser.add_argument("--only", default=None, help="compile only this .cu file")
    parser.add_argument("-j", "--jobs", type=int, default=max(1, min(16, os.cpu_count() or 1)))
    parser.add_argument("--verbose", action="store_true", help="print the full NVRTC logs")
    parser.add_argument("--filter", default=None,
                        help="compile only the groups with a name expression matching this regex")
    args = parser.parse_args()

    nvrtc = NVRTC(find_nvrtc())
    print(f"libnvrtc: {nvrtc.path} (NVRTC {'.'.join(map(str, nvrtc.version()))}), arch {args.arch}")
    headers = {HEADER_NAME: (kernel_dir / HEADER_NAME).read_text()}
    options = [f"-arch={args.arch}", "-std=c++17", "-default-device", "--ptxas-options=-v"]

    jobs = []
    files = sorted(p.name for p in kernel_dir.glob("*.cu"))
    groups = name_expressions()
    for cu in files:
        if args.only and cu != args.only:
            continue
        if cu not in groups:
            # A family this script does not know: compile it as is (its extern "C" kernels);
            # its templates are not instantiated until listed in name_expressions().
            print(f"note {cu}: no name expressions listed here, templates not instantiated")
        for group in groups.get(cu, [[]]):
            jobs.append((cu, group, []))
    jobs += [job for job in experiment_jobs() if not args.only or job[0] == args.only]
    if args.filter:
        jobs = [job for job in jobs if any(re.search(args.filter, e) for e in job[1])]

    def run(job):
        cu, exprs, extra = job
        start = time.time()
        src = (kernel_dir / cu).read_text()
        result = nvrtc.compile(src, cu, headers, options + extra, exprs)
        return job, result, time.time() - start

    failures = 0
    rows: list[tuple[str, KernelUsage]] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for (cu, exprs, extra), (ok, log, cubin, lowered), seconds in pool.map(run, jobs):
            defines = "".join(f" {d}" for d in extra)
            label = f"{cu}" + (f" [{exprs[0]} ...]" if len(exprs) > 1 else (f" [{exprs[0]}]" if exprs else "")) + defines
            if not ok:
                failures += 1
                print(f"FAIL compile {label}\n{log}")
                continue
            if args.verbose:
                print(log)
            usage = parse_ptxas(log)
            by_mangled = {v: k for k, v in lowered.items()}
            for mangled, u in usage.items():
                u.name = by_mangled.get(mangled, mangled) + defines
                rows.append((cu, u))
            warnings = [l for l in log.splitlines() if "warning" in l.lower()]
            for w in warnings:
                print(f"WARN {cu}: {w}")
            if cu == "moe_gemm_sm90.cu":
                # ptxas reports wgmma serialization as "ptxas info : (C75xx) Potential Performance Loss".
                fatal = [l for l in log.splitlines() if SM90_FATAL_WARNINGS.search(l)]
                for w in fatal:
                    print(f"FAIL {label}: {w}")
                failures += len(fatal)
            print(f"ok   {label}: {len(usage)} kernels, cubin {len(cubin)} bytes, {seconds:.1f} s")

    print()
    print(f"{'kernel':<72} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9} {'smem':>6}")
    spill_failures = 0
    for cu, u in sorted(rows, key=lambda r: (r[0], r[1].name)):
        flag = ""
        problem = register_problem(u)
        if (u.spill_stores or u.spill_loads) and must_not_spill(u.name):
            flag = "  <-- SPILL"
            spill_failures += 1
        elif problem:
            flag = f"  <-- {problem}"
            failures += 1
        elif u.spill_stores or u.spill_loads:
            flag = "  (spill tolerated)"
        print(f"{u.name:<72} {u.registers:>5} {u.stack:>6} {u.spill_stores:>9} {u.spill_loads:>9} {u.smem:>6}{flag}")
    print()
    if failures or spill_failures:
        print(f"FAILED: {failures} compile failures, {spill_failures} gemm kernels spill")
        return 1
    print(f"all {len(rows)} kernels compiled, no spills where forbidden")
    return 0


if __name__ == "__main__":
    sys.exit(main())
