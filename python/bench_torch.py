"""Times fused_moe against plain torch in one process, on one GPU.

For each preset and batch size: the package's Layer (one forward, routing given), torch's grouped
GEMM (torch._grouped_mm, when this torch and GPU have it) and a plain loop over experts. Each is
timed with CUDA events around single calls after warm-up; the median is reported, with the
relative error against a float32 reference.

    FUSED_MOE_LIBRARY=.build/release/libFusedMoEC.so python3 python/bench_torch.py [--presets a,b] [--tokens 1,8]
"""

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fused_moe  # noqa: E402

PRESETS = {
    "seed4096": (128, 8, 4096, 384),
    "seed8192": (128, 8, 8192, 384),
    "mixtral_tp2": (8, 2, 4096, 7168),
    "qwen235_tp2": (128, 8, 4096, 768),
    "dsv3_tp4": (256, 8, 7168, 512),
}


def torch_loop(x, w1, w2, topk_weights, topk_ids):
    """The plain torch layer: one pair of matmuls per expert that has tokens (bf16, fp32 sum)."""
    intermediate = w1.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    tokens = order // topk_ids.shape[1]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start:start + count]
        h = x[rows] @ w1[expert].t()
        y = (torch.nn.functional.silu(h[:, :intermediate]) * h[:, intermediate:]) @ w2[expert].t()
        out.index_add_(0, rows, y.float() * topk_weights.reshape(-1)[order[start:start + count], None])
        start += count
    return out.to(x.dtype)


def torch_grouped(x, w1, w2, topk_weights, topk_ids):
    """torch._grouped_mm over the tokens sorted by expert."""
    intermediate = w1.shape[1] // 2
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    offsets = torch.cumsum(torch.bincount(flat, minlength=w1.shape[0]), 0).to(torch.int32)
    tokens = order // topk_ids.shape[1]
    h = torch._grouped_mm(x[tokens], w1.transpose(1, 2), offs=offsets)
    act = torch.nn.functional.silu(h[:, :intermediate]) * h[:, intermediate:]
    y = torch._grouped_mm(act, w2.transpose(1, 2), offs=offsets)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, tokens, y.float() * topk_weights.reshape(-1)[order, None])
    return out.to(x.dtype)


def reference(x, w1, w2, topk_weights, topk_ids):
    intermediate = w1.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in torch.unique(topk_ids).tolist():
        token, slot = (topk_ids == expert).nonzero(as_tuple=True)
        h = x[token].float() @ w1[expert].float().t()
        y = (torch.nn.functional.silu(h[:, :intermediate]) * h[:, intermediate:]) @ w2[expert].float().t()
        out.index_add_(0, token, y * topk_weights[token, slot, None])
    return out


def time_ms(function, warmup, iterations):
    for _ in range(warmup):
        function()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iterations)]
    for start, end in events:
        start.record()
        function()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def relative_error(out, expected):
    return ((out.float() - expected).norm() / expected.norm()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--tokens", default="1,8,32,128,512,2048")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-loop", action="store_true", help="skip the plain loop over experts (slow at large E)")
    arguments = parser.parse_args()
    token_counts = [int(value) for value in arguments.tokens.split(",")]
    grouped = hasattr(torch, "_grouped_mm")

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, fused_moe {fused_moe.version()} "
          f"({fused_moe.library_path()})")
    columns = ["shape", "M", "fused_moe ms", "grouped_mm ms", "loop ms", "vs best torch", "rel err", "torch err"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name in arguments.presets.split(","):
        experts, top_k, hidden, intermediate = PRESETS[name]
        generator = torch.Generator("cuda").manual_seed(0)
        w1 = torch.randn(experts, 2 * intermediate, hidden, device="cuda", dtype=torch.bfloat16, generator=generator)
        w2 = torch.randn(experts, hidden, intermediate, device="cuda", dtype=torch.bfloat16, generator=generator)
        w1.mul_(1 / math.sqrt(hidden))
        w2.mul_(1 / math.sqrt(intermediate))
        layer = fused_moe.Layer(experts, top_k, hidden, intermediate, torch.bfloat16, max_tokens=max(token_counts))
        for tokens in token_counts:
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=generator)
            logits = torch.randn(tokens, experts, device="cuda", generator=generator)
            topk_weights, topk_ids = layer.route(logits)
            out = torch.empty_like(x)
            ours = time_ms(lambda: layer(x, w1, w2, topk_weights, topk_ids, out=out),
                           arguments.warmup, arguments.iterations)
            expected = reference(x, w1, w2, topk_weights, topk_ids)
            error = relative_error(layer(x, w1, w2, topk_weights, topk_ids), expected)
            times, torch_error = {}, float("nan")
            if grouped:
                try:
                    torch_error = relative_error(torch_grouped(x, w1, w2, topk_weights, topk_ids), expected)
                    times["grouped"] = time_ms(lambda: torch_grouped(x, w1, w2, topk_weights, topk_ids),
                                               arguments.warmup, arguments.iterations)
                except RuntimeError as failure:  # an older GPU or torch without this path
                    print(f"# torch._grouped_mm failed: {str(failure).splitlines()[0]}", file=sys.stderr)
                    grouped = False
            if not arguments.no_loop:
                loop_error = relative_error(torch_loop(x, w1, w2, topk_weights, topk_ids), expected)
                torch_error = loop_error if math.isnan(torch_error) else torch_error
                times["loop"] = time_ms(lambda: torch_loop(x, w1, w2, topk_weights, topk_ids),
                                        max(1, arguments.warmup // 2), max(5, arguments.iterations // 5))
            best = min(times.values()) if times else float("nan")
            cells = [name, str(tokens), f"{ours:.4f}", f"{times.get('grouped', float('nan')):.4f}",
                     f"{times.get('loop', float('nan')):.4f}", f"{best / ours:.2f}x", f"{error:.1e}",
                     f"{torch_error:.1e}"]
            print("| " + " | ".join(cells) + " |", flush=True)
        layer.close()
        del w1, w2
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
