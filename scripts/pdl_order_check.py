#!/usr/bin/env python3
"""Check, in the SASS of every kernel, that no global load comes before griddepcontrol.wait.

Under programmatic dependent launch a kernel may start while the previous kernel of the forward still
runs; it must not read memory an earlier kernel writes (align's routing, the GEMM intermediates)
before griddepcontrol.wait (ACQBULK in SASS). The PTX can have every load after the wait and the SASS
still not: ptxas treats ld.global.nc (what `const T* __restrict__` becomes) as reading memory that
is constant for the kernel's whole life, and may schedule it above the wait (bench/NOTES.md v20: the
swap-AB GEMM1 read *total_padded before its wait, so it ran on the previous forward's routing).

Rule, per kernel: every global read (LDG, LD, LDGSTS, UTMALDG, ...) that lies before the kernel's
first ACQBULK in address order is reported. The swap-AB kernel's early path (GEMM2's weight tiles
by TMA before the wait) lies after that first, conditional ACQBULK, so it passes the rule; the
weights are the only memory it touches there. Kernels without an ACQBULK (not forward kernels, e.g.
the random fills) are listed, not checked.

Second rule, on the GEMM and elementwise kernels (SLOW_DIVISION_KERNELS): no FCHK, the operand test of an
IEEE float division, whose slow routine runs for a zero dividend. Every padding row of a GEMM1 tile is
zero, and silu's division cost the fused persistent GEMM1 13% (bench/NOTES.md v29); the activations use
the approximate reciprocal instead. (The topk softmax divides once per token, the reference kernels
are checkers: both keep IEEE division.)

Needs libnvrtc and nvdisasm (pip install nvidia-cuda-nvrtc nvidia-cuda-nvdisasm, or a CUDA toolkit).
Exits 1 when a kernel breaks a rule or something does not compile.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nvrtc_compile_check as ncc  # noqa: E402

# Global memory accesses (reads, and the atomics that read as they write).
GLOBAL_READ = re.compile(r"\b(LDG|LDGSTS|UTMALDG|UBLKCP|LD|ATOMG|ATOM|RED)\b[.\s]")
FUNCTION = re.compile(r"^\s*\.text\.(\S+):\s*$")
# Kernels that must not divide with IEEE float division (the second rule).
SLOW_DIVISION_KERNELS = re.compile(r"^(moe_gemm|moe_silu_and_mul|moe_gelu_and_mul|moe_splitk_reduce|moe_combine)")
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def find_nvdisasm() -> str:
    env = os.environ.get("NVDISASM")
    if env:
        return env
    found = shutil.which("nvdisasm")
    if found:
        return found
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    candidates = ["/usr/local/cuda/bin/nvdisasm"]
    for root in roots:
        for sub in ("nvidia/cu13/bin", "nvidia/cu12/bin", "nvidia/cuda_nvdisasm/bin"):
            candidates += glob.glob(os.path.join(root, sub, "nvdisasm"))
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("nvdisasm not found: pip install nvidia-cuda-nvdisasm, or set NVDISASM")


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """The instructions of each function in nvdisasm -c output: (address, text)."""
    out: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in sass.splitlines():
        m = FUNCTION.match(line)
        if m:
            current = m.group(1)
            out[current] = []
            continue
        m = INSTRUCTION.search(line)
        if m and current is not None:
            out[current].append((int(m.group(1), 16), m.group(2)))
    return out


def violations(instructions: list[tuple[int, str]]) -> list[str] | None:
    """The global reads before the first ACQBULK; None when the function has no ACQBULK."""
    waits = [address for address, text in instructions if re.search(r"\bACQBULK\b", text)]
    if not waits:
        return None
    first = min(waits)
    bad = []
    for address, text in instructions:
        if address >= first:
            continue
        opcode = re.sub(r"^@!?U?P\w+\s+", "", text)  # drop a predicate
        if GLOBAL_READ.match(opcode + " "):  # LD matches LD.E, not LDC, LDS, LDSM or LDL
            bad.append(f"/*{address:04x}*/ {text}")
    return bad


def slow_divisions(instructions: list[tuple[int, str]]) -> list[str]:
    """The FCHK instructions (an IEEE float division's operand test, before its slow-path call)."""
    return [f"/*{address:04x}*/ {text}" for address, text in instructions if re.search(r"\bFCHK\b", text)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90a")
    parser.add_argument("--filter", default=None,
                        help="only the .cu files or groups with a name expression matching this regex")
    parser.add_argument("-j", "--jobs", type=int, default=max(1, min(16, os.cpu_count() or 1)))
    args = parser.parse_args()

    nvrtc = ncc.NVRTC(ncc.find_nvrtc())
    nvdisasm = find_nvdisasm()
    print(f"libnvrtc: {nvrtc.path}; nvdisasm: {nvdisasm}")
    headers = {ncc.HEADER_NAME: (ncc.kernel_dir / ncc.HEADER_NAME).read_text()}
    options = [f"-arch={args.arch}", "-std=c++17", "-default-device"]
    groups = ncc.name_expressions()
    jobs = [(cu, group) for cu in sorted(p.name for p in ncc.kernel_dir.glob("*.cu")) for group in groups.get(cu, [[]])]
    if args.filter:
        jobs = [job for job in jobs if re.search(args.filter, job[0]) or any(re.search(args.filter, e) for e in job[1])]

    def run(job):
        cu, exprs = job
        ok, log, cubin, lowered = nvrtc.compile((ncc.kernel_dir / cu).read_text(), cu, headers, options, exprs)
        if not ok:
            return job, None, log, lowered
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            sass = subprocess.run([nvdisasm, "-c", f.name], check=True, capture_output=True, text=True).stdout
        return job, sass, log, lowered

    failures = checked = unchecked = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for (cu, exprs), sass, log, lowered in pool.map(run, jobs):
            if sass is None:
                failures += 1
                print(f"FAIL compile {cu} {exprs[:1]}\n{log}")
                continue
            names = {v: k for k, v in lowered.items()}
            for mangled, instructions in functions(sass).items():
                name = names.get(mangled, mangled)
                if SLOW_DIVISION_KERNELS.match(name):
                    divisions = slow_divisions(instructions)
                    if divisions:
                        failures += 1
                        print(f"FAIL {cu}: {name}: {len(divisions)} IEEE float division(s) (FCHK), e.g. {divisions[0]}")
                bad = violations(instructions)
                if bad is None:
                    unchecked += 1
                    print(f"note {cu}: {name} has no griddepcontrol.wait (not a forward kernel)")
                    continue
                checked += 1
                if bad:
                    failures += 1
                    print(f"FAIL {cu}: {name}: {len(bad)} global read(s) before griddepcontrol.wait:")
                    for line in bad[:6]:
                        print(f"       {line}")
    print(f"{checked} kernels checked, {unchecked} without a wait, {failures} failing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
