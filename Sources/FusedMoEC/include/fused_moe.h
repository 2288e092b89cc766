/*
 * fused_moe.h: the C ABI of swift-fused-moe (libFusedMoEC.so).
 *
 * The Mixture-of-Experts layer of an LLM on one NVIDIA GPU, for serving stacks written in other
 * languages (Python through ctypes, C, C++, Rust). The library loads the CUDA driver and NVRTC
 * with dlopen at run time, so linking it needs no CUDA toolkit.
 *
 *   out[t] = sum_j topk_weights[t, j] * (w2[e] @ act(w1[e] @ x[t])),   e = topk_ids[t, j]
 *
 * with w1 [E, 2I, H] (gate rows first, then up rows), w2 [E, H, I], act(h) = silu(h[:I]) * h[I:]
 * (or gelu), x and out [M, H]; all of bf16 or all of fp16, topk_ids int32, topk_weights fp32.
 *
 * Conventions
 * - Every function but fused_moe_last_error returns an int status: FUSED_MOE_OK (0) or one of
 *   the negative FUSED_MOE_ERROR_* codes. Nothing aborts the process on bad input: pointers,
 *   sizes and codes are checked first, and every failure becomes a status and a message.
 * - fused_moe_last_error() returns the message of the calling thread's last call: "" after a
 *   success, else a sentence naming the function and the argument that is wrong (for example
 *   "fused_moe_forward: invalid argument 'x_row_stride': ..."). Each call on a thread replaces
 *   it; the text stays valid until that thread's next call into the library.
 * - Sizes are int64_t counts of elements, never bytes. Device pointers are plain addresses of
 *   device memory (cudaMalloc'd, or a framework's tensor), of the device the layer was made on.
 *   The library never frees or keeps them past the call.
 * - cuda_stream is a raw CUstream / cudaStream_t of the layer's device; NULL (0) is the legacy
 *   default stream. Work is only enqueued on it: calls return before the GPU has finished.
 * - The library uses the device's primary context (the one the CUDA runtime and PyTorch use) and
 *   makes it current on the calling thread.
 *
 * Graph capture: fused_moe_layer_create compiles every kernel (NVRTC, cached on disk) and
 * allocates all scratch memory for up to options->max_tokens tokens. After it, fused_moe_forward
 * and fused_moe_route only launch kernels and memsets on the given stream: no allocation, no
 * compilation, no host synchronization, so they can be captured in a CUDA graph (torch.cuda.graph
 * included). A captured graph uses the layer's scratch: keep the layer alive while it is replayed.
 *
 * Threads: any function may be called from any thread. The layer registry is locked, so a
 * destroyed or foreign handle is reported, not dereferenced. A layer's scratch memory is shared by
 * its forward calls: two forwards of one layer must not run on the GPU at the same time (use the
 * same stream for a layer, or one layer per stream).
 */
#ifndef FUSED_MOE_H
#define FUSED_MOE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The version of this header; fused_moe_version reports the library's. A library accepts callers
 * built against a header of the same major version (for 0.1 callers, see fused_moe_options_init). */
#define FUSED_MOE_VERSION_MAJOR 0
#define FUSED_MOE_VERSION_MINOR 2
#define FUSED_MOE_VERSION_PATCH 0

/* Status codes. */
#define FUSED_MOE_OK 0
/* An argument is wrong (null pointer, size out of range, unknown code, shape mismatch). */
#define FUSED_MOE_ERROR_INVALID_ARGUMENT (-1)
/* A valid request this build or device cannot do (an fp32 layer, forward on a router). */
#define FUSED_MOE_ERROR_UNSUPPORTED (-2)
/* CUDA failed: no driver or GPU, NVRTC missing or a compile error, a failed launch. */
#define FUSED_MOE_ERROR_CUDA (-3)
/* Device memory ran out (CUDA_ERROR_OUT_OF_MEMORY). */
#define FUSED_MOE_ERROR_OUT_OF_MEMORY (-4)
/* A bug in the library: please report the message. */
#define FUSED_MOE_ERROR_INTERNAL (-5)

/* Element types (the dtype arguments). Layers take bf16 or fp16; router logits also fp32. */
#define FUSED_MOE_BF16 0
#define FUSED_MOE_FP16 1
#define FUSED_MOE_FP32 2

/* fused_moe_options.activation */
#define FUSED_MOE_SILU 0 /* silu(gate) * up (SwiGLU) */
#define FUSED_MOE_GELU 1 /* gelu(gate) * up, exact (erf) GELU */

/* fused_moe_options.split_mode: how split-K partial sums are combined. */
#define FUSED_MOE_SPLIT_AUTO 0      /* the plan's choice */
#define FUSED_MOE_SPLIT_NONE 1      /* no split (split_k must be 0 or 1) */
#define FUSED_MOE_SPLIT_ATOMIC 2    /* fp32 atomics: fast, not bitwise reproducible */
#define FUSED_MOE_SPLIT_WORKSPACE 3 /* fixed-order reduction: bitwise reproducible */

/* fused_moe_options.combine: how each token's k expert rows are summed. */
#define FUSED_MOE_COMBINE_ORDERED 0 /* in slot order by a combine kernel: bitwise reproducible (default) */
#define FUSED_MOE_COMBINE_ATOMIC 1  /* GEMM2 adds each row into its token's output row with 16-bit atomics
                                     * where its kernel can (the plan's unsplit persistent kernel; elsewhere
                                     * ordered): faster at large batches, not bitwise reproducible */

/* fused_moe_options.device: check arguments only. A layer made with it touches no GPU and needs
 * none: forward and route check their arguments and then return FUSED_MOE_ERROR_UNSUPPORTED. */
#define FUSED_MOE_DEVICE_NONE (-1)

/* Defaults that fused_moe_options_init writes. */
#define FUSED_MOE_DEFAULT_MAX_TOKENS 8192

/* sizeof(fused_moe_options) in version 0.1, whose struct ended at split_mode. */
#define FUSED_MOE_OPTIONS_SIZE_0_1 56

/*
 * Options of a layer. Fill one with fused_moe_options_init, then change fields; or pass NULL to
 * fused_moe_layer_create for the defaults. 64 bytes, no padding surprises: every field sits at
 * its natural alignment.
 */
typedef struct fused_moe_options {
    /* sizeof(fused_moe_options) as the caller compiled it; fused_moe_options_init sets it (and
     * writes this version's sizeof bytes). At least FUSED_MOE_OPTIONS_SIZE_0_1: a 0.1 caller's
     * struct, whose missing fields (combine on) take their defaults. A larger (newer) struct's
     * extra fields are ignored. */
    uint32_t struct_size;
    /* FUSED_MOE_SILU (default) or FUSED_MOE_GELU. */
    int32_t activation;
    /* 1: fused_moe_route divides the top-k weights by their sum; 0 (default): plain softmax. */
    int32_t renormalize;
    /* CUDA device ordinal (default 0), or FUSED_MOE_DEVICE_NONE. */
    int32_t device;
    /* Expert parallelism: a host array of expert_map_length int32 mapping the router's (global)
     * expert ids to this layer's local experts, -1 for experts this rank does not hold. Copied
     * during create. NULL (default): every expert is local and ids are in [0, experts). */
    const int32_t *expert_map;
    int64_t expert_map_length;
    /* The most tokens one forward takes (default FUSED_MOE_DEFAULT_MAX_TOKENS): scratch memory is
     * sized for it, and kernels are compiled for every plan up to it. */
    int64_t max_tokens;
    /* Batches larger than this run in chunks of this many tokens, bounding scratch memory.
     * 0 (default): 65536. */
    int64_t chunk_tokens;
    /* Split-K override for both GEMMs: 0 (default) = the plan's choice, else 1, 2, 4, 8 or 16. */
    int32_t split_k;
    /* FUSED_MOE_SPLIT_* override; FUSED_MOE_SPLIT_AUTO (default) = the plan's choice (workspace
     * when split_k > 1 is forced on a plan that did not split). */
    int32_t split_mode;
    /* FUSED_MOE_COMBINE_ORDERED (default) or FUSED_MOE_COMBINE_ATOMIC. Since 0.2. */
    int32_t combine;
    /* 0. Since 0.2. */
    int32_t reserved;
} fused_moe_options;

/* What a layer was made with, for callers that keep only the handle. 80 bytes. */
typedef struct fused_moe_layer_info {
    int64_t experts;        /* E: local experts, the first dimension of w1 and w2 */
    int64_t top_k;          /* k */
    int64_t hidden;         /* H */
    int64_t intermediate;   /* I (0 for a router) */
    int64_t routed_experts; /* the router's expert count: expert_map_length, else experts */
    int64_t dtype;          /* FUSED_MOE_BF16 or FUSED_MOE_FP16 (-1 for a router) */
    int64_t max_tokens;     /* 0 for a router */
    int64_t scratch_bytes;  /* device memory the layer holds */
    int64_t plan_count;     /* distinct kernel plans for 1..max_tokens tokens: each batch runs
                               the plan bench runs at its size; all share one scratch */
    int64_t device;         /* device ordinal, or FUSED_MOE_DEVICE_NONE */
} fused_moe_layer_info;

#if defined(__cplusplus) && __cplusplus >= 201103L
static_assert(sizeof(fused_moe_options) == 64, "fused_moe_options layout");
static_assert(sizeof(fused_moe_layer_info) == 80, "fused_moe_layer_info layout");
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(sizeof(fused_moe_options) == 64, "fused_moe_options layout");
_Static_assert(sizeof(fused_moe_layer_info) == 80, "fused_moe_layer_info layout");
#endif

/* A layer (or a router): an opaque handle from fused_moe_layer_create or fused_moe_router_create. */
typedef struct fused_moe_layer fused_moe_layer;

/* The library's version. Each pointer must be non-NULL. */
int fused_moe_version(int32_t *major, int32_t *minor, int32_t *patch);

/* The calling thread's last message: "" after a success. Never NULL; valid until the thread's
 * next call into the library. */
const char *fused_moe_last_error(void);

/* Writes the defaults into *options (struct_size included): sizeof(fused_moe_options) of this
 * library's version, 64 bytes. A caller built against the 0.1 header (56 bytes) must not call a
 * newer library's fused_moe_options_init on its struct; it fills the struct itself (struct_size =
 * FUSED_MOE_OPTIONS_SIZE_0_1), which layer creation accepts, or rebuilds against this header. */
int fused_moe_options_init(fused_moe_options *options);

/*
 * Makes a layer of E = experts local experts, k = top_k, H = hidden, I = intermediate, of dtype
 * FUSED_MOE_BF16 or FUSED_MOE_FP16. Weights are not given here: fused_moe_forward takes them,
 * so one layer serves every MoE layer of a model that has this shape.
 *
 * Chooses a kernel plan for each token count up to options->max_tokens (tuned configs, else a
 * heuristic: the plan `fused-moe bench` runs at that count; past 65536 tokens one per step of 1/64),
 * compiles their kernels (NVRTC, cached on disk: only the first create of a plan on a machine
 * compiles; Mixtral's 45 plans up to 8192 tokens took 50 s on 16 cores, the 128-expert shapes'
 * 13-17 plans a few seconds) and allocates one scratch they share. Limits: 1 <= E <= 4096,
 * 1 <= k <= min(E, 32); H and I multiples of 8 up to 2^20; at most 512 router experts;
 * max_tokens and chunk_tokens up to 2^24.
 *
 * out: receives the handle; *out is set to NULL on failure. options: NULL for the defaults.
 */
int fused_moe_layer_create(fused_moe_layer **out, int64_t experts, int64_t top_k, int64_t hidden,
                           int64_t intermediate, int dtype, const fused_moe_options *options);

/*
 * Makes a router only: fused_moe_route works on it, fused_moe_forward answers
 * FUSED_MOE_ERROR_UNSUPPORTED. No scratch memory. device: an ordinal or FUSED_MOE_DEVICE_NONE.
 */
int fused_moe_router_create(fused_moe_layer **out, int64_t num_experts, int64_t top_k, int renormalize,
                            int device);

/* Releases a layer and its device memory (cuMemFree). Synchronize the streams that used it first;
 * CUDA graphs that captured it must not be launched afterwards. NULL is a no-op; a handle that is
 * not live (destroyed twice, never made) is FUSED_MOE_ERROR_INVALID_ARGUMENT. */
int fused_moe_layer_destroy(fused_moe_layer *layer);

/* Fills *info with what the layer was made with. */
int fused_moe_layer_get_info(const fused_moe_layer *layer, fused_moe_layer_info *info);

/*
 * Enqueues the MoE layer on cuda_stream: out [tokens, H] from x [tokens, H], topk_ids [tokens, k]
 * (int32: router expert ids; with an expert map, ids whose entry is -1 contribute nothing),
 * topk_weights [tokens, k] (fp32), and the weights w1 [E, 2I, H], w2 [E, H, I] (contiguous).
 * x, out, w1 and w2 are of the layer's dtype and 16-byte aligned; topk_ids and topk_weights are
 * contiguous and 4-byte aligned. out is written, not accumulated into.
 *
 * x_row_stride and out_row_stride are the distances between rows in elements; this version takes
 * contiguous rows only (stride == H). 0 <= tokens <= max_tokens; tokens == 0 does nothing and
 * then x, topk_ids, topk_weights and out may be NULL.
 */
int fused_moe_forward(fused_moe_layer *layer, const void *x, const int32_t *topk_ids,
                      const float *topk_weights, const void *w1, const void *w2, void *out, int64_t tokens,
                      int64_t x_row_stride, int64_t out_row_stride, void *cuda_stream);

/*
 * Enqueues routing on cuda_stream: the top-k experts of softmax(router_logits) for each token,
 * in descending order (ties to the lower id), into topk_ids [tokens, k] (int32) and topk_weights
 * [tokens, k] (fp32, divided by their sum when the layer renormalizes). router_logits is
 * [tokens, num_experts], contiguous, of logits_dtype (FUSED_MOE_BF16, FUSED_MOE_FP16 or
 * FUSED_MOE_FP32); num_experts must be the layer's routed_experts.
 */
int fused_moe_route(fused_moe_layer *layer, const void *router_logits, int logits_dtype, int64_t tokens,
                    int64_t num_experts, int32_t *topk_ids, float *topk_weights, void *cuda_stream);

#ifdef __cplusplus
}
#endif

#endif /* FUSED_MOE_H */
