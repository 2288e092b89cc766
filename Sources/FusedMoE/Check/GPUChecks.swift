#if canImport(Glibc)
import Glibc
#endif
import CUDA

/// The checks of the GPU pipeline: align against the CPU exactly, every preset at several batch
/// sizes in every split mode against a reference, outputs poisoned before and proven written,
/// workspace mode bitwise reproducible, chunking exact, unowned experts zero, and 64-bit offsets.
public final class GPUChecks {
    public let library: KernelLibrary
    let stream: Stream
    let tools: DeviceTools
    var results: [CheckResult] = []
    let progress: (CheckResult) -> Void

    public init(library: KernelLibrary, progress: @escaping (CheckResult) -> Void) throws(CUDAError) {
        self.library = library
        self.progress = progress
        try library.prepare(DeviceTools.requests + [GPUReference.request(dtype: .bf16), GPUReference.request(dtype: .fp16)])
        tools = try DeviceTools(library: library)
        stream = try Stream(device: library.device)
    }

    func record(_ name: String, _ passed: Bool, _ detail: String) {
        let result = CheckResult(name: name, passed: passed, detail: detail)
        results.append(result)
        progress(result)
    }

    /// The split settings every layer case runs in.
    public static let splitSettings: [(Int, SplitMode)] = [(1, .none), (4, .atomic), (4, .workspace), (8, .workspace)]

    /// The batch sizes of the large cases: every preset with the plan its shipped table gives there (the
    /// prefill entries: persistent kernels with several m-blocks per expert, wide swap-AB tiles grouped
    /// per expert; at 512, Mixtral's unit walk on its own entry), which the other cases do not reach.
    public static let largeBatches = [512, 2048, 4096]

    /// Every plan a layer case runs: the plan the layer picks by default (its shipped table's entry,
    /// or the heuristic), the mma kernel in each split setting, and on Hopper the Hopper heuristic's
    /// plan (where it differs from the default), the wgmma kernel (BLOCK_M from the rows per expert),
    /// its swap-AB decode variant and two wide token tiles, the persistent kernel and its ping-pong
    /// form (an odd ring: 5 stages), unsplit and split.
    func casePlans(_ shape: MoEShape, _ tokens: Int) throws -> [(String, MoEPlan)] {
        var plans = [("shipped", try shippedPlan(shape, tokens))]
        plans += GPUChecks.splitSettings.map { split, mode in
            ("mma split=\(split) \(mode.rawValue)", caseplan(shape, tokens, split, mode))
        }
        guard library.device.properties.architecture == "sm_90a" else { return plans }
        plans += heuristicCase(shape, tokens, unlike: plans[0].1)
        let rows = tokens * shape.topK / shape.experts
        let wide = GemmConfig.wgmma(blockM: rows > 64 ? 128 : 64, blockN: 128, stages: 4)
        let swap = GemmConfig.wgmma(blockM: rows > 16 ? 32 : 16, blockN: 64, stages: 6, swapAB: true)
        let persistent = GemmConfig.wgmma(blockM: rows > 64 ? 128 : 64, blockN: 256, stages: 4, persistent: true)
        let pingpong = GemmConfig.wgmma(blockM: 128, blockN: 128, stages: 5, pingpong: true)
        // Wide token tiles: two consumer warpgroups (BLOCK_N 256), and one with two m64 blocks (128).
        let swapWide = GemmConfig.wgmma(blockM: 144, blockN: 256, stages: 4, swapAB: true)
        let swapWide128 = GemmConfig.wgmma(blockM: 80, blockN: 128, stages: 7, swapAB: true)
        for (name, config) in [
            ("wgmma", wide), ("wgmma_swap", swap), ("wgmma_persistent", persistent), ("wgmma_pingpong", pingpong),
            ("wgmma_swap 144x256", swapWide), ("wgmma_swap 80x128", swapWide128),
        ] {
            for (split, mode) in [(1, SplitMode.none), (4, .workspace), (2, .atomic)] {
                plans.append(("\(name) split=\(split) \(mode.rawValue)", MoEPlan(both: config).withSplit(split, mode: mode)))
            }
        }
        // GEMMs of different BLOCK_M (two aligns): a wide token tile for GEMM1, the persistent 128-row
        // kernel for GEMM2, unsplit and split.
        for (split, mode) in [(1, SplitMode.none), (4, .workspace)] {
            let mixed = MoEPlan(gemm1: swapWide, gemm2: .wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true))
            plans.append(("wgmma_swap 144x256 + wgmma_persistent 128x256 split=\(split) \(mode.rawValue)", mixed.withSplit(split, mode: mode)))
        }
        // Units (GEMM1 on the paired swap-AB tile, n-blocks walked per program on one ring): a tile
        // staged in two held stages' B parts (144 tokens) and in one (80).
        let swap80 = GemmConfig.wgmma(blockM: 80, blockN: 256, stages: 5, swapAB: true)
        for (config, unit) in [(swapWide, 2), (swap80, 4)] {
            var walked = config
            walked.unit = unit
            plans.append(("wgmma_swap \(config.blockM)x256 unit \(unit)", MoEPlan(gemm1: walked, gemm2: config)))
        }
        // Stream-K splits K itself (SPLIT_K 1): at M = 1 and 7 every tile is cut over many programs.
        plans.append(("wgmma_streamk", MoEPlan(both: .wgmma(blockM: rows > 64 ? 128 : 64, blockN: 256, stages: 4, streamK: true))))
        return plans
    }

    /// How much to check.
    public enum Scope: String, Sendable, CaseIterable {
        /// Every preset at M = 1, 7, 128, 1000 and (its default plan, and the heuristic's) 512, 2048
        /// and 4096, the variants and the 64-bit case.
        case full
        /// seed4096 at M = 1 and 128.
        case quick
        /// One small shape at M = 1 and 33, small align cases and (on Hopper) the expert-aligned
        /// groups: every kernel and plan kind, fast enough to run under compute-sanitizer.
        case small
    }

    /// Runs the checks of `scope`.
    public func run(seed: UInt64, scope: Scope) -> [CheckResult] {
        let quick = scope != .full
        checkAlign(seed: seed, small: scope == .small)
        let smallShape = ShapePreset(name: "small", shape: try! MoEShape(experts: 16, topK: 4, hidden: 512, intermediate: 256))
        // FUSED_MOE_CHECK_PRESET narrows the full check to one preset (for debugging).
        let only = environment("FUSED_MOE_CHECK_PRESET")
        let presets = switch scope {
        case .full: ShapePreset.all.filter { $0.name != "tiny" && (only == nil || only == $0.name) }
        case .quick: [try! ShapePreset.named("seed4096")]
        case .small: [smallShape]
        }
        let batches = switch scope {
        case .full: [1, 7, 128, 1000]
        case .quick: [1, 128]
        case .small: [1, 33]
        }
        // Compile every kernel the cases need at once, on all host cores.
        var requests: [KernelLibrary.Request] = []
        let start = HostClock.now()
        do {
            for preset in presets {
                var plans: [(String, MoEPlan)] = []
                for tokens in batches { plans += try casePlans(preset.shape, tokens) }
                if scope == .full {
                    for tokens in GPUChecks.largeBatches { plans += try largeCasePlans(preset.shape, tokens) }
                }
                for (_, caseplan) in plans {
                    var plan = caseplan
                    // The default layer's GEMM2 (summing the rows itself at k <= 2), and the other form
                    // where a case compares with it: the atomic sum (full check), the combine kernel (k <= 2).
                    let k = preset.shape.topK
                    let summed = CUDAMoELayer.sumsInGEMM2(combine: .ordered, topK: k, plan: plan)
                    requests += CUDAMoELayer.requests(dtype: .bf16, plan: plan, activation: .silu, atomicCombine: summed)
                    if CUDAMoELayer.allowsAtomicCombine(plan: plan) && (scope == .full || k <= 2) {
                        requests += CUDAMoELayer.requests(dtype: .bf16, plan: plan, activation: .silu, atomicCombine: !summed)
                    }
                    plan.fusedActivation = false
                    requests += CUDAMoELayer.requests(
                        dtype: .bf16, plan: plan, activation: .silu,
                        atomicCombine: CUDAMoELayer.sumsInGEMM2(combine: .ordered, topK: k, plan: plan))
                }
            }
            try library.prepare(requests)
            record("gpu compile \(Set(requests).count) programs", true, "\(format(HostClock.now() - start, 1)) s, compiled \(library.cache.compiled), from cache \(library.cache.loaded)")
        } catch {
            record("gpu compile", false, "\(error)")
            return results
        }
        var caseSeed = seed
        for preset in presets {
            do {
                let weights = try LayerWeights(tools: tools, shape: preset.shape, dtype: .bf16, seed: caseSeed, stream: stream)
                for tokens in batches {
                    caseSeed &+= 1
                    try checkLayer(
                        preset.name, weights, tokens: tokens, seed: caseSeed, cpuCrossCheck: tokens <= 7,
                        blockSyncToo: scope == .full)
                }
                if scope == .full {
                    for tokens in GPUChecks.largeBatches {
                        caseSeed &+= 1
                        try checkLayer(
                            preset.name, weights, tokens: tokens, seed: caseSeed, cpuCrossCheck: false,
                            plans: try largeCasePlans(preset.shape, tokens), blockSyncToo: true)
                    }
                }
                caseSeed &+= 1
                try checkServing(preset.name, weights, seed: caseSeed)
            } catch {
                record("gpu \(preset.name)", false, "\(error)")
            }
        }
        if !quick {
            checkVariants(seed: caseSeed &+ 1000)
            checkLargeOffsets(seed: caseSeed &+ 2000)
        } else if scope == .small && library.device.properties.architecture == "sm_90a" {
            // Small enough for compute-sanitizer: the wgmma kernels' expert-aligned groups.
            do { try checkExpertGroups(seed: caseSeed &+ 3000) } catch { record("gpu expert groups", false, "\(error)") }
            do { try checkClusterPairs(seed: caseSeed &+ 4000) } catch { record("gpu cluster pairs", false, "\(error)") }
            do { try checkAtomicCombine(seed: caseSeed &+ 5000) } catch { record("gpu atomic combine", false, "\(error)") }
        }
        return results
    }

    /// The plan a layer of this shape and batch uses by default (PlanSelector.plan on this GPU).
    func shippedPlan(_ shape: MoEShape, _ tokens: Int) throws -> MoEPlan {
        let properties = library.device.properties
        return try PlanSelector.plan(
            shape: shape, tokens: tokens, multiprocessors: properties.multiprocessorCount,
            sharedMemoryLimit: properties.sharedMemoryPerBlockOptIn, deviceName: properties.name,
            architecture: properties.architecture)
    }

    /// The plans of a large case (M in largeBatches): the default one, and on Hopper the heuristic's
    /// where it differs.
    func largeCasePlans(_ shape: MoEShape, _ tokens: Int) throws -> [(String, MoEPlan)] {
        let shipped = try shippedPlan(shape, tokens)
        guard library.device.properties.architecture == "sm_90a" else { return [("shipped", shipped)] }
        return [("shipped", shipped)] + heuristicCase(shape, tokens, unlike: shipped)
    }

    /// The Hopper heuristic's plan, what a shape without a tuned table runs (every preset has a table),
    /// as a case where it differs from `shipped`.
    func heuristicCase(_ shape: MoEShape, _ tokens: Int, unlike shipped: MoEPlan) -> [(String, MoEPlan)] {
        let heuristic = PlanSelector.hopperHeuristic(
            shape: shape, tokens: tokens, multiprocessors: library.device.properties.multiprocessorCount)
        return heuristic == shipped ? [] : [("heuristic", heuristic)]
    }

    func caseplan(_ shape: MoEShape, _ tokens: Int, _ split: Int, _ mode: SplitMode) -> MoEPlan {
        PlanSelector.heuristic(shape: shape, tokens: tokens, multiprocessors: library.device.properties.multiprocessorCount)
            .withSplit(split, mode: mode)
    }

    // MARK: - Align

    func checkAlign(seed: UInt64, small: Bool) {
        do {
            let example = CPUChecks.alignExample
            let shape = try MoEShape(experts: example.experts, topK: 3, hidden: 8, intermediate: 8)
            let weights = try LayerWeights(tools: tools, shape: shape, dtype: .bf16, seed: seed, stream: stream)
            let layer = try CUDAMoELayer(
                library: library, shape: shape, dtype: .bf16, w1: weights.w1, w2: weights.w2,
                plan: caseplan(shape, 4, 1, .none), maxTokens: 4)
            let aligned = try layer.debugAlign(ids: example.ids, blockM: example.blockM, stream: stream)
            let passed = aligned.sortedTokenIDs == example.sorted && aligned.expertIDs == example.expertIDs
            record("gpu align example", passed, passed ? "" : "got \(aligned.sortedTokenIDs) / \(aligned.expertIDs)")

            var generator = SplitMix64(seed: seed)
            let cases = small
                ? [(128, 300, 16, false), (64, 9000, 32, true), (8, 7, 16, false)]
                : [(128, 8 * 1000, 16, false), (256, 8 * 65536, 64, false), (512, 300_001, 128, false), (64, 5000, 32, true),
                   (8, 7, 16, false), (256, 8192, 128, false)]
            for (experts, pairs, blockM, mapped) in cases {
                let shape = try MoEShape(experts: mapped ? experts / 2 : experts, topK: 1, hidden: 8, intermediate: 8)
                let map: [Int32]? = mapped ? (0..<experts).map { $0 % 2 == 0 ? Int32($0 / 2) : -1 } : nil
                let weights = try LayerWeights(tools: tools, shape: shape, dtype: .bf16, seed: seed, stream: stream)
                let layer = try CUDAMoELayer(
                    library: library, shape: shape, dtype: .bf16, w1: weights.w1, w2: weights.w2,
                    options: MoEOptions(expertMap: map), plan: caseplan(shape, 1, 1, .none), maxTokens: 1)
                let ids = (0..<pairs).map { _ in Int32.random(in: 0..<Int32(experts), using: &generator) }
                let cpu = try Align.align(ids: ids, experts: experts, blockM: blockM, expertMap: map)
                // Every launch that takes these pairs; the one-launch kernels both ways: their runs staged
                // in shared memory (the forward's choice where they fit) and stored directly.
                // Two layouts from one pass (a plan whose GEMMs differ in BLOCK_M), each against its own CPU
                // align: with an odd second block, then with it first (so the second layout's staged runs
                // start at a rounded offset).
                let odd = 13
                let cpuOdd = try Align.align(ids: ids, experts: experts, blockM: odd, expertMap: map)
                for launch in CUDAMoELayer.AlignLaunch.allCases where CUDAMoELayer.AlignLaunch.allows(launch, pairs: pairs) {
                    for staged in launch == .chunked ? [true] : [true, false] {
                        let gpu = try layer.debugAlign(ids: ids, blockM: blockM, launch: launch, staged: staged, stream: stream)
                        let passed = gpu == cpu
                        let path = launch == .chunked ? "three launches" : "\(launch.rawValue), \(staged ? "staged" : "direct")"
                        let name = "gpu align E=\(experts) pairs=\(pairs)\(mapped ? " expert-map" : "") \(path)"
                        record(
                            "\(name) blockM=\(blockM)", passed,
                            passed ? "exact" : "differs from the CPU align (padded \(gpu.paddedCount) vs \(cpu.paddedCount))")
                        // The one-launch kernel runs the forward's spare L2-prefetch programs here beside its own.
                        for order in [[blockM, odd], [odd, blockM]] {
                            let dual = try layer.debugAlign(
                                ids: ids, blockMs: order, launch: launch, staged: staged, spare: true, stream: stream)
                            let want = order[0] == blockM ? [cpu, cpuOdd] : [cpuOdd, cpu]
                            let exact = dual == want
                            record(
                                "\(name) one pass blockM=\(order[0]),\(order[1])", exact,
                                exact
                                    ? "both layouts exact" + (launch == .single ? ", with spare prefetch programs" : "")
                                    : "differs from the CPU aligns (padded \(dual.map(\.paddedCount)) vs \(want.map(\.paddedCount)))")
                        }
                    }
                }
            }
        } catch {
            record("gpu align", false, "\(error)")
        }
    }

    // MARK: - Layer cases

    /// Runs one layer case in each of `plans` (nil: casePlans) against the fp32 GPU reference (and,
    /// for small batches, the CPU reference on the touched experts).
    func checkLayer(
        _ name: String, _ weights: LayerWeights, tokens: Int, seed: UInt64, cpuCrossCheck: Bool,
        plans: [(String, MoEPlan)]? = nil, blockSyncToo: Bool = false
    ) throws {
        let shape = weights.shape
        let inputs = try LayerInputs(tools: tools, shape: shape, dtype: weights.dtype, tokens: tokens, seed: seed, stream: stream)
        let reference = try inputs.reference(weights: weights, library: library, stream: stream)
        if cpuCrossCheck {
            let cpu = try inputs.cpuReference(weights: weights, stream: stream)
            let error = relativeError(reference, cpu)
            record("gpu \(name) M=\(tokens) fp32 reference vs CPU float64", error < 1e-4, "rel_err \(formatScientific(error))")
        }
        let out = try DeviceBuffer(device: library.device, byteCount: tokens * shape.hidden * 2)
        for (planName, plan) in try plans ?? casePlans(shape, tokens) {
            let mode = plan.gemm1.effectiveMode
            let label = "gpu \(name) M=\(tokens) \(planName)"
            do {
                let layer = try CUDAMoELayer(
                    library: library, shape: shape, dtype: weights.dtype, w1: weights.w1, w2: weights.w2, plan: plan,
                    maxTokens: tokens)
                let first = try runPoisoned(layer, inputs, out)
                let error = relativeError(first.values, reference)
                var detail = "rel_err \(formatScientific(error)), unwritten \(first.unwritten), plan \(plan)"
                var passed = first.unwritten == 0 && error < errorBound(.bf16)
                if mode == .workspace || mode == .none {
                    let second = try runPoisoned(layer, inputs, out)
                    let identical = second.bits == first.bits
                    passed = passed && identical
                    detail += identical ? ", bitwise identical on a rerun" : ", DIFFERS on a rerun"
                    // The fused activation must reproduce the separate kernel bit for bit; with stream-K
                    // the fused GEMM1's tiles pair gate and up columns, so its K cuts fall elsewhere and
                    // both runs are held to the reference instead (likewise the aligned run below, whose
                    // tiles differ in number).
                    let streamK1 = plan.gemm1.kernel == .wgmmaStreamK
                    let streamK = streamK1 || plan.gemm2.kernel == .wgmmaStreamK
                    // Another run of the same inputs: bit for bit the first, or (cuts may differ) within
                    // the reference's bound. Appends to detail; false if it fails.
                    func agrees(_ other: LayerOutput, _ name: String, cutsMayDiffer: Bool, differs: String) -> Bool {
                        let same = other.bits == first.bits
                        if cutsMayDiffer && !same {
                            let near = other.unwritten == 0 && relativeError(other.values, reference) < errorBound(.bf16)
                            detail += near ? ", \(name) within bounds (stream-K cuts differ)" : ", \(name) OUT OF BOUNDS"
                            return near
                        }
                        detail += same ? ", = \(name)" : ", \(differs)"
                        return same
                    }
                    var unfusedPlan = plan
                    unfusedPlan.fusedActivation = false
                    let unfused = try CUDAMoELayer(
                        library: library, shape: shape, dtype: weights.dtype, w1: weights.w1, w2: weights.w2,
                        plan: unfusedPlan, maxTokens: tokens)
                    let separate = try runPoisoned(unfused, inputs, out)
                    let differing = zip(separate.bits, first.bits).filter { $0 != $1 }.count
                    passed = agrees(separate, "unfused", cutsMayDiffer: streamK1, differs: "DIFFERS from unfused (\(differing) elements)")
                        && passed
                    // One token skips align (identity routing): the same rows as with it, bit for bit.
                    if layer.usesIdentityRouting(tokens: tokens) {
                        var alignedPlan = plan
                        alignedPlan.identityRouting = false
                        let aligned = try runPoisoned(
                            try CUDAMoELayer(
                                library: library, shape: shape, dtype: weights.dtype, w1: weights.w1, w2: weights.w2,
                                plan: alignedPlan, maxTokens: tokens),
                            inputs, out)
                        passed = agrees(aligned, "with align", cutsMayDiffer: streamK, differs: "DIFFERS from the aligned run")
                            && passed
                    }
                    // Programmatic dependent launch must not change a bit either (a race would).
                    // A layer of the same plan launched another way: bit for bit the first run (and its
                    // block sync counters, if it has them, back at zero).
                    func sameAs(
                        _ name: String, programmaticDependentLaunch: Bool? = nil, blockSync: Bool? = nil,
                        fusedCombine: Bool? = nil, smallTopKSum: Bool? = nil
                    ) throws -> Bool {
                        let other = try CUDAMoELayer(
                            library: library, shape: shape, dtype: weights.dtype, w1: weights.w1, w2: weights.w2,
                            plan: plan, maxTokens: tokens, programmaticDependentLaunch: programmaticDependentLaunch,
                            blockSync: blockSync, fusedCombine: fusedCombine, smallTopKSum: smallTopKSum)
                        let same = agrees(try runPoisoned(other, inputs, out), name, cutsMayDiffer: false, differs: "DIFFERS \(name)")
                        return try countersClear(other, &detail) && same
                    }
                    if layer.programmaticDependentLaunch {
                        passed = try sameAs("without PDL", programmaticDependentLaunch: false) && passed
                    }
                    // The block sync must not change a bit either: compared with the layer made the
                    // other way (without it where the default uses it, with it where the default does
                    // not: FUSED_MOE_BLOCK_SYNC=0, or one token); the full check only, so that
                    // compute-sanitizer on `check --small` covers the default path alone.
                    if blockSyncToo && layer.programmaticDependentLaunch
                        && CUDAMoELayer.usesBlockSync(plan: plan, programmaticDependentLaunch: true)
                        && CUDAMoELayer.blockSyncCountsFit(plan: plan, shape: shape)
                    {
                        passed = try (layer.usesBlockSync
                            ? sameAs("without block sync", blockSync: false)
                            : sameAs("with block sync", blockSync: true)) && passed
                    }
                    // The fused combine sums in moe_combine's order and rounding: bit for bit the layer made
                    // the other way (the full check only, like the block sync).
                    if blockSyncToo && layer.usesFusedCombine {
                        passed = try sameAs("without fused combine", fusedCombine: false) && passed
                    } else if blockSyncToo && CUDAMoELayer.allowsFusedCombine(
                        plan: plan, shape: shape, options: MoEOptions(), library: library, pairs: tokens * shape.topK)
                    {
                        passed = try sameAs("with fused combine", fusedCombine: true) && passed
                    }
                    // At k <= 2 GEMM2 sums the rows itself (CUDAMoELayer.sumsInGEMM2): bit for bit the
                    // combine kernel's sum, whatever order the adds land in. Every scope.
                    if shape.topK <= 2 && CUDAMoELayer.allowsAtomicCombine(plan: plan) {
                        passed = try (layer.usesAtomicCombine
                            ? sameAs("with the combine kernel", smallTopKSum: false)
                            : sameAs("summed in GEMM2", smallTopKSum: true)) && passed
                    }
                }
                // The atomic top-k sum (CombineMode.atomic), where the plan allows it: held to the same
                // reference bound (its order varies, so not bit for bit). The full check only.
                if blockSyncToo && CUDAMoELayer.allowsAtomicCombine(plan: plan) {
                    let atomic = try CUDAMoELayer(
                        library: library, shape: shape, dtype: weights.dtype, w1: weights.w1, w2: weights.w2,
                        options: MoEOptions(combine: .atomic), plan: plan, maxTokens: tokens)
                    let summed = try runPoisoned(atomic, inputs, out)
                    let atomicError = relativeError(summed.values, reference)
                    let ok = atomic.usesAtomicCombine && summed.unwritten == 0 && atomicError < errorBound(.bf16)
                    detail += ", atomic combine rel_err \(formatScientific(atomicError))"
                        + (summed.unwritten == 0 ? "" : " UNWRITTEN \(summed.unwritten)")
                        + (atomic.usesAtomicCombine ? "" : " NOT USED")
                    passed = ok && passed
                }
                passed = try countersClear(layer, &detail) && passed
                record(label, passed, detail)
            } catch {
                record(label, false, "\(error)")
            }
        }
    }

    /// The block sync's counters end every forward at zero (a count left over would let the next
    /// forward's GEMM2 read rows GEMM1 has not written yet). True for layers without it.
    func countersClear(_ layer: CUDAMoELayer, _ detail: inout String) throws -> Bool {
        var clear = true
        if let counters = try layer.blockSyncCounters(stream: stream) {
            let zero = counters.allSatisfy { $0 == 0 }
            detail += zero ? ", block sync counters at 0" : ", BLOCK SYNC COUNTERS LEFT NONZERO"
            clear = clear && zero
        }
        if let counters = try layer.fusedCombineCounters(stream: stream) {
            let zero = counters.allSatisfy { $0 == 0 }
            detail += zero ? ", fused combine counters at 0" : ", FUSED COMBINE COUNTERS LEFT NONZERO"
            clear = clear && zero
        }
        return clear
    }

    /// Poisons `out` with NaN (and the layer's scratch: `poisonScratch`), runs `layer` on these inputs,
    /// and reads the output back, counting the NaNs left (elements the forward did not write).
    /// `scratch: false` poisons only `out` (a serving sequence: the scratch keeps the last forward's).
    func runPoisoned(_ layer: CUDAMoELayer, _ inputs: LayerInputs, _ out: DeviceBuffer) throws -> LayerOutput {
        try inputs.runPoisoned(layer, out: out, stream: stream)
    }

    /// The batches of `checkServing`, in order: sizes that change the padded counts, the grids and the
    /// routing from one forward to the next (a one-token batch among them).
    static let servingBatches = [7, 33, 1, 128, 2, 64, 5]

    /// One layer as a server uses it: consecutive forwards of different batches and routings, each
    /// against its own reference, the layer's scratch never poisoned, so a kernel that read routing or
    /// intermediates the forward had not written yet would read the previous batch's; then the first
    /// batch again, bit for bit its first result. For the plans of M = 7 and 128 (the layer keeps one).
    func checkServing(_ name: String, _ weights: LayerWeights, seed: UInt64) throws {
        let shape = weights.shape
        let batches = GPUChecks.servingBatches
        let maxTokens = batches.max()!
        let inputs = try batches.enumerated().map { index, tokens in
            try LayerInputs(tools: tools, shape: shape, dtype: .bf16, tokens: tokens, seed: seed &+ 1 &+ UInt64(index), stream: stream)
        }
        let references = try inputs.map { try $0.reference(weights: weights, library: library, stream: stream) }
        let out = try DeviceBuffer(device: library.device, byteCount: maxTokens * shape.hidden * 2)
        for planTokens in [7, 128] {
            let plan = try shippedPlan(shape, planTokens)
            let label = "gpu \(name) serving M=\(batches.map(String.init).joined(separator: ",")) (plan of M=\(planTokens))"
            let layer = try CUDAMoELayer(
                library: library, shape: shape, dtype: .bf16, w1: weights.w1, w2: weights.w2, plan: plan,
                maxTokens: maxTokens)
            var passed = true
            var worst = 0.0
            var failures: [String] = []
            var first: LayerOutput? = nil
            for (index, batch) in inputs.enumerated() {
                let result = try batch.runPoisoned(layer, out: out, stream: stream, scratch: false)
                let error = relativeError(result.values, references[index])
                worst = max(worst, error)
                if result.unwritten != 0 || !(error < errorBound(.bf16)) {
                    passed = false
                    failures.append("M=\(batch.tokens): rel_err \(formatScientific(error)), unwritten \(result.unwritten)")
                }
                if index == 0 { first = result }
            }
            let again = try inputs[0].runPoisoned(layer, out: out, stream: stream, scratch: false)
            let same = again.bits == first?.bits
            passed = passed && same
            record(
                label, passed,
                (failures.isEmpty ? "worst rel_err \(formatScientific(worst))" : failures.joined(separator: "; "))
                    + (same ? ", first batch again bit for bit" : ", first batch again DIFFERS") + ", plan \(plan)")
        }
    }

    // MARK: - Variants: fp16, gelu, chunking, expert parallelism

    func checkVariants(seed: UInt64) {
        do {
            let shape = try MoEShape(experts: 64, topK: 6, hidden: 2048, intermediate: 512)
            // fp16 and gelu.
            let fp16 = try LayerWeights(tools: tools, shape: shape, dtype: .fp16, seed: seed, stream: stream)
            let inputs16 = try LayerInputs(tools: tools, shape: shape, dtype: .fp16, tokens: 200, seed: seed + 1, stream: stream)
            for activation in Activation.allCases {
                let reference = try inputs16.reference(weights: fp16, library: library, activation: activation, stream: stream)
                let layer = try CUDAMoELayer(
                    library: library, shape: shape, dtype: .fp16, w1: fp16.w1, w2: fp16.w2,
                    options: MoEOptions(activation: activation), plan: caseplan(shape, 200, 2, .workspace), maxTokens: 200)
                let out = try DeviceBuffer(device: library.device, byteCount: 200 * shape.hidden * 2)
                let result = try runPoisoned(layer, inputs16, out)
                let error = relativeError(result.values, reference)
                record("gpu fp16 \(activation.rawValue) M=200", result.unwritten == 0 && error < errorBound(.fp16) * 2,
                       "rel_err \(formatScientific(error)), unwritten \(result.unwritten)")
            }

            // Chunking: the same result bit for bit in pieces of 300 tokens.
            let bf16 = try LayerWeights(tools: tools, shape: shape, dtype: .bf16, seed: seed + 2, stream: stream)
            let inputs = try LayerInputs(tools: tools, shape: shape, dtype: .bf16, tokens: 1000, seed: seed + 3, stream: stream)
            let out = try DeviceBuffer(device: library.device, byteCount: 1000 * shape.hidden * 2)
            let plan = caseplan(shape, 1000, 1, .none)
            let whole = try CUDAMoELayer(library: library, shape: shape, dtype: .bf16, w1: bf16.w1, w2: bf16.w2, plan: plan, maxTokens: 1000)
            let pieces = try CUDAMoELayer(
                library: library, shape: shape, dtype: .bf16, w1: bf16.w1, w2: bf16.w2, plan: plan, maxTokens: 1000, chunkTokens: 300)
            let a = try runPoisoned(whole, inputs, out)
            let b = try runPoisoned(pieces, inputs, out)
            record("gpu chunking 1000 tokens in chunks of 300", a.bits == b.bits && b.unwritten == 0,
                   a.bits == b.bits ? "bitwise identical" : "differs")

            // The activation in the wgmma epilogues when I is no multiple of the tile's gate half (I =
            // 200): gate boxes run into up rows and up boxes into the next expert; both dtypes, both
            // activations, bit for bit the separate activation kernel.
            if library.device.properties.architecture == "sm_90a" {
                let ragged = try MoEShape(experts: 16, topK: 4, hidden: 512, intermediate: 200)
                let configs = [
                    GemmConfig.wgmma(blockM: 64, blockN: 128, stages: 4), GemmConfig.wgmma(blockM: 16, blockN: 64, stages: 6, swapAB: true),
                    GemmConfig.wgmma(blockM: 16, blockN: 128, stages: 4, swapAB: true),
                    GemmConfig.wgmma(blockM: 96, blockN: 256, stages: 5, swapAB: true),
                    GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true),
                    GemmConfig.wgmma(blockM: 128, blockN: 128, stages: 6, pingpong: true),
                ]
                for dtype in [DType.bf16, .fp16] {
                    let w = try LayerWeights(tools: tools, shape: ragged, dtype: dtype, seed: seed + 5, stream: stream)
                    let x = try LayerInputs(tools: tools, shape: ragged, dtype: dtype, tokens: 77, seed: seed + 6, stream: stream)
                    let o = try DeviceBuffer(device: library.device, byteCount: 77 * ragged.hidden * 2)
                    for activation in Activation.allCases {
                        let reference = try x.reference(weights: w, library: library, activation: activation, stream: stream)
                        for config in configs {
                            var plan = MoEPlan(both: config)
                            let fused = try CUDAMoELayer(
                                library: library, shape: ragged, dtype: dtype, w1: w.w1, w2: w.w2,
                                options: MoEOptions(activation: activation), plan: plan, maxTokens: 77)
                            let a = try runPoisoned(fused, x, o)
                            plan.fusedActivation = false
                            let separate = try CUDAMoELayer(
                                library: library, shape: ragged, dtype: dtype, w1: w.w1, w2: w.w2,
                                options: MoEOptions(activation: activation), plan: plan, maxTokens: 77)
                            let b = try runPoisoned(separate, x, o)
                            let error = relativeError(a.values, reference)
                            let same = a.bits == b.bits
                            record(
                                "gpu fused \(activation.rawValue) I=200 \(dtype.rawValue) \(config.kernel.rawValue) \(config.blockM)x\(config.blockN) s\(config.stages)",
                                same && a.unwritten == 0 && error < errorBound(dtype) * 2,
                                "rel_err \(formatScientific(error)), unwritten \(a.unwritten)" + (same ? ", = unfused" : ", DIFFERS from unfused"))
                        }
                    }
                }
            }

            if library.device.properties.architecture == "sm_90a" {
                try checkExpertGroups(seed: seed + 8)
                try checkClusterPairs(seed: seed + 9)
                try checkStreamK(seed: seed + 10)
                try checkAtomicCombine(seed: seed + 13)
            }

            // Unrouted slots (id -1: align places no row) on the wgmma kernels: token 0 has none routed (its
            // output row must be zeros), every third token loses its slot 1.
            if library.device.properties.architecture == "sm_90a" {
                let unrouted = try unroutedInputs(shape, seed: seed + 7)
                let reference = try unrouted.reference(weights: bf16, library: library, stream: stream)
                let o = try DeviceBuffer(device: library.device, byteCount: 90 * shape.hidden * 2)
                for config in [
                    GemmConfig.wgmma(blockM: 16, blockN: 128, stages: 4, swapAB: true), GemmConfig.wgmma(blockM: 64, blockN: 256, stages: 4),
                    GemmConfig.wgmma(blockM: 160, blockN: 256, stages: 4, swapAB: true),
                    GemmConfig.wgmma(blockM: 64, blockN: 128, stages: 6, persistent: true),
                    GemmConfig.wgmma(blockM: 128, blockN: 128, stages: 5, pingpong: true),
                    GemmConfig.wgmma(blockM: 64, blockN: 128, stages: 8, streamK: true),
                ] {
                    let layer = try CUDAMoELayer(
                        library: library, shape: shape, dtype: .bf16, w1: bf16.w1, w2: bf16.w2, plan: MoEPlan(both: config), maxTokens: 90)
                    let a = try runPoisoned(layer, unrouted, o)
                    let error = relativeError(a.values, reference)
                    let zeroRow = a.values[0..<shape.hidden].allSatisfy { $0 == 0 }
                    record(
                        "gpu unrouted slots \(config.kernel.rawValue) \(config.blockM)x\(config.blockN)",
                        zeroRow && a.unwritten == 0 && error < errorBound(.bf16),
                        "rel_err \(formatScientific(error)), unwritten \(a.unwritten), token 0 " + (zeroRow ? "zeros" : "NOT zeros"))
                }
            }

            // The fused combine (kernels compiled with MOE_SM90_FUSED_COMBINE=1, an experiment; GEMM2 on the
            // A-resident walk: I <= 384) with unrouted slots: token 0 has none (its row comes out of the
            // combine items as zeros), every third token loses slot 1; bit for bit the layer without it,
            // and its counters back at zero.
            let combinePlan = MoEPlan(both: .wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true))
            let combineShape = try MoEShape(experts: 32, topK: 6, hidden: 1024, intermediate: 384)
            if library.device.properties.architecture == "sm_90a"
                && CUDAMoELayer.allowsFusedCombine(
                    plan: combinePlan, shape: combineShape, options: MoEOptions(), library: library,
                    pairs: 90 * combineShape.topK)
            {
                let resident = combineShape
                let w = try LayerWeights(tools: tools, shape: resident, dtype: .bf16, seed: seed + 11, stream: stream)
                let x = try unroutedInputs(resident, seed: seed + 12)
                let reference = try x.reference(weights: w, library: library, stream: stream)
                let o = try DeviceBuffer(device: library.device, byteCount: 90 * resident.hidden * 2)
                let plan = combinePlan
                let fused = try CUDAMoELayer(
                    library: library, shape: resident, dtype: .bf16, w1: w.w1, w2: w.w2, plan: plan, maxTokens: 90,
                    fusedCombine: true)
                let separate = try CUDAMoELayer(
                    library: library, shape: resident, dtype: .bf16, w1: w.w1, w2: w.w2, plan: plan, maxTokens: 90,
                    fusedCombine: false)
                let a = try runPoisoned(fused, x, o)
                let b = try runPoisoned(separate, x, o)
                let error = relativeError(a.values, reference)
                let zeroRow = a.values[0..<resident.hidden].allSatisfy { $0 == 0 }
                var detail = "rel_err \(formatScientific(error)), unwritten \(a.unwritten), token 0 " + (zeroRow ? "zeros" : "NOT zeros")
                detail += a.bits == b.bits ? ", = without fused combine" : ", DIFFERS without fused combine"
                let clear = try countersClear(fused, &detail)
                record(
                    "gpu unrouted slots fused combine (wgmma_persistent 128x256, I=384)",
                    fused.usesFusedCombine && zeroRow && a.unwritten == 0 && error < errorBound(.bf16) && a.bits == b.bits
                        && clear, detail + (fused.usesFusedCombine ? "" : ", NOT FUSED"))
            }

            // Expert parallelism: this rank owns the even experts; rows of the others come out zero.
            let local = try MoEShape(experts: 32, topK: 6, hidden: 2048, intermediate: 512)
            let map = (0..<64).map { $0 % 2 == 0 ? Int32($0 / 2) : -1 }
            let localWeights = try LayerWeights(tools: tools, shape: local, dtype: .bf16, seed: seed + 4, stream: stream)
            let epLayer = try CUDAMoELayer(
                library: library, shape: local, dtype: .bf16, w1: localWeights.w1, w2: localWeights.w2,
                options: MoEOptions(expertMap: map), plan: caseplan(local, 1000, 1, .none), maxTokens: 1000)
            let ep = try runPoisoned(epLayer, inputs, out)
            let reference = try inputs.reference(weights: localWeights, library: library, expertMap: map, stream: stream)
            let error = relativeError(ep.values, reference)
            record("gpu expert map (half the experts owned)", ep.unwritten == 0 && error < errorBound(.bf16),
                   "rel_err \(formatScientific(error))")
            let noneOwned = try CUDAMoELayer(
                library: library, shape: local, dtype: .bf16, w1: localWeights.w1, w2: localWeights.w2,
                options: MoEOptions(expertMap: [Int32](repeating: -1, count: 64)), plan: caseplan(local, 1000, 4, .atomic),
                maxTokens: 1000)
            let zeros = try runPoisoned(noneOwned, inputs, out)
            record("gpu expert map (no expert owned): exact zeros", zeros.values.allSatisfy { $0 == 0 },
                   "\(zeros.values.filter { $0 != 0 }.count) nonzero")
        } catch {
            record("gpu variants", false, "\(error)")
        }
    }

    /// 90 tokens of bf16 inputs with unrouted slots (id -1: align places no row): token 0 has none routed
    /// (its output row must be zeros), every third token loses its slot 1.
    func unroutedInputs(_ shape: MoEShape, seed: UInt64) throws -> LayerInputs {
        let inputs = try LayerInputs(tools: tools, shape: shape, dtype: .bf16, tokens: 90, seed: seed, stream: stream)
        try stream.synchronize()
        var ids = try inputs.ids.download(count: 90 * shape.topK, as: Int32.self)
        for j in 0..<shape.topK { ids[j] = -1 }
        for t in stride(from: 3, to: 90, by: 3) { ids[t * shape.topK + 1] = -1 }
        try inputs.ids.upload(ids)
        return inputs
    }

    /// A bf16 case with few experts and several m-blocks each (E = 4, k = 2, 900 tokens): weights,
    /// inputs, an output buffer and the fp32 reference.
    func fewExpertCase(hidden: Int, intermediate: Int, seed: UInt64) throws
        -> (MoEShape, Int, LayerWeights, LayerInputs, DeviceBuffer, [Double])
    {
        let shape = try MoEShape(experts: 4, topK: 2, hidden: hidden, intermediate: intermediate)
        let tokens = 900
        let weights = try LayerWeights(tools: tools, shape: shape, dtype: .bf16, seed: seed, stream: stream)
        let inputs = try LayerInputs(tools: tools, shape: shape, dtype: .bf16, tokens: tokens, seed: seed + 1, stream: stream)
        let out = try DeviceBuffer(device: library.device, byteCount: tokens * shape.hidden * 2)
        let reference = try inputs.reference(weights: weights, library: library, stream: stream)
        return (shape, tokens, weights, inputs, out, reference)
    }

    /// The wgmma kernels' expert-aligned tile groups: few experts with several m-blocks each (E = 4,
    /// k = 2, 900 tokens: about 450 rows per expert, so BLOCK_M 128 runs end in blocks of either
    /// side of 64 rows, where the second consumer warpgroup skips its products), GROUP_SIZE_M 3 or 5
    /// cutting runs mid-way, unsplit and split; each against the fp32 reference and bit for bit the
    /// same plan with GROUP_SIZE_M 1 (the order of the tiles changes no tile's sums). Then an expert
    /// map that owns every other expert (runs of unowned blocks between owned ones).
    func checkExpertGroups(seed: UInt64) throws {
        let (shape, tokens, weights, inputs, out, reference) = try fewExpertCase(hidden: 512, intermediate: 256, seed: seed)
        let grouped: [(GemmConfig, Int, SplitMode)] = [
            (.wgmma(blockM: 128, blockN: 128, stages: 4, groupSizeM: 3), 1, .none),
            (.wgmma(blockM: 128, blockN: 128, stages: 4, groupSizeM: 3), 2, .workspace),
            (.wgmma(blockM: 64, blockN: 256, stages: 4, groupSizeM: 5), 1, .none),
            (.wgmma(blockM: 128, blockN: 256, stages: 4, groupSizeM: 3, persistent: true), 1, .none),
            (.wgmma(blockM: 128, blockN: 256, stages: 4, groupSizeM: 3, persistent: true), 2, .atomic),
            (.wgmma(blockM: 128, blockN: 128, stages: 5, groupSizeM: 3, pingpong: true), 1, .none),
            (.wgmma(blockM: 128, blockN: 64, stages: 3, groupSizeM: 3, pingpong: true), 2, .workspace),
            (.wgmma(blockM: 128, blockN: 128, stages: 4, groupSizeM: 5, pingpong: true), 2, .atomic),
            (.wgmma(blockM: 32, blockN: 64, stages: 6, groupSizeM: 5, swapAB: true), 1, .none),
        ]
        for (config, split, mode) in grouped {
            var ungrouped = config
            ungrouped.groupSizeM = 1
            let run = { (gemm: GemmConfig) throws -> LayerOutput in
                let layer = try CUDAMoELayer(
                    library: self.library, shape: shape, dtype: .bf16, w1: weights.w1, w2: weights.w2,
                    plan: MoEPlan(both: gemm).withSplit(split, mode: mode), maxTokens: tokens)
                return try self.runPoisoned(layer, inputs, out)
            }
            let a = try run(config)
            let b = try run(ungrouped)
            let error = relativeError(a.values, reference)
            let deterministic = mode != .atomic
            let same = a.bits == b.bits
            record(
                "gpu expert groups \(config.kernel.rawValue) \(config.blockM)x\(config.blockN) g\(config.groupSizeM) split=\(split) \(mode.rawValue)",
                a.unwritten == 0 && error < errorBound(.bf16) && (same || !deterministic),
                "rel_err \(formatScientific(error)), unwritten \(a.unwritten)"
                    + (deterministic ? (same ? ", = g1" : ", DIFFERS from g1") : ""))
        }

        let map: [Int32] = [0, -1, 1, -1]
        let local = try MoEShape(experts: 2, topK: 2, hidden: 512, intermediate: 256)
        let localWeights = try LayerWeights(tools: tools, shape: local, dtype: .bf16, seed: seed + 2, stream: stream)
        let mapped = try inputs.reference(weights: localWeights, library: library, expertMap: map, stream: stream)
        for config in [
            GemmConfig.wgmma(blockM: 128, blockN: 128, stages: 4, groupSizeM: 3),
            .wgmma(blockM: 128, blockN: 256, stages: 4, groupSizeM: 3, persistent: true),
            .wgmma(blockM: 128, blockN: 128, stages: 5, groupSizeM: 3, pingpong: true),
        ] {
            let layer = try CUDAMoELayer(
                library: library, shape: local, dtype: .bf16, w1: localWeights.w1, w2: localWeights.w2,
                options: MoEOptions(expertMap: map), plan: MoEPlan(both: config), maxTokens: tokens)
            let a = try runPoisoned(layer, inputs, out)
            let error = relativeError(a.values, mapped)
            record(
                "gpu expert groups with an expert map \(config.kernel.rawValue) g\(config.groupSizeM)",
                a.unwritten == 0 && error < errorBound(.bf16), "rel_err \(formatScientific(error)), unwritten \(a.unwritten)")
        }
    }

    /// The stream-K kernel (KERNEL wgmma_streamk) on the few-expert case (about 450 rows per expert:
    /// several m-blocks each, and fewer tiles than programs, so every tile is cut into K pieces over
    /// several programs): tiles of 128x256, 128x128 and 64x256, GROUP_SIZE_M 1 and 3, the fused activation,
    /// and an expert map owning every other expert. Each against the fp32 reference, and bit for bit
    /// a second run of the same layer (the sum order is fixed: reproducible; a stale flag or partial
    /// from the first run would show here). Also a plain 64-row tile with the shared small shape at
    /// M = 33, where every tile is cut over many programs.
    /// The atomic top-k sum (`CombineMode.atomic`: GEMM2 on the persistent kernel adds each row into its
    /// token's output row with 16-bit atomic adds): both of GEMM2's walks (A resident at I = 384, the tile
    /// walk at I = 512), both dtypes, in chunks (each chunk zeroes its own rows), with unrouted slots (a
    /// token with none stays zero) and under an expert map, against the reference; and where the plan
    /// does not allow it (GEMM2 on swap-AB), the ordered sum, bit for bit.
    func checkAtomicCombine(seed: UInt64) throws {
        let atomic = MoEOptions(combine: .atomic)
        let resident = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true)
        let tiles = GemmConfig.wgmma(blockM: 64, blockN: 128, stages: 6, persistent: true)
        let swap = GemmConfig.wgmma(blockM: 16, blockN: 128, stages: 4, swapAB: true)
        var caseSeed = seed
        for (intermediate, config) in [(384, resident), (512, resident), (512, tiles)] {
            let shape = try MoEShape(experts: 32, topK: 6, hidden: 1024, intermediate: intermediate)
            let plan = MoEPlan(gemm1: swap, gemm2: config)
            for dtype in [DType.bf16, .fp16] {
                caseSeed &+= 2
                let w = try LayerWeights(tools: tools, shape: shape, dtype: dtype, seed: caseSeed, stream: stream)
                let x = try LayerInputs(tools: tools, shape: shape, dtype: dtype, tokens: 1000, seed: caseSeed + 1, stream: stream)
                let o = try DeviceBuffer(device: library.device, byteCount: 1000 * shape.hidden * 2)
                let reference = try x.reference(weights: w, library: library, stream: stream)
                let ordered = try runPoisoned(
                    try CUDAMoELayer(
                        library: library, shape: shape, dtype: dtype, w1: w.w1, w2: w.w2, plan: plan, maxTokens: 1000),
                    x, o)
                let orderedError = relativeError(ordered.values, reference)
                for chunk in [65536, 300] {
                    let layer = try CUDAMoELayer(
                        library: library, shape: shape, dtype: dtype, w1: w.w1, w2: w.w2, options: atomic, plan: plan,
                        maxTokens: 1000, chunkTokens: chunk)
                    let a = try runPoisoned(layer, x, o)
                    let error = relativeError(a.values, reference)
                    record(
                        "gpu atomic combine \(dtype.rawValue) I=\(intermediate) gemm2 \(config.kernel.rawValue) \(config.blockM)x\(config.blockN)"
                            + (chunk < 1000 ? " in chunks of \(chunk)" : ""),
                        layer.usesAtomicCombine && a.unwritten == 0 && error < errorBound(dtype) * 2,
                        "rel_err \(formatScientific(error)) (ordered \(formatScientific(orderedError))), unwritten \(a.unwritten)"
                            + (layer.usesAtomicCombine ? "" : ", NOT USED"))
                }
            }
        }
        // Unrouted slots (token 0 has none: its row must stay zero) on the A-resident walk.
        let shape = try MoEShape(experts: 32, topK: 6, hidden: 1024, intermediate: 384)
        let w = try LayerWeights(tools: tools, shape: shape, dtype: .bf16, seed: caseSeed + 10, stream: stream)
        let unrouted = try unroutedInputs(shape, seed: caseSeed + 11)
        let o = try DeviceBuffer(device: library.device, byteCount: 1000 * shape.hidden * 2)
        let layer = try CUDAMoELayer(
            library: library, shape: shape, dtype: .bf16, w1: w.w1, w2: w.w2, options: atomic,
            plan: MoEPlan(gemm1: swap, gemm2: resident), maxTokens: 90)
        let a = try runPoisoned(layer, unrouted, o)
        let error = relativeError(a.values, try unrouted.reference(weights: w, library: library, stream: stream))
        let zeroRow = a.values[0..<shape.hidden].allSatisfy { $0 == 0 }
        record(
            "gpu atomic combine unrouted slots", layer.usesAtomicCombine && zeroRow && a.unwritten == 0 && error < errorBound(.bf16),
            "rel_err \(formatScientific(error)), unwritten \(a.unwritten), token 0 " + (zeroRow ? "zeros" : "NOT zeros"))
        // Expert parallelism: this rank owns the even experts (GEMM2 skips the others' blocks).
        let local = try MoEShape(experts: 16, topK: 6, hidden: 1024, intermediate: 512)
        let map = (0..<32).map { $0 % 2 == 0 ? Int32($0 / 2) : -1 }
        let lw = try LayerWeights(tools: tools, shape: local, dtype: .bf16, seed: caseSeed + 12, stream: stream)
        let global = try MoEShape(experts: 32, topK: 6, hidden: 1024, intermediate: 512)
        let x = try LayerInputs(tools: tools, shape: global, dtype: .bf16, tokens: 500, seed: caseSeed + 13, stream: stream)
        let ep = try CUDAMoELayer(
            library: library, shape: local, dtype: .bf16, w1: lw.w1, w2: lw.w2,
            options: MoEOptions(expertMap: map, combine: .atomic), plan: MoEPlan(gemm1: swap, gemm2: tiles), maxTokens: 500)
        let e = try runPoisoned(ep, x, o)
        let epError = relativeError(e.values, try x.reference(weights: lw, library: library, expertMap: map, stream: stream))
        record(
            "gpu atomic combine expert map (half the experts owned)",
            ep.usesAtomicCombine && e.unwritten == 0 && epError < errorBound(.bf16), "rel_err \(formatScientific(epError))")
        // In place (out = x): the sums go to the layer's scratch and reach x after GEMM2, as the combine
        // kernel's would. On a copy of x, against the reference.
        let inPlace = try unrouted.runInPlace(layer, stream: stream).values
        let inPlaceError = relativeError(inPlace, try unrouted.reference(weights: w, library: library, stream: stream))
        record(
            "gpu atomic combine in place (out = x)", inPlaceError < errorBound(.bf16),
            "rel_err \(formatScientific(inPlaceError))")
        // The swap-AB GEMM2 sums too (SPLIT_MODE 3 in moe_gemm_sm90_swap); a split GEMM2 cannot: the
        // ordered sum there, bit for bit.
        let swapPlan = MoEPlan(both: swap)
        let swapAtomic = try CUDAMoELayer(
            library: library, shape: shape, dtype: .bf16, w1: w.w1, w2: w.w2, options: atomic, plan: swapPlan, maxTokens: 90)
        let s = try runPoisoned(swapAtomic, unrouted, o)
        let swapError = relativeError(s.values, try unrouted.reference(weights: w, library: library, stream: stream))
        record(
            "gpu atomic combine swap-AB GEMM2", swapAtomic.usesAtomicCombine && s.unwritten == 0 && swapError < errorBound(.bf16),
            "rel_err \(formatScientific(swapError)), unwritten \(s.unwritten)" + (swapAtomic.usesAtomicCombine ? "" : ", NOT USED"))
        let splitPlan = MoEPlan(both: swap).withSplit(2, mode: .workspace)
        let asked = try CUDAMoELayer(
            library: library, shape: shape, dtype: .bf16, w1: w.w1, w2: w.w2, options: atomic, plan: splitPlan, maxTokens: 90)
        let plain = try CUDAMoELayer(
            library: library, shape: shape, dtype: .bf16, w1: w.w1, w2: w.w2, plan: splitPlan, maxTokens: 90)
        let b = try runPoisoned(asked, unrouted, o)
        let c = try runPoisoned(plain, unrouted, o)
        record(
            "gpu atomic combine asked of a split GEMM2: ordered", !asked.usesAtomicCombine && b.bits == c.bits,
            b.bits == c.bits ? "bitwise the ordered layer" : "DIFFERS from the ordered layer")
        try checkSmallTopKSum(seed: caseSeed + 20)
    }

    /// The ordered sum at k <= 2 by GEMM2's adds (`CUDAMoELayer.sumsInGEMM2`): bit for bit the combine
    /// kernel's (`smallTopKSum: false`), at k = 2 and 1, bf16 and fp16, on the swap-AB GEMM2 (decode
    /// tiles; wide tiles with the block sync), the persistent one (both walks) and the plain one, at one token (no
    /// align), 33 and 700; with unrouted slots, under an expert map, in chunks, and in place (out = x).
    func checkSmallTopKSum(seed: UInt64) throws {
        let decode = GemmConfig.wgmma(blockM: 16, blockN: 128, stages: 4, swapAB: true)
        let wide = GemmConfig.wgmma(blockM: 144, blockN: 256, stages: 4, swapAB: true)
        let resident = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true)
        let tiles = GemmConfig.wgmma(blockM: 64, blockN: 128, stages: 6, persistent: true)
        let plain = GemmConfig.wgmma(blockM: 64, blockN: 256, stages: 4)
        var caseSeed = seed
        // One case: the layer summing in GEMM2 against the one with the combine kernel, bit for bit.
        func compare(
            _ name: String, shape: MoEShape, dtype: DType, plan: MoEPlan, inputs: LayerInputs, weights: LayerWeights,
            options: MoEOptions = MoEOptions(), chunkTokens: Int = 65536, inPlace: Bool = false
        ) throws {
            let tokens = inputs.tokens
            func layer(_ summed: Bool) throws -> CUDAMoELayer {
                try CUDAMoELayer(
                    library: library, shape: shape, dtype: dtype, w1: weights.w1, w2: weights.w2, options: options,
                    plan: plan, maxTokens: tokens, chunkTokens: chunkTokens, smallTopKSum: summed)
            }
            let (summed, kernel) = (try layer(true), try layer(false))
            let o = try DeviceBuffer(device: library.device, byteCount: tokens * shape.hidden * dtype.byteCount)
            let b = try runPoisoned(kernel, inputs, o)
            let bits: [UInt16]
            var unwritten = 0
            if inPlace {
                bits = try inputs.runInPlace(summed, stream: stream).bits
            } else {
                let a = try runPoisoned(summed, inputs, o)
                (bits, unwritten) = (a.bits, a.unwritten)
            }
            let differing = zip(bits, b.bits).filter { $0 != $1 }.count
            let error = relativeError(b.values, try inputs.reference(weights: weights, library: library, expertMap: options.expertMap, stream: stream))
            record(
                "gpu small-k sum \(name) k=\(shape.topK) \(dtype.rawValue) M=\(tokens) gemm2 \(plan.gemm2.kernel.rawValue) \(plan.gemm2.blockM)x\(plan.gemm2.blockN)",
                summed.usesAtomicCombine && !kernel.usesAtomicCombine && differing == 0 && unwritten == 0
                    && error < errorBound(dtype),
                (differing == 0 ? "bitwise the combine kernel's" : "\(differing) elements DIFFER from the combine kernel's")
                    + ", rel_err \(formatScientific(error))" + (summed.usesAtomicCombine ? "" : ", NOT USED"))
        }
        for topK in [2, 1] {
            let shape = try MoEShape(experts: 8, topK: topK, hidden: 1024, intermediate: 384)
            for dtype in [DType.bf16, .fp16] {
                caseSeed &+= 2
                let w = try LayerWeights(tools: tools, shape: shape, dtype: dtype, seed: caseSeed, stream: stream)
                for tokens in [1, 33, 700] {
                    let x = try LayerInputs(tools: tools, shape: shape, dtype: dtype, tokens: tokens, seed: caseSeed + 1, stream: stream)
                    var plans = [("decode", MoEPlan(both: decode))]
                    if tokens > 1 {
                        plans += [
                            ("wide", MoEPlan(both: wide)),
                            ("resident", MoEPlan(gemm1: decode, gemm2: resident)),
                            ("tiles", MoEPlan(gemm1: decode, gemm2: tiles)),
                            ("plain", MoEPlan(gemm1: decode, gemm2: plain)),
                        ]
                    }
                    for (name, plan) in plans {
                        try compare(name, shape: shape, dtype: dtype, plan: plan, inputs: x, weights: w)
                    }
                }
            }
        }
        // Unrouted slots, in chunks of 50, in place, and an expert map (the even experts owned).
        let shape = try MoEShape(experts: 8, topK: 2, hidden: 1024, intermediate: 384)
        let w = try LayerWeights(tools: tools, shape: shape, dtype: .bf16, seed: caseSeed + 10, stream: stream)
        let unrouted = try unroutedInputs(shape, seed: caseSeed + 11)
        for (name, plan) in [("decode", MoEPlan(both: decode)), ("wide", MoEPlan(both: wide))] {
            try compare("unrouted slots \(name)", shape: shape, dtype: .bf16, plan: plan, inputs: unrouted, weights: w)
            try compare("chunks of 50 \(name)", shape: shape, dtype: .bf16, plan: plan, inputs: unrouted, weights: w, chunkTokens: 50)
            try compare("in place \(name)", shape: shape, dtype: .bf16, plan: plan, inputs: unrouted, weights: w, inPlace: true)
        }
        let local = try MoEShape(experts: 4, topK: 2, hidden: 1024, intermediate: 384)
        let lw = try LayerWeights(tools: tools, shape: local, dtype: .bf16, seed: caseSeed + 12, stream: stream)
        let x = try LayerInputs(tools: tools, shape: shape, dtype: .bf16, tokens: 300, seed: caseSeed + 13, stream: stream)
        let map = (0..<8).map { $0 % 2 == 0 ? Int32($0 / 2) : -1 }
        try compare(
            "expert map", shape: local, dtype: .bf16, plan: MoEPlan(both: wide), inputs: x, weights: lw,
            options: MoEOptions(expertMap: map))
    }

    func checkStreamK(seed: UInt64) throws {
        let (shape, tokens, weights, inputs, out, reference) = try fewExpertCase(hidden: 512, intermediate: 256, seed: seed)
        var cases: [(String, MoEShape, MoEPlan, MoEOptions, LayerWeights, [Double])] = []
        for config in [
            GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, streamK: true),
            .wgmma(blockM: 128, blockN: 256, stages: 3, groupSizeM: 3, streamK: true),
            .wgmma(blockM: 128, blockN: 128, stages: 6, streamK: true),
            .wgmma(blockM: 64, blockN: 256, stages: 5, groupSizeM: 3, streamK: true),
        ] {
            for fused in [false, true] where fused == false || config.blockN == 256 {
                var plan = MoEPlan(both: config)
                plan.fusedActivation = fused
                cases.append(("\(config.blockM)x\(config.blockN) s\(config.stages) g\(config.groupSizeM)" + (fused ? " fused" : ""),
                              shape, plan, MoEOptions(), weights, reference))
            }
        }
        let map: [Int32] = [0, -1, 1, -1]
        let local = try MoEShape(experts: 2, topK: 2, hidden: 512, intermediate: 256)
        let localWeights = try LayerWeights(tools: tools, shape: local, dtype: .bf16, seed: seed + 2, stream: stream)
        let mapped = try inputs.reference(weights: localWeights, library: library, expertMap: map, stream: stream)
        cases.append(("128x256 s4 expert map", local, MoEPlan(both: .wgmma(blockM: 128, blockN: 256, stages: 4, streamK: true)),
                      MoEOptions(expertMap: map), localWeights, mapped))
        for (name, caseShape, plan, options, caseWeights, expected) in cases {
            let layer = try CUDAMoELayer(
                library: library, shape: caseShape, dtype: .bf16, w1: caseWeights.w1, w2: caseWeights.w2, options: options,
                plan: plan, maxTokens: tokens)
            let a = try runPoisoned(layer, inputs, out)
            let b = try runPoisoned(layer, inputs, out)
            let error = relativeError(a.values, expected)
            let same = a.bits == b.bits
            record(
                "gpu stream-K \(name)", a.unwritten == 0 && error < errorBound(.bf16) && same,
                "rel_err \(formatScientific(error)), unwritten \(a.unwritten)" + (same ? ", reproducible" : ", RUNS DIFFER"))
        }
    }

    /// The wgmma kernel in clusters of two (CLUSTER_M 2): pairs of programs on two m-blocks of one
    /// expert share each weight tile (TMA multicast), other pairs load alone. E = 4, k = 2, 900 tokens
    /// (runs of 3-4 m-blocks of 128 per expert), hidden 640 and I = 320, so n-blocks come in odd
    /// counts (5 of 128, 3 of 256: a lone last column, pairs that straddle n-blocks); groups 1 (no
    /// pair shares), 3 and 5 (odd: the last m-block of a group pairs across two n-blocks), 2 and 4;
    /// unsplit (GEMM1 fused: gate and up boxes shared), workspace and atomic splits; then an expert map
    /// owning every other expert. Each against the fp32 reference and, deterministic, bit for bit the
    /// same plan without the cluster (sharing moves bytes, not sums).
    func checkClusterPairs(seed: UInt64) throws {
        let (shape, tokens, weights, inputs, out, reference) = try fewExpertCase(hidden: 640, intermediate: 320, seed: seed)
        let map: [Int32] = [0, -1, 1, -1]
        let local = try MoEShape(experts: 2, topK: 2, hidden: 640, intermediate: 320)
        let localWeights = try LayerWeights(tools: tools, shape: local, dtype: .bf16, seed: seed + 2, stream: stream)
        let mapped = try inputs.reference(weights: localWeights, library: library, expertMap: map, stream: stream)
        let cases: [(GemmConfig, Int, SplitMode, mapped: Bool)] = [
            (.wgmma(blockM: 128, blockN: 128, stages: 4, groupSizeM: 4, clusterM: 2), 1, .none, false),
            (.wgmma(blockM: 128, blockN: 128, stages: 4, groupSizeM: 3, clusterM: 2), 1, .none, false),
            (.wgmma(blockM: 128, blockN: 256, stages: 4, groupSizeM: 5, clusterM: 2), 2, .workspace, false),
            (.wgmma(blockM: 128, blockN: 256, stages: 4, groupSizeM: 1, clusterM: 2), 1, .none, false),
            (.wgmma(blockM: 64, blockN: 256, stages: 4, groupSizeM: 2, clusterM: 2), 1, .none, false),
            (.wgmma(blockM: 128, blockN: 64, stages: 6, groupSizeM: 4, clusterM: 2), 2, .atomic, false),
            (.wgmma(blockM: 128, blockN: 128, stages: 4, groupSizeM: 4, clusterM: 2), 1, .none, true),
        ]
        for (config, split, mode, isMapped) in cases {
            var alone = config
            alone.clusterM = 1
            let run = { (gemm: GemmConfig) throws -> LayerOutput in
                let layer = try CUDAMoELayer(
                    library: self.library, shape: isMapped ? local : shape, dtype: .bf16,
                    w1: isMapped ? localWeights.w1 : weights.w1, w2: isMapped ? localWeights.w2 : weights.w2,
                    options: isMapped ? MoEOptions(expertMap: map) : MoEOptions(),
                    plan: MoEPlan(both: gemm).withSplit(split, mode: mode), maxTokens: tokens)
                return try self.runPoisoned(layer, inputs, out)
            }
            let a = try run(config)
            let b = try run(alone)
            let error = relativeError(a.values, isMapped ? mapped : reference)
            let deterministic = mode != .atomic
            let same = a.bits == b.bits
            record(
                "gpu cluster pairs \(config.blockM)x\(config.blockN) g\(config.groupSizeM) split=\(split) \(mode.rawValue)"
                    + (isMapped ? " expert map" : ""),
                a.unwritten == 0 && error < errorBound(.bf16) && (same || !deterministic),
                "rel_err \(formatScientific(error)), unwritten \(a.unwritten)"
                    + (deterministic ? (same ? ", = unclustered" : ", DIFFERS from unclustered") : ""))
        }
    }

    // MARK: - 64-bit offsets

    /// M = 65536, k = 8, 2I = 4224: the intermediate holds 2.2e9 > 2^31 elements.
    func checkLargeOffsets(seed: UInt64) {
        do {
            let shape = try MoEShape(experts: 8, topK: 8, hidden: 256, intermediate: 2112)
            let tokens = 65536
            let weights = try LayerWeights(tools: tools, shape: shape, dtype: .bf16, seed: seed, stream: stream)
            let inputs = try LayerInputs(tools: tools, shape: shape, dtype: .bf16, tokens: tokens, seed: seed + 1, stream: stream)
            let reference = try inputs.reference(weights: weights, library: library, stream: stream)
            let plan = caseplan(shape, tokens, 1, .none)
            try library.prepare(CUDAMoELayer.requests(dtype: .bf16, plan: plan, activation: .silu))
            let layer = try CUDAMoELayer(library: library, shape: shape, dtype: .bf16, w1: weights.w1, w2: weights.w2, plan: plan, maxTokens: tokens)
            let out = try DeviceBuffer(device: library.device, byteCount: tokens * shape.hidden * 2)
            let result = try runPoisoned(layer, inputs, out)
            let error = relativeError(result.values, reference)
            record("gpu 64-bit offsets (M=65536, k=8, 2I=4224: \(tokens * 8 * 4224) intermediate elements)",
                   result.unwritten == 0 && error < errorBound(.bf16), "rel_err \(formatScientific(error)), unwritten \(result.unwritten)")
        } catch {
            record("gpu 64-bit offsets", false, "\(error)")
        }
    }
}

/// Random expert weights on the GPU.
struct LayerWeights {
    let shape: MoEShape
    let dtype: DType
    let w1: DeviceBuffer
    let w2: DeviceBuffer

    init(tools: DeviceTools, shape: MoEShape, dtype: DType, seed: UInt64, stream: Stream) throws {
        self.shape = shape
        self.dtype = dtype
        let device = tools.library.device
        let count1 = shape.experts * 2 * shape.intermediate * shape.hidden
        let count2 = shape.experts * shape.hidden * shape.intermediate
        w1 = try DeviceBuffer(device: device, byteCount: count1 * dtype.byteCount)
        w2 = try DeviceBuffer(device: device, byteCount: count2 * dtype.byteCount)
        try tools.fillUniform(w1.pointer, count: count1, dtype: dtype, seed: seed, scale: 1.7 / Float(shape.hidden).squareRoot(), stream: stream)
        try tools.fillUniform(w2.pointer, count: count2, dtype: dtype, seed: seed &+ 1, scale: 1.7 / Float(shape.intermediate).squareRoot(), stream: stream)
    }
}

/// A forward's output read back: raw bits, values, and how many elements were left unwritten.
struct LayerOutput {
    var bits: [UInt16]
    var values: [Float]
    var unwritten: Int

    /// The first `count` 16-bit elements of `buffer` once `stream`'s work is done.
    static func read(_ buffer: DeviceBuffer, count: Int, dtype: DType, stream: Stream) throws -> LayerOutput {
        try stream.synchronize()
        let bits = try buffer.download(count: count, as: UInt16.self)
        let values = bits.map { dtype == .fp16 ? Float(Float16(bitPattern: $0)) : BFloat16(bitPattern: $0).floatValue }
        return LayerOutput(bits: bits, values: values, unwritten: values.filter(\.isNaN).count)
    }
}

/// Random activations and routing on the GPU for one batch.
struct LayerInputs {
    let shape: MoEShape
    let dtype: DType
    let tokens: Int
    let x: DeviceBuffer
    let ids: DeviceBuffer
    let weights: DeviceBuffer

    init(tools: DeviceTools, shape: MoEShape, dtype: DType, tokens: Int, seed: UInt64, stream: Stream, experts: Int? = nil) throws {
        self.shape = shape
        self.dtype = dtype
        self.tokens = tokens
        let device = tools.library.device
        x = try DeviceBuffer(device: device, byteCount: max(tokens * shape.hidden * dtype.byteCount, 16))
        ids = try DeviceBuffer(device: device, count: max(tokens * shape.topK, 4), of: Int32.self)
        weights = try DeviceBuffer(device: device, count: max(tokens * shape.topK, 4), of: Float.self)
        try tools.fillUniform(x.pointer, count: tokens * shape.hidden, dtype: dtype, seed: seed, scale: 1, stream: stream)
        try tools.fillRandomIDs(ids.pointer, tokens: tokens, topK: shape.topK, experts: experts ?? shape.experts, seed: seed &+ 1, stream: stream)
        try tools.fillUniform(weights.pointer, count: tokens * shape.topK, dtype: .fp32, seed: seed &+ 2, scale: 1, stream: stream)
        // Written by kernels on `stream` (non-blocking): finished before anyone downloads them (a
        // download runs on the legacy stream, which does not wait for `stream`).
        try stream.synchronize()
    }

    /// The scratch `runPoisoned` poisons: FUSED_MOE_CHECK_POISON (comma-separated parts of
    /// `CUDAMoELayer.poisonScratch`, "none" for none; a diagnostic), else all of it.
    static let poisonParts: Set<String>? = environment("FUSED_MOE_CHECK_POISON").map {
        Set($0.split(separator: ",").map(String.init))
    }

    /// Enqueues `layer`'s forward of these inputs into `out` on `stream` (no synchronization).
    func forward(
        _ layer: CUDAMoELayer, out: DeviceBuffer, stream: Stream, stageMarker: CUDAMoELayer.StageMarker? = nil
    ) throws {
        try layer.forward(
            x: x.pointer, topkIDs: ids.pointer, topkWeights: weights.pointer, out: out.pointer, tokens: tokens,
            stream: stream, stageMarker: stageMarker)
    }

    /// Poisons `out` with NaN (and the layer's scratch: `poisonScratch`), runs `layer` on these inputs,
    /// and reads the output back, counting the NaNs left (elements the forward did not write).
    /// `scratch: false` poisons only `out` (a serving sequence: the scratch keeps the last forward's).
    func runPoisoned(_ layer: CUDAMoELayer, out: DeviceBuffer, stream: Stream, scratch: Bool = true) throws -> LayerOutput {
        try out.fill(byte: 0xFF, on: stream)
        if scratch { try layer.poisonScratch(on: stream, parts: LayerInputs.poisonParts) }
        try forward(layer, out: out, stream: stream)
        return try LayerOutput.read(out, count: tokens * layer.shape.hidden, dtype: layer.dtype, stream: stream)
    }

    /// Runs `layer` in place (out = x) on a copy of these inputs' x, and reads the copy back.
    func runInPlace(_ layer: CUDAMoELayer, stream: Stream) throws -> LayerOutput {
        let copy = try DeviceBuffer(device: x.device, byteCount: x.byteCount)
        try copy.copy(from: x, byteCount: x.byteCount, on: stream)
        try layer.forward(
            x: copy.pointer, topkIDs: ids.pointer, topkWeights: weights.pointer, out: copy.pointer, tokens: tokens,
            stream: stream)
        return try LayerOutput.read(copy, count: tokens * layer.shape.hidden, dtype: layer.dtype, stream: stream)
    }

    /// The fp32 GPU reference output, as floats. With an expert map, ids are mapped to local ids
    /// (or -1) first, on the host.
    func reference(
        weights layerWeights: LayerWeights, library: KernelLibrary, activation: Activation = .silu,
        expertMap: [Int32]? = nil, stream: Stream
    ) throws -> [Double] {
        let device = library.device
        let reference = try GPUReference(library: library, dtype: dtype)
        var idsPointer = ids.pointer
        var mapped: DeviceBuffer? = nil
        if let expertMap {
            let hostIDs = try ids.download(count: tokens * shape.topK, as: Int32.self)
            let buffer = try DeviceBuffer(device: device, count: hostIDs.count, of: Int32.self)
            try buffer.upload(hostIDs.map { expertMap[Int($0)] })
            mapped = buffer
            idsPointer = buffer.pointer
        }
        let scratch = try DeviceBuffer(device: device, count: tokens * shape.topK * shape.intermediate, of: Float.self)
        let out = try DeviceBuffer(device: device, count: tokens * shape.hidden, of: Float.self)
        try out.fill(byte: 0xFF, on: stream)
        try reference.forward(
            x: x.pointer, w1: layerWeights.w1.pointer, w2: layerWeights.w2.pointer, ids: idsPointer, weights: weights.pointer,
            shape: layerWeights.shape, tokens: tokens, activation: activation, scratch: scratch.pointer, out: out.pointer,
            stream: stream)
        try stream.synchronize()
        _ = mapped
        return try out.download(count: tokens * shape.hidden, as: Float.self).map(Double.init)
    }

    /// The float64 CPU reference on the experts this batch touches (their weights downloaded).
    func cpuReference(weights layerWeights: LayerWeights, stream: Stream) throws -> [Double] {
        try stream.synchronize()
        let hostIDs = try ids.download(count: tokens * shape.topK, as: Int32.self)
        let touched = Array(Set(hostIDs)).sorted()
        let (h, i) = (shape.hidden, shape.intermediate)
        var w1 = [BFloat16]()
        var w2 = [BFloat16]()
        for expert in touched {
            var slab1 = [UInt16](repeating: 0, count: 2 * i * h)
            try slab1.withUnsafeMutableBytes { try layerWeights.w1.download(into: $0, offsetBytes: Int(expert) * 2 * i * h * 2) }
            var slab2 = [UInt16](repeating: 0, count: h * i)
            try slab2.withUnsafeMutableBytes { try layerWeights.w2.download(into: $0, offsetBytes: Int(expert) * h * i * 2) }
            w1 += slab1.map { BFloat16(bitPattern: $0) }
            w2 += slab2.map { BFloat16(bitPattern: $0) }
        }
        let local = try MoEShape(experts: touched.count, topK: shape.topK, hidden: h, intermediate: i)
        let weights = try MoEWeights(
            w1: HostTensor(shape: [local.experts, 2 * i, h], storage: w1),
            w2: HostTensor(shape: [local.experts, h, i], storage: w2), topK: shape.topK)
        let index = Dictionary(uniqueKeysWithValues: touched.enumerated().map { ($1, Int32($0)) })
        let routing = try Routing(
            tokens: tokens, topK: shape.topK, ids: hostIDs.map { index[$0]! },
            weights: try self.weights.download(count: tokens * shape.topK, as: Float.self))
        let xBits = try x.download(count: tokens * h, as: UInt16.self)
        let hostX = try HostTensor(shape: [tokens, h], storage: xBits.map { BFloat16(bitPattern: $0) })
        return try Float64Reference.forward(x: hostX, routing: routing, weights: weights)
    }
}
