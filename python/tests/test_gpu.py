"""On a CUDA machine (the H200): outputs against a float32 torch reference, CUDA graph capture and
replay, routing, expert parallelism, chunking, split-K overrides and the atomic top-k sum. Skipped without torch or CUDA.

Run: FUSED_MOE_LIBRARY=/path/libFusedMoEC.so python3 -m pytest python/tests/test_gpu.py -q
The first run compiles the kernels (NVRTC, cached on disk under ~/.cache/swift-fused-moe).
"""

import math

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import fused_moe  # noqa: E402

# name: (E, k, H, I), as in DESIGN.md
PRESETS = {
    "seed4096": (128, 8, 4096, 384),
    "seed8192": (128, 8, 8192, 384),
    "mixtral_tp2": (8, 2, 4096, 7168),
    "qwen235_tp2": (128, 8, 4096, 768),
    "dsv3_tp4": (256, 8, 7168, 512),
}
TOKENS = [1, 7, 128]
TOLERANCE = 1e-2


def reference(x, w1, w2, topk_weights, topk_ids, activation="silu", expert_map=None):
    """The layer in float32, expert by expert: out [M, H] float32."""
    tokens, hidden = x.shape
    intermediate = w1.shape[1] // 2
    out = torch.zeros(tokens, hidden, dtype=torch.float32, device=x.device)
    ids = topk_ids.long()
    local = expert_map.to(x.device).long()[ids] if expert_map is not None else ids
    xf = x.float()
    for expert in torch.unique(local).tolist():
        if expert < 0:
            continue
        token, slot = (local == expert).nonzero(as_tuple=True)
        h = xf[token] @ w1[expert].float().t()
        gate, up = h[:, :intermediate], h[:, intermediate:]
        act = torch.nn.functional.silu(gate) if activation == "silu" else torch.nn.functional.gelu(gate)
        y = (act * up) @ w2[expert].float().t()
        out.index_add_(0, token, y * topk_weights[token, slot].float()[:, None])
    return out


def relative_error(out, expected):
    return ((out.float() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def weights(experts, hidden, intermediate, dtype, seed):
    generator = torch.Generator("cuda").manual_seed(seed)
    w1 = torch.randn(experts, 2 * intermediate, hidden, device="cuda", dtype=dtype, generator=generator)
    w2 = torch.randn(experts, hidden, intermediate, device="cuda", dtype=dtype, generator=generator)
    return w1.mul_(1 / math.sqrt(hidden)), w2.mul_(1 / math.sqrt(intermediate))


def routing(tokens, experts, top_k, seed):
    generator = torch.Generator("cuda").manual_seed(seed)
    logits = torch.randn(tokens, experts, device="cuda", generator=generator)
    topk_weights, topk_ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    return topk_weights.float().contiguous(), topk_ids.to(torch.int32).contiguous()


def activations(tokens, hidden, dtype, seed):
    generator = torch.Generator("cuda").manual_seed(seed)
    return torch.randn(tokens, hidden, device="cuda", dtype=dtype, generator=generator)


def poisoned(tokens, hidden, dtype):
    return torch.full((tokens, hidden), float("nan"), device="cuda", dtype=dtype)


def check(out, expected, label):
    assert torch.isfinite(out).all(), f"{label}: NaN or inf left in the output"
    error = relative_error(out, expected)
    assert error < TOLERANCE, f"{label}: relative error {error:.2e}"
    return error


@pytest.fixture(scope="module", params=list(PRESETS))
def preset(request):
    experts, top_k, hidden, intermediate = PRESETS[request.param]
    w1, w2 = weights(experts, hidden, intermediate, torch.bfloat16, seed=1)
    layer = fused_moe.Layer(experts, top_k, hidden, intermediate, torch.bfloat16, max_tokens=max(TOKENS))
    yield request.param, layer, w1, w2
    layer.close()
    del w1, w2
    torch.cuda.empty_cache()


@pytest.mark.parametrize("tokens", TOKENS)
def test_preset_matches_reference(preset, tokens):
    name, layer, w1, w2 = preset
    x = activations(tokens, layer.hidden_size, torch.bfloat16, seed=tokens)
    topk_weights, topk_ids = routing(tokens, layer.num_experts, layer.top_k, seed=tokens)
    out = poisoned(tokens, layer.hidden_size, torch.bfloat16)
    assert layer(x, w1, w2, topk_weights, topk_ids, out=out) is out
    torch.cuda.synchronize()
    check(out, reference(x, w1, w2, topk_weights, topk_ids), f"{name} M={tokens}")


def test_functional_api_fp16_and_int64_ids():
    experts, top_k, hidden, intermediate = PRESETS["mixtral_tp2"]
    w1, w2 = weights(experts, hidden, intermediate, torch.float16, seed=2)
    x = activations(7, hidden, torch.float16, seed=3)
    topk_weights, topk_ids = routing(7, experts, top_k, seed=4)
    out = fused_moe.fused_moe(x, w1, w2, topk_weights, topk_ids.long())
    assert out.dtype == torch.float16 and out.shape == (7, hidden)
    check(out, reference(x, w1, w2, topk_weights, topk_ids), "mixtral fp16")


def test_gelu_expert_map_and_chunks():
    global_experts, local_experts, top_k, hidden, intermediate = 16, 8, 4, 512, 256
    expert_map = torch.full((global_experts,), -1, dtype=torch.int32)
    expert_map[3:11] = torch.arange(local_experts, dtype=torch.int32)  # this rank holds global experts 3..10
    w1, w2 = weights(local_experts, hidden, intermediate, torch.bfloat16, seed=5)
    layer = fused_moe.Layer(local_experts, top_k, hidden, intermediate, torch.bfloat16, max_tokens=100,
                            activation="gelu", expert_map=expert_map, chunk_tokens=32)
    assert layer.routed_experts == global_experts
    x = activations(100, hidden, torch.bfloat16, seed=6)
    topk_weights, topk_ids = routing(100, global_experts, top_k, seed=7)
    out = layer(x, w1, w2, topk_weights, topk_ids, out=poisoned(100, hidden, torch.bfloat16))
    expected = reference(x, w1, w2, topk_weights, topk_ids, activation="gelu", expert_map=expert_map)
    check(out, expected, "gelu + expert map + 4 chunks")
    rows_without_local_experts = ((expert_map.cuda().long()[topk_ids.long()] < 0).all(dim=1)).nonzero()
    assert (out[rows_without_local_experts.flatten()] == 0).all()
    layer.close()


@pytest.mark.parametrize("split_k, split_mode", [(1, "none"), (4, "workspace"), (4, "atomic"), (0, "workspace")])
def test_split_overrides(split_k, split_mode):
    experts, top_k, hidden, intermediate = PRESETS["seed4096"]
    w1, w2 = weights(experts, hidden, intermediate, torch.bfloat16, seed=8)
    layer = fused_moe.Layer(experts, top_k, hidden, intermediate, max_tokens=8, split_k=split_k,
                            split_mode=split_mode)
    x = activations(7, hidden, torch.bfloat16, seed=9)
    topk_weights, topk_ids = routing(7, experts, top_k, seed=10)
    first = layer(x, w1, w2, topk_weights, topk_ids, out=poisoned(7, hidden, torch.bfloat16))
    check(first, reference(x, w1, w2, topk_weights, topk_ids), f"split {split_k}/{split_mode}")
    if split_mode != "atomic":
        assert torch.equal(first, layer(x, w1, w2, topk_weights, topk_ids)), "not bitwise reproducible"
    layer.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_atomic_combine(dtype):
    """combine='atomic' at 2048 tokens (seed4096: GEMM2 on the persistent kernel, so the atomic sum runs):
    within the bound, near the ordered layer, through the functional API too, and captured in a graph
    (the output's zeroing is a memset node) and replayed on fresh inputs."""
    experts, top_k, hidden, intermediate = PRESETS["seed4096"]
    tokens = 2048
    w1, w2 = weights(experts, hidden, intermediate, dtype, seed=30)
    x = activations(tokens, hidden, dtype, seed=31)
    topk_weights, topk_ids = routing(tokens, experts, top_k, seed=32)
    expected = reference(x, w1, w2, topk_weights, topk_ids)
    ordered = fused_moe.Layer(experts, top_k, hidden, intermediate, dtype, max_tokens=tokens)
    atomic = fused_moe.Layer(experts, top_k, hidden, intermediate, dtype, max_tokens=tokens, combine="atomic")
    first = ordered(x, w1, w2, topk_weights, topk_ids, out=poisoned(tokens, hidden, dtype))
    second = atomic(x, w1, w2, topk_weights, topk_ids, out=poisoned(tokens, hidden, dtype))
    check(first, expected, "ordered")
    check(second, expected, "atomic")
    assert relative_error(second, first.float()) < 8e-3
    functional = fused_moe.fused_moe(x, w1, w2, topk_weights, topk_ids, combine="atomic")
    check(functional, expected, "atomic, functional API")
    with pytest.raises(fused_moe.InvalidArgumentError, match="combine"):
        fused_moe.fused_moe(x, w1, w2, topk_weights, topk_ids, combine="fast")
    in_place = x.clone()  # the sums reach x after GEMM2 has read it
    atomic(in_place, w1, w2, topk_weights, topk_ids, out=in_place)
    check(in_place, expected, "atomic, in place")

    out = torch.empty(tokens, hidden, device="cuda", dtype=dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        atomic(x, w1, w2, topk_weights, topk_ids, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        atomic(x, w1, w2, topk_weights, topk_ids, out=out)
    for seed in (33, 34):
        x.copy_(activations(tokens, hidden, dtype, seed=seed))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out, reference(x, w1, w2, topk_weights, topk_ids), f"atomic graph replay {seed}")
    del graph
    ordered.close()
    atomic.close()


def test_two_slots_in_place():
    """Mixtral (k = 2): the default layer's GEMM2 adds each token's two rows into the zeroed output, which
    gives the same bits in either order; in place (out=x) the sums reach x after GEMM2: the same bits."""
    experts, top_k, hidden, intermediate = PRESETS["mixtral_tp2"]
    tokens = 300
    w1, w2 = weights(experts, hidden, intermediate, torch.bfloat16, seed=40)
    x = activations(tokens, hidden, torch.bfloat16, seed=41)
    topk_weights, topk_ids = routing(tokens, experts, top_k, seed=42)
    layer = fused_moe.Layer(experts, top_k, hidden, intermediate, torch.bfloat16, max_tokens=tokens)
    first = layer(x, w1, w2, topk_weights, topk_ids, out=poisoned(tokens, hidden, torch.bfloat16))
    check(first, reference(x, w1, w2, topk_weights, topk_ids), "k = 2")
    second = layer(x, w1, w2, topk_weights, topk_ids, out=poisoned(tokens, hidden, torch.bfloat16))
    assert torch.equal(first, second), "k = 2: a rerun differs"
    in_place = x.clone()
    layer(in_place, w1, w2, topk_weights, topk_ids, out=in_place)
    assert torch.equal(in_place, first), "k = 2: in place differs"
    layer.close()


def test_each_batch_runs_its_own_plan_on_one_scratch():
    """A layer keeps one plan per run of batch sizes with the same plan (Mixtral up to 1024 tokens: the
    64-row tiles, the 80- to 192-token tiles, the tables' 384, 512 and 1024 entries), all on one scratch.
    Batches from different runs, in an order that makes each reuse what a larger one left in the shared
    scratch, each match the reference; a rerun gives the same bits."""
    experts, top_k, hidden, intermediate = PRESETS["mixtral_tp2"]
    w1, w2 = weights(experts, hidden, intermediate, torch.bfloat16, seed=50)
    layer = fused_moe.Layer(experts, top_k, hidden, intermediate, torch.bfloat16, max_tokens=1024)
    assert layer.info["plan_count"] >= 10, layer.info
    # One scratch: the intermediates of the largest run once (M*k rows of I and of H in bf16), plus each
    # plan's align outputs, far below one full scratch per plan.
    full = 1024 * top_k * (hidden + intermediate) * 2
    assert full <= layer.info["scratch_bytes"] < 2 * full, layer.info
    outputs = {}
    for tokens in [1024, 600, 300, 700, 1, 100, 1000, 600]:
        x = activations(tokens, hidden, torch.bfloat16, seed=tokens)
        topk_weights, topk_ids = routing(tokens, experts, top_k, seed=tokens + 1)
        out = layer(x, w1, w2, topk_weights, topk_ids, out=poisoned(tokens, hidden, torch.bfloat16))
        torch.cuda.synchronize()
        if tokens in outputs:
            assert torch.equal(out, outputs[tokens]), f"M={tokens}: a rerun differs"
        else:
            check(out, reference(x, w1, w2, topk_weights, topk_ids), f"mixtral M={tokens}")
            outputs[tokens] = out
    layer.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("renormalize", [False, True])
def test_route_matches_torch(dtype, renormalize):
    tokens, experts, top_k = 100, 128, 8
    logits = torch.randn(tokens, experts, device="cuda").to(dtype)
    topk_weights, topk_ids = fused_moe.route(logits, top_k, renormalize=renormalize)
    assert topk_ids.dtype == torch.int32 and topk_weights.dtype == torch.float32
    probabilities = torch.softmax(logits.float(), dim=-1)
    expected, _ = torch.topk(probabilities, top_k, dim=-1)
    # Compare the probabilities chosen (ties in bf16 logits may pick either id of equal values).
    torch.testing.assert_close(probabilities.gather(1, topk_ids.long()), expected, rtol=1e-5, atol=1e-6)
    if renormalize:
        expected = expected / expected.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(topk_weights, expected, rtol=1e-5, atol=1e-6)
    assert (topk_ids.sort(dim=1).values.diff(dim=1) > 0).all(), "an expert chosen twice"


def test_graph_capture_and_replay():
    experts, top_k, hidden, intermediate = PRESETS["seed4096"]
    tokens = 16
    w1, w2 = weights(experts, hidden, intermediate, torch.bfloat16, seed=11)
    layer = fused_moe.Layer(experts, top_k, hidden, intermediate, max_tokens=64, renormalize=True)
    x = activations(tokens, hidden, torch.bfloat16, seed=12)
    logits = torch.randn(tokens, experts, device="cuda")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as torch recommends before capture
        layer(x, w1, w2, *layer.route(logits))
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        topk_weights, topk_ids = layer.route(logits)
        out = layer(x, w1, w2, topk_weights, topk_ids)

    for seed in (13, 14):
        x.copy_(activations(tokens, hidden, torch.bfloat16, seed=seed))
        logits.copy_(torch.randn(tokens, experts, device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expected_weights, expected_ids = layer.route(logits)
        assert torch.equal(topk_ids, expected_ids)
        check(out, reference(x, w1, w2, expected_weights, expected_ids), f"graph replay {seed}")
        eager = layer(x, w1, w2, expected_weights, expected_ids)
        assert relative_error(out, eager.float()) < 1e-3
    del graph
    layer.close()


def test_functional_api_in_graph_after_warm_up():
    experts, top_k, hidden, intermediate = PRESETS["qwen235_tp2"]
    w1, w2 = weights(experts, hidden, intermediate, torch.bfloat16, seed=15)
    x = activations(8, hidden, torch.bfloat16, seed=16)
    logits = torch.randn(8, experts, device="cuda")
    fused_moe.fused_moe(x, w1, w2, *fused_moe.route(logits, top_k))  # makes the cached layer and router
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        topk_weights, topk_ids = fused_moe.route(logits, top_k)
        out = fused_moe.fused_moe(x, w1, w2, topk_weights, topk_ids)
    graph.replay()
    torch.cuda.synchronize()
    check(out, reference(x, w1, w2, topk_weights, topk_ids), "functional API in a graph")

    ids64 = topk_ids.long()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(fused_moe.InvalidArgumentError, match="int64"):
        with torch.cuda.graph(graph):
            fused_moe.fused_moe(x, w1, w2, topk_weights, ids64)


def test_library_errors_carry_messages():
    experts, top_k, hidden, intermediate = 8, 2, 256, 128
    layer = fused_moe.Layer(experts, top_k, hidden, intermediate, max_tokens=4)
    w1, w2 = weights(experts, hidden, intermediate, torch.bfloat16, seed=17)
    x = activations(5, hidden, torch.bfloat16, seed=18)
    topk_weights, topk_ids = routing(5, experts, top_k, seed=19)
    with pytest.raises(fused_moe.InvalidArgumentError, match="max_tokens"):
        layer(x, w1, w2, topk_weights, topk_ids)
    with pytest.raises(fused_moe.InvalidArgumentError, match="top_k"):
        fused_moe.Layer(4, 6, hidden, intermediate)
    with pytest.raises(fused_moe.InvalidArgumentError, match="device"):
        fused_moe.Layer(experts, top_k, hidden, intermediate, device=torch.cuda.device_count())
    layer.close()
    with pytest.raises(fused_moe.InvalidArgumentError, match="closed"):
        layer(x[:4], w1, w2, topk_weights[:4], topk_ids[:4])
