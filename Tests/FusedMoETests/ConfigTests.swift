import CUDA
import Testing
@testable import FusedMoE

@Suite struct ConfigTests {
    // An SGLang file as shipped (keys we do not know are ignored).
    let sglangFile = """
        {
            "1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 4},
            "64": {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16, "num_warps": 4, "num_stages": 3, "kpack": 2},
            "4096": {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 32, "num_warps": 8, "num_stages": 3,
                     "SPLIT_K": 2, "SPLIT_MODE": "atomic"}
        }
        """

    @Test func sglangFileLoadsAsIs() throws {
        let table = try ConfigTable.parse(sglangFile, source: "E=128,N=384,device_name=NVIDIA_H200.json")
        #expect(table.entries.map(\.batch) == [1, 64, 4096])
        let decode = table.nearest(to: 1).gemm1
        #expect(decode.blockM == 16 && decode.blockN == 64 && decode.blockK == 64)  // BLOCK_K 128 -> our 64
        #expect(decode.warps == 4 && decode.stages == 4 && decode.splitK == 1 && decode.splitMode == .none)
        let prefill = table.nearest(to: 5000).gemm1
        #expect(prefill.splitK == 2 && prefill.splitMode == .atomic && prefill.warps == 8 && prefill.groupSizeM == 32)
        #expect(table.nearest(to: 40).blockM == 32)  // 40 is nearer 64 than 1
        #expect(table.nearest(to: 32).blockM == 16 || table.nearest(to: 32).blockM == 32)
    }

    @Test func malformedFilesNameFileAndKey() {
        let cases: [(String, String)] = [
            (#"{"x": {}}"#, "'x'"),
            (#"{"8": {"BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64}}"#, "BLOCK_SIZE_M"),
            (#"{"8": {"BLOCK_SIZE_M": "big", "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64}}"#, "BLOCK_SIZE_M"),
            (#"{"8": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "SPLIT_MODE": "fast"}}"#, "SPLIT_MODE"),
            (#"{}"#, "no batch sizes"),
            (#"[1]"#, "object"),
        ]
        for (text, expected) in cases {
            do {
                _ = try ConfigTable.parse(text, source: "cfg.json")
                Issue.record("\(text) parsed")
            } catch {
                guard case .malformedFile(let file, let message) = error else { Issue.record("\(error)"); continue }
                #expect(file == "cfg.json")
                #expect(message.contains(expected), "\(message)")
            }
        }
    }

    @Test func tablesRoundTripWithSecondGemm() throws {
        var second = GemmConfig(blockM: 64, blockN: 256, blockK: 64, warpsM: 2, warpsN: 4, stages: 3, groupSizeM: 8)
        second.splitK = 4
        second.splitMode = .atomic
        let first = GemmConfig(blockM: 64, blockN: 128, blockK: 32, warpsM: 4, warpsN: 1, stages: 5, groupSizeM: 1)
        let persistent = MoEPlan(both: .wgmma(blockM: 128, blockN: 256, stages: 4, groupSizeM: 8, persistent: true))
        let swap = MoEPlan(
            gemm1: .wgmma(blockM: 16, blockN: 64, stages: 8, swapAB: true), gemm2: .wgmma(blockM: 16, blockN: 128, stages: 4, swapAB: true))
        let table = ConfigTable(source: "t", entries: [
            (8, MoEPlan(both: first)), (512, MoEPlan(gemm1: first, gemm2: second)), (1, swap), (8192, persistent),
        ])
        let parsed = try ConfigTable.parse(table.json.serialized(indent: 1), source: "t")
        #expect(parsed.entries.map(\.batch) == [1, 8, 512, 8192])
        #expect(parsed.nearest(to: 1) == swap)
        #expect(parsed.nearest(to: 9000) == persistent)
        #expect(parsed.nearest(to: 8) == MoEPlan(both: first))
        #expect(parsed.nearest(to: 600) == MoEPlan(gemm1: first, gemm2: second))
    }

    /// FUSED_MOE_KERNEL_DEFINES: NAME=VALUE words become -D options; anything else is refused by name.
    @Test func experimentDefinesParse() throws {
        #expect(try KernelLibrary.experimentDefines("") == [])
        #expect(try KernelLibrary.experimentDefines(" MOE_SM90_EARLY_SCHEDULE=0  MOE_X_2=abc_1 ")
            == ["-DMOE_SM90_EARLY_SCHEDULE=0", "-DMOE_X_2=abc_1"])
        for bad in ["MOE_A", "MOE_A=", "moe_a=1", "OTHER=1", "MOE_A=1;rm", "MOE_A=$(x)"] {
            #expect(throws: CUDAError.self) { try KernelLibrary.experimentDefines(bad) }
        }
    }

    @Test func fileNameFollowsSGLang() {
        #expect(ConfigTable.fileName(experts: 128, n: 384, deviceName: "NVIDIA H200", dtype: nil) == "E=128,N=384,device_name=NVIDIA_H200.json")
    }

    @Test func configValidation() {
        let good = GemmConfig(blockM: 64, blockN: 128, blockK: 64, warpsM: 2, warpsN: 4, stages: 3)
        #expect(throws: Never.self) { try good.validate(sharedMemoryLimit: 227 * 1024) }
        #expect(good.sharedMemoryBytes == 3 * (64 + 128) * 72 * 2)
        var tooDeep = good
        tooDeep.stages = 5
        tooDeep.blockN = 256
        tooDeep.blockM = 128
        #expect(throws: MoEError.self) { try tooDeep.validate(sharedMemoryLimit: 100 * 1024) }
        var badSplit = good
        badSplit.splitK = 4
        #expect(throws: MoEError.self) { try badSplit.validate(sharedMemoryLimit: 227 * 1024) }
        badSplit.splitMode = .atomic
        #expect(throws: Never.self) { try badSplit.validate(sharedMemoryLimit: 227 * 1024) }
        badSplit.splitK = 3
        #expect(throws: MoEError.self) { try badSplit.validate(sharedMemoryLimit: 227 * 1024) }
        #expect(GemmConfig.warpLayout(blockM: 16, blockN: 64, warps: 4)! == (1, 4))
        #expect(GemmConfig.warpLayout(blockM: 128, blockN: 128, warps: 8)! == (4, 2))
    }

    /// The ping-pong kernel: a warpgroup's whole tile in registers, so BLOCK_M 128 and BLOCK_N 64 or
    /// 128 only; the persistent kernel's threads, shared memory and grid; its own template argument.
    @Test func pingpongConfig() throws {
        let limit = 227 * 1024
        let pingpong = GemmConfig.wgmma(blockM: 128, blockN: 128, stages: 6, pingpong: true)
        #expect(pingpong.kernel == .wgmmaPingpong && pingpong.kernel.isPersistent && pingpong.kernel.needsHopper)
        #expect(throws: Never.self) { try pingpong.validate(sharedMemoryLimit: limit) }
        let persistent = GemmConfig.wgmma(blockM: 128, blockN: 128, stages: 6, persistent: true)
        #expect(pingpong.threads == 384 && pingpong.sharedMemoryBytes == persistent.sharedMemoryBytes)
        #expect(pingpong.nameExpression(dtype: .bf16, mulRoutedWeight: true)
            == "moe_gemm_sm90_persistent<moe_bf16, 128, 128, 6, 0, true, 0, true>")
        #expect(persistent.nameExpression(dtype: .fp16, mulRoutedWeight: false, fusedActivation: 1)
            == "moe_gemm_sm90_persistent<moe_fp16, 128, 128, 6, 0, false, 1, false>")
        for (blockM, blockN) in [(64, 128), (128, 256)] {
            let bad = GemmConfig.wgmma(blockM: blockM, blockN: blockN, stages: 3, pingpong: true)
            #expect(throws: MoEError.self) { try bad.validate(sharedMemoryLimit: limit) }
        }
        var clustered = pingpong
        clustered.clusterM = 2
        #expect(throws: MoEError.self) { try clustered.validate(sharedMemoryLimit: limit) }
        var tooDeep = pingpong
        tooDeep.stages = 7
        #expect(throws: MoEError.self) { try tooDeep.validate(sharedMemoryLimit: limit) }
        // 64 stored columns at least for the fused activation.
        #expect(pingpong.fusesActivation)
        #expect(!GemmConfig.wgmma(blockM: 128, blockN: 64, stages: 8, pingpong: true).fusesActivation)
        // A table entry names it as KERNEL wgmma_pingpong.
        #expect(GemmKernel(rawValue: "wgmma_pingpong") == .wgmmaPingpong)
    }

    /// The stream-K kernel: the persistent kernel's tiles, threads and shared memory, its own template
    /// argument (mode 0 always), SPLIT_K 1 only, a table name, and the tuner's neighbours both ways.
    @Test func streamKConfig() throws {
        let limit = 227 * 1024
        let stream = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, streamK: true)
        #expect(stream.kernel == .wgmmaStreamK && stream.kernel.isPersistent && stream.kernel.needsHopper)
        #expect(throws: Never.self) { try stream.validate(sharedMemoryLimit: limit) }
        let persistent = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true)
        #expect(stream.threads == 384 && stream.sharedMemoryBytes == persistent.sharedMemoryBytes)
        #expect(stream.nameExpression(dtype: .bf16, mulRoutedWeight: true)
            == "moe_gemm_sm90_persistent<moe_bf16, 128, 256, 4, 0, true, 0, false, true>")
        #expect(stream.nameExpression(dtype: .fp16, mulRoutedWeight: false, fusedActivation: 1)
            == "moe_gemm_sm90_persistent<moe_fp16, 128, 256, 4, 0, false, 1, false, true>")
        var split = stream
        split.splitK = 2
        split.splitMode = .workspace
        #expect(throws: MoEError.self) { try split.validate(sharedMemoryLimit: limit) }
        var clustered = stream
        clustered.clusterM = 2
        #expect(throws: MoEError.self) { try clustered.validate(sharedMemoryLimit: limit) }
        #expect(throws: MoEError.self) { try GemmConfig.wgmma(blockM: 32, blockN: 256, stages: 4, streamK: true).validate(sharedMemoryLimit: limit) }
        #expect(stream.fusesActivation && MoEPlan(both: stream).activationIsFused)
        #expect(GemmKernel(rawValue: "wgmma_streamk") == .wgmmaStreamK)
        #expect(Tuner.neighbors(of: persistent, sharedMemoryLimit: limit).contains { $0.kernel == .wgmmaStreamK && $0.blockN == 256 })
        let around = Tuner.neighbors(of: stream, sharedMemoryLimit: limit)
        #expect(around.contains { $0.kernel == .wgmmaPersistent && $0.blockN == 256 && $0.stages == 4 })
        #expect(around.contains { $0.kernel == .wgmmaStreamK && $0.blockN == 128 })
        #expect(around.allSatisfy { $0.splitK == 1 })
    }

    @Test func hopperHeuristicIsValidEverywhere() throws {
        for preset in ShapePreset.all {
            for tokens in ShapePreset.batchSizes + [0, 3, 65536] {
                let plan = PlanSelector.hopperHeuristic(shape: preset.shape, tokens: tokens)
                #expect(throws: Never.self) { try plan.gemm1.validate(sharedMemoryLimit: 227 * 1024) }
                #expect(throws: Never.self) { try plan.gemm2.validate(sharedMemoryLimit: 227 * 1024) }
                #expect(plan.gemm1.kernel.needsHopper && plan.gemm2.kernel.needsHopper)
            }
        }
        // Wide token tiles where the rows per expert fit them (NOTES v18): both GEMMs with Mixtral's
        // long GEMM2 K, GEMM1 only on the 128-expert shapes (GEMM2 on its own 128-row align).
        let mixtral = try ShapePreset.named("mixtral_tp2").shape
        #expect(PlanSelector.hopperHeuristic(shape: mixtral, tokens: 512) == MoEPlan(both: .wgmma(blockM: 160, blockN: 256, stages: 4, swapAB: true)))
        // Two or more blocks per expert: the blocks of one expert grouped (NOTES v23); at two, GEMM1 in units
        // and both GEMMs at whole widths (NOTES v42).
        var twoBlocks = MoEPlan(both: .wgmma(blockM: 144, blockN: 256, stages: 4, groupSizeM: 4, swapAB: true))
        twoBlocks.gemm1.unit = 7
        twoBlocks.gemm1.fitRows = false
        twoBlocks.gemm2.fitRows = false
        #expect(PlanSelector.hopperHeuristic(shape: mixtral, tokens: 1024) == twoBlocks)
        #expect(PlanSelector.hopperHeuristic(shape: mixtral, tokens: 256).gemm2.blockM == 80)
        // 16 to 32 rows of a long intermediate size: the wide kernel's 64-row tiles (NOTES v40), below
        // 16 the 32-token swap-AB tile.
        #expect(PlanSelector.hopperHeuristic(shape: mixtral, tokens: 96) == MoEPlan(both: .wgmma(blockM: 64, blockN: 256, stages: 4)))
        #expect(PlanSelector.hopperHeuristic(shape: mixtral, tokens: 48).gemm1.kernel == .wgmmaSwap)
        let seed2048 = PlanSelector.hopperHeuristic(shape: try ShapePreset.named("seed4096").shape, tokens: 2048)
        #expect(seed2048.gemm1.kernel == .wgmmaSwap && seed2048.gemm1.blockM == 160)
        #expect(seed2048.gemm2.kernel == .wgmmaPersistent && seed2048.alignBlockMs == [160, 128])
        // Above 320 rows per expert too, for the long intermediate (NOTES v24): 512 rows on 192 g6.
        #expect(PlanSelector.hopperHeuristic(shape: mixtral, tokens: 2048) == MoEPlan(both: .wgmma(blockM: 192, blockN: 256, stages: 4, groupSizeM: 6, swapAB: true)))
        #expect(PlanSelector.hopperHeuristic(shape: mixtral, tokens: 4096).gemm1.blockM == 176)
        let decode = PlanSelector.hopperHeuristic(shape: try ShapePreset.named("seed4096").shape, tokens: 1)
        #expect(decode.gemm1.kernel == .wgmmaSwap)
        // A short intermediate size from 64 to 100 rows: the persistent kernel, as the tables have it
        // (NOTES v37): seed 1024, dsv3 2048. Above 320 rows GEMM1 on the wide token tile (seed 8192).
        let persistent = MoEPlan(both: .wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true))
        let seed8192 = PlanSelector.hopperHeuristic(shape: try ShapePreset.named("seed4096").shape, tokens: 8192)
        #expect(seed8192.gemm1 == .wgmma(blockM: 192, blockN: 256, stages: 4, swapAB: true) && seed8192.gemm2 == persistent.gemm2)
        #expect(PlanSelector.hopperHeuristic(shape: try ShapePreset.named("seed4096").shape, tokens: 1024) == persistent)
        #expect(PlanSelector.hopperHeuristic(shape: try ShapePreset.named("dsv3_tp4").shape, tokens: 2048) == persistent)
        // 32 to 64 rows: GEMM1 on the 64-token swap-AB tile, GEMM2 persistent (short K); the wide
        // kernel for Mixtral's long K (128 tokens: 32 rows).
        #expect(
            PlanSelector.hopperHeuristic(shape: try ShapePreset.named("dsv3_tp4").shape, tokens: 1024)
                == MoEPlan(
                    gemm1: .wgmma(blockM: 64, blockN: 256, stages: 5, swapAB: true),
                    gemm2: .wgmma(blockM: 64, blockN: 256, stages: 4, persistent: true)))
        #expect(PlanSelector.hopperHeuristic(shape: mixtral, tokens: 128) == MoEPlan(both: .wgmma(blockM: 64, blockN: 256, stages: 4)))
        // Decode: GEMM2 on 64-row weight tiles (a deep ring) when 128-row ones leave SMs idle: Mixtral
        // M = 1 touches 2 experts, 2 x 32 n-blocks of 128 rows.
        #expect(PlanSelector.hopperHeuristic(shape: mixtral, tokens: 1).gemm2 == .wgmma(blockM: 16, blockN: 64, stages: 8, swapAB: true))
        #expect(PlanSelector.hopperHeuristic(shape: mixtral, tokens: 8).gemm2 == .wgmma(blockM: 16, blockN: 128, stages: 8, swapAB: true))
        // 8 experts x 32 n-blocks fill them (seed4096 M = 1; short K: a 4-stage ring).
        #expect(
            PlanSelector.hopperHeuristic(shape: try ShapePreset.named("seed4096").shape, tokens: 1).gemm2
                == .wgmma(blockM: 16, blockN: 128, stages: 4, swapAB: true))
        // Decode GEMM1 with too few programs for the SMs: its K split in workspace mode until each
        // has one (Kimi-K2 tp 8: 8 experts x 8 n-blocks; Qwen3-Coder-480B tp 8: 8 x 10); none where
        // two thirds have one (seed4096: 8 x 12, dsv3: 8 x 16).
        let kimi = try MoEShape(experts: 384, topK: 8, hidden: 7168, intermediate: 256)
        let coder = try MoEShape(experts: 160, topK: 8, hidden: 6144, intermediate: 320)
        #expect(PlanSelector.hopperHeuristic(shape: kimi, tokens: 1).gemm1.splitK == 4)
        #expect(PlanSelector.hopperHeuristic(shape: kimi, tokens: 1).gemm1.splitMode == .workspace)
        #expect(PlanSelector.hopperHeuristic(shape: coder, tokens: 1).gemm1.splitK == 2)
        #expect(PlanSelector.hopperHeuristic(shape: try ShapePreset.named("seed4096").shape, tokens: 1).gemm1.splitK == 1)
        #expect(PlanSelector.hopperHeuristic(shape: try ShapePreset.named("dsv3_tp4").shape, tokens: 1).gemm1.splitK == 1)
        #expect(PlanSelector.hopperHeuristic(shape: kimi, tokens: 8).gemm1.splitK == 1)
        // 12 to 32 rows with a long H (GEMM1's K): 256-row weight tiles, a deep ring (dsv3 512).
        #expect(
            PlanSelector.hopperHeuristic(shape: try ShapePreset.named("dsv3_tp4").shape, tokens: 512).gemm1
                == .wgmma(blockM: 32, blockN: 256, stages: 6, swapAB: true))
    }

    /// Shapes without a table (any model's) get a plan the kernels take: every tile validates, a split
    /// is only decode's GEMM1 in workspace mode, and the SM count moves only that split and the tiles.
    @Test func hopperHeuristicIsValidOnAnyShape() throws {
        for experts in [1, 2, 3, 8, 60, 64, 128, 160, 256, 384, 512] {
            for topK in [1, 2, 4, 6, 8] where topK <= experts {
                for hidden in [256, 2048, 2880, 6144, 7168] {
                    for intermediate in [8, 88, 256, 320, 1408, 2048, 2880] {
                        let shape = try MoEShape(experts: experts, topK: topK, hidden: hidden, intermediate: intermediate)
                        for tokens in [1, 2, 7, 33, 128, 1000, 4096, 65536] {
                            for multiprocessors in [78, 132] {
                                let plan = PlanSelector.hopperHeuristic(shape: shape, tokens: tokens, multiprocessors: multiprocessors)
                                for config in [plan.gemm1, plan.gemm2] {
                                    #expect(throws: Never.self) { try config.validate(sharedMemoryLimit: 227 * 1024) }
                                    #expect(config.kernel.needsHopper)
                                }
                                #expect(plan.gemm2.splitK == 1)
                                if plan.gemm1.splitK > 1 {
                                    #expect(plan.gemm1.splitMode == .workspace && plan.gemm1.kernel == .wgmmaSwap)
                                    #expect(plan.gemm1.blockM == 16)
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The bench says where a shape's plans come from: a shipped table, or the heuristic with the
    /// table name it looked for.
    @Test func planSourceNamesTheTableOrTheHeuristic() throws {
        guard PlanSelector.configDirectory == nil else { return }  // FUSED_MOE_CONFIG_DIR set: another answer
        let seed = try ShapePreset.named("seed4096").shape
        let kimi = try MoEShape(experts: 384, topK: 8, hidden: 7168, intermediate: 256)
        #expect(
            PlanSelector.planSource(shape: seed, deviceName: "NVIDIA H200", architecture: "sm_90a")
                == "shipped table E=128,N=384,device_name=NVIDIA_H200.json, the Hopper heuristic between its batch sizes")
        #expect(
            PlanSelector.planSource(shape: kimi, deviceName: "NVIDIA H200", architecture: "sm_90a")
                == "the Hopper heuristic (no table named E=384,N=256,device_name=NVIDIA_H200.json)")
        #expect(
            PlanSelector.planSource(shape: seed, deviceName: "NVIDIA H200", architecture: "sm_90a", tables: false)
                == "the Hopper heuristic (tables off)")
        #expect(
            PlanSelector.planSource(shape: seed, deviceName: "NVIDIA H200", architecture: "sm_80").hasSuffix(
                "(entries naming wgmma kernels fall back to the heuristic here)"))
    }

    /// An entry serves batches within 1/16 of its batch size whose rows its tiles cut into as many
    /// blocks as at its own; other batches take the heuristic's plan (NOTES v40: the nearest entry ran
    /// Mixtral 384 and 640 tokens 35% and 31% slower than the heuristic).
    @Test func entriesServeOnlyNearTheirBatchSize() throws {
        guard PlanSelector.configDirectory == nil else { return }  // FUSED_MOE_CONFIG_DIR set: another answer
        let mixtral = try ShapePreset.named("mixtral_tp2").shape  // E = 8, k = 2
        let table = try #require(try PlanSelector.configFile(shape: mixtral, deviceName: "NVIDIA H200"))
        func plan(_ tokens: Int) throws -> MoEPlan {
            try PlanSelector.plan(
                shape: mixtral, tokens: tokens, multiprocessors: 132, sharedMemoryLimit: 227 * 1024,
                deviceName: "NVIDIA H200", architecture: "sm_90a")
        }
        // At and near a key, the entry (the 512 entry's 144-token tiles: 128 + 11.3 rows in one block;
        // 124 + 11.1 at 496 tokens).
        #expect(try plan(512) == table.nearest(to: 512))
        // Its GEMM1 walks units of 4 n-blocks (NOTES v40), as does the 384 entry's. Both of its GEMMs run whole
        // widths, so a short second block of an expert keeps its first block's pace (NOTES v43); the 384 entry's
        // fit (96 + 9.8 rows in a 128-token block: no second block to pace).
        #expect(try plan(512).gemm1.unit == 4 && plan(384).gemm1.unit == 4 && plan(512).gemm2.unit == 1)
        #expect(try !plan(512).gemm1.fitRows && !plan(512).gemm2.fitRows)
        #expect(try plan(384).gemm1.fitRows && plan(384).gemm2.fitRows)
        #expect(try plan(496) == table.nearest(to: 512))
        #expect(table.entry(serving: 1000, shape: mixtral) == table.nearest(to: 1024))
        // 544 tokens are within 1/16 of 512, but 136 + 11.7 rows need two 144-token blocks.
        #expect(table.entry(serving: 544, shape: mixtral) == nil)
        #expect(try plan(544) == PlanSelector.hopperHeuristic(shape: mixtral, tokens: 544))
        // Between keys, the heuristic.
        for tokens in [2, 7, 20, 64, 96, 448, 640, 768, 1536, 3072, 6144] {
            #expect(table.entry(serving: tokens, shape: mixtral) == nil, "\(tokens) tokens")
            #expect(try plan(tokens) == PlanSelector.hopperHeuristic(shape: mixtral, tokens: tokens), "\(tokens) tokens")
        }
        #expect(ConfigTable.blocksPerExpert(shape: mixtral, tokens: 512, blockM: 144) == 1)
        #expect(ConfigTable.blocksPerExpert(shape: mixtral, tokens: 544, blockM: 144) == 2)
        #expect(ConfigTable.blocksPerExpert(shape: mixtral, tokens: 1, blockM: 16) == 1)
    }

    /// The runs of batch sizes with one plan (the C ABI's buckets): contiguous from 1 to the maximum,
    /// neighbours differ, and every batch size in a run gets that run's plan from `plan`, so the C ABI
    /// runs at each batch the plan bench times there (at 600 tokens Mixtral's 176-token tiles, not the
    /// 1024 entry's, which the old power-of-two bucket gave it: +25%, NOTES v41).
    @Test func planRunsGiveEachBatchItsOwnPlan() throws {
        guard PlanSelector.configDirectory == nil else { return }  // FUSED_MOE_CONFIG_DIR set: another answer
        for name in ["mixtral_tp2", "seed4096", "dsv3_tp4"] {
            let shape = try ShapePreset.named(name).shape
            for (architecture, tables) in [("sm_90a", true), ("sm_90a", false), ("sm_80", true)] {
                func plan(_ tokens: Int) throws -> MoEPlan {
                    try PlanSelector.plan(
                        shape: shape, tokens: tokens, multiprocessors: 132, sharedMemoryLimit: 227 * 1024,
                        deviceName: "NVIDIA H200", architecture: architecture, tables: tables)
                }
                let runs = try PlanSelector.planRuns(
                    shape: shape, maxTokens: 3000, multiprocessors: 132, sharedMemoryLimit: 227 * 1024,
                    deviceName: "NVIDIA H200", architecture: architecture, tables: tables)
                #expect(runs.last?.upTo == 3000)
                var lower = 1
                for (index, run) in runs.enumerated() {
                    #expect(run.upTo >= lower)
                    if index > 0 { #expect(run.plan != runs[index - 1].plan, "\(name) \(architecture) at \(lower)") }
                    // Both ends and the middle of the run.
                    for tokens in Set([lower, (lower + run.upTo) / 2, run.upTo]) {
                        #expect(try plan(tokens) == run.plan, "\(name) \(architecture) tables \(tables) at \(tokens)")
                    }
                    lower = run.upTo + 1
                }
            }
        }
        let mixtral = try ShapePreset.named("mixtral_tp2").shape
        let runs = try PlanSelector.planRuns(
            shape: mixtral, maxTokens: 1024, multiprocessors: 132, sharedMemoryLimit: 227 * 1024,
            deviceName: "NVIDIA H200", architecture: "sm_90a")
        let at600 = try #require(runs.first { $0.upTo >= 600 })
        #expect(at600.plan.gemm1.blockM == 176 && at600.plan == PlanSelector.hopperHeuristic(shape: mixtral, tokens: 600))
        #expect(at600.plan != runs.last?.plan)
        #expect(try PlanSelector.planRuns(
            shape: mixtral, maxTokens: 1, multiprocessors: 132, sharedMemoryLimit: 227 * 1024,
            deviceName: "NVIDIA H200", architecture: "sm_90a").count == 1)
        // Past exactUpTo, steps of 1/64: the runs still end at the maximum, each run's plan is the plan
        // of its largest batch, and their count stays small at the C ABI's largest max_tokens (2^24).
        let stepped = try PlanSelector.planRuns(
            shape: mixtral, maxTokens: 1 << 24, multiprocessors: 132, sharedMemoryLimit: 227 * 1024,
            deviceName: "NVIDIA H200", architecture: "sm_90a", exactUpTo: 2048)
        #expect(stepped.last?.upTo == 1 << 24)
        #expect(stepped.count < 400)
        for run in stepped where run.upTo > 2048 {
            #expect(try PlanSelector.plan(
                shape: mixtral, tokens: run.upTo, multiprocessors: 132, sharedMemoryLimit: 227 * 1024,
                deviceName: "NVIDIA H200", architecture: "sm_90a") == run.plan)
        }
        let exact = try PlanSelector.planRuns(
            shape: mixtral, maxTokens: 2048, multiprocessors: 132, sharedMemoryLimit: 227 * 1024,
            deviceName: "NVIDIA H200", architecture: "sm_90a")
        #expect(Array(stepped.prefix(exact.count - 1)).map(\.upTo) == Array(exact.dropLast()).map(\.upTo))
    }

    /// `tables: false` gives the heuristic even where a table is shipped (`bench --heuristic`).
    @Test func planWithoutTablesIsTheHeuristic() throws {
        let shape = try ShapePreset.named("qwen235_tp2").shape
        func plan(_ tables: Bool) throws -> MoEPlan {
            try PlanSelector.plan(
                shape: shape, tokens: 256, multiprocessors: 132, sharedMemoryLimit: 227 * 1024, deviceName: "NVIDIA H200",
                architecture: "sm_90a", tables: tables)
        }
        #expect(try plan(false) == PlanSelector.hopperHeuristic(shape: shape, tokens: 256))
        // The shipped table's entry at 256 tokens differs from the heuristic (64-row weight tiles).
        #expect(try plan(true) != plan(false))
    }

    /// The heuristic's GEMM1 units: one wave of programs where one 128- or 144-token block holds each
    /// expert's rows on a long intermediate size (Mixtral 409-481 tokens, between the 384 and 512 entries,
    /// which walk units of 4 too), or two blocks of 112-176 tokens, which then run at whole widths on both
    /// GEMMs (Mixtral 720-1300, NOTES v42); none on other tiles, with three blocks per expert, or where one
    /// wave needs more than 8 n-blocks per program.
    @Test func heuristicUnitsOnlyWhereOneBlockMakesOneWave() throws {
        let mixtral = try ShapePreset.named("mixtral_tp2").shape
        let cases = [(300, 1), (420, 4), (450, 4), (481, 4), (600, 1), (700, 1), (768, 7), (900, 7), (1024, 7), (1200, 7),
                     (1400, 1), (2048, 1)]
        for (tokens, unit) in cases {
            let plan = PlanSelector.hopperHeuristic(shape: mixtral, tokens: tokens)
            #expect(plan.gemm1.unit == unit, "\(tokens) tokens: \(plan)")
            #expect(plan.gemm2.unit == 1)
            // Whole widths exactly where two blocks per expert walk units.
            let twoBlocks = ConfigTable.blocksPerExpert(shape: mixtral, tokens: tokens, blockM: plan.gemm1.blockM) == 2
            #expect(plan.gemm1.fitRows == !(unit > 1 && twoBlocks), "\(tokens) tokens: \(plan)")
            #expect(plan.gemm2.fitRows == plan.gemm1.fitRows)
            try plan.gemm1.validate(sharedMemoryLimit: 227 * 1024)
            try plan.gemm2.validate(sharedMemoryLimit: 227 * 1024)
        }
        // Two 144-token blocks per expert at 1024 tokens: 16 m-blocks x 56 n-blocks, 7 per program (128 programs).
        #expect(PlanSelector.gemm1Unit(shape: mixtral, tokens: 1024, width: 144, multiprocessors: 132) == 7)
        // On 192 tokens, two blocks walk no units (1400 tokens: +7% at whole widths).
        #expect(PlanSelector.gemm1Unit(shape: mixtral, tokens: 1400, width: 192, multiprocessors: 132) == 1)
        // 56 n-blocks x 8 experts on 132 SMs: 4 per program; on 64 SMs, 7.
        #expect(PlanSelector.gemm1Unit(shape: mixtral, tokens: 450, width: 144, multiprocessors: 64) == 7)
        // Mixtral at tp 1 (2I = 28672: 112 n-blocks): 7 per program for one wave of 128.
        let wide = try MoEShape(experts: 8, topK: 2, hidden: 4096, intermediate: 14336)
        #expect(PlanSelector.gemm1Unit(shape: wide, tokens: 450, width: 144, multiprocessors: 132) == 7)
        // Over 8 per program (a small GPU): none.
        #expect(PlanSelector.gemm1Unit(shape: wide, tokens: 450, width: 144, multiprocessors: 32) == 1)
        // Not on the short intermediate sizes' swap tiles (their GEMM1 at 1024-2048 tokens).
        for name in ["seed4096", "qwen235_tp2", "dsv3_tp4"] {
            let shape = try ShapePreset.named(name).shape
            for tokens in [1024, 1536, 2048, 4096] {
                #expect(PlanSelector.hopperHeuristic(shape: shape, tokens: tokens).gemm1.unit == 1, "\(name) \(tokens)")
            }
        }
    }

    /// The wide token tile's width: the mean plus two standard deviations of an expert's rows (one
    /// from 320 rows) in the blocks of at most 192 that the mean plus one deviation needs, the
    /// narrowest kernel width that holds one, else 192; none below 64 rows.
    @Test func swapTokenWidthFitsTheRows() {
        #expect(PlanSelector.swapTokenWidth(rowsPerExpert: 64) == 80)    // 80 rows in one block
        #expect(PlanSelector.swapTokenWidth(rowsPerExpert: 128) == 160)  // 150.6 rows in one block
        #expect(PlanSelector.swapTokenWidth(rowsPerExpert: 256) == 144)  // 288 rows in two blocks
        #expect(PlanSelector.swapTokenWidth(rowsPerExpert: 32) == nil)
        // One standard deviation above 320 rows.
        #expect(PlanSelector.swapTokenWidth(rowsPerExpert: 512) == 192)   // 534.6 in three
        #expect(PlanSelector.swapTokenWidth(rowsPerExpert: 1024) == 176)  // 1056 in six
        #expect(PlanSelector.swapTokenWidth(rowsPerExpert: 2048) == 192)  // 2093.3 in eleven
        // The blocks from one deviation: 170.7 + 13.1 rows fit one block, so the widest one holds it
        // (two deviations would have asked for two blocks of 112: Kimi-K2 tp 8 at 8192 tokens).
        #expect(PlanSelector.swapTokenWidth(rowsPerExpert: 8192.0 * 8 / 384) == 192)
        #expect(PlanSelector.swapTokenWidth(rowsPerExpert: 185) == 112)  // 198.6 in two
        #expect(GemmConfig.deepestSwapRing(tokens: 80, blockN: 256) == 5)
        #expect(GemmConfig.deepestSwapRing(tokens: 160, blockN: 256) == 4)
        #expect(GemmConfig.deepestSwapRing(tokens: 8, blockN: 64) == 8)
    }

    /// GROUP_SIZE_M: for mma (Triton's swizzle) one expert's average m-blocks, 1...8; for the
    /// wgmma kernels (groups cut at expert boundaries) 1 while an expert's GEMM1 tiles fit in one
    /// wave, else twice the average run, up to 32, so an expert that routing favours still has its
    /// whole run in one group; the tuner's wgmma candidates take it.
    @Test func groupSizeFollowsTheRowsPerExpert() throws {
        let mixtral = try ShapePreset.named("mixtral_tp2").shape  // E = 8, k = 2
        #expect(PlanSelector.groupSizeM(shape: mixtral, tokens: 2048, blockM: 128) == 4)
        #expect(PlanSelector.groupSizeM(shape: mixtral, tokens: 1, blockM: 128) == 1)
        #expect(PlanSelector.groupSizeM(shape: mixtral, tokens: 65536, blockM: 128) == 8)
        #expect(PlanSelector.groupSizeM(shape: mixtral, tokens: 2048, blockM: 128, kernel: .wgmma) == 8)
        #expect(PlanSelector.groupSizeM(shape: mixtral, tokens: 1, blockM: 128, kernel: .wgmma) == 1)
        let seed = try ShapePreset.named("seed4096").shape  // E = 128, 2I = 768: 3 n-blocks
        #expect(PlanSelector.groupSizeM(shape: seed, tokens: 8192, blockM: 128, kernel: .wgmma) == 1)
        #expect(PlanSelector.groupSizeM(shape: mixtral, tokens: 65536, blockM: 128, kernel: .wgmmaPersistent) == 32)
        #expect(PlanSelector.hopperHeuristic(shape: mixtral, tokens: 2048).gemm1.groupSizeM == 6)
    }

    /// Unsplit plans on every kernel can apply the activation in GEMM1's epilogue (the persistent
    /// kernel from 128 columns); the name expressions carry it.
    @Test func fusionFollowsTheKernelAndSplit() throws {
        let plan = MoEPlan(both: .wgmma(blockM: 64, blockN: 256, stages: 4))
        #expect(plan.activationIsFused && plan.identityRouting)
        #expect(!GemmConfig.wgmma(blockM: 128, blockN: 64, stages: 8, persistent: true).fusesActivation)
        let name = MoEPlan(both: .wgmma(blockM: 16, blockN: 64, stages: 8, swapAB: true)).gemm1
            .nameExpression(dtype: .bf16, mulRoutedWeight: false, fusedActivation: 1)
        #expect(name == "moe_gemm_sm90_swap<moe_bf16, 64, 16, 8, 0, false, 1>")
    }

    /// The selected plan applies the activation in GEMM1 wherever the kernel can (every kernel of the
    /// tables measured faster so, NOTES v29), or in a split GEMM1's reduction.
    @Test func selectedPlansFuseTheActivation() throws {
        let seed = try ShapePreset.named("seed4096").shape
        func plan(_ tokens: Int) throws -> MoEPlan {
            try PlanSelector.plan(
                shape: seed, tokens: tokens, multiprocessors: 132, sharedMemoryLimit: 227 * 1024, deviceName: "NVIDIA H200",
                architecture: "sm_90a")
        }
        let decode = try plan(8)
        #expect(decode.gemm1.kernel == .wgmmaSwap && decode.activationIsFused)
        // The 1024 entry: GEMM1 on the 96-token swap-AB tile (NOTES v39), GEMM2 persistent.
        let prefill = try plan(1024)
        #expect(prefill.gemm1.kernel == .wgmmaSwap && prefill.gemm1.blockM == 96 && prefill.activationIsFused)
        #expect(prefill.gemm2.kernel == .wgmmaPersistent)
        // The heuristic's persistent GEMM1 at 1024 fuses it too.
        #expect(PlanSelector.hopperHeuristic(shape: seed, tokens: 1024).activationIsFused)
        // A wide token tile (the shipped 4096 entry's GEMM1) fuses it like the decode tiles.
        let wide = try plan(4096)
        #expect(wide.gemm1.kernel == .wgmmaSwap && wide.gemm1.blockM == 144 && wide.activationIsFused)
        // The heuristic's persistent 128 x 256 tile too; a split GEMM1 applies it in its reduction.
        #expect(PlanSelector.hopperHeuristic(shape: seed, tokens: 20000).activationIsFused)
        var split = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4)
        split.splitK = 2
        split.splitMode = .workspace
        #expect(MoEPlan(both: split).activationIsFused)
        // A persistent tile of 64 columns cannot: it keeps the separate pass.
        #expect(!MoEPlan(both: GemmConfig.wgmma(blockM: 128, blockN: 64, stages: 8, persistent: true)).activationIsFused)
    }

    @Test func shippedTablesLoadAndFallBackOffHopper() throws {
        #expect(ShippedConfigs.names.count >= 4)
        for name in ShippedConfigs.names {
            let table = try #require(try ShippedConfigs.table(named: name))
            #expect(!table.entries.isEmpty)
        }
        let seed = try ShapePreset.named("seed4096").shape
        let hopper = try PlanSelector.plan(
            shape: seed, tokens: 8192, multiprocessors: 132, sharedMemoryLimit: 227 * 1024, deviceName: "NVIDIA H200",
            architecture: "sm_90a")
        #expect(hopper.gemm1.kernel.needsHopper, "the shipped H200 table names a wgmma kernel at M = 8192")
        // The same GPU name on a build that is not sm_90a must not get wgmma plans.
        let other = try PlanSelector.plan(
            shape: seed, tokens: 8192, multiprocessors: 132, sharedMemoryLimit: 227 * 1024, deviceName: "NVIDIA H200",
            architecture: "sm_80")
        #expect(other.gemm1.kernel == .mma && other.gemm2.kernel == .mma)
    }

    @Test func rooflineBoundGrowsWithRereadsAndPartials() throws {
        let seed = try ShapePreset.named("seed4096").shape
        func bound(_ config: GemmConfig, tokens: Int) -> Double {
            Tuner.lowerBoundMilliseconds(
                config, n: 768, k: 4096, shape: seed, tokens: tokens, expertsTouched: 128, dtype: .bf16, bandwidth: 4e12)
        }
        let wide = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4)
        let narrow = GemmConfig.wgmma(blockM: 16, blockN: 64, stages: 4, swapAB: true)
        // One read of all 128 experts' [768, 4096] bf16 slices at 4 TB/s: 0.201 ms.
        #expect(abs(bound(wide, tokens: 1024) - 1000 * 128 * 768 * 4096 * 2 / 4e12) < 1e-9)
        // 8192 tokens give 512 rows per expert: 32 reads with BLOCK_M 16, 4 with 128.
        #expect(bound(narrow, tokens: 8192) > 7 * bound(wide, tokens: 8192))
        let split = MoEPlan(both: wide).withSplit(8, mode: .workspace).gemm1
        #expect(bound(split, tokens: 8192) > bound(wide, tokens: 8192))
    }

    @Test func tunerAlwaysHasABlockM() {
        for preset in ShapePreset.all {
            for tokens in ShapePreset.batchSizes {
                #expect(!Tuner.blockMs(shape: preset.shape, tokens: tokens, hopper: true).isEmpty, "\(preset.name) M=\(tokens)")
                #expect(!Tuner.blockMs(shape: preset.shape, tokens: tokens, hopper: false).isEmpty, "\(preset.name) M=\(tokens)")
            }
        }
    }

    /// Only a one-token batch on two wgmma GEMMs without an expert map skips align.
    @Test func identityRoutingOnlyForOneTokenOnWgmma() {
        let swap = MoEPlan(both: .wgmma(blockM: 16, blockN: 64, stages: 8, swapAB: true))
        #expect(CUDAMoELayer.usesIdentityRouting(plan: swap, tokens: 1, expertMap: false))
        #expect(!CUDAMoELayer.usesIdentityRouting(plan: swap, tokens: 2, expertMap: false))
        #expect(!CUDAMoELayer.usesIdentityRouting(plan: swap, tokens: 1, expertMap: true))
        var aligned = swap
        aligned.identityRouting = false
        #expect(!CUDAMoELayer.usesIdentityRouting(plan: aligned, tokens: 1, expertMap: false))
        var mixed = swap
        mixed.gemm2 = GemmConfig(blockM: 16, blockN: 128, blockK: 64, warpsM: 1, warpsN: 4, stages: 3)
        #expect(!CUDAMoELayer.usesIdentityRouting(plan: mixed, tokens: 1, expertMap: false))
    }

    /// The tuner's wide token tiles: the fitting width and its neighbours, each valid.
    @Test func tunerWideSwapTiles() {
        let tiles = Tuner.wideSwapTiles(around: 144, sharedMemoryLimit: 227 * 1024)
        #expect(Set(tiles.map(\.blockM)) == [128, 144, 160])
        #expect(tiles.allSatisfy { $0.kernel == .wgmmaSwap && (try? $0.validate(sharedMemoryLimit: 227 * 1024)) != nil })
        #expect(tiles.contains { $0.blockM == 144 && $0.blockN == 256 && $0.stages == 4 })
        #expect(tiles.contains { $0.blockM == 144 && $0.blockN == 128 })
        #expect(Tuner.wideSwapTiles(around: 80, sharedMemoryLimit: 227 * 1024).map(\.blockM).min() == 80)
        #expect(Tuner.wideSwapTiles(around: 64, sharedMemoryLimit: 227 * 1024).isEmpty)
    }

    /// The tuner's final plan: the best GEMM1 and GEMM2 of any BLOCK_M, a pair of different BLOCK_M
    /// charged both aligns, none without its aligns measured.
    @Test func tunerPairsTheBestGemmsOfAnyBlockM() throws {
        let wide = MoEPlan(both: .wgmma(blockM: 144, blockN: 256, stages: 4, swapAB: true))
        let persistent = MoEPlan(both: .wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true))
        let best1 = [144: (wide, 0.8), 128: (persistent, 1.0)]
        let best2 = [144: (wide, 0.9), 128: (persistent, 0.5)]
        let mixed = try #require(Tuner.bestPairing(best1: best1, best2: best2, align: [128: 0.01, 144: 0.01]))
        #expect(mixed.0.gemm1 == wide.gemm1 && mixed.0.gemm2 == persistent.gemm2)
        #expect(abs(mixed.1 - (0.8 + 0.5 + 0.02)) < 1e-12)
        #expect(mixed.0.fusedActivation == wide.fusedActivation)
        // A second align that costs more than the pair saves: one BLOCK_M.
        let single = try #require(Tuner.bestPairing(best1: best1, best2: best2, align: [128: 0.01, 144: 0.3]))
        #expect(single.0 == persistent && abs(single.1 - 1.51) < 1e-12)
        // No align measured for 128: only the 144 pair remains.
        let only = try #require(Tuner.bestPairing(best1: best1, best2: best2, align: [144: 0.01]))
        #expect(only.0 == wide)
        #expect(Tuner.bestPairing(best1: best1, best2: [:], align: [144: 0.01]) == nil)
    }

    /// The tuner tries split-K where tiles are few (all kernels) and for the swap-AB decode kernel.
    @Test func tunerSplitCandidates() {
        let swap = GemmConfig.wgmma(blockM: 8, blockN: 128, stages: 8, swapAB: true)
        let wide = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4)
        #expect(Tuner.splitCandidates(wide, tiles1: 100, tiles2: 5000, multiprocessors: 132) == [2, 4, 8])
        #expect(Tuner.splitCandidates(wide, tiles1: 5000, tiles2: 5000, multiprocessors: 132).isEmpty)
        #expect(Tuner.splitCandidates(swap, tiles1: 896, tiles2: 512, multiprocessors: 132) == [2, 4])
    }

    /// The tuner's GROUP_SIZE_M refinement: 1, the average run and twice it, for wide wgmma tiles
    /// only, without the group the winner already has.
    @Test func tunerGroupAlternatives() throws {
        let mixtral = try ShapePreset.named("mixtral_tp2").shape  // 2048 tokens: 512 rows, 4 blocks of 128
        let wide = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, groupSizeM: 8)
        #expect(Tuner.groupAlternatives(wide, shape: mixtral, tokens: 2048) == [1, 4])
        let persistent = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, groupSizeM: 1, persistent: true)
        #expect(Tuner.groupAlternatives(persistent, shape: mixtral, tokens: 65536) == [32])
        #expect(Tuner.groupAlternatives(persistent, shape: mixtral, tokens: 1).isEmpty)  // one block: 1 only
        let swap = GemmConfig.wgmma(blockM: 16, blockN: 128, stages: 4, swapAB: true)
        #expect(Tuner.groupAlternatives(swap, shape: mixtral, tokens: 2048).isEmpty)
        // A wide swap-AB tile: Mixtral 1024 gives an expert 256 rows, two blocks of 144.
        let wideSwap = GemmConfig.wgmma(blockM: 144, blockN: 256, stages: 4, swapAB: true)
        #expect(Tuner.groupAlternatives(wideSwap, shape: mixtral, tokens: 1024) == [2, 4])
        #expect(Tuner.groupAlternatives(wideSwap, shape: mixtral, tokens: 512).isEmpty)  // 128 rows: one block
        let mma = GemmConfig(blockM: 128, blockN: 128, blockK: 64, warpsM: 2, warpsN: 4, stages: 3)
        #expect(Tuner.groupAlternatives(mma, shape: mixtral, tokens: 2048).isEmpty)
    }

    /// The swap-AB kernel's wide token tiles: 80..192 tokens, 256 weight rows on two consumer
    /// warpgroups (384 threads), refused with the key named when the width has no kernel or the ring
    /// cannot hold the staged output tile.
    @Test func swapWideTokenTiles() throws {
        let wide = GemmConfig.wgmma(blockM: 160, blockN: 256, stages: 4, swapAB: true)
        #expect(throws: Never.self) { try wide.validate(sharedMemoryLimit: 227 * 1024) }
        #expect(wide.threads == 384 && wide.warps == 12)
        #expect(wide.nameExpression(dtype: .bf16, mulRoutedWeight: true) == "moe_gemm_sm90_swap<moe_bf16, 256, 160, 4, 0, true, 0>")
        #expect(GemmConfig.wgmma(blockM: 80, blockN: 128, stages: 7, swapAB: true).threads == 256)
        // 160 x 260 fp32 staged (166 KB) does not fit a 3-stage ring (156 KB).
        #expect(throws: MoEError.invalidArgument("num_stages", "wgmma_swap 160x256x64 s3 g1 split1/none stages its 166400-byte output tile in its 159744-byte ring: needs more stages")) {
            try GemmConfig.wgmma(blockM: 160, blockN: 256, stages: 3, swapAB: true).validate(sharedMemoryLimit: 227 * 1024)
        }
        #expect(throws: MoEError.self) { try GemmConfig.wgmma(blockM: 200, blockN: 256, stages: 4, swapAB: true).validate(sharedMemoryLimit: 227 * 1024) }
        #expect(throws: MoEError.self) { try GemmConfig.wgmma(blockM: 72, blockN: 128, stages: 4, swapAB: true).validate(sharedMemoryLimit: 227 * 1024) }
        // Too deep for 227 KB: the shared-memory check names num_stages.
        #expect(throws: MoEError.self) { try GemmConfig.wgmma(blockM: 192, blockN: 256, stages: 5, swapAB: true).validate(sharedMemoryLimit: 227 * 1024) }
        // Read from a table: the same config.
        let table = ConfigTable(source: "t", entries: [(512, MoEPlan(both: wide))])
        let parsed = try ConfigTable.parse(table.json.serialized(indent: 1), source: "t")
        #expect(parsed.nearest(to: 512).gemm1 == wide)
    }

    /// CLUSTER_M: read and written by the tables, part of the kernel's name, half-height TMA boxes,
    /// and refused (naming the key) on kernels other than wgmma.
    @Test func clusterPairsConfig() throws {
        let clustered = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, groupSizeM: 8, clusterM: 2)
        #expect(throws: Never.self) { try clustered.validate(sharedMemoryLimit: 227 * 1024) }
        #expect(clustered.nameExpression(dtype: .bf16, mulRoutedWeight: false) == "moe_gemm_sm90<moe_bf16, 128, 256, 4, 0, false, 0, 2>")
        #expect(clustered.tensorMapBoxRows(fusedActivation: false) == 128)
        #expect(clustered.tensorMapBoxRows(fusedActivation: true) == 128)
        #expect(GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4).tensorMapBoxRows(fusedActivation: false) == 256)
        #expect(clustered.description.contains(" c2 "))
        let table = ConfigTable(source: "t", entries: [(2048, MoEPlan(both: clustered))])
        let text = table.json.serialized(indent: 1)
        #expect(text.contains("CLUSTER_M"))
        let parsed = try ConfigTable.parse(text, source: "t")
        #expect(parsed.nearest(to: 2048).gemm1 == clustered)
        // Unclustered tables do not mention it (SGLang's format stays as it was).
        #expect(!ConfigTable(source: "t", entries: [(8, MoEPlan(both: .wgmma(blockM: 128, blockN: 256, stages: 4)))])
            .json.serialized(indent: 1).contains("CLUSTER_M"))

        for wrong in [
            GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true, clusterM: 2),
            GemmConfig.wgmma(blockM: 16, blockN: 128, stages: 4, swapAB: true, clusterM: 2),
            GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, clusterM: 4),
        ] {
            expectRefused(wrong, key: "CLUSTER_M")
        }
        expectMalformed(#"{"8": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "CLUSTER_M": 2}}"#, naming: "CLUSTER_M")
    }

    /// `config` fails validation with an invalid-argument error naming `key`.
    func expectRefused(_ config: GemmConfig, key: String, sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            try config.validate(sharedMemoryLimit: 227 * 1024)
            Issue.record("\(config) validated", sourceLocation: sourceLocation)
        } catch {
            guard case .invalidArgument(let named, _) = error else {
                Issue.record("\(error)", sourceLocation: sourceLocation)
                return
            }
            #expect(named == key, sourceLocation: sourceLocation)
        }
    }

    /// The table `text` fails to parse with a malformed-file error that names its file and `key`.
    func expectMalformed(_ text: String, naming key: String, sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            _ = try ConfigTable.parse(text, source: "t.json")
            Issue.record("\(key) parsed: \(text)", sourceLocation: sourceLocation)
        } catch {
            guard case .malformedFile(let file, let message) = error else {
                Issue.record("\(error)", sourceLocation: sourceLocation)
                return
            }
            #expect(file == "t.json" && message.contains(key), "\(message)", sourceLocation: sourceLocation)
        }
    }

    /// UNIT (the swap-AB GEMM1's n-blocks per program, NOTES v39): parsed, written back only when not 1,
    /// named in the kernel instantiation and the description, refused off the swap-AB kernel; the layer
    /// runs units only where the kernel takes the unit walk (the paired activation epilogue).
    @Test func swapUnitsConfig() throws {
        var unit = GemmConfig.wgmma(blockM: 144, blockN: 256, stages: 4, swapAB: true)
        unit.unit = 4
        #expect(throws: Never.self) { try unit.validate(sharedMemoryLimit: 227 * 1024) }
        #expect(unit.nameExpression(dtype: .bf16, mulRoutedWeight: false, fusedActivation: 1)
            == "moe_gemm_sm90_swap<moe_bf16, 256, 144, 4, 0, false, 1, 4>")
        #expect(unit.description.contains(" u4 "))
        let text = ConfigTable(source: "t", entries: [(512, MoEPlan(gemm1: unit, gemm2: .wgmma(blockM: 144, blockN: 256, stages: 4, swapAB: true)))])
            .json.serialized(indent: 1)
        #expect(text.contains("\"UNIT\": 4") && text.components(separatedBy: "UNIT").count == 2, "\(text)")
        #expect(try ConfigTable.parse(text, source: "t").nearest(to: 512).gemm1 == unit)

        // Where the kernel takes the unit walk: bf16 silu at any width, else up to 128 tokens; GEMM1 only.
        #expect(CUDAMoELayer.swapUnit(config: unit, dtype: .bf16, activation: .silu, defines: []) == 4)
        #expect(CUDAMoELayer.swapUnit(config: unit, dtype: .fp16, activation: .silu, defines: []) == 1)
        #expect(CUDAMoELayer.swapUnit(config: unit, dtype: .bf16, activation: .gelu, defines: []) == 1)
        #expect(CUDAMoELayer.swapUnit(config: unit, dtype: .bf16, activation: .silu, defines: ["-DMOE_SM90_SWAP_PAIRED_ACT=0"]) == 1)
        var narrow = unit
        narrow.blockM = 96
        narrow.stages = 5
        #expect(CUDAMoELayer.swapUnit(config: narrow, dtype: .fp16, activation: .gelu, defines: []) == 4)
        let plain = GemmConfig.wgmma(blockM: 144, blockN: 256, stages: 4, swapAB: true)
        #expect(CUDAMoELayer.swapUnit(config: plain, dtype: .bf16, activation: .silu, defines: []) == 1)
        #expect(CUDAMoELayer.swapUnit(config: plain, dtype: .bf16, activation: .silu, defines: ["-DMOE_SM90_SWAP_UNIT=2"]) == 2)

        var wrong = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true)
        wrong.unit = 2
        expectRefused(wrong, key: "UNIT")
        var split = unit
        split.splitK = 2
        split.splitMode = .workspace
        expectRefused(split, key: "UNIT")
        expectMalformed(#"{"8": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "UNIT": 2}}"#, naming: "UNIT")
    }

    /// FIT 0 (whole token widths on the swap-AB kernel, NOTES v42): parsed, written back only when 0, named
    /// in the kernel instantiation (its last template argument, after the unit) and the description,
    /// refused off the swap-AB kernel and for values other than 0 and 1.
    @Test func swapWholeWidthsConfig() throws {
        var whole = GemmConfig.wgmma(blockM: 144, blockN: 256, stages: 4, groupSizeM: 2, swapAB: true)
        whole.fitRows = false
        #expect(throws: Never.self) { try whole.validate(sharedMemoryLimit: 227 * 1024) }
        #expect(whole.nameExpression(dtype: .bf16, mulRoutedWeight: true)
            == "moe_gemm_sm90_swap<moe_bf16, 256, 144, 4, 0, true, 0, 1, false>")
        var unit = whole
        unit.unit = 7
        #expect(unit.nameExpression(dtype: .bf16, mulRoutedWeight: false, fusedActivation: 1)
            == "moe_gemm_sm90_swap<moe_bf16, 256, 144, 4, 0, false, 1, 7, false>")
        #expect(unit.description.contains(" u7 whole "))
        let fitted = GemmConfig.wgmma(blockM: 144, blockN: 256, stages: 4, groupSizeM: 2, swapAB: true)
        #expect(!fitted.description.contains("whole"))
        let text = ConfigTable(source: "t", entries: [(1024, MoEPlan(gemm1: unit, gemm2: fitted))]).json.serialized(indent: 1)
        #expect(text.contains("\"FIT\": 0") && text.components(separatedBy: "FIT").count == 2, "\(text)")
        let parsed = try ConfigTable.parse(text, source: "t").nearest(to: 1024)
        #expect(parsed.gemm1 == unit && parsed.gemm2 == fitted)

        var persistent = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true)
        persistent.fitRows = false
        expectRefused(persistent, key: "FIT")
        expectMalformed(#"{"8": {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "FIT": 0}}"#, naming: "FIT")
        expectMalformed(
            #"{"8": {"BLOCK_SIZE_M": 144, "BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 64, "KERNEL": "wgmma_swap", "FIT": 2}}"#,
            naming: "FIT")
    }

    /// The tuner's cluster refinement: wide non-persistent wgmma winners while experts get two or more
    /// m-blocks, with an even group of at least 2.
    @Test func tunerClusterAlternative() throws {
        let mixtral = try ShapePreset.named("mixtral_tp2").shape  // 2048 tokens: 512 rows, 4 blocks of 128
        let wide = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 3, groupSizeM: 8)
        let alternative = try #require(Tuner.clusterAlternative(wide, shape: mixtral, tokens: 2048))
        #expect(alternative.clusterM == 2 && alternative.groupSizeM == 8 && alternative.stages == 3)
        #expect(Tuner.clusterAlternative(.wgmma(blockM: 128, blockN: 256, stages: 4, groupSizeM: 1), shape: mixtral,
                                         tokens: 2048)?.groupSizeM == 2)
        #expect(Tuner.clusterAlternative(.wgmma(blockM: 128, blockN: 256, stages: 4, groupSizeM: 5), shape: mixtral,
                                         tokens: 2048)?.groupSizeM == 6)
        #expect(Tuner.clusterAlternative(alternative, shape: mixtral, tokens: 2048) == nil)  // already clustered
        #expect(Tuner.clusterAlternative(wide, shape: mixtral, tokens: 100) == nil)  // one block per expert
        let persistent = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, groupSizeM: 8, persistent: true)
        #expect(Tuner.clusterAlternative(persistent, shape: mixtral, tokens: 2048) == nil)
        let swap = GemmConfig.wgmma(blockM: 16, blockN: 128, stages: 4, swapAB: true)
        #expect(Tuner.clusterAlternative(swap, shape: mixtral, tokens: 2048) == nil)
    }

    /// `tune --refine`: one knob moved at a time, every candidate valid, the plan itself first.
    @Test func tunerNeighbors() throws {
        let limit = 227 * 1024
        let wide = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 3, groupSizeM: 8)
        let around = Tuner.neighbors(of: wide, sharedMemoryLimit: limit)
        #expect(around.contains { $0.kernel == .wgmma && $0.blockN == 256 && $0.stages == 2 })
        #expect(around.contains { $0.kernel == .wgmma && $0.blockN == 256 && $0.stages == 4 })
        #expect(around.contains { $0.kernel == .wgmma && $0.blockN == 128 && $0.stages == 3 })
        #expect(around.contains { $0.kernel == .wgmmaPersistent && $0.blockN == 256 && $0.stages == 3 })
        #expect(around.contains { $0.kernel == .wgmmaPingpong && $0.blockN == 128 && $0.stages == 3 })
        #expect(!around.contains(wide))
        for candidate in around {
            #expect(throws: Never.self) { try candidate.validate(sharedMemoryLimit: limit) }
            #expect(candidate.blockM == wide.blockM && candidate.groupSizeM == wide.groupSizeM)
        }
        // The deepest 128x256 ring (4) has no deeper neighbour; the persistent toggle takes the deepest that fits.
        let deepest = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4)
        #expect(!Tuner.neighbors(of: deepest, sharedMemoryLimit: limit).contains { $0.kernel == .wgmma && $0.stages == 5 })
        // Ping-pong: back to the persistent kernel at 128 and 256 columns (the deepest ring that fits).
        let pingpong = GemmConfig.wgmma(blockM: 128, blockN: 128, stages: 6, groupSizeM: 8, pingpong: true)
        let pingpongs = Tuner.neighbors(of: pingpong, sharedMemoryLimit: limit)
        #expect(pingpongs.contains { $0.kernel == .wgmmaPersistent && $0.blockN == 128 && $0.stages == 6 })
        #expect(pingpongs.contains { $0.kernel == .wgmmaPersistent && $0.blockN == 256 && $0.stages == 4 })
        #expect(pingpongs.contains { $0.kernel == .wgmmaPingpong && $0.blockN == 128 && $0.stages == 5 })
        let swap = GemmConfig.wgmma(blockM: 8, blockN: 128, stages: 6, swapAB: true)
        let swaps = Tuner.neighbors(of: swap, sharedMemoryLimit: limit)
        #expect(swaps.contains { $0.blockN == 64 && $0.stages == 6 && $0.splitK == 1 })
        #expect(swaps.contains { $0.blockN == 128 && $0.splitK == 2 && $0.splitMode == .workspace })
        #expect(swaps.allSatisfy { $0.kernel == .wgmmaSwap && $0.blockM == 8 })

        let plan = MoEPlan(gemm1: swap, gemm2: .wgmma(blockM: 8, blockN: 64, stages: 8, swapAB: true))
        let plans = Tuner.neighborPlans(of: plan, sharedMemoryLimit: limit)
        #expect(plans.first == plan)
        #expect(Set(plans).count == plans.count)
        // Every other candidate moves exactly one GEMM.
        #expect(plans.dropFirst().allSatisfy { ($0.gemm1 == plan.gemm1) != ($0.gemm2 == plan.gemm2) })
    }

    @Test func heuristicSplitsOnlyWhenTilesAreFew() throws {
        let seed = try ShapePreset.named("seed4096").shape
        let decode = PlanSelector.heuristic(shape: seed, tokens: 1, multiprocessors: 132)
        #expect(decode.blockM == 16)
        #expect(decode.gemm1.splitK > 1 && decode.gemm1.splitMode == .workspace, "\(decode)")
        let prefill = PlanSelector.heuristic(shape: seed, tokens: 8192, multiprocessors: 132)
        #expect(prefill.blockM == 128)
        #expect(prefill.gemm1.splitK == 1 && prefill.gemm2.splitK == 1)
        for tokens in ShapePreset.batchSizes {
            for preset in ShapePreset.all {
                let plan = PlanSelector.heuristic(shape: preset.shape, tokens: tokens, multiprocessors: 132)
                #expect(throws: Never.self) { try plan.gemm1.validate(sharedMemoryLimit: 227 * 1024) }
                #expect(throws: Never.self) { try plan.gemm2.validate(sharedMemoryLimit: 227 * 1024) }
            }
        }
        // GEMMs of different BLOCK_M: two aligns, GEMM1's block first.
        #expect(MoEPlan(gemm1: decode.gemm1, gemm2: prefill.gemm2).alignBlockMs == [16, 128])
        #expect(MoEPlan(both: prefill.gemm2).alignBlockMs == [128])
    }
}
