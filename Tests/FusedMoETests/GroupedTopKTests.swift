import Foundation
import Testing

@testable import FusedMoE

/// vLLM's `grouped_topk` written plainly in float64: the reference `Router.groupedTopK` is tested against.
/// Besides ids and weights it returns, per token, the smallest nonzero gap between two values whose
/// order decides the outcome (the last kept group against the first dropped one, each chosen expert
/// against the next): where that gap is below fp32's resolution the two precisions may order differently.
struct Float64GroupedRouter {
    var ids: [Int32] = []
    var weights: [Double] = []
    var margins: [Double] = []

    init(
        logits: [Double], tokens: Int, experts: Int, bias: [Double]?, topK: Int, groups: Int, topKGroups: Int,
        scoring: MoERoutingConfig.Scoring, renormalize: Bool, scaling: Double
    ) {
        let groupSize = experts / groups
        for token in 0..<tokens {
            let row = Array(logits[(token * experts)..<((token + 1) * experts)])
            let scores: [Double]
            switch scoring {
            case .softmax:
                let maximum = row.max()!
                let exps = row.map { Foundation.exp($0 - maximum) }
                let sum = exps.reduce(0, +)
                scores = exps.map { $0 / sum }
            case .sigmoid:
                scores = row.map { 1 / (1 + Foundation.exp(-$0)) }
            }
            let choice = bias.map { b in scores.indices.map { scores[$0] + b[$0] } } ?? scores
            let groupScores = (0..<groups).map { group -> Double in
                let members = choice[(group * groupSize)..<((group + 1) * groupSize)].sorted(by: >)
                return bias == nil ? members[0] : members[0] + members[1]
            }
            // Stable sorts: equal values keep the lower index first.
            let groupOrder = (0..<groups).sorted {
                groupScores[$0] > groupScores[$1] || (groupScores[$0] == groupScores[$1] && $0 < $1)
            }
            let kept = Set(groupOrder.prefix(topKGroups))
            let candidates = (0..<experts).filter { kept.contains($0 / groupSize) }
            let order = candidates.sorted { choice[$0] > choice[$1] || (choice[$0] == choice[$1] && $0 < $1) }
            let chosen = Array(order.prefix(topK))
            var gaps: [Double] = []
            if topKGroups < groups {
                gaps.append(groupScores[groupOrder[topKGroups - 1]] - groupScores[groupOrder[topKGroups]])
            }
            for slot in 0..<min(topK, order.count - 1) { gaps.append(choice[order[slot]] - choice[order[slot + 1]]) }
            margins.append(gaps.filter { $0 > 0 }.min() ?? .infinity)
            let selected = chosen.map { scores[$0] }
            let sum = selected.reduce(0, +)
            ids += chosen.map { Int32($0) }
            weights += selected.map { (renormalize ? $0 / sum : $0) * scaling }
        }
    }
}

/// One random grouped-routing problem.
struct GroupedRoutingCase: CustomStringConvertible {
    var name: String
    var experts: Int
    var topK: Int
    var groups: Int
    var topKGroups: Int
    var scoring: MoERoutingConfig.Scoring
    var renormalize: Bool
    var scaling: Float
    var withBias: Bool

    var description: String { name }

    static let all: [GroupedRoutingCase] = [
        GroupedRoutingCase(
            name: "DeepSeek-V3 with bias", experts: 256, topK: 8, groups: 8, topKGroups: 4, scoring: .sigmoid,
            renormalize: true, scaling: 2.5, withBias: true),
        GroupedRoutingCase(
            name: "DeepSeek-V3 without bias", experts: 256, topK: 8, groups: 8, topKGroups: 4, scoring: .sigmoid,
            renormalize: true, scaling: 2.5, withBias: false),
        GroupedRoutingCase(
            name: "DeepSeek-V3 with bias, not renormalized", experts: 256, topK: 8, groups: 8, topKGroups: 4,
            scoring: .sigmoid, renormalize: false, scaling: 2.5, withBias: true),
        GroupedRoutingCase(
            name: "DeepSeek-V2 softmax", experts: 160, topK: 6, groups: 8, topKGroups: 3, scoring: .softmax,
            renormalize: false, scaling: 16, withBias: false),
        GroupedRoutingCase(
            name: "Kimi-K2 one group", experts: 384, topK: 8, groups: 1, topKGroups: 1, scoring: .sigmoid,
            renormalize: true, scaling: 2.827, withBias: true),
        GroupedRoutingCase(
            name: "odd sizes", experts: 60, topK: 5, groups: 6, topKGroups: 2, scoring: .softmax, renormalize: true,
            scaling: 1, withBias: true),
    ]
}

@Suite struct GroupedTopKTests {
    /// Random logits of `T` and a bias, routed in fp32 and in the float64 reference: ids equal wherever the
    /// decisions are not closer than fp32 can tell apart, weights to 1e-5 relative.
    func compareWithFloat64<T: MoEScalar>(_ test: GroupedRoutingCase, _: T.Type, seed: UInt64) throws {
        let tokens = 64
        var generator = SplitMix64(seed: seed)
        let logits = HostTensor<T>.random(shape: [tokens, test.experts], scale: 4, using: &generator)
        let bias =
            test.withBias ? (0..<test.experts).map { _ in Float.random(in: -0.25..<0.25, using: &generator) } : nil
        let routing = try Router.groupedTopK(
            logits: logits, correctionBias: bias, topK: test.topK, groups: test.groups, topKGroups: test.topKGroups,
            scoring: test.scoring, renormalize: test.renormalize, scalingFactor: test.scaling)
        let reference = Float64GroupedRouter(
            logits: logits.floats.map(Double.init), tokens: tokens, experts: test.experts,
            bias: bias?.map(Double.init), topK: test.topK, groups: test.groups, topKGroups: test.topKGroups,
            scoring: test.scoring, renormalize: test.renormalize, scaling: Double(test.scaling))
        var nearTies = 0
        for token in 0..<tokens {
            let slots = (token * test.topK)..<((token + 1) * test.topK)
            guard reference.margins[token] > 1e-5 else {
                nearTies += 1
                continue
            }
            #expect(Array(routing.ids[slots]) == Array(reference.ids[slots]), "\(test) \(T.dtype) token \(token)")
            for slot in slots {
                let error = abs(Double(routing.weights[slot]) - reference.weights[slot]) / abs(reference.weights[slot])
                let context = "\(test) \(T.dtype) token \(token) slot \(slot)"
                #expect(error < 1e-5, "\(context): \(routing.weights[slot]) vs \(reference.weights[slot])")
            }
            #expect(Set(routing.ids[slots]).count == test.topK)
        }
        #expect(nearTies <= tokens / 8, "\(test) \(T.dtype): \(nearTies) of \(tokens) tokens hold near ties")
    }

    @Test(arguments: GroupedRoutingCase.all)
    func randomLogitsMatchTheFloat64Reference(_ test: GroupedRoutingCase) throws {
        try compareWithFloat64(test, Float.self, seed: 11)
        try compareWithFloat64(test, BFloat16.self, seed: 12)
        try compareWithFloat64(test, Float16.self, seed: 13)
    }

    @Test func renormalizedWeightsSumToTheScalingFactor() throws {
        var generator = SplitMix64(seed: 5)
        let logits = HostTensor<Float>.random(shape: [32, 256], scale: 3, using: &generator)
        let bias = (0..<256).map { _ in Float.random(in: -0.5..<0.5, using: &generator) }
        let routing = try Router.groupedTopK(
            logits: logits, correctionBias: bias, topK: 8, groups: 8, topKGroups: 4, scoring: .sigmoid,
            renormalize: true, scalingFactor: 2.5)
        for token in 0..<32 {
            let weights = routing.weights[(token * 8)..<(token * 8 + 8)]
            #expect(abs(weights.reduce(0, +) - 2.5) < 1e-5)
            // Chosen from at most 4 groups of 32.
            #expect(Set(routing.ids[(token * 8)..<(token * 8 + 8)].map { $0 / 32 }).count <= 4)
        }
    }

    // MARK: - Hand-made cases

    @Test func equalScoresGoToTheLowerGroupAndExpert() throws {
        // sigmoid(0) = 0.5 exactly: every group and every expert ties.
        let logits = try HostTensor<Float>(shape: [1, 8], storage: [Float](repeating: 0, count: 8))
        let plain = try Router.groupedTopK(
            logits: logits, correctionBias: nil, topK: 3, groups: 4, topKGroups: 2, scoring: .sigmoid,
            renormalize: false, scalingFactor: 1)
        #expect(plain.ids == [0, 1, 2])
        #expect(plain.weights == [0.5, 0.5, 0.5])
        let renormalized = try Router.groupedTopK(
            logits: logits, correctionBias: nil, topK: 3, groups: 4, topKGroups: 2, scoring: .sigmoid,
            renormalize: true, scalingFactor: 3)
        #expect(renormalized.ids == [0, 1, 2])
        #expect(renormalized.weights.allSatisfy { abs($0 - 1) < 1e-6 })
    }

    @Test func biasedGroupTiesAndExpertTies() throws {
        // Scores are all 0.5; choice = 0.5 + bias. Group top-2 sums: 1.25, 1.25, 1.25, 1.0 (exact in fp32):
        // groups 0 and 1 are kept. Experts: 0 (0.75), 3 (0.75), then 1 and 2 tie at 0.5: 1.
        let logits = try HostTensor<Float>(shape: [1, 8], storage: [Float](repeating: 0, count: 8))
        let bias: [Float] = [0.25, 0, 0, 0.25, 0.125, 0.125, 0, 0]
        let routing = try Router.groupedTopK(
            logits: logits, correctionBias: bias, topK: 3, groups: 4, topKGroups: 2, scoring: .sigmoid,
            renormalize: true, scalingFactor: 2.5)
        #expect(routing.ids == [0, 3, 1])
        // Weights are the scores without the bias: 0.5 each, renormalized to 1/3, times 2.5.
        for weight in routing.weights { #expect(abs(weight - 2.5 / 3) < 1e-6) }
    }

    @Test func withABiasGroupsAreScoredByTheirTwoBestExperts() throws {
        // Group 0 holds the single best expert but a weak second; group 1 holds two strong ones.
        // Top-2 sums keep group 1 (vLLM / SGLang with a bias); the max alone would keep group 0.
        let logits = try HostTensor<Float>(shape: [1, 8], storage: [6, -6, -6, -6, 2, 2, -6, -6])
        let bias = [Float](repeating: 0, count: 8)
        let biased = try Router.groupedTopK(
            logits: logits, correctionBias: bias, topK: 2, groups: 2, topKGroups: 1, scoring: .sigmoid,
            renormalize: false, scalingFactor: 1)
        #expect(biased.ids == [4, 5])
        let unbiased = try Router.groupedTopK(
            logits: logits, correctionBias: nil, topK: 2, groups: 2, topKGroups: 1, scoring: .sigmoid,
            renormalize: false, scalingFactor: 1)
        #expect(unbiased.ids == [0, 1])
        #expect(abs(Double(unbiased.weights[0]) - 1 / (1 + Foundation.exp(-6.0))) < 1e-7)
    }

    @Test func theBiasChoosesButDoesNotWeight() throws {
        let logits = try HostTensor<Float>(shape: [1, 4], storage: [1, 0, 0, 0])
        let routing = try Router.groupedTopK(
            logits: logits, correctionBias: [0, 0, 0, 1], topK: 1, groups: 2, topKGroups: 1, scoring: .sigmoid,
            renormalize: false, scalingFactor: 1)
        #expect(routing.ids == [3])
        #expect(routing.weights == [0.5])
    }

    @Test func softmaxScoresWithGroupMaxima() throws {
        // Group maxima 3, 3, 3, 1: groups 0 and 1 are kept; experts 0 and 3 tie at 3 in score, both chosen.
        let logits = try HostTensor<Float>(shape: [2, 8], storage: [3, 0, 0, 3, 3, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8])
        let routing = try Router.groupedTopK(
            logits: logits, correctionBias: nil, topK: 2, groups: 4, topKGroups: 2, scoring: .softmax,
            renormalize: false, scalingFactor: 1)
        #expect(Array(routing.ids[0..<2]) == [0, 3])
        #expect(Array(routing.ids[2..<4]) == [7, 6])
        let row = [1.0, 2, 3, 4, 5, 6, 7, 8].map { Foundation.exp($0 - 8) }
        let sum = row.reduce(0, +)
        #expect(abs(Double(routing.weights[2]) - row[7] / sum) < 1e-7)
        #expect(abs(Double(routing.weights[3]) - row[6] / sum) < 1e-7)
    }

    @Test func oneGroupSoftmaxIsSoftmaxTopK() throws {
        var generator = SplitMix64(seed: 8)
        let logits = HostTensor<BFloat16>.random(shape: [50, 128], scale: 3, using: &generator)
        for renormalize in [false, true] {
            let grouped = try Router.groupedTopK(
                logits: logits, correctionBias: nil, topK: 8, groups: 1, topKGroups: 1, scoring: .softmax,
                renormalize: renormalize, scalingFactor: 1)
            let plain = try Router.softmaxTopK(logits: logits, topK: 8, renormalize: renormalize)
            #expect(grouped.ids == plain.ids)
            for (a, b) in zip(grouped.weights, plain.weights) { #expect(abs(a - b) <= 1e-6 * abs(b)) }
        }
    }

    @Test func emptyBatches() throws {
        let logits = try HostTensor<Float>(shape: [0, 16], storage: [])
        let routing = try Router.groupedTopK(
            logits: logits, correctionBias: nil, topK: 2, groups: 4, topKGroups: 2, scoring: .sigmoid,
            renormalize: true, scalingFactor: 1)
        #expect(routing.tokens == 0 && routing.ids.isEmpty)
    }

    // MARK: - Errors

    func argumentName(_ body: () throws(MoEError) -> Routing) -> String? {
        do {
            _ = try body()
            return nil
        } catch {
            guard case .invalidArgument(let name, _) = error else { return "\(error)" }
            return name
        }
    }

    @Test func badArgumentsNameTheArgument() throws {
        let logits = try HostTensor<Float>(shape: [2, 8], storage: (0..<16).map { Float($0) / 8 })
        func route(
            _ logits: HostTensor<Float>, bias: [Float]? = nil, topK: Int = 2, groups: Int = 4, topKGroups: Int = 2,
            scaling: Float = 1
        ) -> String? {
            argumentName { () throws(MoEError) in
                try Router.groupedTopK(
                    logits: logits, correctionBias: bias, topK: topK, groups: groups, topKGroups: topKGroups,
                    scoring: .sigmoid, renormalize: true, scalingFactor: scaling)
            }
        }
        #expect(route(logits) == nil)
        #expect(route(logits, groups: 3) == "groups")  // 3 does not divide 8
        #expect(route(logits, groups: 0) == "groups")
        // One expert per group has no top-2 sum.
        #expect(route(logits, bias: [Float](repeating: 0, count: 8), groups: 8, topKGroups: 2) == "groups")
        #expect(route(logits, topKGroups: 5) == "topKGroups")
        #expect(route(logits, topKGroups: 0) == "topKGroups")
        #expect(route(logits, topK: 5, topKGroups: 2) == "topK")  // 2 groups of 2 hold 4 experts
        #expect(route(logits, topK: 0) == "topK")
        #expect(route(logits, bias: [0, 0, 0]) == "correctionBias")
        #expect(route(logits, bias: [0, 0, 0, .nan, 0, 0, 0, 0]) == "correctionBias")
        #expect(route(logits, scaling: 0) == "scalingFactor")
        #expect(route(logits, scaling: .infinity) == "scalingFactor")
        #expect(route(try HostTensor<Float>(shape: [8], storage: [Float](repeating: 0, count: 8))) == "router_logits")
        var bad = logits
        bad.storage[9] = .infinity
        #expect(route(bad) == "router_logits")
    }

    // MARK: - Config dispatch

    @Test func routeFollowsTheConfig() throws {
        var generator = SplitMix64(seed: 21)
        let logits = HostTensor<Float>.random(shape: [16, 64], scale: 2, using: &generator)
        let plain = MoERoutingConfig(renormalize: true)
        #expect(plain.isPlainSoftmaxTopK)
        #expect(
            try Router.route(logits: logits, config: plain, topK: 4)
                == Router.softmaxTopK(logits: logits, topK: 4, renormalize: true))

        let deepSeek = MoERoutingConfig(
            scoring: .sigmoid, renormalize: true, groups: 8, topKGroups: 4, scalingFactor: 2.5, method: "noaux_tc")
        #expect(!deepSeek.isPlainSoftmaxTopK)
        let bias = (0..<64).map { _ in Float.random(in: -0.1..<0.1, using: &generator) }
        let routed = try Router.route(logits: logits, config: deepSeek, topK: 4, correctionBias: bias)
        let grouped = try Router.groupedTopK(
            logits: logits, correctionBias: bias, topK: 4, groups: 8, topKGroups: 4, scoring: .sigmoid,
            renormalize: true,
            scalingFactor: 2.5)
        #expect(routed == grouped)

        // A bias alone sends plain softmax through the grouped router with one group.
        let biasedSoftmax = try Router.route(logits: logits, config: plain, topK: 4, correctionBias: bias)
        #expect(
            biasedSoftmax
                == (try Router.groupedTopK(
                    logits: logits, correctionBias: bias, topK: 4, groups: 1, topKGroups: 1, scoring: .softmax,
                    renormalize: true,
                    scalingFactor: 1)))
    }

    // MARK: - Arithmetic

    @Test func routerExpIsWithinTwoUlps() {
        var x: Float = -103.9
        var worst = 0.0
        while x < 88.7 {
            let exact = Foundation.exp(Double(x))
            let value = Double(RouterArithmetic.exp(x))
            // Subnormal results carry fewer bits: measure them against the smallest normal's ulp.
            let ulp = Double(Float(exact).ulp.isFinite ? max(Float(exact).ulp, Float.leastNormalMagnitude.ulp) : 0)
            worst = max(worst, abs(value - exact) / ulp)
            x += 0.0137
        }
        #expect(worst <= 2, "worst error \(worst) ulp")
        #expect(RouterArithmetic.exp(0) == 1)
        #expect(RouterArithmetic.exp(100) == .infinity)
        #expect(RouterArithmetic.exp(-110) == 0)
        #expect(RouterArithmetic.exp(.nan).isNaN)
        #expect(RouterArithmetic.sigmoid(0) == 0.5)
    }

    @Test func warpSumIsTheButterflyOrder() {
        // 2^24 in lane 0, -2^24 in lane 16, 1 elsewhere: in lane order every 1 after 2^24 rounds away (sum 15);
        // the butterfly cancels the two large values first and keeps all thirty 1s.
        var lanes = [Float](repeating: 1, count: 32)
        lanes[0] = 0x1p24
        lanes[16] = -0x1p24
        #expect(RouterArithmetic.warpSum(lanes) == 30)
        #expect(lanes.reduce(0, +) == 15)
    }
}
