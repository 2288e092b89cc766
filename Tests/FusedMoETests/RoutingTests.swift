import Testing
@testable import FusedMoE

@Suite struct AlignTests {
    @Test func sglangDocstringExample() throws {
        let example = CPUChecks.alignExample
        let aligned = try Align.align(ids: example.ids, experts: example.experts, blockM: example.blockM)
        #expect(aligned.sortedTokenIDs == example.sorted)
        #expect(aligned.expertIDs == example.expertIDs)
        #expect(aligned.paddedCount == 16)
        #expect(aligned.padValue == 12)
    }

    @Test func expertMapMarksUnownedBlocks() throws {
        let aligned = try Align.align(ids: [0, 1, 2, 3, 0, 2], experts: 4, blockM: 2, expertMap: [0, -1, 1, -1])
        #expect(aligned.sortedTokenIDs == [0, 4, 1, 6, 2, 5, 3, 6])
        #expect(aligned.expertIDs == [0, -1, 1, -1])
    }

    @Test func unroutedSlotsAreSkippedAndEmptyBatchesWork() throws {
        let aligned = try Align.align(ids: [-1, 1, 1, -1], experts: 2, blockM: 4)
        #expect(aligned.sortedTokenIDs == [1, 2, 4, 4])
        #expect(aligned.expertIDs == [1])
        let empty = try Align.align(ids: [], experts: 3, blockM: 16)
        #expect(empty.paddedCount == 0 && empty.expertIDs.isEmpty)
    }

    @Test func randomAlignIsAStablePaddedSort() throws {
        var generator = SplitMix64(seed: 99)
        for _ in 0..<20 {
            let experts = Int.random(in: 1...40, using: &generator)
            let blockM = [1, 4, 16, 64].randomElement(using: &generator)!
            let ids = (0..<Int.random(in: 0...500, using: &generator)).map { _ in Int32.random(in: 0..<Int32(experts), using: &generator) }
            let aligned = try Align.align(ids: ids, experts: experts, blockM: blockM)
            #expect(aligned.paddedCount % blockM == 0)
            #expect(aligned.paddedCount <= Align.maximumPaddedCount(pairs: ids.count, experts: experts, blockM: blockM))
            #expect(Align.maximumPaddedCount(pairs: ids.count, experts: experts, blockM: blockM) <= ids.count * blockM)
            let real = aligned.sortedTokenIDs.filter { $0 != aligned.padValue }
            #expect(real.sorted() == Array(0..<Int32(ids.count)))
            for (position, pair) in aligned.sortedTokenIDs.enumerated() where pair != aligned.padValue {
                #expect(aligned.expertIDs[position / blockM] == ids[Int(pair)])
            }
            for expert in 0..<experts {
                let run = aligned.sortedTokenIDs.enumerated().filter { $0.element != aligned.padValue && ids[Int($0.element)] == expert }.map(\.element)
                #expect(run == run.sorted())
            }
        }
    }

    /// The GPU align's launches: one launch up to 8192 pairs, three above (and for any count, which
    /// `check` uses to run both on the small cases); the stage room leaves the kernel's static memory.
    @Test func gpuAlignLaunchFollowsThePairs() {
        #expect(CUDAMoELayer.AlignLaunch.choice(pairs: 0) == .single)
        #expect(CUDAMoELayer.AlignLaunch.choice(pairs: 8192) == .single)
        #expect(CUDAMoELayer.AlignLaunch.choice(pairs: 8193) == .chunked)
        #expect(!CUDAMoELayer.AlignLaunch.allows(.single, pairs: 8193))
        #expect(CUDAMoELayer.AlignLaunch.allows(.chunked, pairs: 7))
        #expect(CUDAMoELayer.alignStageRoom(optIn: 227 * 1024) == 160 * 1024)
        #expect(CUDAMoELayer.alignStageRoom(optIn: 48 * 1024) == 8 * 1024)
        #expect(CUDAMoELayer.alignStageBytes(maxPadded: 1001, optIn: 227 * 1024) == 4016)
    }

    @Test func blockSyncNeedsBothGemmsOnTheSwapKernelOfOneAlign() {
        let swap = GemmConfig.wgmma(blockM: 144, blockN: 256, stages: 4, swapAB: true)
        let both = MoEPlan(both: swap)
        #expect(CUDAMoELayer.usesBlockSync(plan: both, programmaticDependentLaunch: true))
        // Without PDL GEMM2 starts after GEMM1 anyway.
        #expect(!CUDAMoELayer.usesBlockSync(plan: both, programmaticDependentLaunch: false))
        // The activation as its own kernel: GEMM2's predecessor is not GEMM1.
        var unfused = both
        unfused.fusedActivation = false
        #expect(!CUDAMoELayer.usesBlockSync(plan: unfused, programmaticDependentLaunch: true))
        // Two aligns: GEMM2's m-blocks are not GEMM1's.
        let mixed = MoEPlan(gemm1: swap, gemm2: .wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true))
        #expect(!CUDAMoELayer.usesBlockSync(plan: mixed, programmaticDependentLaunch: true))
        let narrower = MoEPlan(gemm1: swap, gemm2: .wgmma(blockM: 160, blockN: 256, stages: 4, swapAB: true))
        #expect(!CUDAMoELayer.usesBlockSync(plan: narrower, programmaticDependentLaunch: true))
        // Split GEMM1: the reduction kernel writes the rows; atomic GEMM2 returns early on empty tiles.
        #expect(!CUDAMoELayer.usesBlockSync(plan: both.withSplit(2, mode: .workspace), programmaticDependentLaunch: true))
        var atomic2 = both
        atomic2.gemm2.splitK = 2
        atomic2.gemm2.splitMode = .atomic
        #expect(!CUDAMoELayer.usesBlockSync(plan: atomic2, programmaticDependentLaunch: true))
        var workspace2 = both
        workspace2.gemm2.splitK = 2
        workspace2.gemm2.splitMode = .workspace
        #expect(CUDAMoELayer.usesBlockSync(plan: workspace2, programmaticDependentLaunch: true))
    }

    @Test func blockSyncCountsFitTheCounter() throws {
        let both = MoEPlan(both: GemmConfig.wgmma(blockM: 144, blockN: 256, stages: 4, swapAB: true))
        // Mixtral at tp 2: 2I = 14336 over 256-row tiles, 8 consumer warps each: 448 counts per m-block.
        #expect(CUDAMoELayer.blockSyncCountsFit(plan: both, shape: try MoEShape(experts: 8, topK: 2, hidden: 4096, intermediate: 7168)))
        // 2I = 2^21 on 256-row tiles: 65536 counts, past the 16 bits.
        #expect(!CUDAMoELayer.blockSyncCountsFit(plan: both, shape: try MoEShape(experts: 8, topK: 2, hidden: 4096, intermediate: 1 << 20)))
        // 64-row tiles with 4 consumer warps: 2I = 2^18 gives 16384 counts, which fit.
        let narrow = MoEPlan(both: GemmConfig.wgmma(blockM: 16, blockN: 64, stages: 6, swapAB: true))
        #expect(CUDAMoELayer.blockSyncCountsFit(plan: narrow, shape: try MoEShape(experts: 8, topK: 2, hidden: 4096, intermediate: 1 << 17)))
        // GEMM2's readers: H = 2^21 over 64-row tiles is 32768 programs, past the high bits' 15.
        #expect(!CUDAMoELayer.blockSyncCountsFit(plan: narrow, shape: try MoEShape(experts: 8, topK: 2, hidden: 1 << 21, intermediate: 256)))
    }

    @Test func fusedCombineWhereGemm2KeepsItsAResident() throws {
        let seed = try MoEShape(experts: 128, topK: 8, hidden: 4096, intermediate: 384)
        let qwen = try MoEShape(experts: 128, topK: 8, hidden: 4096, intermediate: 768)
        let swap = GemmConfig.wgmma(blockM: 160, blockN: 256, stages: 4, swapAB: true)
        let resident = MoEPlan(gemm1: swap, gemm2: .wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true))
        // The shipped seed4096 GEMM2 (K = 384: 6 A slots and 3 B stages of a 4-stage 128x256 ring), with
        // the kernels compiled for it (an experiment) and not without.
        let on = ["-DMOE_SM90_FUSED_COMBINE=1"]
        #expect(CUDAMoELayer.allowsFusedCombine(plan: resident, shape: seed, expertMap: false, defines: on))
        #expect(!CUDAMoELayer.allowsFusedCombine(plan: resident, shape: seed, expertMap: false))
        // K = 768 does not fit the A slots; nor K = 384 once an experiment holds fewer.
        #expect(!CUDAMoELayer.allowsFusedCombine(plan: resident, shape: qwen, expertMap: false, defines: on))
        #expect(!CUDAMoELayer.allowsFusedCombine(
            plan: resident, shape: seed, expertMap: false, defines: on + ["-DMOE_SM90_A_RESIDENT=0"]))
        #expect(!CUDAMoELayer.allowsFusedCombine(
            plan: resident, shape: seed, expertMap: false, defines: on + ["-DMOE_SM90_A_RESIDENT=4"]))
        #expect(!CUDAMoELayer.allowsFusedCombine(
            plan: resident, shape: seed, expertMap: false, defines: on + ["-DMOE_SM90_HALF_TILES=1"]))
        // A 3-stage ring keeps only 1 B stage beside the A slots; 64-row tiles keep no A.
        let shallow = MoEPlan(gemm1: swap, gemm2: .wgmma(blockM: 128, blockN: 256, stages: 3, persistent: true))
        #expect(!CUDAMoELayer.allowsFusedCombine(plan: shallow, shape: seed, expertMap: false, defines: on))
        let narrow = MoEPlan(both: .wgmma(blockM: 64, blockN: 256, stages: 4, persistent: true))
        #expect(!CUDAMoELayer.allowsFusedCombine(plan: narrow, shape: seed, expertMap: false, defines: on))
        // Not with an expert map, a split GEMM2, the swap-AB or ping-pong GEMM2, one slot, or counters
        // whose fields would overflow.
        #expect(!CUDAMoELayer.allowsFusedCombine(plan: resident, shape: seed, expertMap: true, defines: on))
        #expect(!CUDAMoELayer.allowsFusedCombine(plan: resident.withSplit(2, mode: .workspace), shape: seed, expertMap: false, defines: on))
        #expect(!CUDAMoELayer.allowsFusedCombine(plan: MoEPlan(both: swap), shape: seed, expertMap: false, defines: on))
        let pingpong = MoEPlan(both: GemmConfig.wgmma(blockM: 128, blockN: 128, stages: 5, pingpong: true))
        #expect(!CUDAMoELayer.allowsFusedCombine(plan: pingpong, shape: seed, expertMap: false, defines: on))
        let one = try MoEShape(experts: 128, topK: 1, hidden: 4096, intermediate: 384)
        #expect(!CUDAMoELayer.allowsFusedCombine(plan: resident, shape: one, expertMap: false, defines: on))
        #expect(!CUDAMoELayer.allowsFusedCombine(plan: resident, shape: seed, expertMap: false, defines: on, programs: 512))
        #expect(!CUDAMoELayer.allowsFusedCombine(plan: resident, shape: seed, expertMap: false, defines: on, maxPadded: 128 << 19))
        // Chunks: 8 MiB of partial rows, 256 columns of bf16 per n-block, 1 to 4 n-blocks.
        let budget = 8 << 20
        #expect(CUDAMoELayer.fusedCombineChunk(plan: resident, dtype: .bf16, pairs: 8192, budget: budget) == 2)
        #expect(CUDAMoELayer.fusedCombineChunk(plan: resident, dtype: .bf16, pairs: 16384, budget: budget) == 1)
        #expect(CUDAMoELayer.fusedCombineChunk(plan: resident, dtype: .bf16, pairs: 65536, budget: budget) == 1)
        #expect(CUDAMoELayer.fusedCombineChunk(plan: resident, dtype: .bf16, pairs: 8, budget: budget) == 4)
        // The host's A slots are the kernel's default.
        let source = KernelSource.gemmSM90.text
        let line = try #require(source.split(separator: "\n").first { $0.hasPrefix("#define MOE_SM90_A_RESIDENT ") })
        let value = try #require(line.split(separator: " ").dropFirst(2).first.flatMap { Int($0) })
        #expect(value == CUDAMoELayer.residentASlots)
    }

    @Test func alignChunkFollowsTheKernelDefine() throws {
        // The host sizes the three-launch align's grid and scratch from the kernels' chunk: the default
        // must be the source's, and an experiment's define must move both.
        let source = KernelSource.align.text
        let line = try #require(source.split(separator: "\n").first { $0.hasPrefix("#define MOE_ALIGN_CHUNK_ITEMS ") })
        let value = try #require(line.split(separator: " ").dropFirst(2).first.flatMap { Int($0) })
        #expect(value == CUDAMoELayer.alignChunkItems)
        #expect(CUDAMoELayer.alignChunk(defines: []) == 256 * value)
        #expect(CUDAMoELayer.alignChunk(defines: ["-DMOE_SM90_FIT_WIDTH=0", "-DMOE_ALIGN_CHUNK_ITEMS=16"]) == 4096)
    }

    @Test func alignPrefetchCoversGemm1sFirstWave() throws {
        // seed4096 (E=128, k=8, H=4096, I=384) at 1024 tokens on the persistent 128 x 256 GEMM1: 64 rows
        // per expert, one m-block each, so the first wave (132 tiles) reads 132 * 256 distinct w1 rows from
        // row 0; 24 MiB over them is 744 bytes a row, whole 128-byte K tiles: 640.
        let shape = try MoEShape(experts: 128, topK: 8, hidden: 4096, intermediate: 384)
        let persistent = MoEPlan(both: .wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true))
        func prefetch(_ plan: MoEPlan, pairs: Int, budget: Int = 24 << 20, on other: MoEShape? = nil)
            -> CUDAMoELayer.AlignPrefetch?
        {
            let layer = other ?? shape
            return CUDAMoELayer.alignPrefetch(
                plan: plan, shape: layer, routedExperts: layer.experts, pairs: pairs, elementBytes: 2,
                multiprocessors: 132, budget: budget)
        }
        let p = try #require(prefetch(persistent, pairs: 8192))
        #expect(p == CUDAMoELayer.AlignPrefetch(rows: 132 * 256, bytesPerRow: 640, pitch: 8192))
        #expect(p.bytes <= 24 << 20)
        // Spread: one spare program per 256 KiB, never all of the multiprocessors, at least one.
        #expect(CUDAMoELayer.alignPrefetchPrograms(p, multiprocessors: 132, perProgram: 256 << 10) == 83)
        #expect(CUDAMoELayer.alignPrefetchPrograms(p, multiprocessors: 132, perProgram: 64 << 10) == 130)
        #expect(CUDAMoELayer.alignPrefetchPrograms(p, multiprocessors: 132, perProgram: 1 << 30) == 1)
        // Two m-blocks per expert (144-token swap tiles at 256 rows per expert): half the distinct rows,
        // twice the bytes each.
        let swap = MoEPlan(both: .wgmma(blockM: 144, blockN: 256, stages: 4, swapAB: true))
        let fewer = try MoEShape(experts: 32, topK: 8, hidden: 4096, intermediate: 384)
        #expect(
            prefetch(swap, pairs: 32 * 256, on: fewer)
                == CUDAMoELayer.AlignPrefetch(rows: 132 * 128, bytesPerRow: 1408, pitch: 8192))
        // Only where align is one launch (at most 8192 pairs).
        #expect(prefetch(swap, pairs: 8193, on: fewer) == nil)
        // A budget past the whole first wave's rows stops at the row length.
        #expect(prefetch(persistent, pairs: 8192, budget: 1 << 30)?.bytesPerRow == 8192)
        // Fewer experts than the wave's rows: every row of w1 (E 2I), no more.
        let small = try MoEShape(experts: 8, topK: 2, hidden: 4096, intermediate: 128)
        #expect(prefetch(persistent, pairs: 4096, on: small)?.rows == 8 * 256)
        // A budget below one K tile per row: fewer rows, one K tile each.
        #expect(prefetch(persistent, pairs: 8192, budget: 1 << 20) == CUDAMoELayer.AlignPrefetch(rows: 8192, bytesPerRow: 128, pitch: 8192))
        // None: off, too few pairs for every expert to be touched, a split GEMM1, the pre-Hopper kernel.
        #expect(prefetch(persistent, pairs: 8192, budget: 0) == nil)
        #expect(prefetch(persistent, pairs: 4 * 128 - 1) == nil)
        #expect(prefetch(persistent, pairs: 4 * 128) != nil)
        var split = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4)
        split.splitK = 2
        split.splitMode = .atomic
        #expect(prefetch(MoEPlan(both: split), pairs: 8192) == nil)
        let mma = GemmConfig(blockM: 64, blockN: 64, blockK: 32, warpsM: 2, warpsN: 2, stages: 3)
        #expect(prefetch(MoEPlan(both: mma), pairs: 8192) == nil)
    }

    @Test func badInputsNameTheArgument() {
        #expect(throws: MoEError.invalidArgument("blockM", "must be >= 1, got 0")) {
            try Align.align(ids: [0], experts: 1, blockM: 0)
        }
        do {
            _ = try Align.align(ids: [0, 5], experts: 4, blockM: 4)
            Issue.record("id 5 of 4 experts accepted")
        } catch {
            guard case .invalidArgument(let name, _) = error else { Issue.record("\(error)"); return }
            #expect(name == "topk_ids")
        }
        #expect(throws: MoEError.self) { try Align.align(ids: [0], experts: 2, blockM: 4, expertMap: [0]) }
    }
}

@Suite struct TopKTests {
    @Test func picksLargestWithLowerIndexOnTies() throws {
        let logits = try HostTensor<Float>(shape: [2, 4], storage: [1, 3, 3, 0, 5, 5, 5, 5])
        let routing = try Router.softmaxTopK(logits: logits, topK: 2, renormalize: false)
        #expect(routing.ids == [1, 2, 0, 1])
        #expect(abs(routing.weights[2] - 0.25) < 1e-6)
    }

    @Test func renormalizedWeightsSumToOne() throws {
        var generator = SplitMix64(seed: 3)
        let logits = HostTensor<BFloat16>.random(shape: [16, 64], scale: 3, using: &generator)
        let routing = try Router.softmaxTopK(logits: logits, topK: 6, renormalize: true)
        for token in 0..<16 {
            let weights = routing.weights[(token * 6)..<(token * 6 + 6)]
            #expect(abs(weights.reduce(0, +) - 1) < 1e-5)
            #expect(Array(weights) == weights.sorted(by: >))
            #expect(Set(routing.ids[(token * 6)..<(token * 6 + 6)]).count == 6)
        }
    }

    @Test func badArgumentsAreErrors() throws {
        let logits = try HostTensor<Float>(shape: [1, 4], storage: [0, 1, 2, 3])
        #expect(throws: MoEError.self) { try Router.softmaxTopK(logits: logits, topK: 5, renormalize: false) }
        #expect(throws: MoEError.self) { try Router.softmaxTopK(logits: logits, topK: 0, renormalize: false) }
        let bad = try HostTensor<Float>(shape: [1, 2], storage: [0, .nan])
        #expect(throws: MoEError.self) { try Router.softmaxTopK(logits: bad, topK: 1, renormalize: false) }
        let empty = try HostTensor<Float>(shape: [0, 4], storage: [])
        #expect(try Router.softmaxTopK(logits: empty, topK: 2, renormalize: true).ids.isEmpty)
    }
}
