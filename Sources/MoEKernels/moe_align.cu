// moe_align.cu: sort the (token, slot) pairs by expert and pad each expert's run to BLOCK_M.
//
// Pairs: numel = M * k, pair i = t * k + j, expert topk_ids[i]; ids outside [0, E) are ignored.
// Result (bit-exact, no host sync):
//   sorted_ids [max_padded]: for e = 0..E-1 in order, the pairs of expert e in ascending i,
//       padded with the value numel up to a multiple of block_m; then numel up to max_padded.
//   expert_ids [max_blocks]: per block_m block, its expert e (or expert_map[e] when a map is
//       given; -1 marks an expert this rank does not own); -1 for blocks >= total / block_m.
//   total_padded [1]: sum over e of roundup(count_e, block_m).
// Host sizes: max_padded >= total_padded, at most min(numel + E * (block_m - 1), numel * block_m)
// (each expert pads by < block_m; each block holds a pair); max_blocks = ceil(max_padded / block_m).
// Limits: 1 <= E <= 512, block_m >= 1, numel + E * block_m < 2^31.
//
// Two launch sequences compute the same result; pick by size (recommended: single for
// numel <= 8192, the three-kernel sequence above that). Both write every entry of
// sorted_ids, expert_ids and total_padded, so nothing needs zeroing.
//
// Two layouts in one pass: with block_m2 > 0 (and the *2 outputs, sized as above for block_m2) both
// sequences also write the layout padded to block_m2, exactly what a second align of the same ids
// with block_m2 would write (a plan whose GEMMs have different BLOCK_M needs both; the counts and each
// pair's rank in its expert are shared, so the second layout costs its stores only). block_m2 = 0 and
// null *2 pointers: one layout.
//
// A. One launch, numel <= 8192 (a larger numel breaks the host's contract and traps):
//   moe_align_single<<<1 + P, 512, stage_bytes>>>(topk_ids, numel, num_experts, block_m, expert_map,
//       sorted_ids, expert_ids, total_padded, max_padded,
//       block_m2, sorted_ids2, expert_ids2, total_padded2, max_padded2,
//       prefetch_base, prefetch_rows, prefetch_pitch, prefetch_bytes)
//   Static shared memory 39 KB. The ids are loaded once (ceil(numel / 512) per thread); per-warp
//   counts and each pair's rank in its warp (warp_peers: a ballot per bit of the expert index; shared
//   atomics); per expert its total and each warp's start; a scan of the experts' block counts; then a
//   warp per expert writes its padding and block ids while the pairs scatter (5 block barriers, a
//   sixth before a staged copy-out).
//   The runs (sorted_ids[0, total_padded)) are built in the dynamic shared memory when total_padded
//   * 4 <= stage_bytes and copied out coalesced; otherwise stored straight to sorted_ids (any
//   stage_bytes, 0 included, gives the same result). The second layout's runs follow the first's
//   (at a 16-byte boundary) when both fit, else go straight to sorted_ids2. NOTES v21, v22, v26.
//
// B. Three launches (a chunk: C = 256 * MOE_ALIGN_CHUNK_ITEMS pairs, 1024 by default, the host reading
//    the same define; num_chunks = max(1, ceil(numel / C)); scratch: int32
//    chunk_counts[num_chunks * E], no zeroing needed: kernel 1 writes all of it):
//   1. moe_align_count<<<num_chunks, 256, 0>>>(topk_ids, numel, num_experts, chunk_counts)
//        program c counts the pairs of chunk c (pairs [C c, C c + C)) per expert
//        (2 KB static shared memory) and writes chunk_counts[c * E + e].
//   2. moe_align_scan<<<1, 1024, 0>>>(chunk_counts, num_chunks, numel, num_experts, block_m,
//        expert_map, sorted_ids, expert_ids, total_padded, max_padded,
//        block_m2, chunk_offsets2, sorted_ids2, expert_ids2, total_padded2, max_padded2)
//        sums the counts per expert, lays out the padded runs, writes expert_ids, the
//        padding entries of sorted_ids, total_padded, and replaces chunk_counts[c * E + e]
//        by the first position in sorted_ids of chunk c's pairs of expert e (6 KB static);
//        with block_m2 > 0 the same for the second layout, its positions into
//        chunk_offsets2[c * E + e] (a second scratch of num_chunks * E).
//   3. moe_align_scatter<<<num_chunks, 256, 0>>>(topk_ids, numel, num_experts, chunk_counts,
//        sorted_ids, chunk_offsets2, sorted_ids2)
//        program c writes the pair indices of chunk c to their positions, stably: warp w of
//        8 owns the 32 u pairs [C c + 32uw, +32u), u = ceil(pairs of the chunk / 256) <=
//        MOE_ALIGN_CHUNK_ITEMS, ranked as in A; the chunk's pairs are put in sorted order in shared
//        memory and stored from there, an expert's segment at a time (28 KB static at C = 1024); with
//        sorted_ids2 (not null) each segment is stored in both layouts.
//
// Spare programs of A (P >= 0 past program 0; P = 0 and prefetch_rows = 0: none): after
// griddepcontrol.wait they only start an L2 prefetch of the first prefetch_bytes of rows [0,
// prefetch_rows) at prefetch_base, prefetch_pitch bytes apart (prefetch_rows_l2: the forward points
// it at the weight rows GEMM1's first wave reads first, so DRAM streams them while align runs; NOTES
// v28), and exit. They change no result. (In B's first kernel they delayed the two after it: NOTES v28.)
#include "moe_common.cuh"

namespace moe_align_detail {
constexpr int MAX_EXPERTS = 512;
constexpr int ITEMS_PER_LANE = 16;  // most pairs per lane per tile (a warp owns at most 32 * 16 = 512)
constexpr int CHUNK_WARPS = 8;
constexpr int CHUNK_THREADS = CHUNK_WARPS * 32;
#ifndef MOE_ALIGN_CHUNK_ITEMS
#define MOE_ALIGN_CHUNK_ITEMS 4  // pairs per lane of the three-launch kernels (NOTES v26: 16 before); the
                                 // host reads this define too (CUDAMoELayer.alignChunk)
#endif
constexpr int CHUNK_ITEMS = MOE_ALIGN_CHUNK_ITEMS;
static_assert(CHUNK_ITEMS >= 1 && CHUNK_ITEMS <= ITEMS_PER_LANE, "MOE_ALIGN_CHUNK_ITEMS in 1..16");
constexpr int CHUNK = CHUNK_WARPS * 32 * CHUNK_ITEMS;  // pairs per program of kernels 1 and 3 (1024)
constexpr int SCAN_THREADS = 1024;
constexpr int SINGLE_WARPS = 16;
constexpr int SINGLE_THREADS = SINGLE_WARPS * 32;
constexpr int SINGLE_LIMIT = SINGLE_THREADS * ITEMS_PER_LANE;  // 8192: the most pairs moe_align_single takes

/// The L2 prefetch of the one-launch kernel's spare programs (NOTES v28): the first `bytes` of rows [0,
/// rows) of a row-major array (`pitch` bytes apart), one bulk prefetch per row, row r by worker r mod
/// workers. base, pitch and bytes must keep every address 16-byte aligned and bytes a multiple of 16
/// (the host's contract, CUDAMoELayer.alignPrefetch).
MOE_DEVICE void prefetch_rows_l2(const unsigned char* base, int64_t rows, int64_t pitch, int32_t bytes,
                                 int64_t worker, int64_t workers) {
    for (int64_t r = worker; r < rows; r += workers) prefetch_l2_bulk(base + r * pitch, static_cast<uint32_t>(bytes));
}

MOE_DEVICE int32_t expert_of(const int32_t* topk_ids, int64_t i, int64_t numel, int32_t num_experts) {
    const int32_t e = i < numel ? topk_ids[i] : -1;
    return (e >= 0 && e < num_experts) ? e : -1;
}

/// Bits of an expert index: the bit length of num_experts - 1 (0 for one expert, 9 for 512).
MOE_DEVICE int expert_bits(int32_t num_experts) { return num_experts > 1 ? 32 - __clz(num_experts - 1) : 0; }

#ifndef MOE_ALIGN_BALANCE
#define MOE_ALIGN_BALANCE 0  // 1 (a diagnostic, the one-launch kernel's first layout): each expert's rows split
                             // evenly over its blocks, each block's rows first (NOTES v42)
#endif
#ifndef MOE_ALIGN_SCATTER_STAGE
#define MOE_ALIGN_SCATTER_STAGE 1  // 0: the three-launch scatter stores each pair directly (before NOTES v22)
#endif
#ifndef MOE_ALIGN_MATCH_ANY
#define MOE_ALIGN_MATCH_ANY 0  // 1: peers by __match_any_sync (before NOTES v22), for A/Bs
#endif
/// peers[it] = the lanes of the warp whose expert equals this lane's in item it < items, for experts in
/// [0, 2^bits); unspecified for e < 0 (callers skip those lanes) and for it >= items. All lanes call it,
/// converged, with the same items and bits. One ballot per bit of the index (bits <= 9), the bits
/// outermost so that the items' ballots are independent: __match_any_sync costs more per distinct value
/// in the warp (NOTES v22).
template <int N>
MOE_DEVICE void warp_peers(const int32_t (&e)[N], uint32_t (&peers)[N], int items, int bits) {
#if MOE_ALIGN_MATCH_ANY
    (void)bits;
#pragma unroll
    for (int it = 0; it < N; ++it) peers[it] = it < items ? __match_any_sync(MOE_FULL_MASK, e[it]) : 0u;
#else
    // Items in groups of 4 behind a branch: predicated-off ballots of absent items still issue (16 items x
    // 9 bits cost a one-item batch a microsecond).
    constexpr int GROUP = 4;
#pragma unroll
    for (int g = 0; g < N; g += GROUP) {
        if (g >= items) break;  // the same in every lane
#pragma unroll
        for (int it = g; it < g + GROUP && it < N; ++it) peers[it] = __ballot_sync(MOE_FULL_MASK, e[it] >= 0);
#pragma unroll
        for (int b = 0; b < 9; ++b) {
            if (b >= bits) break;  // the same in every lane
#pragma unroll
            for (int it = g; it < g + GROUP && it < N; ++it) {
                if (it < items) {  // the same in every lane
                    const uint32_t ones = __ballot_sync(MOE_FULL_MASK, (e[it] >> b) & 1);
                    peers[it] &= ((e[it] >> b) & 1) ? ones : ~ones;
                }
            }
        }
    }
#endif
}

/// The same for one item.
MOE_DEVICE uint32_t warp_peers(int32_t e, int bits) {
    const int32_t one[1] = {e};
    uint32_t peers[1];
    warp_peers(one, peers, 1, bits);
    return peers[0];
}

/// Adds the per-expert counts of pairs [begin, end) into counts (shared), all threads of the block.
/// Each thread loads COUNT_UNROLL ids before using any (one memory round trip per batch, not per id):
/// a chunk's worth at most (a 256-thread block covers it in one batch), never more than 8.
constexpr int COUNT_UNROLL = CHUNK_ITEMS < 8 ? CHUNK_ITEMS : 8;
MOE_DEVICE void count_pairs(const int32_t* topk_ids, int64_t begin, int64_t end, int64_t numel, int32_t num_experts,
                            int32_t* counts) {
    const int lane = threadIdx.x & 31;
    const int64_t stride = blockDim.x;
    const int bits = expert_bits(num_experts);
    // Whole warps iterate together so that __match_any_sync sees every lane.
    for (int64_t base = begin + (threadIdx.x & ~31); base < end; base += stride * COUNT_UNROLL) {
        int32_t e[COUNT_UNROLL];
#pragma unroll
        for (int u = 0; u < COUNT_UNROLL; ++u) {
            const int64_t i = base + u * stride + lane;
            e[u] = expert_of(topk_ids, i, i < end ? numel : 0, num_experts);
        }
        uint32_t same[COUNT_UNROLL];
        warp_peers(e, same, COUNT_UNROLL, bits);
#pragma unroll
        for (int u = 0; u < COUNT_UNROLL; ++u)
            if (e[u] >= 0 && (same[u] & lanemask_lt()) == 0) atomicAdd(&counts[e[u]], __popc(same[u]));
    }
}

/// Exclusive prefix sum of `value` over the block's threads in thread order; `total` receives the sum.
/// Every thread calls it, converged (at most 32 warps); warp_totals: 32 ints of shared memory. Two
/// barriers, the last before warp_totals is read back (so a barrier before its next use suffices).
MOE_DEVICE int32_t block_exclusive_scan(int32_t value, int32_t* warp_totals, int32_t& total) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    int32_t inclusive = warp_inclusive_scan(value, lane);
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        int32_t w = lane < warps ? warp_totals[lane] : 0;
        w = warp_inclusive_scan(w, lane);
        warp_totals[lane] = w;
    }
    __syncthreads();
    if (warp > 0) inclusive += warp_totals[warp - 1];
    total = warp_totals[31];  // lanes >= warps repeat the last total
    return inclusive - value;
}

/// The bytes of dynamic shared memory this launch was given.
MOE_DEVICE uint32_t dynamic_smem_bytes() {
    uint32_t bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}

/// dst[0, n) = src[0, n) (src 16-byte aligned shared memory), all threads of the block, coalesced: 16-byte
/// stores when dst is 16-byte aligned.
MOE_DEVICE void copy_out(const int32_t* src, int32_t* dst, int32_t n) {
    int32_t q = threadIdx.x;
    if ((reinterpret_cast<unsigned long long>(dst) & 15) == 0) {
        const int4* src4 = reinterpret_cast<const int4*>(src);
        int4* dst4 = reinterpret_cast<int4*>(dst);
        for (int32_t v = threadIdx.x; v < n / 4; v += blockDim.x) dst4[v] = src4[v];
        q = n / 4 * 4 + threadIdx.x;
    }
    for (; q < n; q += blockDim.x) dst[q] = src[q];
}

/// Lays out the padded runs: this thread's expert count (thread e has expert e's; blockDim.x >=
/// num_experts, 0 past them) -> first_block[0, E] (shared; expert e's run is blocks [first_block[e],
/// first_block[e + 1])) by a block scan of the experts' block counts, and *total_padded. Returns the
/// blocks in use. All threads call it; it ends with a barrier.
MOE_DEVICE int32_t lay_out_runs(int32_t count, int32_t* first_block, int32_t* warp_totals, int32_t num_experts,
                                int32_t block_m, int32_t* total_padded) {
    const int tid = threadIdx.x;
    const int32_t blocks = tid < num_experts ? (count + block_m - 1) / block_m : 0;
    int32_t total_blocks;
    const int32_t first = block_exclusive_scan(blocks, warp_totals, total_blocks);
    if (tid < num_experts) first_block[tid] = first;
    if (tid == 0) {
        first_block[num_experts] = total_blocks;
        *total_padded = total_blocks * block_m;
    }
    __syncthreads();
    return total_blocks;
}

/// A warp per expert writes its run's padding entries (runs[q] = numel; runs: sorted_ids, or a staging
/// copy of its first total_blocks * block_m entries) and its blocks' expert id (mapped); then the tails
/// past the runs: sorted_ids up to max_padded, expert_ids up to ceil(max_padded / block_m). counts
/// (shared) and first_block as lay_out_runs left them. All threads call it; no barrier. 32-bit positions
/// inside the runs (below 2^31) and no division by block_m: a 64-bit one per position cost
/// microseconds (NOTES v21). per_block (shared; MOE_ALIGN_BALANCE only, else null): expert e's rows come
/// per_block[e] to each block of its run but the last, each block's rows first, so each block pads its own
/// tail.
MOE_DEVICE void write_padding(const int32_t* counts, const int32_t* first_block, int32_t total_blocks, int64_t numel,
                              int32_t num_experts, int32_t block_m, const int32_t* expert_map, int32_t* runs,
                              int32_t* sorted_ids, int32_t* expert_ids, int64_t max_padded,
                              const int32_t* per_block = nullptr) {
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    const int32_t pad_value = static_cast<int32_t>(numel);
    for (int e = threadIdx.x >> 5; e < num_experts; e += warps) {
        const int32_t c = counts[e];
        const int32_t b0 = first_block[e];
        const int32_t b1 = first_block[e + 1];
        const int32_t id = expert_map != nullptr ? expert_map[e] : e;
        if (per_block != nullptr) {
            const int32_t per = per_block[e];
            for (int32_t b = b0; b < b1; ++b) {
                const int32_t used = min(per, c - (b - b0) * per);
                for (int32_t q = b * block_m + used + lane; q < (b + 1) * block_m; q += 32) runs[q] = pad_value;
            }
        } else {
            for (int32_t q = b0 * block_m + c + lane; q < b1 * block_m; q += 32) runs[q] = pad_value;
        }
        for (int32_t blk = b0 + lane; blk < b1; blk += 32) expert_ids[blk] = id;
    }
    const int64_t total = static_cast<int64_t>(total_blocks) * block_m;
    for (int64_t q = total + threadIdx.x; q < max_padded; q += blockDim.x) sorted_ids[q] = pad_value;
    const int64_t max_blocks = ceil_div(max_padded, block_m);
    for (int64_t blk = total_blocks + threadIdx.x; blk < max_blocks; blk += blockDim.x) expert_ids[blk] = -1;
}

/// Loads the ids of this warp's pairs, `items` per lane (item it of lane l: pair warp_begin + 32 it + l,
/// those at or past `end` absent), into ids (-1: absent or not an expert) and ranks them stably:
/// rank[it] = the pair's place among the warp's pairs of its expert, in pair order; my_counts[e]
/// (shared, this warp's, zeroed by the block before the call) ends as the warp's count of expert e.
/// Every load is issued before any is used (clamped in range, not branched around), the items' peers
/// are independent, and each item's leader per expert adds its lanes with a shared atomic whose return
/// is the count before them (__syncwarp orders the items). All threads of the block call it, converged;
/// its one barrier (after the loads, before the atomics) orders the caller's zeroing. NOTES v21, v22.
template <int N>
MOE_DEVICE void rank_warp_pairs(const int32_t* topk_ids, int64_t warp_begin, int64_t end, int items,
                                int32_t num_experts, int32_t* my_counts, int32_t (&ids)[N], int32_t (&rank)[N]) {
    const int lane = threadIdx.x & 31;
    const uint32_t below = lanemask_lt();
#pragma unroll
    for (int it = 0; it < N; ++it) ids[it] = -1;
    if (end > 0) {
#pragma unroll
        for (int it = 0; it < N; ++it) {
            const int64_t i = warp_begin + it * 32 + lane;
            ids[it] = topk_ids[i < end ? i : end - 1];
        }
    }
#pragma unroll
    for (int it = 0; it < N; ++it) {
        const int64_t i = warp_begin + it * 32 + lane;
        const bool ok = it < items && i < end && ids[it] >= 0 && ids[it] < num_experts;
        ids[it] = ok ? ids[it] : -1;
    }
    uint32_t same[N];
    warp_peers(ids, same, items, expert_bits(num_experts));
    __syncthreads();
#pragma unroll
    for (int it = 0; it < N; ++it) {
        if (it < items) {  // the same in every lane
            const int32_t e = ids[it];
            const int leader = __ffs(same[it]) - 1;
            int32_t before = 0;
            if (e >= 0 && leader == lane) before = atomicAdd(&my_counts[e], __popc(same[it]));
            __syncwarp();
            rank[it] = __shfl_sync(MOE_FULL_MASK, before, leader) + __popc(same[it] & below);
        }
    }
}

/// Thread e (e < num_experts): the WARPS warps' counts of expert e (loaded together) replaced by their
/// exclusive prefix from `base`; returns base + expert e's count (base for threads past the experts).
template <int WARPS>
MOE_DEVICE int32_t warp_starts(int32_t* warp_counts, int32_t num_experts, int e, int32_t base) {
    if (e >= num_experts) return base;
    int32_t c[WARPS];
#pragma unroll
    for (int w = 0; w < WARPS; ++w) c[w] = warp_counts[w * num_experts + e];
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        warp_counts[w * num_experts + e] = base;
        base += c[w];
    }
    return base;
}

}  // namespace moe_align_detail

extern "C" __global__ void __launch_bounds__(moe_align_detail::SINGLE_THREADS, 1)
    moe_align_single(const int32_t* __restrict__ topk_ids, int64_t numel, int32_t num_experts, int32_t block_m,
                     const int32_t* __restrict__ expert_map, int32_t* __restrict__ sorted_ids,
                     int32_t* __restrict__ expert_ids, int32_t* __restrict__ total_padded, int64_t max_padded,
                     int32_t block_m2, int32_t* __restrict__ sorted_ids2, int32_t* __restrict__ expert_ids2,
                     int32_t* __restrict__ total_padded2, int64_t max_padded2,
                     const unsigned char* __restrict__ prefetch_base, int64_t prefetch_rows, int64_t prefetch_pitch,
                     int32_t prefetch_bytes) {
    griddepcontrol_wait_then_launch_dependents();
    using namespace moe_align_detail;
    if (blockIdx.x > 0) {  // a spare program: the L2 prefetch only
        prefetch_rows_l2(prefetch_base, prefetch_rows, prefetch_pitch, prefetch_bytes,
                             static_cast<int64_t>(blockIdx.x - 1) * blockDim.x + threadIdx.x,
                             static_cast<int64_t>(gridDim.x - 1) * blockDim.x);
        return;
    }
    constexpr int WARPS = SINGLE_WARPS;
    constexpr int THREADS = SINGLE_THREADS;
    __shared__ int32_t counts[MAX_EXPERTS];
    __shared__ int32_t first_block[MAX_EXPERTS + 1];  // expert e's run: blocks [first_block[e], first_block[e + 1])
    __shared__ int32_t first_block2[MAX_EXPERTS + 1];  // the same in the second layout (block_m2 > 0)
    __shared__ int32_t warp_totals[32];
    __shared__ int32_t warp_counts[WARPS * MAX_EXPERTS];  // per warp and expert: count, then the warp's start
    extern __shared__ int4 stage_words[];  // the launch's dynamic shared memory: the runs, when they fit
    int32_t* stage = reinterpret_cast<int32_t*>(stage_words);
    const int32_t stage_capacity = static_cast<int32_t>(dynamic_smem_bytes() / sizeof(int32_t));
    if (numel > SINGLE_LIMIT) __trap();  // the host's contract: one tile
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;

    // Warp w owns the pairs [32 w items, 32 (w + 1) items), `items` per lane, item `it` of lane l being
    // pair 32 (w items + it) + l: ascending pair order is warp, then item, then lane.
    const int items = static_cast<int>((numel + THREADS - 1) / THREADS);
    const int64_t warp_begin = static_cast<int64_t>(warp) * 32 * items;
    int32_t* my_counts = warp_counts + warp * num_experts;
    for (int e = tid; e < WARPS * num_experts; e += THREADS) warp_counts[e] = 0;
    int32_t ids[ITEMS_PER_LANE], rank[ITEMS_PER_LANE];
    rank_warp_pairs(topk_ids, warp_begin, numel, items, num_experts, my_counts, ids, rank);
    __syncthreads();

    // Thread e: expert e's count, each warp's count replaced by the warp's start within the run; then
    // the exclusive scan of the experts' block counts (one per thread) gives each run's first block.
    const int32_t count = warp_starts<WARPS>(warp_counts, num_experts, tid, 0);
    if (tid < num_experts) counts[tid] = count;
    const int32_t total_blocks = lay_out_runs(count, first_block, warp_totals, num_experts, block_m, total_padded);
    // The second layout (the other GEMM's BLOCK_M): the same counts and ranks, its own runs.
    const bool dual = block_m2 > 0;  // the same in every thread
    const int32_t total_blocks2 =
        dual ? lay_out_runs(count, first_block2, warp_totals, num_experts, block_m2, total_padded2) : 0;

    // The runs go to the dynamic shared memory when they fit (then out leave coalesced), else straight to
    // sorted_ids (each pair's store a different run: one sector per pair from one multiprocessor). The
    // second layout's runs follow the first's there when both fit.
    const int64_t total = static_cast<int64_t>(total_blocks) * block_m;
    const int64_t total2 = static_cast<int64_t>(total_blocks2) * block_m2;
    const int64_t offset2 = (total + 3) / 4 * 4;  // 16-byte aligned, as copy_out reads it
    const bool staged = total <= stage_capacity;  // the same in every thread
    const bool staged2 = dual && offset2 + total2 <= stage_capacity;
    int32_t* runs = staged ? stage : sorted_ids;
    int32_t* runs2 = staged2 ? stage + offset2 : sorted_ids2;
#if MOE_ALIGN_BALANCE
    __shared__ int32_t per_block[MAX_EXPERTS];  // rows in each block of expert e's run but the last
    for (int e = tid; e < num_experts; e += THREADS) {
        const int32_t blocks = first_block[e + 1] - first_block[e];
        per_block[e] = blocks > 0 ? (counts[e] + blocks - 1) / blocks : 1;
    }
    __syncthreads();
    write_padding(counts, first_block, total_blocks, numel, num_experts, block_m, expert_map, runs, sorted_ids,
                  expert_ids, max_padded, per_block);
#else
    write_padding(counts, first_block, total_blocks, numel, num_experts, block_m, expert_map, runs, sorted_ids,
                  expert_ids, max_padded);
#endif
    if (dual)
        write_padding(counts, first_block2, total_blocks2, numel, num_experts, block_m2, expert_map, runs2, sorted_ids2,
                      expert_ids2, max_padded2);

    // Pass 2: each pair goes to its expert's run start + its warp's start + its rank in the warp.
#pragma unroll
    for (int it = 0; it < ITEMS_PER_LANE; ++it) {
        if (it < items && ids[it] >= 0) {
            const int32_t e = ids[it];
            const int32_t pair = static_cast<int32_t>(warp_begin + it * 32 + lane);
            const int32_t within = my_counts[e] + rank[it];
#if MOE_ALIGN_BALANCE
            runs[(first_block[e] + within / per_block[e]) * block_m + within % per_block[e]] = pair;
#else
            runs[first_block[e] * block_m + within] = pair;
#endif
            if (dual) runs2[first_block2[e] * block_m2 + within] = pair;
        }
    }
    if (staged || staged2) {
        __syncthreads();
        if (staged) copy_out(stage, sorted_ids, static_cast<int32_t>(total));
        if (staged2) copy_out(stage + offset2, sorted_ids2, static_cast<int32_t>(total2));
    }
}

extern "C" __global__ void __launch_bounds__(moe_align_detail::CHUNK_THREADS)
    moe_align_count(const int32_t* __restrict__ topk_ids, int64_t numel, int32_t num_experts,
                    int32_t* __restrict__ chunk_counts) {
    griddepcontrol_wait_then_launch_dependents();
    using namespace moe_align_detail;
    __shared__ int32_t counts[MAX_EXPERTS];
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) counts[e] = 0;
    __syncthreads();
    const int64_t begin = static_cast<int64_t>(blockIdx.x) * CHUNK;
    const int64_t end = min_i64(begin + CHUNK, numel);
    count_pairs(topk_ids, begin, end, numel, num_experts, counts);
    __syncthreads();
    int32_t* out = chunk_counts + static_cast<int64_t>(blockIdx.x) * num_experts;
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) out[e] = counts[e];
}

extern "C" __global__ void __launch_bounds__(moe_align_detail::SCAN_THREADS)
    moe_align_scan(int32_t* __restrict__ chunk_counts, int32_t num_chunks, int64_t numel, int32_t num_experts,
                   int32_t block_m, const int32_t* __restrict__ expert_map, int32_t* __restrict__ sorted_ids,
                   int32_t* __restrict__ expert_ids, int32_t* __restrict__ total_padded, int64_t max_padded,
                   int32_t block_m2, int32_t* __restrict__ chunk_offsets2, int32_t* __restrict__ sorted_ids2,
                   int32_t* __restrict__ expert_ids2, int32_t* __restrict__ total_padded2, int64_t max_padded2) {
    griddepcontrol_wait_then_launch_dependents();
    using namespace moe_align_detail;
    __shared__ int32_t counts[MAX_EXPERTS];
    __shared__ int32_t first_block[MAX_EXPERTS + 1];
    __shared__ int32_t first_block2[MAX_EXPERTS + 1];
    __shared__ int32_t warp_totals[32];
    const bool dual = block_m2 > 0;

    int32_t count = 0;
    if (threadIdx.x < num_experts) {
        const int e = threadIdx.x;
#pragma unroll 4
        for (int32_t c = 0; c < num_chunks; ++c) count += chunk_counts[static_cast<int64_t>(c) * num_experts + e];
        counts[e] = count;
    }
    const int32_t total_blocks = lay_out_runs(count, first_block, warp_totals, num_experts, block_m, total_padded);
    write_padding(counts, first_block, total_blocks, numel, num_experts, block_m, expert_map, sorted_ids, sorted_ids,
                  expert_ids, max_padded);
    if (dual) {  // the second layout: the same counts, its own runs
        const int32_t total_blocks2 =
            lay_out_runs(count, first_block2, warp_totals, num_experts, block_m2, total_padded2);
        write_padding(counts, first_block2, total_blocks2, numel, num_experts, block_m2, expert_map, sorted_ids2,
                      sorted_ids2, expert_ids2, max_padded2);
    }
    // Counts are loaded in batches before the batch's positions are stored (the compiler cannot
    // move a load above a store to the same array: one round trip per chunk otherwise).
    constexpr int BATCH = 8;
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
        int32_t position = first_block[e] * block_m;
        int32_t position2 = dual ? first_block2[e] * block_m2 : 0;
        for (int32_t c0 = 0; c0 < num_chunks; c0 += BATCH) {
            int32_t count[BATCH];
#pragma unroll
            for (int u = 0; u < BATCH; ++u)
                count[u] = c0 + u < num_chunks ? chunk_counts[static_cast<int64_t>(c0 + u) * num_experts + e] : 0;
#pragma unroll
            for (int u = 0; u < BATCH; ++u) {
                if (c0 + u < num_chunks) {
                    const int64_t slot = static_cast<int64_t>(c0 + u) * num_experts + e;
                    chunk_counts[slot] = position;
                    if (dual) chunk_offsets2[slot] = position2;
                }
                position += count[u];
                position2 += count[u];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(moe_align_detail::CHUNK_THREADS)
    moe_align_scatter(const int32_t* __restrict__ topk_ids, int64_t numel, int32_t num_experts,
                      const int32_t* __restrict__ chunk_offsets, int32_t* __restrict__ sorted_ids,
                      const int32_t* __restrict__ chunk_offsets2, int32_t* __restrict__ sorted_ids2) {
    griddepcontrol_wait_then_launch_dependents();
    using namespace moe_align_detail;
    constexpr int WARPS = CHUNK_WARPS;
    constexpr int THREADS = CHUNK_THREADS;
    __shared__ int32_t first[MAX_EXPERTS];  // expert e: the position in sorted_ids of this chunk's first pair
    __shared__ int32_t first2[MAX_EXPERTS];  // the same in sorted_ids2 (a second layout; null: none)
    const bool dual = sorted_ids2 != nullptr;
    __shared__ int32_t warp_counts[WARPS * MAX_EXPERTS];  // per warp and expert: count, then the warp's start
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    // Warp w owns `items` pairs per lane from chunk_begin + 32 w items, as few as cover the chunk's pairs.
    const int64_t chunk_begin = static_cast<int64_t>(blockIdx.x) * CHUNK;
    const int64_t chunk_end = min_i64(chunk_begin + CHUNK, numel);
    const int items = static_cast<int>((chunk_end - chunk_begin + THREADS - 1) / THREADS);
    const int64_t warp_begin = chunk_begin + static_cast<int64_t>(warp) * 32 * items;
    const int32_t* mine = chunk_offsets + static_cast<int64_t>(blockIdx.x) * num_experts;
    for (int e = tid; e < num_experts; e += THREADS) first[e] = mine[e];
    if (dual) {
        const int32_t* mine2 = chunk_offsets2 + static_cast<int64_t>(blockIdx.x) * num_experts;
        for (int e = tid; e < num_experts; e += THREADS) first2[e] = mine2[e];
    }
    for (int e = tid; e < WARPS * num_experts; e += THREADS) warp_counts[e] = 0;
    int32_t ids[CHUNK_ITEMS], rank[CHUNK_ITEMS];
    int32_t* my_counts = warp_counts + warp * num_experts;
    rank_warp_pairs(topk_ids, warp_begin, chunk_end, items, num_experts, my_counts, ids, rank);
    __syncthreads();
    // Experts tid and tid + THREADS (E <= 512): the warps' starts within the chunk's pairs of each.
    const int32_t c0 = warp_starts<WARPS>(warp_counts, num_experts, tid, 0);
    const int32_t c1 = warp_starts<WARPS>(warp_counts, num_experts, tid + THREADS, 0);
#if MOE_ALIGN_SCATTER_STAGE
    // The chunk's pairs are first put in their sorted order in shared memory (expert e's at
    // local_first[e]), then stored in that order: consecutive threads write consecutive positions of
    // an expert's segment, not one sector per pair.
    __shared__ int32_t local_first[MAX_EXPERTS];
    __shared__ int32_t warp_totals[32];
    __shared__ int32_t stage_pair[CHUNK];
    __shared__ int16_t stage_expert[CHUNK];
    int32_t total0, total1;
    const int32_t s0 = block_exclusive_scan(c0, warp_totals, total0);
    if (tid < num_experts) local_first[tid] = s0;
    __syncthreads();  // warp_totals is read back before the second scan writes it
    const int32_t s1 = block_exclusive_scan(c1, warp_totals, total1);
    if (tid + THREADS < num_experts) local_first[tid + THREADS] = total0 + s1;
    __syncthreads();
#pragma unroll
    for (int it = 0; it < CHUNK_ITEMS; ++it) {
        if (it < items && ids[it] >= 0) {
            const int32_t e = ids[it];
            const int32_t p = local_first[e] + my_counts[e] + rank[it];
            stage_pair[p] = static_cast<int32_t>(warp_begin + it * 32 + lane);
            stage_expert[p] = static_cast<int16_t>(e);
        }
    }
    __syncthreads();
    for (int32_t p = tid; p < total0 + total1; p += THREADS) {
        const int32_t e = stage_expert[p];
        const int32_t within = p - local_first[e];
        sorted_ids[first[e] + within] = stage_pair[p];
        if (dual) sorted_ids2[first2[e] + within] = stage_pair[p];
    }
#else
    (void)c0;
    (void)c1;
    __syncthreads();
#pragma unroll
    for (int it = 0; it < CHUNK_ITEMS; ++it) {
        if (it < items && ids[it] >= 0) {
            const int32_t e = ids[it];
            const int32_t pair = static_cast<int32_t>(warp_begin + it * 32 + lane);
            sorted_ids[first[e] + my_counts[e] + rank[it]] = pair;
            if (dual) sorted_ids2[first2[e] + my_counts[e] + rank[it]] = pair;
        }
    }
#endif
}
