#!/usr/bin/env python3
"""Print the SASS instructions at given offsets of one kernel instantiation, to read a compute-sanitizer
report ("... at void moe_gemm_sm90_swap<...>(...)+0x9340") on a machine without a GPU.

The offsets depend on the NVRTC that compiled the kernel: use the device's. The H200 of the device tool
has NVRTC 13.0 (13.0.88 matched its racecheck offsets in session 28); here, for example:
    pip download nvidia-cuda-nvrtc==13.0.88 --no-deps -d /tmp/w && unzip -oq /tmp/w/*.whl -d /tmp/nv13
    LD_LIBRARY_PATH=/tmp/nv13/nvidia/cu13/lib python3 scripts/sass_at.py \\
        --nvrtc /tmp/nv13/nvidia/cu13/lib/libnvrtc.so.13 --define MOE_SM90_SWAP_UNIT=2 \\
        REV moe_gemm_sm90.cu 'moe_gemm_sm90_swap<moe_bf16, 256, 144, 4, 0, false, 1>' 9340 1c500
(LD_LIBRARY_PATH so that NVRTC finds its builtins library beside it.) The options are the Swift side's
(KernelLibrary.options) plus the defines. REV "-" is the working tree. Prints each offset with the
instructions around it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nvrtc_compile_check import HEADER_NAME, NVRTC, find_nvrtc  # noqa: E402
from sass_compare import find_nvdisasm, source_at  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help='a git revision, or "-" for the working tree')
    parser.add_argument("cu", help="the kernel source under Sources/MoEKernels, e.g. moe_gemm_sm90.cu")
    parser.add_argument("expression", help="the name expression of the instantiation")
    parser.add_argument("offsets", nargs="+", help="hexadecimal offsets into the kernel (0x optional)")
    parser.add_argument("--nvrtc", default=None, help="libnvrtc to compile with (default: as nvrtc_compile_check.py finds it)")
    parser.add_argument("--define", action="append", default=[], help="NAME=VALUE (repeatable)")
    parser.add_argument("--context", type=int, default=3, help="instructions shown on each side")
    args = parser.parse_args()

    nvrtc = NVRTC(args.nvrtc or find_nvrtc())
    rev = None if args.rev == "-" else args.rev
    header = source_at(rev, f"Sources/MoEKernels/{HEADER_NAME}")
    source = source_at(rev, f"Sources/MoEKernels/{args.cu}")
    options = ["-arch=sm_90a", "-std=c++17", "-default-device", "--ptxas-options=-v"] + [f"-D{d}" for d in args.define]
    ok, log, cubin, lowered = nvrtc.compile(source, args.cu, {HEADER_NAME: header}, options, [args.expression])
    if not ok:
        sys.exit(f"sass_at.py: does not compile:\n{log}")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([find_nvdisasm(), "-c", f.name], check=True, capture_output=True, text=True).stdout
    body: list[tuple[int, str]] = []
    current = None
    for line in text.splitlines():
        header_match = re.match(r"\s*\.text\.(\S+):", line)
        if header_match:
            current = header_match.group(1)
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?);", line)
        if m and current == lowered[args.expression]:
            body.append((int(m.group(1), 16), m.group(2).strip()))
    if not body:
        sys.exit("sass_at.py: the kernel's body was not found in the disassembly")
    version = ".".join(map(str, nvrtc.version()))
    print(f"{args.expression}: NVRTC {version}, {len(body)} instructions, last at {body[-1][0]:#x}")
    for text_offset in args.offsets:
        offset = int(text_offset, 16)
        index = next((i for i, (o, _) in enumerate(body) if o == offset), None)
        print(f"--- {offset:#x}")
        if index is None:
            print("    no instruction there (another NVRTC, other defines, or another instantiation?)")
            continue
        for o, instruction in body[max(0, index - args.context): index + args.context + 1]:
            print(f"{'>>' if o == offset else '  '} {o:#07x}  {instruction}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
