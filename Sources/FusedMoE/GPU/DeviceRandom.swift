import CUDA

/// Random tensors made on the GPU (moe_random.cu), and the GPU router.
public struct DeviceTools: @unchecked Sendable {
    public let library: KernelLibrary
    let uniformBF16: Kernel
    let uniformFP16: Kernel
    let uniformFloat: Kernel
    let randomIDs: Kernel

    public static let requests = [
        KernelLibrary.Request(
            source: .random,
            expressions: ["moe_random_uniform<moe_bf16>", "moe_random_uniform<moe_fp16>", "moe_random_uniform<float>"])
    ]

    public init(library: KernelLibrary) throws(CUDAError) {
        self.library = library
        let request = DeviceTools.requests[0]
        uniformBF16 = try library.kernel(request.expressions[0], in: request)
        uniformFP16 = try library.kernel(request.expressions[1], in: request)
        uniformFloat = try library.kernel(request.expressions[2], in: request)
        randomIDs = try library.kernel("moe_random_ids", in: request)
    }

    /// Fills `count` elements of `dtype` at `pointer` with values uniform in `[-scale, scale)` from `seed`.
    public func fillUniform(_ pointer: DevicePointer, count: Int, dtype: DType, seed: UInt64, scale: Float, stream: Stream)
        throws(CUDAError)
    {
        guard count > 0 else { return }
        let kernel = switch dtype {
        case .bf16: uniformBF16
        case .fp16: uniformFP16
        case .fp32: uniformFloat
        }
        try kernel.launch(
            grid: Dimensions(min((count + 255) / 256, 65535)), block: Dimensions(256), on: stream,
            arguments: [pointer, Int64(count), seed, scale])
    }

    /// Fills `ids [tokens, k]` with k distinct random experts in `[0, experts)` per token.
    public func fillRandomIDs(
        _ pointer: DevicePointer, tokens: Int, topK: Int, experts: Int, seed: UInt64, stream: Stream
    ) throws(CUDAError) {
        guard tokens > 0 else { return }
        try randomIDs.launch(
            grid: Dimensions(min((tokens + 255) / 256, 65535)), block: Dimensions(256), on: stream,
            arguments: [pointer, Int64(tokens), Int32(topK), Int32(experts), seed])
    }
}

/// Top-k softmax routing on the GPU (moe_topk.cu).
public struct GPURouter: @unchecked Sendable {
    let kernel: Kernel
    public let dtype: DType

    public static func request(dtype: DType) -> KernelLibrary.Request {
        KernelLibrary.Request(source: .topk, expressions: ["moe_topk_softmax<\(kernelTypeName(dtype))>"])
    }

    public init(library: KernelLibrary, logitsDType dtype: DType) throws(CUDAError) {
        let request = GPURouter.request(dtype: dtype)
        kernel = try library.kernel(request.expressions[0], in: request)
        self.dtype = dtype
    }

    /// Routes `logits [M, E]` to `ids [M, k]` (int32) and `weights [M, k]` (fp32) on `stream`.
    /// - Throws: `MoEError.invalidArgument` for E > 512 or k out of 1...min(E, 32).
    public func route(
        logits: DevicePointer, tokens: Int, experts: Int, topK: Int, renormalize: Bool, ids: DevicePointer,
        weights: DevicePointer, stream: Stream
    ) throws(MoEError) {
        guard experts >= 1 && experts <= 512 else { throw .invalidArgument("router_logits", "the GPU router takes 1...512 experts, got \(experts)") }
        guard topK >= 1 && topK <= min(experts, 32) else {
            throw .invalidArgument("topK", "the GPU router takes k in 1...\(min(experts, 32)), got \(topK)")
        }
        guard tokens > 0 else { return }
        do {
            try kernel.launch(
                grid: Dimensions(min((tokens + 3) / 4, 65535)), block: Dimensions(128), on: stream,
                arguments: [logits, Int64(tokens), Int32(experts), Int32(topK), Int32(renormalize ? 1 : 0), ids, weights])
        } catch {
            throw .cuda(error)
        }
    }
}

/// The kernels' name for an element type.
func kernelTypeName(_ dtype: DType) -> String {
    switch dtype {
    case .bf16: "moe_bf16"
    case .fp16: "moe_fp16"
    case .fp32: "float"
    }
}

/// The plain fp32 reference layer on the GPU (moe_reference.cu), for checks of large shapes.
public struct GPUReference: @unchecked Sendable {
    let gemm1: Kernel
    let gemm2: Kernel

    public static func request(dtype: DType) -> KernelLibrary.Request {
        let type = kernelTypeName(dtype)
        return KernelLibrary.Request(
            source: .reference, expressions: ["moe_reference_gemm1<\(type)>", "moe_reference_gemm2<\(type)>"])
    }

    public init(library: KernelLibrary, dtype: DType) throws(CUDAError) {
        let request = GPUReference.request(dtype: dtype)
        gemm1 = try library.kernel(request.expressions[0], in: request)
        gemm2 = try library.kernel(request.expressions[1], in: request)
    }

    /// `out [M, H]` fp32 from the same inputs as the layer; `ids` must hold local expert ids or -1
    /// (the reference skips negative ids). `scratch` holds `[M*k, I]` floats.
    public func forward(
        x: DevicePointer, w1: DevicePointer, w2: DevicePointer, ids: DevicePointer, weights: DevicePointer,
        shape: MoEShape, tokens: Int, activation: Activation, scratch: DevicePointer, out: DevicePointer, stream: Stream
    ) throws(CUDAError) {
        guard tokens > 0 else { return }
        let (k, h, i) = (shape.topK, shape.hidden, shape.intermediate)
        let outputs1 = tokens * k * i
        try gemm1.launch(
            grid: Dimensions(min((outputs1 + 7) / 8, 65535 * 16)), block: Dimensions(256), on: stream,
            arguments: [x, w1, ids, Int64(tokens), Int32(k), Int64(h), Int64(i), Int32(activation == .silu ? 0 : 1), scratch])
        let outputs2 = tokens * h
        try gemm2.launch(
            grid: Dimensions(min((outputs2 + 7) / 8, 65535 * 16)), block: Dimensions(256), on: stream,
            arguments: [scratch, w2, ids, weights, Int64(tokens), Int32(k), Int64(h), Int64(i), out])
    }
}
