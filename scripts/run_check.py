"""GPU-machine check of `fused-moe run`: writes a safetensors input with torch, runs the binary on
the CUDA and CPU backends, and compares both outputs with a float32 torch reference.

Usage: python3 scripts/run_check.py dist/fused-moe OUTDIR
"""
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

binary, folder = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
M, E, k, H, I = 37, 16, 4, 512, 256
x = torch.randn(M, H).bfloat16()
w1 = (torch.rand(E, 2 * I, H) * 2 - 1).mul(1.7 / H**0.5).bfloat16()
w2 = (torch.rand(E, H, I) * 2 - 1).mul(1.7 / I**0.5).bfloat16()
logits = torch.randn(M, E)
save_file({"x": x, "w1": w1, "w2": w2, "router_logits": logits}, f"{folder}/run-in.safetensors")

probs = torch.softmax(logits.float(), dim=-1)
weights, ids = torch.topk(probs, k, dim=-1)
weights = weights / weights.sum(-1, keepdim=True)
ref = torch.zeros(M, H)
for t in range(M):
    for j in range(k):
        e = ids[t, j]
        h = w1[e].float() @ x[t].float()
        a = torch.nn.functional.silu(h[:I]) * h[I:]
        ref[t] += weights[t, j] * (w2[e].float() @ a)

failed = 0
for backend in ("cuda", "cpu"):
    out_path = f"{folder}/run-out-{backend}.safetensors"
    subprocess.run([binary, "run", "--in", f"{folder}/run-in.safetensors", "--out", out_path, "--top-k", str(k),
                    "--renormalize", "--backend", backend], check=True)
    out = load_file(out_path)
    rel = ((out["out"].float() - ref).norm() / ref.norm()).item()
    same_ids = torch.equal(out["topk_ids"].long(), ids.long()) if "topk_ids" in out else False
    ok = rel < 1e-2 and same_ids and out["out"].dtype == torch.bfloat16
    failed += not ok
    print(("PASS" if ok else "FAIL"), f"run --backend {backend}: rel_err {rel:.2e}, topk_ids equal {same_ids}")
print(f"{2 - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
