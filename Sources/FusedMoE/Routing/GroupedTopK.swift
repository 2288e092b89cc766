/// Grouped top-k routing (DeepSeek-V2/V3, Kimi-K2), and one entry that routes as a model's config says.
///
/// The selection is vLLM's `grouped_topk` (vllm/model_executor/layers/fused_moe/fused_moe.py, the torch path,
/// also in cpu_fused_moe.py), which for sigmoid scores with a correction bias is SGLang's
/// `biased_grouped_topk_impl` (python/sglang/srt/layers/moe/topk.py):
/// ```
/// scores  = softmax(logits) or sigmoid(logits)              # fp32
/// choice  = scores + bias                  (bias given)     # picks experts; never weights them
///         = scores                         (no bias)
/// group   = top-2 sum of choice per group  (bias given)     # vLLM and SGLang with a bias
///         = max of choice per group        (no bias)        # vLLM's grouped_topk without a bias
/// keep the topKGroups best groups; mask every other expert to -inf
/// ids     = top-k of the masked choice scores
/// weights = scores[ids] (without the bias), / their sum when renormalize, then * scalingFactor
/// ```
/// Two details differ from what SGLang does elsewhere: SGLang's unbiased `grouped_topk_gpu` masks with 0
/// rather than -inf (the same choice for softmax scores, which are >= 0), and SGLang usually leaves the
/// routed scaling factor to the layer's output; vLLM multiplies the weights, as done here.
/// Torch leaves ties and the output order unspecified (`topk(sorted=False)`); here ties go to the
/// lower index everywhere (groups and experts) and the k slots are in descending order of choice score.
///
/// The arithmetic is fp32 in a fixed order that the GPU kernel (`moe_grouped_topk`, moe_topk.cu)
/// repeats step for step, so both give the same ids and bitwise the same weights:
/// - exp is `RouterArithmetic.exp`, a fixed sequence of correctly rounded fp32 operations
///   (not the C library's or CUDA's `expf`, which differ in the last place);
/// - the softmax sum runs as a warp does: 32 partial sums (partial `l` adds experts `l, l + 32, ...`
///   in order), then a butterfly (`p[l] + p[l ^ 16]`, then 8, 4, 2, 1);
/// - the renormalizing sum adds the k chosen scores in slot order.
extension Router {
    /// Grouped top-k routing as vLLM's `grouped_topk` and SGLang's `biased_grouped_topk` do it: the
    /// `topKGroups` best of `groups` expert groups, then the k best experts inside them.
    ///
    /// - Parameters:
    ///   - logits: `[M, E]` router logits, finite.
    ///   - correctionBias: `[E]` fp32 (DeepSeek-V3's `e_score_correction_bias`): added to the scores to
    ///     choose groups and experts, not to weight them; nil for none.
    ///   - topK: experts per token, in `1...topKGroups * E / groups`.
    ///   - groups: expert groups (`n_group`), dividing E; with a bias, each group needs 2 experts or more.
    ///   - topKGroups: groups kept per token (`topk_group`), in `1...groups`.
    ///   - scoring: softmax over the E logits, or a sigmoid per logit.
    ///   - renormalize: divide the k weights by their sum (`norm_topk_prob`).
    ///   - scalingFactor: multiplies every weight (`routed_scaling_factor`), finite and > 0.
    /// - Returns: ids `[M, k]` in descending order of choice score (ties to the lower expert), and their weights.
    /// - Throws: `MoEError.invalidArgument` naming the argument: `router_logits` (shape, non-finite),
    ///   `groups`, `topKGroups`, `topK`, `correctionBias` (count, non-finite) or `scalingFactor`.
    public static func groupedTopK<T: MoEScalar>(
        logits: HostTensor<T>, correctionBias: [Float]?, topK: Int, groups: Int, topKGroups: Int,
        scoring: MoERoutingConfig.Scoring, renormalize: Bool, scalingFactor: Float
    ) throws(MoEError) -> Routing {
        guard logits.rank == 2 else {
            throw .invalidArgument("router_logits", "expected shape [M, E], got \(logits.shape)")
        }
        let (tokens, experts) = (logits.shape[0], logits.shape[1])
        try validateGrouped(
            experts: experts, topK: topK, groups: groups, topKGroups: topKGroups, hasBias: correctionBias != nil,
            scalingFactor: scalingFactor)
        if let correctionBias {
            guard correctionBias.count == experts else {
                throw .invalidArgument(
                    "correctionBias", "expected \(experts) values (one per expert), got \(correctionBias.count)")
            }
            if let index = correctionBias.firstIndex(where: { !$0.isFinite }) {
                throw .invalidArgument(
                    "correctionBias", "entry \(index) is \(correctionBias[index]); expected finite values")
            }
        }
        let groupSize = experts / groups
        var ids = [Int32](repeating: 0, count: tokens * topK)
        var weights = [Float](repeating: 0, count: tokens * topK)
        var scores = [Float](repeating: 0, count: experts)
        var choice = [Float](repeating: 0, count: experts)
        var groupScores = [Float](repeating: 0, count: groups)
        var groupTaken = [Bool](repeating: false, count: groups)
        var eligible = [Bool](repeating: false, count: experts)
        for token in 0..<tokens {
            let row = logits.storage[(token * experts)..<((token + 1) * experts)]
            for (expert, value) in row.enumerated() {
                let logit = value.floatValue
                guard logit.isFinite else {
                    throw .invalidArgument("router_logits", "row \(token) holds \(logit); expected finite logits")
                }
                scores[expert] = logit
            }
            switch scoring {
            case .softmax: RouterArithmetic.softmaxInPlace(&scores)
            case .sigmoid:
                for expert in 0..<experts { scores[expert] = RouterArithmetic.sigmoid(scores[expert]) }
            }
            for expert in 0..<experts {
                choice[expert] = correctionBias.map { scores[expert] + $0[expert] } ?? scores[expert]
            }

            // Group scores: the sum of the two largest choice scores with a bias, the largest without.
            // When every group is kept, their scores do not matter.
            let keepAll = topKGroups == groups
            for group in 0..<groups {
                groupTaken[group] = keepAll
                if keepAll { continue }
                var (best, second) = (-Float.infinity, -Float.infinity)
                for expert in (group * groupSize)..<((group + 1) * groupSize) {
                    let value = choice[expert]
                    if value > best {
                        second = best
                        best = value
                    } else if value > second {
                        second = value
                    }
                }
                groupScores[group] = correctionBias == nil ? best : best + second
            }
            for _ in 0..<(keepAll ? 0 : topKGroups) {
                var pick = -1
                for group in 0..<groups where !groupTaken[group] {
                    if pick < 0 || groupScores[group] > groupScores[pick] { pick = group }
                }
                groupTaken[pick] = true
            }
            for expert in 0..<experts { eligible[expert] = groupTaken[expert / groupSize] }

            // The k largest choice scores among the kept groups' experts, lower index first on ties.
            var selected: Float = 0
            for slot in 0..<topK {
                var pick = -1
                for expert in 0..<experts where eligible[expert] {
                    if pick < 0 || choice[expert] > choice[pick] { pick = expert }
                }
                eligible[pick] = false
                ids[token * topK + slot] = Int32(pick)
                weights[token * topK + slot] = scores[pick]
                selected += scores[pick]
            }
            for slot in 0..<topK {
                var weight = weights[token * topK + slot]
                if renormalize { weight = weight / selected }
                weights[token * topK + slot] = weight * scalingFactor
            }
        }
        return try Routing(tokens: tokens, topK: topK, ids: ids, weights: weights)
    }

    /// Routes `logits` as a model's config says: `softmaxTopK` for plain softmax top-k (one group, no
    /// bias, no scaling), `groupedTopK` for everything else (groups, sigmoid scores, a correction bias, a
    /// routed scaling factor).
    ///
    /// `config.method` is not consulted: like vLLM, a model's groups are used whenever it has them.
    /// - Parameters:
    ///   - logits: `[M, E]` router logits.
    ///   - config: scoring, renormalization, groups, kept groups and scaling factor (from `config.json`).
    ///   - topK: experts per token.
    ///   - correctionBias: `[E]` (`e_score_correction_bias`), or nil.
    /// - Throws: the errors of `softmaxTopK` or `groupedTopK`.
    public static func route<T: MoEScalar>(
        logits: HostTensor<T>, config: MoERoutingConfig, topK: Int, correctionBias: [Float]? = nil
    ) throws(MoEError) -> Routing {
        if config.isPlainSoftmaxTopK && correctionBias == nil {
            return try softmaxTopK(logits: logits, topK: topK, renormalize: config.renormalize)
        }
        return try groupedTopK(
            logits: logits, correctionBias: correctionBias, topK: topK, groups: config.groups,
            topKGroups: config.topKGroups, scoring: config.scoring, renormalize: config.renormalize,
            scalingFactor: Float(config.scalingFactor))
    }

    /// The argument checks `groupedTopK` and the GPU's grouped router share.
    static func validateGrouped(
        experts: Int, topK: Int, groups: Int, topKGroups: Int, hasBias: Bool, scalingFactor: Float
    ) throws(MoEError) {
        guard experts >= 1 else { throw .invalidArgument("router_logits", "expected E >= 1 columns, got \(experts)") }
        guard groups >= 1 && groups <= experts && experts % groups == 0 else {
            throw .invalidArgument("groups", "must be >= 1 and divide the \(experts) experts, got \(groups)")
        }
        guard !hasBias || experts / groups >= 2 else {
            throw .invalidArgument(
                "groups",
                "with a correction bias a group's score is the sum of its 2 best experts, so each group needs 2 "
                    + "experts or more; \(groups) groups of \(experts) experts have \(experts / groups)")
        }
        guard topKGroups >= 1 && topKGroups <= groups else {
            throw .invalidArgument("topKGroups", "must be in 1...\(groups) (the number of groups), got \(topKGroups)")
        }
        let reachable = topKGroups * (experts / groups)
        guard topK >= 1 && topK <= reachable else {
            throw .invalidArgument(
                "topK",
                "must be in 1...\(reachable) (the experts in \(topKGroups) of \(groups) groups of "
                    + "\(experts / groups)), got \(topK)")
        }
        guard scalingFactor.isFinite && scalingFactor > 0 else {
            throw .invalidArgument("scalingFactor", "must be finite and > 0, got \(scalingFactor)")
        }
    }
}

extension MoERoutingConfig {
    /// True when the config is plain softmax top-k (with or without renormalization): softmax scores,
    /// one group, a scaling factor of 1. `Router.route` sends these to `Router.softmaxTopK`.
    public var isPlainSoftmaxTopK: Bool { scoring == .softmax && groups == 1 && topKGroups == 1 && scalingFactor == 1 }
}

/// The router's fp32 arithmetic, written as a fixed sequence of correctly rounded operations (add,
/// multiply, divide, fused multiply-add, round to integer) that the GPU kernel repeats literally, so
/// the two agree bit for bit. Keep the two in step: moe_topk.cu, `router_exp` and `moe_grouped_topk`.
enum RouterArithmetic {
    /// e^x within about 1 ulp: Cephes' `expf` reduction and polynomial with fused multiply-adds, the
    /// power of two applied in two exact-or-once-rounded steps. NaN stays NaN.
    static func exp(_ x: Float) -> Float {
        if x.isNaN { return x }
        if x > 0x1.62e43p+6 { return .infinity }  // above log(FLT_MAX)
        if x < -0x1.9fe368p+6 { return 0 }  // below log(2^-150): rounds to 0
        let n = (x * 0x1.715476p+0).rounded(.toNearestOrEven)
        var r = x.addingProduct(-n, 0x1.63p-1)  // ln 2 in two parts: 0.693359375 (exact) ...
        r = r.addingProduct(-n, -0x1.bd0106p-13)  // ... and ln 2 - 0.693359375
        var p: Float = 0x1.a0d2cep-13
        p = (0x1.6e879cp-10 as Float).addingProduct(p, r)
        p = (0x1.11121p-7 as Float).addingProduct(p, r)
        p = (0x1.555382p-5 as Float).addingProduct(p, r)
        p = (0x1.555554p-3 as Float).addingProduct(p, r)
        p = (0x1p-1 as Float).addingProduct(p, r)
        let y = r.addingProduct(p, r * r) + 1
        let exponent = Int32(n)
        let half = exponent / 2
        return y * Float(bitPattern: UInt32(half + 127) << 23) * Float(bitPattern: UInt32(exponent - half + 127) << 23)
    }

    /// 1 / (1 + e^-x).
    static func sigmoid(_ x: Float) -> Float { 1 / (1 + exp(-x)) }

    /// Replaces `values` by their softmax: max-subtracted exps over a warp-ordered sum.
    static func softmaxInPlace(_ values: inout [Float]) {
        var maximum = -Float.infinity
        for value in values { maximum = Swift.max(maximum, value) }
        var partials = [Float](repeating: 0, count: 32)
        for index in values.indices {
            values[index] = exp(values[index] - maximum)
            partials[index % 32] += values[index]
        }
        let sum = warpSum(partials)
        for index in values.indices { values[index] = values[index] / sum }
    }

    /// The sum a warp's butterfly (`v += shfl_xor(v, offset)` for offsets 16, 8, 4, 2, 1) leaves in every lane.
    static func warpSum(_ lanes: [Float]) -> Float {
        precondition(lanes.count == 32, "a warp has 32 lanes")
        var values = lanes
        var offset = 16
        while offset > 0 {
            let previous = values
            for lane in 0..<32 { values[lane] = previous[lane] + previous[lane ^ offset] }
            offset >>= 1
        }
        return values[0]
    }
}
