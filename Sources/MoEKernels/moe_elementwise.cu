// moe_elementwise.cu: the memory-bound stages between and after the GEMMs.
//
// All kernels: block 256 threads, 1-D grid, grid-stride loops with 64-bit indices, so any
// grid.x >= 1 is correct; recommended grid.x = clamp(ceil(work / (256 * VEC)), 1, 8192)
// where work is the element count named below and VEC the elements per vector step.
// No shared memory. Arithmetic in fp32, each output rounded once to T.
// Vector (16-byte) paths need 16-byte aligned base pointers (the host allocates so) and the
// divisibility stated per kernel; otherwise the same kernel takes a scalar path.
//
// moe_silu_and_mul<T>(in [rows, 2I], out [rows, I], rows, I)
//     out[r, i] = silu(in[r, i]) * in[r, I + i], silu(g) = g / (1 + exp(-g)).
//     work = rows * I, VEC = 8 when I % 8 == 0.
// moe_gelu_and_mul<T>(in, out, rows, I)
//     the same with gelu(g) = 0.5 g (1 + erf(g / sqrt(2))).
// moe_combine<T>(in [M*k, H], out [M, H], M, k, H, topk_ids [M*k] or null)
//     out[t, h] = sum over j = 0..k-1, in that order, of in[t*k + j, h], skipping the slots whose
//     topk_ids entry is negative (unrouted: align placed no row for them, so `in` holds nothing).
//     work = M * H, VEC = 8 when H % 8 == 0.
// moe_splitk_reduce<T>(workspace, split_stride, split_k, rows, N, stride_cm, out)
//     out[r * stride_cm + n] = sum over s = 0..split_k-1, in that order, of
//     workspace[s * split_stride + r * stride_cm + n], for r < rows, n < N (the workspace and
//     out share the row stride stride_cm). work = rows * N, VEC = 4 when N, stride_cm and
//     split_stride are multiples of 4.
// moe_splitk_reduce_act<T, ACT>(workspace, split_stride, split_k, rows, I, out [rows, I])
//     The end of a split-K GEMM1 with its activation (ACT 1 silu, 2 exact gelu) in one pass:
//     the workspace holds fp32 rows [rows, 2I] (row stride exactly 2I: gate columns 0..I-1, up
//     columns I..2I-1), split s at workspace + s * split_stride. For r < rows, i < I:
//         g = round_T(sum over s = 0..split_k-1, in that order, of workspace[s*split_stride + r*2I + i])
//         u = the same at column I + i
//         out[r * I + i] = round_T(act(g) * u)
//     bit for bit moe_splitk_reduce into T [rows, 2I] then moe_silu_and_mul / moe_gelu_and_mul.
//     Workspace mode (SPLIT_MODE 2): split_k splits, split_stride = rows * 2I. Atomic mode
//     (SPLIT_MODE 1): the one summed buffer, split_k = 1 and split_stride = 0.
//     work = rows * I, VEC = 8 when I % 8 == 0 and split_stride % 4 == 0 (else scalar), so
//     grid.x = clamp(ceil(rows * I / (256 * 8)), 1, 8192).
// moe_cast_f32<T>(in [numel] fp32, out [numel] T, numel)
//     work = numel, VEC = 4 (scalar tail).
#include "moe_common.cuh"

// Slots moe_combine loads together (FUSED_MOE_KERNEL_DEFINES, for same-binary A/Bs; 1: one slot's
// id and row at a time, the form before NOTES v16).
#ifndef MOE_COMBINE_SLOTS
#define MOE_COMBINE_SLOTS 8
#endif

namespace moe_elementwise_detail {

struct Silu {
    MOE_DEVICE float operator()(float g) const { return moe_silu(g); }
};
struct Gelu {
    MOE_DEVICE float operator()(float g) const { return moe_gelu(g); }
};

/// Eight fp32 values from a 16-byte aligned address (two 16-byte loads).
MOE_DEVICE void load8_f32(const float* src, float (&x)[8]) {
    const float4 a = *reinterpret_cast<const float4*>(src);
    const float4 b = *reinterpret_cast<const float4*>(src + 4);
    x[0] = a.x;
    x[1] = a.y;
    x[2] = a.z;
    x[3] = a.w;
    x[4] = b.x;
    x[5] = b.y;
    x[6] = b.z;
    x[7] = b.w;
}

/// sum[e] += src[e] for the eight fp32 values at a 16-byte aligned address.
MOE_DEVICE void add8_f32(const float* src, float (&sum)[8]) {
    float x[8];
    load8_f32(src, x);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum[e] += x[e];
}

/// The activation of moe_splitk_reduce_act<T, ACT>: 1 silu, 2 gelu.
template <int ACT> struct ActivationOf;
template <> struct ActivationOf<1> { typedef Silu type; };
template <> struct ActivationOf<2> { typedef Gelu type; };

MOE_DEVICE int64_t grid_start() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
MOE_DEVICE int64_t grid_step() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

/// A grid-stride walk over a [rows, cols] index space that keeps (row, col) without dividing
/// in the loop: one 64-bit division at the start, carries afterwards.
struct GridStride2D {
    int64_t row, col, row_step, col_step, cols;
    MOE_DEVICE explicit GridStride2D(int64_t cols_) : cols(cols_) {
        const int64_t start = grid_start(), step = grid_step();
        row = start / cols;
        col = start - row * cols;
        row_step = step / cols;
        col_step = step - row_step * cols;
    }
    MOE_DEVICE void advance() {
        row += row_step;
        col += col_step;
        if (col >= cols) {
            col -= cols;
            ++row;
        }
    }
};

template <typename T, typename Act>
MOE_DEVICE void act_and_mul(const T* __restrict__ in, T* __restrict__ out, int64_t rows, int64_t I, Act act) {
    if (rows <= 0 || I <= 0) return;
    if (I % 8 == 0) {
        for (GridStride2D g2(I / 8); g2.row < rows; g2.advance()) {
            const int64_t r = g2.row;
            const int64_t i = g2.col * 8;
            const T* gate = in + r * (2 * I) + i;
            float g[8], u[8], o[8];
            unpack8<T>(*reinterpret_cast<const uint4*>(gate), g);
            unpack8<T>(*reinterpret_cast<const uint4*>(gate + I), u);
#pragma unroll
            for (int e = 0; e < 8; ++e) o[e] = act(g[e]) * u[e];
            *reinterpret_cast<uint4*>(out + r * I + i) = pack8<T>(o);
        }
    } else {
        for (GridStride2D g2(I); g2.row < rows; g2.advance()) {
            const int64_t r = g2.row;
            const int64_t i = g2.col;
            const T* gate = in + r * (2 * I) + i;
            out[r * I + i] = from_float<T>(act(to_float(gate[0])) * to_float(gate[I]));
        }
    }
}
}  // namespace moe_elementwise_detail

template <typename T>
__global__ void __launch_bounds__(256) moe_silu_and_mul(const T* __restrict__ in, T* __restrict__ out, int64_t rows,
                                                        int64_t I) {
    griddepcontrol_wait_then_launch_dependents();
    moe_elementwise_detail::act_and_mul(in, out, rows, I, moe_elementwise_detail::Silu{});
}

template <typename T>
__global__ void __launch_bounds__(256) moe_gelu_and_mul(const T* __restrict__ in, T* __restrict__ out, int64_t rows,
                                                        int64_t I) {
    griddepcontrol_wait_then_launch_dependents();
    moe_elementwise_detail::act_and_mul(in, out, rows, I, moe_elementwise_detail::Gelu{});
}

template <typename T>
__global__ void __launch_bounds__(256) moe_combine(const T* __restrict__ in, T* __restrict__ out, int64_t M, int32_t k,
                                                   int64_t H, const int32_t* __restrict__ topk_ids) {
    griddepcontrol_wait_then_launch_dependents();
    using namespace moe_elementwise_detail;
    if (M <= 0 || H <= 0) return;
    if (H % 8 == 0) {
        for (GridStride2D g2(H / 8); g2.row < M; g2.advance()) {
            const int64_t t = g2.row;
            const int64_t h = g2.col * 8;
            float sum[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            // Slots in batches of SLOTS: every id, then every row's 16 bytes, loaded before the first is
            // used (one round trip each, not one per slot), then summed in slot order.
            constexpr int SLOTS = MOE_COMBINE_SLOTS;
            for (int32_t j0 = 0; j0 < k; j0 += SLOTS) {
                bool use[SLOTS];
                uint4 v[SLOTS];
#pragma unroll
                for (int c = 0; c < SLOTS; ++c) {
                    const int32_t j = j0 + c;
                    // An unrouted slot (negative id) has no computed row.
                    use[c] = j < k && (topk_ids == nullptr || topk_ids[t * k + j] >= 0);
                }
#pragma unroll
                for (int c = 0; c < SLOTS; ++c)
                    v[c] = use[c] ? *reinterpret_cast<const uint4*>(in + (t * k + j0 + c) * H + h) : make_uint4(0, 0, 0, 0);
#pragma unroll
                for (int c = 0; c < SLOTS; ++c) {
                    if (!use[c]) continue;
                    float x[8];
                    unpack8<T>(v[c], x);
#pragma unroll
                    for (int e = 0; e < 8; ++e) sum[e] += x[e];
                }
            }
            *reinterpret_cast<uint4*>(out + t * H + h) = pack8<T>(sum);
        }
    } else {
        for (GridStride2D g2(H); g2.row < M; g2.advance()) {
            const int64_t t = g2.row;
            const int64_t h = g2.col;
            float sum = 0.0f;
            for (int32_t j = 0; j < k; ++j) {
                if (topk_ids != nullptr && topk_ids[t * k + j] < 0) continue;
                sum += to_float(in[(t * k + j) * H + h]);
            }
            out[t * H + h] = from_float<T>(sum);
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(256)
    moe_splitk_reduce(const float* __restrict__ workspace, int64_t split_stride, int32_t split_k, int64_t rows,
                      int64_t N, int64_t stride_cm, T* __restrict__ out) {
    griddepcontrol_wait_then_launch_dependents();
    using namespace moe_elementwise_detail;
    if (rows <= 0 || N <= 0) return;
    if (N % 4 == 0 && stride_cm % 4 == 0 && split_stride % 4 == 0) {
        for (GridStride2D g2(N / 4); g2.row < rows; g2.advance()) {
            const int64_t offset = g2.row * stride_cm + g2.col * 4;
            float4 sum = *reinterpret_cast<const float4*>(workspace + offset);
            for (int32_t s = 1; s < split_k; ++s) {
                const float4 x = *reinterpret_cast<const float4*>(workspace + s * split_stride + offset);
                sum.x += x.x;
                sum.y += x.y;
                sum.z += x.z;
                sum.w += x.w;
            }
            store4(out + offset, sum.x, sum.y, sum.z, sum.w);
        }
    } else {
        for (GridStride2D g2(N); g2.row < rows; g2.advance()) {
            const int64_t offset = g2.row * stride_cm + g2.col;
            float sum = workspace[offset];
            for (int32_t s = 1; s < split_k; ++s) sum += workspace[s * split_stride + offset];
            out[offset] = from_float<T>(sum);
        }
    }
}

template <typename T, int ACT>
__global__ void __launch_bounds__(256)
    moe_splitk_reduce_act(const float* __restrict__ workspace, int64_t split_stride, int32_t split_k, int64_t rows,
                          int64_t I, T* __restrict__ out) {
    griddepcontrol_wait_then_launch_dependents();
    using namespace moe_elementwise_detail;
    static_assert(ACT == 1 || ACT == 2, "ACT: 1 silu, 2 gelu");
    const typename ActivationOf<ACT>::type act{};
    if (rows <= 0 || I <= 0) return;
    if (I % 8 == 0 && split_stride % 4 == 0) {
        for (GridStride2D g2(I / 8); g2.row < rows; g2.advance()) {
            const float* gate = workspace + g2.row * (2 * I) + g2.col * 8;
            float g[8], u[8], o[8];
            load8_f32(gate, g);
            load8_f32(gate + I, u);
            for (int32_t s = 1; s < split_k; ++s) {
                add8_f32(gate + s * split_stride, g);
                add8_f32(gate + s * split_stride + I, u);
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                // Rounded to T first, as moe_splitk_reduce stores them for moe_silu_and_mul to read.
                o[e] = act(to_float(from_float<T>(g[e]))) * to_float(from_float<T>(u[e]));
            }
            *reinterpret_cast<uint4*>(out + g2.row * I + g2.col * 8) = pack8<T>(o);
        }
    } else {
        for (GridStride2D g2(I); g2.row < rows; g2.advance()) {
            const float* gate = workspace + g2.row * (2 * I) + g2.col;
            float g = gate[0], u = gate[I];
            for (int32_t s = 1; s < split_k; ++s) {
                g += gate[s * split_stride];
                u += gate[s * split_stride + I];
            }
            out[g2.row * I + g2.col] = from_float<T>(act(to_float(from_float<T>(g))) * to_float(from_float<T>(u)));
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(256) moe_cast_f32(const float* __restrict__ in, T* __restrict__ out, int64_t numel) {
    griddepcontrol_wait_then_launch_dependents();
    using namespace moe_elementwise_detail;
    const int64_t vectors = numel / 4;
    for (int64_t v = grid_start(); v < vectors; v += grid_step()) {
        const float4 x = *reinterpret_cast<const float4*>(in + v * 4);
        store4(out + v * 4, x.x, x.y, x.z, x.w);
    }
    for (int64_t i = vectors * 4 + grid_start(); i < numel; i += grid_step()) out[i] = from_float<T>(in[i]);
}
