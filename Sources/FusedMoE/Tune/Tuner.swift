import CUDA

/// `fused-moe tune`: searches tile shapes, warps, stages and split-K per batch size for one layer
/// shape on this GPU, and writes the winners as an SGLang-compatible config table.
///
/// For every BLOCK_M worth trying, each candidate tile runs in a real layer; events around the two
/// GEMM stages time GEMM1 and GEMM2 separately (split-K reductions included), so each GEMM gets its
/// own best config. The BLOCK_M whose best pair (plus align, activation and combine) is fastest
/// wins. Candidates that cannot fit (shared memory) or spill are skipped before they run, and split
/// factors are tried only when the output tiles are too few to fill the multiprocessors. Each tile
/// runs with the heuristic's GROUP_SIZE_M; a refinement pass then reruns each BLOCK_M's winners
/// with the other groups worth trying (`groupAlternatives`), then in clusters of two
/// (`clusterAlternative`).
///
/// With `around: true` (`fused-moe tune --refine`) the search starts from the plan in use (a table
/// in `FUSED_MOE_CONFIG_DIR`, the shipped tables, or the heuristic) and tries only its neighbours,
/// one knob moved at a time (`neighborPlans`): a few candidates per batch size instead of a hundred,
/// for re-checking tables after a kernel change; the plan in use is the baseline a winner must beat.
public final class Tuner {
    public let library: KernelLibrary
    let bench: GPUBench

    public init(library: KernelLibrary) throws(CUDAError) {
        self.library = library
        bench = try GPUBench(library: library)
    }

    /// How long each candidate runs back to back before its stages are timed (`tune --sustain-ms`). 100 is
    /// long enough for an H200 to reach its power cap (tens of milliseconds), for a kernel that would.
    /// Off by default: the shipped plans' rows stay below the cap, and the refine ranked the same
    /// with and without it (NOTES v30).
    public static let defaultSustainMilliseconds = 0.0

    /// One batch size's outcome.
    public struct Outcome: Sendable {
        public var tokens: Int
        public var plan: MoEPlan
        public var milliseconds: Double
        /// The baseline's time: the heuristic's, or with `around` the plan in use before.
        public var heuristicMilliseconds: Double
        public var relativeError: Double
        public var candidates: Int
    }

    /// The tiles worth trying for a BLOCK_M.
    static func tiles(blockM: Int, sharedMemoryLimit: Int, groupSizeM: Int) -> [GemmConfig] {
        var result: [GemmConfig] = []
        for blockN in [64, 128, 256] where blockN < 256 || blockM >= 64 {
            for warps in [4, 8] where warps == 4 || blockM * blockN >= 64 * 128 {
                guard let layout = GemmConfig.warpLayout(blockM: blockM, blockN: blockN, warps: warps) else { continue }
                for stages in [3, 4, 5] {
                    let config = GemmConfig(
                        blockM: blockM, blockN: blockN, blockK: 64, warpsM: layout.m, warpsN: layout.n, stages: stages,
                        groupSizeM: groupSizeM)
                    if (try? config.validate(sharedMemoryLimit: sharedMemoryLimit)) != nil { result.append(config) }
                }
            }
        }
        return result
    }

    /// The wgmma tiles worth trying for a BLOCK_M (Hopper only): the wide kernel for BLOCK_M 64
    /// and 128, the swap-AB kernel for 8 to 64 tokens per block (its wide token tiles: `wideSwapTiles`).
    static func hopperTiles(blockM: Int, sharedMemoryLimit: Int, groupSizeM: Int) -> [GemmConfig] {
        var result: [GemmConfig] = []
        if blockM >= 64 {
            for blockN in [128, 256] {
                for stages in [3, 4, 5, 6] {
                    for kernel in [GemmKernel.wgmma, .wgmmaPersistent, .wgmmaPingpong] {
                        let config = GemmConfig.wgmma(
                            blockM: blockM, blockN: blockN, stages: stages, groupSizeM: groupSizeM,
                            persistent: kernel == .wgmmaPersistent, pingpong: kernel == .wgmmaPingpong)
                        if (try? config.validate(sharedMemoryLimit: sharedMemoryLimit)) != nil { result.append(config) }
                    }
                }
            }
        }
        if blockM <= 64 {
            for blockN in [64, 128] {
                for stages in [4, 6, 8] {
                    let config = GemmConfig.wgmma(
                        blockM: blockM, blockN: blockN, stages: stages, groupSizeM: groupSizeM, swapAB: true)
                    if (try? config.validate(sharedMemoryLimit: sharedMemoryLimit)) != nil { result.append(config) }
                }
            }
        }
        return result
    }

    /// The plan of the best GEMM1 and the best GEMM2 of any BLOCK_M, from each GEMM's best (plan and
    /// stage time, keyed by that GEMM's BLOCK_M) and align's time per BLOCK_M: GEMMs of different
    /// BLOCK_M each read their own align, so such a pair is charged both. GEMM1's plan decides the
    /// activation's fusion. Nil when no pair has its aligns measured. Ties go to the smaller BLOCK_Ms.
    static func bestPairing(best1: [Int: (MoEPlan, Double)], best2: [Int: (MoEPlan, Double)], align: [Int: Double])
        -> (MoEPlan, Double)?
    {
        var best: (MoEPlan, Double)? = nil
        for blockM1 in best1.keys.sorted() {
            for blockM2 in best2.keys.sorted() {
                guard let first = best1[blockM1], let second = best2[blockM2], let align1 = align[blockM1],
                    let align2 = align[blockM2]
                else { continue }
                var plan = MoEPlan(gemm1: first.0.gemm1, gemm2: second.0.gemm2)
                plan.fusedActivation = first.0.fusedActivation
                let time = first.1 + second.1 + align1 + (blockM1 == blockM2 ? 0 : align2)
                if time < best?.1 ?? .infinity { best = (plan, time) }
            }
        }
        return best
    }

    /// The swap-AB kernel's wide token tiles worth trying around `width` (a `PlanSelector.swapTokenWidth`):
    /// that width and the kernel widths next to it, 256 weight rows on the deepest ring and one stage
    /// less, and 128 rows on the deepest ring.
    static func wideSwapTiles(around width: Int, sharedMemoryLimit: Int) -> [GemmConfig] {
        let widths = GemmConfig.swapTokenWidths.filter { $0 >= 80 }
        guard let index = widths.firstIndex(of: width) else { return [] }
        var result: [GemmConfig] = []
        for tokens in widths[max(index - 1, 0)...min(index + 1, widths.count - 1)] {
            let deep256 = GemmConfig.deepestSwapRing(tokens: tokens, blockN: 256, sharedMemoryLimit: sharedMemoryLimit)
            let deep128 = GemmConfig.deepestSwapRing(tokens: tokens, blockN: 128, sharedMemoryLimit: sharedMemoryLimit)
            for (blockN, stages) in [(256, deep256), (256, deep256 - 1), (128, deep128)] {
                let config = GemmConfig.wgmma(blockM: tokens, blockN: blockN, stages: stages, swapAB: true)
                if (try? config.validate(sharedMemoryLimit: sharedMemoryLimit)) != nil { result.append(config) }
            }
        }
        return result
    }

    /// BLOCK_M values around the rows each expert gets (8 only for the swap-AB kernel).
    static func blockMs(shape: MoEShape, tokens: Int, hopper: Bool) -> [Int] {
        let rows = Double(tokens * shape.topK) / Double(shape.experts)
        // The largest block is always a candidate: with thousands of rows per expert it is the only one.
        return (hopper ? [8, 16, 32, 64, 128] : [16, 32, 64, 128]).filter {
            Double($0) <= max(16, 2 * rows) && (Double($0) * 8 >= rows || $0 == 128)
        }
    }

    /// The SPLIT_K values to try for a tile whose GEMMs have `tiles1` and `tiles2` output tiles: 2, 4
    /// and 8 when either GEMM has fewer than two tiles per multiprocessor (the PR's case); 2 and 4 for
    /// the swap-AB decode kernel otherwise, where splitting also evens out the last wave of a few
    /// long weight-streaming programs for little fp32 partial traffic; none for the rest.
    static func splitCandidates(_ tile: GemmConfig, tiles1: Int, tiles2: Int, multiprocessors: Int) -> [Int] {
        if tiles1 < 2 * multiprocessors || tiles2 < 2 * multiprocessors { return [2, 4, 8] }
        return tile.kernel == .wgmmaSwap ? [2, 4] : []
    }

    /// The GROUP_SIZE_M values the refinement pass tries for a wide wgmma winner (BLOCK_M >= 64) of
    /// `blockM` rows, besides the one it won with: 1, the average run of m-blocks per expert, and
    /// twice that (at most 32). The wgmma kernels cut groups at expert boundaries, so these cover
    /// "order does not matter" (many experts), "one group per average run" and "one group per run
    /// for the experts routing favours"; measured: the best of them differs by 1-14% with the shape
    /// (NOTES v12); the wide swap-AB tiles (80 tokens and more) too (Mixtral 1024: -4..-5% with 4,
    /// NOTES v23). Empty for other kernels (mma keeps Triton's swizzle; decode swap-AB blocks are small)
    /// and while an expert gets one block on average (its run is one block: the group cannot matter).
    static func groupAlternatives(_ config: GemmConfig, shape: MoEShape, tokens: Int) -> [Int] {
        let wide = config.kernel == .wgmmaSwap ? config.blockM >= 80 : config.blockM >= 64
        guard config.kernel == .wgmma || config.kernel.isPersistent || config.kernel == .wgmmaSwap, wide else {
            return []
        }
        let rows = tokens * shape.topK / max(shape.experts, 1)
        let blocks = (rows + config.blockM - 1) / config.blockM
        guard blocks >= 2 else { return [] }
        var result: [Int] = []
        for group in [1, min(blocks, 32), min(2 * blocks, 32)] where group != config.groupSizeM && !result.contains(group) {
            result.append(group)
        }
        return result
    }

    /// The clustered variant the refinement pass tries for a `wgmma` winner (BLOCK_M >= 64) while an
    /// expert gets two or more m-blocks on average: CLUSTER_M 2 (program pairs on two m-blocks of one
    /// expert share each weight tile), with an even GROUP_SIZE_M of at least 2 (group 1 would pair
    /// n-blocks of one m-block, which share nothing; an odd group leaves its last m-block alone).
    /// Nil for other kernels and configs already clustered.
    static func clusterAlternative(_ config: GemmConfig, shape: MoEShape, tokens: Int) -> GemmConfig? {
        guard config.kernel == .wgmma, config.blockM >= 64, config.clusterM == 1 else { return nil }
        let rows = tokens * shape.topK / max(shape.experts, 1)
        guard (rows + config.blockM - 1) / config.blockM >= 2 else { return nil }
        var clustered = config
        clustered.clusterM = 2
        clustered.groupSizeM = min(max(2, config.groupSizeM + config.groupSizeM % 2), 32)
        return clustered
    }

    /// One GEMM's configs with one knob moved: stages one less and one more; for the wide wgmma
    /// kernels the other BLOCK_N (128 or 256), the persistent kernel toggled, and with BLOCK_M 128
    /// the ping-pong kernel at 128 columns (keeping the ring when it fits, else the deepest one that
    /// does) and the stream-K kernel on the same tile (unsplit); for the stream-K kernel the other
    /// BLOCK_N and the persistent kernel; for the ping-pong kernel the persistent one at 128 and 256 columns; for the swap-AB
    /// kernel the other BLOCK_N (64 or 128) and SPLIT_K 1 or 2 (workspace). Only configs that
    /// validate on this GPU.
    static func neighbors(of config: GemmConfig, sharedMemoryLimit: Int) -> [GemmConfig] {
        var result: [GemmConfig] = []
        func add(_ candidate: GemmConfig) {
            if candidate != config && !result.contains(candidate)
                && (try? candidate.validate(sharedMemoryLimit: sharedMemoryLimit)) != nil
            {
                result.append(candidate)
            }
        }
        // The same config with the deepest ring that fits, from the current one down.
        func fitted(_ candidate: GemmConfig) -> GemmConfig {
            var shallower = candidate
            while shallower.stages > 2 && (try? shallower.validate(sharedMemoryLimit: sharedMemoryLimit)) == nil {
                shallower.stages -= 1
            }
            return shallower
        }
        for delta in [-1, 1] {
            var staged = config
            staged.stages += delta
            add(staged)
        }
        switch config.kernel {
        case .wgmma, .wgmmaPersistent:
            var wide = config
            wide.blockN = config.blockN == 256 ? 128 : 256
            add(fitted(wide))
            var toggled = config
            toggled.kernel = config.kernel == .wgmma ? .wgmmaPersistent : .wgmma
            toggled.clusterM = 1
            add(fitted(toggled))
            var pingpong = config
            pingpong.kernel = .wgmmaPingpong
            pingpong.blockN = 128
            pingpong.clusterM = 1
            add(fitted(pingpong))
            if config.splitK == 1 {
                var stream = config
                stream.kernel = .wgmmaStreamK
                stream.clusterM = 1
                add(stream)
            }
        case .wgmmaStreamK:
            var wide = config
            wide.blockN = config.blockN == 256 ? 128 : 256
            add(fitted(wide))
            var whole = config
            whole.kernel = .wgmmaPersistent
            add(whole)
        case .wgmmaPingpong:
            for blockN in [128, 256] {
                var cooperative = config
                cooperative.kernel = .wgmmaPersistent
                cooperative.blockN = blockN
                add(fitted(cooperative))
            }
        case .wgmmaSwap:
            var other = config
            other.blockN = config.blockN == 128 ? 64 : 128
            add(fitted(other))
            var split = config
            split.splitK = config.splitK == 1 ? 2 : 1
            split.splitMode = split.splitK == 1 ? .none : .workspace
            add(split)
        case .mma:
            break
        }
        return result
    }

    /// `plan` itself, then for each GEMM its `neighbors` with the other GEMM kept (GEMM1 candidates
    /// apply the activation themselves wherever their kernel can: `MoEPlan.fusedActivation`'s default).
    static func neighborPlans(of plan: MoEPlan, sharedMemoryLimit: Int) -> [MoEPlan] {
        var result = [plan]
        for candidate in neighbors(of: plan.gemm1, sharedMemoryLimit: sharedMemoryLimit) {
            result.append(MoEPlan(gemm1: candidate, gemm2: plan.gemm2))
        }
        for candidate in neighbors(of: plan.gemm2, sharedMemoryLimit: sharedMemoryLimit) {
            var moved = MoEPlan(gemm1: plan.gemm1, gemm2: candidate)
            moved.fusedActivation = plan.fusedActivation
            result.append(moved)
        }
        return result
    }

    /// Tunes one shape over `batchSizes`; `progress` gets a one-line status with the time left.
    /// `around`: search the neighbours of the plan in use instead of every tile (see the type).
    public func tune(
        preset: ShapePreset, batchSizes: [Int], dtype: DType, seed: UInt64, around: Bool = false,
        sustainMilliseconds: Double = Tuner.defaultSustainMilliseconds, progress: (String) -> Void
    ) throws -> [Outcome] {
        let device = library.device
        let shape = preset.shape
        let limit = device.properties.sharedMemoryPerBlockOptIn
        let multiprocessors = device.properties.multiprocessorCount
        // Every candidate layer, per batch size, and the baseline the winner must beat.
        var work: [(tokens: Int, plans: [MoEPlan], baseline: MoEPlan)] = []
        for tokens in batchSizes {
            if around {
                let current = try PlanSelector.plan(
                    shape: shape, tokens: tokens, multiprocessors: multiprocessors, sharedMemoryLimit: limit,
                    deviceName: device.properties.name, architecture: device.properties.architecture)
                work.append((tokens, Tuner.neighborPlans(of: current, sharedMemoryLimit: limit), current))
                continue
            }
            var plans: [MoEPlan] = []
            let hopper = device.properties.architecture == "sm_90a"
            for blockM in Tuner.blockMs(shape: shape, tokens: tokens, hopper: hopper) {
                let group = PlanSelector.groupSizeM(shape: shape, tokens: tokens, blockM: blockM)
                let wgmmaGroup = PlanSelector.groupSizeM(shape: shape, tokens: tokens, blockM: blockM, kernel: .wgmma)
                let mmaTiles = blockM >= 16 ? Tuner.tiles(blockM: blockM, sharedMemoryLimit: limit, groupSizeM: group) : []
                let wgmmaTiles =
                    hopper ? Tuner.hopperTiles(blockM: blockM, sharedMemoryLimit: limit, groupSizeM: wgmmaGroup) : []
                for tile in mmaTiles + wgmmaTiles {
                    plans.append(MoEPlan(both: tile))
                    let mBlocks = min(shape.experts, tokens * shape.topK) * max(1, tokens * shape.topK / shape.experts / blockM)
                    let splits = Tuner.splitCandidates(
                        tile, tiles1: mBlocks * ((2 * shape.intermediate + tile.blockN - 1) / tile.blockN),
                        tiles2: mBlocks * ((shape.hidden + tile.blockN - 1) / tile.blockN), multiprocessors: multiprocessors)
                    for split in splits {
                        for mode in [SplitMode.workspace, .atomic] { plans.append(MoEPlan(both: tile).withSplit(split, mode: mode)) }
                    }
                }
            }
            // Wide token tiles around the width that fits the rows per expert (64 to 320 of them). Their
            // GEMM1 and GEMM2 also pair with the other BLOCK_Ms' best (each GEMM on its own align).
            let rows = Double(tokens * shape.topK) / Double(shape.experts)
            if hopper, let width = PlanSelector.swapTokenWidth(rowsPerExpert: rows) {
                for tile in Tuner.wideSwapTiles(around: width, sharedMemoryLimit: limit) {
                    plans.append(MoEPlan(both: tile))
                }
            }
            work.append((tokens, plans, PlanSelector.heuristic(shape: shape, tokens: tokens, multiprocessors: multiprocessors)))
        }
        let total = work.reduce(0) { $0 + $1.plans.count }
        progress("\(preset.name): \(total) candidate layers over \(batchSizes.count) batch sizes; compiling...")
        let compileStart = HostClock.now()
        let requests = Set(work.flatMap { $0.plans }.flatMap { CUDAMoELayer.requests(dtype: dtype, plan: $0, activation: .silu) })
        try library.prepare(Array(requests))
        progress("\(requests.count) programs ready in \(format(HostClock.now() - compileStart, 1)) s")
        // Drop instantiations that spill: they are slow by construction.
        let spilling = Set(requests.filter { library.resourceReport($0).contains { line in
            line.contains("spill") && !(line.contains(" 0 bytes spill stores") && line.contains(" 0 bytes spill loads"))
        } })

        let weights = try LayerWeights(tools: bench.tools, shape: shape, dtype: dtype, seed: seed, stream: bench.stream)
        var outcomes: [Outcome] = []
        var done = 0
        var pruned = 0
        let copyBandwidth = try bench.measureCopyBandwidth()
        let start = HostClock.now()
        for (tokens, plans, baseline) in work {
            let inputs = try LayerInputs(tools: bench.tools, shape: shape, dtype: dtype, tokens: tokens, seed: seed &+ UInt64(tokens), stream: bench.stream)
            let out = try DeviceBuffer(device: device, byteCount: tokens * shape.hidden * dtype.byteCount)
            // Best GEMM1 and GEMM2 per BLOCK_M (each GEMM's own), and align's time per BLOCK_M.
            var best1: [Int: (MoEPlan, Double)] = [:]
            var best2: [Int: (MoEPlan, Double)] = [:]
            var rest: [Int: Double] = [:]
            let touched = Set(try inputs.ids.download(count: tokens * shape.topK, as: Int32.self)).count
            // Runs one candidate and keeps its GEMMs where they beat the best of their BLOCK_M.
            func measure(_ plan: MoEPlan) throws {
                guard let layer = try? CUDAMoELayer(
                    library: library, shape: shape, dtype: dtype, w1: weights.w1, w2: weights.w2, plan: plan, maxTokens: tokens)
                else { return }
                // With `sustainMilliseconds`: timed after that much back-to-back load (NOTES v30).
                try bench.sustain(layer: layer, inputs: inputs, out: out, milliseconds: sustainMilliseconds)
                let stages = Dictionary(uniqueKeysWithValues: try bench.stageBreakdown(layer: layer, inputs: inputs, out: out, repeats: 12))
                let (blockM1, blockM2) = (plan.gemm1.blockM, plan.gemm2.blockM)
                // GEMM1 is charged with the activation its epilogue may absorb (so fused and separate
                // candidates compare fairly), GEMM2 with the combine that follows it.
                if let gemm = stages["gemm1"] {
                    let time = gemm + (stages["activation"] ?? 0)
                    if time < best1[blockM1]?.1 ?? .infinity { best1[blockM1] = (plan, time) }
                }
                if let gemm = stages["gemm2"] {
                    let time = gemm + (stages["combine"] ?? 0)
                    if time < best2[blockM2]?.1 ?? .infinity { best2[blockM2] = (plan, time) }
                }
                // The align stage ran once per distinct BLOCK_M: each gets its share.
                let blocks = plan.alignBlockMs
                for blockM in blocks {
                    rest[blockM] = min(rest[blockM] ?? .infinity, (stages["align"] ?? 0) / Double(blocks.count))
                }
            }
            for plan in plans {
                done += 1
                let elapsed = HostClock.now() - start
                let left = done > 1 ? elapsed / Double(done - 1) * Double(total - done + 1) : 0
                progress(progressBar(done: done, total: total) + " M=\(tokens) \(plan)  ETA \(clock(left))")
                if CUDAMoELayer.requests(dtype: dtype, plan: plan, activation: .silu).contains(where: spilling.contains) { continue }
                // The roofline: skip a candidate whose least possible traffic already takes longer, on
                // both GEMMs, than the best measured so far with its BLOCK_M.
                let bound1 = Tuner.lowerBoundMilliseconds(
                    plan.gemm1, n: 2 * shape.intermediate, k: shape.hidden, shape: shape, tokens: tokens,
                    expertsTouched: touched, dtype: dtype, bandwidth: copyBandwidth)
                let bound2 = Tuner.lowerBoundMilliseconds(
                    plan.gemm2, n: shape.hidden, k: shape.intermediate, shape: shape, tokens: tokens,
                    expertsTouched: touched, dtype: dtype, bandwidth: copyBandwidth)
                if bound1 > best1[plan.gemm1.blockM]?.1 ?? .infinity && bound2 > best2[plan.gemm2.blockM]?.1 ?? .infinity {
                    pruned += 1
                    continue
                }
                try measure(plan)
            }
            // Refinement: the winners of every BLOCK_M with other GROUP_SIZE_M values (the search above
            // tried each tile with the heuristic's group only). Both GEMMs of a refinement run take the
            // same group; each keeps it only if its own stage got faster.
            // A GEMM1 pairs with the best GEMM2 of its BLOCK_M, else with the GEMM2 it ran with.
            func partner(of first: (MoEPlan, Double), blockM: Int) -> (MoEPlan, Double)? {
                best2[blockM] ?? best2[first.0.gemm2.blockM]
            }
            for blockM in best1.keys.sorted() {
                guard let first = best1[blockM], let second = partner(of: first, blockM: blockM) else { continue }
                let groups1 = Tuner.groupAlternatives(first.0.gemm1, shape: shape, tokens: tokens)
                let groups2 = Tuner.groupAlternatives(second.0.gemm2, shape: shape, tokens: tokens)
                for group in Set(groups1 + groups2).sorted() {
                    var gemm1 = first.0.gemm1
                    var gemm2 = second.0.gemm2
                    if groups1.contains(group) { gemm1.groupSizeM = group }
                    if groups2.contains(group) { gemm2.groupSizeM = group }
                    var plan = MoEPlan(gemm1: gemm1, gemm2: gemm2)
                    plan.fusedActivation = first.0.fusedActivation
                    progress("M=\(tokens) refining GROUP_SIZE_M: \(plan)")
                    try measure(plan)
                }
                // Then the refined winners in clusters of two, where that can share weight tiles.
                guard let refined1 = best1[blockM], let refined2 = partner(of: refined1, blockM: blockM) else { continue }
                let cluster1 = Tuner.clusterAlternative(refined1.0.gemm1, shape: shape, tokens: tokens)
                let cluster2 = Tuner.clusterAlternative(refined2.0.gemm2, shape: shape, tokens: tokens)
                if cluster1 != nil || cluster2 != nil {
                    var plan = MoEPlan(gemm1: cluster1 ?? refined1.0.gemm1, gemm2: cluster2 ?? refined2.0.gemm2)
                    plan.fusedActivation = refined1.0.fusedActivation
                    progress("M=\(tokens) refining CLUSTER_M: \(plan)")
                    try measure(plan)
                }
            }
            guard let (plan, _) = Tuner.bestPairing(best1: best1, best2: best2, align: rest) else {
                throw MoEError.unsupported("no candidate ran for M=\(tokens)")
            }
            // The winner and the baseline (the heuristic, or the plan in use), timed the way bench times
            // them, and the winner checked.
            let reference = try inputs.reference(weights: weights, library: library, stream: bench.stream)
            let layer = try CUDAMoELayer(library: library, shape: shape, dtype: dtype, w1: weights.w1, w2: weights.w2, plan: plan, maxTokens: tokens)
            let error = relativeError(try inputs.runPoisoned(layer, out: out, stream: bench.stream).values, reference)
            let ms = try bench.time(layer: layer, inputs: [inputs], out: out)
            let baselineLayer = try CUDAMoELayer(library: library, shape: shape, dtype: dtype, w1: weights.w1, w2: weights.w2, plan: baseline, maxTokens: tokens)
            let baselineMs = try bench.time(layer: baselineLayer, inputs: [inputs], out: out)
            progress("M=\(tokens): \(format(ms, 4)) ms (\(around ? "in use" : "heuristic") \(format(baselineMs, 4)) ms), rel_err \(formatScientific(error)), \(pruned) candidates pruned by the roofline so far: \(plan)")
            guard error < errorBound(dtype) else {
                throw MoEError.mismatch("the tuned plan for M=\(tokens) gives rel_err \(error): \(plan)")
            }
            // Keep the baseline when the search did not beat it.
            let chosen = ms <= baselineMs ? plan : baseline
            outcomes.append(Outcome(
                tokens: tokens, plan: chosen, milliseconds: min(ms, baselineMs), heuristicMilliseconds: baselineMs,
                relativeError: error, candidates: plans.count))
        }
        return outcomes
    }
}

extension Tuner {
    /// The least time one GEMM of a candidate can take on memory traffic alone: every m-block of an
    /// expert reads that expert's whole `[n, k]` weight slice (so small BLOCK_M re-reads weights),
    /// plus, when K is split, the fp32 partials written and read back (workspace) or added (atomic).
    static func lowerBoundMilliseconds(
        _ config: GemmConfig, n: Int, k: Int, shape: MoEShape, tokens: Int, expertsTouched: Int, dtype: DType,
        bandwidth: Double
    ) -> Double {
        let pairs = tokens * shape.topK
        let rowsPerExpert = Double(pairs) / Double(max(expertsTouched, 1))
        let mBlocksPerExpert = max(1, Int((rowsPerExpert / Double(config.blockM)).rounded(.up)))
        let weightBytes = Double(expertsTouched * mBlocksPerExpert * n * k * dtype.byteCount)
        var partialBytes = 0.0
        switch config.effectiveMode {
        case .none: break
        case .atomic: partialBytes = Double(pairs * n * 4) * 3  // zero fill, atomic read-modify-write
        case .workspace: partialBytes = Double(config.splitK * pairs * n * 4) * 2  // written, read back
        }
        return 1000 * (weightBytes + partialBytes) / bandwidth
    }
}

func progressBar(done: Int, total: Int, width: Int = 30) -> String {
    let filled = total > 0 ? width * done / total : width
    return "[" + String(repeating: "=", count: filled) + String(repeating: " ", count: width - filled) + "] "
        + "\(total > 0 ? 100 * done / total : 100)%"
}

func clock(_ seconds: Double) -> String {
    let whole = Int(seconds.rounded())
    let minutes = whole / 60
    let rest = whole % 60
    return "\(minutes):" + (rest < 10 ? "0" : "") + "\(rest)"
}
