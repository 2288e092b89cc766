/// The expert weights of one layer: `w1 [E, 2I, H]` (gate rows first, then up) and `w2 [E, H, I]`.
public struct MoEWeights<T: MoEScalar>: Sendable {
    public let w1: HostTensor<T>
    public let w2: HostTensor<T>
    /// The layer's shape, with `experts` the number of experts held here (local experts under
    /// expert parallelism).
    public let shape: MoEShape

    /// - Throws: `MoEError.invalidArgument` naming `w1` or `w2` when a shape is wrong.
    public init(w1: HostTensor<T>, w2: HostTensor<T>, topK: Int) throws(MoEError) {
        guard w1.rank == 3, w1.isContiguous else {
            throw .invalidArgument("w1", "expected a contiguous [E, 2I, H] tensor, got shape \(w1.shape)")
        }
        guard w1.shape[1] % 2 == 0, w1.shape[1] >= 2 else {
            throw .invalidArgument("w1", "dimension 1 must be 2I (gate and up stacked), an even number; got \(w1.shape[1])")
        }
        let (experts, hidden, intermediate) = (w1.shape[0], w1.shape[2], w1.shape[1] / 2)
        guard w2.rank == 3, w2.isContiguous, w2.shape == [experts, hidden, intermediate] else {
            throw .invalidArgument(
                "w2", "expected a contiguous [E, H, I] = [\(experts), \(hidden), \(intermediate)] tensor, got \(w2.shape)")
        }
        self.w1 = w1
        self.w2 = w2
        self.shape = try MoEShape(experts: experts, topK: topK, hidden: hidden, intermediate: intermediate)
    }

    /// Random weights with entries uniform in `[-scale, scale)`; the default scale keeps outputs
    /// near unit size for unit-size inputs.
    public static func random<G: RandomNumberGenerator>(shape: MoEShape, using generator: inout G) throws(MoEError)
        -> MoEWeights
    {
        let w1 = HostTensor<T>.random(
            shape: [shape.experts, 2 * shape.intermediate, shape.hidden],
            scale: 1.7 / Float(shape.hidden).squareRoot(), using: &generator)
        let w2 = HostTensor<T>.random(
            shape: [shape.experts, shape.hidden, shape.intermediate],
            scale: 1.7 / Float(shape.intermediate).squareRoot(), using: &generator)
        return try MoEWeights(w1: w1, w2: w2, topK: shape.topK)
    }
}

/// What the layer does besides its weights.
public struct MoEOptions: Hashable, Sendable {
    public var activation: Activation
    /// Renormalize the top-k softmax weights to sum to 1 (used when routing from logits).
    public var renormalize: Bool
    /// Expert parallelism: `[E_global]` map from the router's expert ids to this rank's local
    /// experts, -1 where this rank does not own the expert. Nil: every expert is local.
    public var expertMap: [Int32]?
    /// How each token's k expert rows are summed on the GPU: `.ordered` (default) or `.atomic`.
    public var combine: CombineMode

    public init(
        activation: Activation = .silu, renormalize: Bool = false, expertMap: [Int32]? = nil,
        combine: CombineMode = .ordered
    ) {
        self.activation = activation
        self.renormalize = renormalize
        self.expertMap = expertMap
        self.combine = combine
    }

    /// The number of experts the router chooses among: the map's length, or the local count.
    public func routedExperts(local: Int) -> Int { expertMap?.count ?? local }

    /// - Throws: `MoEError.invalidArgument("expert_map", ...)` when an entry is not -1 or a local id.
    public func validate(localExperts: Int) throws(MoEError) {
        guard let expertMap else { return }
        guard !expertMap.isEmpty else { throw .invalidArgument("expert_map", "must have one entry per global expert, got none") }
        for (index, local) in expertMap.enumerated() where local < -1 || Int(local) >= localExperts {
            throw .invalidArgument(
                "expert_map", "entry \(index) is \(local); expected -1 or a local expert id in 0..<\(localExperts)")
        }
    }
}

/// How a layer sums each token's k expert rows (the top-k combine).
public enum CombineMode: String, CaseIterable, Sendable, Hashable {
    /// GEMM2 writes each pair's weighted row; a combine kernel sums a token's k rows in slot order, in
    /// fp32, rounded once. Bitwise reproducible. The default. At k <= 2, where the plan's GEMM2 can,
    /// GEMM2 adds the rows into the zeroed output instead (`CUDAMoELayer.sumsInGEMM2`): the same bits in
    /// either order, and the same as the combine kernel's.
    case ordered
    /// Where the plan's GEMM2 is the persistent or swap-AB wgmma kernel, unsplit (`CUDAMoELayer.allowsAtomicCombine`),
    /// GEMM2 adds each weighted row into its token's output row with 16-bit atomic adds (bf16 or fp16,
    /// rounded at every add) into a zeroed output: no partial rows go to memory and back, and no combine
    /// kernel runs. The sum's order, hence its last bits, varies from run to run, and its rounding error
    /// is larger (within the checks' bounds). Elsewhere, and on the CPU backend, it sums as `.ordered` does.
    case atomic
}
