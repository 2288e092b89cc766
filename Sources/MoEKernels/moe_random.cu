// moe_random.cu: reproducible random tensors made on the GPU, so benchmarks and checks of large
// shapes need not generate and upload gigabytes of weights from the host.
//
// moe_random_uniform<T>(out [numel] of T, numel, seed, scale)
//     out[i] = T(u * scale) with u uniform in [-1, 1) from a 64-bit hash of (seed, i): the same
//     (seed, i) gives the same value on every run and launch geometry.
//     Grid: any x >= 1 (grid-stride, 64-bit indices), recommended clamp(ceil(numel / 256), 1, 65535);
//     block 256; no shared memory.
// moe_random_ids(out [M * k] int32, M, k, E, seed)
//     token t gets k distinct experts in [0, E) (uniformly random), so routing touches experts as
//     a router would; weights come from moe_random_uniform. Grid-stride over tokens, block 256.
#include "moe_common.cuh"

namespace moe_random_detail {
MOE_DEVICE uint64_t mix(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
MOE_DEVICE float uniform(uint64_t seed, uint64_t index) {
    const uint64_t bits = mix(seed ^ mix(index));
    return static_cast<float>(static_cast<int64_t>(bits >> 40) - (1ll << 23)) * (1.0f / 8388608.0f);
}
}  // namespace moe_random_detail

template <typename T>
__global__ void __launch_bounds__(256) moe_random_uniform(T* __restrict__ out, int64_t numel, uint64_t seed, float scale) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
        out[i] = from_float<T>(moe_random_detail::uniform(seed, static_cast<uint64_t>(i)) * scale);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    moe_random_ids(int32_t* __restrict__ out, int64_t M, int32_t k, int32_t E, uint64_t seed) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < M; t += stride) {
        int32_t* row = out + t * k;
        for (int32_t j = 0; j < k; ++j) {
            // Draw until the expert differs from the ones already taken (k <= E, so this ends).
            uint64_t attempt = 0;
            int32_t e;
            bool taken;
            do {
                e = static_cast<int32_t>(moe_random_detail::mix(seed ^ moe_random_detail::mix(t * 64 + j + (attempt << 40))) %
                                         static_cast<uint64_t>(E));
                taken = false;
                for (int32_t q = 0; q < j; ++q) taken |= row[q] == e;
                ++attempt;
            } while (taken);
            row[j] = e;
        }
    }
}
