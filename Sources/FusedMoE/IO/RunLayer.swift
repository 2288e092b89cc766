/// The core of `fused-moe run`: reads a layer's inputs from a safetensors file, checks them, runs
/// `FusedMoE`, and returns the tensors to write.
///
/// The input file holds `x [M, H]`, `w1 [E, 2I, H]` (gate rows, then up rows), `w2 [E, H, I]`,
/// and either `router_logits [M, E]` (routed here by softmax top-k) or `topk_ids [M, k]` (I32 or
/// I64; -1 marks an unrouted slot) with `topk_weights [M, k]`. Floats may be BF16, F16 or F32.
/// The outputs are `out [M, H]` in the run's dtype and, when it routed, `topk_ids [M, k]` (I32)
/// and `topk_weights [M, k]` (F32).
public enum RunLayer {
    /// Where the layer runs.
    public enum Backend: Sendable {
        case cpu
        case cuda(KernelLibrary)

        /// `cpu`, or `cuda` with the GPU's name.
        public var name: String {
            switch self {
            case .cpu: "cpu"
            case .cuda(let library): "cuda (\(library.device.properties.name))"
            }
        }
    }

    /// What the command line sets.
    public struct Settings: Hashable, Sendable {
        /// k when routing from `router_logits`; with `topk_ids` it must agree with their columns.
        public var topK: Int?
        /// Renormalize the top-k softmax weights (routing from `router_logits` only).
        public var renormalize: Bool
        /// The function between the projections.
        public var activation: Activation
        /// The type to compute in; nil takes `x`'s, and then `w1` and `w2` must have it too.
        public var dtype: DType?
        /// Grouped routing (DeepSeek): scores, groups kept, scaling. Nil: softmax top-k. Its
        /// `renormalize` is replaced by `renormalize` above; a `correction_bias [E]` tensor in the
        /// input is used when present.
        public var grouped: MoERoutingConfig?
        /// How each token's k rows are summed (GPU; `CombineMode`): ordered by default.
        public var combine: CombineMode = .ordered

        /// The command line's defaults: no k, no renormalization, SwiGLU, x's dtype.
        public init(topK: Int? = nil, renormalize: Bool = false, activation: Activation = .silu, dtype: DType? = nil) {
            self.topK = topK
            self.renormalize = renormalize
            self.activation = activation
            self.dtype = dtype
        }
    }

    /// What a run produced.
    public struct Result: Sendable {
        /// `out`, then `topk_ids` and `topk_weights` when the run routed from logits.
        public var outputs: [SafetensorsTensor]
        /// Written as the output file's `__metadata__`.
        public var metadata: [String: String]
        /// The layer's shape, from `w1` and the routing's k.
        public var shape: MoEShape
        /// M, the rows of `x`.
        public var tokens: Int
        /// The type the layer computed in and `out` is stored in.
        public var dtype: DType
        /// Whether the run routed `router_logits` itself (and so wrote `topk_ids`, `topk_weights`).
        public var routedFromLogits: Bool
        /// Conversions made and settings ignored, for the user to see.
        public var notes: [String]
    }

    /// The type a run computes in: `settings.dtype`, else `x`'s.
    /// - Throws: `MoEError.invalidArgument("x", ...)` when `x` is missing or not a float tensor.
    public static func dtype(input: SafetensorsFile, settings: Settings) throws(MoEError) -> DType {
        let x = try required(input, "x", "[M, H], the hidden states")
        guard let type = x.dtype.floatType else {
            throw .invalidArgument("x", "dtype \(x.dtype); expected BF16, F16 or F32")
        }
        return settings.dtype ?? type
    }

    /// Reads `inputPath`, runs the layer, and writes the outputs to `outputPath` atomically.
    /// - Throws: the errors of `run(input:settings:backend:)`, and `MoEError.invalidArgument`
    ///   naming a path that cannot be read or written.
    @discardableResult
    public static func run(inputPath: String, outputPath: String, settings: Settings, backend: Backend)
        throws(MoEError) -> Result
    {
        let result = try run(input: try SafetensorsFile(path: inputPath), settings: settings, backend: backend)
        try SafetensorsFile.write(result.outputs, metadata: result.metadata, to: outputPath)
        return result
    }

    /// Runs the layer on the tensors of `input`.
    /// - Throws: `MoEError.invalidArgument(tensor, ...)` naming the tensor that is missing, of the
    ///   wrong rank, shape or dtype, or holding an expert id out of range; `MoEError.unsupported`
    ///   for fp32 on the CUDA backend; `MoEError.cuda` when the GPU fails.
    public static func run(input: SafetensorsFile, settings: Settings, backend: Backend) throws(MoEError) -> Result {
        switch try dtype(input: input, settings: settings) {
        case .bf16: try run(BFloat16.self, input: input, settings: settings, backend: backend)
        case .fp16: try run(Float16.self, input: input, settings: settings, backend: backend)
        case .fp32: try run(Float.self, input: input, settings: settings, backend: backend)
        }
    }

    private static func required(_ input: SafetensorsFile, _ name: String, _ meaning: String) throws(MoEError)
        -> SafetensorsTensorInfo
    {
        guard let info = input.info(name) else {
            throw .invalidArgument(name, "missing from '\(input.path)'; expected \(name) \(meaning)")
        }
        return info
    }

    private static func floatType(_ info: SafetensorsTensorInfo) throws(MoEError) -> DType {
        guard let type = info.dtype.floatType else {
            throw .invalidArgument(info.name, "dtype \(info.dtype); expected BF16, F16 or F32")
        }
        return type
    }

    private static func run<T: MoEScalar>(_: T.Type, input: SafetensorsFile, settings: Settings, backend: Backend)
        throws(MoEError) -> Result
    {
        var notes: [String] = []
        let xInfo = try required(input, "x", "[M, H], the hidden states")
        let w1Info = try required(input, "w1", "[E, 2I, H], gate and up projections stacked (gate rows first)")
        let w2Info = try required(input, "w2", "[E, H, I], the down projections")

        // One element type for x, w1 and w2: the same in the file, or converted on request.
        for info in [xInfo, w1Info, w2Info] {
            let type = try floatType(info)
            guard type != T.dtype else { continue }
            guard settings.dtype != nil else {
                throw .invalidArgument(
                    info.name,
                    "dtype \(info.dtype) differs from x's \(xInfo.dtype); x, w1 and w2 must agree, or pass --dtype "
                        + "(bf16, fp16 or fp32) to convert them to one type")
            }
            notes.append("converted \(info.name) from \(info.dtype) to \(T.dtype)")
        }

        guard xInfo.shape.count == 2 else {
            throw .invalidArgument("x", "expected rank 2 [M, H], got shape \(xInfo.shape)")
        }
        let (tokens, hidden) = (xInfo.shape[0], xInfo.shape[1])
        guard w1Info.shape.count == 3 else {
            throw .invalidArgument("w1", "expected rank 3 [E, 2I, H], got shape \(w1Info.shape)")
        }
        let experts = w1Info.shape[0]
        guard experts >= 1, w1Info.shape[1] >= 2, w1Info.shape[1] % 2 == 0 else {
            throw .invalidArgument(
                "w1", "expected [E, 2I, H] with E >= 1 and an even, non-zero 2I (gate and up), got \(w1Info.shape)")
        }
        let intermediate = w1Info.shape[1] / 2
        guard w1Info.shape[2] == hidden else {
            throw .invalidArgument(
                "w1", "expected [E, 2I, H] with H = \(hidden) (x's columns), got \(w1Info.shape)")
        }
        guard w2Info.shape == [experts, hidden, intermediate] else {
            throw .invalidArgument(
                "w2",
                "expected [E, H, I] = [\(experts), \(hidden), \(intermediate)] (from w1 and x), got \(w2Info.shape)")
        }

        let routing: Routing
        let routedFromLogits: Bool
        let logitsInfo = input.info("router_logits")
        let idsInfo = input.info("topk_ids")
        let weightsInfo = input.info("topk_weights")
        if let logitsInfo {
            guard idsInfo == nil else {
                throw .invalidArgument(
                    "router_logits", "the file holds both router_logits and topk_ids; expected one way of routing")
            }
            _ = try floatType(logitsInfo)
            guard logitsInfo.shape == [tokens, experts] else {
                throw .invalidArgument(
                    "router_logits",
                    "expected [M, E] = [\(tokens), \(experts)] (x's rows, w1's experts), got \(logitsInfo.shape)")
            }
            guard let topK = settings.topK else {
                throw .invalidArgument(
                    "top-k", "required when routing from router_logits; expected k in 1...\(experts)")
            }
            guard (1...experts).contains(topK) else {
                throw .invalidArgument("top-k", "expected k in 1...\(experts) (the experts of w1), got \(topK)")
            }
            let logits = try input.tensor("router_logits", as: Float.self)
            if var grouped = settings.grouped {
                grouped.renormalize = settings.renormalize
                let bias = input.info("correction_bias") == nil
                    ? nil : try input.tensor("correction_bias", as: Float.self).storage
                routing = try Router.route(logits: logits, config: grouped, topK: topK, correctionBias: bias)
            } else {
                routing = try Router.softmaxTopK(logits: logits, topK: topK, renormalize: settings.renormalize)
            }
            routedFromLogits = true
        } else {
            guard let idsInfo else {
                throw .invalidArgument(
                    "router_logits",
                    "missing from '\(input.path)'; expected router_logits [M, E], or topk_ids [M, k] with "
                        + "topk_weights [M, k]")
            }
            guard let weightsInfo else {
                throw .invalidArgument(
                    "topk_weights", "missing from '\(input.path)'; topk_ids needs topk_weights [M, k]")
            }
            guard idsInfo.dtype.isIndexType else {
                throw .invalidArgument("topk_ids", "dtype \(idsInfo.dtype); expected I32 or I64")
            }
            guard idsInfo.shape.count == 2, idsInfo.shape[0] == tokens, idsInfo.shape[1] >= 1 else {
                throw .invalidArgument(
                    "topk_ids", "expected [M, k] with M = \(tokens) (x's rows) and k >= 1, got \(idsInfo.shape)")
            }
            let topK = idsInfo.shape[1]
            guard topK <= experts else {
                throw .invalidArgument("topk_ids", "k = \(topK) columns exceed the \(experts) experts of w1")
            }
            if let requested = settings.topK, requested != topK {
                throw .invalidArgument("top-k", "\(requested) disagrees with topk_ids' \(topK) columns")
            }
            _ = try floatType(weightsInfo)
            guard weightsInfo.shape == idsInfo.shape else {
                throw .invalidArgument(
                    "topk_weights", "expected [M, k] = \(idsInfo.shape) like topk_ids, got \(weightsInfo.shape)")
            }
            if settings.renormalize {
                notes.append("--renormalize applies to router_logits; topk_weights are used as given")
            }
            let ids = try input.integers("topk_ids")
            let weights = try input.tensor("topk_weights", as: Float.self)
            routing = try Routing(tokens: tokens, topK: topK, ids: ids.storage, weights: weights.storage)
            try routing.validate(experts: experts)
            routedFromLogits = false
        }

        let weights = try MoEWeights(
            w1: try input.tensor("w1", as: T.self), w2: try input.tensor("w2", as: T.self), topK: routing.topK)
        let options = MoEOptions(
            activation: settings.activation, renormalize: settings.renormalize, combine: settings.combine)
        let layer: FusedMoE<T>
        switch backend {
        case .cpu: layer = try FusedMoE(weights: weights, options: options, backend: .cpu)
        case .cuda(let library): layer = try FusedMoE(weights: weights, options: options, backend: .cuda(library))
        }
        let out = try layer.forward(x: try input.tensor("x", as: T.self), routing: routing)

        var outputs = [SafetensorsTensor(name: "out", out)]
        if routedFromLogits {
            let shape = [tokens, routing.topK]
            outputs.append(SafetensorsTensor(name: "topk_ids", try HostTensor(shape: shape, storage: routing.ids)))
            outputs.append(
                SafetensorsTensor(name: "topk_weights", try HostTensor(shape: shape, storage: routing.weights)))
        }
        let metadata = [
            "format": "pt", "producer": "fused-moe run", "backend": backend.name,
            "activation": settings.activation.rawValue, "dtype": T.dtype.rawValue, "combine": settings.combine.rawValue,
        ]
        return Result(
            outputs: outputs, metadata: metadata, shape: weights.shape, tokens: tokens, dtype: T.dtype,
            routedFromLogits: routedFromLogits, notes: notes)
    }
}
