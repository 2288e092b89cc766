/// Which experts each token goes to, and with what weight: `ids [M, k]`, `weights [M, k]`.
public struct Routing: Hashable, Sendable {
    public var tokens: Int
    public var topK: Int
    /// Row-major `[M, k]` expert ids.
    public var ids: [Int32]
    /// Row-major `[M, k]` routed weights.
    public var weights: [Float]

    /// - Throws: `MoEError.invalidArgument` when the counts do not match `tokens * topK`.
    public init(tokens: Int, topK: Int, ids: [Int32], weights: [Float]) throws(MoEError) {
        guard tokens >= 0 else { throw .invalidArgument("tokens", "must be >= 0, got \(tokens)") }
        guard topK >= 1 else { throw .invalidArgument("topK", "must be >= 1, got \(topK)") }
        guard ids.count == tokens * topK else {
            throw .invalidArgument("topk_ids", "expected \(tokens) x \(topK) = \(tokens * topK) ids, got \(ids.count)")
        }
        guard weights.count == tokens * topK else {
            throw .invalidArgument(
                "topk_weights", "expected \(tokens) x \(topK) = \(tokens * topK) weights, got \(weights.count)")
        }
        self.tokens = tokens
        self.topK = topK
        self.ids = ids
        self.weights = weights
    }

    /// Checks every id against the expert count: in `[0, experts)`, or -1 where `allowUnrouted`.
    /// - Throws: `MoEError.invalidArgument("topk_ids", ...)` naming the first bad entry.
    public func validate(experts: Int, allowUnrouted: Bool = true) throws(MoEError) {
        for (index, id) in ids.enumerated() where id < 0 || Int(id) >= experts {
            if id == -1 && allowUnrouted { continue }
            throw .invalidArgument(
                "topk_ids",
                "entry [\(index / topK), \(index % topK)] is \(id); expected an expert id in 0..<\(experts)"
                    + (allowUnrouted ? " or -1" : ""))
        }
        for (index, weight) in weights.enumerated() where !weight.isFinite {
            throw .invalidArgument("topk_weights", "entry [\(index / topK), \(index % topK)] is \(weight); expected a finite value")
        }
    }

    /// The number of distinct experts the routing touches.
    public var expertsTouched: Int { Set(ids.filter { $0 >= 0 }).count }
}

/// Routing functions: from router logits to top-k experts.
public enum Router {
    /// Top-k of softmax(logits) per token: probabilities in fp32, the k largest in descending order,
    /// ties broken by the lower expert id, optionally renormalized to sum to 1 over the k.
    ///
    /// - Parameters:
    ///   - logits: `[M, E]` router logits.
    ///   - topK: experts per token, 1...E.
    ///   - renormalize: divide the k weights by their sum.
    /// - Throws: `MoEError.invalidArgument` for a bad shape, k out of range, or a non-finite logit.
    public static func softmaxTopK<T: MoEScalar>(logits: HostTensor<T>, topK: Int, renormalize: Bool) throws(MoEError)
        -> Routing
    {
        guard logits.rank == 2 else {
            throw .invalidArgument("router_logits", "expected shape [M, E], got \(logits.shape)")
        }
        let (tokens, experts) = (logits.shape[0], logits.shape[1])
        guard experts >= 1 else { throw .invalidArgument("router_logits", "expected E >= 1 columns, got \(experts)") }
        guard topK >= 1 && topK <= experts else {
            throw .invalidArgument("topK", "must be in 1...\(experts) (the number of experts), got \(topK)")
        }
        var ids = [Int32](repeating: 0, count: tokens * topK)
        var weights = [Float](repeating: 0, count: tokens * topK)
        var probabilities = [Float](repeating: 0, count: experts)
        var order = [Int](repeating: 0, count: experts)
        for token in 0..<tokens {
            let row = logits.storage[(token * experts)..<((token + 1) * experts)]
            var maximum = -Float.infinity
            for value in row {
                let v = value.floatValue
                guard v.isFinite else {
                    throw .invalidArgument("router_logits", "row \(token) holds \(v); expected finite logits")
                }
                maximum = Swift.max(maximum, v)
            }
            var sum: Float = 0
            for (expert, value) in row.enumerated() {
                probabilities[expert] = _exp(value.floatValue - maximum)
                sum += probabilities[expert]
            }
            for expert in 0..<experts {
                probabilities[expert] /= sum
                order[expert] = expert
            }
            // Partial selection: k passes, each taking the largest remaining (lowest id on ties).
            for slot in 0..<topK {
                var best = slot
                for candidate in (slot + 1)..<experts {
                    let (p, q) = (probabilities[order[candidate]], probabilities[order[best]])
                    if p > q || (p == q && order[candidate] < order[best]) { best = candidate }
                }
                order.swapAt(slot, best)
            }
            var selected: Float = 0
            for slot in 0..<topK { selected += probabilities[order[slot]] }
            for slot in 0..<topK {
                ids[token * topK + slot] = Int32(order[slot])
                let p = probabilities[order[slot]]
                weights[token * topK + slot] = renormalize ? p / selected : p
            }
        }
        return try Routing(tokens: tokens, topK: topK, ids: ids, weights: weights)
    }
}
