/// How split-K partial sums are combined.
public enum SplitMode: String, CaseIterable, Sendable, Hashable {
    /// One program per output tile (SPLIT_K must be 1).
    case none
    /// fp32 atomic adds into a zeroed buffer, then a cast: fast, not bitwise reproducible.
    case atomic
    /// Partials into a `[SPLIT_K, rows, N]` fp32 workspace, summed in a fixed order: reproducible.
    case workspace

    /// The kernel's SPLIT_MODE template argument.
    var templateValue: Int {
        switch self {
        case .none: 0
        case .atomic: 1
        case .workspace: 2
        }
    }
}

/// Which grouped-GEMM kernel runs a config.
public enum GemmKernel: String, CaseIterable, Sendable, Hashable {
    /// `moe_gemm` (moe_gemm.cu): mma.sync from ldmatrix, cp.async ring; any NVIDIA GPU from sm_80.
    case mma
    /// `moe_gemm_sm90` (moe_gemm_sm90.cu): wgmma, weights by TMA, a producer warpgroup and one or
    /// two consumer warpgroups; Hopper (sm_90a) only. BLOCK_M 64 or 128, BLOCK_K 64.
    case wgmma
    /// `moe_gemm_sm90_swap`: wgmma with the weight rows on wgmma's M side and the tokens on its N
    /// side (swap-AB). For decode, BLOCK_M (tokens) 8..64; for prefill, a wide token tile of 80..192
    /// rows in steps of 16 (an align block that fits the rows per expert more closely than 64-row
    /// steps). BLOCK_N (weight rows) 64 or 128 (one consumer warpgroup) or 256 (two).
    case wgmmaSwap = "wgmma_swap"
    /// `moe_gemm_sm90_persistent`: the wgmma kernel with a persistent grid (one program per SM
    /// walking the tiles), so the producer fills the ring for the next tile during the epilogue.
    case wgmmaPersistent = "wgmma_persistent"
    /// `moe_gemm_sm90_persistent` in ping-pong: each consumer warpgroup computes whole 128-row tiles,
    /// the two taking turns on the tensor cores, so one's epilogue runs under the other's products.
    /// BLOCK_M 128, BLOCK_N 64 or 128.
    case wgmmaPingpong = "wgmma_pingpong"
    /// `moe_gemm_sm90_persistent` with stream-K: one program per SM; after the whole rounds of tiles
    /// the partial wave's tiles are cut into up to 4 equal K pieces over the idle programs, and a
    /// tile's pieces are summed in a fixed order (reproducible): a shorter last wave. SPLIT_K 1.
    case wgmmaStreamK = "wgmma_streamk"

    /// The kernel needs the Hopper-specific target (wgmma, setmaxnreg, TMA).
    public var needsHopper: Bool { self != .mma }
    /// A persistent grid: one resident program per SM (per split) walks the tiles.
    public var isPersistent: Bool { self == .wgmmaPersistent || self == .wgmmaPingpong || self == .wgmmaStreamK }
}

/// One grouped-GEMM configuration: tile shape, warps, pipeline depth, swizzle and split-K.
///
/// The tile keys are SGLang's and vLLM's (`BLOCK_SIZE_M`, ..., `num_warps`, `num_stages`); the
/// warps are laid out as `warpsM x warpsN` over the tile.
public struct GemmConfig: Hashable, Sendable, CustomStringConvertible {
    public var blockM: Int
    public var blockN: Int
    public var blockK: Int
    public var warpsM: Int
    public var warpsN: Int
    public var stages: Int
    public var groupSizeM: Int
    public var splitK: Int
    public var splitMode: SplitMode
    public var kernel: GemmKernel
    /// Thread-block cluster width (`CLUSTER_M`): 2 launches the `wgmma` kernel in pairs of programs
    /// that share each weight tile (TMA multicast) when their tiles are two m-blocks of one expert on
    /// one n-block; 1 (the default) for every other kernel.
    public var clusterM: Int
    /// n-blocks per program (`UNIT`) of the swap-AB GEMM1 with its activation in the paired epilogue: one
    /// program runs that many consecutive n-blocks of one m-block on one ring (moe_gemm_sm90.cu's units;
    /// NOTES v39); 1 (the default) one tile per program. Other kernels and GEMMs take 1 whatever it says
    /// (`CUDAMoELayer.swapUnit`).
    public var unit: Int = 1
    /// Whether the wide swap-AB tiles (80 tokens and up) multiply only the rows each block holds, in steps of
    /// 16 tokens (`FIT` 1, the default; NOTES v19), or every block its whole width (`FIT` 0). Whole widths
    /// keep the blocks of one expert at one pace, so they read each weight tile together: that is what lets
    /// units pay where an expert has two blocks (Mixtral 768 and 1024, NOTES v42). Other kernels ignore it.
    public var fitRows: Bool = true

    public init(
        blockM: Int, blockN: Int, blockK: Int, warpsM: Int, warpsN: Int, stages: Int, groupSizeM: Int = 1,
        splitK: Int = 1, splitMode: SplitMode = .none, kernel: GemmKernel = .mma, clusterM: Int = 1
    ) {
        self.blockM = blockM
        self.blockN = blockN
        self.blockK = blockK
        self.warpsM = warpsM
        self.warpsN = warpsN
        self.stages = stages
        self.groupSizeM = groupSizeM
        self.splitK = splitK
        self.splitMode = splitMode
        self.kernel = kernel
        self.clusterM = clusterM
    }

    /// A wgmma config: BLOCK_K is 64 and the warps follow from the tile (the kernel fixes them).
    public static func wgmma(
        blockM: Int, blockN: Int, stages: Int, groupSizeM: Int = 1, swapAB: Bool = false, persistent: Bool = false,
        pingpong: Bool = false, streamK: Bool = false, clusterM: Int = 1
    ) -> GemmConfig {
        let warps = swapAB ? (blockN == 256 ? 12 : 8) : 4 * (1 + blockM / 64)
        let kernel: GemmKernel =
            swapAB ? .wgmmaSwap : pingpong ? .wgmmaPingpong : streamK ? .wgmmaStreamK : persistent ? .wgmmaPersistent : .wgmma
        return GemmConfig(
            blockM: blockM, blockN: blockN, blockK: 64, warpsM: 1, warpsN: warps, stages: stages,
            groupSizeM: groupSizeM, kernel: kernel, clusterM: clusterM)
    }

    public var warps: Int { warpsM * warpsN }
    public var threads: Int {
        switch kernel {
        case .mma: warps * 32
        case .wgmma, .wgmmaPersistent, .wgmmaPingpong, .wgmmaStreamK: 128 * (1 + blockM / 64)
        case .wgmmaSwap: blockN == 256 ? 384 : 256
        }
    }

    /// Dynamic shared memory of the kernel: for `moe_gemm` STAGES * (BLOCK_M + BLOCK_N) * (BLOCK_K + 8)
    /// * 2 bytes; for the wgmma kernels STAGES * 128 * (BLOCK_M + BLOCK_N) + 16 * STAGES + 8 * BLOCK_M
    /// plus 1024 bytes the kernel uses to align its base.
    public var sharedMemoryBytes: Int {
        switch kernel {
        case .mma: stages * (blockM + blockN) * (blockK + 8) * 2
        case .wgmma, .wgmmaSwap: stages * 128 * (blockM + blockN) + 16 * stages + 8 * blockM + 1024
        // Plus 256 bytes of output staging per tile row, apart from the ring the producer keeps filling.
        case .wgmmaPersistent, .wgmmaPingpong, .wgmmaStreamK:
            stages * 128 * (blockM + blockN) + 16 * stages + 8 * blockM + 256 * blockM + 1024
        }
    }

    public var description: String {
        let tile = "\(blockM)x\(blockN)x\(blockK)"
        let body = kernel == .mma ? "\(tile) w\(warpsM)x\(warpsN)" : "\(kernel.rawValue) \(tile)"
        return body + " s\(stages) g\(groupSizeM)" + (clusterM > 1 ? " c\(clusterM)" : "") + (unit > 1 ? " u\(unit)" : "")
            + (fitRows ? "" : " whole") + " split\(splitK)/\(splitMode.rawValue)"
    }

    /// Lays `warps` warps over a tile: as many along M as its 16-row fragments allow (at most 4),
    /// the rest along N.
    public static func warpLayout(blockM: Int, blockN: Int, warps: Int) -> (m: Int, n: Int)? {
        for warpsM in [4, 2, 1] where warps % warpsM == 0 && blockM % (16 * warpsM) == 0 {
            let warpsN = warps / warpsM
            if blockN % (8 * warpsN) == 0 { return (warpsM, warpsN) }
        }
        return nil
    }

    /// Checks the config against what the kernel supports and the device allows.
    /// - Throws: `MoEError.invalidArgument` naming the key that is out of range.
    public func validate(sharedMemoryLimit: Int) throws(MoEError) {
        switch kernel {
        case .mma: try validateTile()
        case .wgmma, .wgmmaSwap, .wgmmaPersistent, .wgmmaPingpong, .wgmmaStreamK: try validateHopperTile()
        }
        guard kernel != .wgmmaStreamK || splitK == 1 else {
            throw .invalidArgument("SPLIT_K", "KERNEL wgmma_streamk splits K itself: SPLIT_K must be 1, got \(splitK)")
        }
        guard groupSizeM >= 1 else { throw .invalidArgument("GROUP_SIZE_M", "must be >= 1, got \(groupSizeM)") }
        guard clusterM == 1 || (clusterM == 2 && kernel == .wgmma) else {
            throw .invalidArgument(
                "CLUSTER_M", "must be 1, or 2 with KERNEL wgmma; got \(clusterM) with KERNEL \(kernel.rawValue)")
        }
        guard [1, 2, 4, 8, 16].contains(splitK) else { throw .invalidArgument("SPLIT_K", "must be 1, 2, 4, 8 or 16, got \(splitK)") }
        guard unit == 1 || (kernel == .wgmmaSwap && splitK == 1 && (1...64).contains(unit)) else {
            throw .invalidArgument(
                "UNIT", "must be 1, or 2...64 with KERNEL wgmma_swap unsplit; got \(unit) with KERNEL \(kernel.rawValue), SPLIT_K \(splitK)")
        }
        guard fitRows || kernel == .wgmmaSwap else {
            throw .invalidArgument("FIT", "must be 1, or 0 with KERNEL wgmma_swap; got 0 with KERNEL \(kernel.rawValue)")
        }
        guard splitK == 1 || splitMode != .none else {
            throw .invalidArgument("SPLIT_MODE", "SPLIT_K = \(splitK) needs mode atomic or workspace, not none")
        }
        guard sharedMemoryBytes <= sharedMemoryLimit else {
            throw .invalidArgument(
                "num_stages", "\(description) needs \(sharedMemoryBytes) bytes of shared memory; the GPU allows \(sharedMemoryLimit)")
        }
    }

    /// The tile limits of `moe_gemm`.
    private func validateTile() throws(MoEError) {
        guard [16, 32, 64, 128].contains(blockM) else { throw .invalidArgument("BLOCK_SIZE_M", "must be 16, 32, 64 or 128, got \(blockM)") }
        guard [32, 64, 128, 256].contains(blockN) else { throw .invalidArgument("BLOCK_SIZE_N", "must be 32, 64, 128 or 256, got \(blockN)") }
        guard [32, 64].contains(blockK) else { throw .invalidArgument("BLOCK_SIZE_K", "must be 32 or 64, got \(blockK)") }
        guard (2...5).contains(stages) else { throw .invalidArgument("num_stages", "must be 2...5, got \(stages)") }
        guard warps >= 1, warps <= 32, blockM % (16 * warpsM) == 0, blockN % (8 * warpsN) == 0 else {
            throw .invalidArgument("num_warps", "\(warpsM)x\(warpsN) warps do not tile a \(blockM)x\(blockN) block")
        }
        guard threads % (blockK / 8) == 0 else {
            throw .invalidArgument("num_warps", "\(threads) threads do not cover whole \(blockK)-wide rows")
        }
    }

    /// The token widths (BLOCK_M) of the swap-AB kernel: decode's 8..64, and the wide tiles of prefill.
    public static let swapTokenWidths = [8, 16, 32, 64, 80, 96, 112, 128, 144, 160, 176, 192]

    /// The deepest ring (at most 8 stages) of a swap-AB tile of `tokens` x `blockN` that fits in
    /// `sharedMemoryLimit` bytes and holds its staged fp32 output tile; 2 if none does.
    public static func deepestSwapRing(tokens: Int, blockN: Int, sharedMemoryLimit: Int = 227 * 1024) -> Int {
        (2...8).last { stages in
            let config = GemmConfig.wgmma(blockM: tokens, blockN: blockN, stages: stages, swapAB: true)
            return (try? config.validate(sharedMemoryLimit: sharedMemoryLimit)) != nil
        } ?? 2
    }

    /// The tile limits of the wgmma kernels.
    private func validateHopperTile() throws(MoEError) {
        let name = kernel.rawValue
        if kernel == .wgmma || kernel == .wgmmaPersistent || kernel == .wgmmaStreamK {
            guard [64, 128].contains(blockM) else { throw .invalidArgument("BLOCK_SIZE_M", "\(name) takes 64 or 128, got \(blockM)") }
            guard [64, 128, 256].contains(blockN) else { throw .invalidArgument("BLOCK_SIZE_N", "\(name) takes 64, 128 or 256, got \(blockN)") }
        } else if kernel == .wgmmaPingpong {
            // A warpgroup's whole tile lives in its registers: 128 x BLOCK_N fp32 over 128 threads.
            guard blockM == 128 else { throw .invalidArgument("BLOCK_SIZE_M", "\(name) takes 128, got \(blockM)") }
            guard [64, 128].contains(blockN) else { throw .invalidArgument("BLOCK_SIZE_N", "\(name) takes 64 or 128, got \(blockN)") }
        } else {
            guard Self.swapTokenWidths.contains(blockM) else {
                throw .invalidArgument(
                    "BLOCK_SIZE_M", "\(name) takes \(Self.swapTokenWidths.map(String.init).joined(separator: ", ")) tokens, got \(blockM)")
            }
            guard [64, 128, 256].contains(blockN) else { throw .invalidArgument("BLOCK_SIZE_N", "\(name) takes 64, 128 or 256, got \(blockN)") }
            // The output tile is staged transposed in fp32 in the operand ring.
            let staging = blockM * (blockN + 4) * 4
            let ring = stages * 128 * (blockM + blockN)
            guard staging <= ring else {
                throw .invalidArgument(
                    "num_stages", "\(description) stages its \(staging)-byte output tile in its \(ring)-byte ring: needs more stages")
            }
        }
        guard blockK == 64 else { throw .invalidArgument("BLOCK_SIZE_K", "\(name) takes 64, got \(blockK)") }
        guard (2...8).contains(stages) else { throw .invalidArgument("num_stages", "\(name) takes 2...8, got \(stages)") }
    }

    /// The kernel instantiation for this config; `fusedActivation` 1 (silu) or 2 (gelu) makes the
    /// epilogue apply act(gate) * up and write the activated `[rows, I]` directly (GEMM1, unsplit).
    /// `atomicCombine` (GEMM2 on the unsplit persistent kernel only: `CUDAMoELayer.allowsAtomicCombine`)
    /// makes it add each row into its token's output row (SPLIT_MODE 3).
    func nameExpression(dtype: DType, mulRoutedWeight: Bool, fusedActivation: Int = 0, atomicCombine: Bool = false)
        -> String
    {
        let type = dtype == .fp16 ? "moe_fp16" : "moe_bf16"
        let mode = atomicCombine ? 3 : splitK == 1 ? 0 : splitMode.templateValue
        switch kernel {
        case .mma:
            return "moe_gemm<\(type), \(blockM), \(blockN), \(blockK), \(warpsM), \(warpsN), \(stages), \(mode), "
                + "\(mulRoutedWeight), \(fusedActivation)>"
        case .wgmma:
            return "moe_gemm_sm90<\(type), \(blockM), \(blockN), \(stages), \(mode), \(mulRoutedWeight), \(fusedActivation), "
                + "\(clusterM)>"
        case .wgmmaSwap:
            return "moe_gemm_sm90_swap<\(type), \(blockN), \(blockM), \(stages), \(mode), \(mulRoutedWeight), \(fusedActivation)"
                + (fitRows ? (unit > 1 ? ", \(unit)>" : ">") : ", \(unit), false>")
        case .wgmmaPersistent, .wgmmaPingpong, .wgmmaStreamK:
            return "moe_gemm_sm90_persistent<\(type), \(blockM), \(blockN), \(stages), \(mode), \(mulRoutedWeight), "
                + "\(fusedActivation), \(kernel == .wgmmaPingpong)" + (kernel == .wgmmaStreamK ? ", true>" : ">")
        }
    }

    /// The kernel source holding this config's kernel.
    var source: KernelSource { kernel == .mma ? .gemm : .gemmSM90 }

    /// Whether the epilogue can apply the activation: every kernel unsplit, except the persistent
    /// ones with 64-column tiles (their warp-row stores need at least 64 activated columns).
    var fusesActivation: Bool { effectiveMode == .none && !(kernel.isPersistent && blockN < 128) }

    /// Rows of the TMA box over the weights: BLOCK_N, or half of it when the epilogue applies the
    /// activation (the tile's gate rows and up rows come as two boxes) or a cluster pair splits the
    /// tile's copies.
    func tensorMapBoxRows(fusedActivation: Bool) -> Int {
        (fusedActivation && fusesActivation) || clusterM > 1 ? blockN / 2 : blockN
    }

    /// The mode the kernel runs in: `none` whenever there is one split.
    var effectiveMode: SplitMode { splitK == 1 ? .none : splitMode }
}

/// The configs of both GEMMs of a layer. Each GEMM reads align's output padded to its own BLOCK_M:
/// one align serves both when they share it, a second align runs when they do not.
public struct MoEPlan: Hashable, Sendable, CustomStringConvertible {
    public var gemm1: GemmConfig
    public var gemm2: GemmConfig
    /// Apply the activation in GEMM1's epilogue (or its split-K reduction) instead of a separate
    /// kernel, so the `[M*k, 2I]` gate/up intermediate is never written. On by default, for every
    /// kernel that can (`GemmConfig.fusesActivation`): on the H200 it measured 0.5-3% faster on the
    /// layer than the separate pass for each GEMM1 kernel of the tables (bench --fusion-ab, NOTES v29);
    /// off only to measure the difference.
    public var fusedActivation = true
    /// Skip align for a batch of one token when both GEMMs are wgmma kernels: each of its k pairs is
    /// its own block and the GEMMs read the expert ids directly (identity routing). On by default;
    /// off only to measure the difference.
    public var identityRouting = true

    public init(gemm1: GemmConfig, gemm2: GemmConfig) {
        self.gemm1 = gemm1
        self.gemm2 = gemm2
    }

    public init(both config: GemmConfig) {
        gemm1 = config
        gemm2 = config
    }

    /// GEMM1's BLOCK_M (the align block of a plan whose GEMMs share it).
    public var blockM: Int { gemm1.blockM }
    /// The align block sizes the layer runs align for: GEMM1's, then GEMM2's when it differs.
    public var alignBlockMs: [Int] { gemm1.blockM == gemm2.blockM ? [gemm1.blockM] : [gemm1.blockM, gemm2.blockM] }

    /// Whether the activation happens inside GEMM1 (its epilogue or split-K reduction), so no
    /// gate/up intermediate is written: the plan asks for it and GEMM1 can do it.
    public var activationIsFused: Bool {
        fusedActivation && (gemm1.fusesActivation || gemm1.effectiveMode != .none)
    }
    public var description: String {
        (gemm1 == gemm2 ? "\(gemm1)" : "gemm1 \(gemm1); gemm2 \(gemm2)") + (fusedActivation ? "" : " unfused")
            + (identityRouting ? "" : " aligned")
    }

    /// The same plan with split-K set on both GEMMs.
    public func withSplit(_ splitK: Int, mode: SplitMode) -> MoEPlan {
        var plan = self
        plan.gemm1.splitK = splitK
        plan.gemm2.splitK = splitK
        plan.gemm1.splitMode = splitK == 1 ? .none : mode
        plan.gemm2.splitMode = splitK == 1 ? .none : mode
        return plan
    }
}
