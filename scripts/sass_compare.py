#!/usr/bin/env python3
"""Compare the SASS opcode sequences of kernel instantiations between a git revision and the working tree.

An experiment compiled in behind a define (FUSED_MOE_KERNEL_DEFINES) must leave the shipped kernels as
they were when it is off; this compiles the given name expressions of one kernel source at REV and in
the working tree with NVRTC (as nvrtc_compile_check.py does, sm_90a), disassembles both cubins with
nvdisasm, and compares each kernel's opcode sequence (operands and addresses dropped, so register
renaming alone is not a difference; any reordering or changed instruction is).

Usage: python3 scripts/sass_compare.py REV FILE.cu EXPRESSION [EXPRESSION ...] [--define NAME=VALUE ...]
Exits 0 when every kernel has the same opcode sequence, 1 otherwise. Needs libnvrtc and nvdisasm
(pip install nvidia-cuda-nvrtc nvidia-cuda-nvdisasm).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nvrtc_compile_check import HEADER_NAME, NVRTC, ROOT, find_nvrtc  # noqa: E402


def find_nvdisasm() -> str:
    found = shutil.which("nvdisasm")
    if found:
        return found
    for path in glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia", "*", "bin", "nvdisasm")):
        return path
    import site
    for root in site.getsitepackages():
        for path in glob.glob(os.path.join(root, "nvidia", "*", "bin", "nvdisasm")):
            return path
    sys.exit("sass_compare.py: nvdisasm not found (pip install nvidia-cuda-nvdisasm)")


def source_at(rev: str | None, path: str) -> str:
    if rev is None:
        return (ROOT / path).read_text()
    return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def opcodes(nvdisasm: str, cubin: bytes) -> dict[str, list[str]]:
    """Kernel (mangled name) -> its opcode sequence."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([nvdisasm, "-c", f.name], check=True, capture_output=True, text=True).stdout
    kernels: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*\.text\.(\S+):", line)
        if m:
            current = m.group(1)
            kernels[current] = []
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", line)
        if current and m:
            ins = re.sub(r"^@!?U?P\w+\s+", "", m.group(1).strip())
            kernels[current].append(ins.split()[0] if ins else "")
    return kernels


def compile_at(nvrtc: NVRTC, rev: str | None, cu: str, expressions: list[str], defines: list[str]):
    kernel_dir = "Sources/MoEKernels"
    header = source_at(rev, f"{kernel_dir}/{HEADER_NAME}")
    source = source_at(rev, f"{kernel_dir}/{cu}")
    options = ["-arch=sm_90a", "-std=c++17", "-default-device"] + [f"-D{d}" for d in defines]
    ok, log, cubin, lowered = nvrtc.compile(source, cu, {HEADER_NAME: header}, options, expressions)
    if not ok:
        sys.exit(f"sass_compare.py: {cu} at {rev or 'the working tree'} does not compile:\n{log}")
    return cubin, lowered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev")
    parser.add_argument("cu")
    parser.add_argument("expressions", nargs="+")
    parser.add_argument("--define", action="append", default=[], help="NAME=VALUE for both compiles")
    args = parser.parse_args()
    nvrtc = NVRTC(find_nvrtc())
    nvdisasm = find_nvdisasm()
    old_cubin, old_names = compile_at(nvrtc, args.rev, args.cu, args.expressions, args.define)
    new_cubin, new_names = compile_at(nvrtc, None, args.cu, args.expressions, args.define)
    old, new = opcodes(nvdisasm, old_cubin), opcodes(nvdisasm, new_cubin)
    status = 0
    for expr in args.expressions:
        a, b = old.get(old_names[expr], []), new.get(new_names[expr], [])
        same = a == b and len(a) > 0
        print(f"{'same' if same else 'DIFFERENT'}  {expr}: {len(a)} -> {len(b)} instructions")
        status |= 0 if same else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
