"""Does the bf16 matrix rate that ceilings.py measures hold under sustained load?

ceilings.py times 20 synchronized 8192^3 products (about 30 ms of work with idle gaps between them).
The bench times each row over ~0.3 s of back-to-back graph replays, long enough for the card to
reach its power cap and lower its clocks. This times the same product both ways: the burst
protocol, then back-to-back for each window in --windows (seconds), reporting the median rate over
the window's second half, with the card's SM clock and power read through torch (NVML) as it runs.
"""
import argparse
import statistics
import time

import torch

from ceilings import median_ms  # scripts/ceilings.py: the burst protocol


def smi():
    try:
        return torch.cuda.clock_rate(), torch.cuda.power_draw() / 1000
    except Exception:  # no NVML: report nothing
        return float("nan"), float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--windows", default="0.3,2,6")
    args = parser.parse_args()
    n = args.size
    flops = 2 * n**3
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    burst_ms = median_ms(lambda: torch.mm(a, b))
    print(f"burst (ceilings.py): {flops / burst_ms / 1e9:.0f} TFLOP/s")
    for window in [float(w) for w in args.windows.split(",")]:
        time.sleep(2)  # let the card settle between windows
        per = burst_ms / 1000
        count = max(int(window / per), 10)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(count + 1)]
        events[0].record()
        readings = []
        for i in range(count):
            torch.mm(a, b)
            events[i + 1].record()
            if i % max(count // 8, 1) == 0:
                readings.append(smi())
        torch.cuda.synchronize()
        times = [events[i].elapsed_time(events[i + 1]) for i in range(count)]
        first = statistics.median(times[: max(count // 10, 1)])
        last = statistics.median(times[count // 2:])
        clocks = [r[0] for r in readings]
        power = [r[1] for r in readings]
        print(f"back-to-back {window:4.1f} s ({count} products): first tenth {flops / first / 1e9:.0f}, "
              f"second half {flops / last / 1e9:.0f} TFLOP/s; SM MHz {min(clocks):.0f}-{max(clocks):.0f}, "
              f"power W {min(power):.0f}-{max(power):.0f}")


if __name__ == "__main__":
    main()
