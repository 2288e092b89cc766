"""The torch API: fused_moe(), route(), Layer and Router, over the C library through ctypes.

Every call checks its tensors in Python first (types and dtypes, then shapes, contiguity, devices)
and raises before the library sees them; the library checks again and its errors come back as the
same exception classes with its message. Work is enqueued on torch's current stream of the
tensors' device. Nothing here allocates through anything but torch's allocator, so a forward can
be captured with torch.cuda.graph once its layer exists.
"""

import ctypes
import threading

try:
    import torch
except ImportError:  # the ctypes ABI (fused_moe._lib) works without torch
    torch = None

from . import _lib
from ._errors import ArgumentTypeError, InvalidArgumentError

# The smallest max_tokens the functional API makes a layer for: decode batches share one layer.
_MINIMUM_CACHED_TOKENS = 256


def _require_torch():
    if torch is None:
        raise ImportError(
            "fused_moe's tensor API needs PyTorch (pip install torch); the C ABI in fused_moe._lib works without it")


def _capturing():
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _parse_dtype(dtype):
    if isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "half": torch.float16}
        if dtype.lower() not in names:
            raise ArgumentTypeError(f"dtype must be 'bfloat16' or 'float16', got {dtype!r}")
        return names[dtype.lower()]
    return dtype


def _dtype_code(dtype, name):
    if dtype == torch.bfloat16:
        return _lib.BF16
    if dtype == torch.float16:
        return _lib.FP16
    raise ArgumentTypeError(f"{name} must be torch.bfloat16 or torch.float16, got {dtype}")


def _logits_dtype_code(dtype):
    if dtype == torch.float32:
        return _lib.FP32
    return _dtype_code(dtype, "router_logits")


def _require_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _activation_code(activation):
    if activation not in _lib.ACTIVATIONS:
        raise InvalidArgumentError(f"activation must be one of {sorted(_lib.ACTIVATIONS)}, got {activation!r}")
    return _lib.ACTIVATIONS[activation]


def _combine_code(combine):
    if combine not in _lib.COMBINES:
        raise InvalidArgumentError(f"combine must be one of {sorted(_lib.COMBINES)}, got {combine!r}")
    return _lib.COMBINES[combine]


def _split_mode_code(split_mode):
    if split_mode not in _lib.SPLIT_MODES:
        raise InvalidArgumentError(f"split_mode must be one of {sorted(_lib.SPLIT_MODES)}, got {split_mode!r}")
    return _lib.SPLIT_MODES[split_mode]


def _device_index(device):
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        index = device
    else:
        device = torch.device(device)
        if device.type != "cuda":
            raise InvalidArgumentError(f"device must be a CUDA device, got {device}")
        index = torch.cuda.current_device() if device.index is None else device.index
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise InvalidArgumentError(f"device {index} is out of range: {count} CUDA device(s) are visible")
    return index


def _require_cuda(named, device=None):
    """All tensors on one CUDA device (device's, when given); returns it."""
    for name, tensor in named:
        if tensor.device.type != "cuda":
            raise InvalidArgumentError(f"{name} must be on a CUDA device, got {tensor.device}")
        if device is None:
            device = tensor.device
        elif tensor.device != device:
            raise InvalidArgumentError(
                f"{name} is on {tensor.device}, {named[0][0]} on {device}: all tensors must be on one CUDA device")
    return device


def _require_contiguous(named):
    for name, tensor in named:
        if not tensor.is_contiguous():
            raise InvalidArgumentError(
                f"{name} must be contiguous (strides {tuple(tensor.stride())} for shape {tuple(tensor.shape)})")


def _check_forward(x, w1, w2, topk_weights, topk_ids, out):
    """Checks a forward's tensors; returns (M, H, E, I, k). Order: types, dtypes, shapes, layout, device."""
    named = [("x", x), ("w1", w1), ("w2", w2), ("topk_weights", topk_weights), ("topk_ids", topk_ids)]
    if out is not None:
        named.append(("out", out))
    for name, value in named:
        _require_tensor(name, value)
    _dtype_code(x.dtype, "x")
    for name, tensor in (("w1", w1), ("w2", w2), ("out", out)):
        if tensor is not None and tensor.dtype != x.dtype:
            raise ArgumentTypeError(f"{name} must have x's dtype {x.dtype}, got {tensor.dtype}")
    if topk_weights.dtype != torch.float32:
        raise ArgumentTypeError(f"topk_weights must be torch.float32, got {topk_weights.dtype}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ArgumentTypeError(f"topk_ids must be torch.int32 (or int64, copied), got {topk_ids.dtype}")

    if x.dim() != 2:
        raise InvalidArgumentError(f"x must be 2-D [tokens, hidden], got shape {tuple(x.shape)}")
    tokens, hidden = x.shape
    if w1.dim() != 3 or w1.shape[2] != hidden or w1.shape[1] % 2 != 0:
        raise InvalidArgumentError(
            f"w1 must be [experts, 2 * intermediate, hidden] with hidden = {hidden}, got {tuple(w1.shape)}")
    experts, intermediate = w1.shape[0], w1.shape[1] // 2
    if tuple(w2.shape) != (experts, hidden, intermediate):
        raise InvalidArgumentError(
            f"w2 must be [experts, hidden, intermediate] = {[experts, hidden, intermediate]} to match w1 "
            f"{tuple(w1.shape)}, got {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != tokens:
        raise InvalidArgumentError(
            f"topk_ids must be [tokens, top_k] with tokens = {tokens}, got {tuple(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise InvalidArgumentError(
            f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}")
    if out is not None and tuple(out.shape) != (tokens, hidden):
        raise InvalidArgumentError(f"out must be [tokens, hidden] = {[tokens, hidden]}, got {tuple(out.shape)}")
    _require_contiguous(named)
    _require_cuda(named)
    return tokens, hidden, experts, intermediate, topk_ids.shape[1]


def _int32_ids(topk_ids):
    if topk_ids.dtype == torch.int32:
        return topk_ids
    if _capturing():
        raise InvalidArgumentError(
            "topk_ids is int64: converting it to int32 allocates, which CUDA graph capture forbids; "
            "pass int32 ids (fused_moe.route returns them)")
    return topk_ids.to(torch.int32)


def _check_logits(router_logits, num_experts, device=None):
    _require_tensor("router_logits", router_logits)
    code = _logits_dtype_code(router_logits.dtype)
    if router_logits.dim() != 2:
        raise InvalidArgumentError(f"router_logits must be 2-D [tokens, experts], got {tuple(router_logits.shape)}")
    if num_experts is not None and router_logits.shape[1] != num_experts:
        raise InvalidArgumentError(
            f"router_logits must have {num_experts} columns (the router's experts), got {router_logits.shape[1]}")
    _require_contiguous([("router_logits", router_logits)])
    _require_cuda([("router_logits", router_logits)], device)
    return code


class _Handle:
    """A C layer handle, destroyed once: by close() or when garbage collected."""

    def __init__(self):
        self.library = _lib.load()
        self.value = None

    def create(self, function, *arguments):
        handle = ctypes.c_void_p()
        _lib.check(function(ctypes.byref(handle), *arguments))
        self.value = handle.value

    def get(self):
        if self.value is None:
            raise InvalidArgumentError("this layer was closed")
        return self.value

    def info(self):
        info = _lib.LayerInfo()
        _lib.check(self.library.fused_moe_layer_get_info(self.get(), ctypes.byref(info)))
        return info.as_dict()

    def close(self):
        value, self.value = self.value, None
        if value is not None:
            self.library.fused_moe_layer_destroy(value)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: ctypes may be half gone
            pass


class _DeviceScope:
    """Makes the layer's device torch's current one for a call, only when it is not already."""

    def __init__(self, index):
        self.index = index
        self.scope = None

    def __enter__(self):
        if torch.cuda.current_device() != self.index:
            self.scope = torch.cuda.device(self.index)
            self.scope.__enter__()

    def __exit__(self, *exc):
        if self.scope is not None:
            self.scope.__exit__(*exc)
            self.scope = None


def _route(handle, library, router_logits, num_experts, top_k, device_index):
    device = torch.device("cuda", device_index)
    code = _check_logits(router_logits, num_experts, device)
    tokens = router_logits.shape[0]
    topk_ids = torch.empty((tokens, top_k), dtype=torch.int32, device=device)
    topk_weights = torch.empty((tokens, top_k), dtype=torch.float32, device=device)
    if tokens > 0:
        stream = torch.cuda.current_stream(device).cuda_stream
        with _DeviceScope(device_index):
            _lib.check(library.fused_moe_route(
                handle, router_logits.data_ptr(), code, tokens, num_experts, topk_ids.data_ptr(),
                topk_weights.data_ptr(), stream))
    return topk_weights, topk_ids


class Layer:
    """The fused MoE layer of one shape on one GPU.

    Making it compiles the kernels for every batch size up to max_tokens (NVRTC, cached on disk:
    the first Layer of a shape on a machine can take up to a minute, later ones load the cache)
    and allocates all scratch; calling it then only enqueues kernels on torch's current stream,
    so calls can be captured in a CUDA graph. The weights are passed to each call: one Layer
    serves every MoE layer of a model that has this shape, but its scratch is shared, so do not
    run two calls of one Layer on different streams at once. Keep a Layer alive while graphs that
    captured it are replayed.

    Args:
        num_experts: E, the experts w1 and w2 hold (local experts under expert parallelism).
        top_k: experts per token.
        hidden_size: H; intermediate_size: I (w1 is [E, 2I, H], w2 [E, H, I]).
        dtype: torch.bfloat16 or torch.float16 (or 'bfloat16', 'float16').
        max_tokens: the most tokens one call takes.
        activation: 'silu' or 'gelu'.
        expert_map: expert parallelism: [global experts] ints, the local expert of each router
            expert or -1; topk_ids are then global ids.
        renormalize: route() divides the top-k weights by their sum.
        chunk_tokens: batches larger than this run in chunks (0: the library's default).
        split_k, split_mode: split-K override (0 and 'auto': the plan's choice).
        combine: how each token's k expert rows are summed: 'ordered' (bitwise reproducible) or
            'atomic' (the second GEMM adds them into the output with 16-bit atomics where its kernel
            can: faster at large batches, not bitwise reproducible; elsewhere ordered).
        device: the CUDA device (default: the current one).
    """

    def __init__(self, num_experts, top_k, hidden_size, intermediate_size, dtype=None, *,
                 max_tokens=_lib.DEFAULT_MAX_TOKENS, activation="silu", expert_map=None, renormalize=False,
                 chunk_tokens=0, split_k=0, split_mode="auto", combine="ordered", device=None):
        _require_torch()
        dtype = torch.bfloat16 if dtype is None else _parse_dtype(dtype)
        dtype_code = _dtype_code(dtype, "dtype")
        activation_code = _activation_code(activation)
        split_mode_code = _split_mode_code(split_mode)
        combine_code = _combine_code(combine)
        index = _device_index(device)
        if _capturing():
            raise InvalidArgumentError(
                "a Layer cannot be made during CUDA graph capture (it compiles kernels and allocates); make it before")
        self._handle = _Handle()
        library = self._handle.library
        options = _lib.Options()
        _lib.check(library.fused_moe_options_init(ctypes.byref(options)))
        options.activation = activation_code
        options.renormalize = 1 if renormalize else 0
        options.device = index
        options.max_tokens = int(max_tokens)
        options.chunk_tokens = int(chunk_tokens)
        options.split_k = int(split_k)
        options.split_mode = split_mode_code
        options.combine = combine_code
        if expert_map is not None:
            values = expert_map.tolist() if isinstance(expert_map, torch.Tensor) else list(expert_map)
            map_array = (ctypes.c_int32 * len(values))(*[int(v) for v in values])
            options.expert_map = ctypes.cast(map_array, ctypes.POINTER(ctypes.c_int32))
            options.expert_map_length = len(values)
        with torch.cuda.device(index):
            self._handle.create(
                library.fused_moe_layer_create, int(num_experts), int(top_k), int(hidden_size),
                int(intermediate_size), dtype_code, ctypes.byref(options))
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        self.dtype = dtype
        self.max_tokens = int(max_tokens)
        self.activation = activation
        self.device = index
        self.info = self._handle.info()
        self.routed_experts = self.info["routed_experts"]

    def __call__(self, x, w1, w2, topk_weights, topk_ids, out=None):
        """out [M, H] = the MoE layer of x [M, H] with w1 [E, 2I, H], w2 [E, H, I], the routing
        topk_ids [M, k] (int32; int64 is copied, outside graph capture only) and topk_weights
        [M, k] (float32). out, if given, is written (not accumulated into)."""
        tokens, hidden, experts, intermediate, top_k = _check_forward(x, w1, w2, topk_weights, topk_ids, out)
        if (experts, top_k, hidden, intermediate) != (
                self.num_experts, self.top_k, self.hidden_size, self.intermediate_size):
            raise InvalidArgumentError(
                f"the tensors have E={experts} k={top_k} H={hidden} I={intermediate}; this layer was made for "
                f"E={self.num_experts} k={self.top_k} H={self.hidden_size} I={self.intermediate_size}")
        if x.dtype != self.dtype:
            raise ArgumentTypeError(f"x is {x.dtype}; this layer was made for {self.dtype}")
        if x.device.index != self.device:
            raise InvalidArgumentError(f"the tensors are on {x.device}; this layer was made on cuda:{self.device}")
        if tokens > self.max_tokens:
            raise InvalidArgumentError(f"{tokens} tokens exceed this layer's max_tokens ({self.max_tokens})")
        handle = self._handle.get()
        topk_ids = _int32_ids(topk_ids)
        if out is None:
            out = torch.empty((tokens, hidden), dtype=x.dtype, device=x.device)
        if tokens == 0:
            return out
        stream = torch.cuda.current_stream(x.device).cuda_stream
        with _DeviceScope(self.device):
            _lib.check(self._handle.library.fused_moe_forward(
                handle, x.data_ptr(), topk_ids.data_ptr(), topk_weights.data_ptr(), w1.data_ptr(), w2.data_ptr(),
                out.data_ptr(), tokens, hidden, hidden, stream))
        return out

    forward = __call__

    def route(self, router_logits):
        """(topk_weights [M, k] float32, topk_ids [M, k] int32): the top-k of softmax(router_logits
        [M, routed experts]) (bf16, fp16 or fp32), renormalized if the layer was made so."""
        return _route(self._handle.get(), self._handle.library, router_logits, self.routed_experts, self.top_k,
                      self.device)

    def close(self):
        """Frees the layer's device memory now, after the device finished its queued work. CUDA
        graphs that captured the layer must not be replayed afterwards."""
        if self._handle.value is not None and not _capturing():
            torch.cuda.synchronize(self.device)
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"fused_moe.Layer(E={self.num_experts}, k={self.top_k}, H={self.hidden_size}, "
                f"I={self.intermediate_size}, dtype={self.dtype}, max_tokens={self.max_tokens}, "
                f"device=cuda:{self.device}, plans={self.info['plan_count']}, "
                f"scratch={self.info['scratch_bytes'] / 2**20:.1f} MiB)")


class Router:
    """Top-k softmax routing on one GPU, without a layer: route(router_logits) -> (weights, ids)."""

    def __init__(self, num_experts, top_k, renormalize=False, device=None):
        _require_torch()
        index = _device_index(device)
        if _capturing():
            raise InvalidArgumentError("a Router cannot be made during CUDA graph capture; make it before")
        self._handle = _Handle()
        with torch.cuda.device(index):
            self._handle.create(
                self._handle.library.fused_moe_router_create, int(num_experts), int(top_k), 1 if renormalize else 0,
                index)
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.renormalize = bool(renormalize)
        self.device = index

    def __call__(self, router_logits):
        return _route(self._handle.get(), self._handle.library, router_logits, self.num_experts, self.top_k,
                      self.device)

    route = __call__

    def close(self):
        self._handle.close()


_cache_lock = threading.Lock()
_layers = {}
_routers = {}


def _expert_map_key(expert_map):
    if expert_map is None:
        return None
    if isinstance(expert_map, torch.Tensor):
        if expert_map.device.type == "cuda" and _capturing():
            raise InvalidArgumentError("expert_map on the GPU cannot be read during graph capture; pass a list")
        return tuple(int(v) for v in expert_map.tolist())
    return tuple(int(v) for v in expert_map)


def fused_moe(x, w1, w2, topk_weights, topk_ids, *, activation="silu", out=None, expert_map=None, max_tokens=None,
              chunk_tokens=0, split_k=0, split_mode="auto", combine="ordered"):
    """The fused MoE layer: out [M, H] from x [M, H], w1 [E, 2I, H], w2 [E, H, I], topk_weights
    [M, k] (float32) and topk_ids [M, k] (int32, or int64 copied outside graph capture), on torch's
    current stream. All tensors on one CUDA device; x, w1, w2 (and out) bf16 or fp16 alike.

    Layers are cached per shape, dtype, device and options, with max_tokens the next power of two
    >= M (at least 256) unless given. expert_map is best a list or tuple here (a CUDA tensor is read
    back to the host on every call); a Layer takes it once. Graph capture works once a layer for the batch exists: run
    the batch size (or a larger one) once before capturing, or use a fused_moe.Layer.
    """
    _require_torch()
    _activation_code(activation)
    _split_mode_code(split_mode)
    _combine_code(combine)
    tokens, hidden, experts, intermediate, top_k = _check_forward(x, w1, w2, topk_weights, topk_ids, out)
    map_key = _expert_map_key(expert_map)
    key = (experts, top_k, hidden, intermediate, x.dtype, x.device.index, activation, map_key, int(chunk_tokens),
           int(split_k), split_mode, combine)
    with _cache_lock:
        candidates = _layers.setdefault(key, [])
        layer = next((layer for layer in candidates if layer.max_tokens >= tokens
                      and (max_tokens is None or layer.max_tokens == max_tokens)), None)
        if layer is None:
            size = int(max_tokens) if max_tokens is not None else max(
                _MINIMUM_CACHED_TOKENS, 1 << max(tokens - 1, 0).bit_length())
            if tokens > size:
                raise InvalidArgumentError(f"{tokens} tokens exceed max_tokens ({size})")
            if _capturing():
                raise InvalidArgumentError(
                    f"no layer for {tokens} tokens exists yet, and making one during CUDA graph capture would "
                    "compile and allocate: call fused_moe with this batch size once before capturing, or use "
                    "fused_moe.Layer")
            layer = Layer(experts, top_k, hidden, intermediate, x.dtype, max_tokens=size, activation=activation,
                          expert_map=map_key, chunk_tokens=chunk_tokens, split_k=split_k, split_mode=split_mode,
                          combine=combine,
                          device=x.device.index)
            candidates.append(layer)
            candidates.sort(key=lambda cached: cached.max_tokens)
    return layer(x, w1, w2, topk_weights, topk_ids, out=out)


def route(router_logits, top_k, renormalize=False):
    """(topk_weights [M, k] float32, topk_ids [M, k] int32): the top-k experts of
    softmax(router_logits [M, E]) per token, descending, ties to the lower id; the weights divided
    by their sum when renormalize. router_logits: bf16, fp16 or fp32, contiguous, on a CUDA device."""
    _require_torch()
    _check_logits(router_logits, None)
    experts = router_logits.shape[1]
    if not 1 <= int(top_k) <= min(experts, 32):
        raise InvalidArgumentError(f"top_k must be in 1...{min(experts, 32)} for {experts} experts, got {top_k}")
    key = (experts, int(top_k), bool(renormalize), router_logits.device.index)
    with _cache_lock:
        router = _routers.get(key)
        if router is None:
            if _capturing():
                raise InvalidArgumentError(
                    "no router for this shape exists yet, and making one during CUDA graph capture would compile: "
                    "call route once before capturing")
            router = Router(experts, top_k, renormalize, device=router_logits.device.index)
            _routers[key] = router
    return router(router_logits)


def clear_cache():
    """Closes the layers and routers fused_moe() and route() cached. CUDA graphs that captured
    them must not be replayed after."""
    with _cache_lock:
        for layers in _layers.values():
            for layer in layers:
                layer.close()
        for router in _routers.values():
            router.close()
        _layers.clear()
        _routers.clear()
