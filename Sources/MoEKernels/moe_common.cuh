// moe_common.cuh: what every MoE kernel shares.
//
// Compiled by NVRTC with no system headers, so this file defines the fixed-width
// integer types, the 16-bit float storage types and their conversions itself.
// All inline PTX of the package lives here, each wrapper named for its instruction.
// Requires sm_80 or newer (cp.async, ldmatrix, mma.sync bf16); on sm_90 the f32
// reductions use the vector forms (red.global.add.v2/v4.f32).
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
MOE_DEVICE void cp_async_cg_16(uint32_t dst, const void* src, bool valid) {
    const int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_size)
                 : "memory");
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

#endif  // MOE_COMMON_CUH
