"""Measures the two ceilings of this GPU with PyTorch, on random data, and writes them as JSON.

copy_bytes_per_s: a 1 GiB device-to-device copy, counting bytes read plus written.
bf16_flops_per_s: an 8192 x 8192 x 8192 bf16 matrix product on random inputs; fp16_flops_per_s the
same in fp16.

Each is timed the way `fused-moe bench` times a row: runs back to back (no host synchronization
between them) for a window of about 0.3 s after warm-up, each run between two CUDA events, median.
Under that load the card reaches its power cap within tens of milliseconds and lowers its SM clock
(bench/NOTES.md v30: 1410-1980 MHz, throttle reason SW power cap), so a rate measured in short
synchronized bursts overstates what it sustains by about 12%. The burst rates (20 runs, each
synchronized, after 3 warm-ups: this script's protocol before v30) are written too, as
copy_bytes_per_s_burst and bf16_flops_per_s_burst, and the bench reports a second % of floor
against them. copy_bytes_per_s is the faster of the copy's two protocols.
"""
import json
import statistics
import sys

import torch


def median_ms(fn, repeats=20, warmup=3):
    """Median milliseconds of `repeats` runs of fn, each synchronized (the burst protocol)."""
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


def sustained_median_ms(fn, window_s=0.3, warmup=3):
    """Median milliseconds of fn run back to back for about window_s seconds (the bench's protocol)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    count = min(max(int(window_s * 1000 / max(start.elapsed_time(end), 1e-3)), 10), 2000)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(count + 1)]
    events[0].record()
    for index in range(count):
        fn()
        events[index + 1].record()
    torch.cuda.synchronize()
    return statistics.median(events[i].elapsed_time(events[i + 1]) for i in range(count))


def measure():
    """The ceilings as ceilings.json holds them (the keys below), and the copy's sustained rate alone."""
    n = 1 << 28  # floats: 1 GiB
    src = torch.rand(n, device="cuda")
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)
    copy_burst = 2 * 4 * n / (median_ms(copy) / 1000)
    copy_sustained = 2 * 4 * n / (sustained_median_ms(copy) / 1000)
    size = 8192
    flops = 2 * size**3
    products = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a = torch.randn(size, size, device="cuda", dtype=dtype)
        b = torch.randn(size, size, device="cuda", dtype=dtype)
        products[name] = lambda a=a, b=b: torch.mm(a, b)
    # Every burst first, while the card is below its power cap (a burst timed after a sustained window
    # read lower than the sustained rate), then the sustained windows.
    bursts = {name: flops / (median_ms(product) / 1000) for name, product in products.items()}
    rates = {name: (flops / (sustained_median_ms(product) / 1000), bursts[name]) for name, product in products.items()}
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_bytes_per_s": max(copy_burst, copy_sustained),
        "bf16_flops_per_s": rates["bf16"][0],
        "copy_bytes_per_s_burst": copy_burst,
        "bf16_flops_per_s_burst": rates["bf16"][1],
        # fp16 products sustain less at the power cap (650 against 679 TFLOP/s on the H200, NOTES v41):
        # an fp16 bench's floor takes these.
        "fp16_flops_per_s": rates["fp16"][0],
        "fp16_flops_per_s_burst": rates["fp16"][1],
    }
    return result, copy_sustained


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "ceilings.json"
    result, copy_sustained = measure()
    copy_burst = result["copy_bytes_per_s_burst"]
    rates = {name: (result[f"{name}_flops_per_s"], result[f"{name}_flops_per_s_burst"]) for name in ("bf16", "fp16")}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"ceilings: copy {result['copy_bytes_per_s'] / 1e12:.2f} TB/s (burst {copy_burst / 1e12:.2f}, "
          f"sustained {copy_sustained / 1e12:.2f}), bf16 {rates['bf16'][0] / 1e12:.0f} TFLOP/s sustained "
          f"(burst {rates['bf16'][1] / 1e12:.0f}), fp16 {rates['fp16'][0] / 1e12:.0f} (burst {rates['fp16'][1] / 1e12:.0f})")


if __name__ == "__main__":
    main()
