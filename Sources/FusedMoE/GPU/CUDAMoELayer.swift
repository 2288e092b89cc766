import CUDA

/// The MoE layer on one GPU: align, GEMM1, activation, GEMM2 with the routed weights, combine.
/// The activation runs in GEMM1's epilogue or split-K reduction when the plan asks for it, a
/// one-token batch on the wgmma kernels skips align (identity routing), and with
/// `CombineMode.atomic`, or at k <= 2 (where the order of two adds onto zero changes no bit), GEMM2
/// sums the tokens' rows itself where its kernel can (`usesAtomicCombine`, `sumsInGEMM2`).
///
/// A layer holds its weights (device buffers), its plan, the compiled kernels and every scratch
/// buffer, all made in `init`. `forward` then only enqueues kernels, memsets and copies on the stream: no
/// allocation, compilation or host synchronization, so a forward can be captured in a CUDA graph.
/// Batches larger than `chunkTokens` run in chunks of that many tokens, with the same result.
public final class CUDAMoELayer: @unchecked Sendable {
    public let library: KernelLibrary
    public let shape: MoEShape
    public let dtype: DType
    public let options: MoEOptions
    public let plan: MoEPlan
    /// The largest batch `forward` accepts.
    public let maxTokens: Int
    public let chunkTokens: Int
    public let w1: DeviceBuffer
    public let w2: DeviceBuffer
    /// Launch each kernel with programmatic stream serialization (Hopper), so it starts while its
    /// predecessor drains; every forward kernel waits (`griddepcontrol.wait`) before touching memory,
    /// then at once lets its own successor launch (`griddepcontrol.launch_dependents`).
    public let programmaticDependentLaunch: Bool

    /// E as the router sees it: the expert map's length under expert parallelism.
    public var routedExperts: Int { options.routedExperts(local: shape.experts) }

    /// Align's outputs, one per distinct BLOCK_M of the plan: GEMM1's, then GEMM2's when it differs
    /// (the same ids, each padding the experts' runs to its GEMM's block; both written by one align
    /// pass unless FUSED_MOE_DUAL_ALIGN=0).
    let alignOutputs: [AlignOutput]
    let expertMap: DeviceBuffer?
    /// The `[M*k, 2I]` gate/up intermediate: only for unfused plans (zero bytes otherwise).
    let gateUp: DeviceBuffer
    let activated: DeviceBuffer
    let down: DeviceBuffer
    let accumulator: DeviceBuffer
    /// Where `gateUp`, `activated`, `down` and `accumulator` come from when the layer was made with one:
    /// layers of several plans that never run at the same time share them (`SharedScratch`).
    public let sharedScratch: SharedScratch?
    /// Stream-K (KERNEL wgmma_streamk): one partial tile per program plus slot G, all bits set (NaN:
    /// what a program adds after a lost wait); and one flag per program, zero between launches.
    /// Empty unless a GEMM runs on it.
    let streamPartials: DeviceBuffer
    /// The block sync's counters (`usesBlockSync`): one per m-block, zero between launches (GEMM2's last
    /// program on an m-block clears it). Empty when the plan does not use it.
    let blockDone: DeviceBuffer
    /// The swap-AB kernels' per-program timeline (kernels compiled with MOE_SM90_DIAG_TIMES=1, a diagnostic:
    /// `diagnosticTimes`): 8 values per program, GEMM1's programs in the first half, GEMM2's in the second.
    /// Empty otherwise.
    let diagTimes: DeviceBuffer
    /// n-blocks per program of GEMM1 where it runs as the swap-AB kernel's unit walk (`swapUnit`; 1 else),
    /// decided once from the plan, dtype, activation and the library's defines.
    let gemm1Unit: Int
    /// The fused combine's counters (`usesFusedCombine`): one per chunk of GEMM2's n-blocks (at most one
    /// per n-block), zero between launches (each chunk's last combine item clears its own). Empty when the
    /// layer does not fuse the combine into GEMM2.
    let combineCounts: DeviceBuffer
    let streamFlags: DeviceBuffer
    /// Whether GEMM2 adds each token's rows into the output itself (SPLIT_MODE 3; `sumsInGEMM2`): asked
    /// for (`CombineMode.atomic`), or the exact ordered sum at k <= 2. The forward zeroes the output
    /// first, and no combine kernel runs.
    public let usesAtomicCombine: Bool
    let kernels: Kernels
    /// Tensor maps of the held weights for the wgmma GEMMs, made once so forward does no host work.
    private var heldTensorMaps: [TensorMapKey: TensorMap] = [:]

    struct Kernels {
        var alignSingle: Kernel
        var alignCount: Kernel
        var alignScan: Kernel
        var alignScatter: Kernel
        var gemm1: Kernel
        var gemm2: Kernel
        var activation: Kernel
        var combine: Kernel
        var splitReduce: Kernel
        var cast: Kernel
        /// Split-K reduction of GEMM1 with the activation applied (fused plans).
        var splitReduceActivation: Kernel
    }

    /// Whether layers made without an explicit choice use programmatic dependent launch: yes, unless the
    /// environment sets FUSED_MOE_PDL=0 (a diagnostic: every kernel then starts after its predecessor).
    public static let programmaticDependentLaunchByDefault: Bool =
        environment("FUSED_MOE_PDL") != "0"

    /// Whether layers made without an explicit choice let GEMM2 sum the rows of `CombineMode.ordered` at
    /// k <= 2 (`sumsInGEMM2`): yes, unless the environment sets FUSED_MOE_SMALL_K_SUM=0 (a combine kernel
    /// then sums them, bit for bit the same; for A/Bs and checks).
    public static let smallTopKSumByDefault: Bool = environment("FUSED_MOE_SMALL_K_SUM") != "0"

    /// Whether a layer with `combine`, `topK` slots per token and `plan` lets GEMM2 add each pair's
    /// weighted row into its token's output row with 16-bit atomic adds (SPLIT_MODE 3) instead of writing
    /// partial rows for a combine kernel. Only where the plan's GEMM2 can (`allowsAtomicCombine(plan:)`),
    /// and then:
    /// - `CombineMode.atomic`: always (an order that varies from run to run, rounded at every add);
    /// - `CombineMode.ordered` at k <= 2 (`smallTopK`): the adds land on a zeroed row, so a token's sum is
    ///   0 + a = a, then round(a + b), and a + b = b + a: the same bits in either order, and the same as
    ///   the combine kernel's fp32 sum of a and b rounded once (a and b are already rounded to T; their
    ///   fp32 sum is exact or off by far less than half a T unit, so one rounding gives what two do).
    ///   The full check compares the two bit for bit.
    public static func sumsInGEMM2(combine: CombineMode, topK: Int, plan: MoEPlan, smallTopK: Bool = smallTopKSumByDefault)
        -> Bool
    {
        guard allowsAtomicCombine(plan: plan) else { return false }
        return combine == .atomic || (smallTopK && topK <= 2)
    }

    /// A diagnostic (NOTES v38): FUSED_MOE_DIAG_NO_ZERO=1 leaves out the zeroing of the output where GEMM2
    /// sums into it, so a same-call A/B times what the memset costs. The sums are then wrong.
    static let diagnosticSkipsZeroing: Bool = environment("FUSED_MOE_DIAG_NO_ZERO") == "1"

    /// Whether layers made without an explicit choice use the block sync where their plan allows it and
    /// they use programmatic dependent launch: yes, unless the environment sets FUSED_MOE_BLOCK_SYNC=0
    /// (NOTES v25; v24's form, off by default, drew racecheck reports that v25's does not).
    public static let blockSyncByDefault: Bool = environment("FUSED_MOE_BLOCK_SYNC") != "0"

    /// Whether a plan whose GEMMs have different BLOCK_M gets both layouts from one align pass (the
    /// counts and ranks shared; NOTES v26): yes, unless the environment sets FUSED_MOE_DUAL_ALIGN=0 (two
    /// aligns back to back, as before; for A/Bs).
    static let dualAlignByDefault: Bool = environment("FUSED_MOE_DUAL_ALIGN") != "0"

    /// The bytes of partial rows the fused combine lets one chunk of GEMM2's n-blocks write before the next
    /// chunk starts (so a token's rows of a chunk are summed while still in L2): FUSED_MOE_COMBINE_CHUNK_BYTES,
    /// default 8 MiB (a sixth of the H200's L2).
    static let fusedCombineChunkBytes: Int = environmentInteger("FUSED_MOE_COMBINE_CHUNK_BYTES", atLeast: 1) ?? 8 << 20

    /// The weight bytes align's spare programs prefetch into L2 for GEMM1's first wave (`AlignPrefetch`,
    /// NOTES v28): FUSED_MOE_ALIGN_PREFETCH_MB MiB, default 4 (8 gained the same, 16 and 24 measured even
    /// to slower: what align's idle window holds); 0 turns it off.
    static let alignPrefetchBudget: Int = (environmentInteger("FUSED_MOE_ALIGN_PREFETCH_MB", atLeast: 0) ?? 4) << 20

    /// What align's spare programs bring into L2 while align runs and DRAM would otherwise idle
    /// (moe_align.cu's prefetch_rows_l2; NOTES v28): the first `bytesPerRow` bytes of w1's rows [0, rows), `pitch`
    /// bytes apart.
    struct AlignPrefetch: Equatable {
        var rows: Int
        var bytesPerRow: Int
        var pitch: Int
        var bytes: Int { rows * bytesPerRow }
    }

    /// The weights GEMM1's first wave starts on, within `budget` bytes; nil where there is nothing to
    /// prefetch. GEMM1's tiles go expert by expert (moe_sm90_tile_at: groups never mix experts, and come
    /// in expert order), so its first wave (one tile per multiprocessor) reads the w1 rows of the first
    /// experts: `multiprocessors` tiles of BLOCK_N rows, each expert's rows read by its blocksPerExpert
    /// m-blocks side by side, i.e. about multiprocessors * BLOCK_N / blocksPerExpert distinct rows from
    /// row 0. Every tile walks K from the start, so the budget goes to the first K tiles (128 bytes each)
    /// of all of those rows. Only where every expert is almost surely touched (pairs >= 4 E: an expert is
    /// missed with probability about e^-4), for the unsplit Hopper kernels (a split GEMM1 starts its K
    /// ranges at several offsets; the prefetch instruction is sm_90's), and only where align is one launch
    /// (its spare programs in the three-launch sequence cost 0.5-1% at 2048 tokens).
    static func alignPrefetch(
        plan: MoEPlan, shape: MoEShape, routedExperts: Int, pairs: Int, elementBytes: Int, multiprocessors: Int,
        budget: Int
    ) -> AlignPrefetch? {
        let gemm1 = plan.gemm1
        let pitch = shape.hidden * elementBytes
        let kTile = 128
        guard budget >= kTile, pairs >= 4 * routedExperts, AlignLaunch.choice(pairs: pairs) == .single,
            gemm1.kernel.needsHopper, gemm1.effectiveMode == .none, pitch % 16 == 0, pitch >= kTile,
            multiprocessors >= 1
        else { return nil }
        let rowsPerExpert = (pairs + routedExperts - 1) / routedExperts
        let blocksPerExpert = max(1, (rowsPerExpert + gemm1.blockM - 1) / gemm1.blockM)
        var rows = min(shape.experts * 2 * shape.intermediate, multiprocessors * gemm1.blockN / blocksPerExpert)
        var bytesPerRow = min(budget / max(rows, 1), pitch) / kTile * kTile
        if bytesPerRow < kTile {
            bytesPerRow = kTile
            rows = budget / kTile
        }
        return rows > 0 ? AlignPrefetch(rows: rows, bytesPerRow: bytesPerRow, pitch: pitch) : nil
    }

    /// The prefetch bytes one spare program issues: FUSED_MOE_ALIGN_PREFETCH_KB_PER_PROGRAM KiB, default 256.
    /// Spread wide: 24 MiB of bulk prefetches from 3 programs delayed align's completion, which GEMM1
    /// waits for, by about 30 us at Mixtral M = 32 (NOTES v28: the programs seem held until their
    /// prefetches land).
    static let alignPrefetchPerProgram: Int =
        (environmentInteger("FUSED_MOE_ALIGN_PREFETCH_KB_PER_PROGRAM", atLeast: 1) ?? 256) << 10

    /// Spare programs for `prefetch`: one per `perProgram` bytes, at least one,
    /// at most all but two of the `multiprocessors` (align's own program and one more keep theirs).
    static func alignPrefetchPrograms(
        _ prefetch: AlignPrefetch, multiprocessors: Int, perProgram: Int = alignPrefetchPerProgram
    ) -> Int {
        let wanted = (prefetch.bytes + perProgram - 1) / max(perProgram, 1)
        return max(1, min(multiprocessors - 2, wanted))
    }

    /// Pairs up to which align runs as one launch (the kernel's recommendation; a one-launch kernel of
    /// 1024 threads up to 16384 pairs measured slower on the layer than three launches: NOTES v23).
    static let singleAlignLimit = 8192

    /// The kernels align runs as: one launch, or three.
    public enum AlignLaunch: String, CaseIterable, Sendable {
        case single
        case chunked

        /// The forward's choice for `pairs` pairs.
        static func choice(pairs: Int) -> AlignLaunch {
            allows(.single, pairs: pairs) ? .single : .chunked
        }

        /// Whether `launch` takes `pairs` pairs (the kernels' contracts).
        public static func allows(_ launch: AlignLaunch, pairs: Int) -> Bool {
            switch launch {
            case .single: pairs <= CUDAMoELayer.singleAlignLimit
            case .chunked: true
            }
        }
    }
    /// Pairs per lane of the three-launch align's programs: the kernels' MOE_ALIGN_CHUNK_ITEMS default
    /// (NOTES v26; RoutingTests reads it from the source).
    static let alignChunkItems = 4

    /// Pairs per program of the three-launch align under the kernel defines `defines` (`-DNAME=VALUE`):
    /// 256 times MOE_ALIGN_CHUNK_ITEMS, which an experiment may set, so the grid and the scratch are
    /// sized as the kernels were compiled.
    static func alignChunk(defines: [String]) -> Int {
        256 * (defineValue("MOE_ALIGN_CHUNK_ITEMS", in: defines) ?? alignChunkItems)
    }

    /// The integer value of kernel define `name` in `defines` (`-DNAME=VALUE`, the last one wins); nil if
    /// none sets it.
    static func defineValue(_ name: String, in defines: [String]) -> Int? {
        let prefix = "-D\(name)="
        return defines.last(where: { $0.hasPrefix(prefix) }).flatMap { Int($0.dropFirst(prefix.count)) }
    }

    /// Pairs per program of this layer's three-launch align (from its library's defines, once at init).
    let alignChunk: Int
    /// The one-launch align stages its padded runs in dynamic shared memory when they fit, so that its
    /// stores of sorted_ids leave coalesced (NOTES v22): at most this much, less the kernel's 39 KB of
    /// static shared memory and a margin where the device offers less.
    static let alignStageLimit = 160 * 1024

    /// The most dynamic shared memory the one-launch align takes on a device that offers `optIn` bytes
    /// per block.
    static func alignStageRoom(optIn: Int) -> Int {
        min(alignStageLimit, max(0, optIn - 40 * 1024)) / 16 * 16
    }

    /// Dynamic shared memory for a one-launch align of `maxPadded` rows on a device that offers
    /// `optIn` bytes per block (0: the runs go straight to global memory).
    static func alignStageBytes(maxPadded: Int, optIn: Int) -> Int {
        min((maxPadded * MemoryLayout<Int32>.size + 15) / 16 * 16, alignStageRoom(optIn: optIn))
    }

    /// Makes a layer: validates, compiles (or loads) its kernels, and allocates its scratch.
    ///
    /// - Parameters:
    ///   - w1: `[E, 2I, H]` weights of `dtype`, contiguous; or a zero-byte buffer (with `w2` too) when
    ///     the weights are passed to each `forward(…, w1:, w2:, …)` instead.
    ///   - w2: `[E, H, I]` weights of `dtype`, contiguous.
    ///   - maxTokens: the largest batch `forward` will be given; scratch is sized from it.
    ///   - chunkTokens: tokens per chunk (default 65536).
    ///   - programmaticDependentLaunch: overlap each launch with its predecessor's drain (default: on
    ///     where the GPU and driver support it, compute capability 9.0+, unless FUSED_MOE_PDL=0).
    ///   - blockSync: let GEMM2 wait per m-block for GEMM1 where the plan allows it (`usesBlockSync`;
    ///     default: on with programmatic dependent launch, unless FUSED_MOE_BLOCK_SYNC=0; NOTES v24-v25:
    ///     up to 5% faster at 8-256 tokens). It pays only with programmatic dependent launch; asked for
    ///     without (true), it runs all the same (a diagnostic: kernels that do not overlap).
    ///   - smallTopKSum: at k <= 2 with `CombineMode.ordered`, let GEMM2 add the rows into the output
    ///     (`sumsInGEMM2`; bit for bit the combine kernel's sum). Default: `smallTopKSumByDefault`.
    ///   - sharedScratch: take the intermediates and the split-K accumulator from here instead of
    ///     allocating them (each at least `ScratchSizes(…)` of this layer); the caller keeps the
    ///     layers that share it from running at the same time.
    ///   - fusedCombine: sum each token's k partial rows inside GEMM2 where the plan and the kernels
    ///     allow it (`allowsFusedCombine`: only kernels compiled with MOE_SM90_FUSED_COMBINE=1, an
    ///     experiment measured slower, NOTES v27; default: yes there). Ignored where they do not.
    /// - Throws: `MoEError.invalidArgument` for shapes the kernels cannot run, `.cuda` for CUDA failures.
    public init(
        library: KernelLibrary, shape: MoEShape, dtype: DType, w1: DeviceBuffer, w2: DeviceBuffer,
        options: MoEOptions = MoEOptions(), plan: MoEPlan, maxTokens: Int, chunkTokens: Int = 65536,
        programmaticDependentLaunch: Bool? = nil, blockSync: Bool? = nil, fusedCombine: Bool? = nil,
        smallTopKSum: Bool? = nil, sharedScratch: SharedScratch? = nil
    ) throws(MoEError) {
        guard dtype != .fp32 else { throw .unsupported("the CUDA layer runs bf16 and fp16; use the CPU backend for fp32") }
        guard shape.hidden % 8 == 0 else {
            throw .invalidArgument("hidden", "the CUDA layer needs H % 8 == 0 (16-byte rows), got \(shape.hidden)")
        }
        guard shape.intermediate % 8 == 0 else {
            throw .invalidArgument("intermediate", "the CUDA layer needs I % 8 == 0 (16-byte rows), got \(shape.intermediate)")
        }
        guard maxTokens >= 0 else { throw .invalidArgument("maxTokens", "must be >= 0, got \(maxTokens)") }
        guard chunkTokens >= 1 else { throw .invalidArgument("chunkTokens", "must be >= 1, got \(chunkTokens)") }
        guard shape.topK <= 32 else { throw .invalidArgument("topK", "the GPU router supports k <= 32, got \(shape.topK)") }
        try options.validate(localExperts: shape.experts)
        let routed = options.routedExperts(local: shape.experts)
        guard routed <= 512 else { throw .invalidArgument("experts", "the GPU align supports E <= 512, got \(routed)") }
        let weightBytes1 = shape.experts * 2 * shape.intermediate * shape.hidden * dtype.byteCount
        let weightBytes2 = shape.experts * shape.hidden * shape.intermediate * dtype.byteCount
        // Zero-byte buffers for both: the weights come with each forward (callers that own them).
        let perCallWeights = w1.byteCount == 0 && w2.byteCount == 0
        guard perCallWeights || w1.byteCount >= weightBytes1 else {
            throw .invalidArgument("w1", "expected [\(shape.experts), \(2 * shape.intermediate), \(shape.hidden)] \(dtype) = \(weightBytes1) bytes, the buffer has \(w1.byteCount)")
        }
        guard perCallWeights || w2.byteCount >= weightBytes2 else {
            throw .invalidArgument("w2", "expected [\(shape.experts), \(shape.hidden), \(shape.intermediate)] \(dtype) = \(weightBytes2) bytes, the buffer has \(w2.byteCount)")
        }
        let device = library.device
        let sharedLimit = device.properties.sharedMemoryPerBlockOptIn
        try plan.gemm1.validate(sharedMemoryLimit: sharedLimit)
        try plan.gemm2.validate(sharedMemoryLimit: sharedLimit)
        if plan.gemm1.kernel.needsHopper || plan.gemm2.kernel.needsHopper {
            guard device.properties.architecture == "sm_90a" else {
                throw .unsupported("the wgmma kernels need a Hopper GPU (sm_90a); this is \(device.properties.name) (\(device.properties.architecture))")
            }
        }

        self.library = library
        self.shape = shape
        self.dtype = dtype
        self.options = options
        self.plan = plan
        self.maxTokens = maxTokens
        self.chunkTokens = chunkTokens
        self.w1 = w1
        self.w2 = w2
        self.gemm1Unit = plan.activationIsFused
            ? CUDAMoELayer.swapUnit(config: plan.gemm1, dtype: dtype, activation: options.activation, defines: library.defines)
            : 1
        self.usesAtomicCombine = CUDAMoELayer.sumsInGEMM2(
            combine: options.combine, topK: shape.topK, plan: plan,
            smallTopK: smallTopKSum ?? CUDAMoELayer.smallTopKSumByDefault)
        self.programmaticDependentLaunch =
            (programmaticDependentLaunch ?? CUDAMoELayer.programmaticDependentLaunchByDefault)
            && device.properties.computeCapabilityMajor >= 9
            && device.driver.cuLaunchKernelExAvailable

        let chunk = max(min(maxTokens, chunkTokens), 1)
        let pairs = chunk * shape.topK
        let alignChunk = CUDAMoELayer.alignChunk(defines: library.defines)
        self.alignChunk = alignChunk
        let chunks = max(1, (pairs + alignChunk - 1) / alignChunk)
        let sizes = ScratchSizes(shape: shape, dtype: dtype, plan: plan, maxTokens: maxTokens, chunkTokens: chunkTokens)
        if let sharedScratch {
            guard sharedScratch.device === device, sharedScratch.sizes.holds(sizes) else {
                throw .invalidArgument(
                    "sharedScratch", "must be on this layer's device and hold at least \(sizes), got \(sharedScratch.sizes)")
            }
        }
        self.sharedScratch = sharedScratch
        let programs = device.properties.multiprocessorCount
        let streamSlotFloats =
            [plan.gemm1, plan.gemm2].filter { $0.kernel == .wgmmaStreamK }.map { $0.blockM * $0.blockN }.max() ?? 0
        do {
            alignOutputs = try plan.alignBlockMs.map { (blockM: Int) throws(CUDAError) in
                let maxPadded = Align.maximumPaddedCount(pairs: pairs, experts: routed, blockM: blockM)
                return AlignOutput(
                    blockM: blockM,
                    sortedIDs: try DeviceBuffer(device: device, count: maxPadded, of: Int32.self),
                    expertIDs: try DeviceBuffer(device: device, count: (maxPadded + blockM - 1) / blockM, of: Int32.self),
                    totalPadded: try DeviceBuffer(device: device, count: 1, of: Int32.self),
                    chunkCounts: try DeviceBuffer(device: device, count: chunks * routed, of: Int32.self))
            }
            if let map = options.expertMap {
                let buffer = try DeviceBuffer(device: device, count: map.count, of: Int32.self)
                try buffer.upload(map)
                expertMap = buffer
            } else {
                expertMap = nil
            }
            let scratch: SharedScratch
            if let sharedScratch { scratch = sharedScratch } else { scratch = try SharedScratch(device: device, sizes: sizes) }
            (gateUp, activated, down, accumulator) = (scratch.gateUp, scratch.activated, scratch.down, scratch.accumulator)
            let streamPrograms = streamSlotFloats > 0 ? programs : 0
            streamPartials = try DeviceBuffer(device: device, count: (streamPrograms + 1) * streamSlotFloats, of: Float.self)
            streamFlags = try DeviceBuffer(device: device, count: streamPrograms, of: Int32.self)
            // One counter per m-block of GEMM1's align (its expert ids), or per pair where one token skips
            // align. Asked for without PDL the sync still runs (GEMM2 then starts after GEMM1 and finds
            // every count complete): a diagnostic, e.g. compute-sanitizer on kernels that do not overlap.
            let syncBlocks = (blockSync ?? (CUDAMoELayer.blockSyncByDefault && self.programmaticDependentLaunch))
                && CUDAMoELayer.usesBlockSync(plan: plan, programmaticDependentLaunch: true)
                && CUDAMoELayer.blockSyncCountsFit(plan: plan, shape: shape)
                ? max(alignOutputs[0].expertIDs.byteCount / MemoryLayout<Int32>.size, pairs)
                : 0
            blockDone = try DeviceBuffer(device: device, count: syncBlocks, of: Int32.self)
            // One slot of 8 values per program the larger swap-AB grid can have, in each half.
            let diagPrograms = CUDAMoELayer.defineValue("MOE_SM90_DIAG_TIMES", in: library.defines) == 1
                ? [plan.gemm1, plan.gemm2].map { config in
                    let padded = max(Align.maximumPaddedCount(pairs: pairs, experts: routed, blockM: config.blockM), pairs * config.blockM)
                    return ((padded + config.blockM - 1) / config.blockM)
                        * ((max(2 * shape.intermediate, shape.hidden) + config.blockN - 1) / config.blockN) * config.splitK
                }.max()! : 0
            diagTimes = try DeviceBuffer(device: device, count: 2 * 8 * diagPrograms, of: UInt64.self)
            if syncBlocks > 0 { try blockDone.upload([Int32](repeating: 0, count: syncBlocks)) }
            let fuseCombine = !usesAtomicCombine && (fusedCombine ?? true)
                && CUDAMoELayer.allowsFusedCombine(plan: plan, shape: shape, options: options, library: library, pairs: pairs)
            let combineCounters = fuseCombine ? (shape.hidden + plan.gemm2.blockN - 1) / plan.gemm2.blockN : 0
            combineCounts = try DeviceBuffer(device: device, count: combineCounters, of: Int32.self)
            if combineCounters > 0 { try combineCounts.upload([Int32](repeating: 0, count: combineCounters)) }
            if streamSlotFloats > 0 {
                try streamFlags.upload([Int32](repeating: 0, count: streamPrograms))
                try streamPartials.upload(
                    [UInt32](repeating: .max, count: streamSlotFloats), offsetBytes: streamPrograms * streamSlotFloats * 4)
            }
            kernels = try CUDAMoELayer.loadKernels(
                library: library, dtype: dtype, plan: plan, activation: options.activation,
                atomicCombine: usesAtomicCombine)
        } catch {
            throw .cuda(error)
        }
        let uses = [
            (plan.gemm1, w1, 2 * shape.intermediate, shape.hidden, plan.activationIsFused),
            (plan.gemm2, w2, shape.hidden, shape.intermediate, false),
        ]
        for (config, weights, n, k, fused) in uses where config.kernel.needsHopper && weights.byteCount > 0 {
            let boxRows = config.tensorMapBoxRows(fusedActivation: fused)
            let key = TensorMapKey(address: weights.pointer.address, n: n, k: k, boxRows: boxRows)
            do {
                heldTensorMaps[key] = try tensorMap(key)
            } catch {
                throw .cuda(error)
            }
        }
    }

    /// The kernel programs a layer of this dtype and plan needs, to compile ahead (several at once);
    /// `atomicCombine`: for a layer whose GEMM2 sums the rows itself (`sumsInGEMM2`; it changes GEMM2's
    /// kernel where `allowsAtomicCombine(plan:)`).
    public static func requests(dtype: DType, plan: MoEPlan, activation: Activation, atomicCombine: Bool = false)
        -> [KernelLibrary.Request]
    {
        let type = dtype == .fp16 ? "moe_fp16" : "moe_bf16"
        let activationName = activation == .silu ? "moe_silu_and_mul" : "moe_gelu_and_mul"
        let act = activation == .silu ? 1 : 2
        let fusedInGemm = plan.fusedActivation && plan.gemm1.fusesActivation ? act : 0
        let gemm1 = plan.gemm1.nameExpression(dtype: dtype, mulRoutedWeight: false, fusedActivation: fusedInGemm)
        let gemm2 = plan.gemm2.nameExpression(
            dtype: dtype, mulRoutedWeight: true, atomicCombine: atomicCombine && allowsAtomicCombine(plan: plan))
        // One program per kernel source, holding that source's GEMM instantiations.
        var gemmRequests: [KernelLibrary.Request] = []
        for source in [KernelSource.gemm, .gemmSM90] {
            let expressions = [(plan.gemm1, gemm1), (plan.gemm2, gemm2)].filter { $0.0.source == source }.map(\.1)
            if !expressions.isEmpty { gemmRequests.append(KernelLibrary.Request(source: source, expressions: expressions)) }
        }
        return [
            KernelLibrary.Request(source: .align),
            KernelLibrary.Request(
                source: .elementwise,
                expressions: [
                    "\(activationName)<\(type)>", "moe_combine<\(type)>", "moe_splitk_reduce<\(type)>",
                    "moe_cast_f32<\(type)>", "moe_splitk_reduce_act<\(type), \(act)>",
                ]),
        ] + gemmRequests
    }

    static func loadKernels(
        library: KernelLibrary, dtype: DType, plan: MoEPlan, activation: Activation, atomicCombine: Bool
    ) throws(CUDAError) -> Kernels {
        let requests = requests(dtype: dtype, plan: plan, activation: activation, atomicCombine: atomicCombine)
        try library.prepare(requests)
        let (align, elementwise) = (requests[0], requests[1])
        func gemmKernel(_ config: GemmConfig, index: Int) throws(CUDAError) -> Kernel {
            let request = requests.dropFirst(2).first { $0.source == config.source }!
            let expression = request.expressions.count == 2 ? request.expressions[index] : request.expressions[0]
            return try library.kernel(expression, in: request)
        }
        let gemm1 = try gemmKernel(plan.gemm1, index: 0)
        let gemm2 = try gemmKernel(plan.gemm2, index: 1)
        try gemm1.setMaxDynamicSharedMemory(bytes: max(plan.gemm1.sharedMemoryBytes, 48 * 1024))
        try gemm2.setMaxDynamicSharedMemory(bytes: max(plan.gemm2.sharedMemoryBytes, 48 * 1024))
        let alignSingle = try library.kernel("moe_align_single", in: align)
        let stageRoom = alignStageRoom(optIn: library.device.properties.sharedMemoryPerBlockOptIn)
        if stageRoom > 48 * 1024 { try alignSingle.setMaxDynamicSharedMemory(bytes: stageRoom) }
        return Kernels(
            alignSingle: alignSingle,
            alignCount: try library.kernel("moe_align_count", in: align),
            alignScan: try library.kernel("moe_align_scan", in: align),
            alignScatter: try library.kernel("moe_align_scatter", in: align),
            gemm1: gemm1, gemm2: gemm2,
            activation: try library.kernel(elementwise.expressions[0], in: elementwise),
            combine: try library.kernel(elementwise.expressions[1], in: elementwise),
            splitReduce: try library.kernel(elementwise.expressions[2], in: elementwise),
            cast: try library.kernel(elementwise.expressions[3], in: elementwise),
            splitReduceActivation: try library.kernel(elementwise.expressions[4], in: elementwise))
    }

    /// Computes `out [M, H]` from `x [M, H]` and the routing `topkIDs [M, k]` (int32, router expert
    /// ids in `[0, E_routed)`) with `topkWeights [M, k]` (fp32), all on `stream`.
    ///
    /// Enqueues only: no allocation, no compilation, no host synchronization.
    /// - Throws: `MoEError.invalidArgument` when `tokens` exceeds `maxTokens`; `.cuda` when a launch fails.
    public func forward(
        x: DevicePointer, topkIDs: DevicePointer, topkWeights: DevicePointer, out: DevicePointer, tokens: Int,
        stream: Stream, stageMarker: StageMarker? = nil
    ) throws(MoEError) {
        guard w1.byteCount > 0 && w2.byteCount > 0 else {
            throw .invalidArgument("w1", "this layer holds no weights: pass them to forward(…, w1:, w2:, …)")
        }
        try forward(
            x: x, topkIDs: topkIDs, topkWeights: topkWeights, w1: w1.pointer, w2: w2.pointer, out: out, tokens: tokens,
            stream: stream, stageMarker: stageMarker)
    }

    /// The same, with the expert weights given here (`w1 [E, 2I, H]`, `w2 [E, H, I]` of the layer's
    /// dtype, contiguous, 16-byte aligned) instead of the ones the layer holds: for callers that own
    /// the weights, such as the C ABI.
    public func forward(
        x: DevicePointer, topkIDs: DevicePointer, topkWeights: DevicePointer, w1: DevicePointer, w2: DevicePointer,
        out: DevicePointer, tokens: Int, stream: Stream, stageMarker: StageMarker? = nil
    ) throws(MoEError) {
        guard !w1.isNull, !w2.isNull else { throw .invalidArgument(w1.isNull ? "w1" : "w2", "is a null device pointer") }
        guard tokens >= 0 && tokens <= maxTokens else {
            throw .invalidArgument("tokens", "must be in 0...\(maxTokens) (the layer's maxTokens), got \(tokens)")
        }
        // Where GEMM2 sums into the output, the output is zeroed before align and GEMM1 read the inputs. An
        // output that shares bytes with an input (in place: out = x) takes the sums in `down` instead, copied
        // to it after GEMM2, as the combine kernel would write it: last.
        var staged = false
        if usesAtomicCombine {
            let outBytes = tokens * shape.hidden * dtype.byteCount
            let inputs = [
                (x.address, outBytes), (topkIDs.address, tokens * shape.topK * 4),
                (topkWeights.address, tokens * shape.topK * 4),
            ]
            staged = inputs.contains { CUDAMoELayer.overlaps(out.address, outBytes, $0.0, $0.1) }
        }
        do {
            var start = 0
            while start < tokens {
                let count = min(chunkTokens, tokens - start)
                let rowBytes = UInt64(shape.hidden * dtype.byteCount)
                let slotBytes = UInt64(shape.topK * 4)
                try forwardChunk(
                    x: DevicePointer(address: x.address + UInt64(start) * rowBytes),
                    topkIDs: DevicePointer(address: topkIDs.address + UInt64(start) * slotBytes),
                    topkWeights: DevicePointer(address: topkWeights.address + UInt64(start) * slotBytes),
                    out: DevicePointer(address: out.address + UInt64(start) * rowBytes), tokens: count,
                    weights: (w1, w2), stagedSum: staged, stream: stream, marker: stageMarker)
                start += count
            }
        } catch {
            throw .cuda(error)
        }
    }

    /// For checks: sets every bit of the scratch a forward writes before it reads (align's outputs, the
    /// GEMM intermediates, the split-K accumulator), on `stream`. A kernel that read scratch this forward
    /// had not written (a missing wait, a stale row) then reads NaN or -1 instead of an earlier forward's
    /// plausible values: on a rerun of the same inputs those are the right values, which would hide it.
    /// The stream-K partials and flags are left alone: they carry state from launch to launch.
    /// `parts` names which (diagnostics): "align", "gateUp", "activated", "down", "accumulator"; nil: all.
    func poisonScratch(on stream: Stream, parts: Set<String>? = nil) throws(CUDAError) {
        func wanted(_ name: String) -> Bool { parts?.contains(name) ?? true }
        if wanted("align") {
            for output in alignOutputs {
                for buffer in [output.sortedIDs, output.expertIDs, output.totalPadded, output.chunkCounts] {
                    try buffer.fill(byte: 0xFF, on: stream)
                }
            }
        }
        let scratch = [("gateUp", gateUp), ("activated", activated), ("down", down), ("accumulator", accumulator)]
        for (name, buffer) in scratch where wanted(name) { try buffer.fill(byte: 0xFF, on: stream) }
    }

    /// Called after each stage is enqueued with the stage's name, so profiling can record an event.
    public typealias StageMarker = (String) throws(CUDAError) -> Void

    private func forwardChunk(
        x: DevicePointer, topkIDs: DevicePointer, topkWeights: DevicePointer, out: DevicePointer, tokens: Int,
        weights: (w1: DevicePointer, w2: DevicePointer), stagedSum: Bool = false, stream: Stream,
        marker: StageMarker?
    ) throws(CUDAError) {
        let k = shape.topK
        let pairs = tokens * k
        // GEMM2's sums go to `out`, or with stagedSum (an output that overlaps an input) to `down` first.
        let sums = stagedSum ? down.pointer : out
        let outBytes = tokens * shape.hidden * dtype.byteCount
        if usesAtomicCombine && !CUDAMoELayer.diagnosticSkipsZeroing {
            // GEMM2 adds every pair's row into its token's row: all of them start at zero (unrouted tokens
            // stay so). Here, before align, so the kernels keep their dependent launches.
            try DeviceBuffer.fill(sums, byte: 0, byteCount: outBytes, on: stream)
        }
        let routing1: Routing
        let routing2: Routing
        if usesIdentityRouting(tokens: tokens) {
            // One token: its k slots name distinct experts, so each pair is its own block and the GEMMs
            // read the ids directly; no align runs.
            routing1 = Routing(
                sortedIDs: .null, expertIDs: topkIDs, totalPadded: .null, maxPadded: pairs * plan.gemm1.blockM)
            routing2 = Routing(
                sortedIDs: .null, expertIDs: topkIDs, totalPadded: .null, maxPadded: pairs * plan.gemm2.blockM)
        } else {
            // GEMM1's layout, and GEMM2's when its BLOCK_M differs: from one pass (dual), or from two
            // aligns back to back. One "align" stage either way.
            let second = alignOutputs.count > 1 ? alignOutputs[1] : nil
            // Align's spare programs bring the weights GEMM1's first wave starts on into L2 meanwhile.
            let prefetch = alignPrefetch(pairs: pairs).map { (base: weights.w1, extent: $0) }
            if let second, !CUDAMoELayer.dualAlignByDefault {
                routing1 = try align(
                    topkIDs: topkIDs, pairs: pairs, into: alignOutputs[0], and: nil, prefetch: prefetch, stream: stream).0
                routing2 = try align(topkIDs: topkIDs, pairs: pairs, into: second, and: nil, stream: stream).0
            } else {
                (routing1, routing2) = try align(
                    topkIDs: topkIDs, pairs: pairs, into: alignOutputs[0], and: second, prefetch: prefetch, stream: stream)
            }
            try marker?("align")
        }
        let (h, i) = (shape.hidden, shape.intermediate)
        // Not for one token (identity routing): there it measured 1-3% slower on every preset (NOTES v24).
        let blockSync = usesBlockSync && routing1.totalPadded != .null
        if plan.activationIsFused {
            // GEMM1 writes act(gate) * up straight into `activated`: in its epilogue when K is not
            // split, else in the split-K reduction.
            try gemm(
                kernels.gemm1, plan.gemm1, a: x, gatherTopK: k, b: weights.w1, n: 2 * i, k: h, pairs: pairs,
                topkWeights: topkWeights, output: activated.pointer, outputColumns: i, finish: .activation,
                routing: routing1, blockSync: blockSync ? .signal : .none, stream: stream)
            try marker?("gemm1")
        } else {
            try gemm(
                kernels.gemm1, plan.gemm1, a: x, gatherTopK: k, b: weights.w1, n: 2 * i, k: h, pairs: pairs,
                topkWeights: topkWeights, output: gateUp.pointer, outputColumns: 2 * i, finish: .cast,
                routing: routing1, stream: stream)
            try marker?("gemm1")
            try kernels.activation.launch(
                grid: elementwiseGrid(work: pairs * i, vector: i % 8 == 0 ? 8 : 1), block: Dimensions(256),
                on: stream, arguments: [gateUp, activated, Int64(pairs), Int64(i)], programmaticDependentLaunch: programmaticDependentLaunch)
            try marker?("activation")
        }
        try gemm(
            kernels.gemm2, plan.gemm2, a: activated.pointer, gatherTopK: 1, b: weights.w2, n: h, k: i, pairs: pairs,
            topkWeights: topkWeights, output: usesAtomicCombine ? sums : down.pointer, outputColumns: h, finish: .cast,
            routing: routing2,
            routingReady: true,
            blockSync: blockSync ? .wait(gemm1Signals: CUDAMoELayer.blockSyncSignals(plan: plan, shape: shape)) : .none,
            combine: usesFusedCombine ? FusedCombine(out: out, topkIDs: topkIDs, chunk: CUDAMoELayer.fusedCombineChunk(plan: plan, dtype: dtype, pairs: pairs)) : nil,
            stream: stream)
        try marker?("gemm2")
        if usesAtomicCombine && stagedSum {
            try DeviceBuffer.copy(from: down.pointer, to: out, byteCount: outBytes, on: stream)
            try marker?("combine")
        }
        if usesFusedCombine || usesAtomicCombine { return }
        try kernels.combine.launch(
            grid: elementwiseGrid(work: tokens * h, vector: h % 8 == 0 ? 8 : 1), block: Dimensions(256), on: stream,
            arguments: [down, out, Int64(tokens), Int32(k), Int64(h), topkIDs], programmaticDependentLaunch: programmaticDependentLaunch)
        try marker?("combine")
    }

    /// Align's L2 prefetch for a forward of `pairs` pairs (`CUDAMoELayer.alignPrefetch` with this layer's
    /// plan and the FUSED_MOE_ALIGN_PREFETCH_MB budget); nil: none.
    func alignPrefetch(pairs: Int) -> AlignPrefetch? {
        CUDAMoELayer.alignPrefetch(
            plan: plan, shape: shape, routedExperts: routedExperts, pairs: pairs, elementBytes: dtype.byteCount,
            multiprocessors: library.device.properties.multiprocessorCount, budget: CUDAMoELayer.alignPrefetchBudget)
    }

    /// Whether the byte ranges [a, a + aBytes) and [b, b + bBytes) share a byte.
    static func overlaps(_ a: UInt64, _ aBytes: Int, _ b: UInt64, _ bBytes: Int) -> Bool {
        aBytes > 0 && bBytes > 0 && a < b &+ UInt64(bBytes) && b < a &+ UInt64(aBytes)
    }

    /// Whether `plan` lets GEMM2 sum the tokens' rows by atomic adds (`sumsInGEMM2`): GEMM2 on a wgmma
    /// kernel but ping-pong and stream-K (the plain, persistent and swap-AB ones), unsplit (moe_gemm_sm90.cu's
    /// SPLIT_MODE 3).
    public static func allowsAtomicCombine(plan: MoEPlan) -> Bool {
        [.wgmma, .wgmmaPersistent, .wgmmaSwap].contains(plan.gemm2.kernel) && plan.gemm2.effectiveMode == .none
    }

    /// Whether this layer sums each token's partial rows inside GEMM2 (asked for or defaulted at init, and
    /// the plan allows it): no combine kernel runs then.
    public var usesFusedCombine: Bool { combineCounts.byteCount > 0 }

    /// Whether `plan` allows the fused combine (moe_gemm_sm90_persistent's MoESm90Combine, NOTES v27): kernels
    /// compiled with it (MOE_SM90_FUSED_COMBINE=1 in the library's `defines`: an experiment), k > 1
    /// (one slot needs no sum), no expert map (whose unowned slots have ids in range but no rows), and
    /// GEMM2 on the persistent kernel's A-resident walk, which alone runs the combine items: unsplit, not
    /// ping-pong or stream-K, BLOCK_M 128, K = I at most the A slots' K tiles (MOE_SM90_A_RESIDENT under
    /// the library's `defines`), at least 3 B stages left beside them (MoEGemmSm90PersistentTraits), not
    /// beside the half tiles (MOE_SM90_HALF_TILES=1, another experiment); and its counters' fields hold
    /// the counts: `programs` (the combine items per chunk) below 2^9, the consumer warps' arrivals per
    /// chunk (8 per valid m-block, at most `maxPadded` / 128) below 2^22.
    static func allowsFusedCombine(
        plan: MoEPlan, shape: MoEShape, expertMap: Bool, defines: [String] = [], programs: Int = 132,
        maxPadded: Int = 0
    ) -> Bool {
        let config = plan.gemm2
        let aSlots = defineValue("MOE_SM90_A_RESIDENT", in: defines) ?? residentASlots
        let ringBytes = config.stages * 128 * (config.blockM + config.blockN)
        let bStages = min(config.stages, (ringBytes - aSlots * 128 * config.blockM) / (128 * config.blockN))
        let halfTiles = defineValue("MOE_SM90_HALF_TILES", in: defines) == 1
        let compiled = defineValue("MOE_SM90_FUSED_COMBINE", in: defines) == 1
        return compiled && shape.topK > 1 && !expertMap && !halfTiles && config.kernel == .wgmmaPersistent && config.effectiveMode == .none
            && config.blockM == 128 && aSlots > 0 && 16 * aSlots <= 4 * config.blockM
            && shape.intermediate <= 64 * aSlots && bStages >= 3
            && programs < 1 << 9 && 8 * (maxPadded / 128 + 1) < 1 << 22
    }

    /// The same for a layer of `plan` made by `library` with `options` for `pairs` pairs per chunk: what
    /// init decides, and what the checks ask before comparing the two ways.
    static func allowsFusedCombine(
        plan: MoEPlan, shape: MoEShape, options: MoEOptions, library: KernelLibrary, pairs: Int
    ) -> Bool {
        allowsFusedCombine(
            plan: plan, shape: shape, expertMap: options.expertMap != nil, defines: library.defines,
            programs: library.device.properties.multiprocessorCount,
            maxPadded: Align.maximumPaddedCount(
                pairs: pairs, experts: options.routedExperts(local: shape.experts), blockM: plan.gemm2.blockM))
    }

    /// The n-blocks one program of a swap-AB GEMM1 with its activation runs (the config's `unit`, else
    /// MOE_SM90_SWAP_UNIT in the library's `defines`; NOTES v39, v40; 1 without either), where the kernel takes the unit walk:
    /// MoEGemmSm90SwapTraits::UNIT, the paired epilogue (128 or 256 weight rows, unsplit; bf16 silu at any width,
    /// else at most 128 tokens; MOE_SM90_SWAP_PAIRED_ACT not 0).
    static func swapUnit(config: GemmConfig, dtype: DType, activation: Activation, defines: [String]) -> Int {
        let unit = config.unit > 1 ? config.unit : defineValue("MOE_SM90_SWAP_UNIT", in: defines) ?? 1
        let paired = config.kernel == .wgmmaSwap && [128, 256].contains(config.blockN) && config.effectiveMode == .none
            && defineValue("MOE_SM90_SWAP_PAIRED_ACT", in: defines) != 0
            && ((activation == .silu && dtype == .bf16) || config.blockM <= 128)
        return paired ? max(unit, 1) : 1
    }

    /// The K tiles GEMM2 keeps resident: the kernels' MOE_SM90_A_RESIDENT default (RoutingTests reads it
    /// from the source).
    static let residentASlots = 6

    /// GEMM2's n-blocks per unit of its chunk-major walk under the fused combine: as many as keep one
    /// chunk's partial rows (pairs x columns x 2 bytes) within `fusedCombineChunkBytes`, 1 to 4.
    static func fusedCombineChunk(plan: MoEPlan, dtype: DType, pairs: Int, budget: Int = fusedCombineChunkBytes) -> Int {
        let blockBytes = max(pairs * plan.gemm2.blockN * dtype.byteCount, 1)
        return min(max(budget / blockBytes, 1), 4)
    }

    /// For checks: the fused combine's counters, read back after the stream's work (all zero between
    /// forwards); nil when the layer does not fuse the combine.
    public func fusedCombineCounters(stream: Stream) throws(CUDAError) -> [Int32]? {
        guard usesFusedCombine else { return nil }
        try stream.synchronize()
        return try combineCounts.download(count: combineCounts.byteCount / 4, as: Int32.self)
    }

    /// Where GEMM2's fused combine writes: the chunk's output rows, from its topk_ids.
    struct FusedCombine {
        var out: DevicePointer
        var topkIDs: DevicePointer
        var chunk: Int
    }

    /// What the grouped GEMMs read of the routing: align's output, or (one token) the ids themselves.
    struct Routing {
        var sortedIDs: DevicePointer
        var expertIDs: DevicePointer
        var totalPadded: DevicePointer
        /// The padded row bound the GEMM grids cover.
        var maxPadded: Int
    }

    /// Whether a chunk of `tokens` skips align: one token, no expert map (its ids are router ids, not
    /// local experts), both GEMMs on the wgmma kernels (their weight reads are bounds-checked by
    /// the tensor map), and the plan allows it.
    func usesIdentityRouting(tokens: Int) -> Bool {
        CUDAMoELayer.usesIdentityRouting(plan: plan, tokens: tokens, expertMap: expertMap != nil)
    }

    /// Whether this layer lets GEMM2 wait for GEMM1 per m-block rather than for the whole grid (the
    /// swap-AB kernel's block sync, `moe_gemm_sm90.cu`; asked for at init, and the plan allows it).
    var usesBlockSync: Bool { blockDone.byteCount > 0 }

    /// Whether `plan` allows the block sync: both GEMMs on the swap-AB kernel with one align (the same
    /// BLOCK_M), GEMM1 unsplit with the activation in its epilogue (so it is GEMM2's predecessor and
    /// writes its rows itself), GEMM2 not in atomic mode, and programmatic dependent launch (without it
    /// GEMM2 starts after GEMM1 anyway; a layer asked for the sync passes true). The forward leaves it
    /// off for one token (identity routing).
    static func usesBlockSync(plan: MoEPlan, programmaticDependentLaunch: Bool) -> Bool {
        programmaticDependentLaunch && plan.gemm1.kernel == .wgmmaSwap && plan.gemm2.kernel == .wgmmaSwap
            && plan.gemm1.blockM == plan.gemm2.blockM && plan.activationIsFused && plan.gemm1.effectiveMode == .none
            && plan.gemm2.effectiveMode != .atomic
    }

    /// The block sync's count GEMM2 waits for per m-block: GEMM1's n-blocks times its consumer warps
    /// (each warp of the swap-AB kernel beyond its 128 producer threads counts its stored rows once).
    static func blockSyncSignals(plan: MoEPlan, shape: MoEShape) -> Int {
        (2 * shape.intermediate + plan.gemm1.blockN - 1) / plan.gemm1.blockN * (plan.gemm1.threads - 128) / 32
    }

    /// GEMM1's counts per m-block (`blockSyncSignals`) in a counter's low 16 bits, and GEMM2's programs
    /// per m-block (n-blocks times splits) in its high bits, below the sign bit.
    static func blockSyncCountsFit(plan: MoEPlan, shape: MoEShape) -> Bool {
        let readers = (shape.hidden + plan.gemm2.blockN - 1) / plan.gemm2.blockN * plan.gemm2.splitK
        return blockSyncSignals(plan: plan, shape: shape) < 0x10000 && readers < 0x8000
    }

    /// The swap-AB GEMMs' per-program timeline of the last forward (MOE_SM90_DIAG_TIMES=1 kernels; nil
    /// otherwise): GEMM1's and GEMM2's records, 8 values per program (moe_gemm_sm90.cu's notes), after
    /// synchronizing `stream`. A GEMM that is not the swap-AB kernel leaves its half as it was.
    public func diagnosticTimes(stream: Stream) throws(CUDAError) -> (gemm1: [UInt64], gemm2: [UInt64])? {
        guard diagTimes.byteCount > 0 else { return nil }
        try stream.synchronize()
        let all = try diagTimes.download(count: diagTimes.byteCount / 8, as: UInt64.self)
        return (Array(all[..<(all.count / 2)]), Array(all[(all.count / 2)...]))
    }

    /// For checks: the block sync's counters, read back after the stream's work (all zero between
    /// forwards); nil when the plan does not use it.
    public func blockSyncCounters(stream: Stream) throws(CUDAError) -> [Int32]? {
        guard usesBlockSync else { return nil }
        try stream.synchronize()
        return try blockDone.download(count: blockDone.byteCount / 4, as: Int32.self)
    }

    static func usesIdentityRouting(plan: MoEPlan, tokens: Int, expertMap: Bool) -> Bool {
        tokens == 1 && plan.identityRouting && !expertMap && plan.gemm1.kernel.needsHopper
            && plan.gemm2.kernel.needsHopper
    }

    /// Where one align writes: the expert-sorted pair order padded to `blockM` rows per expert, the
    /// expert of each block, the padded count, and the three-kernel sequence's per-chunk counts.
    struct AlignOutput {
        var blockM: Int
        var sortedIDs: DeviceBuffer
        var expertIDs: DeviceBuffer
        var totalPadded: DeviceBuffer
        var chunkCounts: DeviceBuffer
    }

    /// Enqueues align for `pairs` pairs into `output` (and, from the same pass, into `second` with its
    /// own BLOCK_M) and returns where each GEMM finds its result (the second routing is the first's
    /// when `second` is nil).
    private func align(
        topkIDs: DevicePointer, pairs: Int, into output: AlignOutput, and second: AlignOutput?,
        prefetch: (base: DevicePointer, extent: AlignPrefetch)? = nil, stream: Stream
    ) throws(CUDAError) -> (Routing, Routing) {
        let first = AlignTarget(output, pairs: pairs, experts: routedExperts)
        let other = second.map { AlignTarget($0, pairs: pairs, experts: routedExperts) }
        try launchAlign(
            AlignLaunch.choice(pairs: pairs), topkIDs: topkIDs, pairs: pairs, first, second: other, staged: true,
            prefetch: prefetch, programmaticDependentLaunch: programmaticDependentLaunch, stream: stream)
        func routing(_ target: AlignTarget) -> Routing {
            Routing(
                sortedIDs: target.sortedIDs, expertIDs: target.expertIDs, totalPadded: target.totalPadded,
                maxPadded: target.maxPadded)
        }
        return (routing(first), routing(other ?? first))
    }

    /// Where one layout of align goes: sortedIDs (maxPadded entries), expertIDs (ceil(maxPadded /
    /// blockM)) and totalPadded; chunkCounts holds ceil(pairs / alignChunk) * E entries for the
    /// three-launch sequence (the first layout's counts, then positions; the second layout's positions).
    struct AlignTarget {
        var blockM: Int
        var sortedIDs: DevicePointer
        var expertIDs: DevicePointer
        var totalPadded: DevicePointer
        var chunkCounts: DevicePointer
        var maxPadded: Int
    }

    /// Enqueues the align kernels of `launch` (which must allow `pairs`: AlignLaunch.allows) writing
    /// `first`'s layout and, in the same pass, `second`'s. `staged`: the one-launch kernel gets dynamic
    /// shared memory for its runs (false: it stores them directly).
    private func launchAlign(
        _ launch: AlignLaunch, topkIDs: DevicePointer, pairs: Int, _ first: AlignTarget, second: AlignTarget?,
        staged: Bool, prefetch: (base: DevicePointer, extent: AlignPrefetch)? = nil, programmaticDependentLaunch: Bool,
        stream: Stream
    ) throws(CUDAError) {
        let routed = routedExperts
        // The prefetch's arguments, and its spare programs past align's own (none without one; the
        // one-launch kernel only: in the three-launch sequence they delayed the kernels after the count).
        let prefetchArguments: [any KernelArgument] = [
            prefetch?.base ?? .null, Int64(prefetch?.extent.rows ?? 0), Int64(prefetch?.extent.pitch ?? 0),
            Int32(prefetch?.extent.bytesPerRow ?? 0),
        ]
        let spare = prefetch.map {
            CUDAMoELayer.alignPrefetchPrograms($0.extent, multiprocessors: library.device.properties.multiprocessorCount)
        } ?? 0
        let map = expertMap?.pointer ?? .null
        let pdl = programmaticDependentLaunch
        // The second layout's arguments; block_m2 = 0 and null pointers: none.
        let blockM2 = Int32(second?.blockM ?? 0)
        let (sorted2, experts2, total2, offsets2) =
            (second?.sortedIDs ?? .null, second?.expertIDs ?? .null, second?.totalPadded ?? .null, second?.chunkCounts ?? .null)
        let maxPadded2 = Int64(second?.maxPadded ?? 0)
        switch launch {
        case .single:
            // The second layout's runs follow the first's (at a 16-byte boundary) in the stage.
            let stageRows = (first.maxPadded + 3) / 4 * 4 + (second?.maxPadded ?? 0)
            let stage = staged
                ? CUDAMoELayer.alignStageBytes(
                    maxPadded: stageRows, optIn: library.device.properties.sharedMemoryPerBlockOptIn) : 0
            try kernels.alignSingle.launch(
                grid: Dimensions(1 + spare), block: Dimensions(512), sharedMemoryBytes: stage, on: stream,
                arguments: [
                    topkIDs, Int64(pairs), Int32(routed), Int32(first.blockM), map, first.sortedIDs, first.expertIDs,
                    first.totalPadded, Int64(first.maxPadded), blockM2, sorted2, experts2, total2, maxPadded2,
                ] + prefetchArguments, programmaticDependentLaunch: pdl)
        case .chunked:
            let chunks = max(1, (pairs + alignChunk - 1) / alignChunk)
            try kernels.alignCount.launch(
                grid: Dimensions(chunks), block: Dimensions(256), on: stream,
                arguments: [topkIDs, Int64(pairs), Int32(routed), first.chunkCounts], programmaticDependentLaunch: pdl)
            try kernels.alignScan.launch(
                grid: Dimensions(1), block: Dimensions(1024), on: stream,
                arguments: [
                    first.chunkCounts, Int32(chunks), Int64(pairs), Int32(routed), Int32(first.blockM), map,
                    first.sortedIDs, first.expertIDs, first.totalPadded, Int64(first.maxPadded), blockM2, offsets2,
                    sorted2, experts2, total2, maxPadded2,
                ], programmaticDependentLaunch: pdl)
            try kernels.alignScatter.launch(
                grid: Dimensions(chunks), block: Dimensions(256), on: stream,
                arguments: [topkIDs, Int64(pairs), Int32(routed), first.chunkCounts, first.sortedIDs, offsets2, sorted2],
                programmaticDependentLaunch: pdl)
        }
    }

    /// A swap-AB GEMM's part in the block sync: none, GEMM1 counting its stored tiles per m-block, or
    /// GEMM2 waiting for that count on each of its m-blocks.
    enum BlockSyncRole {
        case none
        case signal
        /// GEMM1's counts per m-block: its programs per m-block times their consumer warps (each warp
        /// counts its stored rows once).
        case wait(gemm1Signals: Int)
    }

    /// How a GEMM's fp32 result becomes the output: rounded as is, or as act(gate) * up.
    enum Finish {
        case cast
        case activation
    }

    /// One grouped GEMM (`n` output columns of fp32 accumulation) into `output` (`[pairs,
    /// outputColumns]` of the layer's dtype), through the fp32 accumulator when the config splits K.
    /// With `.activation` the n = 2I columns are gate and up, and `output` receives act(gate) * up.
    private func gemm(
        _ kernel: Kernel, _ config: GemmConfig, a: DevicePointer, gatherTopK: Int, b: DevicePointer, n: Int, k: Int,
        pairs: Int, topkWeights: DevicePointer, output: DevicePointer, outputColumns: Int, finish: Finish,
        routing: Routing, routingReady: Bool = false, blockSync: BlockSyncRole = .none, combine: FusedCombine? = nil,
        stream: Stream
    ) throws(CUDAError) {
        let maxPadded = routing.maxPadded
        let mode = config.effectiveMode
        let target: DevicePointer
        switch mode {
        case .none: target = output
        case .atomic:
            try accumulator.fill(byte: 0, byteCount: pairs * n * 4, on: stream)
            target = accumulator.pointer
        case .workspace: target = accumulator.pointer
        }
        // Unsplit, the kernel itself writes `output` with its row stride; split, the fp32 rows are n wide.
        let rowStride = mode == .none ? outputColumns : n
        let mBlocks = (maxPadded + config.blockM - 1) / config.blockM
        let nBlocks = (n + config.blockN - 1) / config.blockN
        // A persistent kernel walks the tiles with one resident program per SM (per split).
        // Cluster pairs need an even count (a last program without a tile returns at once).
        // Stream-K: one per SM whatever the tiles (it cuts their K iterations over all of them).
        let multiprocessors = library.device.properties.multiprocessorCount
        // The swap-AB GEMM1's units (`gemm1Unit`): one program per unit of n-blocks of an m-block.
        let unit = finish == .activation ? gemm1Unit : 1
        let programs = unit > 1
            ? mBlocks * ((nBlocks + unit - 1) / unit)
            : config.kernel == .wgmmaStreamK
            ? multiprocessors
            : config.kernel.isPersistent
            ? min(mBlocks * nBlocks, max(1, multiprocessors / config.splitK))
            : (mBlocks * nBlocks + config.clusterM - 1) / config.clusterM * config.clusterM
        let grid = Dimensions(max(programs, 1), config.splitK)
        if config.kernel == .mma {
            try kernel.launch(
                grid: grid, block: Dimensions(config.threads), sharedMemoryBytes: config.sharedMemoryBytes, on: stream,
                arguments: [
                    a, b, target, topkWeights, routing.sortedIDs, routing.expertIDs, routing.totalPadded, Int64(n), Int64(k),
                    Int64(pairs),
                    Int32(gatherTopK), Int32(config.splitK), Int32(config.groupSizeM), Int64(k), Int64(n * k), Int64(k),
                    Int64(rowStride), Int64(maxPadded),
                ], programmaticDependentLaunch: programmaticDependentLaunch)
        } else {
            // The weights [E, N, K] as [E*N rows][K columns], read by TMA in [blockN][64] boxes with the
            // 128-byte swizzle the kernel's shared-memory layout expects. Encoding is host-only work.
            // The held weights' maps are made once in init; weights passed per call get theirs here.
            let boxRows = config.tensorMapBoxRows(fusedActivation: finish == .activation)
            let key = TensorMapKey(address: b.address, n: n, k: k, boxRows: boxRows)
            let map: TensorMap
            if let held = heldTensorMaps[key] { map = held } else { map = try tensorMap(key) }
            var arguments: [any KernelArgument] = [
                map, a, target, topkWeights, routing.sortedIDs, routing.expertIDs, routing.totalPadded, Int64(n),
                Int64(k), Int64(pairs),
                Int32(gatherTopK), Int32(config.splitK), Int32(config.groupSizeM), Int64(k), Int64(rowStride),
                Int64(maxPadded),
            ]
            if config.kernel == .wgmma { arguments.append(Int32(shape.topK)) }  // combine_k (SPLIT_MODE 3)
            if config.kernel == .wgmmaSwap {
                // GEMM2: align wrote the routing before the previous kernel started, so the swap-AB
                // kernel may read it and its first weight tiles before griddepcontrol.wait.
                arguments.append(Int32(routingReady ? 1 : 0))
                switch blockSync {
                case .none: arguments += [DevicePointer.null, Int32(0)]
                case .signal: arguments += [blockDone.pointer, Int32(0)]
                case .wait(let blocks): arguments += [blockDone.pointer, Int32(blocks)]
                }
                arguments.append(Int32(shape.topK))  // combine_k: SPLIT_MODE 3's output row is pair / k
                if diagTimes.byteCount > 0 {  // the diagnostic's timeline: GEMM1 first half, GEMM2 second
                    arguments.append(DevicePointer(address: diagTimes.pointer.address + UInt64(routingReady ? diagTimes.byteCount / 2 : 0)))
                }
            }
            if config.kernel.isPersistent {  // the stream-K workspace (null for the other walks)
                let streamK = config.kernel == .wgmmaStreamK
                arguments += [streamK ? streamPartials.pointer : .null, streamK ? streamFlags.pointer : .null]
                // The fused combine (a null output: off).
                arguments += [
                    combine?.out ?? .null, combine?.topkIDs ?? .null, combine != nil ? combineCounts.pointer : .null,
                    Int32(shape.topK), Int32(routedExperts), Int32(combine?.chunk ?? 1),
                ]
            }
            try kernel.launch(
                grid: grid, block: Dimensions(config.threads), sharedMemoryBytes: config.sharedMemoryBytes, on: stream,
                arguments: arguments, programmaticDependentLaunch: programmaticDependentLaunch, clusterX: config.clusterM)
        }
        guard mode != .none else { return }
        let splits = mode == .workspace ? config.splitK : 1
        let splitStride = mode == .workspace ? pairs * n : 0
        switch finish {
        case .activation:
            try kernels.splitReduceActivation.launch(
                grid: elementwiseGrid(work: pairs * outputColumns, vector: 8), block: Dimensions(256), on: stream,
                arguments: [accumulator, Int64(splitStride), Int32(splits), Int64(pairs), Int64(outputColumns), output], programmaticDependentLaunch: programmaticDependentLaunch)
        case .cast where mode == .atomic:
            try kernels.cast.launch(
                grid: elementwiseGrid(work: pairs * n, vector: 4), block: Dimensions(256), on: stream,
                arguments: [accumulator, output, Int64(pairs * n)], programmaticDependentLaunch: programmaticDependentLaunch)
        case .cast:
            try kernels.splitReduce.launch(
                grid: elementwiseGrid(work: pairs * n, vector: 4), block: Dimensions(256), on: stream,
                arguments: [accumulator, Int64(pairs * n), Int32(config.splitK), Int64(pairs), Int64(n), Int64(n), output], programmaticDependentLaunch: programmaticDependentLaunch)
        }
    }

    private func elementwiseGrid(work: Int, vector: Int) -> Dimensions {
        Dimensions(min(max((work + 256 * vector - 1) / (256 * vector), 1), 8192))
    }

    /// The experts the weights hold (local experts).
    var weightExperts: Int { shape.experts }

    /// What a weight tensor map depends on.
    struct TensorMapKey: Hashable {
        var address: UInt64
        var n: Int
        var k: Int
        var boxRows: Int
    }

    /// The TMA descriptor of weights `[E, n, k]` at `key.address`, read in `[boxRows][64]` boxes with
    /// the 128-byte swizzle the wgmma kernels' shared-memory layout expects (host-only work).
    func tensorMap(_ key: TensorMapKey) throws(CUDAError) -> TensorMap {
        try TensorMap(
            device: library.device, address: DevicePointer(address: key.address),
            elementType: dtype == .fp16 ? .float16 : .bfloat16, rows: weightExperts * key.n, columns: key.k,
            rowStrideBytes: key.k * dtype.byteCount, boxRows: key.boxRows, boxColumns: 64, swizzle: .bytes128)
    }

    /// The device bytes this layer allocated for scratch (weights not counted; a `sharedScratch` is
    /// not this layer's: its owner counts it once, `SharedScratch.byteCount`).
    public var scratchBytes: Int {
        let shared = sharedScratch == nil ? [gateUp, activated, down, accumulator] : []
        return (alignOutputs.flatMap { [$0.sortedIDs, $0.expertIDs, $0.totalPadded, $0.chunkCounts] }
            + shared + [blockDone]).map(\.byteCount)
            .reduce(0, +) + (expertMap?.byteCount ?? 0)
    }

    /// The bytes of the scratch buffers a layer can take from a `SharedScratch`: the GEMMs'
    /// intermediates and the split-K accumulator, which every forward writes before it reads.
    public struct ScratchSizes: Hashable, Sendable, CustomStringConvertible {
        /// `[M*k, 2I]` (unfused plans only), `[M*k, I]`, `[M*k, H]` of the dtype, and fp32 partial sums.
        public var gateUp = 0, activated = 0, down = 0, accumulator = 0

        public init() {}

        /// What a layer of `plan` made for `maxTokens` in chunks of `chunkTokens` needs.
        public init(shape: MoEShape, dtype: DType, plan: MoEPlan, maxTokens: Int, chunkTokens: Int) {
            let pairs = max(min(maxTokens, chunkTokens), 1) * shape.topK
            func accumulatorFloats(_ config: GemmConfig, n: Int) -> Int {
                switch config.effectiveMode {
                case .none: 0
                case .atomic: pairs * n
                case .workspace: config.splitK * pairs * n
                }
            }
            gateUp = plan.activationIsFused ? 0 : pairs * 2 * shape.intermediate * dtype.byteCount
            activated = pairs * shape.intermediate * dtype.byteCount
            down = pairs * shape.hidden * dtype.byteCount
            accumulator = 4 * max(
                accumulatorFloats(plan.gemm1, n: 2 * shape.intermediate), accumulatorFloats(plan.gemm2, n: shape.hidden))
        }

        /// Each buffer at least `other`'s.
        public func holds(_ other: ScratchSizes) -> Bool {
            gateUp >= other.gateUp && activated >= other.activated && down >= other.down
                && accumulator >= other.accumulator
        }

        /// Each buffer the larger of the two.
        public func union(_ other: ScratchSizes) -> ScratchSizes {
            var sizes = self
            sizes.gateUp = max(gateUp, other.gateUp)
            sizes.activated = max(activated, other.activated)
            sizes.down = max(down, other.down)
            sizes.accumulator = max(accumulator, other.accumulator)
            return sizes
        }

        public var description: String {
            "gateUp \(gateUp), activated \(activated), down \(down), accumulator \(accumulator) bytes"
        }
    }

    /// Scratch that layers of one shape and dtype share when they never run at the same time: the C
    /// ABI's layers of one handle, one per run of batch sizes with one plan, whose forwards the caller
    /// serializes. Allocated once, at the largest of their `ScratchSizes`.
    public final class SharedScratch: Sendable {
        public let device: Device
        public let sizes: ScratchSizes
        let gateUp: DeviceBuffer
        let activated: DeviceBuffer
        let down: DeviceBuffer
        let accumulator: DeviceBuffer

        public init(device: Device, sizes: ScratchSizes) throws(CUDAError) {
            self.device = device
            self.sizes = sizes
            gateUp = try DeviceBuffer(device: device, byteCount: sizes.gateUp)
            activated = try DeviceBuffer(device: device, byteCount: sizes.activated)
            down = try DeviceBuffer(device: device, byteCount: sizes.down)
            accumulator = try DeviceBuffer(device: device, byteCount: sizes.accumulator)
        }

        /// The device bytes it holds.
        public var byteCount: Int { [gateUp, activated, down, accumulator].map(\.byteCount).reduce(0, +) }
    }
}

extension CUDAMoELayer {
    /// Runs only the align stage on host ids and reads the result back: for checks, not for the
    /// forward path (it allocates and synchronizes). `blockM` may differ from the plan's.
    /// `launch`: the kernels to run (nil: the forward's choice; one that does not take these pairs is a
    /// usage error). `staged: false` gives the one-launch kernels no shared memory for their runs (their
    /// direct stores).
    public func debugAlign(
        ids: [Int32], blockM: Int, launch: AlignLaunch? = nil, staged: Bool = true, stream: Stream
    ) throws(CUDAError) -> AlignedRouting {
        try debugAlign(ids: ids, blockMs: [blockM], launch: launch, staged: staged, stream: stream)[0]
    }

    /// The same for one or two layouts (`blockMs`): two come from one pass, as the forward of a plan whose
    /// GEMMs have different BLOCK_M runs it. `spare`: the one-launch kernel also has the forward's spare
    /// L2-prefetch programs (here prefetching the ids), which must not change the result.
    public func debugAlign(
        ids: [Int32], blockMs: [Int], launch: AlignLaunch? = nil, staged: Bool = true, spare: Bool = false,
        stream: Stream
    ) throws(CUDAError) -> [AlignedRouting] {
        let device = library.device
        let routed = routedExperts
        let pairs = ids.count
        let launch = launch ?? AlignLaunch.choice(pairs: pairs)
        guard AlignLaunch.allows(launch, pairs: pairs) else {
            throw CUDAError(
                domain: .usage, code: 0, name: "launch", call: "debugAlign",
                message: "the \(launch.rawValue) align takes at most \(CUDAMoELayer.singleAlignLimit) pairs, not \(pairs)")
        }
        guard (1...2).contains(blockMs.count), blockMs.allSatisfy({ $0 >= 1 }) else {
            throw CUDAError(
                domain: .usage, code: 0, name: "blockMs", call: "debugAlign",
                message: "expected one or two block sizes of at least 1, got \(blockMs)")
        }
        let chunks = max(1, (pairs + alignChunk - 1) / alignChunk)
        let idBuffer = try DeviceBuffer(device: device, count: max(pairs, 1), of: Int32.self)
        try idBuffer.upload(ids)
        // Every buffer is held here until the kernels are done (the targets hold bare pointers).
        var buffers: [(sorted: DeviceBuffer, experts: DeviceBuffer, total: DeviceBuffer, counts: DeviceBuffer, target: AlignTarget)] = []
        for blockM in blockMs {
            let maxPadded = Align.maximumPaddedCount(pairs: pairs, experts: routed, blockM: blockM)
            let maxBlocks = (maxPadded + blockM - 1) / blockM
            let sorted = try DeviceBuffer(device: device, count: max(maxPadded, 1), of: Int32.self)
            let experts = try DeviceBuffer(device: device, count: max(maxBlocks, 1), of: Int32.self)
            let total = try DeviceBuffer(device: device, count: 1, of: Int32.self)
            let counts = try DeviceBuffer(device: device, count: chunks * routed, of: Int32.self)
            for buffer in [sorted, experts, total] { try buffer.fill(byte: 0xEE, on: stream) }
            let target = AlignTarget(
                blockM: blockM, sortedIDs: sorted.pointer, expertIDs: experts.pointer, totalPadded: total.pointer,
                chunkCounts: counts.pointer, maxPadded: maxPadded)
            buffers.append((sorted, experts, total, counts, target))
        }
        // spare: the launch also runs prefetch programs (the forward's L2 prefetch), here over the ids'
        // own 16-byte rows, which must leave every result as it is.
        let prefetch = spare && launch == .single
            ? (base: idBuffer.pointer, extent: AlignPrefetch(rows: max(pairs / 4, 1), bytesPerRow: 16, pitch: 16)) : nil
        try launchAlign(
            launch, topkIDs: idBuffer.pointer, pairs: pairs, buffers[0].target,
            second: buffers.count > 1 ? buffers[1].target : nil, staged: staged, prefetch: prefetch,
            programmaticDependentLaunch: false, stream: stream)
        try stream.synchronize()
        var results: [AlignedRouting] = []
        for (sorted, experts, total, _, target) in buffers {
            let (blockM, maxPadded) = (target.blockM, target.maxPadded)
            let maxBlocks = (maxPadded + blockM - 1) / blockM
            let padded = Int(try total.download(count: 1, as: Int32.self)[0])
            let sortedIDs = try sorted.download(count: maxPadded, as: Int32.self)
            let expertIDs = try experts.download(count: maxBlocks, as: Int32.self)
            // Past the padded count the kernels must have written padding and -1 (not left the poison).
            guard padded >= 0, padded <= maxPadded, sortedIDs[padded...].allSatisfy({ $0 == Int32(pairs) }),
                expertIDs[(padded / blockM)...].allSatisfy({ $0 == -1 })
            else {
                throw CUDAError(
                    domain: .usage, code: 0, name: "mismatch", call: "align",
                    message: "entries past the padded count \(padded) (BLOCK_M \(blockM)) were not filled")
            }
            results.append(
                AlignedRouting(
                    sortedTokenIDs: Array(sortedIDs.prefix(padded)), expertIDs: Array(expertIDs.prefix(padded / blockM)),
                    paddedCount: padded, padValue: Int32(pairs), blockM: blockM))
        }
        return results
    }
}

extension CUDAMoELayer.AlignTarget {
    /// The layer's scratch for `output`'s BLOCK_M, sized for `pairs` pairs over `experts` experts.
    init(_ output: CUDAMoELayer.AlignOutput, pairs: Int, experts: Int) {
        self.init(
            blockM: output.blockM, sortedIDs: output.sortedIDs.pointer, expertIDs: output.expertIDs.pointer,
            totalPadded: output.totalPadded.pointer, chunkCounts: output.chunkCounts.pointer,
            maxPadded: Align.maximumPaddedCount(pairs: pairs, experts: experts, blockM: output.blockM))
    }
}
