// moe_gemm.cu: the grouped GEMM of a fused MoE layer (tensor cores, optional split-K).
//
// moe_gemm<T, BLOCK_M, BLOCK_N, BLOCK_K, WARPS_M, WARPS_N, STAGES, SPLIT_MODE, MUL_ROUTED_WEIGHT, FUSED_ACT>
//
// Computes, for every row r < *total_padded of the expert-sorted order:
//     p = sorted_token_ids[r]                      (pair index; p >= num_valid_tokens is padding)
//     C[p, :] = A[p / top_k, :] * B[expert_ids[r / BLOCK_M]]^T   (x topk_weights[p] if MUL_ROUTED_WEIGHT)
// A is [*, K] (row stride stride_am), B is [E, N, K] (stride_be, stride_bn, unit stride in K),
// C row p starts at p * stride_cm. Accumulation in fp32.
//
// FUSED_ACT 0: as above. 1 (silu) or 2 (exact gelu): GEMM1 with its activation in the epilogue.
//         B is w1 [E, N = 2I, K] (gate rows 0..I-1, up rows I..2I-1) and C is T [*, I] (row stride
//         stride_cm, normally I):
//             g = round_T((A B_gate^T)[p, i]),  u = round_T((A B_up^T)[p, i])
//             C[p, i] = round_T(act(g) * u)     act(g) = g / (1 + exp(-g))   (1)
//                                                      = 0.5 g (1 + erf(g / sqrt 2))   (2)
//         in fp32 between the roundings: bit for bit GEMM1 (mode 0) then moe_silu_and_mul /
//         moe_gelu_and_mul. Program n-block nb owns output columns [nb*BLOCK_N/2, (nb+1)*BLOCK_N/2);
//         its B tile row r (g = r / 16, w = r % 16) is w1 row nb*BLOCK_N/2 + 8g + w (gate) when
//         w < 8 and I + nb*BLOCK_N/2 + 8g + (w - 8) (up) when w >= 8, zero-filled past I, so n8
//         fragment tiles 2q and 2q+1 of a warp hold the gate and up of the same 8 columns.
//         Requires SPLIT_MODE 0, MUL_ROUTED_WEIGHT false, WARP_TILE_N % 16 == 0 (static_asserts),
//         N even. Split-K GEMM1 runs with FUSED_ACT 0 (modes 1, 2) and moe_splitk_reduce_act.
//
// Grid:   x = ceil(max_padded / BLOCK_M) * ceil(N / BLOCK_N), y = split_k, z = 1.
//         With FUSED_ACT the n-blocks are ceil(I / (BLOCK_N / 2)), the same number for N = 2I.
//         blockIdx.x -> (pid_m, pid_n) with the GROUP_SIZE_M swizzle of Triton's fused_moe
//         (groups of group_size_m m-blocks; inside a group pid_m varies fastest, then pid_n).
// Block:  WARPS_M * WARPS_N * 32 threads. Warp w owns the (BLOCK_M/WARPS_M) x (BLOCK_N/WARPS_N)
//         sub-tile at (w % WARPS_M, w / WARPS_M).
// Each program: one BLOCK_M x BLOCK_N product tile over the K tiles of its split (with FUSED_ACT
//         stored as one BLOCK_M x BLOCK_N/2 output tile). The K tiles (ceil(K / BLOCK_K)) are cut
//         into split_k contiguous ranges of ceil(tiles / split_k); split blockIdx.y takes range y
//         (possibly empty).
//         Programs with pid_m * BLOCK_M >= *total_padded return at once. A block whose expert
//         id is -1 (expert not owned) skips the K loop and stores zeros (modes 0 and 2; with
//         FUSED_ACT act(0) * 0 = 0) or nothing (mode 1); so does an empty split range.
// SPLIT_MODE 0: C is T*, rounded once from fp32; requires split_k == 1.
//            1: C is float*, zero-filled by the host; partials added with red.global.add.f32.
//            2: C is a float* workspace [split_k][num_valid_tokens] rows of stride stride_cm;
//               split s writes its partial (plain stores) at C + s*num_valid_tokens*stride_cm;
//               moe_splitk_reduce sums the splits in order (bitwise reproducible).
// Shared memory (dynamic, exactly): STAGES * (BLOCK_M + BLOCK_N) * (BLOCK_K + 8) * sizeof(T) bytes:
//         a STAGES-deep ring of A tiles [BLOCK_M][BLOCK_K + 8] followed by one of B tiles
//         [BLOCK_N][BLOCK_K + 8] (8 elements of row padding keep ldmatrix free of bank conflicts).
//         After the K loop the same memory stages the output tile [BLOCK_M][OUT_COLS + 8] (T or
//         float; OUT_COLS = BLOCK_N, or BLOCK_N / 2 with FUSED_ACT) for 16-byte row-contiguous
//         stores, when it fits; otherwise fragments are stored directly. No static shared memory.
// Host guarantees: K % 8 == 0; A, B, C 16-byte aligned; stride_am, stride_bn, stride_be multiples of
//         8 elements; the align block size equals BLOCK_M (so *total_padded is a multiple of BLOCK_M).
//         N, stride_cm are free (tails and odd strides fall back to scalar stores); with FUSED_ACT
//         N = 2I is even and I, stride_cm are free.
#include "moe_common.cuh"

template <typename T, int BLOCK_M, int BLOCK_N, int BLOCK_K, int WARPS_M, int WARPS_N, int STAGES, int SPLIT_MODE,
          bool MUL_ROUTED_WEIGHT, int FUSED_ACT>
struct MoEGemmTraits {
    static constexpr int THREADS = WARPS_M * WARPS_N * 32;
    static constexpr int WARP_TILE_M = BLOCK_M / WARPS_M;
    static constexpr int WARP_TILE_N = BLOCK_N / WARPS_N;
    static constexpr int MMA_M = WARP_TILE_M / 16;  // m16 tiles per warp
    static constexpr int MMA_N = WARP_TILE_N / 8;   // n8 tiles per warp
    static constexpr int SMEM_PITCH = BLOCK_K + 8;  // elements per shared row
    static constexpr int CHUNKS_PER_ROW = BLOCK_K / 8;  // 16-byte chunks per tile row
    static constexpr int ROWS_PER_PASS = THREADS / CHUNKS_PER_ROW;
    static constexpr int A_CHUNKS = BLOCK_M * CHUNKS_PER_ROW;
    static constexpr int B_CHUNKS = BLOCK_N * CHUNKS_PER_ROW;
    static constexpr int A_ITERS = (A_CHUNKS + THREADS - 1) / THREADS;
    static constexpr int B_ITERS = (B_CHUNKS + THREADS - 1) / THREADS;
    static constexpr int A_STAGE_BYTES = BLOCK_M * SMEM_PITCH * 2;
    static constexpr int B_STAGE_BYTES = BLOCK_N * SMEM_PITCH * 2;
    static constexpr int SMEM_BYTES = STAGES * (A_STAGE_BYTES + B_STAGE_BYTES);

    // Fused activation: gate and up rows interleave in groups of 8 in the B tile; the output tile
    // has half the columns, and each warp's n8 fragment tiles pair up (2q gate, 2q + 1 up).
    static constexpr bool FUSED = FUSED_ACT != 0;
    static constexpr int OUT_COLS = FUSED ? BLOCK_N / 2 : BLOCK_N;        // output columns per program
    static constexpr int OUT_WARP_COLS = FUSED ? WARP_TILE_N / 2 : WARP_TILE_N;
    static constexpr int OUT_MMA_N = FUSED ? MMA_N / 2 : MMA_N;           // output n8 tiles per warp

    // Output staging: the tile in the type that goes to global memory.
    static constexpr int OUT_BYTES = SPLIT_MODE == 0 ? 2 : 4;
    static constexpr int OUT_PITCH = OUT_COLS + 8;  // elements; keeps fragment writes conflict-free
    static constexpr int OUT_VEC = 16 / OUT_BYTES;  // elements per 16-byte store
    static constexpr int OUT_CHUNKS_PER_ROW = OUT_COLS / OUT_VEC;
    static constexpr bool STAGED_EPILOGUE = BLOCK_M * OUT_PITCH * OUT_BYTES <= SMEM_BYTES;

    static_assert(sizeof(T) == 2, "T must be moe_bf16 or moe_fp16");
    static_assert(BLOCK_M == 16 || BLOCK_M == 32 || BLOCK_M == 64 || BLOCK_M == 128, "BLOCK_M in {16,32,64,128}");
    static_assert(BLOCK_N == 32 || BLOCK_N == 64 || BLOCK_N == 128 || BLOCK_N == 256, "BLOCK_N in {32,64,128,256}");
    static_assert(BLOCK_K == 32 || BLOCK_K == 64, "BLOCK_K in {32,64}");
    static_assert(BLOCK_M % WARPS_M == 0 && WARP_TILE_M % 16 == 0, "warp tile M must be a multiple of 16");
    static_assert(BLOCK_N % WARPS_N == 0 && WARP_TILE_N % 8 == 0, "warp tile N must be a multiple of 8");
    static_assert(THREADS >= 32 && THREADS <= 1024, "1..32 warps");
    static_assert(STAGES >= 2 && STAGES <= 5, "STAGES in 2..5");
    static_assert(SPLIT_MODE >= 0 && SPLIT_MODE <= 2, "SPLIT_MODE in {0,1,2}");
    static_assert(THREADS % CHUNKS_PER_ROW == 0, "a pass of the loaders covers whole rows");
    static_assert(A_ITERS <= 32 && B_ITERS <= 32, "loader validity masks hold 32 bits");
    static_assert(FUSED_ACT >= 0 && FUSED_ACT <= 2, "FUSED_ACT in {0 none, 1 silu, 2 gelu}");
    static_assert(!FUSED || SPLIT_MODE == 0, "FUSED_ACT needs SPLIT_MODE 0 (split-K: moe_splitk_reduce_act)");
    static_assert(!FUSED || !MUL_ROUTED_WEIGHT, "FUSED_ACT is GEMM1's epilogue: MUL_ROUTED_WEIGHT must be false");
    static_assert(!FUSED || WARP_TILE_N % 16 == 0, "FUSED_ACT pairs n8 tiles 2q (gate), 2q+1 (up): WARP_TILE_N % 16");
    // The fused loader splits a tile row load_row + i * ROWS_PER_PASS into disjoint bits.
    static_assert(!FUSED || (ROWS_PER_PASS & (ROWS_PER_PASS - 1)) == 0, "FUSED_ACT: rows per pass a power of two");
};

namespace moe_gemm_detail {
/// act(round_T(gate)) * round_T(up): moe_common's, which the separate activation kernels use too.
template <typename T, int FUSED_ACT> MOE_DEVICE float act_and_mul(float gate, float up) {
    return moe_act_and_mul<T, FUSED_ACT>(gate, up);
}

/// Fused B tile row r -> (index among the program's gate/up rows, up half?). Tile row r holds
/// gate row 8 (r / 16) + r % 8 when bit 3 of r is clear and the up row of that index when set.
/// Bitwise in r, so it adds over rows with disjoint bits (load_row + i * ROWS_PER_PASS).
MOE_DEVICE constexpr int fused_row_index(int r) { return ((r >> 4) << 3) | (r & 7); }
MOE_DEVICE constexpr bool fused_row_is_up(int r) { return ((r >> 3) & 1) != 0; }
}  // namespace moe_gemm_detail

template <typename T, int BLOCK_M, int BLOCK_N, int BLOCK_K, int WARPS_M, int WARPS_N, int STAGES, int SPLIT_MODE,
          bool MUL_ROUTED_WEIGHT, int FUSED_ACT>
__global__ void __launch_bounds__(WARPS_M* WARPS_N * 32)
    moe_gemm(const T* __restrict__ A, const T* __restrict__ B, void* __restrict__ C,
             const float* __restrict__ topk_weights, const int32_t* __restrict__ sorted_token_ids,
             const int32_t* __restrict__ expert_ids, const int32_t* __restrict__ total_padded, int64_t N, int64_t K,
             int64_t num_valid_tokens, int32_t top_k, int32_t split_k, int32_t group_size_m, int64_t stride_am,
             int64_t stride_be, int64_t stride_bn, int64_t stride_cm, int64_t max_padded) {
    griddepcontrol_wait_then_launch_dependents();
    using Tr =
        MoEGemmTraits<T, BLOCK_M, BLOCK_N, BLOCK_K, WARPS_M, WARPS_N, STAGES, SPLIT_MODE, MUL_ROUTED_WEIGHT, FUSED_ACT>;
    constexpr int THREADS = Tr::THREADS;
    constexpr int MMA_M = Tr::MMA_M;
    constexpr int MMA_N = Tr::MMA_N;
    constexpr int PITCH = Tr::SMEM_PITCH;
    constexpr int CPR = Tr::CHUNKS_PER_ROW;
    constexpr int RPP = Tr::ROWS_PER_PASS;

    extern __shared__ __align__(16) unsigned char moe_gemm_smem[];

    // --- Tile coordinates (Triton's grouped ordering) ---
    const int64_t num_pid_m = ceil_div(max_padded, BLOCK_M);
    // Output columns: N, or I = N / 2 with FUSED_ACT (then n0 is also the first gate row of the tile).
    const int64_t out_n = Tr::FUSED ? N / 2 : N;
    const int64_t num_pid_n = ceil_div(out_n, Tr::OUT_COLS);
    const int64_t group_m = group_size_m > 0 ? group_size_m : 1;
    const int64_t pid = blockIdx.x;
    const int64_t pids_in_group = group_m * num_pid_n;
    const int64_t first_pid_m = (pid / pids_in_group) * group_m;
    if (first_pid_m >= num_pid_m) return;  // grid larger than the tile count
    const int64_t this_group_m = min_i64(num_pid_m - first_pid_m, group_m);
    const int64_t pid_m = first_pid_m + (pid % pids_in_group) % this_group_m;
    const int64_t pid_n = (pid % pids_in_group) / this_group_m;

    const int64_t row0 = pid_m * BLOCK_M;  // first row of the sorted order in this tile
    if (row0 >= static_cast<int64_t>(*total_padded)) return;
    const int64_t n0 = pid_n * Tr::OUT_COLS;
    const int32_t expert = expert_ids[pid_m];

    // --- This split's K-tile range ---
    const int64_t k_tiles = ceil_div(K, BLOCK_K);
    const int64_t tiles_per_split = ceil_div(k_tiles, split_k > 0 ? split_k : 1);
    const int64_t kt_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
    const int64_t kt_end = min_i64(kt_begin + tiles_per_split, k_tiles);
    const int num_tiles = (expert < 0 || kt_begin >= kt_end) ? 0 : static_cast<int>(kt_end - kt_begin);
    if (SPLIT_MODE == 1 && num_tiles == 0) return;  // adding zeros changes nothing

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int warp_m = warp % WARPS_M;
    const int warp_n = warp / WARPS_M;

    const uint32_t smem_a = cvta_to_shared_u32(moe_gemm_smem);
    const uint32_t smem_b = smem_a + STAGES * Tr::A_STAGE_BYTES;

    // --- Loader state: each thread copies chunk column `chunk_col` of rows tid/CPR + i*RPP ---
    const int chunk_col = tid % CPR;
    const int load_row = tid / CPR;
    const T* a_src[Tr::A_ITERS];
    uint32_t a_valid = 0;  // bit i: row of iteration i is a real token
#pragma unroll
    for (int i = 0; i < Tr::A_ITERS; ++i) {
        const int r = load_row + i * RPP;
        a_src[i] = A;
        if (r < BLOCK_M) {
            const int32_t p = sorted_token_ids[row0 + r];
            if (p >= 0 && p < num_valid_tokens) {
                a_src[i] = A + static_cast<int64_t>(p / top_k) * stride_am + chunk_col * 8;
                a_valid |= 1u << i;
            }
        }
    }
    const T* b_src = B;  // row load_row of this tile; iteration i adds i * RPP rows
    uint32_t b_valid = 0;
    // FUSED_ACT: tile row load_row + i * RPP is w1 row n0 + fused_row_index(load_row) +
    // fused_row_index(i * RPP), plus I when either part is an up row (the bits are disjoint).
    int64_t b_up_offset = 0;  // FUSED_ACT: I rows, from a gate row to its up row
    if (expert >= 0) {
        if constexpr (Tr::FUSED) {
            using namespace moe_gemm_detail;
            b_up_offset = out_n * stride_bn;
            const int64_t gate_row = n0 + fused_row_index(load_row);
            b_src = B + static_cast<int64_t>(expert) * stride_be + gate_row * stride_bn +
                    (fused_row_is_up(load_row) ? b_up_offset : 0) + chunk_col * 8;
#pragma unroll
            for (int i = 0; i < Tr::B_ITERS; ++i)
                if (gate_row + fused_row_index(i * RPP) < out_n) b_valid |= 1u << i;  // rows past I: zeros
        } else {
            b_src = B + static_cast<int64_t>(expert) * stride_be + (n0 + load_row) * stride_bn + chunk_col * 8;
#pragma unroll
            for (int i = 0; i < Tr::B_ITERS; ++i)
                if (n0 + load_row + i * RPP < N) b_valid |= 1u << i;
        }
    }
    const int64_t b_pass_stride = static_cast<int64_t>(RPP) * stride_bn;
    // Offset of iteration i's row from b_src.
    auto b_iter_offset = [&](int i) -> int64_t {
        if constexpr (Tr::FUSED) {
            using namespace moe_gemm_detail;
            return fused_row_index(i * RPP) * stride_bn + (fused_row_is_up(i * RPP) ? b_up_offset : 0);
        } else {
            return i * b_pass_stride;
        }
    };
    const uint32_t load_dst = static_cast<uint32_t>((load_row * PITCH + chunk_col * 8) * 2);

    auto load_tile = [&](int64_t kt, int stage) {
        const int64_t k_off = kt * BLOCK_K;
        const bool k_ok = k_off + chunk_col * 8 < K;  // K % 8 == 0: a chunk is all in or all out
        const uint32_t a_dst = smem_a + stage * Tr::A_STAGE_BYTES + load_dst;
#pragma unroll
        for (int i = 0; i < Tr::A_ITERS; ++i) {
            if (Tr::A_CHUNKS % THREADS == 0 || load_row + i * RPP < BLOCK_M) {
                const bool ok = k_ok && ((a_valid >> i) & 1u);
                cp_async_cg_16(a_dst + i * RPP * PITCH * 2, ok ? a_src[i] + k_off : A, ok);
            }
        }
        const uint32_t b_dst = smem_b + stage * Tr::B_STAGE_BYTES + load_dst;
#pragma unroll
        for (int i = 0; i < Tr::B_ITERS; ++i) {
            if (Tr::B_CHUNKS % THREADS == 0 || load_row + i * RPP < BLOCK_N) {
                const bool ok = k_ok && ((b_valid >> i) & 1u);
                cp_async_cg_16(b_dst + i * RPP * PITCH * 2, ok ? b_src + b_iter_offset(i) + k_off : B, ok);
            }
        }
    };

    // --- Fragment addresses (stage 0, kk 0); see ldmatrix lane-to-row mapping ---
    // A (row-major M x K): lanes 0-15 rows 0-15 at k 0, lanes 16-31 rows 0-15 at k 8.
    const uint32_t a_frag = smem_a + ((warp_m * Tr::WARP_TILE_M + (lane & 15)) * PITCH + (lane >> 4) * 8) * 2;
    // B (N x K, i.e. K x N column-major): matrices (n0-7,k0-7), (n0-7,k8-15), (n8-15,k0-7), (n8-15,k8-15).
    const uint32_t b_frag =
        smem_b + ((warp_n * Tr::WARP_TILE_N + ((lane >> 4) << 3) + (lane & 7)) * PITCH + ((lane >> 3) & 1) * 8) * 2;

    float acc[MMA_M][MMA_N][4];
#pragma unroll
    for (int i = 0; i < MMA_M; ++i)
#pragma unroll
        for (int j = 0; j < MMA_N; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

    // --- Main loop: STAGES-deep cp.async ring, one barrier per K tile ---
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < num_tiles) load_tile(kt_begin + s, s);
        cp_async_commit_group();
    }
    int read_stage = 0;
    int write_stage = STAGES - 1;
    for (int t = 0; t < num_tiles; ++t) {
        cp_async_wait_group<STAGES - 2>();  // tile t has landed (for this thread) ...
        __syncthreads();                    // ... for all threads; stage t-1 is free to overwrite
        if (t + STAGES - 1 < num_tiles) load_tile(kt_begin + t + STAGES - 1, write_stage);
        cp_async_commit_group();

        const uint32_t a_stage = a_frag + read_stage * Tr::A_STAGE_BYTES;
        const uint32_t b_stage = b_frag + read_stage * Tr::B_STAGE_BYTES;
#pragma unroll
        for (int kk = 0; kk < BLOCK_K / 16; ++kk) {
            uint32_t af[MMA_M][4];
            uint32_t bf[MMA_N][2];
#pragma unroll
            for (int i = 0; i < MMA_M; ++i)
                ldmatrix_x4(af[i][0], af[i][1], af[i][2], af[i][3], a_stage + (i * 16 * PITCH + kk * 16) * 2);
#pragma unroll
            for (int j = 0; j + 1 < MMA_N; j += 2)
                ldmatrix_x4(bf[j][0], bf[j][1], bf[j + 1][0], bf[j + 1][1], b_stage + (j * 8 * PITCH + kk * 16) * 2);
            if constexpr (MMA_N % 2 == 1)
                ldmatrix_x2(bf[MMA_N - 1][0], bf[MMA_N - 1][1], b_stage + ((MMA_N - 1) * 8 * PITCH + kk * 16) * 2);
#pragma unroll
            for (int i = 0; i < MMA_M; ++i)
#pragma unroll
                for (int j = 0; j < MMA_N; ++j) mma_m16n8k16<T>(acc[i][j], af[i], bf[j]);
        }
        if (++read_stage == STAGES) read_stage = 0;
        if (++write_stage == STAGES) write_stage = 0;
    }
    cp_async_wait_group<0>();

    // --- Epilogue ---
    // Fragment layout: acc[i][j][0..1] at (row lane/4, cols 2*(lane%4) + 0..1), [2..3] at row + 8.
    // FUSED_ACT: acc[i][2q] (gate) and acc[i][2q + 1] (up) hold the same 8 output columns, so output
    // n8 tile q of the warp starts at column warp_n * WARP_TILE_N / 2 + 8q.
    const int frag_row = warp_m * Tr::WARP_TILE_M + (lane >> 2);
    const int frag_col = warp_n * Tr::OUT_WARP_COLS + (lane & 3) * 2;
    // Element e (0, 1) of output n8 tile j, rows frag_row + i*16 + h*8, columns frag_col + j*8 + e.
    auto out_value = [&](int i, int j, int h, int e) -> float {
        if constexpr (Tr::FUSED) {
            return moe_gemm_detail::act_and_mul<T, FUSED_ACT>(acc[i][2 * j][2 * h + e], acc[i][2 * j + 1][2 * h + e]);
        } else {
            return acc[i][j][2 * h + e];
        }
    };
    if constexpr (MUL_ROUTED_WEIGHT) {
#pragma unroll
        for (int i = 0; i < MMA_M; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int32_t p = sorted_token_ids[row0 + frag_row + i * 16 + h * 8];
                const float w = (p >= 0 && p < num_valid_tokens) ? topk_weights[p] : 0.0f;
#pragma unroll
                for (int j = 0; j < MMA_N; ++j) {
                    acc[i][j][2 * h] *= w;
                    acc[i][j][2 * h + 1] *= w;
                }
            }
    }

    using OutT = typename moe_conditional<SPLIT_MODE == 0, T, float>::type;
    OutT* out = static_cast<OutT*>(C);
    if constexpr (SPLIT_MODE == 2) out += static_cast<int64_t>(blockIdx.y) * (num_valid_tokens * stride_cm);

    if constexpr (Tr::STAGED_EPILOGUE) {
        constexpr int OPITCH = Tr::OUT_PITCH;
        constexpr int VEC = Tr::OUT_VEC;
        constexpr int OCPR = Tr::OUT_CHUNKS_PER_ROW;
        __syncthreads();  // every warp is done reading the operand ring
        OutT* stage = reinterpret_cast<OutT*>(moe_gemm_smem);
#pragma unroll
        for (int i = 0; i < MMA_M; ++i)
#pragma unroll
            for (int j = 0; j < Tr::OUT_MMA_N; ++j)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    OutT* dst = stage + (frag_row + i * 16 + h * 8) * OPITCH + frag_col + j * 8;
                    if constexpr (SPLIT_MODE == 0) {
                        *reinterpret_cast<uint32_t*>(dst) = pack2<T>(out_value(i, j, h, 0), out_value(i, j, h, 1));
                    } else {
                        *reinterpret_cast<float2*>(dst) = make_float2(out_value(i, j, h, 0), out_value(i, j, h, 1));
                    }
                }
        __syncthreads();
        const bool vec_ok = stride_cm % VEC == 0;
        for (int idx = tid; idx < BLOCK_M * OCPR; idx += THREADS) {
            const int r = idx / OCPR;
            const int c = idx % OCPR;
            const int32_t p = sorted_token_ids[row0 + r];
            const int64_t n = n0 + c * VEC;
            if (p < 0 || p >= num_valid_tokens || n >= out_n) continue;
            const OutT* src = stage + r * OPITCH + c * VEC;
            OutT* dst = out + static_cast<int64_t>(p) * stride_cm + n;
            moe_store_staged_chunk<OutT, VEC, SPLIT_MODE>(dst, src, n, out_n, vec_ok);
        }
    } else {
        // The staged tile does not fit in the operand ring: store fragments directly.
        const bool pair_ok = stride_cm % 2 == 0;
#pragma unroll
        for (int i = 0; i < MMA_M; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int32_t p = sorted_token_ids[row0 + frag_row + i * 16 + h * 8];
                if (p < 0 || p >= num_valid_tokens) continue;
                OutT* out_row = out + static_cast<int64_t>(p) * stride_cm;
#pragma unroll
                for (int j = 0; j < Tr::OUT_MMA_N; ++j) {
                    const int64_t n = n0 + frag_col + j * 8;
                    const float v0 = out_value(i, j, h, 0);
                    const float v1 = out_value(i, j, h, 1);
                    if (pair_ok && n + 1 < out_n) {
                        if constexpr (SPLIT_MODE == 0) {
                            *reinterpret_cast<uint32_t*>(out_row + n) = pack2<T>(v0, v1);
                        } else if constexpr (SPLIT_MODE == 1) {
                            red_global_add_v2_f32(out_row + n, v0, v1);
                        } else {
                            *reinterpret_cast<float2*>(out_row + n) = make_float2(v0, v1);
                        }
                    } else {
                        if constexpr (SPLIT_MODE == 1) {
                            if (n < out_n) red_global_add_f32(out_row + n, v0);
                            if (n + 1 < out_n) red_global_add_f32(out_row + n + 1, v1);
                        } else {
                            if (n < out_n) out_row[n] = from_float<OutT>(v0);
                            if (n + 1 < out_n) out_row[n + 1] = from_float<OutT>(v1);
                        }
                    }
                }
            }
    }
}
