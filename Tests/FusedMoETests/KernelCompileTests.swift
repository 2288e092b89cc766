import CUDA
import Testing
@testable import FusedMoE

/// Every kernel family compiles for sm_90a through NVRTC, with no GPU needed: this runs in CI.
@Suite(.enabled(if: NVRTC.isAvailable, "NVRTC is not installed here (pip install nvidia-cuda-nvrtc)"))
struct KernelCompileTests {
    func compile(_ request: KernelLibrary.Request) throws -> CompiledProgram {
        try NVRTC.shared().compile(
            source: request.source.text, name: request.source.rawValue, headers: KernelSource.headers,
            options: KernelLibrary.options(architecture: "sm_90a"), nameExpressions: request.expressions)
    }

    @Test func utilityKernelsCompile() throws {
        for request in DeviceTools.requests + [GPURouter.request(dtype: .bf16), GPUReference.request(dtype: .bf16),
                                               KernelLibrary.Request(source: .probe)] {
            let program = try compile(request)
            #expect(program.cubin.count > 0)
            #expect(program.loweredNames.count == request.expressions.count)
        }
    }

    /// The FUSED_ACT template argument of a wgmma kernel's name expression (the seventh in all three
    /// kernels: type, two tile sizes, stages, mode, routed weight, activation[, cluster]).
    func fusedActivation(_ expression: String) -> Int? {
        guard let open = expression.firstIndex(of: "<"), let close = expression.lastIndex(of: ">") else { return nil }
        let arguments = expression[expression.index(after: open)..<close].split(separator: ",")
        return arguments.count > 6 ? Int(arguments[6].trimmingCharacters(in: .whitespaces)) : nil
    }

    @Test func hopperKernelsCompileWithoutSpills() throws {
        let wide = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4)
        let swap = GemmConfig.wgmma(blockM: 16, blockN: 64, stages: 6, swapAB: true)
        let persistent = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true)
        let clustered = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, groupSizeM: 2, clusterM: 2)
        let pingpong = GemmConfig.wgmma(blockM: 128, blockN: 128, stages: 5, pingpong: true)
        let stream = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, streamK: true)
        // A wide token tile: two consumer warpgroups with setmaxnreg, 144 accumulators each.
        let swapWide = GemmConfig.wgmma(blockM: 144, blockN: 256, stages: 4, swapAB: true)
        for config in [wide, swap, persistent, clustered, pingpong, stream, swapWide] {
            // Unsplit, GEMM1 takes the activation in its epilogue (FUSED_ACT), checked here with gelu too.
            #expect(config.fusesActivation)
            for request in CUDAMoELayer.requests(dtype: .bf16, plan: MoEPlan(both: config), activation: .gelu)
            where request.source == .gemmSM90 {
                // GEMM1 with gelu in its epilogue.
                #expect(request.expressions.contains { fusedActivation($0) == 2 }, "\(request.expressions)")
                let program = try compile(request)
                #expect(!program.spills, "\(request.expressions): \(program.resourceReport)")
            }
            // (Stream-K splits K itself: SPLIT_K 1 only.)
            for (split, mode) in [(1, SplitMode.none), (4, .workspace), (2, .atomic)]
            where split == 1 || config.kernel != .wgmmaStreamK {
                let plan = MoEPlan(both: config).withSplit(split, mode: mode)
                #expect(throws: Never.self) { try plan.gemm1.validate(sharedMemoryLimit: 227 * 1024) }
                for request in CUDAMoELayer.requests(dtype: .bf16, plan: plan, activation: .silu)
                where request.source == .gemmSM90 {
                    let program = try compile(request)
                    #expect(!program.spills, "\(request.expressions): \(program.resourceReport)")
                    #expect(!program.log.contains("C7508"), "setmaxnreg ignored: \(program.log)")
                }
            }
        }
    }

    /// The fused epilogue's smallest tiles: 64-row gate/up halves of a 64x64 wgmma tile, 32-row halves
    /// of a 64-wide swap-AB tile, and the persistent kernel's narrowest fused tile (128 columns).
    @Test func fusedActivationSmallTilesCompile() throws {
        let configs = [
            GemmConfig.wgmma(blockM: 64, blockN: 64, stages: 6), GemmConfig.wgmma(blockM: 8, blockN: 64, stages: 8, swapAB: true),
            GemmConfig.wgmma(blockM: 64, blockN: 128, stages: 8, persistent: true),
        ]
        for config in configs {
            #expect(config.fusesActivation)
            #expect(config.tensorMapBoxRows(fusedActivation: true) == config.blockN / 2)
            let request = try #require(CUDAMoELayer.requests(dtype: .fp16, plan: MoEPlan(both: config), activation: .silu)
                .first { $0.source == .gemmSM90 })
            #expect(request.expressions.first.flatMap(fusedActivation) == 1, "\(request.expressions)")
            let program = try compile(request)
            #expect(!program.spills, "\(request.expressions): \(program.resourceReport)")
        }
        // The persistent kernel's 64-column tiles leave the activation to its own kernel.
        let narrow = GemmConfig.wgmma(blockM: 128, blockN: 64, stages: 8, persistent: true)
        #expect(!narrow.fusesActivation)
        #expect(narrow.tensorMapBoxRows(fusedActivation: true) == 64)
    }

    /// The top-k sum in GEMM2 (CombineMode.atomic, and the ordered sum at k <= 2): GEMM2 on the unsplit
    /// persistent or swap-AB kernel becomes its split mode 3 instantiation, which compiles without spills
    /// in both dtypes (both of the persistent kernel's walks, decode and wide swap-AB tiles); every other
    /// GEMM2 (and GEMM1) keeps its kernel.
    @Test func atomicCombineKernels() throws {
        let swap = GemmConfig.wgmma(blockM: 144, blockN: 256, stages: 4, swapAB: true)
        for gemm2 in [
            GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true),
            GemmConfig.wgmma(blockM: 64, blockN: 128, stages: 8, persistent: true),
            GemmConfig.wgmma(blockM: 144, blockN: 256, stages: 4, swapAB: true),
            GemmConfig.wgmma(blockM: 16, blockN: 128, stages: 4, swapAB: true),
            GemmConfig.wgmma(blockM: 64, blockN: 256, stages: 4),
        ] {
            let plan = MoEPlan(gemm1: swap, gemm2: gemm2)
            #expect(CUDAMoELayer.allowsAtomicCombine(plan: plan))
            #expect(!CUDAMoELayer.allowsAtomicCombine(plan: plan.withSplit(2, mode: .workspace)))
            for dtype in [DType.bf16, .fp16] {
                let ordered = CUDAMoELayer.requests(dtype: dtype, plan: plan, activation: .silu)
                let atomic = CUDAMoELayer.requests(dtype: dtype, plan: plan, activation: .silu, atomicCombine: true)
                let expressions = try #require(atomic.first { $0.source == .gemmSM90 }).expressions
                let type = dtype == .fp16 ? "moe_fp16" : "moe_bf16"
                #expect(expressions.last == (gemm2.kernel == .wgmmaSwap
                    ? "moe_gemm_sm90_swap<\(type), \(gemm2.blockN), \(gemm2.blockM), \(gemm2.stages), 3, true, 0>"
                    : gemm2.kernel == .wgmma
                    ? "moe_gemm_sm90<\(type), \(gemm2.blockM), \(gemm2.blockN), \(gemm2.stages), 3, true, 0, 1>"
                    : "moe_gemm_sm90_persistent<\(type), \(gemm2.blockM), \(gemm2.blockN), \(gemm2.stages), 3, true, 0, false>"))
                // GEMM1 and the other programs are the ordered layer's.
                #expect(expressions.first == ordered.first { $0.source == .gemmSM90 }?.expressions.first)
                #expect(atomic.filter { $0.source != .gemmSM90 } == ordered.filter { $0.source != .gemmSM90 })
                let program = try compile(KernelLibrary.Request(source: .gemmSM90, expressions: [expressions.last!]))
                #expect(!program.spills, "\(expressions): \(program.resourceReport)")
            }
        }
        // GEMM2 kernels that cannot: the same requests whatever the combine.
        for gemm2 in [
            MoEPlan(both: swap).withSplit(2, mode: .workspace).gemm2,
            GemmConfig.wgmma(blockM: 128, blockN: 128, stages: 5, pingpong: true),
            GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, streamK: true),
            GemmConfig(blockM: 64, blockN: 64, blockK: 32, warpsM: 2, warpsN: 2, stages: 3),
        ] {
            let plan = MoEPlan(gemm1: swap, gemm2: gemm2)
            #expect(!CUDAMoELayer.allowsAtomicCombine(plan: plan))
            #expect(
                CUDAMoELayer.requests(dtype: .bf16, plan: plan, activation: .silu, atomicCombine: true)
                    == CUDAMoELayer.requests(dtype: .bf16, plan: plan, activation: .silu))
        }
        #expect(MoEOptions().combine == .ordered)
        #expect(CombineMode(rawValue: "atomic") == .atomic)
        // The ordered sum goes into GEMM2 at k <= 2 only (unless turned off); the atomic one at any k.
        let summing = MoEPlan(gemm1: swap, gemm2: swap)
        #expect(CUDAMoELayer.sumsInGEMM2(combine: .ordered, topK: 2, plan: summing, smallTopK: true))
        #expect(CUDAMoELayer.sumsInGEMM2(combine: .ordered, topK: 1, plan: summing, smallTopK: true))
        #expect(!CUDAMoELayer.sumsInGEMM2(combine: .ordered, topK: 3, plan: summing, smallTopK: true))
        #expect(!CUDAMoELayer.sumsInGEMM2(combine: .ordered, topK: 2, plan: summing, smallTopK: false))
        #expect(CUDAMoELayer.sumsInGEMM2(combine: .atomic, topK: 8, plan: summing, smallTopK: false))
        #expect(!CUDAMoELayer.sumsInGEMM2(combine: .atomic, topK: 2, plan: summing.withSplit(2, mode: .workspace)))
        // The forward's in-place guard: byte ranges that share a byte.
        #expect(CUDAMoELayer.overlaps(100, 10, 109, 5))
        #expect(CUDAMoELayer.overlaps(100, 10, 90, 11))
        #expect(!CUDAMoELayer.overlaps(100, 10, 110, 5))
        #expect(!CUDAMoELayer.overlaps(100, 10, 90, 10))
        #expect(!CUDAMoELayer.overlaps(100, 0, 100, 10))
    }

    @Test(arguments: [1, 128, 4096])
    func layerKernelsCompileWithoutSpills(tokens: Int) throws {
        let shape = try ShapePreset.named("seed4096").shape
        let plan = PlanSelector.heuristic(shape: shape, tokens: tokens, multiprocessors: 132)
        for mode in [SplitMode.none, .atomic, .workspace] {
            for request in CUDAMoELayer.requests(dtype: .bf16, plan: plan.withSplit(mode == .none ? 1 : 2, mode: mode), activation: .silu) {
                let program = try compile(request)
                #expect(program.cubin.count > 0)
                #expect(!program.spills, "\(request.source.rawValue) \(request.expressions): \(program.resourceReport)")
            }
        }
    }
}
