/// How E experts are spread over `ranks` expert-parallel ranks: contiguous blocks, rank r owning
/// experts `[start(r), start(r + 1))`.
///
/// When E is not a multiple of the rank count, the first `E % ranks` ranks own one expert more
/// (vLLM's `determine_expert_map` does the same), so every rank owns at least one expert.
public struct ExpertPartition: Hashable, Sendable, CustomStringConvertible {
    /// E, the router's expert count.
    public let experts: Int
    /// ep, the number of ranks.
    public let ranks: Int

    /// - Throws: `MoEError.invalidArgument` unless `1 <= ranks <= experts`.
    public init(experts: Int, ranks: Int) throws(MoEError) {
        guard experts >= 1 else { throw .invalidArgument("experts", "must be >= 1, got \(experts)") }
        guard ranks >= 1, ranks <= experts else {
            throw .invalidArgument(
                "ep", "must be in 1...\(experts) (every rank owns at least one of the \(experts) experts), got \(ranks)"
            )
        }
        self.experts = experts
        self.ranks = ranks
    }

    public var description: String { "\(experts) experts over \(ranks) ranks" }

    /// The experts rank `rank` owns, as a range of router expert ids.
    public func experts(of rank: Int) -> Range<Int> {
        precondition(rank >= 0 && rank < ranks, "rank \(rank) outside 0..<\(ranks)")
        let (base, extra) = experts.quotientAndRemainder(dividingBy: ranks)
        let start = rank * base + min(rank, extra)
        return start..<(start + base + (rank < extra ? 1 : 0))
    }

    /// How many experts rank `rank` owns.
    public func localExperts(of rank: Int) -> Int { experts(of: rank).count }

    /// The rank that owns router expert `expert`.
    public func owner(of expert: Int) -> Int {
        precondition(expert >= 0 && expert < experts, "expert \(expert) outside 0..<\(experts)")
        let (base, extra) = experts.quotientAndRemainder(dividingBy: ranks)
        // The first `extra` ranks own base + 1 experts each.
        let large = extra * (base + 1)
        return expert < large ? expert / (base + 1) : extra + (expert - large) / base
    }

    /// The index of `expert` among its owner's experts (its row in the owner's weights).
    public func localIndex(of expert: Int) -> Int {
        expert - experts(of: owner(of: expert)).lowerBound
    }

    /// Rank `rank`'s map from router expert ids to its local experts, -1 where it does not own the
    /// expert: what `MoEOptions.expertMap` takes.
    public func expertMap(rank: Int) -> [Int32] {
        let owned = experts(of: rank)
        return (0..<experts).map { owned.contains($0) ? Int32($0 - owned.lowerBound) : -1 }
    }

    /// Rank `rank`'s slice of the full weights (`w1 [E, 2I, H]`, `w2 [E, H, I]`): its experts' rows,
    /// for a layer of `topK` experts per token.
    /// - Throws: `MoEError.invalidArgument` when `weights` does not hold E experts.
    public func localWeights<T: MoEScalar>(
        _ weights: MoEWeights<T>, rank: Int, topK: Int
    ) throws(MoEError)
        -> MoEWeights<T>
    {
        let shape = weights.shape
        guard shape.experts == experts else {
            throw .invalidArgument("w1", "the weights hold \(shape.experts) experts; the partition is of \(experts)")
        }
        let owned = experts(of: rank)
        let size1 = 2 * shape.intermediate * shape.hidden
        let size2 = shape.hidden * shape.intermediate
        let w1 = try HostTensor(
            shape: [owned.count, 2 * shape.intermediate, shape.hidden],
            storage: Array(weights.w1.storage[(owned.lowerBound * size1)..<(owned.upperBound * size1)]), name: "w1")
        let w2 = try HostTensor(
            shape: [owned.count, shape.hidden, shape.intermediate],
            storage: Array(weights.w2.storage[(owned.lowerBound * size2)..<(owned.upperBound * size2)]), name: "w2")
        return try MoEWeights(w1: w1, w2: w2, topK: topK)
    }

    /// The byte offsets of rank `rank`'s experts in full `w1` and `w2` buffers of `dtype`, and their
    /// lengths: for device views into weights that hold every expert.
    public func localWeightBytes(
        rank: Int, hidden: Int, intermediate: Int, dtype: DType
    ) -> (w1Offset: Int, w1Bytes: Int, w2Offset: Int, w2Bytes: Int) {
        let owned = experts(of: rank)
        let expertBytes = 2 * intermediate * hidden * dtype.byteCount
        let expertBytes2 = hidden * intermediate * dtype.byteCount
        return (
            owned.lowerBound * expertBytes, owned.count * expertBytes, owned.lowerBound * expertBytes2,
            owned.count * expertBytes2
        )
    }
}
