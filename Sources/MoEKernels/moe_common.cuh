// moe_common.cuh: what every MoE kernel shares.
//
// Compiled by NVRTC with no system headers, so this file defines the fixed-width
// integer types, the 16-bit float storage types and their conversions itself.
// All inline PTX of the package lives here, each wrapper named for its instruction.
// Requires sm_80 or newer (cp.async, ldmatrix, mma.sync bf16); on sm_90 the f32
// reductions use the vector forms (red.global.add.v2/v4.f32). The Hopper section at the end
// (tensor maps, mbarriers, TMA, wgmma, setmaxnreg) is for sm_90a kernels only.
#ifndef MOE_COMMON_CUH
#define MOE_COMMON_CUH

// MARK: - Integer types

#if defined(__CUDACC_RTC__) && !defined(MOE_HAVE_STDINT)
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#elif !defined(__CUDACC_RTC__)
#include <stdint.h>
#endif

static_assert(sizeof(int32_t) == 4 && sizeof(int64_t) == 8, "integer widths");

#define MOE_DEVICE __device__ __forceinline__
#define MOE_FULL_MASK 0xffffffffu

// MARK: - Storage types

/// bfloat16 storage: 2 bytes, alignment 2. Arithmetic is done in fp32.
struct moe_bf16 {
    unsigned short bits;
};
/// IEEE binary16 storage: 2 bytes, alignment 2. Arithmetic is done in fp32.
struct moe_fp16 {
    unsigned short bits;
};
static_assert(sizeof(moe_bf16) == 2 && alignof(moe_bf16) == 2, "moe_bf16 layout");
static_assert(sizeof(moe_fp16) == 2 && alignof(moe_fp16) == 2, "moe_fp16 layout");

// MARK: - Conversions (PTX cvt)

/// cvt.rn.bf16.f32: round to nearest even; NaN stays NaN.
MOE_DEVICE uint16_t cvt_rn_bf16_f32(float x) {
    uint16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

/// cvt.rn.f16.f32: round to nearest even; NaN stays NaN, overflow becomes inf.
MOE_DEVICE uint16_t cvt_rn_f16_f32(float x) {
    uint16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

/// cvt.f32.f16: exact.
MOE_DEVICE float cvt_f32_f16(uint16_t h) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
}

/// cvt.rn.bf16x2.f32: packs (lo, hi) with lo in the low 16 bits (the lower address).
MOE_DEVICE uint32_t cvt_rn_bf16x2_f32(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

/// cvt.rn.f16x2.f32: packs (lo, hi) with lo in the low 16 bits (the lower address).
MOE_DEVICE uint32_t cvt_rn_f16x2_f32(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

MOE_DEVICE float to_float(moe_bf16 x) { return __uint_as_float(static_cast<uint32_t>(x.bits) << 16); }
MOE_DEVICE float to_float(moe_fp16 x) { return cvt_f32_f16(x.bits); }
MOE_DEVICE float to_float(float x) { return x; }

template <typename T> MOE_DEVICE T from_float(float x);
template <> MOE_DEVICE moe_bf16 from_float<moe_bf16>(float x) { return moe_bf16{cvt_rn_bf16_f32(x)}; }
template <> MOE_DEVICE moe_fp16 from_float<moe_fp16>(float x) { return moe_fp16{cvt_rn_f16_f32(x)}; }
template <> MOE_DEVICE float from_float<float>(float x) { return x; }

/// Two consecutive 16-bit values (lo at the lower address) from fp32, each rounded once.
template <typename T> MOE_DEVICE uint32_t pack2(float lo, float hi);
template <> MOE_DEVICE uint32_t pack2<moe_bf16>(float lo, float hi) { return cvt_rn_bf16x2_f32(lo, hi); }
template <> MOE_DEVICE uint32_t pack2<moe_fp16>(float lo, float hi) { return cvt_rn_f16x2_f32(lo, hi); }

/// The two 16-bit values packed in a 32-bit word, lo first.
template <typename T> MOE_DEVICE void unpack2(uint32_t v, float& lo, float& hi) {
    lo = to_float(T{static_cast<unsigned short>(v & 0xffffu)});
    hi = to_float(T{static_cast<unsigned short>(v >> 16)});
}

/// Eight 16-bit values held in one 16-byte vector, widened to fp32.
template <typename T> MOE_DEVICE void unpack8(const uint4& v, float (&f)[8]) {
    unpack2<T>(v.x, f[0], f[1]);
    unpack2<T>(v.y, f[2], f[3]);
    unpack2<T>(v.z, f[4], f[5]);
    unpack2<T>(v.w, f[6], f[7]);
}

/// Eight fp32 values rounded once each into one 16-byte vector.
template <typename T> MOE_DEVICE uint4 pack8(const float (&f)[8]) {
    uint4 v;
    v.x = pack2<T>(f[0], f[1]);
    v.y = pack2<T>(f[2], f[3]);
    v.z = pack2<T>(f[4], f[5]);
    v.w = pack2<T>(f[6], f[7]);
    return v;
}

/// Four fp32 values stored as T at dst (8 bytes for 16-bit T, 16 bytes for float; dst aligned to that).
MOE_DEVICE void store4(moe_bf16* dst, float a, float b, float c, float d) {
    uint2 v;
    v.x = pack2<moe_bf16>(a, b);
    v.y = pack2<moe_bf16>(c, d);
    *reinterpret_cast<uint2*>(dst) = v;
}
MOE_DEVICE void store4(moe_fp16* dst, float a, float b, float c, float d) {
    uint2 v;
    v.x = pack2<moe_fp16>(a, b);
    v.y = pack2<moe_fp16>(c, d);
    *reinterpret_cast<uint2*>(dst) = v;
}
MOE_DEVICE void store4(float* dst, float a, float b, float c, float d) {
    *reinterpret_cast<float4*>(dst) = make_float4(a, b, c, d);
}

// MARK: - Small integer helpers

MOE_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
MOE_DEVICE int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

/// std::conditional, which NVRTC cannot include.
template <bool COND, typename A, typename B> struct moe_conditional { typedef A type; };
template <typename A, typename B> struct moe_conditional<false, A, B> { typedef B type; };
template <typename A, typename B> struct moe_is_same { static constexpr bool value = false; };
template <typename A> struct moe_is_same<A, A> { static constexpr bool value = true; };
/// A compile-time int as a value (std::integral_constant without <type_traits>): lets a generic
/// lambda take a template parameter.
template <int V> struct moe_int_constant { static constexpr int value = V; };
/// A compile-time bool as a type (a generic lambda's tag argument).
template <bool B> struct moe_bool_constant { static constexpr bool value = B; };

// MARK: - Activations (one definition, so fused epilogues round exactly as the separate kernels)

// silu with the hardware's approximate exp and reciprocal (a few ulp of fp32, far below the half unit of
// bf16/fp16 the result is rounded to): an IEEE division checks its operands and calls a slow routine for a
// zero dividend, which every padding row of a GEMM1 tile is; in the fused epilogues that cost the
// persistent GEMM1 13% (bench/NOTES.md v29). For g < -87, 1 + exp(-g) > 2^126 and the quotient is 0.
MOE_DEVICE float moe_silu(float g) { return __fdividef(g, 1.0f + __expf(-g)); }
MOE_DEVICE float moe_gelu(float g) { return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f)); }

/// act(round_T(gate)) * round_T(up) in fp32, ACT 1 silu or 2 exact gelu (the caller rounds the
/// product once): what GEMM1 rounding its gate/up row to T and then moe_silu_and_mul /
/// moe_gelu_and_mul computes.
template <typename T, int ACT> MOE_DEVICE float moe_act_and_mul(float gate, float up) {
    static_assert(ACT == 1 || ACT == 2, "ACT: 1 silu, 2 gelu");
    float g, u;
    unpack2<T>(pack2<T>(gate, up), g, u);  // each rounded once to T (one packed cvt), then widened
    if constexpr (ACT == 1) {
        return moe_silu(g) * u;
    } else {
        return moe_gelu(g) * u;
    }
}

// MARK: - The aligned routing the grouped GEMMs read

// Normally align's output: sorted_token_ids (pair of each row, padding >= num_valid_tokens),
// expert_ids (expert of each BLOCK_M block) and total_padded (rows in use). Identity routing, for a
// batch of one token (whose k slots name k distinct experts): sorted_token_ids and total_padded are
// null, block b holds pair b alone (row b * BLOCK_M; the block's other rows are padding), expert_ids
// is topk_ids itself, and num_valid_tokens * BLOCK_M rows are in use. No align runs then.

/// One int32 of align's output (sorted ids, expert ids, the padded count), read after
/// griddepcontrol.wait, or before it by the swap-AB GEMM2, whose routing was complete before the
/// previous kernel started. Not a plain load: `const int32_t* __restrict__` becomes ld.global.nc,
/// which ptxas may schedule above griddepcontrol.wait (it treats the memory as constant for the whole
/// kernel), so a kernel read the previous forward's routing (bench/NOTES.md v20). A volatile
/// ld.global.cg stays where it is written and reads L2, never a stale L1 line.
/// scripts/pdl_order_check.py checks the SASS of every kernel for reads above the wait.
MOE_DEVICE int32_t moe_load_routing(const int32_t* p) {
    int32_t v;
    asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

/// The pair of sorted row `row` (>= num_valid_tokens: padding).
MOE_DEVICE int32_t moe_sorted_pair(const int32_t* sorted_token_ids, int64_t row, int block_m, int64_t num_valid_tokens) {
    if (sorted_token_ids != nullptr) return moe_load_routing(sorted_token_ids + row);
    return row % block_m == 0 ? static_cast<int32_t>(row / block_m) : static_cast<int32_t>(num_valid_tokens);
}

/// The rows in use of the sorted order.
MOE_DEVICE int64_t moe_total_padded(const int32_t* total_padded, int64_t num_valid_tokens, int block_m) {
    return total_padded != nullptr ? static_cast<int64_t>(moe_load_routing(total_padded)) : num_valid_tokens * block_m;
}

// MARK: - Warp helpers

MOE_DEVICE float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(MOE_FULL_MASK, v, offset);
    return v;
}

MOE_DEVICE float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(MOE_FULL_MASK, v, offset));
    return v;
}

/// Inclusive prefix sum across the 32 lanes of a warp.
MOE_DEVICE int32_t warp_inclusive_scan(int32_t v, int lane) {
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        int32_t other = __shfl_up_sync(MOE_FULL_MASK, v, offset);
        if (lane >= offset) v += other;
    }
    return v;
}

/// Bit mask of the lanes below this one (%lanemask_lt).
MOE_DEVICE uint32_t lanemask_lt() {
    uint32_t m;
    asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
    return m;
}

// MARK: - Shared memory addressing

/// cvta.to.shared: the 32-bit shared-window address of a generic pointer into shared memory.
MOE_DEVICE uint32_t cvta_to_shared_u32(const void* p) {
    uint32_t a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// MARK: - Asynchronous copies (cp.async)

/// cp.async.cg.shared.global: copy 16 bytes global -> shared, bypassing L1. When `valid`
/// is false the source size is 0 and the 16 destination bytes are zero-filled; no byte
/// is read, but `src` must still be a valid address (pass any in-bounds pointer).
#ifndef MOE_L2_HINTS
#define MOE_L2_HINTS 0  // L2 eviction hints, for A/Bs (NOTES v26): bit 0 the weight boxes (TMA) evict_first,
                        // bit 2 evict_last instead; bit 1 the 16-byte row copies (cp.async: gathered tokens,
                        // partial sums) evict_last, bit 3 evict_first instead
#endif

/// A createpolicy L2 eviction priority for the hinted copies below: evict_first, else evict_last.
MOE_DEVICE uint64_t l2_policy(bool evict_first) {
    uint64_t policy;
    if (evict_first)
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    else
        asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
    return policy;
}

// The GEMM2 epilogues' 16-byte stores of the routed partial rows (st_global_16<true>; bench/NOTES.md v32):
// 0 plain stores; 1 st.global.cs (cache streaming: lines allocated evict-first); 2 an L2::evict_first
// cache policy.
#ifndef MOE_PARTIAL_STORE_HINT
#define MOE_PARTIAL_STORE_HINT 0
#endif

/// A 16-byte global store; PARTIAL (a GEMM2 partial row) with the hint MOE_PARTIAL_STORE_HINT asks for.
template <bool PARTIAL>
MOE_DEVICE void st_global_16(void* dst, uint4 v) {
    if constexpr (PARTIAL && MOE_PARTIAL_STORE_HINT == 1) {
        asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "r"(v.x), "r"(v.y), "r"(v.z),
                     "r"(v.w)
                     : "memory");
    } else if constexpr (PARTIAL && MOE_PARTIAL_STORE_HINT == 2) {
        asm volatile("st.global.L2::cache_hint.v4.u32 [%0], {%1, %2, %3, %4}, %5;\n" ::"l"(dst), "r"(v.x), "r"(v.y),
                     "r"(v.z), "r"(v.w), "l"(l2_policy(true))
                     : "memory");
    } else {
        *reinterpret_cast<uint4*>(dst) = v;
    }
}

MOE_DEVICE void cp_async_cg_16(uint32_t dst, const void* src, bool valid) {
    const int src_size = valid ? 16 : 0;
#if MOE_L2_HINTS & 10
    asm volatile("cp.async.cg.shared.global.L2::cache_hint.L2::128B [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src),
                 "r"(src_size), "l"(l2_policy((MOE_L2_HINTS & 8) != 0))
                 : "memory");
#else
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_size)
                 : "memory");
#endif
}

/// cp.async.commit_group
MOE_DEVICE void cp_async_commit_group() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

/// cp.async.wait_group N: wait until at most N most recent groups are still pending.
template <int N> MOE_DEVICE void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// MARK: - Tensor core operands (ldmatrix) and products (mma.sync)

/// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8x8 b16 matrices; lanes 8i..8i+7 give the
/// row addresses of matrix i; register i of each lane receives its fragment of matrix i.
MOE_DEVICE void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

/// ldmatrix.sync.aligned.m8n8.x2.shared.b16: two 8x8 b16 matrices (row addresses from lanes 0..15).
MOE_DEVICE void ldmatrix_x2(uint32_t& r0, uint32_t& r1, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(addr));
}

/// stmatrix.sync.aligned.m8n8.x4.trans.shared.b16: four 8x8 b16 matrices, each held in the mma
/// fragment layout (lane l: row l / 4, columns 2 (l % 4) and + 1, packed in register i for matrix i),
/// stored transposed: lanes 8i..8i+7 give the addresses of matrix i's stored rows, stored row k being
/// the fragment's column k (16 bytes).
MOE_DEVICE void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0),
                 "r"(r1), "r"(r2), "r"(r3)
                 : "memory");
}

/// The same for two matrices (row addresses from lanes 0..15).
MOE_DEVICE void stmatrix_x2_trans(uint32_t addr, uint32_t r0, uint32_t r1) {
    asm volatile("stmatrix.sync.aligned.m8n8.x2.trans.shared.b16 [%0], {%1, %2};\n" ::"r"(addr), "r"(r0), "r"(r1)
                 : "memory");
}

/// mma.sync.aligned.m16n8k16.row.col.f32.{bf16|f16}: d += a * b on one 16x8x16 tile, fp32 accumulate.
template <typename T> MOE_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <> MOE_DEVICE void mma_m16n8k16<moe_bf16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <> MOE_DEVICE void mma_m16n8k16<moe_fp16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// MARK: - fp32 reductions to global memory (red)

/// red.global.add.f32
MOE_DEVICE void red_global_add_f32(float* addr, float v) {
    asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(addr), "f"(v) : "memory");
}

/// red.global.add.v2.f32 (sm_90; two scalar reds before): addr 8-byte aligned.
MOE_DEVICE void red_global_add_v2_f32(float* addr, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(addr), "f"(a), "f"(b) : "memory");
#else
    red_global_add_f32(addr, a);
    red_global_add_f32(addr + 1, b);
#endif
}

/// red.global.add.v4.f32 (sm_90; four scalar reds before): addr 16-byte aligned.
MOE_DEVICE void red_global_add_v4_f32(float* addr, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(addr), "f"(a), "f"(b), "f"(c), "f"(d)
                 : "memory");
#else
    red_global_add_f32(addr, a);
    red_global_add_f32(addr + 1, b);
    red_global_add_f32(addr + 2, c);
    red_global_add_f32(addr + 3, d);
#endif
}

// MARK: - 16-bit reductions to global memory (the atomic top-k sum, split mode 3)

/// red.global.add.noftz of one bf16 or fp16 value (sm_90): the sum is rounded to T at every add.
template <typename T>
MOE_DEVICE void red_global_add_16(T* addr, T v) {
    static_assert(sizeof(T) == 2, "T: moe_bf16 or moe_fp16");
    if constexpr (moe_is_same<T, moe_bf16>::value) {
        asm volatile("red.global.add.noftz.bf16 [%0], %1;\n" ::"l"(addr), "h"(v.bits) : "memory");
    } else {
        asm volatile("red.global.add.noftz.f16 [%0], %1;\n" ::"l"(addr), "h"(v.bits) : "memory");
    }
}

/// red.global.add.noftz.v4 of eight packed bf16 or fp16 values (16 bytes; sm_90): addr 16-byte aligned.
template <typename T>
MOE_DEVICE void red_global_add_v8_16(T* addr, uint4 v) {
    static_assert(sizeof(T) == 2, "T: moe_bf16 or moe_fp16");
    if constexpr (moe_is_same<T, moe_bf16>::value) {
        asm volatile("red.global.add.noftz.v4.bf16x2 [%0], {%1, %2, %3, %4};\n" ::"l"(addr), "r"(v.x), "r"(v.y),
                     "r"(v.z), "r"(v.w)
                     : "memory");
    } else {
        asm volatile("red.global.add.noftz.v4.f16x2 [%0], {%1, %2, %3, %4};\n" ::"l"(addr), "r"(v.x), "r"(v.y),
                     "r"(v.z), "r"(v.w)
                     : "memory");
    }
}

/// One staged chunk of an output row to global memory: VEC consecutive OutT from src (shared memory) to
/// dst, columns n .. n + VEC - 1 of out_n. One 16-byte store (red.global.add.v4.f32 in split mode 1, a
/// 16-bit red.global.add.noftz.v4 in mode 3) where vec_ok (16-byte aligned rows) and the chunk is whole; element by element otherwise.
template <typename OutT, int VEC, int SPLIT_MODE>
MOE_DEVICE void moe_store_staged_chunk(OutT* dst, const OutT* src, int64_t n, int64_t out_n, bool vec_ok) {
    if (vec_ok && n + VEC <= out_n) {
        if constexpr (SPLIT_MODE == 1) {
            const float4 v = *reinterpret_cast<const float4*>(src);
            red_global_add_v4_f32(dst, v.x, v.y, v.z, v.w);
        } else if constexpr (SPLIT_MODE == 3) {
            red_global_add_v8_16<OutT>(dst, *reinterpret_cast<const uint4*>(src));
        } else {
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        }
    } else {
        for (int e = 0; e < VEC && n + e < out_n; ++e) {
            if constexpr (SPLIT_MODE == 1) {
                red_global_add_f32(dst + e, src[e]);
            } else if constexpr (SPLIT_MODE == 3) {
                red_global_add_16<OutT>(dst + e, src[e]);
            } else {
                dst[e] = src[e];
            }
        }
    }
}

// MARK: - Hopper (sm_90 / sm_90a): tensor maps, mbarriers, bulk tensor copies, wgmma
//
// The wrappers below are used by moe_gemm_sm90.cu only. wgmma and setmaxnreg need the
// sm_90a target; the rest needs sm_90. Shared-memory operands are 32-bit shared-window
// addresses (cvta_to_shared_u32).

#ifndef CUDA_TENSOR_MAP_DEFINED
/// The driver's opaque 128-byte tensor map (cuda.h's CUtensorMap), built on the host by
/// cuTensorMapEncodeTiled and passed by value as a `const __grid_constant__` kernel parameter.
struct alignas(64) CUtensorMap {
    unsigned long long opaque[16];
};
#endif

/// elect.sync: true in exactly one active lane of the warp (the same lane for every caller).
MOE_DEVICE bool elect_one_sync() {
    uint32_t pred = 0;
    asm volatile(
        "{\n.reg .pred p;\nelect.sync _|p, %1;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(pred)
        : "r"(MOE_FULL_MASK));
    return pred != 0;
}

/// setmaxnreg.inc.sync.aligned.u32: raise this warpgroup's per-thread register budget to N
/// (multiple of 8 in 24..256). Executed by all threads of the warpgroup.
template <int N> MOE_DEVICE void setmaxnreg_inc() {
    static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg: multiple of 8 in 24..256");
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

/// setmaxnreg.dec.sync.aligned.u32: lower this warpgroup's per-thread register budget to N.
template <int N> MOE_DEVICE void setmaxnreg_dec() {
    static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg: multiple of 8 in 24..256");
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

/// bar.sync ID, COUNT: named barrier ID (1..15; 0 is __syncthreads) over COUNT threads (a multiple
/// of 32). Compile-time operands let ptxas reserve only the barriers used.
template <int ID, int COUNT> MOE_DEVICE void bar_sync() {
    static_assert(ID >= 0 && ID < 16 && COUNT % 32 == 0, "bar.sync: id in 0..15, count a multiple of 32");
    asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(COUNT) : "memory");
}

/// bar.sync / bar.arrive on named barrier `id` (1..15, chosen at run time) over COUNT threads: the
/// arriving threads do not wait; the barrier completes when COUNT threads have arrived or synced, and
/// orders the arriving threads' prior memory accesses before the syncing threads' later ones.
template <int COUNT> MOE_DEVICE void bar_sync_id(int id) {
    static_assert(COUNT % 32 == 0, "bar.sync: count a multiple of 32");
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(COUNT) : "memory");
}
template <int COUNT> MOE_DEVICE void bar_arrive_id(int id) {
    static_assert(COUNT % 32 == 0, "bar.arrive: count a multiple of 32");
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(COUNT) : "memory");
}

/// st.release.gpu.global.s32: stores `value` after every memory access this thread made before
/// (and, through a barrier before it, its CTA's), visible GPU-wide to an acquiring load.
MOE_DEVICE void st_release_gpu(int32_t* address, int32_t value) {
    asm volatile("st.release.gpu.global.s32 [%0], %1;\n" ::"l"(address), "r"(value) : "memory");
}

/// ld.acquire.gpu.global.s32: a load that later accesses of this thread cannot pass.
MOE_DEVICE int32_t ld_acquire_gpu(const int32_t* address) {
    int32_t value;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(value) : "l"(address) : "memory");
    return value;
}

/// red.release.gpu.global.add.s32: adds value after every earlier write of this thread (and, through a
/// barrier before it, of the threads that barrier joins), visible GPU-wide to an acquiring load that
/// sees the sum.
MOE_DEVICE void red_release_gpu_add(int32_t* address, int32_t value) {
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(address), "r"(value) : "memory");
}

/// discard.global.L2 of the 128-byte line at `address` (128-byte aligned): the line leaves L2 without
/// being written back; until written again it reads as an unspecified value.
MOE_DEVICE void discard_global_l2(const void* address) {
    asm volatile("discard.global.L2 [%0], 128;\n" ::"l"(address) : "memory");
}

/// %globaltimer: nanoseconds, GPU-wide.
MOE_DEVICE uint64_t global_timer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
    return t;
}

/// Waits until *flag is nonzero (acquire), then clears it for the next launch; true. A flag that stays
/// zero for MOE_SPIN_LIMIT_NS (a bug, or programs that can never become resident) ends the wait with
/// false, the flag untouched, so the caller can poison its result instead of hanging. (__trap here
/// would cost the persistent kernel's consumers spills.)
#ifndef MOE_SPIN_LIMIT_NS
#define MOE_SPIN_LIMIT_NS 20000000000ull
#endif
MOE_DEVICE bool wait_flag_and_clear(int32_t* flag) {
    if (ld_acquire_gpu(flag) == 0) {
        const uint64_t start = global_timer_ns();
        while (ld_acquire_gpu(flag) == 0) {
            __nanosleep(64);
            if (global_timer_ns() - start > MOE_SPIN_LIMIT_NS) return false;
        }
    }
    *flag = 0;
    return true;
}

/// Waits until the bits `mask` of *counter reach `need` (acquire loads, 128 ns naps between); true, or
/// false once MOE_SPIN_LIMIT_NS have passed (a bug, or programs that can never become resident), so the
/// caller can fall back or poison instead of hanging.
MOE_DEVICE bool wait_count_at_least(const int32_t* counter, int32_t mask, int32_t need) {
    if ((ld_acquire_gpu(counter) & mask) < need) {
        const uint64_t start = global_timer_ns();
        while ((ld_acquire_gpu(counter) & mask) < need) {
            __nanosleep(128);
            if (global_timer_ns() - start > MOE_SPIN_LIMIT_NS) return false;
        }
    }
    return true;
}

/// bar.red.or.pred on named barrier ID over COUNT threads: bar.sync that also returns, to every
/// thread, whether any of them passed true.
template <int ID, int COUNT> MOE_DEVICE bool bar_sync_or(bool value) {
    static_assert(ID > 0 && ID < 16 && COUNT % 32 == 0, "bar.red: id in 1..15, count a multiple of 32");
    uint32_t any;
    asm volatile(
        "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, %2, %3, p;\n selp.u32 %0, 1, 0, q;\n}\n"
        : "=r"(any)
        : "r"(static_cast<uint32_t>(value)), "n"(ID), "n"(COUNT)
        : "memory");
    return any != 0;
}

/// fence.proxy.async.shared::cta: orders this thread's view of shared memory between the
/// generic proxy (ld/st, cp.async) and the async proxy (TMA, wgmma operand reads).
MOE_DEVICE void fence_proxy_async_shared_cta() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

/// fence.mbarrier_init.release.cluster: makes prior mbarrier.init visible (to the async proxy too).
MOE_DEVICE void fence_mbarrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

/// mbarrier.init.shared::cta.b64: phase 0, expecting `count` arrivals per phase.
MOE_DEVICE void mbarrier_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

/// mbarrier.arrive.shared::cta.b64 (release, CTA scope): one arrival on the current phase.
MOE_DEVICE void mbarrier_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

/// mbarrier.arrive.expect_tx.shared::cta.b64: one arrival, and `bytes` more transaction bytes
/// that asynchronous copies (complete_tx) must deliver before the phase completes.
MOE_DEVICE void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

/// mbarrier.try_wait.parity.shared::cta.b64 (acquire, CTA scope): true once the phase with the
/// given parity has completed (a fresh barrier is in phase 0, and parity 1 counts as completed).
/// May return false after a system-dependent time limit; callers loop.
MOE_DEVICE bool mbarrier_try_wait_parity(uint32_t bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    return done != 0;
}

/// Spins on mbarrier.try_wait.parity until the phase of that parity has completed.
MOE_DEVICE void mbarrier_wait_parity(uint32_t bar, uint32_t parity) {
    while (!mbarrier_try_wait_parity(bar, parity)) {
    }
}

/// cp.async.mbarrier.arrive.noinc.shared::cta.b64: one arrival on the barrier once every
/// cp.async this thread issued before has completed. noinc: the arrival counts against the
/// barrier's expected count (initialize the barrier to include one per arriving thread).
MOE_DEVICE void cp_async_mbarrier_arrive_noinc(uint32_t bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

/// cp.async.wait_all: wait for every cp.async this thread has issued.
MOE_DEVICE void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

/// prefetch.tensormap: bring a tensor map (generic address of a __grid_constant__ parameter)
/// into the cache the copy engine reads it from.
MOE_DEVICE void prefetch_tensormap(const CUtensorMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

/// cp.async.bulk.prefetch.L2.global (sm_90): start bringing `bytes` (a multiple of 16) at the 16-byte
/// aligned global address src into L2. Nothing waits for it and nothing is written; a no-op below sm_90.
MOE_DEVICE void prefetch_l2_bulk(const void* src, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(__cvta_generic_to_global(src)), "r"(bytes)
                 : "memory");
#endif
}

/// cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes: the box of
/// `map` at element coordinates (c0 innermost, c1) copied to shared memory at dst (aligned as the
/// map's swizzle requires: 1024 bytes for 128B), completing `bar`'s transaction bytes. Parts of
/// the box outside the tensor are filled as the map says (zeros); the full box bytes count.
MOE_DEVICE void tma_load_2d(uint32_t dst, const CUtensorMap* map, int32_t c0, int32_t c1, uint32_t bar) {
#if MOE_L2_HINTS & 5
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint [%0], "
        "[%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar),
        "l"(l2_policy((MOE_L2_HINTS & 4) == 0))
        : "memory");
#else
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
#endif
}

/// The same box copied into the shared memory of every CTA of the cluster in cta_mask (bit r: rank r),
/// at the same offset dst in each, completing the transaction bytes of the barrier at offset bar in
/// each destination CTA (cp.async.bulk.tensor...multicast::cluster). The issuing CTA is usually in
/// the mask.
MOE_DEVICE void tma_load_2d_multicast(uint32_t dst, const CUtensorMap* map, int32_t c0, int32_t c1, uint32_t bar,
                                      uint16_t cta_mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster "
        "[%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar), "h"(cta_mask)
        : "memory");
}

/// %cluster_ctarank: this CTA's rank in its thread-block cluster (0 without a cluster launch).
MOE_DEVICE uint32_t cluster_ctarank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}

/// %cluster_nctarank: the CTAs in this thread-block cluster (1 without a cluster launch).
MOE_DEVICE uint32_t cluster_nctarank() {
    uint32_t n;
    asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
    return n;
}

/// mapa.shared::cluster: the shared::cluster address of offset `addr` (a shared::cta address of this
/// CTA) in the shared memory of cluster rank `rank`.
MOE_DEVICE uint32_t mapa_shared_cluster(uint32_t addr, uint32_t rank) {
    uint32_t r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
}

/// mbarrier.arrive.shared::cluster.b64 (release, CTA scope): one arrival on a barrier of any CTA of
/// the cluster (a shared::cluster address from mapa_shared_cluster). For releasing a ring stage
/// whose reads (wgmma, waited for) are done: a cluster-scope release would put a GPU-wide memory
/// barrier (MEMBAR.ALL.GPU) before every arrival.
MOE_DEVICE void mbarrier_arrive_cluster(uint32_t cluster_bar) {
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_bar) : "memory");
}

/// barrier.cluster.arrive.relaxed: this thread's arrival on the cluster barrier, without ordering
/// its memory accesses (pair with cluster_wait; mbarrier inits are published by fence_mbarrier_init).
MOE_DEVICE void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.relaxed;\n" ::: "memory"); }

/// barrier.cluster.wait.acquire: waits until every non-exited thread of the cluster has arrived.
MOE_DEVICE void cluster_wait() { asm volatile("barrier.cluster.wait.acquire;\n" ::: "memory"); }

/// wgmma shared-memory matrix descriptor for a K-major operand in the 128-byte swizzle layout:
/// rows of 128 bytes (64 16-bit elements of K), 8-row atoms of 1024 bytes, 16-byte chunk c of
/// row r stored at chunk c ^ (r % 8) (the TMA's CU_TENSOR_MAP_SWIZZLE_128B pattern: address bits
/// 4-6 XOR bits 7-9). The atom base must be 1024-byte aligned; a k16 step inside the 128-byte row
/// advances the start address by 32 bytes (the swizzle is applied to the final address bits).
///   bits  0-13: start address >> 4
///   bits 16-29: leading-dimension byte offset >> 4 (unused for swizzled K-major; 1 by convention)
///   bits 32-45: stride-dimension byte offset >> 4 (1024 bytes between 8-row atoms along M/N)
///   bits 49-51: matrix base offset (0: atoms are 1024-byte aligned)
///   bits 62-63: swizzle mode (1 = 128B)
MOE_DEVICE uint64_t wgmma_desc_k_major_sw128(uint32_t smem_addr) {
    uint64_t desc = 0;
    desc |= static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4);
    desc |= static_cast<uint64_t>(16u >> 4) << 16;
    desc |= static_cast<uint64_t>(1024u >> 4) << 32;
    desc |= static_cast<uint64_t>(1u) << 62;
    return desc;
}

/// wgmma.fence.sync.aligned: orders prior register/shared accesses of the warpgroup before the
/// wgmma.mma_async that follow (required before the first wgmma and after touching accumulators).
MOE_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

/// wgmma.commit_group.sync.aligned: closes the group of wgmma.mma_async issued since the last commit.
MOE_DEVICE void wgmma_commit_group() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

/// wgmma.wait_group.sync.aligned N: waits until at most N committed groups are still pending.
template <int N> MOE_DEVICE void wgmma_wait_group() {
    static_assert(N >= 0 && N <= 7, "wgmma.wait_group: N in 0..7");
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

/// Keeps the compiler from moving accesses of an accumulator register across the asynchronous
/// wgmma window (an empty asm that reads and writes the register; emits no instruction).
MOE_DEVICE void wgmma_fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

/// wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16|f16}.{bf16|f16}, both operands from shared
/// memory, both K-major (imm-trans-a = imm-trans-b = 0): d (64 x N fp32, N/2 per thread) =
/// A (64 x 16, desc_a) * B (N x 16, desc_b)^T + (accumulate ? d : 0). Asynchronous: fence with
/// wgmma_fence before, commit_group and wait_group before reading d.
/// Accumulator layout (thread t of the warpgroup, w = t / 32, l = t % 32): d[4*j + 2*h + c] holds
/// row 16*w + l/4 + 8*h, column 8*j + 2*(l%4) + c, for j < N/8, h, c in {0, 1}.
template <typename T, int N>
MOE_DEVICE void wgmma_m64nNk16_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int accumulate);

// The operand lists of the wgmma.m64nNk16 wrappers: MOE_WGMMA_D8(i) is accumulators d[i .. i + 7] as
// "+f" operands, MOE_WGMMA_R8_i their placeholders "%i, ..., %(i + 7)" (asm operands are numbered in
// order, the accumulators first).
#define MOE_WGMMA_D8(i) \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
    "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define MOE_WGMMA_R8_0 "%0, %1, %2, %3, %4, %5, %6, %7"
#define MOE_WGMMA_R8_8 "%8, %9, %10, %11, %12, %13, %14, %15"
#define MOE_WGMMA_R8_16 "%16, %17, %18, %19, %20, %21, %22, %23"
#define MOE_WGMMA_R8_24 "%24, %25, %26, %27, %28, %29, %30, %31"
#define MOE_WGMMA_R8_32 "%32, %33, %34, %35, %36, %37, %38, %39"
#define MOE_WGMMA_R8_40 "%40, %41, %42, %43, %44, %45, %46, %47"
#define MOE_WGMMA_R8_48 "%48, %49, %50, %51, %52, %53, %54, %55"
#define MOE_WGMMA_R8_56 "%56, %57, %58, %59, %60, %61, %62, %63"
#define MOE_WGMMA_R8_64 "%64, %65, %66, %67, %68, %69, %70, %71"
#define MOE_WGMMA_R8_72 "%72, %73, %74, %75, %76, %77, %78, %79"
#define MOE_WGMMA_R8_80 "%80, %81, %82, %83, %84, %85, %86, %87"
#define MOE_WGMMA_R8_88 "%88, %89, %90, %91, %92, %93, %94, %95"
#define MOE_WGMMA_R8_96 "%96, %97, %98, %99, %100, %101, %102, %103"
#define MOE_WGMMA_R8_104 "%104, %105, %106, %107, %108, %109, %110, %111"
#define MOE_WGMMA_R8_112 "%112, %113, %114, %115, %116, %117, %118, %119"
#define MOE_WGMMA_R8_120 "%120, %121, %122, %123, %124, %125, %126, %127"

// Every wgmma.m64nNk16 shape the kernels use, for one element type: T the storage type, PTXT its
// PTX type name. Expanded for bf16 and fp16 below.
#define MOE_WGMMA_M64NNK16_SS(T, PTXT) \
template <> \
MOE_DEVICE void wgmma_m64nNk16_ss<T, 8>(float (&d)[4], uint64_t desc_a, uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n8k16.f32." PTXT "." PTXT " {" \
                 "%0, %1, %2, %3" \
                 "}, %4, %5, p, 1, 1, 0, 0;\n}\n" \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate)); \
} \
template <> \
MOE_DEVICE void wgmma_m64nNk16_ss<T, 16>(float (&d)[8], uint64_t desc_a, uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n16k16.f32." PTXT "." PTXT " {" \
                 MOE_WGMMA_R8_0 \
                 "}, %8, %9, p, 1, 1, 0, 0;\n}\n" \
                 : MOE_WGMMA_D8(0) \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate)); \
} \
template <> \
MOE_DEVICE void wgmma_m64nNk16_ss<T, 32>(float (&d)[16], uint64_t desc_a, uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32." PTXT "." PTXT " {" \
                 MOE_WGMMA_R8_0 ", " MOE_WGMMA_R8_8 \
                 "}, %16, %17, p, 1, 1, 0, 0;\n}\n" \
                 : MOE_WGMMA_D8(0), MOE_WGMMA_D8(8) \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate)); \
} \
template <> \
MOE_DEVICE void wgmma_m64nNk16_ss<T, 64>(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTXT "." PTXT " {" \
                 MOE_WGMMA_R8_0 ", " MOE_WGMMA_R8_8 ", " MOE_WGMMA_R8_16 ", " MOE_WGMMA_R8_24 \
                 "}, %32, %33, p, 1, 1, 0, 0;\n}\n" \
                 : MOE_WGMMA_D8(0), MOE_WGMMA_D8(8), MOE_WGMMA_D8(16), MOE_WGMMA_D8(24) \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate)); \
} \
template <> \
MOE_DEVICE void wgmma_m64nNk16_ss<T, 80>(float (&d)[40], uint64_t desc_a, uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %42, 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n80k16.f32." PTXT "." PTXT " {" \
                 MOE_WGMMA_R8_0 ", " MOE_WGMMA_R8_8 ", " MOE_WGMMA_R8_16 ", " MOE_WGMMA_R8_24 \
                 ", " MOE_WGMMA_R8_32 \
                 "}, %40, %41, p, 1, 1, 0, 0;\n}\n" \
                 : MOE_WGMMA_D8(0), MOE_WGMMA_D8(8), MOE_WGMMA_D8(16), MOE_WGMMA_D8(24), MOE_WGMMA_D8(32) \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate)); \
} \
template <> \
MOE_DEVICE void wgmma_m64nNk16_ss<T, 96>(float (&d)[48], uint64_t desc_a, uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %50, 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n96k16.f32." PTXT "." PTXT " {" \
                 MOE_WGMMA_R8_0 ", " MOE_WGMMA_R8_8 ", " MOE_WGMMA_R8_16 ", " MOE_WGMMA_R8_24 \
                 ", " MOE_WGMMA_R8_32 ", " MOE_WGMMA_R8_40 \
                 "}, %48, %49, p, 1, 1, 0, 0;\n}\n" \
                 : MOE_WGMMA_D8(0), MOE_WGMMA_D8(8), MOE_WGMMA_D8(16), MOE_WGMMA_D8(24), MOE_WGMMA_D8(32), \
                   MOE_WGMMA_D8(40) \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate)); \
} \
template <> \
MOE_DEVICE void wgmma_m64nNk16_ss<T, 112>(float (&d)[56], uint64_t desc_a, uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %58, 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n112k16.f32." PTXT "." PTXT " {" \
                 MOE_WGMMA_R8_0 ", " MOE_WGMMA_R8_8 ", " MOE_WGMMA_R8_16 ", " MOE_WGMMA_R8_24 \
                 ", " MOE_WGMMA_R8_32 ", " MOE_WGMMA_R8_40 ", " MOE_WGMMA_R8_48 \
                 "}, %56, %57, p, 1, 1, 0, 0;\n}\n" \
                 : MOE_WGMMA_D8(0), MOE_WGMMA_D8(8), MOE_WGMMA_D8(16), MOE_WGMMA_D8(24), MOE_WGMMA_D8(32), \
                   MOE_WGMMA_D8(40), MOE_WGMMA_D8(48) \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate)); \
} \
template <> \
MOE_DEVICE void wgmma_m64nNk16_ss<T, 128>(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTXT "." PTXT " {" \
                 MOE_WGMMA_R8_0 ", " MOE_WGMMA_R8_8 ", " MOE_WGMMA_R8_16 ", " MOE_WGMMA_R8_24 \
                 ", " MOE_WGMMA_R8_32 ", " MOE_WGMMA_R8_40 ", " MOE_WGMMA_R8_48 ", " MOE_WGMMA_R8_56 \
                 "}, %64, %65, p, 1, 1, 0, 0;\n}\n" \
                 : MOE_WGMMA_D8(0), MOE_WGMMA_D8(8), MOE_WGMMA_D8(16), MOE_WGMMA_D8(24), MOE_WGMMA_D8(32), \
                   MOE_WGMMA_D8(40), MOE_WGMMA_D8(48), MOE_WGMMA_D8(56) \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate)); \
} \
template <> \
MOE_DEVICE void wgmma_m64nNk16_ss<T, 144>(float (&d)[72], uint64_t desc_a, uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %74, 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n144k16.f32." PTXT "." PTXT " {" \
                 MOE_WGMMA_R8_0 ", " MOE_WGMMA_R8_8 ", " MOE_WGMMA_R8_16 ", " MOE_WGMMA_R8_24 \
                 ", " MOE_WGMMA_R8_32 ", " MOE_WGMMA_R8_40 ", " MOE_WGMMA_R8_48 ", " MOE_WGMMA_R8_56 \
                 ", " MOE_WGMMA_R8_64 \
                 "}, %72, %73, p, 1, 1, 0, 0;\n}\n" \
                 : MOE_WGMMA_D8(0), MOE_WGMMA_D8(8), MOE_WGMMA_D8(16), MOE_WGMMA_D8(24), MOE_WGMMA_D8(32), \
                   MOE_WGMMA_D8(40), MOE_WGMMA_D8(48), MOE_WGMMA_D8(56), MOE_WGMMA_D8(64) \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate)); \
} \
template <> \
MOE_DEVICE void wgmma_m64nNk16_ss<T, 160>(float (&d)[80], uint64_t desc_a, uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %82, 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n160k16.f32." PTXT "." PTXT " {" \
                 MOE_WGMMA_R8_0 ", " MOE_WGMMA_R8_8 ", " MOE_WGMMA_R8_16 ", " MOE_WGMMA_R8_24 \
                 ", " MOE_WGMMA_R8_32 ", " MOE_WGMMA_R8_40 ", " MOE_WGMMA_R8_48 ", " MOE_WGMMA_R8_56 \
                 ", " MOE_WGMMA_R8_64 ", " MOE_WGMMA_R8_72 \
                 "}, %80, %81, p, 1, 1, 0, 0;\n}\n" \
                 : MOE_WGMMA_D8(0), MOE_WGMMA_D8(8), MOE_WGMMA_D8(16), MOE_WGMMA_D8(24), MOE_WGMMA_D8(32), \
                   MOE_WGMMA_D8(40), MOE_WGMMA_D8(48), MOE_WGMMA_D8(56), MOE_WGMMA_D8(64), MOE_WGMMA_D8(72) \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate)); \
} \
template <> \
MOE_DEVICE void wgmma_m64nNk16_ss<T, 176>(float (&d)[88], uint64_t desc_a, uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n176k16.f32." PTXT "." PTXT " {" \
                 MOE_WGMMA_R8_0 ", " MOE_WGMMA_R8_8 ", " MOE_WGMMA_R8_16 ", " MOE_WGMMA_R8_24 \
                 ", " MOE_WGMMA_R8_32 ", " MOE_WGMMA_R8_40 ", " MOE_WGMMA_R8_48 ", " MOE_WGMMA_R8_56 \
                 ", " MOE_WGMMA_R8_64 ", " MOE_WGMMA_R8_72 ", " MOE_WGMMA_R8_80 \
                 "}, %88, %89, p, 1, 1, 0, 0;\n}\n" \
                 : MOE_WGMMA_D8(0), MOE_WGMMA_D8(8), MOE_WGMMA_D8(16), MOE_WGMMA_D8(24), MOE_WGMMA_D8(32), \
                   MOE_WGMMA_D8(40), MOE_WGMMA_D8(48), MOE_WGMMA_D8(56), MOE_WGMMA_D8(64), MOE_WGMMA_D8(72), \
                   MOE_WGMMA_D8(80) \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate)); \
} \
template <> \
MOE_DEVICE void wgmma_m64nNk16_ss<T, 192>(float (&d)[96], uint64_t desc_a, uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n192k16.f32." PTXT "." PTXT " {" \
                 MOE_WGMMA_R8_0 ", " MOE_WGMMA_R8_8 ", " MOE_WGMMA_R8_16 ", " MOE_WGMMA_R8_24 \
                 ", " MOE_WGMMA_R8_32 ", " MOE_WGMMA_R8_40 ", " MOE_WGMMA_R8_48 ", " MOE_WGMMA_R8_56 \
                 ", " MOE_WGMMA_R8_64 ", " MOE_WGMMA_R8_72 ", " MOE_WGMMA_R8_80 ", " MOE_WGMMA_R8_88 \
                 "}, %96, %97, p, 1, 1, 0, 0;\n}\n" \
                 : MOE_WGMMA_D8(0), MOE_WGMMA_D8(8), MOE_WGMMA_D8(16), MOE_WGMMA_D8(24), MOE_WGMMA_D8(32), \
                   MOE_WGMMA_D8(40), MOE_WGMMA_D8(48), MOE_WGMMA_D8(56), MOE_WGMMA_D8(64), MOE_WGMMA_D8(72), \
                   MOE_WGMMA_D8(80), MOE_WGMMA_D8(88) \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate)); \
} \
template <> \
MOE_DEVICE void wgmma_m64nNk16_ss<T, 256>(float (&d)[128], uint64_t desc_a, uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32." PTXT "." PTXT " {" \
                 MOE_WGMMA_R8_0 ", " MOE_WGMMA_R8_8 ", " MOE_WGMMA_R8_16 ", " MOE_WGMMA_R8_24 \
                 ", " MOE_WGMMA_R8_32 ", " MOE_WGMMA_R8_40 ", " MOE_WGMMA_R8_48 ", " MOE_WGMMA_R8_56 \
                 ", " MOE_WGMMA_R8_64 ", " MOE_WGMMA_R8_72 ", " MOE_WGMMA_R8_80 ", " MOE_WGMMA_R8_88 \
                 ", " MOE_WGMMA_R8_96 ", " MOE_WGMMA_R8_104 ", " MOE_WGMMA_R8_112 \
                 ", " MOE_WGMMA_R8_120 \
                 "}, %128, %129, p, 1, 1, 0, 0;\n}\n" \
                 : MOE_WGMMA_D8(0), MOE_WGMMA_D8(8), MOE_WGMMA_D8(16), MOE_WGMMA_D8(24), MOE_WGMMA_D8(32), \
                   MOE_WGMMA_D8(40), MOE_WGMMA_D8(48), MOE_WGMMA_D8(56), MOE_WGMMA_D8(64), MOE_WGMMA_D8(72), \
                   MOE_WGMMA_D8(80), MOE_WGMMA_D8(88), MOE_WGMMA_D8(96), MOE_WGMMA_D8(104), MOE_WGMMA_D8(112), \
                   MOE_WGMMA_D8(120) \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate)); \
}

MOE_WGMMA_M64NNK16_SS(moe_bf16, "bf16")
MOE_WGMMA_M64NNK16_SS(moe_fp16, "f16")
#undef MOE_WGMMA_M64NNK16_SS
#undef MOE_WGMMA_D8
#undef MOE_WGMMA_R8_0
#undef MOE_WGMMA_R8_8
#undef MOE_WGMMA_R8_16
#undef MOE_WGMMA_R8_24
#undef MOE_WGMMA_R8_32
#undef MOE_WGMMA_R8_40
#undef MOE_WGMMA_R8_48
#undef MOE_WGMMA_R8_56
#undef MOE_WGMMA_R8_64
#undef MOE_WGMMA_R8_72
#undef MOE_WGMMA_R8_80
#undef MOE_WGMMA_R8_88
#undef MOE_WGMMA_R8_96
#undef MOE_WGMMA_R8_104
#undef MOE_WGMMA_R8_112
#undef MOE_WGMMA_R8_120

// griddepcontrol.wait (sm_90): under programmatic dependent launch, blocks until every grid this
// one depends on has completed and its memory is visible. Every kernel of the forward calls it
// first, so the next launch may start while the previous grid drains; without the launch
// attribute it returns at once.
MOE_DEVICE void griddepcontrol_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// griddepcontrol.launch_dependents (sm_90): under programmatic dependent launch, lets the grid that
// depends on this one be scheduled once every block of this grid has executed it (the first time, by
// any of its threads) or exited; without the launch attribute it does nothing. It orders no memory:
// the dependent's griddepcontrol.wait still waits for this whole grid to complete and its writes to
// be visible, so where a kernel signals changes only when the next one may start waiting.
MOE_DEVICE void griddepcontrol_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The first statement of every forward kernel: wait for the previous grid (its writes visible), then
// let the next grid be scheduled at once. Its programs become resident as this grid's programs finish
// (all of this grid's programs have started by then, so none is crowded out) and do their launch
// before their own wait returns, so no launch latency sits between the kernels of a forward.
MOE_DEVICE void griddepcontrol_wait_then_launch_dependents() {
    griddepcontrol_wait();
    griddepcontrol_launch_dependents();
}

#endif  // MOE_COMMON_CUH
