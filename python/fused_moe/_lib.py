"""Loads libFusedMoEC and declares its C functions (fused_moe.h) for ctypes.

Needs only the standard library: the ABI can be used and tested without torch.

Search order for the library: the FUSED_MOE_LIBRARY environment variable (a file, or a folder
holding it), the package's own folder, then .build/release/ of the repository this package sits in.
"""

import ctypes
import glob
import os
import sys
import threading

from ._errors import LibraryNotFoundError, error_for_status

LIBRARY_ENV = "FUSED_MOE_LIBRARY"
NVRTC_ENV = "FUSED_MOE_NVRTC"
LIBRARY_NAME = "libFusedMoEC.dylib" if sys.platform == "darwin" else "libFusedMoEC.so"

# The fused_moe.h version this module was written for: the library's major must match.
VERSION_MAJOR = 0

# Status codes.
OK = 0
ERROR_INVALID_ARGUMENT = -1
ERROR_UNSUPPORTED = -2
ERROR_CUDA = -3
ERROR_OUT_OF_MEMORY = -4
ERROR_INTERNAL = -5

# Element types.
BF16 = 0
FP16 = 1
FP32 = 2

# Activations.
SILU = 0
GELU = 1

# Split modes.
SPLIT_AUTO = 0
SPLIT_NONE = 1
SPLIT_ATOMIC = 2
SPLIT_WORKSPACE = 3

# How each token's k expert rows are summed.
COMBINE_ORDERED = 0
COMBINE_ATOMIC = 1

DEVICE_NONE = -1
DEFAULT_MAX_TOKENS = 8192
# sizeof(fused_moe_options) in version 0.1 (it ended at split_mode).
OPTIONS_SIZE_0_1 = 56

ACTIVATIONS = {"silu": SILU, "gelu": GELU}
SPLIT_MODES = {"auto": SPLIT_AUTO, "none": SPLIT_NONE, "atomic": SPLIT_ATOMIC, "workspace": SPLIT_WORKSPACE}
COMBINES = {"ordered": COMBINE_ORDERED, "atomic": COMBINE_ATOMIC}


class Options(ctypes.Structure):
    """fused_moe_options (64 bytes)."""

    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("activation", ctypes.c_int32),
        ("renormalize", ctypes.c_int32),
        ("device", ctypes.c_int32),
        ("expert_map", ctypes.POINTER(ctypes.c_int32)),
        ("expert_map_length", ctypes.c_int64),
        ("max_tokens", ctypes.c_int64),
        ("chunk_tokens", ctypes.c_int64),
        ("split_k", ctypes.c_int32),
        ("split_mode", ctypes.c_int32),
        ("combine", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


class LayerInfo(ctypes.Structure):
    """fused_moe_layer_info (80 bytes)."""

    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "experts", "top_k", "hidden", "intermediate", "routed_experts", "dtype", "max_tokens",
            "scratch_bytes", "plan_count", "device",
        )
    ]

    def as_dict(self):
        return {name: getattr(self, name) for name, _ in self._fields_}


_c_int64 = ctypes.c_int64
_c_int = ctypes.c_int
_c_void_p = ctypes.c_void_p

# name: (restype, argtypes)
_PROTOTYPES = {
    "fused_moe_version": (_c_int, [ctypes.POINTER(ctypes.c_int32)] * 3),
    "fused_moe_last_error": (ctypes.c_char_p, []),
    "fused_moe_options_init": (_c_int, [ctypes.POINTER(Options)]),
    "fused_moe_layer_create": (
        _c_int, [ctypes.POINTER(_c_void_p), _c_int64, _c_int64, _c_int64, _c_int64, _c_int, ctypes.POINTER(Options)]
    ),
    "fused_moe_router_create": (_c_int, [ctypes.POINTER(_c_void_p), _c_int64, _c_int64, _c_int, _c_int]),
    "fused_moe_layer_destroy": (_c_int, [_c_void_p]),
    "fused_moe_layer_get_info": (_c_int, [_c_void_p, ctypes.POINTER(LayerInfo)]),
    "fused_moe_forward": (
        _c_int,
        [_c_void_p, _c_void_p, _c_void_p, _c_void_p, _c_void_p, _c_void_p, _c_void_p, _c_int64, _c_int64, _c_int64,
         _c_void_p],
    ),
    "fused_moe_route": (_c_int, [_c_void_p, _c_void_p, _c_int, _c_int64, _c_int64, _c_void_p, _c_void_p, _c_void_p]),
}

_lock = threading.Lock()
_library = None


def candidate_paths():
    """Where load() looks, in order."""
    paths = []
    value = os.environ.get(LIBRARY_ENV)
    if value:
        paths.append(os.path.join(value, LIBRARY_NAME) if os.path.isdir(value) else value)
    package = os.path.dirname(os.path.abspath(__file__))
    paths.append(os.path.join(package, LIBRARY_NAME))
    repository = os.path.dirname(os.path.dirname(package))
    paths.append(os.path.join(repository, ".build", "release", LIBRARY_NAME))
    return paths


def _point_at_nvrtc():
    """Sets FUSED_MOE_NVRTC to the NVRTC that pip installed for this Python (torch's CUDA wheels
    bring one) unless it is set: the library searches common places itself, but this Python's
    sys.path (a virtual environment, conda) is known only here."""
    if os.environ.get(NVRTC_ENV):
        return
    for folder in sys.path:
        for pattern in ("nvidia/cu13/lib/libnvrtc.so.*", "nvidia/cu12/lib/libnvrtc.so.*",
                        "nvidia/cuda_nvrtc/lib/libnvrtc.so.*"):
            for path in sorted(glob.glob(os.path.join(folder, pattern))):
                if "builtins" not in os.path.basename(path) and os.path.isfile(path):
                    os.environ[NVRTC_ENV] = path
                    return


def load():
    """The library, loaded once, with every function's prototype declared.

    Raises:
        LibraryNotFoundError: naming every place tried and why each failed.
    """
    global _library
    with _lock:
        if _library is not None:
            return _library
        tried = []
        for path in candidate_paths():
            if not os.path.exists(path):
                tried.append(f"{path} (absent)")
                continue
            try:
                library = ctypes.CDLL(path)
            except OSError as error:
                tried.append(f"{path} ({error})")
                continue
            for name, (restype, argtypes) in _PROTOTYPES.items():
                function = getattr(library, name)
                function.restype = restype
                function.argtypes = argtypes
            major, minor, patch = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int32()
            library.fused_moe_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
            if major.value != VERSION_MAJOR:
                raise LibraryNotFoundError(
                    f"{path} is version {major.value}.{minor.value}.{patch.value}; this package needs "
                    f"{VERSION_MAJOR}.x (rebuild the library or update the package)")
            _point_at_nvrtc()
            library.path = path
            _library = library
            return library
        raise LibraryNotFoundError(
            f"could not load {LIBRARY_NAME}. Build it with `swift build -c release --product FusedMoEC "
            f"-Xswiftc -static-stdlib`, or set {LIBRARY_ENV} to its path. Tried:\n  " + "\n  ".join(tried))


def last_error():
    """The calling thread's last message from the library ("" after a success)."""
    message = load().fused_moe_last_error()
    return message.decode("utf-8", "replace") if message else ""


def check(status):
    """Raises the exception for a nonzero status, with the library's message."""
    if status != OK:
        raise error_for_status(status, last_error())


def version():
    """The library's (major, minor, patch)."""
    library = load()
    major, minor, patch = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int32()
    check(library.fused_moe_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch)))
    return major.value, minor.value, patch.value
