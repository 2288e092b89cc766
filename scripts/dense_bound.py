"""What PyTorch's own GEMMs reach on the layer's two products, on the GPU machine: a reference for the
bars of issue 4 that does not depend on our kernels.

For each preset and token count it times, with ceilings.py's sustained protocol (back to back for about
0.3 s, events between runs, median):
- dense1, dense2: one cuBLAS product of the layer's shape with every row on one weight,
  [M k, H] x [H, 2I] and [M k, I] x [I, H]. A dense product is easier than the grouped one: one weight
  matrix that stays in L2, no gathered rows, no padding to a tile, no expert boundaries;
- grouped1, grouped2: torch._grouped_mm (PyTorch's CUTLASS grouped GEMM) over the experts, each
  expert's rows as a random top-k routing gives them (softmax of normal logits), rows contiguous per
  expert (so no gather, no scatter);
- combine_bmm: the top-k weighted sum of the partial rows as [M, 1, k] x [M, k, H] (a batched product;
  for reference only: it runs far below the copy rate, 3x slower than our combine kernel, NOTES v44).
Then bound_ms = dense1 + dense2 + combine_ideal, where combine_ideal is the top-k sum's bytes (the
partial rows read, the output written) at the copy rate, leaving out align and the activation (dense2
writes the partial rows, as GEMM2 does); and pct_floor = floor / max(bound, floor) with the bench's floor
(max of the minimum bytes at the copy rate and the FLOPs at the sustained bf16 rate, both measured in the
same run by scripts/ceilings.py's measure()). That is the best % of floor a layer built from cuBLAS's dense products and a copy-rate
combine could read where the floor is the FLOPs (a dense product does not stream every expert's weights,
so where the floor is the bytes the bound says nothing).

Usage: python3 scripts/dense_bound.py OUT.json [shape:M,M ...]   (default: the k = 8 presets' rows
from 1024 tokens and Mixtral's 512-1024). Inputs are random normal (never zeros); every product's
result is checked finite and against an fp32 product on a slice.
"""
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ceilings import measure, sustained_median_ms  # noqa: E402

PRESETS = {  # name: (experts, top-k, hidden, intermediate), as Sources/FusedMoE/Layer/Presets.swift
    "seed4096": (128, 8, 4096, 384),
    "seed8192": (128, 8, 8192, 384),
    "mixtral_tp2": (8, 2, 4096, 7168),
    "qwen235_tp2": (128, 8, 4096, 768),
    "dsv3_tp4": (256, 8, 7168, 512),
}
DEFAULT_ROWS = ["seed4096:1024,2048,4096,8192", "seed8192:1024,2048,4096", "qwen235_tp2:1024,2048,4096,8192",
                "dsv3_tp4:1024,2048,4096,8192", "mixtral_tp2:512,1024"]


def checked(name, got, a, b):
    """got = a x b, checked finite and against fp32 on the first 64 rows and columns."""
    if not torch.isfinite(got).all():
        raise SystemExit(f"{name}: non-finite result")
    ref = a[:64].float() @ b[:, :64].float()
    err = ((got[:64, :64].float() - ref).norm() / ref.norm()).item()
    if not err < 2e-2:
        raise SystemExit(f"{name}: relative error {err:.3e} against fp32")
    return err


def row(shape, tokens, ceilings):
    experts, topk, hidden, inter = PRESETS[shape]
    rows = tokens * topk
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(rows, hidden, device=dev, dtype=bf)
    w1 = torch.randn(hidden, 2 * inter, device=dev, dtype=bf) / hidden ** 0.5
    y = torch.randn(rows, inter, device=dev, dtype=bf)
    w2 = torch.randn(inter, hidden, device=dev, dtype=bf) / inter ** 0.5
    out1 = torch.empty(rows, 2 * inter, device=dev, dtype=bf)
    out2 = torch.empty(rows, hidden, device=dev, dtype=bf)
    result = {"shape": shape, "M": tokens, "E": experts, "topk": topk, "H": hidden, "I": inter}
    flops1, flops2 = 2 * rows * hidden * 2 * inter, 2 * rows * inter * hidden
    dense1 = lambda: torch.mm(x, w1, out=out1)
    dense2 = lambda: torch.mm(y, w2, out=out2)
    dense1()
    dense2()
    torch.cuda.synchronize()
    result["dense_rel_err"] = max(checked("dense1", out1, x, w1), checked("dense2", out2, y, w2))
    result["dense1_ms"] = sustained_median_ms(dense1)
    result["dense2_ms"] = sustained_median_ms(dense2)
    # The routing: each token's top-k experts of normal logits; rows grouped by expert.
    chosen = torch.randn(tokens, experts, device=dev).topk(topk, dim=1).indices.flatten()
    counts = torch.bincount(chosen, minlength=experts)
    offsets = counts.cumsum(0).to(torch.int32)
    g1 = torch.randn(experts, 2 * inter, hidden, device=dev, dtype=bf).transpose(-2, -1) / hidden ** 0.5
    g2 = torch.randn(experts, hidden, inter, device=dev, dtype=bf).transpose(-2, -1) / inter ** 0.5
    # If the build wants each group's rows a multiple of 16, the rows are padded to that (as a tile would).
    padded_offsets = ((counts + 15) // 16 * 16).cumsum(0).to(torch.int32)
    for name, a, w in (("grouped1", x, g1), ("grouped2", y, g2)) if hasattr(torch, "_grouped_mm") else ():
        got = None
        for offs in (offsets, padded_offsets):
            if offs is padded_offsets:
                a = torch.randn(int(padded_offsets[-1].item()), a.shape[1], device=dev, dtype=bf)
            fn = lambda a=a, w=w, offs=offs: torch._grouped_mm(a, w, offs=offs)
            try:
                got = fn()
            except Exception as error:  # noqa: BLE001 (an unsupported build or shape: reported, not timed)
                result[name + "_error"] = str(error).splitlines()[0][:200]
                continue
            result[name + "_padded16"] = offs is padded_offsets
            result.pop(name + "_error", None)
            break
        if got is None:
            continue
        torch.cuda.synchronize()
        first = int(counts[0].item())
        if first >= 1:
            checked(name, got[:first], a[:first], w[0])
        result[name + "_ms"] = sustained_median_ms(fn)
    del g1, g2
    partial = torch.randn(tokens, topk, hidden, device=dev, dtype=bf)
    weights = torch.rand(tokens, 1, topk, device=dev, dtype=bf)
    combined = torch.empty(tokens, 1, hidden, device=dev, dtype=bf)
    combine = lambda: torch.bmm(weights, partial, out=combined)
    result["combine_bmm_ms"] = sustained_median_ms(combine)
    result["combine_ideal_ms"] = 1000 * (rows * hidden * 2 + tokens * hidden * 2) / ceilings["copy"]
    flops = flops1 + flops2
    touched = int((counts > 0).sum().item())
    weight_bytes = touched * 3 * hidden * inter * 2
    bytes_ = weight_bytes + 2 * tokens * hidden * 2
    floor_ms = 1000 * max(bytes_ / ceilings["copy"], flops / ceilings["bf16"])
    bound = result["dense1_ms"] + result["dense2_ms"] + result["combine_ideal_ms"]
    result.update(floor_ms=floor_ms, bound_ms=bound, pct_floor=100 * floor_ms / max(bound, floor_ms),
                  dense1_tflops=flops1 / result["dense1_ms"] / 1e9, dense2_tflops=flops2 / result["dense2_ms"] / 1e9)
    for name, k in (("grouped1", flops1), ("grouped2", flops2)):
        if name + "_ms" in result:
            result[name + "_tflops"] = k / result[name + "_ms"] / 1e9
    return result


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "dense-bound.json"
    specs = sys.argv[2:] or DEFAULT_ROWS
    torch.manual_seed(0)
    measured, _ = measure()  # the bench's ceilings (scripts/ceilings.py)
    ceilings = {"copy": measured["copy_bytes_per_s"], "bf16": measured["bf16_flops_per_s"]}
    torch.cuda.empty_cache()
    print(f"ceilings: copy {ceilings['copy'] / 1e12:.2f} TB/s, bf16 {ceilings['bf16'] / 1e12:.0f} TFLOP/s sustained",
          flush=True)
    results = []
    for spec in specs:
        shape, _, sizes = spec.partition(":")
        if shape not in PRESETS:
            raise SystemExit(f"dense_bound.py: unknown shape '{shape}' (expected one of {', '.join(PRESETS)})")
        for tokens in (int(s) for s in sizes.split(",")):
            r = row(shape, tokens, ceilings)
            results.append(r)
            g = " ".join(f"{n} {r[n + '_ms']:.4f} ms ({r[n + '_tflops']:.0f} TFLOP/s)"
                         for n in ("grouped1", "grouped2") if n + "_ms" in r)
            errors = " ".join(f"{n}: {r[n + '_error']}" for n in ("grouped1", "grouped2") if n + "_error" in r)
            print(f"{shape} {tokens}: dense1 {r['dense1_ms']:.4f} ms ({r['dense1_tflops']:.0f} TFLOP/s), dense2 "
                  f"{r['dense2_ms']:.4f} ({r['dense2_tflops']:.0f}), combine ideal {r['combine_ideal_ms']:.4f} "
                  f"(bmm {r['combine_bmm_ms']:.4f}); bound "
                  f"{r['bound_ms']:.4f} ms = {r['pct_floor']:.0f}% of floor {r['floor_ms']:.4f}; {g} {errors}",
                  flush=True)
            torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "copy_bytes_per_s": ceilings["copy"], "bf16_flops_per_s": ceilings["bf16"],
                   "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
