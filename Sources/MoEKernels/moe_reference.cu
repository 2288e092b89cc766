// moe_reference.cu: a plain fp32 MoE layer on the GPU, to check the fast path on large shapes.
//
// Written for clarity: one warp per output element, lanes stride over the reduction
// dimension, a shuffle reduction at the end. No tensor cores, no shared memory.
// Block 256 threads (8 warps); grid x any value >= 1 (warps stride over outputs),
// recommended clamp(ceil(outputs / 8), 1, 65535 * 16).
//
// moe_reference_gemm1<T>(x [M, H], w1 [E, 2I, H], topk_ids [M, k], M, k, H, I, activation, inter [M*k, I] fp32)
//     outputs = M * k * I. For pair p = t*k + j with e = topk_ids[p]:
//     g = dot(w1[e, i, :], x[t, :]), u = dot(w1[e, I + i, :], x[t, :]) in fp32,
//     inter[p, i] = act(g) * u with act = silu (activation 0) or exact gelu (activation 1);
//     inter[p, i] = 0 when e < 0 (expert not owned).
// moe_reference_gemm2<T>(inter [M*k, I] fp32, w2 [E, H, I], topk_ids, topk_weights [M, k], M, k, H, I, out [M, H] fp32)
//     outputs = M * H. out[t, h] = sum over j = 0..k-1 (skipping e < 0) of
//     topk_weights[t, j] * dot(w2[e, h, :], inter[t*k + j, :]).
#include "moe_common.cuh"

namespace moe_reference_detail {
MOE_DEVICE int64_t first_warp() { return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; }
MOE_DEVICE int64_t warp_step() { return (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5; }
}  // namespace moe_reference_detail

template <typename T>
__global__ void __launch_bounds__(256)
    moe_reference_gemm1(const T* __restrict__ x, const T* __restrict__ w1, const int32_t* __restrict__ topk_ids,
                        int64_t M, int32_t k, int64_t H, int64_t I, int32_t activation, float* __restrict__ inter) {
    using namespace moe_reference_detail;
    const int lane = threadIdx.x & 31;
    const int64_t outputs = M * k * I;
    for (int64_t o = first_warp(); o < outputs; o += warp_step()) {
        const int64_t p = o / I;
        const int64_t i = o - p * I;
        const int64_t t = p / k;
        const int32_t e = topk_ids[p];
        float result = 0.0f;
        if (e >= 0) {
            const T* gate_row = w1 + (static_cast<int64_t>(e) * 2 * I + i) * H;
            const T* up_row = gate_row + I * H;
            const T* x_row = x + t * H;
            float g = 0.0f, u = 0.0f;
            for (int64_t h = lane; h < H; h += 32) {
                const float xv = to_float(x_row[h]);
                g += to_float(gate_row[h]) * xv;
                u += to_float(up_row[h]) * xv;
            }
            g = warp_sum(g);
            u = warp_sum(u);
            const float a = activation == 0 ? g / (1.0f + expf(-g)) : 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
            result = a * u;
        }
        if (lane == 0) inter[o] = result;
    }
}

template <typename T>
__global__ void __launch_bounds__(256)
    moe_reference_gemm2(const float* __restrict__ inter, const T* __restrict__ w2, const int32_t* __restrict__ topk_ids,
                        const float* __restrict__ topk_weights, int64_t M, int32_t k, int64_t H, int64_t I,
                        float* __restrict__ out) {
    using namespace moe_reference_detail;
    const int lane = threadIdx.x & 31;
    const int64_t outputs = M * H;
    for (int64_t o = first_warp(); o < outputs; o += warp_step()) {
        const int64_t t = o / H;
        const int64_t h = o - t * H;
        float result = 0.0f;
        for (int32_t j = 0; j < k; ++j) {
            const int64_t p = t * k + j;
            const int32_t e = topk_ids[p];
            if (e < 0) continue;
            const T* w_row = w2 + (static_cast<int64_t>(e) * H + h) * I;
            const float* a_row = inter + p * I;
            float d = 0.0f;
            for (int64_t i = lane; i < I; i += 32) d += to_float(w_row[i]) * a_row[i];
            result += topk_weights[p] * warp_sum(d);
        }
        if (lane == 0) out[o] = result;
    }
}
