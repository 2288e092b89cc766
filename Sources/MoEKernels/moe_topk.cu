// moe_topk.cu: routing, top-k of the softmax of the router logits.
//
// moe_topk_softmax<T>(logits [M, E] of T, M, E, k, renormalize, topk_ids [M, k] int32, topk_weights [M, k] fp32)
//
// Grid:   x = ceil(M / 4) (any x >= 1 works: programs stride over tokens by 4 * gridDim.x).
// Block:  128 threads = 4 warps; one warp per token.
// Each warp: reads the token's E logits (lane l holds experts l, l + 32, ...), computes the
//         softmax in fp32 (max-subtracted, expf), then selects the k largest probabilities in
//         descending order, ties to the lower expert index. topk_weights are those
//         probabilities, divided by their sum when renormalize != 0. A NaN probability ranks
//         below every number and is reported as NaN.
// Shared memory: none.
// Limits: 1 <= E <= 512 (MAX_EXPERTS), 1 <= k <= min(E, 32). T in {moe_bf16, moe_fp16, float}.
#include "moe_common.cuh"

namespace moe_topk_detail {
constexpr int WARPS_PER_BLOCK = 4;
constexpr int MAX_EXPERTS = 512;
constexpr int PER_LANE = MAX_EXPERTS / 32;
constexpr float NAN_KEY = -1.0f;                      // NaN ranks below every probability (>= 0)
}  // namespace moe_topk_detail

template <typename T>
__global__ void __launch_bounds__(128)
    moe_topk_softmax(const T* __restrict__ logits, int64_t M, int32_t E, int32_t k, int32_t renormalize,
                     int32_t* __restrict__ topk_ids, float* __restrict__ topk_weights) {
    using namespace moe_topk_detail;
    const float EMPTY = __int_as_float(0xff800000);  // -inf: padding and already chosen entries
    const int lane = threadIdx.x & 31;
    const int64_t first = static_cast<int64_t>(blockIdx.x) * WARPS_PER_BLOCK + (threadIdx.x >> 5);
    const int64_t step = static_cast<int64_t>(gridDim.x) * WARPS_PER_BLOCK;

    for (int64_t t = first; t < M; t += step) {
        const T* row = logits + t * E;
        float v[PER_LANE];
        float row_max = EMPTY;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            const int e = lane + 32 * j;
            v[j] = e < E ? to_float(row[e]) : EMPTY;
            row_max = fmaxf(row_max, v[j]);
        }
        row_max = warp_max(row_max);
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            const int e = lane + 32 * j;
            v[j] = e < E ? expf(v[j] - row_max) : 0.0f;
            sum += v[j];
        }
        sum = warp_sum(sum);
        const float inv_sum = 1.0f / sum;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            const int e = lane + 32 * j;
            const float p = v[j] * inv_sum;
            v[j] = e < E ? (p == p ? p : NAN_KEY) : EMPTY;
        }

        // k rounds of a warp arg-max; lane r keeps the winner of round r.
        int32_t my_id = 0;
        float my_weight = 0.0f;
        for (int r = 0; r < k; ++r) {
            float best = v[0];
            int best_e = lane;
#pragma unroll
            for (int j = 1; j < PER_LANE; ++j)
                if (v[j] > best) {  // strict: the lower index wins ties inside a lane
                    best = v[j];
                    best_e = lane + 32 * j;
                }
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) {
                const float other = __shfl_xor_sync(MOE_FULL_MASK, best, offset);
                const int other_e = __shfl_xor_sync(MOE_FULL_MASK, best_e, offset);
                if (other > best || (other == best && other_e < best_e)) {
                    best = other;
                    best_e = other_e;
                }
            }
            if (lane == r) {
                my_id = best_e;
                my_weight = best == NAN_KEY ? __int_as_float(0x7fc00000) : best;
            }
#pragma unroll
            for (int j = 0; j < PER_LANE; ++j)
                if (lane + 32 * j == best_e) v[j] = EMPTY;
        }

        if (renormalize != 0) {
            const float selected = warp_sum(lane < k ? my_weight : 0.0f);
            my_weight = my_weight / selected;
        }
        if (lane < k) {
            topk_ids[t * k + lane] = my_id;
            topk_weights[t * k + lane] = my_weight;
        }
    }
}
