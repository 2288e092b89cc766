"""The C ABI's error paths, through ctypes, on any machine: no GPU and no torch needed.

Layers made with options.device = FUSED_MOE_DEVICE_NONE touch no GPU: they check every argument
of forward and route exactly as a real layer does, then answer FUSED_MOE_ERROR_UNSUPPORTED. That
makes the argument checks, the handle registry and the last-error messages testable here.
The Python-level checks (wrong dtype, shape, device) run at the end, with CPU tensors, when torch
is importable; they skip without it.
"""

import ctypes
import os
import re
import shutil
import subprocess
import threading

import pytest

from fused_moe import _lib

E, K, H, I = 8, 2, 256, 128

# Fake device addresses: non-null and 16-byte aligned. Nothing reads them on a FUSED_MOE_DEVICE_NONE layer.
GOOD_FORWARD = dict(
    x=0x7F0000100000, topk_ids=0x7F0000200000, topk_weights=0x7F0000300000, w1=0x7F0000400000,
    w2=0x7F0000500000, out=0x7F0000600000, tokens=4, x_row_stride=H, out_row_stride=H, cuda_stream=None,
)
GOOD_ROUTE = dict(
    router_logits=0x7F0000700000, logits_dtype=_lib.FP32, tokens=4, num_experts=E, topk_ids=0x7F0000800000,
    topk_weights=0x7F0000900000, cuda_stream=None,
)


def last_error(lib):
    return lib.fused_moe_last_error().decode()


def options(lib, **fields):
    result = _lib.Options()
    assert lib.fused_moe_options_init(ctypes.byref(result)) == _lib.OK
    result.device = _lib.DEVICE_NONE
    for name, value in fields.items():
        setattr(result, name, value)
    return result


def create(lib, experts=E, top_k=K, hidden=H, intermediate=I, dtype=_lib.BF16, opts="dry"):
    """(status, handle value) of fused_moe_layer_create; the handle starts as garbage so that a
    failure must clear it."""
    handle = ctypes.c_void_p(0xDEAD0)
    if opts == "dry":
        opts = options(lib)
    status = lib.fused_moe_layer_create(
        ctypes.byref(handle), experts, top_k, hidden, intermediate, dtype,
        ctypes.byref(opts) if opts is not None else None)
    return status, handle.value


def forward(lib, layer, **changes):
    a = {**GOOD_FORWARD, **changes}
    return lib.fused_moe_forward(
        layer, a["x"], a["topk_ids"], a["topk_weights"], a["w1"], a["w2"], a["out"], a["tokens"], a["x_row_stride"],
        a["out_row_stride"], a["cuda_stream"])


def route(lib, layer, **changes):
    a = {**GOOD_ROUTE, **changes}
    return lib.fused_moe_route(
        layer, a["router_logits"], a["logits_dtype"], a["tokens"], a["num_experts"], a["topk_ids"],
        a["topk_weights"], a["cuda_stream"])


def expect_invalid(lib, status, argument, *fragments):
    message = last_error(lib)
    assert status == _lib.ERROR_INVALID_ARGUMENT, message
    assert f"'{argument}'" in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture
def dry_layer(lib):
    status, handle = create(lib)
    assert status == _lib.OK, last_error(lib)
    yield handle
    lib.fused_moe_layer_destroy(handle)


# MARK: - Version, header and layouts


def test_version_matches_header(lib, header_path):
    major, minor, patch = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int32()
    assert lib.fused_moe_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch)) == _lib.OK
    assert last_error(lib) == ""
    defines = header_defines(header_path)
    assert (major.value, minor.value, patch.value) == (
        defines["VERSION_MAJOR"], defines["VERSION_MINOR"], defines["VERSION_PATCH"])


@pytest.mark.parametrize("missing", ["major", "minor", "patch"])
def test_version_null_pointer(lib, missing):
    values = {name: ctypes.c_int32() for name in ("major", "minor", "patch")}
    pointers = [None if name == missing else ctypes.byref(value) for name, value in values.items()]
    expect_invalid(lib, lib.fused_moe_version(*pointers), missing, "fused_moe_version", "null pointer")


def header_defines(path):
    with open(path) as file:
        text = file.read()
    return {name: int(value) for name, value in re.findall(r"#define FUSED_MOE_(\w+) \(?(-?\d+)\)?", text)}


def test_python_constants_match_header(header_path):
    defines = header_defines(header_path)
    assert len(defines) >= 20
    for name, value in defines.items():
        if name in ("VERSION_MINOR", "VERSION_PATCH"):
            continue  # the package checks only the major version
        assert getattr(_lib, name) == value, name


def test_struct_layouts_match_header():
    assert ctypes.sizeof(_lib.Options) == 64
    offsets = {name: getattr(_lib.Options, name).offset for name, _ in _lib.Options._fields_}
    assert offsets == dict(struct_size=0, activation=4, renormalize=8, device=12, expert_map=16, expert_map_length=24,
                           max_tokens=32, chunk_tokens=40, split_k=48, split_mode=52, combine=56, reserved=60)
    assert _lib.Options.combine.offset == _lib.OPTIONS_SIZE_0_1
    assert ctypes.sizeof(_lib.LayerInfo) == 80


def test_options_init_writes_defaults(lib):
    value = _lib.Options()
    ctypes.memset(ctypes.byref(value), 0x5A, ctypes.sizeof(value))
    assert lib.fused_moe_options_init(ctypes.byref(value)) == _lib.OK
    assert value.struct_size == 64 and value.max_tokens == _lib.DEFAULT_MAX_TOKENS
    assert (value.activation, value.renormalize, value.device, value.expert_map_length, value.chunk_tokens,
            value.split_k, value.split_mode, value.combine, value.reserved) == (0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert not value.expert_map
    expect_invalid(lib, lib.fused_moe_options_init(None), "options")


# MARK: - Creating layers


def test_create_null_out(lib):
    status = lib.fused_moe_layer_create(None, E, K, H, I, _lib.BF16, None)
    expect_invalid(lib, status, "out", "fused_moe_layer_create")


@pytest.mark.parametrize("dtype", [-1, 3, 7, 1 << 20])
def test_create_bad_dtype_code(lib, dtype):
    status, handle = create(lib, dtype=dtype)
    expect_invalid(lib, status, "dtype", str(dtype))
    assert handle is None


def test_create_fp32_is_unsupported(lib):
    status, handle = create(lib, dtype=_lib.FP32)
    assert status == _lib.ERROR_UNSUPPORTED, last_error(lib)
    assert "'dtype'" in last_error(lib) and handle is None


@pytest.mark.parametrize(
    "sizes, argument",
    [
        (dict(experts=0), "experts"),
        (dict(experts=-3), "experts"),
        (dict(experts=5000), "experts"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=E + 1), "top_k"),
        (dict(experts=64, top_k=33), "top_k"),
        (dict(hidden=0), "hidden"),
        (dict(hidden=-256), "hidden"),
        (dict(hidden=100), "hidden"),
        (dict(hidden=1 << 30), "hidden"),
        (dict(intermediate=0), "intermediate"),
        (dict(intermediate=12), "intermediate"),
        (dict(intermediate=-(1 << 62)), "intermediate"),
        (dict(experts=1024, top_k=2), "experts"),  # more than 512 router experts
    ],
)
def test_create_bad_sizes(lib, sizes, argument):
    status, handle = create(lib, **sizes)
    expect_invalid(lib, status, argument)
    assert handle is None


def test_top_k_above_experts_names_both(lib):
    status, _ = create(lib, experts=4, top_k=6)
    expect_invalid(lib, status, "top_k", "must be <= experts (4)", "got 6")


@pytest.mark.parametrize(
    "fields, argument",
    [
        (dict(struct_size=0), "options.struct_size"),
        (dict(struct_size=48), "options.struct_size"),
        (dict(activation=2), "options.activation"),
        (dict(activation=-1), "options.activation"),
        (dict(renormalize=2), "options.renormalize"),
        (dict(device=-2), "options.device"),
        (dict(expert_map_length=4), "options.expert_map"),
        (dict(max_tokens=0), "options.max_tokens"),
        (dict(max_tokens=-5), "options.max_tokens"),
        (dict(max_tokens=1 << 40), "options.max_tokens"),
        (dict(chunk_tokens=-1), "options.chunk_tokens"),
        (dict(split_k=3), "options.split_k"),
        (dict(split_k=32), "options.split_k"),
        (dict(split_mode=4), "options.split_mode"),
        (dict(split_mode=_lib.SPLIT_NONE, split_k=4), "options.split_mode"),
        (dict(combine=2), "options.combine"),
        (dict(combine=-1), "options.combine"),
        (dict(reserved=1), "options.reserved"),
    ],
)
def test_create_bad_options(lib, fields, argument):
    status, handle = create(lib, opts=options(lib, **fields))
    expect_invalid(lib, status, argument)
    assert handle is None


def test_create_takes_a_0_1_struct(lib):
    # A caller compiled against 0.1 passes 56 bytes: what follows them (here garbage) is not read, and
    # the fields added since take their defaults.
    opts = options(lib, struct_size=_lib.OPTIONS_SIZE_0_1, combine=7, reserved=9)
    status, handle = create(lib, opts=opts)
    assert status == _lib.OK, last_error(lib)
    assert lib.fused_moe_layer_destroy(handle) == _lib.OK


@pytest.mark.parametrize("combine", [_lib.COMBINE_ORDERED, _lib.COMBINE_ATOMIC])
def test_create_takes_each_combine(lib, combine):
    status, handle = create(lib, opts=options(lib, combine=combine))
    assert status == _lib.OK, last_error(lib)
    assert lib.fused_moe_layer_destroy(handle) == _lib.OK


def map_options(lib, values, length=None):
    array = (ctypes.c_int32 * max(len(values), 1))(*values)
    result = options(lib, expert_map=ctypes.cast(array, ctypes.POINTER(ctypes.c_int32)),
                     expert_map_length=len(values) if length is None else length)
    result._keep = array
    return result


@pytest.mark.parametrize(
    "values, length, argument, fragment",
    [
        ([0, 1, -1, 8], None, "options.expert_map", "entry 3 is 8"),  # E = 8 local experts: 8 is out of range
        ([0, -2], None, "options.expert_map", "entry 1 is -2"),
        ([0, 1], 0, "options.expert_map_length", "got 0"),
        ([0, 1], 513, "options.expert_map_length", "got 513"),
        ([0, 1], -1, "options.expert_map_length", "got -1"),
        ([0], None, "top_k", "expert_map_length = 1"),  # k = 2 experts of a 1-expert router
    ],
)
def test_create_bad_expert_map(lib, values, length, argument, fragment):
    status, handle = create(lib, opts=map_options(lib, values, length))
    expect_invalid(lib, status, argument, fragment)
    assert handle is None


def test_create_with_expert_map(lib):
    status, handle = create(lib, opts=map_options(lib, [-1, 0, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1]))
    assert status == _lib.OK, last_error(lib)
    info = _lib.LayerInfo()
    assert lib.fused_moe_layer_get_info(handle, ctypes.byref(info)) == _lib.OK
    assert (info.experts, info.routed_experts) == (E, 12)
    assert route(lib, handle, num_experts=E) == _lib.ERROR_INVALID_ARGUMENT
    assert "'num_experts'" in last_error(lib) and "(12)" in last_error(lib)
    assert route(lib, handle, num_experts=12) == _lib.ERROR_UNSUPPORTED
    assert lib.fused_moe_layer_destroy(handle) == _lib.OK


def test_create_on_a_gpu_or_reports_cuda(lib):
    """With valid arguments and device 0: a layer on a GPU machine; here, a CUDA error that says
    what is missing, and no handle."""
    status, handle = create(lib, opts=None)
    if status == _lib.OK:
        assert lib.fused_moe_layer_destroy(handle) == _lib.OK
        return
    message = last_error(lib)
    assert status == _lib.ERROR_CUDA, message
    assert handle is None
    assert "CUDA" in message or "libcuda" in message, message


def test_create_dry_layer_and_info(lib, dry_layer):
    assert last_error(lib) == ""
    info = _lib.LayerInfo()
    assert lib.fused_moe_layer_get_info(dry_layer, ctypes.byref(info)) == _lib.OK
    assert info.as_dict() == dict(experts=E, top_k=K, hidden=H, intermediate=I, routed_experts=E, dtype=_lib.BF16,
                                  max_tokens=_lib.DEFAULT_MAX_TOKENS, scratch_bytes=0, plan_count=0,
                                  device=_lib.DEVICE_NONE)
    expect_invalid(lib, lib.fused_moe_layer_get_info(dry_layer, None), "info")


# MARK: - forward


def test_forward_valid_arguments_on_dry_layer_are_unsupported(lib, dry_layer):
    assert forward(lib, dry_layer) == _lib.ERROR_UNSUPPORTED
    assert "FUSED_MOE_DEVICE_NONE" in last_error(lib)


@pytest.mark.parametrize(
    "changes, argument, fragment",
    [
        (dict(x=None), "x", "null pointer"),
        (dict(topk_ids=None), "topk_ids", "null pointer"),
        (dict(topk_weights=None), "topk_weights", "null pointer"),
        (dict(w1=None), "w1", "null pointer"),
        (dict(w2=None), "w2", "null pointer"),
        (dict(out=None), "out", "null pointer"),
        (dict(tokens=-1), "tokens", "got -1"),
        (dict(tokens=_lib.DEFAULT_MAX_TOKENS + 1), "tokens", "max_tokens"),
        (dict(x_row_stride=H + 8), "x_row_stride", "contiguous"),
        (dict(x_row_stride=0), "x_row_stride", "got 0"),
        (dict(out_row_stride=-H), "out_row_stride", "contiguous"),
        (dict(x=GOOD_FORWARD["x"] + 2), "x", "16-byte aligned"),
        (dict(out=GOOD_FORWARD["out"] + 8), "out", "16-byte aligned"),
        (dict(w1=GOOD_FORWARD["w1"] + 4), "w1", "16-byte aligned"),
        (dict(topk_ids=GOOD_FORWARD["topk_ids"] + 2), "topk_ids", "4-byte aligned"),
        (dict(topk_weights=GOOD_FORWARD["topk_weights"] + 1), "topk_weights", "4-byte aligned"),
        (dict(x=(1 << 64) - 16), "x", "wraps around"),
        (dict(w2=(1 << 64) - 4096), "w2", "wraps around"),
    ],
)
def test_forward_bad_arguments(lib, dry_layer, changes, argument, fragment):
    expect_invalid(lib, forward(lib, dry_layer, **changes), argument, "fused_moe_forward", fragment)


def test_forward_zero_tokens_takes_null_activations(lib, dry_layer):
    status = forward(lib, dry_layer, tokens=0, x=None, topk_ids=None, topk_weights=None, out=None)
    assert status == _lib.ERROR_UNSUPPORTED, last_error(lib)  # valid; a dry layer runs nothing
    expect_invalid(lib, forward(lib, dry_layer, tokens=0, w1=None), "w1")


def test_forward_respects_max_tokens_option(lib):
    status, handle = create(lib, opts=options(lib, max_tokens=16))
    assert status == _lib.OK, last_error(lib)
    assert forward(lib, handle, tokens=16) == _lib.ERROR_UNSUPPORTED
    expect_invalid(lib, forward(lib, handle, tokens=17), "tokens", "0...16")
    lib.fused_moe_layer_destroy(handle)


# MARK: - route


def test_route_valid_arguments_on_dry_layer_are_unsupported(lib, dry_layer):
    for dtype in (_lib.BF16, _lib.FP16, _lib.FP32):
        assert route(lib, dry_layer, logits_dtype=dtype) == _lib.ERROR_UNSUPPORTED, last_error(lib)


@pytest.mark.parametrize(
    "changes, argument, fragment",
    [
        (dict(logits_dtype=3), "logits_dtype", "got 3"),
        (dict(logits_dtype=-1), "logits_dtype", "got -1"),
        (dict(num_experts=E + 1), "num_experts", "got 9"),
        (dict(num_experts=0), "num_experts", "got 0"),
        (dict(tokens=-4), "tokens", "got -4"),
        (dict(router_logits=None), "router_logits", "null pointer"),
        (dict(topk_ids=None), "topk_ids", "null pointer"),
        (dict(topk_weights=None), "topk_weights", "null pointer"),
        (dict(router_logits=GOOD_ROUTE["router_logits"] + 2), "router_logits", "4-byte aligned"),
        (dict(router_logits=GOOD_ROUTE["router_logits"] + 1, logits_dtype=_lib.BF16), "router_logits",
         "2-byte aligned"),
    ],
)
def test_route_bad_arguments(lib, dry_layer, changes, argument, fragment):
    expect_invalid(lib, route(lib, dry_layer, **changes), argument, "fused_moe_route", fragment)


# MARK: - Routers


def router(lib, num_experts=E, top_k=K, renormalize=0, device=_lib.DEVICE_NONE):
    handle = ctypes.c_void_p(0xDEAD0)
    status = lib.fused_moe_router_create(ctypes.byref(handle), num_experts, top_k, renormalize, device)
    return status, handle.value


@pytest.mark.parametrize(
    "arguments, argument",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=513), "num_experts"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=E + 1), "top_k"),
        (dict(num_experts=64, top_k=33), "top_k"),
        (dict(renormalize=2), "renormalize"),
        (dict(device=-2), "device"),
    ],
)
def test_router_create_bad_arguments(lib, arguments, argument):
    status, handle = router(lib, **arguments)
    expect_invalid(lib, status, argument, "fused_moe_router_create")
    assert handle is None


def test_router_null_out(lib):
    expect_invalid(lib, lib.fused_moe_router_create(None, E, K, 0, _lib.DEVICE_NONE), "out")


def test_dry_router(lib):
    status, handle = router(lib, renormalize=1)
    assert status == _lib.OK, last_error(lib)
    info = _lib.LayerInfo()
    assert lib.fused_moe_layer_get_info(handle, ctypes.byref(info)) == _lib.OK
    assert (info.experts, info.top_k, info.intermediate, info.dtype, info.routed_experts) == (E, K, 0, -1, E)
    assert route(lib, handle) == _lib.ERROR_UNSUPPORTED
    assert forward(lib, handle) == _lib.ERROR_UNSUPPORTED
    assert "router" in last_error(lib)
    assert lib.fused_moe_layer_destroy(handle) == _lib.OK


# MARK: - Handles: NULL, destroyed, foreign


def test_null_layer(lib):
    expect_invalid(lib, forward(lib, None), "layer", "fused_moe_forward", "null pointer")
    expect_invalid(lib, route(lib, None), "layer", "fused_moe_route", "null pointer")
    expect_invalid(lib, lib.fused_moe_layer_get_info(None, ctypes.byref(_lib.LayerInfo())), "layer", "null pointer")
    assert lib.fused_moe_layer_destroy(None) == _lib.OK  # like free(NULL)
    assert last_error(lib) == ""


def test_destroyed_layer(lib):
    status, handle = create(lib)
    assert status == _lib.OK
    assert lib.fused_moe_layer_destroy(handle) == _lib.OK
    expect_invalid(lib, lib.fused_moe_layer_destroy(handle), "layer", "fused_moe_layer_destroy", "not a live layer")
    expect_invalid(lib, forward(lib, handle), "layer", "not a live layer")
    expect_invalid(lib, route(lib, handle), "layer", "not a live layer")
    info = ctypes.byref(_lib.LayerInfo())
    expect_invalid(lib, lib.fused_moe_layer_get_info(handle, info), "layer", "not a live layer")


def test_foreign_handle(lib):
    expect_invalid(lib, forward(lib, 0x7F00DEADBEE0), "layer", "not a live layer")


def test_handles_are_not_reused(lib):
    first = create(lib)[1]
    lib.fused_moe_layer_destroy(first)
    second = create(lib)[1]
    assert second != first
    expect_invalid(lib, forward(lib, first), "layer", "not a live layer")
    assert forward(lib, second) == _lib.ERROR_UNSUPPORTED
    lib.fused_moe_layer_destroy(second)


# MARK: - Last error


def test_success_clears_last_error(lib):
    assert lib.fused_moe_options_init(None) == _lib.ERROR_INVALID_ARGUMENT
    assert last_error(lib) != ""
    assert lib.fused_moe_options_init(ctypes.byref(_lib.Options())) == _lib.OK
    assert last_error(lib) == ""


def test_last_error_is_per_thread(lib):
    assert lib.fused_moe_version(None, None, None) == _lib.ERROR_INVALID_ARGUMENT
    main_message = last_error(lib)
    seen = {}

    def worker():
        seen["before"] = last_error(lib)
        lib.fused_moe_layer_destroy(0x7F00DEADBEE0)
        seen["after"] = last_error(lib)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen["before"] == ""
    assert "fused_moe_layer_destroy" in seen["after"] and "not a live layer" in seen["after"]
    assert last_error(lib) == main_message


def test_concurrent_create_destroy(lib):
    failures = []

    def worker():
        for _ in range(50):
            status, handle = create(lib)
            if status != _lib.OK or forward(lib, handle) != _lib.ERROR_UNSUPPORTED:
                failures.append(last_error(lib))
            if lib.fused_moe_layer_destroy(handle) != _lib.OK:
                failures.append(last_error(lib))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# MARK: - The header from C and C++


C_PROGRAM = r"""
#include "fused_moe.h"
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "line %d: %s [%s]\n", __LINE__, #c, fused_moe_last_error()); \
    return 1; } } while (0)

int main(void) {
    int32_t major, minor, patch;
    fused_moe_options options;
    fused_moe_layer *layer = NULL;
    fused_moe_layer_info info;
    const void *fake = (const void *)(uintptr_t)0x7f0000100000u;
    CHECK(offsetof(fused_moe_options, expert_map) == 16 && offsetof(fused_moe_options, max_tokens) == 32);
    CHECK(offsetof(fused_moe_options, split_mode) == 52 && sizeof(fused_moe_options) == 64);
    CHECK(offsetof(fused_moe_options, combine) == FUSED_MOE_OPTIONS_SIZE_0_1);
    CHECK(offsetof(fused_moe_layer_info, device) == 72 && sizeof(fused_moe_layer_info) == 80);
    CHECK(fused_moe_version(&major, &minor, &patch) == FUSED_MOE_OK);
    CHECK(major == FUSED_MOE_VERSION_MAJOR && minor == FUSED_MOE_VERSION_MINOR && patch == FUSED_MOE_VERSION_PATCH);
    CHECK(strcmp(fused_moe_last_error(), "") == 0);
    CHECK(fused_moe_options_init(&options) == FUSED_MOE_OK);
    CHECK(options.struct_size == sizeof options && options.max_tokens == FUSED_MOE_DEFAULT_MAX_TOKENS);
    options.device = FUSED_MOE_DEVICE_NONE;
    CHECK(fused_moe_layer_create(&layer, 8, 9, 256, 128, FUSED_MOE_BF16, &options) == FUSED_MOE_ERROR_INVALID_ARGUMENT);
    CHECK(layer == NULL && strstr(fused_moe_last_error(), "'top_k'") != NULL);
    CHECK(fused_moe_layer_create(&layer, 8, 2, 256, 128, FUSED_MOE_FP16, &options) == FUSED_MOE_OK);
    CHECK(fused_moe_layer_get_info(layer, &info) == FUSED_MOE_OK && info.hidden == 256 && info.dtype == FUSED_MOE_FP16);
    CHECK(fused_moe_forward(layer, fake, (const int32_t *)fake, (const float *)fake, fake, fake, (void *)fake, 4,
                            256, 256, NULL) == FUSED_MOE_ERROR_UNSUPPORTED);
    CHECK(fused_moe_forward(layer, fake, (const int32_t *)fake, (const float *)fake, fake, fake, (void *)fake, 4,
                            255, 256, NULL) == FUSED_MOE_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(fused_moe_last_error(), "'x_row_stride'") != NULL);
    CHECK(fused_moe_route(layer, fake, FUSED_MOE_FP32, 4, 8, (int32_t *)fake, (float *)fake, NULL)
          == FUSED_MOE_ERROR_UNSUPPORTED);
    CHECK(fused_moe_layer_destroy(layer) == FUSED_MOE_OK);
    CHECK(fused_moe_layer_destroy(layer) == FUSED_MOE_ERROR_INVALID_ARGUMENT);
    CHECK(fused_moe_layer_destroy(NULL) == FUSED_MOE_OK);
    puts("ok");
    return 0;
}
"""


def run_ok(arguments):
    result = subprocess.run(arguments, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def compiler(names):
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no C compiler ({', '.join(names)})")


@pytest.mark.parametrize("standard", ["c99", "c11"])
def test_header_from_c(lib, header_path, tmp_path, standard):
    cc = compiler(["cc", "gcc", "clang"])
    source = tmp_path / "abi.c"
    source.write_text(C_PROGRAM)
    program = tmp_path / "abi"
    library = os.path.abspath(lib.path)
    run_ok([cc, f"-std={standard}", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I", os.path.dirname(header_path),
            str(source), library, f"-Wl,-rpath,{os.path.dirname(library)}", "-o", str(program)])
    result = subprocess.run([str(program)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_header_from_cpp(header_path, tmp_path):
    cxx = compiler(["c++", "g++", "clang++"])
    source = tmp_path / "abi.cpp"
    source.write_text('#include "fused_moe.h"\nint main() { return fused_moe_last_error() == nullptr; }\n')
    run_ok([cxx, "-std=c++11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fsyntax-only", "-I",
            os.path.dirname(header_path), str(source)])


# MARK: - Python-level checks (torch, CPU tensors)


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def cpu_case(torch, dtype=None, tokens=4):
    dtype = dtype or torch.bfloat16
    return dict(
        x=torch.zeros(tokens, H, dtype=dtype), w1=torch.zeros(E, 2 * I, H, dtype=dtype),
        w2=torch.zeros(E, H, I, dtype=dtype), topk_weights=torch.zeros(tokens, K, dtype=torch.float32),
        topk_ids=torch.zeros(tokens, K, dtype=torch.int32))


def call(case, **changes):
    import fused_moe

    arguments = {**case, **changes}
    return fused_moe.fused_moe(
        arguments.pop("x"), arguments.pop("w1"), arguments.pop("w2"), arguments.pop("topk_weights"),
        arguments.pop("topk_ids"), **arguments)


def test_python_wrong_dtypes_raise_type_errors(torch):
    import fused_moe

    case = cpu_case(torch)
    for changes, name in [
        (dict(x=case["x"].float()), "x"),
        (dict(w1=case["w1"].half()), "w1"),
        (dict(w2=case["w2"].float()), "w2"),
        (dict(topk_weights=case["topk_weights"].bfloat16()), "topk_weights"),
        (dict(topk_ids=case["topk_ids"].float()), "topk_ids"),
        (dict(out=torch.zeros(4, H, dtype=torch.float16)), "out"),
        (dict(x=[[0.0] * H] * 4), "x"),
    ]:
        with pytest.raises(TypeError, match=name) as raised:
            call(case, **changes)
        assert isinstance(raised.value, fused_moe.FusedMoEError)


def test_python_wrong_shapes_raise_value_errors(torch):
    import fused_moe

    case = cpu_case(torch)
    for changes, name in [
        (dict(x=case["x"][None]), "x"),
        (dict(w1=torch.zeros(E, 2 * I, H + 8, dtype=torch.bfloat16)), "w1"),
        (dict(w1=torch.zeros(E, 2 * I + 1, H, dtype=torch.bfloat16)), "w1"),
        (dict(w2=torch.zeros(E, H, I + 8, dtype=torch.bfloat16)), "w2"),
        (dict(topk_ids=torch.zeros(5, K, dtype=torch.int32)), "topk_ids"),
        (dict(topk_weights=torch.zeros(4, K + 1)), "topk_weights"),
        (dict(out=torch.zeros(4, H + 8, dtype=torch.bfloat16)), "out"),
    ]:
        with pytest.raises(ValueError, match=name) as raised:
            call(case, **changes)
        assert isinstance(raised.value, fused_moe.InvalidArgumentError)


def test_python_non_contiguous_raises(torch):
    case = cpu_case(torch)
    wide = torch.zeros(4, 2 * H, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x must be contiguous"):
        call(case, x=wide[:, ::2])
    with pytest.raises(ValueError, match="w1 must be contiguous"):
        call(case, w1=torch.zeros(E, H, 2 * I, dtype=torch.bfloat16).transpose(1, 2))


def test_python_cpu_tensors_raise(torch):
    with pytest.raises(ValueError, match="CUDA device"):
        call(cpu_case(torch))
    with pytest.raises(ValueError, match="CUDA device"):
        call(cpu_case(torch, torch.float16), topk_ids=torch.zeros(4, K, dtype=torch.int64))


def test_python_bad_options_raise(torch):
    with pytest.raises(ValueError, match="activation"):
        call(cpu_case(torch), activation="relu")
    with pytest.raises(ValueError, match="split_mode"):
        call(cpu_case(torch), split_mode="sometimes")


def test_python_route_checks(torch):
    import fused_moe

    with pytest.raises(TypeError, match="router_logits"):
        fused_moe.route(torch.zeros(4, E, dtype=torch.int32), K)
    with pytest.raises(ValueError, match="router_logits"):
        fused_moe.route(torch.zeros(E), K)
    with pytest.raises(ValueError, match="CUDA device"):
        fused_moe.route(torch.zeros(4, E), K)


def test_python_layer_dtype_check(torch):
    import fused_moe

    with pytest.raises(TypeError, match="dtype"):
        fused_moe.Layer(E, K, H, I, torch.float32, device=0)
    with pytest.raises(TypeError, match="dtype"):
        fused_moe.Layer(E, K, H, I, "float64", device=0)


def test_package_imports_without_torch(lib):
    import fused_moe

    assert fused_moe.version()[0] == _lib.VERSION_MAJOR
    assert fused_moe.library_path() == lib.path
    if fused_moe._api.torch is None:
        with pytest.raises(ImportError, match="PyTorch"):
            fused_moe.fused_moe(None, None, None, None, None)
