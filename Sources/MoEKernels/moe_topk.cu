// moe_topk.cu: routing, from router logits to top-k expert ids and weights.
//   moe_topk_softmax: top-k of the softmax (Mixtral, Qwen); its CPU twin is Router.softmaxTopK.
//   moe_grouped_topk: grouped top-k with softmax or sigmoid scores, a correction bias and a scaling
//                     factor (DeepSeek-V2/V3, Kimi-K2); its CPU twin is Router.groupedTopK, which it
//                     matches bit for bit (same fp32 operations in the same order).
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

// moe_grouped_topk<T>(logits [M, E] of T, correction_bias [E] fp32 or null, M, E, k, groups, topk_groups,
//                     scoring (0 softmax, 1 sigmoid), renormalize, scaling,
//                     topk_ids [M, k] int32, topk_weights [M, k] fp32)
//
// Grid:   x = ceil(M / 4), capped at 65535 (any x >= 1 works: programs stride over tokens by 4 * gridDim.x).
// Block:  128 threads = 4 warps; one warp per token.
// Each warp, for its token (vLLM's grouped_topk; SGLang's biased_grouped_topk with a bias):
//   1. scores: softmax of the E logits (max-subtracted, the sum over the warp) or sigmoid of each;
//      choice = score + correction_bias[e] (or the score without a bias). Both rows go to shared memory.
//   2. lane g < groups scans group g's E / groups choice scores in order: the group's score is the sum
//      of its two largest with a bias, its largest without.
//   3. topk_groups rounds of a warp arg-max over the group scores keep the best groups. When
//      topk_groups == groups every group is kept and steps 2 and 3 are skipped.
//   4. k rounds of a warp arg-max over the kept groups' choice scores pick the experts; lane r keeps
//      round r's expert and its score (without the bias). Every lane adds the chosen scores in round
//      order; the weight is score / sum when renormalize != 0, then times scaling.
//   Ties go to the lower index (group or expert); a NaN score ranks below every number.
//   All arithmetic is fp32 with explicitly rounded operations (__fadd_rn, __fmul_rn, __fdiv_rn, fmaf),
//   in the order Router.groupedTopK (GroupedTopK.swift) uses, with router_exp for exp: the CPU and
//   the GPU agree bit for bit.
// Shared memory: 2 rows of 528 floats per warp (scores and choice scores; one padding word per 32
//         experts so that lanes scanning neighbouring groups of 32 read different banks): 16.5 KiB static.
// Limits: 1 <= E <= 512 and divisible by groups, 1 <= groups <= 32, 1 <= topk_groups <= groups,
//         1 <= k <= min(32, topk_groups * E / groups); with a bias, E / groups >= 2.
//         T in {moe_bf16, moe_fp16, float}.

namespace moe_grouped_topk_detail {
constexpr int WARPS_PER_BLOCK = 4;
constexpr int MAX_EXPERTS = 512;
constexpr int PER_LANE = MAX_EXPERTS / 32;
constexpr int PADDED_ROW = MAX_EXPERTS + MAX_EXPERTS / 32;
constexpr int32_t NO_INDEX = 0x7fffffff;  // an empty candidate: loses to every real one

/// Where expert e lives in a warp's padded shared row.
MOE_DEVICE int padded(int e) { return e + (e >> 5); }

/// e^x, RouterArithmetic.exp of GroupedTopK.swift step for step (Cephes' expf reduction and polynomial
/// with fused multiply-adds); within about 1 ulp. Not expf, whose last place differs from the CPU's.
MOE_DEVICE float router_exp(float x) {
    if (x != x) return x;
    if (x > 0x1.62e43p+6f) return __int_as_float(0x7f800000);  // above log(FLT_MAX): inf
    if (x < -0x1.9fe368p+6f) return 0.0f;                     // below log(2^-150): rounds to 0
    const float n = rintf(__fmul_rn(x, 0x1.715476p+0f));
    float r = fmaf(-n, 0x1.63p-1f, x);  // ln 2 in two parts: 0.693359375 (exact) ...
    r = fmaf(-n, -0x1.bd0106p-13f, r);  // ... and ln 2 - 0.693359375
    float p = 0x1.a0d2cep-13f;
    p = fmaf(p, r, 0x1.6e879cp-10f);
    p = fmaf(p, r, 0x1.11121p-7f);
    p = fmaf(p, r, 0x1.555382p-5f);
    p = fmaf(p, r, 0x1.555554p-3f);
    p = fmaf(p, r, 0x1p-1f);
    const float y = __fadd_rn(fmaf(p, __fmul_rn(r, r), r), 1.0f);
    const int32_t exponent = static_cast<int32_t>(n);
    const int32_t half = exponent / 2;
    return __fmul_rn(__fmul_rn(y, __int_as_float((half + 127) << 23)), __int_as_float((exponent - half + 127) << 23));
}

/// Leaves in every lane the warp's best (key, index): the larger key, then the lower index.
MOE_DEVICE void warp_arg_max(float& key, int32_t& index) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float other_key = __shfl_xor_sync(MOE_FULL_MASK, key, offset);
        const int32_t other_index = __shfl_xor_sync(MOE_FULL_MASK, index, offset);
        if (other_key > key || (other_key == key && other_index < index)) {
            key = other_key;
            index = other_index;
        }
    }
}
}  // namespace moe_grouped_topk_detail

template <typename T>
__global__ void __launch_bounds__(128)
    moe_grouped_topk(const T* __restrict__ logits, const float* __restrict__ correction_bias, int64_t M, int32_t E,
                     int32_t k, int32_t groups, int32_t topk_groups, int32_t scoring, int32_t renormalize,
                     float scaling, int32_t* __restrict__ topk_ids, float* __restrict__ topk_weights) {
    using namespace moe_grouped_topk_detail;
    __shared__ float shared_scores[WARPS_PER_BLOCK][PADDED_ROW];
    __shared__ float shared_choice[WARPS_PER_BLOCK][PADDED_ROW];
    const float NEG_INF = __int_as_float(0xff800000);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    float* scores = shared_scores[warp];
    float* choice = shared_choice[warp];
    const int32_t group_size = E / groups;
    const int64_t first = static_cast<int64_t>(blockIdx.x) * WARPS_PER_BLOCK + warp;
    const int64_t step = static_cast<int64_t>(gridDim.x) * WARPS_PER_BLOCK;

    for (int64_t t = first; t < M; t += step) {
        // 1. Scores and choice scores; lane l holds experts l, l + 32, ...
        const T* row = logits + t * E;
        float v[PER_LANE];
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            const int e = lane + 32 * j;
            v[j] = e < E ? to_float(row[e]) : 0.0f;
        }
        if (scoring == 0) {
            float row_max = NEG_INF;
#pragma unroll
            for (int j = 0; j < PER_LANE; ++j)
                if (lane + 32 * j < E) row_max = fmaxf(row_max, v[j]);
            row_max = warp_max(row_max);
            float partial = 0.0f;
#pragma unroll
            for (int j = 0; j < PER_LANE; ++j)
                if (lane + 32 * j < E) {
                    v[j] = router_exp(__fsub_rn(v[j], row_max));
                    partial = __fadd_rn(partial, v[j]);
                }
            const float sum = warp_sum(partial);  // butterfly 16, 8, 4, 2, 1: RouterArithmetic.warpSum
#pragma unroll
            for (int j = 0; j < PER_LANE; ++j) v[j] = __fdiv_rn(v[j], sum);
        } else {
#pragma unroll
            for (int j = 0; j < PER_LANE; ++j) v[j] = __fdiv_rn(1.0f, __fadd_rn(1.0f, router_exp(-v[j])));
        }
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            const int e = lane + 32 * j;
            if (e < E) {
                scores[padded(e)] = v[j];
                choice[padded(e)] = correction_bias != nullptr ? __fadd_rn(v[j], correction_bias[e]) : v[j];
            }
        }
        __syncwarp();

        // 2. Group scores: lane g scans group g in order (not needed when every group is kept).
        const bool keep_all = topk_groups == groups;
        float group_key = NEG_INF;
        int32_t group_index = NO_INDEX;
        if (!keep_all && lane < groups) {
            float best = NEG_INF;
            float second = NEG_INF;
            const int begin = lane * group_size;
            for (int e = begin; e < begin + group_size; ++e) {
                const float c = choice[padded(e)];
                if (c > best) {
                    second = best;
                    best = c;
                } else if (c > second) {
                    second = c;
                }
            }
            group_key = correction_bias != nullptr ? __fadd_rn(best, second) : best;
            if (group_key != group_key) group_key = NEG_INF;
            group_index = lane;
        }

        // 3. Keep the topk_groups best groups.
        uint32_t kept = keep_all ? (groups == 32 ? MOE_FULL_MASK : (1u << groups) - 1u) : 0u;
        for (int r = 0; r < (keep_all ? 0 : topk_groups); ++r) {
            float key = group_key;
            int32_t index = group_index;
            warp_arg_max(key, index);
            if (index == NO_INDEX) break;  // fewer groups than asked for: excluded by the host's checks
            kept |= 1u << index;
            if (lane == index) {
                group_key = NEG_INF;
                group_index = NO_INDEX;
            }
        }

        // 4. The k best experts of the kept groups; lane r keeps round r's.
        float key[PER_LANE];
        uint32_t available = 0;  // bit j: expert lane + 32 j is in a kept group and not chosen yet
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            const int e = lane + 32 * j;
            key[j] = NEG_INF;
            if (e < E && ((kept >> (e / group_size)) & 1u) != 0) {
                const float c = choice[padded(e)];
                key[j] = c == c ? c : NEG_INF;
                available |= 1u << j;
            }
        }
        int32_t my_id = -1;
        float my_weight = 0.0f;
        float selected = 0.0f;
        for (int r = 0; r < k; ++r) {
            float best = NEG_INF;
            int32_t best_e = NO_INDEX;
#pragma unroll
            for (int j = 0; j < PER_LANE; ++j)  // strict: the lower index wins ties inside a lane
                if (((available >> j) & 1u) != 0 && (best_e == NO_INDEX || key[j] > best)) {
                    best = key[j];
                    best_e = lane + 32 * j;
                }
            warp_arg_max(best, best_e);
            if (best_e == NO_INDEX) break;  // fewer experts than k: excluded by the host's checks
            if ((best_e & 31) == lane) available &= ~(1u << (best_e >> 5));
            const float weight = scores[padded(best_e)];
            selected = __fadd_rn(selected, weight);
            if (lane == r) {
                my_id = best_e;
                my_weight = weight;
            }
        }
        if (renormalize != 0) my_weight = __fdiv_rn(my_weight, selected);
        my_weight = __fmul_rn(my_weight, scaling);
        if (lane < k) {
            topk_ids[t * k + lane] = my_id;
            topk_weights[t * k + lane] = my_weight;
        }
        __syncwarp();  // the next token overwrites this warp's shared rows
    }
}
