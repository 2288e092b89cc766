// moe_gemm_sm90.cu: the grouped GEMM of a fused MoE layer on Hopper tensor cores (sm_90a):
// wgmma from shared memory, B (weights) by the copy engine (TMA), A (activation rows) gathered by
// cp.async, one producer warpgroup and one or two consumer warpgroups.
//
// All three kernels compute exactly what moe_gemm computes (see moe_gemm.cu), for every row r <
// *total_padded of the expert-sorted order:
//     p = sorted_token_ids[r]                      (pair index; p >= num_valid_tokens is padding)
//     C[p, :] = A[p / top_k, :] * B[expert_ids[r / BLOCK_M]]^T   (x topk_weights[p] if MUL_ROUTED_WEIGHT)
// A is [*, K] (row stride stride_am elements, unit stride in K); B is [E, N, K] (K contiguous), read
// only through the tensor map b_map; C row p starts at p * stride_cm elements. fp32 accumulation.
// SPLIT_MODE 0: C is T*, rounded once from fp32; requires split_k == 1.
//            1: C is float*, zero-filled by the host; partials added with red.global.add.f32.
//            2: C is a float* workspace [split_k][num_valid_tokens] rows of stride stride_cm;
//               split s writes its partial (plain stores) at C + s*num_valid_tokens*stride_cm.
//            3 (moe_gemm_sm90, moe_gemm_sm90_persistent (not PINGPONG or STREAM_K), moe_gemm_sm90_swap; GEMM2:
//               MUL_ROUTED_WEIGHT, split_k 1): the top-k sum by 16-bit reductions. C is T*
//               [tokens][stride_cm], zero-filled by the host; row p (routed weight applied, rounded to T)
//               is added into row p / combine_k with red.global.add.noftz.v4.bf16x2 / .f16x2, so each
//               token's sum is rounded at every add. At combine_k <= 2 that is round(a + b) whatever the
//               order (the host's ordered mode uses it there); above, its last bits vary from run to run
//               (the host's atomic mode). No partial rows, no combine.
// The K tiles (ceil(K / 64)) are cut into split_k contiguous ranges of ceil(tiles / split_k); split
// blockIdx.y takes range y (possibly empty). Programs with pid_m * BLOCK_M >= *total_padded return at
// once. A block whose expert id is -1 (expert not owned) skips the K loop and stores zeros (modes 0
// and 2) or nothing (modes 1 and 3; the A-resident walk and moe_gemm_sm90_swap add zeros in mode 3); so does an empty
// split range.
// Identity routing (moe_common.cuh): sorted_token_ids and total_padded null, expert_ids = topk_ids:
//         block b holds pair b alone (one token's k slots; no align ran). An id outside [0, E) then
//         reads weight rows past E*N, which the tensor map fills with zeros.
// FUSED_ACT 0: as above. 1 (silu) or 2 (exact gelu): GEMM1 with its activation in the epilogue
//         (SPLIT_MODE 0, MUL_ROUTED_WEIGHT false). N = 2I is the product width (B rows per expert:
//         gate rows [0, I), up rows [I, 2I)); the program of n-block nb loads gate rows
//         [nb*BN/2, (nb+1)*BN/2) into the first half of its B tile and the matching up rows into the
//         second half (two TMA boxes of BN/2 rows: the tensor map's box has BN/2 rows), and stores
//         C[p, c] = round_T(act(round_T(gate)) * round_T(up)) for output columns c in
//         [nb*BN/2, (nb+1)*BN/2) below I, with C's row stride stride_cm (I for a dense output): bit for
//         bit GEMM1 (mode 0) then moe_silu_and_mul / moe_gelu_and_mul. The n-blocks stay ceil(N / BN).
//         BN is BLOCK_N (BLOCK_N_W for swap-AB); the persistent kernel needs BLOCK_N >= 128.
//
// ---------------------------------------------------------------------------------------------------
// moe_gemm_sm90<T, BLOCK_M, BLOCK_N, STAGES, SPLIT_MODE, MUL_ROUTED_WEIGHT, FUSED_ACT, CLUSTER> (prefill, large M)
//
// Grid:   x = ceil(max_padded / BLOCK_M) * ceil(N / BLOCK_N) (CLUSTER 2: rounded up to even), y = split_k,
//         z = 1. blockIdx.x -> (pid_m, pid_n) in expert-aligned groups (moe_sm90_tile_at): each expert's
//         run of m-blocks is cut into groups of at most group_size_m m-blocks (a group never holds two
//         experts, unlike moe_gemm's Triton swizzle); inside a group pid_m varies fastest, then pid_n
//         (n-blocks in pairs for odd groups, below), so the programs that read one weight tile run
//         together and it comes from HBM once.
// CLUSTER 2: launched in clusters of 2 along x (cuLaunchKernelEx, cluster dimension {2, 1, 1}; without
//         one the kernel runs as CLUSTER 1). Programs 2c and 2c + 1 whose tiles have K work on the same
//         expert, n-block and K range share the weight tiles: each CTA's thread 0 copies half of every
//         B tile (a box of BLOCK_N / 2 rows: the tensor map's box has BLOCK_N / 2 rows) into the same
//         stage of both CTAs (TMA multicast), every full barrier expects the whole tile, and each
//         consumer warp releases a stage in both CTAs (empty barriers count both CTAs' consumer warps);
//         a cluster barrier after the barrier init; before exit each producer waits until both CTAs'
//         consumers have released the last stages. Half the B traffic from L2 for those tiles; other
//         pairs load alone. (Measured no faster on the preset shapes, NOTES v13: no table uses it.)
// Block:  128 * (1 + BLOCK_M / 64) threads; __launch_bounds__(threads, 1).
//         Warpgroup 0 (producer): thread 0 issues the TMA copy of each B tile [BLOCK_N][64]; its 128
//           threads gather the A tile [BLOCK_M][64] with 16-byte cp.async (zero-filled for padding rows
//           and the K tail); STAGES-deep ring, full/empty mbarriers.
//         Warpgroup 1 + i (consumer i): output rows [64 i, 64 i + 64) of the tile, all BLOCK_N columns:
//           four wgmma.m64n{BLOCK_N}k16 per K tile, one wgmma group kept in flight; a consumer whose
//           64 rows are all padding (its first row's pair is -1 in the row table) issues none, still
//           waiting for and releasing every stage.
//         BLOCK_M = 128 (384 threads): setmaxnreg gives the producer 56 registers per thread and the
//         consumers 224 (128*56 + 256*224 = 384*168, the launch allocation ptxas must report).
// Each program: one BLOCK_M x BLOCK_N output tile over its split's K tiles.
// Shared memory (dynamic, no static): SMEM_BYTES = STAGES*128*(BLOCK_M + BLOCK_N) + 16*STAGES + 8*BLOCK_M
//         (MoEGemmSm90Traits::SMEM_BYTES); the host passes SMEM_BYTES + 1024 (the kernel rounds its base
//         up to 1024 bytes) and raises the dynamic limit to that. Layout from the aligned base:
//           A ring   STAGES x [BLOCK_M rows][128 bytes]
//           B ring   STAGES x [BLOCK_N rows][128 bytes]
//           full[STAGES], empty[STAGES] mbarriers (8 bytes each)
//           int32 A row of each tile row (p / top_k, or -1), int32 pair index (p, or -1): BLOCK_M each
//         Operand tiles use the 128-byte swizzle: 16-byte chunk c of row r sits at chunk c ^ (r % 8);
//         every stage starts 1024-byte aligned. After the K loop the ring stages the output tile
//         [BLOCK_M][BLOCK_N + 8] (T in mode 0, float otherwise) for 16-byte row stores.
// Tensor map: boxDim = {64, BLOCK_N}, or {64, BLOCK_N / 2} with FUSED_ACT or CLUSTER 2 (below).
//
// ---------------------------------------------------------------------------------------------------
// moe_gemm_sm90_swap<T, BLOCK_N_W, TOKENS, STAGES, SPLIT_MODE, MUL_ROUTED_WEIGHT, FUSED_ACT> (decode; wide token tiles)
//
// Swap-AB: the weight rows fill wgmma's M side (64 per instruction) and the tokens its N side, so a
// block of a few tokens per expert does not waste the tensor cores: each program computes
// C^T tile = B tile [BLOCK_N_W x K] * A tile^T [K x TOKENS]. BLOCK_N_W in {64, 128, 256}; TOKENS is the
// align block size (BLOCK_M == TOKENS: expert_ids has one entry per TOKENS rows): 8, 16, 32 or 64 for
// decode, or a wide token tile 80, 96, 112, 128, 144, 160, 176 or 192 for prefill, where wgmma's N side
// (steps of 8) lets the align block fit the rows per expert more closely than the 64-row steps of
// moe_gemm_sm90 (e.g. 130-150 rows per expert: one block of 160 instead of two of 128).
// Grid:   x = ceil(max_padded / TOKENS) * ceil(N / BLOCK_N_W), y = split_k; expert-aligned groups as above
//         with BLOCK_M = TOKENS, BLOCK_N = BLOCK_N_W.
// Block:  a producer warpgroup (as moe_gemm_sm90's) and one consumer warpgroup (BLOCK_N_W 64, 128;
//         256 threads, no setmaxnreg) or two (BLOCK_N_W 256: 384 threads, setmaxnreg 56 / 224 of 168
//         at launch); __launch_bounds__(threads, 1). Consumer warpgroup w owns weight rows
//         [w WG_ROWS, (w + 1) WG_ROWS) (WG_ROWS = min(BLOCK_N_W, 128)) and issues WG_ROWS / 64
//         wgmma.m64n{TOKENS}k16 per k16 step (TOKENS fp32 accumulators per thread at WG_ROWS 128).
// Shared memory: SMEM_BYTES = STAGES*128*(TOKENS + BLOCK_N_W) + 16*STAGES + 8*TOKENS
//         (MoEGemmSm90SwapTraits::SMEM_BYTES), plus 1024 bytes of alignment slack from the host. Layout
//         as above with the A ring holding TOKENS rows and the B ring BLOCK_N_W rows. The output tile
//         is staged transposed, fp32 [TOKENS][BLOCK_N_W + 4], in the ring (which must hold it: the
//         host checks TOKENS * (BLOCK_N_W + 4) * 4 <= STAGES*128*(TOKENS + BLOCK_N_W)), and the routed
//         weight applied (and the value rounded once to T in mode 0) on the way out. FUSED_ACT with two
//         m64 blocks per consumer warpgroup (BLOCK_N_W 128, 256; MOE_SM90_SWAP_PAIRED_ACT, where it
//         compiles without spills): warpgroup w multiplies gate rows [64 w, 64 w + 64) and the matching up
//         rows BLOCK_N_W / 2 further, applies the activation in registers and stages only the T results,
//         [TOKENS][BLOCK_N_W / 2 + 8], by stmatrix.
// Arguments past moe_gemm_sm90's (whose last is combine_k, SPLIT_MODE 3's k): routing_ready, block_done,
// block_need (below), combine_k.
// Tensor map: boxDim = {64, BLOCK_N_W} (below).
//
// ---------------------------------------------------------------------------------------------------
// moe_gemm_sm90_persistent<T, BLOCK_M, BLOCK_N, STAGES, SPLIT_MODE, MUL_ROUTED_WEIGHT, FUSED_ACT, PINGPONG> (prefill)
//
// moe_gemm_sm90's tiles and arguments (the same tensor map, boxDim = {64, BLOCK_N}), computed by
// persistent programs that keep the operand ring full across tiles.
// Grid:   x = any count >= 1, y = split_k, z = 1; num_tiles = ceil(max_padded / BLOCK_M) * ceil(N / BLOCK_N).
//         Correct for every x (programs with blockIdx.x >= num_tiles return at once); fastest when all
//         x * split_k programs are resident at once: x = min(num_tiles, max(1, resident / split_k)),
//         resident = SMs * blocks per SM (1 for BLOCK_M 128; cuOccupancyMaxActiveBlocksPerMultiprocessor
//         for BLOCK_M 64 with a shallow ring, where two may fit).
// Each program (blockIdx.x = b, split blockIdx.y = s) walks the linear tile indices t = b, b + gridDim.x,
//         ... < num_tiles; tile t is moe_gemm_sm90's program t (the expert-aligned groups, split s), and
//         the walk ends at the first tile whose m-block is at or past *total_padded (every later tile's
//         is too); a tile is skipped in mode 1 when it has no K work (expert -1 or an empty split range).
//         Tiles without K work in modes 0 and 2 store zeros, loading nothing.
// Block:  as moe_gemm_sm90: 128 * (1 + BLOCK_M / 64) threads, __launch_bounds__(threads, 1), and for
//         BLOCK_M = 128 setmaxnreg 56 (producer) / 224 (consumers) of 168 at launch.
//         Producer warpgroup: for each of its tiles with K work (tile.num_tiles > 0), fills one of two
//           A-row tables (the a_row and pair tables of the layout, alternating; one named barrier over
//           the producer warpgroup per tile), then loads the tile's K tiles as moe_gemm_sm90 does. Its
//           ring stage and phase run on from tile to tile, so it loads the next tiles while the
//           consumers finish the current one and run its epilogue, up to STAGES K tiles ahead.
//         Consumer warpgroups: per tile, fresh accumulators; the same K loop on the shared ring position,
//           releasing every stage they consumed (the last one of each tile too); in mode 0 the next
//           tile's schedule is computed while the tile's last wgmma group runs; then the epilogue, in
//           which each consumer warp stores its 16 rows through its own staging rows (below) with
//           __syncwarp only: no barrier between warps, and the ring is not touched.
//         Both roles decide which tiles exist and which have K work with the same call on the same
//         inputs, so every full/empty phase is waited for by the side that the other side signals.
// A resident (BLOCK_M 128, SPLIT_MODE 0 or 3, no FUSED_ACT, not PINGPONG; K at most A_SLOTS = 6 K tiles, split_k
//         1; STAGES with at least 3 B stages left: (STAGES * (128 + BLOCK_N) - 128 * A_SLOTS) / BLOCK_N):
//         the program walks units u = blockIdx.x, + gridDim.x, ...: unit u is m-block u / C and
//         n-blocks [(u % C) A_CHUNK, + A_CHUNK) (C = ceil(n-blocks / A_CHUNK), A_CHUNK 8; m-block order,
//         GROUP_SIZE_M unused), ending at the first unit past the valid m-blocks. The ring's memory
//         holds the unit's A tile (slot k = K tile k, [128][128 bytes], loaded once per unit by the
//         producer with the unit's first tile, own full/empty barriers in the second row table) and a
//         ring of B stages after it (full barriers: thread 0's expect_tx only); the consumers release
//         the A slots with the unit's last tile. A is read once per unit instead of once per tile.
// PINGPONG (BLOCK_M 128, BLOCK_N 64 or 128; default false): the consumer warpgroups take the program's
//         tiles in turn (the j-th tile of the walk to warpgroup j % 2), each computing all 128 rows as
//         two wgmma.m64n{BLOCK_N}k16 per k16 step (BLOCK_N fp32 accumulators per thread) and storing
//         them as two 64-row halves, warp w of a warpgroup rows [16 w, 16 w + 16) of each. Their K loops
//         alternate through named barriers 2 + w (warpgroup w waits on its own before each tile but the
//         walk's first; the other arrives right after issuing its last K tile, and each waits once
//         more at the end when the walk's last tile is the other's), so one warpgroup's epilogue runs
//         under the other's products. Each keeps the ring position by skipping the other's K tiles;
//         empty barriers count one warpgroup's four warps. No half tiles, no early schedule (the
//         schedules of the next two tiles are loaded in the K loop's drain instead).
// STREAM_K (KERNEL wgmma_streamk; SPLIT_MODE 0, split_k 1, not PINGPONG; grid x = G programs, any
//         G >= 1, all of which must be able to be resident at once, e.g. G = SMs): with T = the valid
//         tiles (valid m-blocks x n-blocks, known on the device) and KT K tiles per tile, the
//         floor(T / G) whole rounds go round-robin (program b: tiles b, b + G, ...), and the R = T mod G
//         tiles of the partial wave are cut into S = min(floor(G / R), KT, MOE_SM90_STREAM_K_MAX_SPLITS
//         = 4) equal K pieces, split-major over programs 0 .. R S - 1 (program b: piece s = b / R of
//         tile floor(T / G) G + b % R, K tiles [s KT / S, (s + 1) KT / S)): the partial wave ends after
//         1 / S of a tile instead of a whole one, and the programs of one piece index run the same K
//         range side by side (the m-blocks that share a weight tile stay in K step). A piece before a
//         tile's last writes its fp32 accumulators to the program's slot of sk_partials (G + 1 slots of
//         BLOCK_M * BLOCK_N floats: consumer thread c's 4-float vector i at i * CONSUMER_THREADS + c),
//         then sets sk_flags[b] (release, after a fence and a consumer barrier). The tile's last piece
//         waits for the flags of programs b - R, b - 2R, ... (thread 0, acquire, before its K loop;
//         each flag is cleared for the next launch), then after its K loop adds their slots in K order
//         to its own accumulators and runs the epilogue (activation, routed weight: any mode-0
//         epilogue). The sum order is fixed by G and the shapes: reproducible. Waits point only at
//         pieces that wait for nothing, so no cycle; a wait past 20 s reads slot G instead (all bits
//         set: the tile comes out NaN, never a hang). sk_flags: G int32, zero before the first launch.
//         No A resident and no half tiles in this walk.
// Fused combine (compiled with MOE_SM90_FUSED_COMBINE=1, an experiment: slower, bench/NOTES.md v27;
//         combine_out non-null; the A-resident walk only, MUL_ROUTED_WEIGHT, not beside the half
//         tiles: the host passes it only there; otherwise the combine arguments are ignored): GEMM2
//         also writes out[t, n] = moe_combine's sum of token t's routed partial rows (combine_out
//         [tokens, N] of T, tokens = num_valid_tokens / combine_k; topk_ids combine_ids [tokens,
//         combine_k], routed: ids in [0, combine_experts)). The walk goes chunk-major in chunks of
//         combine_chunk n-blocks, with G = gridDim.x combine items of each chunk placed after the next
//         chunk's units (MoEGemmSm90PersistentTraits; the step_at notes). Each consumer warp adds 1 to
//         combine_counts[chunk] (red.release) per unit; an item waits (acquire; 20 s, then its output is
//         all bits set) for valid m-blocks x CONSUMER_WARPS, sums tokens [item M / G, (item + 1) M / G)
//         over the chunk's columns, adds 1 << 22 (the chunk's G-th clears it) and discards the rows it
//         read from L2 (MOE_SM90_COMBINE_DISCARD). combine_counts: ceil(n-blocks / combine_chunk)
//         int32, zero before the first launch. All G programs must be able to be resident at once.
// Shared memory (dynamic, no static):
//         SMEM_BYTES = STAGES*128*(BLOCK_M + BLOCK_N) + 16*STAGES + 8*BLOCK_M + 256*BLOCK_M
//         (MoEGemmSm90PersistentTraits::SMEM_BYTES), the same for every mode; the host passes
//         SMEM_BYTES + 1024 and raises the dynamic limit to that. Layout: moe_gemm_sm90's (A ring, B ring,
//         full/empty barriers, two BLOCK_M int32 tables), then the output staging, 256 bytes per tile
//         row: consumer warp w's rows [16 w, 16 w + 16) at 4096 w. A warp stages its rows in passes of
//         256-byte rows (128 columns of T in mode 0, 64 floats in modes 1 and 2; 128 bytes for mode 0
//         with BLOCK_N 64), 16-byte chunk c of row r at c ^ ((r * OUT_BYTES / 2) % 8), so the wgmma
//         fragment writes (4 or 8 bytes) and the 16-byte reads are free of bank conflicts; each row
//         then leaves as 16-byte stores (red.global.add.v4.f32 in mode 1). Deepest rings in 227 KB:
//         STAGES 4 for 128x256, 6 for 128x128, 8 for 128x64, 5 for 64x256, 8 for 64x128 and 64x64.
// PDL (all three kernels): griddepcontrol.wait, then griddepcontrol.launch_dependents, first thing:
//         the next kernel's programs may become resident as this grid's programs finish; they still
//         wait for this whole grid before touching memory. Except the swap-AB kernel given
//         routing_ready = 1 (GEMM2, whose routing align wrote before the previous kernel started): it
//         reads its schedule and row tables and issues its first STAGES weight tiles first, then waits.
// Block sync (swap-AB kernel; two extra arguments, int32_t* block_done and int32_t block_need): with
//         block_done non-null, GEMM1 (block_need 0, FUSED_ACT) adds 1 per consumer warp to
//         block_done[m-block] (red.release after its rows are stored), and GEMM2 (routing_ready,
//         block_need = GEMM1's n-blocks times GEMM1's consumer warps, 4 or 8) waits for
//         block_done[m-block] & 0xFFFF to reach block_need (acquire) instead of griddepcontrol.wait before
//         loading A, then adds 0x10000; the m-block's last GEMM2 program (split_k * ceil(N / BLOCK_N_W) of
//         them) sets it back to 0; GEMM2's program (0, 0) alone runs griddepcontrol.wait (at its end),
//         so the grid completes after GEMM1's. The host zeroes the counters once (ceil(max_padded /
//         TOKENS) of them) and passes them only where both GEMMs are this kernel on one align (same
//         TOKENS), GEMM1 unsplit with FUSED_ACT and GEMM2 not in mode 1, and the layer uses it (by default with
//         PDL from two tokens: NOTES v24-v25); null: no counter is touched.
//
// ---------------------------------------------------------------------------------------------------
// Tensor map (host, cuTensorMapEncodeTiled), all three kernels: B viewed as a 2-D tensor of T
//         (CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 or FLOAT16), rank 2, globalDim = {K, E*N},
//         globalStrides = {K*2} bytes, boxDim = {64, rows} (rows = BLOCK_N or BLOCK_N_W; half that
//         with FUSED_ACT or CLUSTER 2),
//         elementStrides = {1, 1}, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
//         CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE (zeros). The tile of
//         expert e, columns n0.., K tile kt is the box at {kt*64, e*N + n0}; rows past N belong to the
//         next expert (or lie outside: zeros) and only feed output columns >= N, never stored; columns
//         past K read zeros.
// Host guarantees: K % 8 == 0; A, B, C 16-byte aligned; stride_am a multiple of 8 elements;
//         E*N < 2^31; the align block size equals BLOCK_M (TOKENS) so *total_padded is a multiple of it.
//         N, stride_cm are free (tails and odd strides fall back to scalar stores).
#include "moe_common.cuh"

// Experiment switches of the persistent kernel (FUSED_MOE_KERNEL_DEFINES, for same-binary A/Bs;
// bench/NOTES.md v14). 1 is the shipped behaviour.
#ifndef MOE_SM90_EARLY_SCHEDULE
#define MOE_SM90_EARLY_SCHEDULE 1  // 0: the consumers compute each tile's schedule at its start
#endif
// A resident for short K (MoEGemmSm90PersistentTraits::A_RESIDENT): up to MOE_SM90_A_RESIDENT K tiles
// held (0: off), units of MOE_SM90_A_RESIDENT_CHUNK n-blocks. 6 (K <= 384; a 128x256 ring of 4 keeps
// 3 B stages) measured -2..-5% on the layer where it applies; 8 (K <= 512, 2 B stages) +2..+5%. Units of
// 8 n-blocks measured -0.4..-1.0% against 4 on the seed shapes at 1024-8192 tokens, 2 +1%, 16 +7% at
// 2048 (fewer units than programs): bench/NOTES.md v32, v34.
#ifndef MOE_SM90_A_RESIDENT
#define MOE_SM90_A_RESIDENT 6
#endif
#ifndef MOE_SM90_A_RESIDENT_CHUNK
#define MOE_SM90_A_RESIDENT_CHUNK 8
#endif
// Half tiles (MoEGemmSm90PersistentTraits::HALF): off by default, since on the layer they measured
// slower (long-K GEMM1 +7-17%; short-K GEMM2 -3-6%: NOTES v15). 1: on, for tiles with
// MIN..MAX K tiles (e.g. MOE_SM90_HALF_MAX_K_TILES=16: the short-K GEMM2 only).
#ifndef MOE_SM90_HALF_TILES
#define MOE_SM90_HALF_TILES 0
#endif
#ifndef MOE_SM90_HALF_MIN_K_TILES
#define MOE_SM90_HALF_MIN_K_TILES 0
#endif
#ifndef MOE_SM90_HALF_MAX_K_TILES
#define MOE_SM90_HALF_MAX_K_TILES 1000000
#endif

// The persistent GEMM2's fused combine (MoESm90Combine; bench/NOTES.md v27: 7-23% slower on the layer,
// and compiled in, 1% slower with it off): 1 compiles it into the A-resident walk, 0 (default) leaves
// that walk as it was and ignores the combine arguments.
#ifndef MOE_SM90_FUSED_COMBINE
#define MOE_SM90_FUSED_COMBINE 0
#endif
// The fused combine's 16-byte output vectors per consumer thread and pass (their k slots' loads in flight
// together).
#ifndef MOE_SM90_COMBINE_VECTORS
#define MOE_SM90_COMBINE_VECTORS 2
#endif
// The fused combine discards each partial row's 128-byte lines from L2 once summed, so the partial sums
// never go back to memory; 0 leaves them to be written back.
#ifndef MOE_SM90_COMBINE_DISCARD
#define MOE_SM90_COMBINE_DISCARD 1
#endif

// A diagnostic (bench/NOTES.md v39): 1 gives the swap-AB kernel one more argument, uint64_t* diag_times,
// 8 values per program (blockIdx.y * gridDim.x + blockIdx.x): the SM id, %clock64 at the kernel's entry,
// when consumer thread 0 issues its first wgmma, after its K loop, after its epilogue, and %globaltimer at
// entry and at the epilogue's end (programs without a tile write the first two and zeros). `bench
// --stages` prints the per-tile timeline from them. 0 (default): the kernels are as shipped.
#ifndef MOE_SM90_DIAG_TIMES
#define MOE_SM90_DIAG_TIMES 0
#endif

// The swap-AB kernel's GEMM2 (routing_ready) loads its first weight tiles before griddepcontrol.wait
// (bench/NOTES.md v18); 0 waits first, as every other kernel does.
#ifndef MOE_SM90_EARLY_WEIGHTS
#define MOE_SM90_EARLY_WEIGHTS 1
#endif

// Kernels whose blocks hold at most this many token rows (the decode swap-AB tiles) load their m-block's
// expert id beside *total_padded, not after it: one L2 round trip instead of two before the first weight
// tile (the 64 ids around it, which groups of more than one m-block need, still after). Measured -0.5..-1%
// at M = 8 but +0.2..+0.3% at dsv3 512 (32-token tiles): bench/NOTES.md v23. 0: never.
#ifndef MOE_SM90_SPECULATIVE_ROUTING
#define MOE_SM90_SPECULATIVE_ROUTING 16
#endif

// The swap-AB kernel's GEMM1 (whose routing is read after griddepcontrol.wait) issues its first weight
// tiles as soon as its barriers exist, before its row table is read (bench/NOTES.md v22, v23); 0 leaves
// them to the producer, after the row table.
#ifndef MOE_SM90_GEMM1_PRELOAD
#define MOE_SM90_GEMM1_PRELOAD 1
#endif

// GEMM2 on the swap-AB kernel waits for the GEMM1 programs of its own m-block (a counter per m-block) instead
// of all of GEMM1 (griddepcontrol.wait), where the host passes the counters (bench/NOTES.md v24); 0 ignores
// them: every GEMM2 program waits for the whole of GEMM1, as before.
#ifndef MOE_SM90_BLOCK_SYNC
#define MOE_SM90_BLOCK_SYNC 1
#endif
// How GEMM1 counts its stored rows for the block sync: 1, every consumer warp once (__syncwarp, then its
// lane 0's release); 0, the program once per consumer warp after a barrier of all its consumers (v24's
// form, which racecheck reported). The host's count per m-block (block_need) is the same for both.
#ifndef MOE_SM90_BLOCK_SYNC_PER_WARP
#define MOE_SM90_BLOCK_SYNC_PER_WARP 1
#endif

// The wide swap-AB tiles (TOKENS >= 80) multiply only as many token rows as the block holds, in steps of
// 16 down to TOKENS / 2 (bench/NOTES.md v19); 0 always multiplies all TOKENS. A plan turns it off per kernel
// with the template argument FIT_ROWS false (its config's FIT key 0; NOTES v42).
#ifndef MOE_SM90_FIT_WIDTH
#define MOE_SM90_FIT_WIDTH 1
#endif

// The swap-AB kernel with the activation fused and two m64 blocks of weight rows per consumer warpgroup
// (BLOCK_N_W 128 or 256): each warpgroup multiplies a gate block and its matching up block (block b at
// weight row 64 wg + b BLOCK_N_W / 2 of the tile), so a thread holds gate and up of the same output
// column and token and applies the activation in registers; the T results are staged by stmatrix
// (bench/NOTES.md v31). 0: the warpgroups own contiguous weight rows and the epilogue pairs gate and up
// through an fp32 staging of the whole tile.
#ifndef MOE_SM90_SWAP_PAIRED_ACT
#define MOE_SM90_SWAP_PAIRED_ACT 1
#endif
// Units (bench/NOTES.md v39, v40; Mixtral's 384 and 512 table entries): with U > 1 each program of the swap-AB GEMM1 with the paired
// activation (Tr::PAIRED) runs U consecutive n-blocks of one m-block (MoEGemmSm90SwapTraits::UNIT): the
// routing, the row table and the barriers once, the ring carried from tile to tile (the producer loads the
// next tile's stages under this tile's last K tiles and epilogue), each tile's output staged in the B parts
// of the stages its K loop ended on (one, or two past 120 rows), which are released after the epilogue. The host
// launches m-blocks x ceil(n-blocks / U) programs then (CUDAMoELayer.swapUnit). 1 (default): one tile each.
// A plan asks for units per kernel with the template argument UNIT_N (its config's UNIT key), which wins.
#ifndef MOE_SM90_SWAP_UNIT
#define MOE_SM90_SWAP_UNIT 1
#endif
// Activations computed together in that epilogue (a divisor of 4: every fitted width's W / 2 is a multiple);
// 1 and 4 compile to the same spill-free registers.
#ifndef MOE_SM90_PAIRED_ACT_GROUP
#define MOE_SM90_PAIRED_ACT_GROUP 4
#endif

// A diagnostic of the A-resident GEMM2 walk (bench/NOTES.md v32). Its results are WRONG: a bound for
// timing, never a kernel. Bit 0: the producer loads a unit's B tiles for its first n-block only and hands
// the later n-blocks' stages to the consumers without a copy (they multiply the weights still in the
// stage), so 3/4 of the B traffic is gone. Bit 1: the consumers stage their rows but store none.
// Bit 2, in every kernel's K loop outside that walk (moe_sm90_produce_k_tile: swap-AB, plain, persistent;
// not clusters): the weight tiles of odd K tiles are not loaded (stale), half the weight traffic after the
// preloaded first stages. Bit 3: the A-resident walk's consumers store every row into partial row
// pair % 512 (a 4 MB region at H = 4096 that stays in L2: the stores issue and reach L2, the DRAM never
// sees them).
// Bit 4: it stores row r of m-block q at partial row (q BLOCK_M + r) mod (M k): the rows in the sorted
// order, so a unit's stores are contiguous where the shipped ones are spread over the tokens.
// Bit 5: the persistent kernel's GEMM2 (routed weight; both walks) skips its whole epilogue (no weight
// product, no staging, no stores; the products stay live behind a branch never taken), so its time is
// the ring and the tensor work alone. Bit 6: the persistent kernel's walk outside the A-resident one
// stores no GEMM2 rows (staging kept), as bit 1 does in that walk. Bits 7 and 8, in the persistent
// GEMM2's K loop outside the A-resident walk: the rows (bit 7) or the weight tile (bit 8) of odd K tiles
// are not loaded (stale), half that operand's traffic.
// 0 (default): the kernels as shipped.
#ifndef MOE_SM90_DIAG_GEMM2
#define MOE_SM90_DIAG_GEMM2 0
#endif

// The persistent GEMM2's consumers load the next tile's sorted ids with its schedule, in the K loop's
// drain (mode 0): 1 on (default), 0 off (bench/NOTES.md v35).
#ifndef MOE_SM90_PAIR_PREFETCH
#define MOE_SM90_PAIR_PREFETCH 1
#endif

// MARK: - Pieces shared by the kernels

/// One consumer warpgroup's products of one K tile into acc (N / 2 fp32 per thread): fences acc,
/// wgmma.fence, K_STEPS wgmma.m64nNk16 from shared memory (step kk at descriptor + (32 kk >> 4)), one
/// commit, fences acc again. desc_a, desc_b: the tile's k = 0 step.
template <typename T, int N, int K_STEPS>
MOE_DEVICE void moe_sm90_mma_k_tile(float (&acc)[N / 2], uint64_t desc_a, uint64_t desc_b) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) wgmma_fence_operand(acc[i]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < K_STEPS; ++kk) wgmma_m64nNk16_ss<T, N>(acc, desc_a + ((kk * 32) >> 4), desc_b + ((kk * 32) >> 4), 1);
    wgmma_commit_group();
#pragma unroll
    for (int i = 0; i < N / 2; ++i) wgmma_fence_operand(acc[i]);
}

/// The same for BLOCKS m64 blocks of A rows (block b at BLOCK_STRIDE_BYTES b from desc_a0, 64 rows of 128
/// bytes apart by default, into acc[b]) against one B, from ring stage `stage` (A at desc_a0 + stage *
/// A_STAGE_BYTES, B likewise): K_STEPS x BLOCKS wgmma in one group (the swap-AB kernel's weight-row
/// blocks, the ping-pong warpgroup's halves).
template <typename T, int N, int K_STEPS, int BLOCKS, int A_STAGE_BYTES, int B_STAGE_BYTES,
          int BLOCK_STRIDE_BYTES = 64 * 128>
MOE_DEVICE void moe_sm90_mma_k_tile_blocks(float (&acc)[BLOCKS][N / 2], uint64_t desc_a0, uint64_t desc_b0, int stage) {
#pragma unroll
    for (int b = 0; b < BLOCKS; ++b)
#pragma unroll
        for (int i = 0; i < N / 2; ++i) wgmma_fence_operand(acc[b][i]);
    wgmma_fence();
    const uint64_t desc_a = desc_a0 + static_cast<uint64_t>((stage * A_STAGE_BYTES) >> 4);
    const uint64_t desc_b = desc_b0 + static_cast<uint64_t>((stage * B_STAGE_BYTES) >> 4);
#pragma unroll
    for (int kk = 0; kk < K_STEPS; ++kk)
#pragma unroll
        for (int b = 0; b < BLOCKS; ++b)
            wgmma_m64nNk16_ss<T, N>(acc[b], desc_a + (((b * BLOCK_STRIDE_BYTES) + kk * 16 * 2) >> 4),
                                    desc_b + ((kk * 16 * 2) >> 4), 1);
    wgmma_commit_group();
#pragma unroll
    for (int b = 0; b < BLOCKS; ++b)
#pragma unroll
        for (int i = 0; i < N / 2; ++i) wgmma_fence_operand(acc[b][i]);
}

/// The program's output tile and K range.
struct MoESm90Tile {
    int64_t row0;      // first row of the sorted order in this tile
    int64_t n0;        // first output column
    int64_t kt_begin;  // first K tile of this split
    int32_t expert;    // -1: not owned
    int num_tiles;     // K tiles to multiply (0 when the expert is -1 or the split range is empty)
    bool half;         // persistent kernel: rows [64, 128) are all padding (set there; false here)
    int32_t stream;    // stream-K: 0 the whole K range, 1 a piece before the tile's last (partials to
                       // the program's slot), 2 the tile's last piece (adds the others)
};

/// The group of m-blocks that holds m-block q (q < valid_blocks): the maximal run of m-blocks around q
/// with q's expert id e (align lays out each expert's blocks as one run), cut from the run's start into
/// groups of group_m; [first, first + count). Warp-cooperative: every lane of the warp calls it,
/// converged, with the same arguments. The 32 ids on each side of q are loaded together with e (one
/// round trip; expert_ids has num_blocks entries); longer runs take a step per 32 more. e_early: q's id
/// loaded by the caller before *total_padded (MOE_SM90_SPECULATIVE_ROUTING), or -2 (loaded here; align
/// writes ids >= -1 only).
MOE_DEVICE void moe_sm90_expert_group(const int32_t* expert_ids, int64_t q, int64_t valid_blocks, int64_t num_blocks,
                                      int64_t group_m, int32_t e_early, int32_t& e, int64_t& first, int64_t& count) {
    const int lane = static_cast<int>(threadIdx.x & 31);
    if (group_m <= 1) {  // single-block groups: no run to find
        e = e_early != -2 ? e_early : moe_load_routing(expert_ids + q);
        first = q;
        count = 1;
        return;
    }
    int64_t below = q - 1 - lane;
    int64_t above = q + 1 + lane;
    e = e_early != -2 ? e_early : moe_load_routing(expert_ids + q);
    int32_t id_below = below >= 0 ? moe_load_routing(expert_ids + below) : 0;
    int32_t id_above = above < num_blocks ? moe_load_routing(expert_ids + above) : 0;
    int64_t begin = q;  // the run is [begin, end)
    for (;;) {
        const uint32_t stop = __ballot_sync(MOE_FULL_MASK, below < 0 || id_below != e);
        if (stop != 0) {
            begin -= __ffs(stop) - 1;
            break;
        }
        begin -= 32;
        below -= 32;
        id_below = below >= 0 ? moe_load_routing(expert_ids + below) : 0;
    }
    int64_t end = q + 1;
    for (;;) {
        const uint32_t stop = __ballot_sync(MOE_FULL_MASK, above >= valid_blocks || id_above != e);
        if (stop != 0) {
            end += __ffs(stop) - 1;
            break;
        }
        end += 32;
        above += 32;
        id_above = above < num_blocks ? moe_load_routing(expert_ids + above) : 0;
    }
    first = begin + (q - begin) / group_m * group_m;
    count = min_i64(group_m, end - first);
}

/// The tile of linear tile index `pid` and split `split`, for programs that walk several tiles as for one
/// program per tile (pid = blockIdx.x). Expert-aligned grouped ordering: the m-blocks below
/// *total_padded / BLOCK_M form groups (moe_sm90_expert_group: an expert's run cut into groups of
/// group_size_m), group [first, first + count) owns the linear indices [first * num_pid_n,
/// (first + count) * num_pid_n), and inside a group pid_m varies fastest, then pid_n: the programs that
/// read one weight tile run together, and a group never mixes experts. False: no tile (pid at or past
/// the valid m-blocks' tiles, as is every later pid). Warp-cooperative (every lane calls it, converged).
template <int BLOCK_M, int BLOCK_N, int BLOCK_K>
MOE_DEVICE bool moe_sm90_tile_at(MoESm90Tile& tile, int64_t pid, int64_t split, const int32_t* expert_ids,
                                 const int32_t* total_padded, int64_t N, int64_t K, int32_t split_k,
                                 int32_t group_size_m, int64_t max_padded, int64_t num_valid_tokens) {
    const int64_t num_pid_n = ceil_div(N, BLOCK_N);
    const int64_t num_blocks = ceil_div(max_padded, BLOCK_M);
    const int64_t q = pid / num_pid_n;  // an m-block of pid's group
    // q's expert id beside *total_padded (read past the valid blocks too: expert_ids has num_blocks entries).
    constexpr bool speculate = BLOCK_M <= MOE_SM90_SPECULATIVE_ROUTING;
    const int32_t e_early = speculate && q < num_blocks ? moe_load_routing(expert_ids + q) : -2;
    const int64_t valid_blocks = min_i64(moe_total_padded(total_padded, num_valid_tokens, BLOCK_M) / BLOCK_M, num_blocks);
    if (q >= valid_blocks) return false;
    int64_t first, count;
    moe_sm90_expert_group(expert_ids, q, valid_blocks, num_blocks, group_size_m > 0 ? group_size_m : 1, e_early,
                          tile.expert, first, count);
    // Inside the group, n-blocks go in pairs (2c, 2c + 1): first the even part of its m-blocks
    // (count - count % 2) down column 2c then column 2c + 1, then an odd count's last m-block at 2c
    // and 2c + 1 (a lone last column takes its m-blocks in order). For even counts this is pid_m
    // fastest, then pid_n; it keeps consecutive tile pairs (2i, 2i + 1) on one n-block and two
    // m-blocks of one expert wherever the group can, which is what clusters share (moe_gemm_sm90).
    const int64_t local = pid - first * num_pid_n;
    const int64_t even = count & ~static_cast<int64_t>(1);
    const int64_t col_pair = local / (2 * count);
    const int64_t within = local - col_pair * 2 * count;
    int64_t pid_m, pid_n;  // pid_m in q's run: its expert is q's
    if (2 * col_pair + 1 >= num_pid_n) {  // a lone last column
        pid_m = first + within;
        pid_n = 2 * col_pair;
    } else if (within < 2 * even) {
        pid_m = first + within % even;
        pid_n = 2 * col_pair + within / even;
    } else {
        pid_m = first + count - 1;
        pid_n = 2 * col_pair + (within - 2 * even);
    }

    tile.row0 = pid_m * BLOCK_M;
    tile.n0 = pid_n * BLOCK_N;

    const int64_t k_tiles = ceil_div(K, BLOCK_K);
    const int64_t tiles_per_split = ceil_div(k_tiles, split_k > 0 ? split_k : 1);
    tile.kt_begin = split * tiles_per_split;
    const int64_t kt_end = min_i64(tile.kt_begin + tiles_per_split, k_tiles);
    tile.num_tiles = (tile.expert < 0 || tile.kt_begin >= kt_end) ? 0 : static_cast<int>(kt_end - tile.kt_begin);
    tile.half = false;
    tile.stream = 0;
    return true;
}

/// The stream-K walk of one grid (moe_gemm_sm90_persistent with STREAM_K; the kernel's notes): the
/// whole rounds of tiles round-robin, then the R = T mod G tiles of the partial wave cut into S equal
/// K pieces, split-major over programs 0 .. R S - 1.
struct MoESm90StreamK {
    int32_t k_tiles;  // K tiles of a whole tile
    int32_t rounds;   // whole rounds: floor(T / G)
    int32_t rem;      // R: the partial wave's tiles
    int32_t splits;   // S: K pieces per tile of the partial wave (1: none is cut)
};

// The most K pieces a tile of the partial wave is cut into: its last piece adds the others' partial
// sums one after another, so more pieces shorten the wave less than they cost.
#ifndef MOE_SM90_STREAM_K_MAX_SPLITS
#define MOE_SM90_STREAM_K_MAX_SPLITS 4
#endif

MOE_DEVICE MoESm90StreamK moe_sm90_stream_k(int64_t valid_tiles, int64_t k_tiles) {
    const int64_t programs = gridDim.x;
    MoESm90StreamK sk;
    sk.k_tiles = static_cast<int32_t>(k_tiles);
    sk.rounds = static_cast<int32_t>(valid_tiles / programs);
    sk.rem = static_cast<int32_t>(valid_tiles % programs);
    const int64_t fit = sk.rem > 0 ? programs / sk.rem : 1;
    const int64_t splits = min_i64(min_i64(fit, k_tiles), MOE_SM90_STREAM_K_MAX_SPLITS);
    sk.splits = static_cast<int32_t>(splits > 1 ? splits : 1);
    return sk;
}

/// Piece j of program b's stream-K walk (j = 0, 1, ...): tile moe_sm90_tile_at(t) with its K range
/// [kt_begin, kt_begin + num_tiles) and role (tile.stream). Round j < rounds: tile b + j G, whole.
/// Round `rounds`: program b < R S takes piece s = b / R of tile rounds G + b % R, K tiles
/// [s KT / S, (s + 1) KT / S); so the programs of one piece index run the same K range side by side,
/// and the m-blocks that share a weight tile stay in K step as in the whole rounds (equal K ranges
/// cut anywhere in the tiles lost that and measured 5-24% slower per GEMM: NOTES v17). False: the
/// walk has ended. Warp-cooperative like moe_sm90_tile_at.
template <int BLOCK_M, int BLOCK_N, int BLOCK_K>
MOE_DEVICE bool moe_sm90_stream_piece(MoESm90Tile& tile, const MoESm90StreamK& sk, int64_t j, int64_t b,
                                      const int32_t* expert_ids, const int32_t* total_padded, int64_t N, int64_t K,
                                      int32_t group_size_m, int64_t max_padded, int64_t num_valid_tokens) {
    int64_t t, kb, ke;
    int split = 0;
    if (j < sk.rounds) {
        t = b + j * static_cast<int64_t>(gridDim.x);
        kb = 0;
        ke = sk.k_tiles;
    } else {
        if (j > sk.rounds || b >= static_cast<int64_t>(sk.rem) * sk.splits) return false;
        split = static_cast<int>(b / sk.rem);
        t = static_cast<int64_t>(sk.rounds) * gridDim.x + b % sk.rem;
        kb = static_cast<int64_t>(split) * sk.k_tiles / sk.splits;
        ke = static_cast<int64_t>(split + 1) * sk.k_tiles / sk.splits;
    }
    if (!moe_sm90_tile_at<BLOCK_M, BLOCK_N, BLOCK_K>(tile, t, 0, expert_ids, total_padded, N, K, 1, group_size_m,
                                                     max_padded, num_valid_tokens))
        return false;
    tile.kt_begin = kb;
    tile.num_tiles = tile.expert < 0 ? 0 : static_cast<int>(ke - kb);
    tile.stream = j < sk.rounds || sk.splits == 1 ? 0 : split + 1 < sk.splits ? 1 : 2;
    return true;
}

/// This program's tile (blockIdx.x, split blockIdx.y). False: this program has no tile.
template <int BLOCK_M, int BLOCK_N, int BLOCK_K>
MOE_DEVICE bool moe_sm90_schedule(MoESm90Tile& tile, const int32_t* expert_ids, const int32_t* total_padded,
                                  int64_t N, int64_t K, int32_t split_k, int32_t group_size_m, int64_t max_padded,
                                  int64_t num_valid_tokens) {
    return moe_sm90_tile_at<BLOCK_M, BLOCK_N, BLOCK_K>(tile, blockIdx.x, blockIdx.y, expert_ids, total_padded, N, K,
                                                       split_k, group_size_m, max_padded, num_valid_tokens);
}

/// Shared memory of one program: a STAGES-deep ring of A tiles [A_ROWS][64] and B tiles [B_ROWS][64]
/// (128-byte rows, 128-byte swizzle), the full/empty mbarriers, and the per-row tables.
template <int A_ROWS, int B_ROWS, int STAGES>
struct MoESm90Smem {
    static constexpr int BLOCK_K = 64;             // one 128-byte swizzled row of 16-bit elements
    static constexpr int ROW_BYTES = BLOCK_K * 2;  // 128
    static constexpr int A_STAGE_BYTES = A_ROWS * ROW_BYTES;
    static constexpr int B_STAGE_BYTES = B_ROWS * ROW_BYTES;
    static constexpr int RING_BYTES = STAGES * (A_STAGE_BYTES + B_STAGE_BYTES);
    static constexpr int BARRIER_BYTES = 2 * 8 * STAGES;     // full[STAGES], empty[STAGES]
    static constexpr int ROW_TABLE_BYTES = 2 * 4 * A_ROWS;  // A row and pair index per tile row
    static constexpr int SMEM_BYTES = RING_BYTES + BARRIER_BYTES + ROW_TABLE_BYTES;
    static constexpr int ALIGN = 1024;  // 128-byte swizzle atoms: 8 rows x 128 bytes
    static constexpr int DYNAMIC_SMEM_BYTES = SMEM_BYTES + ALIGN;  // what the host passes
    static_assert(A_STAGE_BYTES % ALIGN == 0 && B_STAGE_BYTES % ALIGN == 0, "stages stay 1024-byte aligned");
    static_assert(DYNAMIC_SMEM_BYTES <= 232448, "more than 227 KB of shared memory per block");

    uint32_t a;             // shared address of A stage 0 (stage s at a + s * A_STAGE_BYTES)
    uint32_t b;             // B stage 0
    uint32_t full;          // full[s] at full + 8 s
    uint32_t empty;         // empty[s] at empty + 8 s
    unsigned char* base;    // generic address of the aligned base (the ring; output staging)
    int32_t* a_row;         // [A_ROWS] p / top_k, or -1 for padding
    int32_t* pair;          // [A_ROWS] p, or -1 for padding

    MOE_DEVICE explicit MoESm90Smem(unsigned char* dynamic_smem) {
        const uint32_t raw = cvta_to_shared_u32(dynamic_smem);
        const uint32_t aligned = (raw + ALIGN - 1) & ~static_cast<uint32_t>(ALIGN - 1);
        base = dynamic_smem + (aligned - raw);
        a = aligned;
        b = a + STAGES * A_STAGE_BYTES;
        full = aligned + RING_BYTES;
        empty = full + 8 * STAGES;
        a_row = reinterpret_cast<int32_t*>(base + RING_BYTES + BARRIER_BYTES);
        pair = a_row + A_ROWS;
    }
};

/// Barrier init and the row tables, then __syncthreads. full[s] expects one cp.async noinc arrival
/// per producer thread plus thread 0's arrive.expect_tx (with the B tile's bytes); empty[s] expects
/// lane 0 of every consumer warp of `consumer_ctas` CTAs (2: a cluster pair sharing the B tiles, whose
/// consumers release the stage in both CTAs).
struct MoESm90NoPreload {
    MOE_DEVICE void operator()() const {}
};

template <int A_ROWS, int B_ROWS, int STAGES, int THREADS, int PRODUCER_THREADS, int CONSUMER_WARPS,
          typename Preload = MoESm90NoPreload>
MOE_DEVICE void moe_sm90_setup(const MoESm90Smem<A_ROWS, B_ROWS, STAGES>& sm, const MoESm90Tile& tile,
                               const CUtensorMap* b_map, const int32_t* sorted_token_ids, int64_t num_valid_tokens,
                               int32_t top_k, int consumer_ctas = 1, Preload&& preload = Preload{}) {
    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbarrier_init(sm.full + 8 * s, PRODUCER_THREADS + 1);
            mbarrier_init(sm.empty + 8 * s, CONSUMER_WARPS * consumer_ctas);
        }
        fence_mbarrier_init();
        if (tile.num_tiles > 0) prefetch_tensormap(b_map);
        preload();  // thread 0 may issue weight tiles on the barriers it just made, before the row table
    }
    for (int r = tid; r < A_ROWS; r += THREADS) {
        const int32_t p = moe_sorted_pair(sorted_token_ids, tile.row0 + r, A_ROWS, num_valid_tokens);
        const bool valid = p >= 0 && p < num_valid_tokens;
        sm.pair[r] = valid ? p : -1;
        sm.a_row[r] = valid ? p / top_k : -1;
    }
    __syncthreads();
}

/// Where one producer thread's A chunks come from, for one tile: the thread copies 16-byte chunk
/// tid % 8 of tile rows tid / 8 + 16 i (i < PASSES); src[i] is that chunk's address in K tile 0
/// (A + a_row * stride_am + 8 * (tid % 8)), or A for a padding row (bit i of `valid` clear). Made
/// once per tile from the row table (moe_sm90_a_sources), so the K loop reads no shared memory and
/// redoes no row arithmetic: the producer's issue rate bounds the ring (NOTES v13).
template <typename T, int A_ROWS>
struct MoESm90ASources {
    static constexpr int CHUNKS_PER_ROW = 8;  // 16-byte chunks of a 128-byte (64-element) row
    static constexpr int ROWS_PER_PASS = 128 / CHUNKS_PER_ROW;  // 16
    static constexpr int PASSES = (A_ROWS + ROWS_PER_PASS - 1) / ROWS_PER_PASS;
    const T* src[PASSES];
    uint32_t valid;
};

/// This producer thread's A sources for the tile whose row table (source row per tile row, -1 for
/// padding) is a_rows. Reads shared memory: call after the table is written and synchronized.
template <typename T, int A_ROWS>
MOE_DEVICE MoESm90ASources<T, A_ROWS> moe_sm90_a_sources(const int32_t* a_rows, const T* A, int64_t stride_am,
                                                         int tid) {
    using Src = MoESm90ASources<T, A_ROWS>;
    Src out;
    out.valid = 0;
    const int chunk = tid % Src::CHUNKS_PER_ROW;
    const int pass_row = tid / Src::CHUNKS_PER_ROW;
#pragma unroll
    for (int i = 0; i < Src::PASSES; ++i) {
        const int r = pass_row + i * Src::ROWS_PER_PASS;
        const int32_t a_row = (A_ROWS % Src::ROWS_PER_PASS == 0 || r < A_ROWS) ? a_rows[r] : -1;
        out.src[i] = a_row >= 0 ? A + static_cast<int64_t>(a_row) * stride_am + chunk * 8 : A;
        out.valid |= a_row >= 0 ? 1u << i : 0u;
    }
    return out;
}

/// This producer thread's share of A's K tile kt (16-byte chunk tid % 8 of tile rows tid / 8 + 16 i,
/// from its sources `a`) copied by cp.async into the swizzled [A_ROWS][128 bytes] tile at a_tile,
/// zero-filled for padding rows and the K tail.
template <typename T, int A_ROWS>
MOE_DEVICE void moe_sm90_copy_a(uint32_t a_tile, const MoESm90ASources<T, A_ROWS>& a, const T* A, int64_t K,
                                int64_t kt, int tid) {
    using Src = MoESm90ASources<T, A_ROWS>;
    constexpr int CHUNKS_PER_ROW = Src::CHUNKS_PER_ROW;
    constexpr int ROWS_PER_PASS = Src::ROWS_PER_PASS;
    constexpr int ROW_BYTES = CHUNKS_PER_ROW * 16;
    const int chunk = tid % CHUNKS_PER_ROW;
    const int pass_row = tid / CHUNKS_PER_ROW;  // rows pass_row + 16 i all have r % 8 == pass_row % 8
    const uint32_t a_dst = a_tile + pass_row * ROW_BYTES + ((chunk ^ (pass_row & 7)) << 4);
    const int64_t k0 = kt * 64;
    const bool k_ok = k0 + chunk * 8 < K;  // K % 8 == 0: a chunk is all in or all out
#pragma unroll
    for (int i = 0; i < Src::PASSES; ++i) {
        const int r = pass_row + i * ROWS_PER_PASS;
        if (A_ROWS % ROWS_PER_PASS == 0 || r < A_ROWS) {
            const bool ok = k_ok && ((a.valid >> i) & 1u) != 0;
            cp_async_cg_16(a_dst + i * ROWS_PER_PASS * ROW_BYTES, ok ? a.src[i] + k0 : A, ok);
        }
    }
}

/// Thread 0's part of loading a K tile: arms full[stage] with the B tile's bytes and issues the TMA
/// copy of K tile kt's B box (box {kt*64, b_row}); SPLIT_B: two boxes of B_ROWS / 2 rows, from b_row
/// into the stage's first half and from b_row_up into its second; mc_rank 0 or 1: only half mc_rank,
/// multicast into the same stage of both CTAs of the cluster pair.
template <int A_ROWS, int B_ROWS, int STAGES, bool SPLIT_B>
MOE_DEVICE void moe_sm90_issue_b(const MoESm90Smem<A_ROWS, B_ROWS, STAGES>& sm, const CUtensorMap* b_map, int stage,
                                 int64_t kt, int32_t b_row, int32_t b_row_up, int mc_rank) {
    using Sm = MoESm90Smem<A_ROWS, B_ROWS, STAGES>;
    const uint32_t full = sm.full + 8 * stage;
    mbarrier_arrive_expect_tx(full, Sm::B_STAGE_BYTES);
    const uint32_t b_dst = sm.b + stage * Sm::B_STAGE_BYTES;
    const int32_t kx = static_cast<int32_t>(kt * Sm::BLOCK_K);
    if (!SPLIT_B || mc_rank < 0) {
        tma_load_2d(b_dst, b_map, kx, b_row, full);
        if constexpr (SPLIT_B) tma_load_2d(b_dst + Sm::B_STAGE_BYTES / 2, b_map, kx, b_row_up, full);
    } else {
        tma_load_2d_multicast(b_dst + mc_rank * (Sm::B_STAGE_BYTES / 2), b_map, kx, mc_rank ? b_row_up : b_row, full,
                              0x3);
    }
}

/// K tile t of `tile`'s split range (kt = tile.kt_begin + t), loaded by the producer warpgroup (all 128
/// threads) into ring stage `stage` of round parity `phase`: wait for the stage to be empty (the
/// consumers released its previous round; a fresh barrier passes parity 1 at once); thread 0 arms
/// full[stage] with the B tile's bytes and issues its TMA copy (box {kt*64, b_row}); every thread copies
/// 16-byte chunk tid % 8 of A rows tid / 8 + 16 i (from its sources `a`) into the swizzled stage
/// (zero-filled for padding rows and the K tail), then arrives on full[stage] when its copies land
/// (cp.async noinc). SPLIT_B (fused GEMM1 activation, or a cluster): the B tile is two
/// boxes of B_ROWS / 2 rows, rows from b_row into the stage's first half and rows from b_row_up into
/// its second half (the tensor map's box has B_ROWS / 2 rows then). mc_rank 0 or 1 (a cluster pair
/// sharing the tile): this CTA copies only half mc_rank, into the same stage of both CTAs (multicast),
/// and the other CTA copies the other half; full[stage] in each still expects the whole tile's bytes.
template <typename T, int A_ROWS, int B_ROWS, int STAGES, bool SPLIT_B = false>
MOE_DEVICE void moe_sm90_produce_k_tile(const MoESm90Smem<A_ROWS, B_ROWS, STAGES>& sm,
                                        const MoESm90ASources<T, A_ROWS>& a, const CUtensorMap* b_map, const T* A,
                                        int64_t K, int32_t b_row, int32_t b_row_up, const MoESm90Tile& tile, int t,
                                        int stage, uint32_t phase, int tid, int mc_rank = -1, bool issue_b = true,
                                        int diag_gemm2 = 0) {
    using Sm = MoESm90Smem<A_ROWS, B_ROWS, STAGES>;
    static_assert(MoESm90ASources<T, A_ROWS>::CHUNKS_PER_ROW * 16 == Sm::ROW_BYTES, "8 chunks of 16 bytes per row");
    mbarrier_wait_parity(sm.empty + 8 * stage, phase ^ 1);  // the first round passes at once
    const uint32_t full = sm.full + 8 * stage;
    const int64_t kt = tile.kt_begin + t;
    if (tid == 0 && issue_b) {
        if ((((MOE_SM90_DIAG_GEMM2 & 4) != 0 && mc_rank < 0) || (diag_gemm2 & 256) != 0) && (kt & 1) != 0) {
            mbarrier_arrive(full);  // diagnostic bits 2 and 8: stale weights for odd K tiles
        } else {
            moe_sm90_issue_b<A_ROWS, B_ROWS, STAGES, SPLIT_B>(sm, b_map, stage, kt, b_row, b_row_up, mc_rank);
        }
    }
    if ((diag_gemm2 & 128) != 0 && (kt & 1) != 0) {
        mbarrier_arrive(full);  // diagnostic bit 7: stale rows for odd K tiles
        return;
    }
    moe_sm90_copy_a<T, A_ROWS>(sm.a + stage * Sm::A_STAGE_BYTES, a, A, K, kt, tid);
    cp_async_mbarrier_arrive_noinc(full);  // arrives once this thread's copies have landed
}

/// The producer warpgroup's loop over one tile's K tiles (all 128 threads), ring from stage 0; the B
/// tiles of the first b_preloaded K tiles (at most STAGES) were issued already (moe_sm90_preload_b).
/// mc_rank >= 0 (sharing B tiles with the cluster peer): then waits until both CTAs' consumers have
/// released the last STAGES stages (they release every stage then), so this CTA stays resident until
/// every copy it multicast has landed in the peer and every arrival of the peer's consumers on its
/// barriers has happened.
template <typename T, int A_ROWS, int B_ROWS, int STAGES, bool SPLIT_B>
MOE_DEVICE void moe_sm90_produce(const MoESm90Smem<A_ROWS, B_ROWS, STAGES>& sm, const MoESm90Tile& tile,
                                 const CUtensorMap* b_map, const T* A, int64_t stride_am, int64_t K, int32_t b_row,
                                 int32_t b_row_up, int tid, int mc_rank = -1, int b_preloaded = 0) {
    int stage = 0;
    uint32_t phase = 0;
    const MoESm90ASources<T, A_ROWS> a = moe_sm90_a_sources<T, A_ROWS>(sm.a_row, A, stride_am, tid);
    for (int t = 0; t < tile.num_tiles; ++t) {
        moe_sm90_produce_k_tile<T, A_ROWS, B_ROWS, STAGES, SPLIT_B>(sm, a, b_map, A, K, b_row, b_row_up, tile, t,
                                                                    stage, phase, tid, mc_rank, t >= b_preloaded);
        if (++stage == STAGES) {
            stage = 0;
            phase ^= 1;
        }
    }
    cp_async_wait_all();
    if (SPLIT_B && mc_rank >= 0) {
        // The releases of K tiles num_tiles - STAGES .. num_tiles - 1 (earlier rounds pass at once).
        for (int i = 0; i < STAGES; ++i) {
            mbarrier_wait_parity(sm.empty + 8 * stage, phase ^ 1);
            if (++stage == STAGES) {
                stage = 0;
                phase ^= 1;
            }
        }
    }
}

/// Thread 0 only: arms full[t] of the ring's first round with the B tile's bytes and issues the TMA
/// copies of the B tiles of `tile`'s first `count` K tiles (count <= STAGES) into stages 0 .. count - 1,
/// as moe_sm90_produce_k_tile does (SPLIT_B: two boxes); moe_sm90_produce then skips their B part
/// (b_preloaded = count). The weights are never written by the forward, so this may run before
/// griddepcontrol.wait, while the previous kernel drains.
template <int A_ROWS, int B_ROWS, int STAGES, bool SPLIT_B>
MOE_DEVICE void moe_sm90_preload_b(const MoESm90Smem<A_ROWS, B_ROWS, STAGES>& sm, const MoESm90Tile& tile,
                                   const CUtensorMap* b_map, int32_t b_row, int32_t b_row_up, int count) {
    for (int t = 0; t < count; ++t)
        moe_sm90_issue_b<A_ROWS, B_ROWS, STAGES, SPLIT_B>(sm, b_map, t, tile.kt_begin + t, b_row, b_row_up, -1);
}

/// The weight rows of `tile`'s B box in the [E*N, K] view: unfused, rows e*N + n0 on; with FUSED
/// (GEMM1 with its activation, N = 2I) the tile's BLOCK_N rows are BLOCK_N / 2 gate rows from
/// e*N + n0/2 and the matching up rows from e*N + N/2 + n0/2, for output columns n0/2 on.
template <bool FUSED>
MOE_DEVICE void moe_sm90_b_rows(const MoESm90Tile& tile, int64_t N, int32_t& b_row, int32_t& b_row_up) {
    const int64_t expert_row = static_cast<int64_t>(tile.expert) * N;
    b_row = static_cast<int32_t>(expert_row + (FUSED ? tile.n0 / 2 : tile.n0));
    b_row_up = static_cast<int32_t>(expert_row + N / 2 + tile.n0 / 2);
}

/// A consumer warpgroup's K loop. Per K tile: wait for full[s]; fence the async proxy (A arrived by
/// cp.async, a generic-proxy write; wgmma reads through the async proxy); issue(s) issues and commits
/// the stage's wgmma group; wait until only that group is pending, then release the previous stage
/// (REMOTE: in the cluster peer too, at its empty barriers' shared::cluster address peer_empty,
/// unless that is 0; then the last stage is released too, for the producers' final wait). Ends
/// with every group complete.
template <int STAGES, bool REMOTE = false, typename Issue>
MOE_DEVICE void moe_sm90_consume(uint32_t full, uint32_t empty, int num_tiles, int lane, Issue&& issue,
                                 uint32_t peer_empty = 0) {
    int stage = 0;
    uint32_t phase = 0;
    int prev_stage = 0;
    for (int t = 0; t < num_tiles; ++t) {
        mbarrier_wait_parity(full + 8 * stage, phase);
        fence_proxy_async_shared_cta();
        issue(stage);
        wgmma_wait_group<1>();  // the previous tile's products are done: its stage may be refilled
        if (t > 0 && lane == 0) {
            mbarrier_arrive(empty + 8 * prev_stage);
            if (REMOTE && peer_empty != 0) mbarrier_arrive_cluster(peer_empty + 8 * prev_stage);
        }
        prev_stage = stage;
        if (++stage == STAGES) {
            stage = 0;
            phase ^= 1;
        }
    }
    wgmma_wait_group<0>();
    if (REMOTE && peer_empty != 0 && num_tiles > 0 && lane == 0) {
        mbarrier_arrive(empty + 8 * prev_stage);
        mbarrier_arrive_cluster(peer_empty + 8 * prev_stage);
    }
}

/// One consumer warpgroup's K loop over one tile, on a ring position (stage, phase) that carries over
/// from tile to tile. Per K tile: wait for full[stage]; fence the async proxy; issue(stage) issues and
/// commits the stage's wgmma group; wait until only that group is pending, then release the previous
/// stage. Then drain() runs while the last group may still be in flight (work that does not touch the
/// accumulators: the next tile's schedule, whose global loads then overlap the tensor cores). Ends
/// with every group complete and every stage it consumed released (the last one too: the producer
/// refills it for a later tile), and returns the last stage's index. HOLD 1 or 2 (the swap-AB kernel's
/// units): the last HOLD stages (as far as the tile has K tiles) stay held; the caller stages its output
/// there and releases them after. num_tiles == 0: touches no barrier (drain still runs) and returns the
/// entry stage.
template <int STAGES, int HOLD = 0, typename Issue, typename Drain>
MOE_DEVICE int moe_sm90_consume_tile(uint32_t full, uint32_t empty, int num_tiles, int lane, int& stage,
                                     uint32_t& phase, Issue&& issue, Drain&& drain) {
    static_assert(HOLD >= 0 && HOLD <= 2 && HOLD < STAGES, "HOLD in 0..2, below STAGES");
    int prev_stage = stage;
    for (int t = 0; t < num_tiles; ++t) {
        mbarrier_wait_parity(full + 8 * stage, phase);
        fence_proxy_async_shared_cta();
        issue(stage);
        wgmma_wait_group<1>();  // the previous K tile's products are done: its stage may be refilled
        if (t > 0 && (HOLD < 2 || t + 1 < num_tiles) && lane == 0) mbarrier_arrive(empty + 8 * prev_stage);
        prev_stage = stage;
        if (++stage == STAGES) {
            stage = 0;
            phase ^= 1;
        }
    }
    drain();
    wgmma_wait_group<0>();
    if (HOLD == 0 && num_tiles > 0 && lane == 0) mbarrier_arrive(empty + 8 * prev_stage);
    return prev_stage;  // with HOLD still held, and with HOLD 2 the stage before it too
}

/// What the three wgmma kernels' traits share: the ring (MoESm90Smem of A_ROWS x B_ROWS tiles, K tiles of
/// 64 in K_STEPS wgmma k16 steps), one producer warpgroup and CONSUMER_WGS consumer warpgroups, and with
/// two of them the register split (setmaxnreg): 384 threads launched at 168 registers each, the producer
/// down to 56, the consumers up to 224.
template <int A_ROWS, int B_ROWS, int STAGES, int CONSUMER_WGS>
struct MoESm90Roles {
    using Smem = MoESm90Smem<A_ROWS, B_ROWS, STAGES>;
    static constexpr int BLOCK_K = Smem::BLOCK_K;
    static constexpr int WGMMA_K = 16;
    static constexpr int K_STEPS = BLOCK_K / WGMMA_K;  // wgmma per K tile
    static constexpr int WARPGROUP_THREADS = 128;
    static constexpr int CONSUMER_WARPGROUPS = CONSUMER_WGS;
    static constexpr int PRODUCER_THREADS = WARPGROUP_THREADS;
    static constexpr int CONSUMER_THREADS = CONSUMER_WARPGROUPS * WARPGROUP_THREADS;
    static constexpr int THREADS = PRODUCER_THREADS + CONSUMER_THREADS;

    static constexpr bool REBALANCE_REGISTERS = CONSUMER_WARPGROUPS == 2;
    static constexpr int LAUNCH_REGISTERS = 168;
    static constexpr int PRODUCER_REGISTERS = 56;
    static constexpr int CONSUMER_REGISTERS = 224;

    static_assert(CONSUMER_WGS == 1 || CONSUMER_WGS == 2, "one or two consumer warpgroups");
    static_assert(!REBALANCE_REGISTERS || PRODUCER_THREADS * PRODUCER_REGISTERS +
                                                  CONSUMER_THREADS * CONSUMER_REGISTERS <=
                                              THREADS * LAUNCH_REGISTERS,
                  "setmaxnreg budget exceeds the registers allocated at launch");
};

// MARK: - moe_gemm_sm90

template <typename T, int BLOCK_M, int BLOCK_N, int STAGES, int SPLIT_MODE, bool MUL_ROUTED_WEIGHT, int FUSED_ACT,
          int CLUSTER = 1>
struct MoEGemmSm90Traits : MoESm90Roles<BLOCK_M, BLOCK_N, STAGES, BLOCK_M / 64> {
    using Smem = typename MoESm90Roles<BLOCK_M, BLOCK_N, STAGES, BLOCK_M / 64>::Smem;
    static constexpr int ACC = BLOCK_N / 2;  // fp32 accumulators per consumer thread
    static constexpr int SMEM_BYTES = Smem::SMEM_BYTES;
    static constexpr int DYNAMIC_SMEM_BYTES = Smem::DYNAMIC_SMEM_BYTES;

    // Output staging: the tile in the type that goes to global memory (with FUSED_ACT, the
    // BLOCK_N / 2 activated columns).
    static constexpr bool FUSED = FUSED_ACT != 0;
    static constexpr int OUT_COLS = FUSED ? BLOCK_N / 2 : BLOCK_N;
    static constexpr bool OUT_T = SPLIT_MODE == 0 || SPLIT_MODE == 3;  // rows of T (else fp32)
    static constexpr int OUT_BYTES = OUT_T ? 2 : 4;
    static constexpr int OUT_PITCH = OUT_COLS + 8;  // elements; keeps fragment writes conflict-free
    static constexpr int OUT_VEC = 16 / OUT_BYTES;  // elements per 16-byte store
    static constexpr int OUT_CHUNKS_PER_ROW = OUT_COLS / OUT_VEC;

    static_assert(sizeof(T) == 2, "T must be moe_bf16 or moe_fp16");
    static_assert(BLOCK_M == 64 || BLOCK_M == 128, "BLOCK_M in {64, 128}");
    static_assert(BLOCK_N == 64 || BLOCK_N == 128 || BLOCK_N == 256, "BLOCK_N in {64, 128, 256}");
    static_assert(STAGES >= 2 && STAGES <= 8, "STAGES in 2..8");
    static_assert(SPLIT_MODE >= 0 && SPLIT_MODE <= 3, "SPLIT_MODE in {0,1,2,3}");
    static_assert(SPLIT_MODE != 3 || (MUL_ROUTED_WEIGHT && FUSED_ACT == 0),
                  "SPLIT_MODE 3 (the top-k sum by 16-bit reductions): GEMM2");
    static_assert(BLOCK_M * OUT_PITCH * OUT_BYTES <= Smem::RING_BYTES, "the staged output tile must fit in the ring");
    static_assert(FUSED_ACT >= 0 && FUSED_ACT <= 2, "FUSED_ACT in {0 none, 1 silu, 2 gelu}");
    static_assert(!FUSED || (SPLIT_MODE == 0 && !MUL_ROUTED_WEIGHT), "FUSED_ACT: GEMM1, SPLIT_MODE 0");
    static_assert(CLUSTER == 1 || CLUSTER == 2, "CLUSTER in {1, 2}");
    // The B tile comes as two boxes of BLOCK_N / 2 rows: gate and up rows (FUSED), or the two halves
    // a cluster pair splits between its CTAs.
    static constexpr bool SPLIT_B = FUSED || CLUSTER == 2;
};

template <typename T, int BLOCK_M, int BLOCK_N, int STAGES, int SPLIT_MODE, bool MUL_ROUTED_WEIGHT, int FUSED_ACT,
          int CLUSTER>
__global__ void __launch_bounds__(128 * (1 + BLOCK_M / 64), 1)
    moe_gemm_sm90(const __grid_constant__ CUtensorMap b_map, const T* __restrict__ A, void* __restrict__ C,
                  const float* __restrict__ topk_weights, const int32_t* __restrict__ sorted_token_ids,
                  const int32_t* __restrict__ expert_ids, const int32_t* __restrict__ total_padded, int64_t N,
                  int64_t K, int64_t num_valid_tokens, int32_t top_k, int32_t split_k, int32_t group_size_m,
                  int64_t stride_am, int64_t stride_cm, int64_t max_padded, int32_t combine_k) {
    griddepcontrol_wait_then_launch_dependents();
    using Tr = MoEGemmSm90Traits<T, BLOCK_M, BLOCK_N, STAGES, SPLIT_MODE, MUL_ROUTED_WEIGHT, FUSED_ACT, CLUSTER>;
    using Smem = typename Tr::Smem;

    extern __shared__ __align__(16) unsigned char moe_gemm_sm90_smem[];

    MoESm90Tile tile;
    if (!moe_sm90_schedule<BLOCK_M, BLOCK_N, Tr::BLOCK_K>(tile, expert_ids, total_padded, N, K, split_k,
                                                          group_size_m, max_padded, num_valid_tokens))
        return;
    if (SPLIT_MODE == 1 && tile.num_tiles == 0) return;  // adding zeros changes nothing

    // CLUSTER 2: programs 2c and 2c + 1 form a cluster. When both tiles have K work on the same
    // expert, n-block and K range (two m-blocks of one expert: the tile order pairs them wherever it
    // can), they share the B tiles: each copies half of every K tile into both CTAs (multicast) and
    // its consumers release each stage in both. Otherwise each loads its own, as with CLUSTER 1.
    // Both programs reach the same decision from the same inputs.
    int mc_rank = -1;  // 0 or 1: this CTA's half of the shared B tiles
    if constexpr (CLUSTER == 2) {
        MoESm90Tile peer;
        if (tile.num_tiles > 0 && cluster_nctarank() == 2 &&
            moe_sm90_tile_at<BLOCK_M, BLOCK_N, Tr::BLOCK_K>(peer, blockIdx.x ^ 1, blockIdx.y, expert_ids,
                                                            total_padded, N, K, split_k, group_size_m, max_padded,
                                                            num_valid_tokens) &&
            peer.expert == tile.expert && peer.n0 == tile.n0 && peer.kt_begin == tile.kt_begin &&
            peer.num_tiles == tile.num_tiles)
            mc_rank = static_cast<int>(cluster_ctarank());
    }
    const bool shared_b = CLUSTER == 2 && mc_rank >= 0;

    const Smem sm(moe_gemm_sm90_smem);
    moe_sm90_setup<BLOCK_M, BLOCK_N, STAGES, Tr::THREADS, Tr::PRODUCER_THREADS, Tr::CONSUMER_THREADS / 32>(
        sm, tile, &b_map, sorted_token_ids, num_valid_tokens, top_k, shared_b ? 2 : 1);
    // Both CTAs' barriers are initialized (and published: fence_mbarrier_init) before either copies
    // into the other or arrives on its barriers.
    if (shared_b) {
        cluster_arrive_relaxed();
        cluster_wait();
    }

    const int tid = threadIdx.x;
    if (tid < Tr::PRODUCER_THREADS) {
        // ===== Producer warpgroup =====
        if constexpr (Tr::REBALANCE_REGISTERS) setmaxnreg_dec<Tr::PRODUCER_REGISTERS>();
        if (tile.num_tiles > 0) {
            int32_t b_row, b_row_up;
            moe_sm90_b_rows<Tr::FUSED>(tile, N, b_row, b_row_up);
            if (!Tr::FUSED && CLUSTER == 2) b_row_up = b_row + BLOCK_N / 2;  // the tile's second half
            moe_sm90_produce<T, BLOCK_M, BLOCK_N, STAGES, Tr::SPLIT_B>(sm, tile, &b_map, A, stride_am, K, b_row,
                                                                       b_row_up, tid, mc_rank);
        }
    } else {
        // ===== Consumer warpgroups =====
        if constexpr (Tr::REBALANCE_REGISTERS) setmaxnreg_inc<Tr::CONSUMER_REGISTERS>();
        const int ctid = tid - Tr::PRODUCER_THREADS;
        const int wg = ctid / Tr::WARPGROUP_THREADS;  // owns tile rows [64 wg, 64 wg + 64)
        const int wg_tid = ctid % Tr::WARPGROUP_THREADS;
        const int lane = tid % 32;

        float acc[Tr::ACC];
#pragma unroll
        for (int i = 0; i < Tr::ACC; ++i) acc[i] = 0.0f;

        // Descriptors of stage 0, k step 0; stage s and step kk add (s * STAGE_BYTES + 32 kk) >> 4.
        const uint64_t desc_a0 = wgmma_desc_k_major_sw128(sm.a + wg * 64 * Smem::ROW_BYTES);
        const uint64_t desc_b0 = wgmma_desc_k_major_sw128(sm.b);
        // A block's padding rows come last: when this warpgroup's first row is padding, all 64 are,
        // and it skips its products (uniform over the warpgroup), still keeping the ring's protocol.
        // (Two loops, not a branch inside one: ptxas serializes wgmma behind a divergent-path guard.)
        const auto issue = [&](int stage, auto live) {
            if constexpr (decltype(live)::value)
                moe_sm90_mma_k_tile<T, BLOCK_N, Tr::K_STEPS>(
                    acc, desc_a0 + static_cast<uint64_t>((stage * Smem::A_STAGE_BYTES) >> 4),
                    desc_b0 + static_cast<uint64_t>((stage * Smem::B_STAGE_BYTES) >> 4));
        };
        const uint32_t peer_empty = shared_b ? mapa_shared_cluster(sm.empty, static_cast<uint32_t>(mc_rank ^ 1)) : 0;
        if (sm.pair[wg * 64] >= 0) {
            moe_sm90_consume<STAGES, CLUSTER == 2>(
                sm.full, sm.empty, tile.num_tiles, lane, [&](int stage) { issue(stage, moe_bool_constant<true>()); },
                peer_empty);
        } else {
            moe_sm90_consume<STAGES, CLUSTER == 2>(
                sm.full, sm.empty, tile.num_tiles, lane, [&](int stage) { issue(stage, moe_bool_constant<false>()); },
                peer_empty);
        }

#pragma unroll
        for (int i = 0; i < Tr::ACC; ++i) wgmma_fence_operand(acc[i]);

        // --- Epilogue ---
        // acc[4 j + 2 h + c] is tile row frag_row + 8 h, column 8 j + 2 (lane % 4) + c.
        const int frag_row = wg * 64 + (wg_tid / 32) * 16 + lane / 4;
        const int frag_col = (lane % 4) * 2;
        if constexpr (MUL_ROUTED_WEIGHT) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int32_t p = sm.pair[frag_row + 8 * h];
                const float w = p >= 0 ? topk_weights[p] : 0.0f;
#pragma unroll
                for (int j = 0; j < BLOCK_N / 8; ++j) {
                    acc[4 * j + 2 * h] *= w;
                    acc[4 * j + 2 * h + 1] *= w;
                }
            }
        }
        // FUSED_ACT: columns c < BLOCK_N / 2 are gate, c + BLOCK_N / 2 the matching up (the same
        // thread's acc[i + 2 BLOCK_N / 8 ... ]); act(gate) * up goes into the first half in place.
        if constexpr (Tr::FUSED) {
#pragma unroll
            for (int i = 0; i < Tr::ACC / 2; ++i) acc[i] = moe_act_and_mul<T, FUSED_ACT>(acc[i], acc[i + Tr::ACC / 2]);
        }
        constexpr int OUT_COLS = Tr::OUT_COLS;
        const int64_t out_n0 = Tr::FUSED ? tile.n0 / 2 : tile.n0;
        const int64_t out_n = Tr::FUSED ? N / 2 : N;

        using OutT = typename moe_conditional<Tr::OUT_T, T, float>::type;
        constexpr int OPITCH = Tr::OUT_PITCH;
        constexpr int VEC = Tr::OUT_VEC;
        constexpr int OCPR = Tr::OUT_CHUNKS_PER_ROW;
        OutT* out = static_cast<OutT*>(C);
        if constexpr (SPLIT_MODE == 2) out += static_cast<int64_t>(blockIdx.y) * (num_valid_tokens * stride_cm);

        // Every consumer is done with the ring (its wgmma completed) before any overwrites it.
        fence_proxy_async_shared_cta();
        bar_sync<1, Tr::CONSUMER_THREADS>();
        OutT* staged = reinterpret_cast<OutT*>(sm.base);
#pragma unroll
        for (int j = 0; j < OUT_COLS / 8; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                OutT* dst = staged + (frag_row + 8 * h) * OPITCH + 8 * j + frag_col;
                if constexpr (Tr::OUT_T) {
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
            const int32_t p = sm.pair[r];
            const int64_t n = out_n0 + c * VEC;
            if (p < 0 || n >= out_n) continue;
            const OutT* src = staged + r * OPITCH + c * VEC;
            // SPLIT_MODE 3: the pair's token row (pair / combine_k) takes the weighted row's sum.
            OutT* dst = out + static_cast<int64_t>(SPLIT_MODE == 3 ? p / combine_k : p) * stride_cm + n;
            moe_store_staged_chunk<OutT, VEC, SPLIT_MODE>(dst, src, n, out_n, vec_ok);
        }
    }

}

// MARK: - moe_gemm_sm90_swap

/// One past the last of the first ROWS tile rows that holds a pair (pair[r] >= 0); 0 when none.
/// Warp-cooperative: every lane of the warp calls it, converged, after the row table is synchronized.
template <int ROWS>
MOE_DEVICE int moe_sm90_rows_used(const int32_t* pair, int lane) {
    int used = 0;
#pragma unroll
    for (int base = 0; base < ROWS; base += 32) {
        const bool holds = base + lane < ROWS && pair[base + lane] >= 0;
        const unsigned mask = __ballot_sync(MOE_FULL_MASK, holds);
        if (mask != 0) used = base + 32 - __clz(static_cast<int>(mask));
    }
    return used;
}

/// body(moe_int_constant<W>{}) for the narrowest W in {MAX, MAX - 16, ..., >= MIN} with W >= used (MIN when used
/// is smaller): one instantiation of body per width, chosen at run time.
template <int MAX, int MIN, typename Body>
MOE_DEVICE void moe_sm90_fit_width(int used, Body&& body) {
    if constexpr (MAX - 16 >= MIN) {
        if (used <= MAX - 16) {
            moe_sm90_fit_width<MAX - 16, MIN>(used, body);
            return;
        }
    }
    body(moe_int_constant<MAX>{});
}

/// GEMM2's side of the block sync (MOE_SM90_BLOCK_SYNC, moe_gemm_sm90_swap), one thread: waits (acquire)
/// until the low 16 bits of *counter, which each consumer warp of GEMM1's programs of this m-block adds 1
/// to once its rows are stored, reach `need`; true. A count that stays short for MOE_SPIN_LIMIT_NS (a bug) ends in
/// griddepcontrol.wait, which GEMM1's completion ends, so the rows are complete either way; false.
MOE_DEVICE bool moe_sm90_wait_block(const int32_t* counter, int32_t need) {
    if (wait_count_at_least(counter, 0xFFFF, need)) return true;
    griddepcontrol_wait();
    return false;
}

/// After moe_sm90_wait_block returned true (and off the A loads' path: one more L2 round trip), counts
/// this program as one of the m-block's `readers` (the counter's high bits); the last reader sets it
/// back to zero for the next launch. After a false wait the program does not count itself, which leaves
/// the counter nonzero for the check to see.
MOE_DEVICE void moe_sm90_leave_block(int32_t* counter, int32_t readers) {
    if ((atomicAdd(counter, 0x10000) >> 16) == readers - 1) atomicExch(counter, 0);
}

template <typename T, int BLOCK_N_W, int TOKENS, int STAGES, int SPLIT_MODE, bool MUL_ROUTED_WEIGHT, int FUSED_ACT,
          int UNIT_N = 1, bool FIT_ROWS = true>
// One consumer warpgroup up to 128 weight rows; two (128 rows each) for BLOCK_N_W 256, with the register split
// (the wide token tiles' 2 x TOKENS / 2 accumulators need the consumers' 224).
struct MoEGemmSm90SwapTraits : MoESm90Roles<TOKENS, BLOCK_N_W, STAGES, BLOCK_N_W == 256 ? 2 : 1> {
    using Roles = MoESm90Roles<TOKENS, BLOCK_N_W, STAGES, BLOCK_N_W == 256 ? 2 : 1>;
    using Smem = typename Roles::Smem;
    static constexpr int WG_ROWS = BLOCK_N_W / Roles::CONSUMER_WARPGROUPS;  // weight rows per consumer warpgroup
    static constexpr int M_BLOCKS = WG_ROWS / 64;  // wgmma m64 blocks of weight rows per warpgroup
    static constexpr int ACC = TOKENS / 2;         // fp32 accumulators per thread per m64 block
    static constexpr int SMEM_BYTES = Smem::SMEM_BYTES;
    static constexpr int DYNAMIC_SMEM_BYTES = Smem::DYNAMIC_SMEM_BYTES;
    // Fitted widths (MOE_SM90_FIT_WIDTH and FIT_ROWS, wide tiles): the consumers multiply the first W =
    // TOKENS - 16 i token rows, the narrowest such W >= FIT_MIN that holds every row with a pair. FIT_MIN:
    // TOKENS / 2 rounded up to a width with a wgmma wrapper (64, or 80 and up in steps of 16). Without
    // them every block multiplies all TOKENS rows, so the blocks of one expert run at one pace and keep
    // reading each weight tile together (the unit walk at two blocks per expert needs that: NOTES v42).
    static constexpr bool FIT = MOE_SM90_FIT_WIDTH != 0 && FIT_ROWS && TOKENS >= 80;
    static constexpr int FIT_MIN = TOKENS / 2 <= 64 ? 64 : (TOKENS / 2 + 15) / 16 * 16;

    // Output staging, transposed back to token rows: fp32 [TOKENS][BLOCK_N_W + 4]. The pitch makes
    // the fragment writes (8 weight rows x 4 token pairs per warp) hit 32 distinct banks and keeps
    // staged rows 16-byte aligned.
    static constexpr int STAGE_PITCH = BLOCK_N_W + 4;
    static constexpr bool OUT_T = SPLIT_MODE == 0 || SPLIT_MODE == 3;  // rows of T (else fp32)
    static constexpr int OUT_VEC = OUT_T ? 8 : 4;                        // elements per 16-byte store
    // FUSED_ACT: staged weight rows [0, BLOCK_N_W / 2) are gate, the next half the matching up rows;
    // BLOCK_N_W / 2 activated columns leave.
    static constexpr bool FUSED = FUSED_ACT != 0;
    static constexpr int OUT_COLS = FUSED ? BLOCK_N_W / 2 : BLOCK_N_W;
    static constexpr int OUT_CHUNKS_PER_ROW = OUT_COLS / OUT_VEC;
    // MOE_SM90_SWAP_PAIRED_ACT: warpgroup wg's m64 block b holds weight rows [64 wg + b BLOCK_N_W / 2, + 64)
    // (block 0 gate, block 1 the matching up rows); the activated T columns are staged [TOKENS][OUT_COLS
    // + 8] (a 16-byte pad: the stmatrix rows and the 16-byte reads hit distinct banks).
    // Only where it compiles without spills (nvrtc_compile_check.py): bf16 silu at every width, any dtype and
    // activation up to 128 tokens (fp16 at 160, and gelu from 144 on 256 weight rows, spilled 4-264 bytes).
    static constexpr bool PAIRED = FUSED && M_BLOCKS == 2 && MOE_SM90_SWAP_PAIRED_ACT != 0 &&
                                   ((FUSED_ACT == 1 && moe_is_same<T, moe_bf16>::value) || TOKENS <= 128);
    static constexpr int PAIRED_PITCH = OUT_COLS + 8;  // T elements per staged token row
    // Units of n-blocks per program (the kernel's UNIT_N, else MOE_SM90_SWAP_UNIT; paired GEMM1 only, whose
    // staging fits one stage).
    static constexpr int UNIT = PAIRED && SPLIT_MODE == 0 ? (UNIT_N > 1 ? UNIT_N : MOE_SM90_SWAP_UNIT) : 1;
    // In the unit walk, staged token rows [0, UNIT_SPLIT_ROWS) go to the B part of the stage the K loop
    // ended on; the rest (tiles wider than that) to the B part of the stage before it, which the K loop
    // then holds too (UNIT_HOLD 2). Only B parts: TMA writes them, never the producer's generic copies
    // (cp.async of the token rows into the A parts, which racecheck reported against the staged rows'
    // reads when they were staged there: bench/NOTES.md v39, v40). A tile of one K tile has no stage
    // before it: its rest goes to the A part of its stage.
    static constexpr int UNIT_SPLIT_ROWS = (Smem::B_STAGE_BYTES / (PAIRED_PITCH * 2)) / 8 * 8;
    static constexpr int UNIT_HOLD = TOKENS <= UNIT_SPLIT_ROWS ? 1 : 2;
    static_assert(UNIT == 1 || (TOKENS <= 2 * UNIT_SPLIT_ROWS && UNIT_HOLD < STAGES &&
                                (TOKENS - UNIT_SPLIT_ROWS) * PAIRED_PITCH * 2 <= Smem::A_STAGE_BYTES),
                  "a unit's staged tile must fit in two stages' B parts (one's A part for a single K tile)");

    static_assert(sizeof(T) == 2, "T must be moe_bf16 or moe_fp16");
    static_assert(BLOCK_N_W == 64 || BLOCK_N_W == 128 || BLOCK_N_W == 256, "BLOCK_N_W in {64, 128, 256}");
    // Decode widths, and the wide token tiles of prefill (an align block that fits the rows per expert
    // more closely than 64-row steps: wgmma's N side steps by 8; these have a wgmma wrapper).
    static_assert(TOKENS == 8 || TOKENS == 16 || TOKENS == 32 || TOKENS == 64 || TOKENS == 80 || TOKENS == 96 ||
                      TOKENS == 112 || TOKENS == 128 || TOKENS == 144 || TOKENS == 160 || TOKENS == 176 ||
                      TOKENS == 192,
                  "TOKENS in {8, 16, 32, 64, 80, 96, 112, 128, 144, 160, 176, 192}");
    static_assert(STAGES >= 2 && STAGES <= 8, "STAGES in 2..8");
    static_assert(SPLIT_MODE >= 0 && SPLIT_MODE <= 3, "SPLIT_MODE in {0,1,2,3}");
    static_assert(SPLIT_MODE != 3 || (MUL_ROUTED_WEIGHT && FUSED_ACT == 0),
                  "SPLIT_MODE 3 (the top-k sum by 16-bit reductions): GEMM2");
    static_assert(TOKENS * STAGE_PITCH * 4 <= Smem::RING_BYTES, "the staged output tile must fit in the ring");
    static_assert(!PAIRED || TOKENS * PAIRED_PITCH * 2 <= Smem::RING_BYTES, "the paired staging must fit in the ring");
    static_assert(FUSED_ACT >= 0 && FUSED_ACT <= 2, "FUSED_ACT in {0 none, 1 silu, 2 gelu}");
    static_assert(!FUSED || (SPLIT_MODE == 0 && !MUL_ROUTED_WEIGHT), "FUSED_ACT: GEMM1, SPLIT_MODE 0");
};

/// The swap-AB kernel's fused epilogue with paired blocks (Tr::PAIRED), for the first W token rows: acc[0][i]
/// and acc[1][i] are gate and up of output column 64 wg + 16 warp + lane / 4 + 8 h and token 8 j + 2 (lane %
/// 4) + c (i = 4 j + 2 h + c). Each thread rounds act(gate) * up to T (moe_act_and_mul, as the separate
/// pass), packs token pairs and stores them transposed by stmatrix into staged[token][column] (the ring's
/// memory, once every consumer is done with it); then the consumers store 16-byte row pieces to C row
/// pair(token). The result is bit for bit the unpaired epilogue's.
template <typename T, typename Tr, int W, int FUSED_ACT, typename Smem, int SPLIT_ROWS = -1>
MOE_DEVICE void moe_sm90_swap_paired_epilogue(float (&acc)[2][W / 2], const Smem& sm, const MoESm90Tile& tile,
                                              void* __restrict__ C, int64_t N, int64_t stride_cm, int wg, int wg_tid,
                                              int ctid, int lane, T* staged_lo = nullptr, T* staged_hi = nullptr) {
    // SPLIT_ROWS >= 0 (the unit walk): staged rows [0, SPLIT_ROWS) at staged_lo, the rest at staged_hi
    // (the held stages' B parts: MoEGemmSm90SwapTraits::UNIT_HOLD); otherwise (-1) the whole tile at the
    // ring's base.
    constexpr bool SPLIT = SPLIT_ROWS >= 0;
    constexpr int PITCH = Tr::PAIRED_PITCH;
    constexpr int J = W / 8;  // 8-token column blocks of the accumulators
    fence_proxy_async_shared_cta();
    bar_sync<1, Tr::CONSUMER_THREADS>();  // every consumer is done with the ring before it is overwritten
    T* staged = SPLIT ? staged_lo : reinterpret_cast<T*>(sm.base);
    const int col0 = wg * 64 + (wg_tid / 32) * 16;  // the warp's 16 output columns
    // stmatrix row addresses: lane l gives row l % 8 of matrix l / 8; matrix q of a call is (j + q / 2, h = q % 2).
    const int q = lane / 8;
    const uint32_t row_addr = cvta_to_shared_u32(staged + (8 * (q / 2) + lane % 8) * PITCH + col0 + 8 * (q % 2));
    // The split form's address of this lane's row in the call for 8-token block j.
    const auto split_addr = [&](int j) -> uint32_t {
        const int row = 8 * j + 8 * (q / 2) + lane % 8;
        T* base = row < SPLIT_ROWS ? staged_lo + row * PITCH : staged_hi + (row - SPLIT_ROWS) * PITCH;
        return cvta_to_shared_u32(base + col0 + 8 * (q % 2));
    };
    // act(gate) * up in place of gate (acc[1][i] dies with its use), then packed token pairs. Computing it
    // in place is what removed the first form's spills; the groups of G values behind empty volatile asm
    // statements (ptxas keeps them in order) changed no spill count (G = 1 and 4 compiled alike) and stay
    // only because this is the form the GPU measured (bench/NOTES.md v31).
    constexpr int G = MOE_SM90_PAIRED_ACT_GROUP;
    static_assert((W / 2) % G == 0, "the accumulators come in whole groups");
#pragma unroll
    for (int g = 0; g < W / 2; g += G) {
#pragma unroll
        for (int i = g; i < g + G; ++i) asm volatile("" : "+f"(acc[0][i]), "+f"(acc[1][i]));
#pragma unroll
        for (int i = g; i < g + G; ++i) acc[0][i] = moe_act_and_mul<T, FUSED_ACT>(acc[0][i], acc[1][i]);
#pragma unroll
        for (int i = g; i < g + G; ++i) asm volatile("" : "+f"(acc[0][i]));
    }
    const auto packed = [&](int j, int h) { return pack2<T>(acc[0][4 * j + 2 * h], acc[0][4 * j + 2 * h + 1]); };
#pragma unroll
    for (int j = 0; j + 1 < J; j += 2)
        stmatrix_x4_trans(SPLIT ? split_addr(j) : row_addr + static_cast<uint32_t>(8 * j * PITCH * 2), packed(j, 0),
                          packed(j, 1), packed(j + 1, 0), packed(j + 1, 1));
    if constexpr (J % 2 == 1)  // lanes 0..15 address matrices (J - 1, 0) and (J - 1, 1)
        stmatrix_x2_trans(SPLIT ? split_addr(J - 1) : row_addr + static_cast<uint32_t>(8 * (J - 1) * PITCH * 2),
                          packed(J - 1, 0), packed(J - 1, 1));
    bar_sync<1, Tr::CONSUMER_THREADS>();

    constexpr int VEC = 8;  // T elements per 16-byte piece
    constexpr int CPR = Tr::OUT_COLS / VEC;
    T* out = static_cast<T*>(C);
    const bool vec_ok = stride_cm % VEC == 0;
    const int64_t out_n0 = tile.n0 / 2;
    const int64_t out_n = N / 2;
    for (int idx = ctid; idx < W * CPR; idx += Tr::CONSUMER_THREADS) {
        const int r = idx / CPR;
        const int c = idx % CPR;
        const int32_t p = sm.pair[r];
        const int64_t n = out_n0 + c * VEC;
        if (p < 0 || n >= out_n) continue;
        const T* src = (SPLIT && r >= SPLIT_ROWS ? staged_hi + (r - SPLIT_ROWS) * PITCH : staged + r * PITCH) + c * VEC;
        T* dst = out + static_cast<int64_t>(p) * stride_cm + n;
        if (vec_ok && n + VEC <= out_n) {
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e)
                if (n + e < out_n) dst[e] = src[e];
        }
    }
}

template <typename T, int BLOCK_N_W, int TOKENS, int STAGES, int SPLIT_MODE, bool MUL_ROUTED_WEIGHT, int FUSED_ACT,
          int UNIT_N = 1, bool FIT_ROWS = true>
__global__ void __launch_bounds__(BLOCK_N_W == 256 ? 384 : 256, 1)
    moe_gemm_sm90_swap(const __grid_constant__ CUtensorMap b_map, const T* __restrict__ A, void* __restrict__ C,
                       const float* __restrict__ topk_weights, const int32_t* __restrict__ sorted_token_ids,
                       const int32_t* __restrict__ expert_ids, const int32_t* __restrict__ total_padded, int64_t N,
                       int64_t K, int64_t num_valid_tokens, int32_t top_k, int32_t split_k, int32_t group_size_m,
                       int64_t stride_am, int64_t stride_cm, int64_t max_padded, int32_t routing_ready,
                       int32_t* __restrict__ block_done, int32_t block_need, int32_t combine_k
#if MOE_SM90_DIAG_TIMES
                       , uint64_t* __restrict__ diag_times
#endif
    ) {
    using Tr = MoEGemmSm90SwapTraits<T, BLOCK_N_W, TOKENS, STAGES, SPLIT_MODE, MUL_ROUTED_WEIGHT, FUSED_ACT, UNIT_N,
                                     FIT_ROWS>;
#if MOE_SM90_DIAG_TIMES
    uint64_t* const diag = diag_times + 8 * (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x);
    if (threadIdx.x == 0) {
        uint32_t smid;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
        diag[0] = smid;
        diag[1] = clock64();
        diag[5] = global_timer_ns();
        diag[2] = diag[3] = diag[4] = diag[6] = 0;
    }
#endif
    // routing_ready (GEMM2): the routing (sorted_token_ids, expert_ids, total_padded) was complete before
    // the previous kernel started (align ran before GEMM1, whose griddepcontrol.wait this grid's launch
    // follows), so the schedule, the row tables and the first STAGES weight tiles (never written) are
    // read before griddepcontrol.wait, under the previous kernel's tail; only A (its output) and every
    // store wait. Otherwise (GEMM1: align is the previous kernel) everything waits.
    // Block sync (block_done non-null: the host passes it where GEMM1 and GEMM2 are both this kernel on
    // one align, GEMM1 unsplit with the activation in its epilogue): GEMM1 (block_need 0) adds 1 per
    // consumer warp to block_done[m-block] once its rows are stored; GEMM2 (block_need: GEMM1's programs per
    // m-block times their consumer warps) waits for that count (moe_sm90_wait_block) before it loads A, so
    // the GEMM2 programs that become resident under GEMM1's last wave run the m-blocks GEMM1 has finished.
    // A GEMM2 store never waits: nothing earlier in the forward reads or writes its rows. Program (0, 0)
    // alone still runs griddepcontrol.wait (after its loads, or before it returns without a tile), so this
    // grid completes after GEMM1's, as the next kernel's griddepcontrol.wait assumes; in every program that
    // would hold a finished program's multiprocessor until GEMM1 ends.
    const bool sync_blocks = MOE_SM90_BLOCK_SYNC != 0 && SPLIT_MODE != 1 && block_done != nullptr;
    const bool signal_block = sync_blocks && Tr::FUSED && block_need == 0;
    const bool wait_block = sync_blocks && block_need > 0 && routing_ready != 0;
    const bool early = MOE_SM90_EARLY_WEIGHTS != 0 && routing_ready != 0;
    const bool completes_after_gemm1 = wait_block && early && blockIdx.x == 0 && blockIdx.y == 0;
    if (!early) griddepcontrol_wait_then_launch_dependents();
    using Smem = typename Tr::Smem;

    extern __shared__ __align__(16) unsigned char moe_gemm_sm90_smem[];

    MoESm90Tile tile;
    int unit_tiles = 1;  // the unit walk's tiles (Tr::UNIT): n-blocks tile.n0 / BLOCK_N_W on, one m-block
    if constexpr (Tr::UNIT > 1) {
        // Program u: m-block u / units-per-m-block, its n-blocks from (u % units-per-m-block) * UNIT (m-block order).
        const int64_t num_pid_n = ceil_div(N, BLOCK_N_W);
        const int64_t units = ceil_div(num_pid_n, Tr::UNIT);
        const int64_t q = blockIdx.x / units;
        const int64_t j0 = (blockIdx.x - q * units) * Tr::UNIT;
        if (!moe_sm90_tile_at<TOKENS, BLOCK_N_W, Tr::BLOCK_K>(tile, q * num_pid_n + j0, blockIdx.y, expert_ids,
                                                              total_padded, N, K, split_k, 1, max_padded,
                                                              num_valid_tokens))
            return;  // GEMM1 (no block-sync wait): nothing to complete after
        unit_tiles = static_cast<int>(min_i64(Tr::UNIT, num_pid_n - j0));
    } else if (!moe_sm90_schedule<TOKENS, BLOCK_N_W, Tr::BLOCK_K>(tile, expert_ids, total_padded, N, K, split_k,
                                                                  group_size_m, max_padded, num_valid_tokens)) {
        if (completes_after_gemm1) griddepcontrol_wait();
        return;
    }
    if (SPLIT_MODE == 1 && tile.num_tiles == 0) return;  // adding zeros changes nothing

    // The first STAGES weight tiles go out before the row table's loads: for GEMM2 (early) before
    // griddepcontrol.wait as well; for GEMM1 (MOE_SM90_GEMM1_PRELOAD) as soon as thread 0 has made the
    // barriers, one L2 round trip sooner than the producer would issue them.
    constexpr bool GEMM1_PRELOAD = MOE_SM90_GEMM1_PRELOAD != 0;
    const Smem sm(moe_gemm_sm90_smem);
    const int b_preloaded = (early || GEMM1_PRELOAD) && tile.num_tiles > 0 ? min(STAGES, tile.num_tiles) : 0;
    const auto preload_b = [&] {
        int32_t b_row, b_row_up;
        moe_sm90_b_rows<Tr::FUSED>(tile, N, b_row, b_row_up);
        moe_sm90_preload_b<TOKENS, BLOCK_N_W, STAGES, Tr::FUSED>(sm, tile, &b_map, b_row, b_row_up, b_preloaded);
    };
    moe_sm90_setup<TOKENS, BLOCK_N_W, STAGES, Tr::THREADS, Tr::PRODUCER_THREADS, Tr::CONSUMER_THREADS / 32>(
        sm, tile, &b_map, sorted_token_ids, num_valid_tokens, top_k, 1, [&] {
            if constexpr (GEMM1_PRELOAD) {
                if (!early && b_preloaded > 0) preload_b();
            }
        });

    const int tid = threadIdx.x;
    if (early) {
        if (tid == 0 && b_preloaded > 0) preload_b();
        if (wait_block) {
            griddepcontrol_launch_dependents();
        } else {
            griddepcontrol_wait_then_launch_dependents();
        }
    }
    if (tid < Tr::PRODUCER_THREADS) {
        // ===== Producer warpgroup =====
        if constexpr (Tr::REBALANCE_REGISTERS) setmaxnreg_dec<Tr::PRODUCER_REGISTERS>();
        bool block_ready = false;
        if (wait_block) {
            if (tid == 0) block_ready = moe_sm90_wait_block(block_done + tile.row0 / TOKENS, block_need);
            bar_sync<2, Tr::PRODUCER_THREADS>();  // every producer's A loads follow thread 0's acquire
        }
        if (Tr::UNIT > 1 && tile.num_tiles > 0) {
            // The unit's tiles on one ring: the same token rows, the next n-block's weights.
            int stage = 0;
            uint32_t phase = 0;
            const MoESm90ASources<T, TOKENS> a = moe_sm90_a_sources<T, TOKENS>(sm.a_row, A, stride_am, tid);
            for (int i = 0; i < unit_tiles; ++i) {
                MoESm90Tile ti = tile;
                ti.n0 += static_cast<int64_t>(i) * BLOCK_N_W;
                int32_t b_row, b_row_up;
                moe_sm90_b_rows<Tr::FUSED>(ti, N, b_row, b_row_up);
                // moe_sm90_produce's loop on the carried ring (a shared helper reordered the decode
                // tiles' SASS, which was measured as it is: kept apart).
                for (int t = 0; t < ti.num_tiles; ++t) {
                    moe_sm90_produce_k_tile<T, TOKENS, BLOCK_N_W, STAGES, Tr::FUSED>(
                        sm, a, &b_map, A, K, b_row, b_row_up, ti, t, stage, phase, tid, -1, i > 0 || t >= b_preloaded);
                    if (++stage == STAGES) {
                        stage = 0;
                        phase ^= 1;
                    }
                }
            }
            cp_async_wait_all();
        } else if (tile.num_tiles > 0) {
            int32_t b_row, b_row_up;
            moe_sm90_b_rows<Tr::FUSED>(tile, N, b_row, b_row_up);
            moe_sm90_produce<T, TOKENS, BLOCK_N_W, STAGES, Tr::FUSED>(sm, tile, &b_map, A, stride_am, K, b_row,
                                                                      b_row_up, tid, -1, b_preloaded);
        }
        if (block_ready) {  // thread 0
            const int32_t readers = static_cast<int32_t>(ceil_div(N, BLOCK_N_W)) * static_cast<int32_t>(gridDim.y);
            moe_sm90_leave_block(block_done + tile.row0 / TOKENS, readers);
        }
        if (completes_after_gemm1 && tid == 0) griddepcontrol_wait();
    } else {
        // ===== Consumer warpgroups =====
        if constexpr (Tr::REBALANCE_REGISTERS) setmaxnreg_inc<Tr::CONSUMER_REGISTERS>();
        const int ctid = tid - Tr::PRODUCER_THREADS;
        const int wg = ctid / Tr::WARPGROUP_THREADS;  // owns weight rows [WG_ROWS wg, WG_ROWS (wg + 1))
        const int wg_tid = ctid % Tr::WARPGROUP_THREADS;
        const int lane = tid % 32;

        // The K loop and the epilogue for the first W token rows of the tile (W <= TOKENS; the rows from W
        // on hold no pair, so they are neither multiplied nor stored).
        auto consume_and_store = [&](auto width) {
            constexpr int W = decltype(width)::value;
            constexpr int ACC = W / 2;  // fp32 accumulators per thread per m64 block
            if constexpr (Tr::UNIT > 1) {
                // The unit walk (Tr::PAIRED): each tile's K loop on the carried ring, its epilogue staged in
                // the stages that loop holds at its end (released after), its rows counted for the block sync.
                constexpr int W_ROW0 = 64;
                constexpr int W_BLOCK_STRIDE = (BLOCK_N_W / 2) * Smem::ROW_BYTES;
                const uint64_t desc_w0 = wgmma_desc_k_major_sw128(sm.b + wg * W_ROW0 * Smem::ROW_BYTES);
                const uint64_t desc_x0 = wgmma_desc_k_major_sw128(sm.a);
                int stage = 0;
                uint32_t phase = 0;
                for (int i = 0; i < unit_tiles; ++i) {
                    MoESm90Tile ti = tile;
                    ti.n0 += static_cast<int64_t>(i) * BLOCK_N_W;
                    float acc[Tr::M_BLOCKS][ACC];
#pragma unroll
                    for (int m = 0; m < Tr::M_BLOCKS; ++m)
#pragma unroll
                        for (int k = 0; k < ACC; ++k) {
                            acc[m][k] = 0.0f;
                            wgmma_fence_operand(acc[m][k]);  // the zeros stay ahead of the tile's wgmma
                        }
                    const int last = moe_sm90_consume_tile<STAGES, Tr::UNIT_HOLD>(
                        sm.full, sm.empty, ti.num_tiles, lane, stage, phase,
                        [&](int st) {
                            moe_sm90_mma_k_tile_blocks<T, W, Tr::K_STEPS, Tr::M_BLOCKS, Smem::B_STAGE_BYTES,
                                                       Smem::A_STAGE_BYTES, W_BLOCK_STRIDE>(acc, desc_w0, desc_x0, st);
                        },
                        [] {});
#pragma unroll
                    for (int m = 0; m < Tr::M_BLOCKS; ++m)
#pragma unroll
                        for (int k = 0; k < ACC; ++k) wgmma_fence_operand(acc[m][k]);
                    // The held stages: the last, and with UNIT_HOLD 2 (and two K tiles or more) the one before.
                    const bool two_held = Tr::UNIT_HOLD == 2 && ti.num_tiles >= 2;
                    const int before = last == 0 ? STAGES - 1 : last - 1;
                    unsigned char* const b_parts = sm.base + STAGES * Smem::A_STAGE_BYTES;
                    T* lo = reinterpret_cast<T*>(b_parts + last * Smem::B_STAGE_BYTES);
                    T* hi = reinterpret_cast<T*>(two_held ? b_parts + before * Smem::B_STAGE_BYTES
                                                          : sm.base + last * Smem::A_STAGE_BYTES);
                    moe_sm90_swap_paired_epilogue<T, Tr, W, FUSED_ACT, Smem, Tr::UNIT_SPLIT_ROWS>(
                        acc, sm, ti, C, N, stride_cm, wg, wg_tid, ctid, lane, lo, hi);
                    // Every consumer's reads of the staged rows are done: the stages go back to the
                    // producer (the async proxy's TMA writes them next: fence the generic accesses first).
                    fence_proxy_async_shared_cta();
                    bar_sync<1, Tr::CONSUMER_THREADS>();
                    if (ti.num_tiles > 0 && lane == 0) {
                        if (two_held) mbarrier_arrive(sm.empty + 8 * before);
                        mbarrier_arrive(sm.empty + 8 * last);
                    }
                    if (signal_block) {  // this tile's rows of its m-block are stored: count them for GEMM2
                        __syncwarp();
                        if (lane == 0) red_release_gpu_add(block_done + tile.row0 / TOKENS, 1);
                    }
                }
                return;
            }
            float acc[Tr::M_BLOCKS][ACC];
#pragma unroll
            for (int m = 0; m < Tr::M_BLOCKS; ++m)
#pragma unroll
                for (int i = 0; i < ACC; ++i) acc[m][i] = 0.0f;

            // wgmma A operand: 64 weight rows (B ring); wgmma B operand: the first W token rows (A ring).
            // PAIRED: block 0 the warpgroup's 64 gate rows, block 1 the up rows BLOCK_N_W / 2 further.
            constexpr int W_ROW0 = Tr::PAIRED ? 64 : Tr::WG_ROWS;
            constexpr int W_BLOCK_STRIDE = (Tr::PAIRED ? BLOCK_N_W / 2 : 64) * Smem::ROW_BYTES;
            const uint64_t desc_w0 = wgmma_desc_k_major_sw128(sm.b + wg * W_ROW0 * Smem::ROW_BYTES);
            const uint64_t desc_x0 = wgmma_desc_k_major_sw128(sm.a);
#if MOE_SM90_DIAG_TIMES
            bool first_issue = true;
#endif
            moe_sm90_consume<STAGES>(sm.full, sm.empty, tile.num_tiles, lane, [&](int stage) {
#if MOE_SM90_DIAG_TIMES
                if (first_issue && ctid == 0) diag[2] = clock64();
                first_issue = false;
#endif
                moe_sm90_mma_k_tile_blocks<T, W, Tr::K_STEPS, Tr::M_BLOCKS, Smem::B_STAGE_BYTES, Smem::A_STAGE_BYTES,
                                           W_BLOCK_STRIDE>(acc, desc_w0, desc_x0, stage);
            });
#if MOE_SM90_DIAG_TIMES
            if (ctid == 0) diag[3] = clock64();
#endif
#pragma unroll
            for (int m = 0; m < Tr::M_BLOCKS; ++m)
#pragma unroll
                for (int i = 0; i < ACC; ++i) wgmma_fence_operand(acc[m][i]);

            // --- Epilogue ---
            if constexpr (Tr::PAIRED) {
                moe_sm90_swap_paired_epilogue<T, Tr, W, FUSED_ACT>(acc, sm, tile, C, N, stride_cm, wg, wg_tid, ctid,
                                                                    lane);
            } else {
                // acc[m][4 j + 2 h + c] is weight row (output column) 64 m + frag_w + 8 h and token (tile row)
                // 8 j + frag_t + c. Staged transposed: staged[token][weight row], fp32.
                constexpr int SPITCH = Tr::STAGE_PITCH;
                constexpr int VEC = Tr::OUT_VEC;
                constexpr int OCPR = Tr::OUT_CHUNKS_PER_ROW;
                const int frag_w = wg * Tr::WG_ROWS + (wg_tid / 32) * 16 + lane / 4;
                const int frag_t = (lane % 4) * 2;

                fence_proxy_async_shared_cta();
                bar_sync<1, Tr::CONSUMER_THREADS>();  // every consumer is done with the ring before it is overwritten
                float* staged = reinterpret_cast<float*>(sm.base);
#pragma unroll
                for (int m = 0; m < Tr::M_BLOCKS; ++m)
#pragma unroll
                    for (int j = 0; j < W / 8; ++j)
#pragma unroll
                        for (int h = 0; h < 2; ++h)
#pragma unroll
                            for (int c = 0; c < 2; ++c)
                                staged[(8 * j + frag_t + c) * SPITCH + 64 * m + frag_w + 8 * h] =
                                    acc[m][4 * j + 2 * h + c];
                bar_sync<1, Tr::CONSUMER_THREADS>();

                using OutT = typename moe_conditional<Tr::OUT_T, T, float>::type;
                OutT* out = static_cast<OutT*>(C);
                if constexpr (SPLIT_MODE == 2) out += static_cast<int64_t>(blockIdx.y) * (num_valid_tokens * stride_cm);
                const bool vec_ok = stride_cm % VEC == 0;
                const int64_t out_n0 = Tr::FUSED ? tile.n0 / 2 : tile.n0;
                const int64_t out_n = Tr::FUSED ? N / 2 : N;
                for (int idx = ctid; idx < W * OCPR; idx += Tr::CONSUMER_THREADS) {
                    const int r = idx / OCPR;
                    const int c = idx % OCPR;
                    const int32_t p = sm.pair[r];
                    const int64_t n = out_n0 + c * VEC;
                    if (p < 0 || n >= out_n) continue;
                    const float w = MUL_ROUTED_WEIGHT ? topk_weights[p] : 1.0f;
                    float v[VEC];
#pragma unroll
                    for (int q = 0; q < VEC; q += 4) {
                        const float4 f = *reinterpret_cast<const float4*>(staged + r * SPITCH + c * VEC + q);
                        if constexpr (Tr::FUSED) {
                            const float4 u =
                                *reinterpret_cast<const float4*>(staged + r * SPITCH + BLOCK_N_W / 2 + c * VEC + q);
                            v[q] = moe_act_and_mul<T, FUSED_ACT>(f.x, u.x);
                            v[q + 1] = moe_act_and_mul<T, FUSED_ACT>(f.y, u.y);
                            v[q + 2] = moe_act_and_mul<T, FUSED_ACT>(f.z, u.z);
                            v[q + 3] = moe_act_and_mul<T, FUSED_ACT>(f.w, u.w);
                        } else {
                            v[q] = f.x * w;
                            v[q + 1] = f.y * w;
                            v[q + 2] = f.z * w;
                            v[q + 3] = f.w * w;
                        }
                    }
                    // SPLIT_MODE 3: the pair's token row (pair / combine_k) takes the weighted row's sum.
                    const int64_t out_row = SPLIT_MODE == 3 ? p / combine_k : p;
                    OutT* dst = out + out_row * stride_cm + n;
                    if (vec_ok && n + VEC <= out_n) {
                        if constexpr (SPLIT_MODE == 0) {
                            st_global_16<MUL_ROUTED_WEIGHT>(dst, pack8<T>(v));
                        } else if constexpr (SPLIT_MODE == 3) {
                            red_global_add_v8_16<T>(dst, pack8<T>(v));
                        } else if constexpr (SPLIT_MODE == 1) {
                            red_global_add_v4_f32(dst, v[0], v[1], v[2], v[3]);
                        } else {
                            *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
                        }
                    } else {
#pragma unroll
                        for (int e = 0; e < VEC; ++e) {
                            if (n + e < out_n) {
                                if constexpr (SPLIT_MODE == 1) {
                                    red_global_add_f32(dst + e, v[e]);
                                } else if constexpr (SPLIT_MODE == 3) {
                                    red_global_add_16<T>(dst + e, from_float<T>(v[e]));
                                } else {
                                    dst[e] = from_float<OutT>(v[e]);
                                }
                            }
                        }
                    }
                }
            }
        };
        if constexpr (Tr::FIT) {
            // The narrowest fitted width that holds every row with a pair (the same in every warp).
            moe_sm90_fit_width<TOKENS, Tr::FIT_MIN>(moe_sm90_rows_used<TOKENS>(sm.pair, lane), consume_and_store);
        } else {
            consume_and_store(moe_int_constant<TOKENS>{});
        }
#if MOE_SM90_DIAG_TIMES
        if (ctid == 0) {
            diag[4] = clock64();
            diag[6] = global_timer_ns();
        }
#endif
        if (Tr::UNIT == 1 && signal_block) {  // this program's rows of its m-block are stored: count them for GEMM2
            // The barrier orders the stores of the threads it joins before one thread's release, which is
            // cumulative: one fence per warp (or program), not one per thread. GEMM2 waits for
            // CONSUMER_THREADS / 32 counts per GEMM1 program either way.
            if constexpr (MOE_SM90_BLOCK_SYNC_PER_WARP != 0) {
                __syncwarp();
                if (lane == 0) red_release_gpu_add(block_done + tile.row0 / TOKENS, 1);
            } else {
                bar_sync<1, Tr::CONSUMER_THREADS>();
                if (ctid == 0) red_release_gpu_add(block_done + tile.row0 / TOKENS, Tr::CONSUMER_THREADS / 32);
            }
        }
    }
}

// MARK: - moe_gemm_sm90_persistent

/// Stores one consumer warp's 16 output rows from its accumulators through the warp's own staging rows
/// (no other warp touches them, so __syncwarp is the only barrier), at most MAX_ROW_BYTES per staged
/// row and pass; BLOCK_N columns from acc[0 .. BLOCK_N / 2) (acc may be longer). acc is wgmma's layout:
/// acc[4 j + 2 h + c] is row lane / 4 + 8 h of the 16, column 8 j + 2 (lane % 4) + c. Per pass of
/// COLS columns: the lanes write their value pairs (4 bytes as T in modes 0 and 3, 8 bytes as float) into 16
/// rows of ROW_BYTES, 16-byte chunk c of row r stored at chunk c ^ ((r * OUT_BYTES / 2) % 8) (the
/// fragment writes hit 32 distinct banks); then each lane reads 16-byte chunks back and stores them to
/// C row pair(r) (red.global.add.v4.f32 in mode 1, 16-bit reds in mode 3), where lane r < 16 holds pair(r), -1 for rows not
/// stored; 16-byte stores where stride_cm and the N tail allow, element stores otherwise.
template <typename OutT, int BLOCK_N, int SPLIT_MODE, int MAX_ROW_BYTES, bool PARTIAL = false, int ACC_LEN>
MOE_DEVICE void moe_sm90_store_warp_rows(const float (&acc)[ACC_LEN], unsigned char* staging, int32_t pair,
                                         OutT* out, int64_t n0, int64_t N, int64_t stride_cm, int lane) {
    static_assert(ACC_LEN >= BLOCK_N / 2, "the accumulators hold the BLOCK_N stored columns (first BLOCK_N / 2)");
    constexpr int OUT_BYTES = static_cast<int>(sizeof(OutT));
    constexpr int ROW_BYTES = BLOCK_N * OUT_BYTES < MAX_ROW_BYTES ? BLOCK_N * OUT_BYTES : MAX_ROW_BYTES;
    constexpr int COLS = ROW_BYTES / OUT_BYTES;  // columns per pass
    constexpr int PASSES = BLOCK_N / COLS;
    constexpr int CHUNKS = ROW_BYTES / 16;  // 16-byte chunks per staged row
    constexpr int VEC = 16 / OUT_BYTES;     // elements per 16-byte store
    constexpr int SWIZZLE_STEP = OUT_BYTES / 2;
    static_assert(CHUNKS >= 8 && BLOCK_N % COLS == 0, "the chunk swizzle stays inside a staged row");
    static_assert((16 * CHUNKS) % 32 == 0, "whole warp passes over the staged rows");

    const int frag_row = lane / 4;                            // rows frag_row and frag_row + 8
    const int frag_byte = (lane % 4) * 2 * OUT_BYTES;        // the pair's byte inside 8 columns
    const int write_swizzle = (frag_row * SWIZZLE_STEP) & 7;  // the same for frag_row + 8
    const bool vec_ok = stride_cm % VEC == 0;
#pragma unroll
    for (int q = 0; q < PASSES; ++q) {
        __syncwarp();  // every lane has read back the previous pass (or tile)
#pragma unroll
        for (int jj = 0; jj < COLS / 8; ++jj) {
            const int j = q * (COLS / 8) + jj;
            const int byte = jj * 8 * OUT_BYTES + frag_byte;
            const int at = (((byte >> 4) ^ write_swizzle) << 4) | (byte & 15);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                unsigned char* dst = staging + (frag_row + 8 * h) * ROW_BYTES + at;
                if constexpr (SPLIT_MODE == 0 || SPLIT_MODE == 3) {
                    *reinterpret_cast<uint32_t*>(dst) = pack2<OutT>(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
                } else {
                    *reinterpret_cast<float2*>(dst) = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
                }
            }
        }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < 16 * CHUNKS / 32; ++i) {
            const int idx = i * 32 + lane;
            const int r = idx / CHUNKS;
            const int c = idx % CHUNKS;
            const int32_t p = __shfl_sync(MOE_FULL_MASK, pair, r);
            const unsigned char* src = staging + r * ROW_BYTES + ((c ^ ((r * SWIZZLE_STEP) & 7)) << 4);
            const int64_t n = n0 + q * COLS + c * VEC;
            if (p < 0 || n >= N) continue;
            OutT* dst = out + static_cast<int64_t>(p) * stride_cm + n;
            if (vec_ok && n + VEC <= N) {
                if constexpr (SPLIT_MODE == 1) {
                    const float4 v = *reinterpret_cast<const float4*>(src);
                    red_global_add_v4_f32(dst, v.x, v.y, v.z, v.w);
                } else if constexpr (SPLIT_MODE == 3) {
                    red_global_add_v8_16<OutT>(dst, *reinterpret_cast<const uint4*>(src));
                } else {
                    st_global_16<PARTIAL>(dst, *reinterpret_cast<const uint4*>(src));
                }
            } else {
                const OutT* s = reinterpret_cast<const OutT*>(src);
#pragma unroll 1
                for (int e = 0; e < VEC && n + e < N; ++e) {
                    if constexpr (SPLIT_MODE == 1) {
                        red_global_add_f32(dst + e, s[e]);
                    } else if constexpr (SPLIT_MODE == 3) {
                        red_global_add_16<OutT>(dst + e, s[e]);
                    } else {
                        dst[e] = s[e];
                    }
                }
            }
        }
    }
}

/// One consumer warp's epilogue for its 16 rows of a COLS-column product (acc[0 .. COLS / 2), wgmma's
/// layout): the routed weight (lane i < 16 holds row i's), then with FUSED_ACT the activation (gate
/// column c and up column c + COLS / 2 are the thread's acc[i] and acc[i + COLS / 4]; COLS / 2 columns
/// stored), then moe_sm90_store_warp_rows at output column n0.
template <typename T, int COLS, int SPLIT_MODE, bool MUL_ROUTED_WEIGHT, int FUSED_ACT, int MAX_ROW_BYTES, typename OutT,
          int ACC_LEN>
MOE_DEVICE void moe_sm90_finish_warp_rows(float (&acc)[ACC_LEN], float weight, int32_t pair, unsigned char* staging,
                                          OutT* out, int64_t n0, int64_t N, int64_t stride_cm, int lane) {
    if constexpr (MUL_ROUTED_WEIGHT) {
        const float w0 = __shfl_sync(MOE_FULL_MASK, weight, lane / 4);      // row lane / 4
        const float w1 = __shfl_sync(MOE_FULL_MASK, weight, lane / 4 + 8);  // row lane / 4 + 8
#pragma unroll
        for (int j = 0; j < COLS / 8; ++j) {
            acc[4 * j] *= w0;
            acc[4 * j + 1] *= w0;
            acc[4 * j + 2] *= w1;
            acc[4 * j + 3] *= w1;
        }
    }
    if constexpr (FUSED_ACT != 0) {
#pragma unroll
        for (int i = 0; i < COLS / 4; ++i) acc[i] = moe_act_and_mul<T, FUSED_ACT>(acc[i], acc[i + COLS / 4]);
        moe_sm90_store_warp_rows<OutT, COLS / 2, SPLIT_MODE, MAX_ROW_BYTES>(acc, staging, pair, out, n0, N, stride_cm,
                                                                            lane);
    } else {
        moe_sm90_store_warp_rows<OutT, COLS, SPLIT_MODE, MAX_ROW_BYTES, MUL_ROUTED_WEIGHT>(acc, staging, pair, out, n0,
                                                                                           N, stride_cm, lane);
    }
}

/// The fused combine's arguments (moe_gemm_sm90_persistent, GEMM2; the kernel's notes): out null, off.
struct MoESm90Combine {
    void* out;            // [tokens, N] of T
    const int32_t* ids;   // topk_ids [tokens, k]
    int32_t* counts;      // one per chunk, zero between launches
    int32_t k;            // top-k: pair p is slot p % k of token p / k
    int32_t experts;      // ids in [0, experts) are routed
};

// A chunk counter: its consumer warps' stored units in the low bits, its combine items' reads above.
constexpr int MOE_SM90_COMBINE_READER_SHIFT = 22;

/// One combine item, by `threads` consumer threads (ctid): tokens [t0, t1), columns [n0, n1) (n1 - n0 and
/// n0 multiples of 8): out[t, n] = the sum over the token's routed slots j, in slot order, of
/// partials[(t k + j) * stride_cm + n], as moe_combine sums (fp32, rounded once); all bits set where
/// `lost`. 16-byte vectors, VECS per thread and pass with all their slots' loads in flight together
/// (ld.global.cg: through L2): the item is latency-bound on one SM, so it needs the loads in flight.
template <typename T>
MOE_DEVICE void moe_sm90_combine_sum(const MoESm90Combine& c, const T* partials, int64_t stride_cm, int64_t N,
                                     int64_t t0, int64_t t1, int64_t n0, int64_t n1, bool lost, int ctid,
                                     int threads) {
    constexpr int SLOTS = 8;
    constexpr int VECS = MOE_SM90_COMBINE_VECTORS;
    const int64_t vectors = (n1 - n0) / 8;
    const int64_t work = (t1 - t0) * vectors;
    T* out = static_cast<T*>(c.out);
    for (int64_t base = ctid; base < work; base += static_cast<int64_t>(VECS) * threads) {
        int64_t t[VECS], n[VECS];
        float sum[VECS][8];
#pragma unroll
        for (int v = 0; v < VECS; ++v) {
            const int64_t i = min_i64(base + static_cast<int64_t>(v) * threads, work - 1);  // a repeat past the end
            t[v] = t0 + i / vectors;
            n[v] = n0 + 8 * (i % vectors);
#pragma unroll
            for (int e = 0; e < 8; ++e) sum[v][e] = 0.0f;
        }
        for (int32_t j0 = 0; j0 < c.k; j0 += SLOTS) {
            bool use[VECS][SLOTS];
            uint4 x[VECS][SLOTS];
#pragma unroll
            for (int v = 0; v < VECS; ++v)
#pragma unroll
                for (int s = 0; s < SLOTS; ++s) {
                    const int32_t j = j0 + s;
                    const int32_t e = j < c.k ? c.ids[t[v] * c.k + j] : -1;
                    use[v][s] = e >= 0 && e < c.experts;
                }
#pragma unroll
            for (int v = 0; v < VECS; ++v)
#pragma unroll
                for (int s = 0; s < SLOTS; ++s)
                    x[v][s] = use[v][s] ? __ldcg(reinterpret_cast<const uint4*>(partials + (t[v] * c.k + j0 + s) * stride_cm + n[v]))
                                        : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int v = 0; v < VECS; ++v)
#pragma unroll
                for (int s = 0; s < SLOTS; ++s) {
                    if (!use[v][s]) continue;
                    float f[8];
                    unpack8<T>(x[v][s], f);
#pragma unroll
                    for (int e = 0; e < 8; ++e) sum[v][e] += f[e];
                }
        }
#pragma unroll
        for (int v = 0; v < VECS; ++v) {
            if (base + static_cast<int64_t>(v) * threads >= work) break;
            *reinterpret_cast<uint4*>(out + t[v] * N + n[v]) = lost ? make_uint4(~0u, ~0u, ~0u, ~0u) : pack8<T>(sum[v]);
        }
    }
}

/// After a combine item's sums (a barrier of its threads between): discards the 128-byte lines of the
/// routed partial rows it read (tokens [t0, t1), columns [n0, n1), whole lines: stride_cm and n0
/// multiples of 64), so L2 drops them instead of writing them back.
template <typename T>
MOE_DEVICE void moe_sm90_combine_discard(const MoESm90Combine& c, const T* partials, int64_t stride_cm, int64_t t0,
                                         int64_t t1, int64_t n0, int64_t n1, int ctid, int threads) {
    if (stride_cm % 64 != 0 || n0 % 64 != 0) return;
    const int64_t lines = (n1 - n0) / 64;  // whole lines only (a ragged tail stays)
    for (int64_t i = ctid; i < (t1 - t0) * c.k * lines; i += threads) {
        const int64_t row = i / lines;  // (t - t0) k + j
        const int64_t t = t0 + row / c.k;
        const int32_t j = static_cast<int32_t>(row % c.k);
        const int32_t e = c.ids[t * c.k + j];
        if (e < 0 || e >= c.experts) continue;
        discard_global_l2(partials + (t * c.k + j) * stride_cm + n0 + 64 * (i % lines));
    }
}

template <typename T, int BLOCK_M, int BLOCK_N, int STAGES, int SPLIT_MODE, bool MUL_ROUTED_WEIGHT, int FUSED_ACT,
          bool PING_PONG>
struct MoEGemmSm90PersistentTraits : MoESm90Roles<BLOCK_M, BLOCK_N, STAGES, BLOCK_M / 64> {
    using Roles = MoESm90Roles<BLOCK_M, BLOCK_N, STAGES, BLOCK_M / 64>;
    using Smem = typename Roles::Smem;
    static constexpr int CONSUMER_WARPS = Roles::CONSUMER_THREADS / 32;
    // Ping-pong: each consumer warpgroup computes whole tiles (the program's tiles alternately), as
    // two m64 halves of BLOCK_N / 2 accumulators each; otherwise both compute each tile, 64 rows each.
    static constexpr bool PINGPONG = PING_PONG;
    static constexpr int HALVES = PING_PONG ? BLOCK_M / 64 : 1;
    static constexpr int ACC = BLOCK_N / 2;  // fp32 accumulators per consumer thread and half
    static constexpr int WARP_ROWS = 16;     // output rows of one consumer warp (per half)
    // The warps that release each stage: one warpgroup's in ping-pong, else every consumer warp.
    static constexpr int RELEASING_WARPS = PING_PONG ? Roles::WARPGROUP_THREADS / 32 : CONSUMER_WARPS;
    // Ping-pong order barriers: warpgroup w waits on ORDER_BARRIER + w before its K loop, which the
    // other warpgroup arrives at once its own K loop is issued (so the K loops alternate and one
    // warpgroup's epilogue runs under the other's products).
    static constexpr int ORDER_BARRIER = 2;
    // FUSED_ACT: columns [0, BLOCK_N / 2) of the product are gate, the rest the matching up; the
    // BLOCK_N / 2 activated columns are stored.
    static constexpr bool FUSED = FUSED_ACT != 0;
    static constexpr int OUT_COLS = FUSED ? BLOCK_N / 2 : BLOCK_N;

    // Named barrier of the producer warpgroup; the consumers' (stream-K partials only).
    static constexpr int PRODUCER_BARRIER = 1;
    static constexpr int STREAM_BARRIER = 4;
    // Stream-K: one program's partial tile, in 4-float vectors.
    static constexpr int SLOT_VECTORS = BLOCK_M * BLOCK_N / 4;

    // Half tiles: in a 128-row tile whose rows [64, 128) are all padding (an expert's last m-block
    // holding at most 64 rows), both consumer warpgroups multiply rows [0, 64), warpgroup w the
    // columns [w * HALF_N, (w + 1) * HALF_N) (wgmma m64 x HALF_N), and store them: half the tensor
    // work of the padded tile, on the same ring and loads. Not with the fused activation (its gate
    // and up columns are the tile's two halves), and unsplit only (in the split modes of 128x256 the
    // consumers spilled 12-72 bytes with NVRTC 13.5; every measurement of it was unsplit: NOTES v15, v16).
    static constexpr bool HALF = MOE_SM90_HALF_TILES == 1 && BLOCK_M == 128 && BLOCK_N >= 128 && !FUSED && !PING_PONG &&
                                 SPLIT_MODE == 0;
    static constexpr int HALF_N = BLOCK_N / 2;

    // A resident (MOE_SM90_A_RESIDENT = the K tiles held, 0 off; NOTES v16). For a
    // short K (at most A_SLOTS K tiles, unsplit), a program takes "units" of A_CHUNK n-blocks of one
    // m-block: the unit's A tile stays in shared memory (slot k holds K tile k) while the B tiles of its
    // n-blocks stream through a ring of the remaining RES_B_STAGES stages, so A is read once per unit
    // instead of once per tile. Same shared memory as the ring of STAGES; the A slots' barriers take
    // the second row table (the producer needs one table per unit).
    static constexpr int A_SLOTS = MOE_SM90_A_RESIDENT;
    static constexpr int A_CHUNK = MOE_SM90_A_RESIDENT_CHUNK;
    static constexpr int RES_B_STAGES_FIT =
        A_SLOTS > 0 ? (Smem::RING_BYTES - A_SLOTS * Smem::A_STAGE_BYTES) / Smem::B_STAGE_BYTES : 0;
    static constexpr int RES_B_STAGES = RES_B_STAGES_FIT < STAGES ? RES_B_STAGES_FIT : STAGES;
    // At least 3 B stages: with 2 (8 slots in a 4-stage 128x256 ring) it measured 2-5% slower.
    static constexpr bool A_RESIDENT = A_SLOTS > 0 && BLOCK_M == 128 && !PING_PONG && !FUSED &&
                                       (SPLIT_MODE == 0 || SPLIT_MODE == 3) &&
                                       RES_B_STAGES >= 3 && 16 * A_SLOTS <= 4 * BLOCK_M;

    // The fused combine (MOE_SM90_FUSED_COMBINE; GEMM2 on the A-resident walk; MoESm90Combine). Not
    // beside the half tiles (another experiment), where its sums' registers made the consumers spill.
    static constexpr bool COMBINE =
        MOE_SM90_FUSED_COMBINE == 1 && A_RESIDENT && MUL_ROUTED_WEIGHT && !HALF && SPLIT_MODE == 0;

    // Output staging, its own region after the ring, barriers and row tables: 256 bytes per tile row
    // (each consumer warp stages its 16 rows in passes of at most 256 bytes per row). (Staging the
    // whole tile for bulk copies that run on under the next tile measured no faster: NOTES v14.)
    static constexpr int STAGING_ROW_BYTES = 256;
    static constexpr int STAGING_BYTES = BLOCK_M * STAGING_ROW_BYTES;
    static constexpr int WARP_STAGING_BYTES = WARP_ROWS * STAGING_ROW_BYTES;
    static constexpr int SMEM_BYTES = Smem::SMEM_BYTES + STAGING_BYTES;
    static constexpr int DYNAMIC_SMEM_BYTES = SMEM_BYTES + Smem::ALIGN;  // what the host passes

    static_assert(sizeof(T) == 2, "T must be moe_bf16 or moe_fp16");
    static_assert(BLOCK_M == 64 || BLOCK_M == 128, "BLOCK_M in {64, 128}");
    static_assert(BLOCK_N == 64 || BLOCK_N == 128 || BLOCK_N == 256, "BLOCK_N in {64, 128, 256}");
    static_assert(!PING_PONG || (BLOCK_M == 128 && BLOCK_N <= 128), "ping-pong: BLOCK_M 128, BLOCK_N 64 or 128");
    static_assert(STAGES >= 2 && STAGES <= 8, "STAGES in 2..8");
    static_assert(SPLIT_MODE >= 0 && SPLIT_MODE <= 3, "SPLIT_MODE in {0,1,2,3}");
    static_assert(SPLIT_MODE != 3 || (MUL_ROUTED_WEIGHT && !FUSED && !PING_PONG),
                  "SPLIT_MODE 3 (the atomic top-k sum): GEMM2, not ping-pong");
    static_assert(Smem::SMEM_BYTES % 16 == 0, "the staging region stays 16-byte aligned");
    static_assert(FUSED_ACT >= 0 && FUSED_ACT <= 2, "FUSED_ACT in {0 none, 1 silu, 2 gelu}");
    static_assert(!FUSED || (SPLIT_MODE == 0 && !MUL_ROUTED_WEIGHT), "FUSED_ACT: GEMM1, SPLIT_MODE 0");
    static_assert(!FUSED || BLOCK_N >= 128, "FUSED_ACT: at least 64 stored columns (128-byte staged rows)");
    static_assert(DYNAMIC_SMEM_BYTES <= 232448, "more than 227 KB of shared memory per block");
};

template <typename T, int BLOCK_M, int BLOCK_N, int STAGES, int SPLIT_MODE, bool MUL_ROUTED_WEIGHT, int FUSED_ACT,
          bool PINGPONG = false, bool STREAM_K = false>
__global__ void __launch_bounds__(128 * (1 + BLOCK_M / 64), 1)
    moe_gemm_sm90_persistent(const __grid_constant__ CUtensorMap b_map, const T* __restrict__ A,
                             void* __restrict__ C, const float* __restrict__ topk_weights,
                             const int32_t* __restrict__ sorted_token_ids, const int32_t* __restrict__ expert_ids,
                             const int32_t* __restrict__ total_padded, int64_t N, int64_t K,
                             int64_t num_valid_tokens, int32_t top_k, int32_t split_k, int32_t group_size_m,
                             int64_t stride_am, int64_t stride_cm, int64_t max_padded, float* __restrict__ sk_partials,
                             int32_t* __restrict__ sk_flags, void* combine_out, const int32_t* combine_ids,
                             int32_t* combine_counts, int32_t combine_k, int32_t combine_experts,
                             int32_t combine_chunk) {
    griddepcontrol_wait_then_launch_dependents();
    using Tr = MoEGemmSm90PersistentTraits<T, BLOCK_M, BLOCK_N, STAGES, SPLIT_MODE, MUL_ROUTED_WEIGHT, FUSED_ACT,
                                           PINGPONG>;
    using Smem = typename Tr::Smem;

    extern __shared__ __align__(16) unsigned char moe_gemm_sm90_smem[];

    const int64_t num_tiles = ceil_div(max_padded, BLOCK_M) * ceil_div(N, BLOCK_N);
    const int64_t first_tile = blockIdx.x;
    const int64_t tile_stride = gridDim.x;
    // Stream-K (the notes above): every program may hold K work, however few the tiles.
    static_assert(!STREAM_K || (!PINGPONG && SPLIT_MODE == 0), "STREAM_K: SPLIT_MODE 0, not PINGPONG");
    constexpr bool stream = STREAM_K;
    // The fused combine (the notes above): every program also zeros its share of the unrouted tokens.
    const MoESm90Combine comb{combine_out, combine_ids, combine_counts, combine_k, combine_experts};
    const bool combining = Tr::COMBINE && !stream && combine_out != nullptr;
    if (!stream && !combining && first_tile >= num_tiles) return;  // more programs than tiles
    // The stream-K walk, computed by each role after its register split (a value live from here into
    // the 56-register producer would be spilled, and reloaded by the consumers too).
    const auto stream_k = [&]() -> MoESm90StreamK {
        MoESm90StreamK sk{};
        if constexpr (stream) {
            const int64_t num_blocks = ceil_div(max_padded, BLOCK_M);
            const int64_t valid_blocks =
                min_i64(moe_total_padded(total_padded, num_valid_tokens, BLOCK_M) / BLOCK_M, num_blocks);
            sk = moe_sm90_stream_k(valid_blocks * ceil_div(N, BLOCK_N), ceil_div(K, Tr::BLOCK_K));
        }
        return sk;
    };
    // Piece j of this program's walk: tile t = first_tile + j * tile_stride (split blockIdx.y), or the
    // stream-K walk's piece j. The walks pass both j and t (each form uses one: no multiply, no
    // register for the other). False: the walk has ended.
    const auto piece_at = [&](int64_t j, int64_t t, MoESm90Tile& tile, const MoESm90StreamK& sk) -> bool {
        if constexpr (stream)
            return moe_sm90_stream_piece<BLOCK_M, BLOCK_N, Tr::BLOCK_K>(tile, sk, j, blockIdx.x, expert_ids,
                                                                        total_padded, N, K, group_size_m, max_padded,
                                                                        num_valid_tokens);
        return t < num_tiles && moe_sm90_tile_at<BLOCK_M, BLOCK_N, Tr::BLOCK_K>(tile, t, blockIdx.y, expert_ids,
                                                                                total_padded, N, K, split_k,
                                                                                group_size_m, max_padded,
                                                                                num_valid_tokens);
    };

    // A resident (Tr::A_RESIDENT, short K, unsplit): units of A_CHUNK n-blocks of one m-block, walked
    // u = blockIdx.x, + gridDim.x, ...; unit u is m-block u / chunks, n-blocks from (u % chunks) * A_CHUNK
    // (GROUP_SIZE_M is not used: m-block order). Ends at the first unit past the valid m-blocks.
    const int64_t k_tiles = ceil_div(K, Tr::BLOCK_K);
    const bool resident = Tr::A_RESIDENT && split_k == 1 && k_tiles <= Tr::A_SLOTS && !stream;
    if constexpr (Tr::A_RESIDENT) {
        if (resident) {
            const Smem sm(moe_gemm_sm90_smem);
            const int tid = threadIdx.x;
            const uint32_t a_full = sm.full + Smem::BARRIER_BYTES + 4 * BLOCK_M;  // the second row table
            const uint32_t a_empty = a_full + 8 * Tr::A_SLOTS;
            const uint32_t b_ring = sm.a + Tr::A_SLOTS * Smem::A_STAGE_BYTES;
            if (tid == 0) {
                for (int s = 0; s < Tr::RES_B_STAGES; ++s) {
                    mbarrier_init(sm.full + 8 * s, 1);  // thread 0's arrive.expect_tx: B only
                    mbarrier_init(sm.empty + 8 * s, Tr::CONSUMER_WARPS);
                }
                for (int k = 0; k < Tr::A_SLOTS; ++k) {
                    mbarrier_init(a_full + 8 * k, Tr::PRODUCER_THREADS);  // cp.async noinc arrivals
                    mbarrier_init(a_empty + 8 * k, Tr::CONSUMER_WARPS);
                }
                fence_mbarrier_init();
                prefetch_tensormap(&b_map);
            }
            __syncthreads();
            const int64_t num_pid_n = ceil_div(N, BLOCK_N);
            // With the fused combine, units of combine_chunk n-blocks, chunk-major: every m-block's unit of
            // chunk c before any of chunk c + 1, so a token's partial rows of one chunk are written close
            // together in time and summed while they are still in L2.
            const int64_t chunk_nb = combining ? (combine_chunk > 0 ? combine_chunk : 1) : Tr::A_CHUNK;
            const int64_t chunks = ceil_div(num_pid_n, chunk_nb);
            const int64_t num_blocks = ceil_div(max_padded, BLOCK_M);
            const int64_t valid_blocks =
                min_i64(moe_total_padded(total_padded, num_valid_tokens, BLOCK_M) / BLOCK_M, num_blocks);
            // Step w of the walk: kStepEnd past its end (as is every later step); kStepUnit, unit (q, chunk c):
            // m-block q, n-blocks [nb_begin, nb_end); kStepCombine (the fused combine), item r of chunk c.
            // Without the combine, unit w is m-block w / chunks, chunk w % chunks (m-block order). With
            // it, the steps go in segments: segment 0 the V = valid_blocks units of chunk 0, segment s in
            // 1 .. chunks - 1 the units of chunk s then the G = gridDim.x combine items of chunk s - 1,
            // and a last segment of chunk (chunks - 1)'s items; so every program takes one item per chunk
            // (G consecutive steps), a chunk's items come a chunk's units after its own (by then done:
            // little waiting), and a chunk's partial rows are read while still in L2.
            constexpr int kStepEnd = 0, kStepUnit = 1, kStepCombine = 2;
            const int64_t items = gridDim.x;
            const auto step_at = [&](int64_t w, int64_t& q, int64_t& c, int32_t& expert, int64_t& nb_begin,
                                     int64_t& nb_end) -> int {
                if (combining) {
                    if (w < valid_blocks) {
                        q = w;
                        c = 0;
                    } else {
                        const int64_t w1 = w - valid_blocks;
                        const int64_t s = 1 + w1 / (valid_blocks + items);
                        const int64_t r = w1 - (s - 1) * (valid_blocks + items);
                        if (s < chunks && r < valid_blocks) {
                            q = r;
                            c = s;
                        } else if (s < chunks || (s == chunks && r < items)) {
                            q = s < chunks ? r - valid_blocks : r;  // the item
                            c = s - 1;
                            return kStepCombine;
                        } else {
                            return kStepEnd;
                        }
                    }
                } else {
                    q = w / chunks;
                    if (q >= valid_blocks) return kStepEnd;
                    c = w - q * chunks;
                }
                expert = expert_ids[q];
                nb_begin = c * chunk_nb;
                nb_end = min_i64(nb_begin + chunk_nb, num_pid_n);
                return kStepUnit;
            };
            if (tid < Tr::PRODUCER_THREADS) {
                if constexpr (Tr::REBALANCE_REGISTERS) setmaxnreg_dec<Tr::PRODUCER_REGISTERS>();
                int stage = 0;
                uint32_t phase = 0, a_phase = 0;
                int64_t q, c, nb_begin, nb_end;
                int32_t expert;
                for (int64_t w = blockIdx.x;; w += gridDim.x) {
                    const int step = step_at(w, q, c, expert, nb_begin, nb_end);
                    if (step == kStepEnd) break;
                    if (step == kStepCombine || expert < 0) continue;  // nothing to load (unowned: zeros)
                    bar_sync<Tr::PRODUCER_BARRIER, Tr::PRODUCER_THREADS>();  // every thread read the last table
                    if (tid < BLOCK_M) {
                        const int32_t p = moe_sorted_pair(sorted_token_ids, q * BLOCK_M + tid, BLOCK_M, num_valid_tokens);
                        sm.a_row[tid] = p >= 0 && p < num_valid_tokens ? p / top_k : -1;
                    }
                    bar_sync<Tr::PRODUCER_BARRIER, Tr::PRODUCER_THREADS>();
                    const MoESm90ASources<T, BLOCK_M> a = moe_sm90_a_sources<T, BLOCK_M>(sm.a_row, A, stride_am, tid);
                    for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
                        const int32_t b_row = static_cast<int32_t>(expert * N + nb * BLOCK_N);
                        for (int k = 0; k < k_tiles; ++k) {
                            if (nb == nb_begin) {  // the unit's A, K tile k, once the last unit's is released
                                mbarrier_wait_parity(a_empty + 8 * k, a_phase ^ 1);
                                moe_sm90_copy_a<T, BLOCK_M>(sm.a + k * Smem::A_STAGE_BYTES, a, A, K, k, tid);
                                cp_async_mbarrier_arrive_noinc(a_full + 8 * k);
                            }
                            mbarrier_wait_parity(sm.empty + 8 * stage, phase ^ 1);
                            if (tid == 0) {
                                if ((MOE_SM90_DIAG_GEMM2 & 1) != 0 && nb != nb_begin) {
                                    mbarrier_arrive(sm.full + 8 * stage);  // diagnostic: stale weights
                                } else {
                                    mbarrier_arrive_expect_tx(sm.full + 8 * stage, Smem::B_STAGE_BYTES);
                                    tma_load_2d(b_ring + stage * Smem::B_STAGE_BYTES, &b_map, k * Tr::BLOCK_K,
                                                b_row, sm.full + 8 * stage);
                                }
                            }
                            if (++stage == Tr::RES_B_STAGES) {
                                stage = 0;
                                phase ^= 1;
                            }
                        }
                    }
                    a_phase ^= 1;
                }
                cp_async_wait_all();
            } else {
                if constexpr (Tr::REBALANCE_REGISTERS) setmaxnreg_inc<Tr::CONSUMER_REGISTERS>();
                const int ctid = tid - Tr::PRODUCER_THREADS;
                const int wg = ctid / Tr::WARPGROUP_THREADS;  // rows [64 wg, 64 wg + 64)
                const int warp = ctid / 32;
                const int lane = tid % 32;
                T* out = static_cast<T*>(C);
                unsigned char* staging = sm.base + Smem::SMEM_BYTES + warp * Tr::WARP_STAGING_BYTES;
                const uint64_t desc_a0 = wgmma_desc_k_major_sw128(sm.a + wg * 64 * Smem::ROW_BYTES);
                const uint64_t desc_b0 = wgmma_desc_k_major_sw128(b_ring);
                int stage = 0;
                uint32_t phase = 0, a_phase = 0;
                int64_t q, c, nb_begin, nb_end;
                int32_t expert;
                for (int64_t w = blockIdx.x;; w += gridDim.x) {
                    const int step = step_at(w, q, c, expert, nb_begin, nb_end);
                    if (step == kStepEnd) break;
                    if constexpr (Tr::COMBINE) {
                        if (step == kStepCombine) {
                            // Item q of chunk c: once every consumer warp of the chunk's units has counted
                            // itself (thread 0 waits, acquire), its share of the tokens over the chunk's
                            // columns; then its read counted (the chunk's last reader clears the counter
                            // for the next launch) and, with MOE_SM90_COMBINE_DISCARD, the rows dropped.
                            int32_t* count = comb.counts + c;
                            bool lost = false;
                            if (ctid == 0)
                                lost = !wait_count_at_least(count, (1 << MOE_SM90_COMBINE_READER_SHIFT) - 1,
                                                            static_cast<int32_t>(valid_blocks) * Tr::CONSUMER_WARPS);
                            lost = bar_sync_or<Tr::STREAM_BARRIER, Tr::CONSUMER_THREADS>(lost);
                            const int64_t tokens = num_valid_tokens / comb.k;
                            const int64_t t0 = q * tokens / items, t1 = (q + 1) * tokens / items;
                            const int64_t n0 = c * chunk_nb * BLOCK_N, n1 = min_i64(n0 + chunk_nb * BLOCK_N, N);
                            moe_sm90_combine_sum<T>(comb, out, stride_cm, N, t0, t1, n0, n1, lost, ctid,
                                                    Tr::CONSUMER_THREADS);
                            bar_sync<Tr::STREAM_BARRIER, Tr::CONSUMER_THREADS>();  // every read of the rows is done
                            if (ctid == 0) {
                                const int32_t seen = atomicAdd(count, 1 << MOE_SM90_COMBINE_READER_SHIFT);
                                if ((seen >> MOE_SM90_COMBINE_READER_SHIFT) + 1 == items) *count = 0;
                            }
                            if constexpr (MOE_SM90_COMBINE_DISCARD != 0) {
                                if (!lost)
                                    moe_sm90_combine_discard<T>(comb, out, stride_cm, t0, t1, n0, n1, ctid,
                                                                Tr::CONSUMER_THREADS);
                            }
                            continue;
                        }
                    }
                    int32_t pair = -1;
                    float weight = 0.0f;
                    if (lane < Tr::WARP_ROWS) {
                        const int32_t p = moe_sorted_pair(sorted_token_ids, q * BLOCK_M + warp * Tr::WARP_ROWS + lane,
                                                          BLOCK_M, num_valid_tokens);
                        if (p >= 0 && p < num_valid_tokens) {
                            pair = p;
                            if constexpr (MUL_ROUTED_WEIGHT) weight = topk_weights[p];
                        }
                    }
                    for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
                        const bool last = nb + 1 == nb_end;  // the unit's last tile releases its A
                        float acc[Tr::ACC];
#pragma unroll
                        for (int i = 0; i < Tr::ACC; ++i) acc[i] = 0.0f;
                        if (expert >= 0) {
                            int prev = stage;
                            for (int k = 0; k < k_tiles; ++k) {
                                if (nb == nb_begin) mbarrier_wait_parity(a_full + 8 * k, a_phase);
                                mbarrier_wait_parity(sm.full + 8 * stage, phase);
                                fence_proxy_async_shared_cta();
                                moe_sm90_mma_k_tile<T, BLOCK_N, Tr::K_STEPS>(
                                    acc, desc_a0 + static_cast<uint64_t>((k * Smem::A_STAGE_BYTES) >> 4),
                                    desc_b0 + static_cast<uint64_t>((stage * Smem::B_STAGE_BYTES) >> 4));
                                wgmma_wait_group<1>();  // K tile k - 1's products are done
                                if (k > 0 && lane == 0) {
                                    mbarrier_arrive(sm.empty + 8 * prev);
                                    if (last) mbarrier_arrive(a_empty + 8 * (k - 1));
                                }
                                prev = stage;
                                if (++stage == Tr::RES_B_STAGES) {
                                    stage = 0;
                                    phase ^= 1;
                                }
                            }
                            wgmma_wait_group<0>();
                            if (lane == 0) {
                                mbarrier_arrive(sm.empty + 8 * prev);
                                if (last) mbarrier_arrive(a_empty + 8 * (k_tiles - 1));
                            }
#pragma unroll
                            for (int i = 0; i < Tr::ACC; ++i) wgmma_fence_operand(acc[i]);
                        }
                        // The diagnostic's bits 1, 3 and 4 drop or move the stores (MOE_SM90_DIAG_GEMM2).
                        int32_t store_pair = pair;
                        if constexpr ((MOE_SM90_DIAG_GEMM2 & 2) != 0) {
                            store_pair = -1;
                        } else if constexpr ((MOE_SM90_DIAG_GEMM2 & 8) != 0) {
                            if (pair >= 0) store_pair = pair % 512;
                        } else if constexpr ((MOE_SM90_DIAG_GEMM2 & 16) != 0) {
                            if (pair >= 0)
                                store_pair = static_cast<int32_t>((q * BLOCK_M + warp * Tr::WARP_ROWS + lane) %
                                                                  num_valid_tokens);
                        }
                        if constexpr (SPLIT_MODE == 3) {  // its token's output row
                            if (store_pair >= 0) store_pair /= combine_k;
                        }
                        if ((MOE_SM90_DIAG_GEMM2 & 32) == 0 || __float_as_uint(acc[0]) == 0x7fc0deadu)
                            moe_sm90_finish_warp_rows<T, BLOCK_N, SPLIT_MODE, MUL_ROUTED_WEIGHT, 0,
                                                      Tr::STAGING_ROW_BYTES>(acc, weight, store_pair, staging, out,
                                                                             nb * BLOCK_N, N, stride_cm, lane);
                    }
                    if (expert >= 0) a_phase ^= 1;
                    if constexpr (Tr::COMBINE) {
                        // The fused combine: this warp's rows of the unit are stored (__syncwarp orders the
                        // lanes' stores before lane 0's release).
                        if (combining) {
                            __syncwarp();
                            if (lane == 0) red_release_gpu_add(comb.counts + c, 1);
                        }
                    }
                }
            }
            return;
        }
    }

    const Smem sm(moe_gemm_sm90_smem);
    const int tid = threadIdx.x;
    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbarrier_init(sm.full + 8 * s, Tr::PRODUCER_THREADS + 1);
            mbarrier_init(sm.empty + 8 * s, Tr::RELEASING_WARPS);
        }
        fence_mbarrier_init();
        prefetch_tensormap(&b_map);
    }
    __syncthreads();

    // Both roles walk the same tiles and decide "has K work" with the same call on the same inputs
    // (moe_sm90_tile_at and tile.num_tiles > 0), so they agree on every ring round.
    if (tid < Tr::PRODUCER_THREADS) {
        // ===== Producer warpgroup =====
        if constexpr (Tr::REBALANCE_REGISTERS) setmaxnreg_dec<Tr::PRODUCER_REGISTERS>();
        const MoESm90StreamK sk = stream_k();
        int stage = 0;
        uint32_t phase = 0;
        int table = 0;  // the smem row tables are a double-buffered A-row table here (a_row, then pair)
        for (int64_t j = 0, t = first_tile;; ++j, t += tile_stride) {
            MoESm90Tile tile;
            if (!piece_at(j, t, tile, sk)) break;  // past the valid m-blocks (or the stream-K range): so is every later one
            if (tile.num_tiles == 0) continue;  // nothing to load: expert not owned, or an empty split range
            // Every producer thread passed the previous tile's barrier after its last read of this table
            // (two tiles back), so it may be rewritten now.
            int32_t* a_rows = table == 0 ? sm.a_row : sm.pair;
            table ^= 1;
            for (int r = tid; r < BLOCK_M; r += Tr::PRODUCER_THREADS) {
                const int32_t p = moe_sorted_pair(sorted_token_ids, tile.row0 + r, BLOCK_M, num_valid_tokens);
                a_rows[r] = p >= 0 && p < num_valid_tokens ? p / top_k : -1;
            }
            bar_sync<Tr::PRODUCER_BARRIER, Tr::PRODUCER_THREADS>();
            int32_t b_row, b_row_up;
            moe_sm90_b_rows<Tr::FUSED>(tile, N, b_row, b_row_up);
            const MoESm90ASources<T, BLOCK_M> a = moe_sm90_a_sources<T, BLOCK_M>(a_rows, A, stride_am, tid);
            for (int k = 0; k < tile.num_tiles; ++k) {
                moe_sm90_produce_k_tile<T, BLOCK_M, BLOCK_N, STAGES, Tr::FUSED>(
                    sm, a, &b_map, A, K, b_row, b_row_up, tile, k, stage, phase, tid, -1, true,
                    MUL_ROUTED_WEIGHT ? MOE_SM90_DIAG_GEMM2 : 0);
                if (++stage == STAGES) {
                    stage = 0;
                    phase ^= 1;
                }
            }
        }
        cp_async_wait_all();
    } else if constexpr (Tr::PINGPONG) {
        // ===== Consumer warpgroups, ping-pong =====
        if constexpr (Tr::REBALANCE_REGISTERS) setmaxnreg_inc<Tr::CONSUMER_REGISTERS>();
        const int ctid = tid - Tr::PRODUCER_THREADS;
        // Broadcast from lane 0 so the compiler knows it warp-uniform.
        const int wg = __shfl_sync(MOE_FULL_MASK, ctid / Tr::WARPGROUP_THREADS, 0);
        const int warp = ctid / 32;  // its staging rows
        const int wq = warp % 4;     // owns rows [16 wq, 16 wq + 16) of each 64-row half of its tiles
        const int lane = tid % 32;

        using OutT = typename moe_conditional<SPLIT_MODE == 0 || SPLIT_MODE == 3, T, float>::type;
        OutT* out = static_cast<OutT*>(C);
        if constexpr (SPLIT_MODE == 2) out += static_cast<int64_t>(blockIdx.y) * (num_valid_tokens * stride_cm);
        unsigned char* staging = sm.base + Smem::SMEM_BYTES + warp * Tr::WARP_STAGING_BYTES;
        // Descriptors of stage 0, k step 0, rows [0, 64); half h adds 64 rows, stage s and step kk
        // (s * STAGE_BYTES + 32 kk) >> 4.
        const uint64_t desc_a0 = wgmma_desc_k_major_sw128(sm.a);
        const uint64_t desc_b0 = wgmma_desc_k_major_sw128(sm.b);
        const int64_t out_n = Tr::FUSED ? N / 2 : N;
        const auto schedule = [&](int64_t t, MoESm90Tile& tile) -> bool {
            return t < num_tiles &&
                   moe_sm90_tile_at<BLOCK_M, BLOCK_N, Tr::BLOCK_K>(tile, t, blockIdx.y, expert_ids, total_padded, N, K,
                                                                   split_k, group_size_m, max_padded, num_valid_tokens);
        };
        // The ring position of this warpgroup's next K tile: it moves past the other's K tiles too.
        int stage = 0;
        uint32_t phase = 0;
        const auto skip = [&](int k_tiles) {
            const int s = stage + k_tiles;
            stage = s % STAGES;
            phase ^= static_cast<uint32_t>(s / STAGES) & 1u;
        };
        // The program's tiles t_j = first_tile + j * tile_stride (the walk ends at the first without an
        // m-block); warpgroup w takes j = w, w + 2, ... Each warpgroup arrives at the other's order
        // barrier once per tile it takes, right after issuing its K loop; each waits on its own before
        // every tile but the walk's first, and once more at its end when the walk's last tile is the
        // other's: so every arrival is waited for, and a warpgroup waits for the full barrier of a ring
        // position only after every earlier position was waited for (no stale parity can pass).
        MoESm90Tile tile;
        int64_t t = first_tile;
        bool have = schedule(t, tile);
        if (wg == 1) {
            const bool have_first = have;
            if (have_first) skip(tile.num_tiles);
            t += tile_stride;
            have = have_first && schedule(t, tile);
            if (have_first && !have) bar_sync_id<2 * Tr::WARPGROUP_THREADS>(Tr::ORDER_BARRIER + 1);
        }
        bool wait_turn = wg == 1;
        while (have) {
            // Lane i < 16: the pair index (-1: padding) and routed weight of the warp's row i of half h.
            int32_t pair[Tr::HALVES];
            float weight[Tr::HALVES];
#pragma unroll
            for (int h = 0; h < Tr::HALVES; ++h) {
                pair[h] = -1;
                weight[h] = 0.0f;
                if (lane < Tr::WARP_ROWS) {
                    const int row = 64 * h + Tr::WARP_ROWS * wq + lane;
                    const int32_t p = moe_sorted_pair(sorted_token_ids, tile.row0 + row, BLOCK_M, num_valid_tokens);
                    if (p >= 0 && p < num_valid_tokens) {
                        pair[h] = p;
                        if constexpr (MUL_ROUTED_WEIGHT) weight[h] = topk_weights[p];
                    }
                }
            }
            float acc[Tr::HALVES][Tr::ACC];
#pragma unroll
            for (int h = 0; h < Tr::HALVES; ++h)
#pragma unroll
                for (int i = 0; i < Tr::ACC; ++i) acc[h][i] = 0.0f;
            const auto fence_acc = [&] {
#pragma unroll
                for (int h = 0; h < Tr::HALVES; ++h)
#pragma unroll
                    for (int i = 0; i < Tr::ACC; ++i) wgmma_fence_operand(acc[h][i]);
            };
            const auto issue = [&](int s) {
                moe_sm90_mma_k_tile_blocks<T, BLOCK_N, Tr::K_STEPS, Tr::HALVES, Smem::A_STAGE_BYTES, Smem::B_STAGE_BYTES>(
                    acc, desc_a0, desc_b0, s);
            };
            if (wait_turn) bar_sync_id<2 * Tr::WARPGROUP_THREADS>(Tr::ORDER_BARRIER + wg);
            wait_turn = true;
            MoESm90Tile other, next;
            bool have_other = false, have_next = false;
            moe_sm90_consume_tile<STAGES>(sm.full, sm.empty, tile.num_tiles, lane, stage, phase, issue, [&] {
                // The other warpgroup's turn; then the next two tiles' schedules, under the last products.
                bar_arrive_id<2 * Tr::WARPGROUP_THREADS>(Tr::ORDER_BARRIER + (wg ^ 1));
                have_other = schedule(t + tile_stride, other);
                have_next = have_other && schedule(t + 2 * tile_stride, next);
            });
            fence_acc();

            // --- Epilogue, under the other warpgroup's K loop ---
            if (!(SPLIT_MODE == 1 && tile.num_tiles == 0)) {  // (adding zeros changes nothing)
#pragma unroll
                for (int h = 0; h < Tr::HALVES; ++h)
                    moe_sm90_finish_warp_rows<T, BLOCK_N, SPLIT_MODE, MUL_ROUTED_WEIGHT, FUSED_ACT,
                                              Tr::STAGING_ROW_BYTES>(acc[h], weight[h], pair[h], staging, out,
                                                                     Tr::FUSED ? tile.n0 / 2 : tile.n0, out_n,
                                                                     stride_cm, lane);
            }
            if (have_other) skip(other.num_tiles);
            if (have_other && !have_next) bar_sync_id<2 * Tr::WARPGROUP_THREADS>(Tr::ORDER_BARRIER + wg);
            tile = next;
            have = have_next;
            t += 2 * tile_stride;
        }
    } else {
        // ===== Consumer warpgroups =====
        if constexpr (Tr::REBALANCE_REGISTERS) setmaxnreg_inc<Tr::CONSUMER_REGISTERS>();
        const MoESm90StreamK sk = stream_k();
        const int ctid = tid - Tr::PRODUCER_THREADS;
        // With half tiles broadcast from lane 0, so the compiler knows it warp-uniform (their wgmma
        // descriptors then stay in uniform registers).
        const int wg = Tr::HALF ? __shfl_sync(MOE_FULL_MASK, ctid / Tr::WARPGROUP_THREADS, 0)
                                : ctid / Tr::WARPGROUP_THREADS;  // owns tile rows [64 wg, 64 wg + 64)
        const int warp = ctid / 32;  // owns tile rows [16 warp, 16 warp + 16) (a half tile: 16 (warp % 4) on)
        const int lane = tid % 32;

        using OutT = typename moe_conditional<SPLIT_MODE == 0 || SPLIT_MODE == 3, T, float>::type;
        OutT* out = static_cast<OutT*>(C);
        if constexpr (SPLIT_MODE == 2) out += static_cast<int64_t>(blockIdx.y) * (num_valid_tokens * stride_cm);
        unsigned char* staging = sm.base + Smem::SMEM_BYTES + warp * Tr::WARP_STAGING_BYTES;

        // Descriptors of stage 0, k step 0; stage s and step kk add (s * STAGE_BYTES + 32 kk) >> 4.
        const uint64_t desc_a0 = wgmma_desc_k_major_sw128(sm.a + wg * 64 * Smem::ROW_BYTES);
        const uint64_t desc_b0 = wgmma_desc_k_major_sw128(sm.b);
        // A half tile's: rows [0, 64) of A, B rows [wg * HALF_N, (wg + 1) * HALF_N).
        const uint64_t desc_a0_half = wgmma_desc_k_major_sw128(sm.a);
        const uint64_t desc_b0_half = wgmma_desc_k_major_sw128(sm.b + wg * Tr::HALF_N * Smem::ROW_BYTES);
        const int64_t out_n = Tr::FUSED ? N / 2 : N;
        // A tile's schedule; false: no tile (past the valid m-blocks, as is every later index). In
        // mode 0 the next tile's is computed in the drain of the current tile's K loop, under its last
        // wgmma, so its global loads do not stall the consumers between tiles. (Skipping the products
        // of a warpgroup whose rows are all padding, as moe_gemm_sm90 does, measured 6-9% slower
        // here: NOTES v14.)
        const auto schedule = [&](int64_t j, int64_t t, MoESm90Tile& tile) -> bool {
            if (!piece_at(j, t, tile, sk)) return false;
            if constexpr (Tr::HALF) {
                // Align pads each expert's run at its end, so row 64 decides (whole K ranges only).
                if (tile.num_tiles > 0 && tile.stream == 0 && tile.num_tiles >= MOE_SM90_HALF_MIN_K_TILES &&
                    tile.num_tiles <= MOE_SM90_HALF_MAX_K_TILES) {
                    const int32_t p = moe_sorted_pair(sorted_token_ids, tile.row0 + BLOCK_M / 2, BLOCK_M,
                                                      num_valid_tokens);
                    tile.half = !(p >= 0 && p < num_valid_tokens);
                }
            }
            return true;
        };
        int stage = 0;
        uint32_t phase = 0;
        MoESm90Tile tile;
        bool have = schedule(0, first_tile, tile);
        // Mode 0 computes the next tile's schedule in the K loop's drain; the split modes (whose
        // epilogue needs more registers) after the epilogue.
        constexpr bool EARLY = MOE_SM90_EARLY_SCHEDULE && (SPLIT_MODE == 0 || SPLIT_MODE == 3);
        // With it, GEMM2's consumers load the next tile's sorted ids there too (MOE_SM90_PAIR_PREFETCH), so
        // no tile starts with a wait for them: the routed weights' loads, which need them, issue at once.
        // (GEMM1 loads no weight: it measured +0.25% there, so it keeps the load at the tile's start.)
        constexpr bool PAIR_EARLY = EARLY && MOE_SM90_PAIR_PREFETCH != 0 && MUL_ROUTED_WEIGHT;
        // Lane i < 16: the sorted id of the warp's row i of tile tl (-1 on the other lanes).
        const auto load_pair = [&](const MoESm90Tile& tl) -> int32_t {
            const bool hf = Tr::HALF && __shfl_sync(MOE_FULL_MASK, tl.half ? 1 : 0, 0) != 0;
            if (lane >= Tr::WARP_ROWS) return -1;
            const int row = (hf ? warp % 4 : warp) * Tr::WARP_ROWS + lane;
            return moe_sorted_pair(sorted_token_ids, tl.row0 + row, BLOCK_M, num_valid_tokens);
        };
        int32_t tile_p = -1, next_p = -1;
        if constexpr (PAIR_EARLY) {
            if (have) tile_p = load_pair(tile);
        }
        for (int64_t j = 0, t = first_tile; have; ++j, t += tile_stride) {
            MoESm90Tile next;
            bool have_next = false;
            const auto prefetch = [&] {
                if constexpr (EARLY) have_next = schedule(j + 1, t + tile_stride, next);
                if constexpr (PAIR_EARLY) next_p = have_next ? load_pair(next) : -1;
            };
            if ((SPLIT_MODE == 1 || SPLIT_MODE == 3) && tile.num_tiles == 0) {  // adding zeros changes nothing
                have_next = schedule(j + 1, t + tile_stride, next);
                tile = next;
                have = have_next;
                if constexpr (PAIR_EARLY) tile_p = have_next ? load_pair(next) : -1;  // (mode 3) the next tile's ids
                continue;
            }

            // Warp-uniform (every lane loaded the same row), and known so to the compiler.
            const bool half = Tr::HALF && __shfl_sync(MOE_FULL_MASK, tile.half ? 1 : 0, 0) != 0;
            // Lane i < 16: pair index of the warp's row i (-1: padding, not stored) and its routed
            // weight, loaded now and used after the K loop.
            int32_t pair = -1;
            float weight = 0.0f;
            if constexpr (PAIR_EARLY) {
                if (tile_p >= 0 && tile_p < num_valid_tokens) {
                    pair = tile_p;
                    weight = topk_weights[tile_p];  // (PAIR_EARLY: GEMM2 only)
                }
            } else if (lane < Tr::WARP_ROWS) {
                const int row = (half ? warp % 4 : warp) * Tr::WARP_ROWS + lane;
                const int32_t p = moe_sorted_pair(sorted_token_ids, tile.row0 + row, BLOCK_M, num_valid_tokens);
                if (p >= 0 && p < num_valid_tokens) {
                    pair = p;
                    if constexpr (MUL_ROUTED_WEIGHT) weight = topk_weights[p];
                }
            }

            // Stream-K, the last K piece of a split tile: the other pieces' partial sums are added to its
            // products after the K loop, in K order (a fixed order). They run beside it, the same
            // length. Thread 0 waits for all of them here, before the accumulators are live (a wait
            // loop beside them costs spills).
            const bool gather = stream && tile.stream == 2;
            bool lost = false;  // a wait timed out: the tile is stored as NaN (never a hang)
            if (gather) {
                // The tile's other pieces: programs b - R, b - 2R, ... (pieces S - 2, S - 3, ...).
                if (ctid == 0) {
                    for (int s = 0; s + 1 < sk.splits; ++s)
                        if (!wait_flag_and_clear(sk_flags + blockIdx.x - (sk.splits - 1 - s) * sk.rem)) lost = true;
                }
                lost = bar_sync_or<Tr::STREAM_BARRIER, Tr::CONSUMER_THREADS>(lost);
            }
            float acc[Tr::ACC];
#pragma unroll
            for (int i = 0; i < Tr::ACC; ++i) acc[i] = 0.0f;
            // One K loop per tile kind, chosen outside the loop: a wgmma whose shape is chosen per K
            // tile inside one loop costs every tile (ptxas closes each branch with a dummy wgmma).
            const auto issue = [&](int s, auto columns) {
                constexpr int COLS = decltype(columns)::value;
                constexpr bool HALF_TILE = COLS != BLOCK_N;
                float(&acc_used)[COLS / 2] = *reinterpret_cast<float(*)[COLS / 2]>(&acc[0]);
                moe_sm90_mma_k_tile<T, COLS, Tr::K_STEPS>(
                    acc_used,
                    (HALF_TILE ? desc_a0_half : desc_a0) + static_cast<uint64_t>((s * Smem::A_STAGE_BYTES) >> 4),
                    (HALF_TILE ? desc_b0_half : desc_b0) + static_cast<uint64_t>((s * Smem::B_STAGE_BYTES) >> 4));
            };
            if (Tr::HALF && half) {
                moe_sm90_consume_tile<STAGES>(sm.full, sm.empty, tile.num_tiles, lane, stage, phase,
                                              [&](int s) { issue(s, moe_int_constant<Tr::HALF_N>()); }, prefetch);
            } else {
                moe_sm90_consume_tile<STAGES>(sm.full, sm.empty, tile.num_tiles, lane, stage, phase,
                                              [&](int s) { issue(s, moe_int_constant<BLOCK_N>()); }, prefetch);
            }
#pragma unroll
            for (int i = 0; i < Tr::ACC; ++i) wgmma_fence_operand(acc[i]);
            if (gather) {
                // (After the K loop: accumulators defined by other instructions inside the wgmma
                // pipeline would make ptxas serialize every wgmma.)
                // Through the warp's staging rows (4 KB: 8 vectors per lane), not registers: a batch is
                // copied in by cp.async, then each lane adds back its own vectors.
                const uint32_t stage_base = cvta_to_shared_u32(staging) + 16 * lane;
                __syncwarp();  // the warp's last epilogue is done with its staging rows
                for (int s = 0; s + 1 < sk.splits; ++s) {  // in K order
                    const int64_t p = blockIdx.x - (sk.splits - 1 - s) * sk.rem;
                    // After a lost wait, slot G (all bits set: NaN) instead: the tile is stored as NaN.
                    const float4* slot =
                        reinterpret_cast<const float4*>(sk_partials) + (lost ? gridDim.x : p) * int64_t{Tr::SLOT_VECTORS};
#pragma unroll
                    for (int b = 0; b < Tr::ACC / 32; ++b) {
#pragma unroll
                        for (int i = 0; i < 8; ++i)
                            cp_async_cg_16(stage_base + 512 * i, slot + (8 * b + i) * Tr::CONSUMER_THREADS + ctid, true);
                        cp_async_commit_group();
                        cp_async_wait_group<0>();
#pragma unroll
                        for (int i = 0; i < 8; ++i) {
                            const float4 v = *reinterpret_cast<const float4*>(staging + 512 * i + 16 * lane);
                            acc[32 * b + 4 * i] += v.x;
                            acc[32 * b + 4 * i + 1] += v.y;
                            acc[32 * b + 4 * i + 2] += v.z;
                            acc[32 * b + 4 * i + 3] += v.w;
                        }
                    }
                }
                __syncwarp();
            }

            // --- Epilogue (the ring is left to the producer, already loading the next tiles) ---
            constexpr int ROW_BYTES = Tr::STAGING_ROW_BYTES;
            if (stream && tile.stream == 1) {
                // A later K piece of a split tile: the partial sums to this program's slot, then its flag.
                float4* slot = reinterpret_cast<float4*>(sk_partials) + blockIdx.x * int64_t{Tr::SLOT_VECTORS};
#pragma unroll
                for (int i = 0; i < Tr::ACC / 4; ++i)
                    __stcg(slot + i * Tr::CONSUMER_THREADS + ctid,
                           make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]));
                __threadfence();
                bar_sync<Tr::STREAM_BARRIER, Tr::CONSUMER_THREADS>();
                if (ctid == 0) st_release_gpu(sk_flags + blockIdx.x, 1);
            } else {  // a whole tile, or a split tile's first piece with the later ones added
                if (Tr::HALF && half) {
                    moe_sm90_finish_warp_rows<T, Tr::HALF_N, SPLIT_MODE, MUL_ROUTED_WEIGHT, 0, ROW_BYTES>(
                        acc, weight, pair, staging, out, tile.n0 + wg * Tr::HALF_N, out_n, stride_cm, lane);
                } else if (!(MUL_ROUTED_WEIGHT && (MOE_SM90_DIAG_GEMM2 & 32) != 0) ||
                           __float_as_uint(acc[0]) == 0x7fc0deadu) {
                    // Mode 3 adds the row into its token's output row.
                    const int32_t store_pair = MUL_ROUTED_WEIGHT && (MOE_SM90_DIAG_GEMM2 & 64) != 0 ? -1
                                               : SPLIT_MODE == 3 && pair >= 0                   ? pair / combine_k
                                                                                                : pair;
                    moe_sm90_finish_warp_rows<T, BLOCK_N, SPLIT_MODE, MUL_ROUTED_WEIGHT, FUSED_ACT, ROW_BYTES>(
                        acc, weight, store_pair, staging, out, Tr::FUSED ? tile.n0 / 2 : tile.n0, out_n, stride_cm,
                        lane);
                }
            }
            if constexpr (!EARLY) have_next = schedule(j + 1, t + tile_stride, next);
            tile = next;
            have = have_next;
            tile_p = next_p;
        }
    }
}
