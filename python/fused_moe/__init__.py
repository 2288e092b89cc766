"""fused_moe: the fused Mixture-of-Experts layer of swift-fused-moe, for PyTorch.

    import fused_moe
    topk_weights, topk_ids = fused_moe.route(router_logits, top_k=8, renormalize=True)
    out = fused_moe.fused_moe(x, w1, w2, topk_weights, topk_ids)

or, for serving with CUDA graphs, a Layer made ahead:

    layer = fused_moe.Layer(E, k, H, I, torch.bfloat16, max_tokens=512)
    out = layer(x, w1, w2, topk_weights, topk_ids)

The kernels live in libFusedMoEC.so (the package's C ABI, include/fused_moe.h), loaded with ctypes:
from FUSED_MOE_LIBRARY, the package folder, or the repository's .build/release/.
"""

from ._api import Layer, Router, clear_cache, fused_moe, route
from ._errors import (
    ArgumentTypeError,
    CUDAError,
    FusedMoEError,
    InternalError,
    InvalidArgumentError,
    LibraryNotFoundError,
    OutOfMemoryError,
    UnsupportedError,
)
from ._lib import version

__version__ = "0.1.0"


def library_path():
    """The path of the loaded libFusedMoEC (loading it if needed)."""
    from ._lib import load

    return load().path


__all__ = [
    "ArgumentTypeError",
    "CUDAError",
    "FusedMoEError",
    "InternalError",
    "InvalidArgumentError",
    "Layer",
    "LibraryNotFoundError",
    "OutOfMemoryError",
    "Router",
    "UnsupportedError",
    "clear_cache",
    "fused_moe",
    "library_path",
    "route",
    "version",
]
