"""Read bandwidth of the weight-streaming pattern, on random data, with Triton (a probe, not a peer).

Each program reads one [R, K] tile of a row-major bf16 matrix (the rows of one expert's weight tile,
K contiguous) in [R, BK] blocks along K and keeps a sum so the loads are live, as a decode GEMM
streams its weights. The matrix is `tiles * R` rows of K = 4096 (Mixtral's w1 of 7 experts: 1.2 GB
when tiles = 784, R = 128). Variants: the block width BK (128, 256, 512 contiguous bytes per row and
load) and R, printed as TB/s of bytes read (median of 20 CUDA-event timed runs after 3 warm-ups).
"""
import sys

import torch
import triton
import triton.language as tl

from ceilings import median_ms  # scripts/ceilings.py: median of CUDA-event timed runs


@triton.jit
def read_tiles(ptr, out, K, R: tl.constexpr, BK: tl.constexpr):
    tile = tl.program_id(0)
    rows = tile.to(tl.int64) * R + tl.arange(0, R)
    acc = tl.zeros([R, BK], dtype=tl.float32)
    for k in range(0, K, BK):
        cols = k + tl.arange(0, BK)
        acc += tl.load(ptr + rows[:, None] * K + cols[None, :]).to(tl.float32)
    tl.store(out + tile, tl.sum(acc))


def main():
    k = 4096
    rows = 784 * 128
    w = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(rows, device="cuda", dtype=torch.float32)
    for r, bk, warps, stages in [(128, 64, 4, 6), (128, 128, 4, 4), (128, 128, 8, 5), (64, 128, 4, 5),
                                 (64, 256, 4, 4), (32, 512, 4, 4), (16, 1024, 4, 4), (8, 2048, 4, 3)]:
        grid = (rows // r,)
        fn = lambda: read_tiles[grid](w, out, k, R=r, BK=bk, num_warps=warps, num_stages=stages)
        ms = median_ms(fn)
        print(f"read R={r:4} BK={bk:5} ({2 * bk:5} B/row/load) warps={warps} stages={stages}: "
              f"{w.numel() * 2 / ms / 1e9:.2f} TB/s ({ms:.4f} ms)")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
