"""Measures the two ceilings of this GPU with PyTorch, on random data, and writes them as JSON.

copy_bytes_per_s: a 1 GiB device-to-device copy, counting bytes read plus written.
bf16_flops_per_s: an 8192 x 8192 x 8192 bf16 matrix product on random inputs.
Each is the median of 20 timed runs (CUDA events) after 3 warm-ups.
"""
import json
import statistics
import sys

import torch


def median_ms(fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "ceilings.json"
    n = 1 << 28  # floats: 1 GiB
    src = torch.rand(n, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    size = 8192
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: torch.mm(a, b))
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_bytes_per_s": 2 * 4 * n / (copy_ms / 1000),
        "bf16_flops_per_s": 2 * size**3 / (mm_ms / 1000),
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"ceilings: copy {result['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 {result['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
