// moe_gemm_sm90.cu: the grouped GEMM of a fused MoE layer on Hopper tensor cores (sm_90a):
// wgmma from shared memory, B by the copy engine (TMA), A gathered by cp.async, warp-specialized.
//
// moe_gemm_sm90<T, BLOCK_M, BLOCK_N, STAGES, SPLIT_MODE, MUL_ROUTED_WEIGHT>
//
// Computes exactly what moe_gemm computes (see moe_gemm.cu), for every row r < *total_padded of
// the expert-sorted order:
//     p = sorted_token_ids[r]                      (pair index; p >= num_valid_tokens is padding)
//     C[p, :] = A[p / top_k, :] * B[expert_ids[r / BLOCK_M]]^T   (x topk_weights[p] if MUL_ROUTED_WEIGHT)
// A is [*, K] (row stride stride_am elements, unit stride in K); B is [E, N, K] (K contiguous), read
// through the tensor map b_map only; C row p starts at p * stride_cm elements. Accumulation in fp32.
//
// Grid:   x = ceil(max_padded / BLOCK_M) * ceil(N / BLOCK_N), y = split_k, z = 1.
//         blockIdx.x -> (pid_m, pid_n) with the GROUP_SIZE_M swizzle of moe_gemm (groups of
//         group_size_m m-blocks; inside a group pid_m varies fastest, then pid_n).
// Block:  128 * (1 + BLOCK_M / 64) threads = one producer warpgroup + BLOCK_M / 64 consumer
//         warpgroups. __launch_bounds__(threads, 1).
//         Warpgroup 0 (producer): thread 0 issues the TMA copy of each B tile [BLOCK_N][64] and its
//           128 threads gather the A tile [BLOCK_M][64] with 16-byte cp.async (zero-filled for padding
//           rows and the K tail), into a STAGES-deep ring guarded by full/empty mbarriers.
//         Warpgroup 1 + i (consumer i): output rows [64 i, 64 i + 64) of the tile, all BLOCK_N
//           columns: four wgmma.m64n{BLOCK_N}k16 per K tile, one wgmma group kept in flight.
//         With two consumer warpgroups (BLOCK_M = 128, 384 threads) setmaxnreg moves registers
//         from the producer (40 per thread) to the consumers (232): 128*40 + 256*232 = 384*168.
// Each program: one BLOCK_M x BLOCK_N output tile over the K tiles of its split. BLOCK_K = 64. The
//         K tiles (ceil(K / 64)) are cut into split_k contiguous ranges of ceil(tiles / split_k);
//         split blockIdx.y takes range y (possibly empty). Programs with pid_m * BLOCK_M >=
//         *total_padded return at once. A block whose expert id is -1 (expert not owned) skips
//         the K loop and stores zeros (modes 0 and 2) or nothing (mode 1); so does an empty split.
// SPLIT_MODE 0: C is T*, rounded once from fp32; requires split_k == 1.
//            1: C is float*, zero-filled by the host; partials added with red.global.add.f32.
//            2: C is a float* workspace [split_k][num_valid_tokens] rows of stride stride_cm;
//               split s writes its partial (plain stores) at C + s*num_valid_tokens*stride_cm.
// Shared memory (dynamic; no static shared memory). From a base the kernel rounds up to 1024 bytes:
//         [0, STAGES*BLOCK_M*128)                 A ring: stage s = BLOCK_M rows of 128 bytes
//         [.., + STAGES*BLOCK_N*128)              B ring: stage s = BLOCK_N rows of 128 bytes
//             (both in the 128-byte swizzle: 16-byte chunk c of row r at chunk c ^ (r % 8);
//              every stage starts 1024-byte aligned since BLOCK_M, BLOCK_N are multiples of 8)
//         [.., + 8*STAGES)                        full mbarriers (count 128 + 1, plus B's tx bytes)
//         [.., + 8*STAGES)                        empty mbarriers (count 4 per consumer warpgroup)
//         [.., + 4*BLOCK_M)                       A row of each tile row (p / top_k, or -1)
//         [.., + 4*BLOCK_M)                       pair index of each tile row (p, or -1)
//         MoEGemmSm90Traits::SMEM_BYTES = STAGES*128*(BLOCK_M + BLOCK_N) + 16*STAGES + 8*BLOCK_M;
//         the host passes SMEM_BYTES + 1024 (slack for the alignment) as the dynamic size, and
//         raises the kernel's dynamic limit to that. After the K loop the A/B ring stages the
//         output tile [BLOCK_M][BLOCK_N + 8] (T in mode 0, float otherwise) for 16-byte stores.
// Tensor map (host, cuTensorMapEncodeTiled): B viewed as a 2-D tensor of T (BFLOAT16 or FLOAT16)
//         with globalDim = {K, E*N}, globalStrides = {K*2 bytes}, boxDim = {64, BLOCK_N},
//         elementStrides = {1, 1}, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
//         CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE (zeros). The tile
//         of expert e, columns n0.., K tile kt is the box at {kt*64, e*N + n0}; rows past N belong
//         to the next expert (or lie outside: zeros) and only feed output columns >= N, never stored;
//         columns past K read zeros.
// Host guarantees: K % 8 == 0; A, B, C 16-byte aligned; stride_am a multiple of 8 elements;
//         E*N < 2^31; the align block size equals BLOCK_M (so *total_padded is a multiple of BLOCK_M).
//         N, stride_cm are free (tails and odd strides fall back to scalar stores).
#include "moe_common.cuh"

template <typename T, int BLOCK_M, int BLOCK_N, int STAGES, int SPLIT_MODE, bool MUL_ROUTED_WEIGHT>
struct MoEGemmSm90Traits {
    static constexpr int BLOCK_K = 64;              // one 128-byte swizzled row of 16-bit elements
    static constexpr int ROW_BYTES = BLOCK_K * 2;   // 128
    static constexpr int WGMMA_K = 16;
    static constexpr int K_STEPS = BLOCK_K / WGMMA_K;  // wgmma per K tile
    static constexpr int WARPGROUP_THREADS = 128;
    static constexpr int CONSUMER_WARPGROUPS = BLOCK_M / 64;
    static constexpr int PRODUCER_THREADS = WARPGROUP_THREADS;
    static constexpr int CONSUMER_THREADS = CONSUMER_WARPGROUPS * WARPGROUP_THREADS;
    static constexpr int THREADS = PRODUCER_THREADS + CONSUMER_THREADS;
    static constexpr int ACC = BLOCK_N / 2;  // fp32 accumulators per consumer thread

    // Producer: thread t copies 16-byte chunk t % 8 of rows t / 8 + 16 i.
    static constexpr int CHUNKS_PER_ROW = ROW_BYTES / 16;
    static constexpr int ROWS_PER_PASS = PRODUCER_THREADS / CHUNKS_PER_ROW;  // 16
    static constexpr int A_PASSES = BLOCK_M / ROWS_PER_PASS;

    static constexpr int A_STAGE_BYTES = BLOCK_M * ROW_BYTES;
    static constexpr int B_STAGE_BYTES = BLOCK_N * ROW_BYTES;
    static constexpr int RING_BYTES = STAGES * (A_STAGE_BYTES + B_STAGE_BYTES);
    static constexpr int BARRIER_BYTES = 2 * 8 * STAGES;  // full[STAGES], empty[STAGES]
    static constexpr int ROW_TABLE_BYTES = 2 * 4 * BLOCK_M;  // A row and pair index per tile row
    static constexpr int SMEM_BYTES = RING_BYTES + BARRIER_BYTES + ROW_TABLE_BYTES;
    static constexpr int SMEM_ALIGN = 1024;  // 128-byte swizzle atoms (8 rows x 128 bytes)
    static constexpr int DYNAMIC_SMEM_BYTES = SMEM_BYTES + SMEM_ALIGN;  // what the host passes

    static constexpr uint32_t FULL_ARRIVALS = PRODUCER_THREADS + 1;  // cp.async noinc arrivals + expect_tx
    static constexpr uint32_t EMPTY_ARRIVALS = CONSUMER_WARPGROUPS * 4;  // lane 0 of every consumer warp

    // Register split (setmaxnreg) for 384 threads at 168 registers each.
    static constexpr bool REBALANCE_REGISTERS = CONSUMER_WARPGROUPS == 2;
    static constexpr int PRODUCER_REGISTERS = 40;
    static constexpr int CONSUMER_REGISTERS = 232;

    // Output staging: the tile in the type that goes to global memory.
    static constexpr int OUT_BYTES = SPLIT_MODE == 0 ? 2 : 4;
    static constexpr int OUT_PITCH = BLOCK_N + 8;  // elements; keeps fragment writes conflict-free
    static constexpr int OUT_VEC = 16 / OUT_BYTES;  // elements per 16-byte store
    static constexpr int OUT_CHUNKS_PER_ROW = BLOCK_N / OUT_VEC;

    static_assert(sizeof(T) == 2, "T must be moe_bf16 or moe_fp16");
    static_assert(BLOCK_M == 64 || BLOCK_M == 128, "BLOCK_M in {64, 128}");
    static_assert(BLOCK_N == 64 || BLOCK_N == 128 || BLOCK_N == 256, "BLOCK_N in {64, 128, 256}");
    static_assert(STAGES >= 2 && STAGES <= 8, "STAGES in 2..8");
    static_assert(SPLIT_MODE >= 0 && SPLIT_MODE <= 2, "SPLIT_MODE in {0,1,2}");
    static_assert(A_STAGE_BYTES % SMEM_ALIGN == 0 && B_STAGE_BYTES % SMEM_ALIGN == 0, "stages stay 1024-aligned");
    static_assert(BLOCK_M * OUT_PITCH * OUT_BYTES <= RING_BYTES, "the staged output tile must fit in the ring");
    static_assert(DYNAMIC_SMEM_BYTES <= 232448, "more than 227 KB of shared memory per block");
    static_assert(!REBALANCE_REGISTERS ||
                      PRODUCER_THREADS * PRODUCER_REGISTERS + CONSUMER_THREADS * CONSUMER_REGISTERS <= THREADS * 168,
                  "setmaxnreg budget exceeds the registers allocated at launch");
};

template <typename T, int BLOCK_M, int BLOCK_N, int STAGES, int SPLIT_MODE, bool MUL_ROUTED_WEIGHT>
__global__ void __launch_bounds__(128 * (1 + BLOCK_M / 64), 1)
    moe_gemm_sm90(const __grid_constant__ CUtensorMap b_map, const T* __restrict__ A, void* __restrict__ C,
                  const float* __restrict__ topk_weights, const int32_t* __restrict__ sorted_token_ids,
                  const int32_t* __restrict__ expert_ids, const int32_t* __restrict__ total_padded, int64_t N,
                  int64_t K, int64_t num_valid_tokens, int32_t top_k, int32_t split_k, int32_t group_size_m,
                  int64_t stride_am, int64_t stride_cm, int64_t max_padded) {
    using Tr = MoEGemmSm90Traits<T, BLOCK_M, BLOCK_N, STAGES, SPLIT_MODE, MUL_ROUTED_WEIGHT>;
    constexpr int BLOCK_K = Tr::BLOCK_K;

    extern __shared__ __align__(16) unsigned char moe_gemm_sm90_smem[];

    // --- Tile coordinates (Triton's grouped ordering, as moe_gemm) ---
    const int64_t num_pid_m = ceil_div(max_padded, BLOCK_M);
    const int64_t num_pid_n = ceil_div(N, BLOCK_N);
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
    const int64_t n0 = pid_n * BLOCK_N;
    const int32_t expert = expert_ids[pid_m];

    // --- This split's K-tile range ---
    const int64_t k_tiles = ceil_div(K, BLOCK_K);
    const int64_t tiles_per_split = ceil_div(k_tiles, split_k > 0 ? split_k : 1);
    const int64_t kt_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
    const int64_t kt_end = min_i64(kt_begin + tiles_per_split, k_tiles);
    const int num_tiles = (expert < 0 || kt_begin >= kt_end) ? 0 : static_cast<int>(kt_end - kt_begin);
    if (SPLIT_MODE == 1 && num_tiles == 0) return;  // adding zeros changes nothing

    // --- Shared memory carve-up (see the top comment) ---
    const int tid = threadIdx.x;
    const uint32_t smem_raw = cvta_to_shared_u32(moe_gemm_sm90_smem);
    const uint32_t smem_base = (smem_raw + Tr::SMEM_ALIGN - 1) & ~static_cast<uint32_t>(Tr::SMEM_ALIGN - 1);
    unsigned char* const smem_base_ptr = moe_gemm_sm90_smem + (smem_base - smem_raw);
    const uint32_t smem_a = smem_base;
    const uint32_t smem_b = smem_a + STAGES * Tr::A_STAGE_BYTES;
    const uint32_t full_bar = smem_base + Tr::RING_BYTES;  // full[s] at full_bar + 8 s
    const uint32_t empty_bar = full_bar + 8 * STAGES;      // empty[s] at empty_bar + 8 s
    int32_t* const tile_a_row = reinterpret_cast<int32_t*>(smem_base_ptr + Tr::RING_BYTES + Tr::BARRIER_BYTES);
    int32_t* const tile_pair = tile_a_row + BLOCK_M;

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbarrier_init(full_bar + 8 * s, Tr::FULL_ARRIVALS);
            mbarrier_init(empty_bar + 8 * s, Tr::EMPTY_ARRIVALS);
        }
        fence_mbarrier_init();
        if (num_tiles > 0) prefetch_tensormap(&b_map);
    }
    for (int r = tid; r < BLOCK_M; r += Tr::THREADS) {
        const int32_t p = sorted_token_ids[row0 + r];
        const bool valid = p >= 0 && p < num_valid_tokens;
        tile_pair[r] = valid ? p : -1;
        tile_a_row[r] = valid ? p / top_k : -1;
    }
    __syncthreads();

    if (tid < Tr::PRODUCER_THREADS) {
        // ===== Producer warpgroup =====
        if constexpr (Tr::REBALANCE_REGISTERS) setmaxnreg_dec<Tr::PRODUCER_REGISTERS>();
        if (num_tiles > 0) {
            const int chunk = tid % Tr::CHUNKS_PER_ROW;
            const int pass_row = tid / Tr::CHUNKS_PER_ROW;  // rows pass_row + 16 i share pass_row % 8
            const uint32_t a_dst0 = smem_a + pass_row * Tr::ROW_BYTES + ((chunk ^ (pass_row & 7)) << 4);
            const int32_t b_row = static_cast<int32_t>(static_cast<int64_t>(expert) * N + n0);
            int stage = 0;
            uint32_t phase = 0;
            for (int t = 0; t < num_tiles; ++t) {
                mbarrier_wait_parity(empty_bar + 8 * stage, phase ^ 1);  // round 0 passes at once
                const uint32_t full = full_bar + 8 * stage;
                const int64_t kt = kt_begin + t;
                if (tid == 0) {
                    mbarrier_arrive_expect_tx(full, Tr::B_STAGE_BYTES);
                    tma_load_2d(smem_b + stage * Tr::B_STAGE_BYTES, &b_map, static_cast<int32_t>(kt * BLOCK_K), b_row,
                                full);
                }
                const int64_t k = kt * BLOCK_K + chunk * 8;
                const bool k_ok = k < K;  // K % 8 == 0: a chunk is all in or all out
                const uint32_t a_dst = a_dst0 + stage * Tr::A_STAGE_BYTES;
#pragma unroll
                for (int i = 0; i < Tr::A_PASSES; ++i) {
                    const int32_t a_row = tile_a_row[pass_row + i * Tr::ROWS_PER_PASS];
                    const bool ok = k_ok && a_row >= 0;
                    const T* src = ok ? A + static_cast<int64_t>(a_row) * stride_am + k : A;
                    cp_async_cg_16(a_dst + i * Tr::ROWS_PER_PASS * Tr::ROW_BYTES, src, ok);
                }
                cp_async_mbarrier_arrive_noinc(full);  // arrives once this thread's copies have landed
                if (++stage == STAGES) {
                    stage = 0;
                    phase ^= 1;
                }
            }
            cp_async_wait_all();
        }
    } else {
        // ===== Consumer warpgroups =====
        if constexpr (Tr::REBALANCE_REGISTERS) setmaxnreg_inc<Tr::CONSUMER_REGISTERS>();
        const int ctid = tid - Tr::PRODUCER_THREADS;
        const int wg = ctid / Tr::WARPGROUP_THREADS;  // owns tile rows [64 wg, 64 wg + 64)
        const int wg_tid = ctid % Tr::WARPGROUP_THREADS;
        const int warp_in_wg = wg_tid / 32;
        const int lane = tid % 32;

        float acc[Tr::ACC];
#pragma unroll
        for (int i = 0; i < Tr::ACC; ++i) acc[i] = 0.0f;

        // Descriptors of stage 0, k step 0; stage s and step kk add (s * STAGE_BYTES + 32 kk) >> 4.
        const uint64_t desc_a0 = wgmma_desc_k_major_sw128(smem_a + wg * 64 * Tr::ROW_BYTES);
        const uint64_t desc_b0 = wgmma_desc_k_major_sw128(smem_b);
        int stage = 0;
        uint32_t phase = 0;
        int prev_stage = 0;
        for (int t = 0; t < num_tiles; ++t) {
            mbarrier_wait_parity(full_bar + 8 * stage, phase);
            // A came through cp.async (generic proxy); wgmma reads through the async proxy.
            fence_proxy_async_shared_cta();
#pragma unroll
            for (int i = 0; i < Tr::ACC; ++i) wgmma_fence_operand(acc[i]);
            wgmma_fence();
            const uint64_t desc_a = desc_a0 + static_cast<uint64_t>((stage * Tr::A_STAGE_BYTES) >> 4);
            const uint64_t desc_b = desc_b0 + static_cast<uint64_t>((stage * Tr::B_STAGE_BYTES) >> 4);
#pragma unroll
            for (int kk = 0; kk < Tr::K_STEPS; ++kk)
                wgmma_m64nNk16_ss<T, BLOCK_N>(acc, desc_a + ((kk * Tr::WGMMA_K * 2) >> 4),
                                              desc_b + ((kk * Tr::WGMMA_K * 2) >> 4), 1);
            wgmma_commit_group();
#pragma unroll
            for (int i = 0; i < Tr::ACC; ++i) wgmma_fence_operand(acc[i]);
            wgmma_wait_group<1>();  // the previous tile's products are done: release its stage
            if (t > 0 && lane == 0) mbarrier_arrive(empty_bar + 8 * prev_stage);
            prev_stage = stage;
            if (++stage == STAGES) {
                stage = 0;
                phase ^= 1;
            }
        }
        wgmma_wait_group<0>();
#pragma unroll
        for (int i = 0; i < Tr::ACC; ++i) wgmma_fence_operand(acc[i]);

        // --- Epilogue ---
        // acc[4 j + 2 h + c] is tile row frag_row + 8 h, column 8 j + 2 (lane % 4) + c.
        const int frag_row = wg * 64 + warp_in_wg * 16 + lane / 4;
        const int frag_col = (lane % 4) * 2;
        if constexpr (MUL_ROUTED_WEIGHT) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int32_t p = tile_pair[frag_row + 8 * h];
                const float w = p >= 0 ? topk_weights[p] : 0.0f;
#pragma unroll
                for (int j = 0; j < BLOCK_N / 8; ++j) {
                    acc[4 * j + 2 * h] *= w;
                    acc[4 * j + 2 * h + 1] *= w;
                }
            }
        }

        using OutT = typename moe_conditional<SPLIT_MODE == 0, T, float>::type;
        constexpr int OPITCH = Tr::OUT_PITCH;
        constexpr int VEC = Tr::OUT_VEC;
        constexpr int OCPR = Tr::OUT_CHUNKS_PER_ROW;
        OutT* out = static_cast<OutT*>(C);
        if constexpr (SPLIT_MODE == 2) out += static_cast<int64_t>(blockIdx.y) * (num_valid_tokens * stride_cm);

        // Every consumer is done with the ring (its wgmma completed) before any overwrites it.
        fence_proxy_async_shared_cta();
        bar_sync<1, Tr::CONSUMER_THREADS>();
        OutT* staged = reinterpret_cast<OutT*>(smem_base_ptr);
#pragma unroll
        for (int j = 0; j < BLOCK_N / 8; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                OutT* dst = staged + (frag_row + 8 * h) * OPITCH + 8 * j + frag_col;
                if constexpr (SPLIT_MODE == 0) {
                    *reinterpret_cast<uint32_t*>(dst) = pack2<T>(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
                } else {
                    *reinterpret_cast<float2*>(dst) = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
                }
            }
        if (wg == 0) {  // each warpgroup stores the 64 rows it staged
            bar_sync<2, Tr::WARPGROUP_THREADS>();
        } else {
            bar_sync<3, Tr::WARPGROUP_THREADS>();
        }

        const bool vec_ok = stride_cm % VEC == 0;
        for (int idx = wg_tid; idx < 64 * OCPR; idx += Tr::WARPGROUP_THREADS) {
            const int r = wg * 64 + idx / OCPR;
            const int c = idx % OCPR;
            const int32_t p = tile_pair[r];
            const int64_t n = n0 + c * VEC;
            if (p < 0 || n >= N) continue;
            const OutT* src = staged + r * OPITCH + c * VEC;
            OutT* dst = out + static_cast<int64_t>(p) * stride_cm + n;
            if (vec_ok && n + VEC <= N) {
                if constexpr (SPLIT_MODE == 1) {
                    const float4 v = *reinterpret_cast<const float4*>(src);
                    red_global_add_v4_f32(dst, v.x, v.y, v.z, v.w);
                } else {
                    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
                }
            } else {
                for (int e = 0; e < VEC && n + e < N; ++e) {
                    if constexpr (SPLIT_MODE == 1) {
                        red_global_add_f32(dst + e, src[e]);
                    } else {
                        dst[e] = src[e];
                    }
                }
            }
        }
    }
}
