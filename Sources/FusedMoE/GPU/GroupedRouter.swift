import CUDA

/// Grouped top-k routing on the GPU (`moe_grouped_topk` in moe_topk.cu): DeepSeek-V2/V3 and Kimi-K2's
/// router, bit for bit what `Router.groupedTopK` computes on the host.
public struct GPUGroupedRouter: @unchecked Sendable {
    let kernel: Kernel
    /// The element type of the logits.
    public let dtype: DType

    /// The kernel's limits: experts per token row, groups and k.
    public static let maximumExperts = 512
    public static let maximumGroups = 32
    public static let maximumTopK = 32

    /// The program holding the kernel for `dtype` logits: `moe_grouped_topk<moe_bf16 | moe_fp16 | float>`.
    public static func request(dtype: DType) -> KernelLibrary.Request {
        KernelLibrary.Request(source: .topk, expressions: ["moe_grouped_topk<\(kernelTypeName(dtype))>"])
    }

    /// Loads (compiling on first use) the kernel for `dtype` logits.
    /// - Throws: `CUDAError` from compiling or loading.
    public init(library: KernelLibrary, logitsDType dtype: DType) throws(CUDAError) {
        let request = GPUGroupedRouter.request(dtype: dtype)
        kernel = try library.kernel(request.expressions[0], in: request)
        self.dtype = dtype
    }

    /// Routes `logits [M, E]` to `ids [M, k]` (int32) and `weights [M, k]` (fp32) on `stream`, as
    /// `Router.groupedTopK` does. Launches one warp per token: grid `min(ceil(M / 4), 65535)`, block 128.
    ///
    /// - Parameters:
    ///   - logits: `[M, E]` of `dtype`.
    ///   - correctionBias: `[E]` fp32, added to the scores to choose groups and experts; nil for none.
    ///   - tokens: M.
    ///   - experts: E, at most 512.
    ///   - topK: k, in `1...min(32, topKGroups * E / groups)`.
    ///   - groups: expert groups, dividing E, at most 32.
    ///   - topKGroups: groups kept per token.
    ///   - scoring: softmax or sigmoid scores.
    ///   - renormalize: divide the k weights by their sum.
    ///   - scalingFactor: multiplies every weight.
    ///   - ids: `[M, k]` int32 output.
    ///   - weights: `[M, k]` fp32 output.
    ///   - stream: where the kernel runs.
    /// - Throws: `MoEError.invalidArgument` for arguments `Router.groupedTopK` refuses or beyond the
    ///   kernel's limits; `MoEError.cuda` when the launch fails.
    public func route(
        logits: DevicePointer, correctionBias: DevicePointer?, tokens: Int, experts: Int, topK: Int, groups: Int,
        topKGroups: Int, scoring: MoERoutingConfig.Scoring, renormalize: Bool, scalingFactor: Float,
        ids: DevicePointer, weights: DevicePointer, stream: Stream
    ) throws(MoEError) {
        let bias = correctionBias ?? .null
        try Router.validateGrouped(
            experts: experts, topK: topK, groups: groups, topKGroups: topKGroups, hasBias: !bias.isNull,
            scalingFactor: scalingFactor)
        guard experts <= GPUGroupedRouter.maximumExperts else {
            throw .invalidArgument("router_logits", "the GPU grouped router takes 1...512 experts, got \(experts)")
        }
        guard groups <= GPUGroupedRouter.maximumGroups else {
            throw .invalidArgument("groups", "the GPU grouped router takes 1...32 groups, got \(groups)")
        }
        guard topK <= GPUGroupedRouter.maximumTopK else {
            throw .invalidArgument("topK", "the GPU grouped router takes k in 1...32, got \(topK)")
        }
        guard tokens >= 0 else { throw .invalidArgument("tokens", "must be >= 0, got \(tokens)") }
        guard tokens > 0 else { return }
        do {
            try kernel.launch(
                grid: Dimensions(min((tokens + 3) / 4, 65535)), block: Dimensions(128), on: stream,
                arguments: [
                    logits, bias, Int64(tokens), Int32(experts), Int32(topK), Int32(groups), Int32(topKGroups),
                    Int32(scoring == .softmax ? 0 : 1), Int32(renormalize ? 1 : 0), scalingFactor, ids, weights,
                ])
        } catch {
            throw .cuda(error)
        }
    }
}
