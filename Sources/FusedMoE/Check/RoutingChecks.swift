import CUDA

/// The GPU routers against the CPU routers on fresh random inputs: softmax top-k (`moe_topk_softmax`
/// against `Router.softmaxTopK`, renormalized or not) and grouped top-k (`moe_grouped_topk` against
/// `Router.groupedTopK`: sigmoid and softmax scores, with and without a correction bias, scaled), with
/// bf16, fp16 and fp32 logits at M = 1, 7 and 1000.
///
/// Outputs are poisoned first (ids -7, weights NaN), so an entry the kernel did not write fails. A case
/// passes when every id equals the CPU's and every weight is within 1e-5 relative. The grouped router
/// is built to match bit for bit (the same fp32 operations in the same order); the softmax router uses
/// the platform's exp on each side, so an fp32 near tie may swap two experts: the detail says how many
/// differing ids are such swaps (the two weights within 1e-5 of each other).
public enum RoutingChecks {
    /// The batch sizes every case runs.
    public static let batchSizes = [1, 7, 1000]
    /// The bound on the relative difference of a weight.
    public static let weightTolerance = 1e-5

    struct SoftmaxCase {
        var name: String
        var experts: Int
        var topK: Int
        var renormalize: Bool
    }

    struct GroupedCase {
        var name: String
        var experts: Int
        var topK: Int
        var groups: Int
        var topKGroups: Int
        var scoring: MoERoutingConfig.Scoring
        var renormalize: Bool
        var scaling: Float
        var withBias: Bool
    }

    static let softmaxCases = [
        SoftmaxCase(name: "E=128 k=8", experts: 128, topK: 8, renormalize: false),
        SoftmaxCase(name: "E=128 k=8 renormalized", experts: 128, topK: 8, renormalize: true),
        SoftmaxCase(name: "E=8 k=2 renormalized", experts: 8, topK: 2, renormalize: true),
    ]

    static let groupedCases = [
        GroupedCase(
            name: "DeepSeek-V3 E=256 8 groups keep 4 k=8 sigmoid bias renorm x2.5", experts: 256, topK: 8, groups: 8,
            topKGroups: 4, scoring: .sigmoid, renormalize: true, scaling: 2.5, withBias: true),
        GroupedCase(
            name: "E=256 8 groups keep 4 k=8 sigmoid no bias renorm x2.5", experts: 256, topK: 8, groups: 8,
            topKGroups: 4, scoring: .sigmoid, renormalize: true, scaling: 2.5, withBias: false),
        GroupedCase(
            name: "E=256 8 groups keep 4 k=8 sigmoid bias x2.5", experts: 256, topK: 8, groups: 8, topKGroups: 4,
            scoring: .sigmoid, renormalize: false, scaling: 2.5, withBias: true),
        GroupedCase(
            name: "DeepSeek-V2 E=160 8 groups keep 3 k=6 softmax x16", experts: 160, topK: 6, groups: 8,
            topKGroups: 3, scoring: .softmax, renormalize: false, scaling: 16, withBias: false),
        GroupedCase(
            name: "Kimi-K2 E=384 1 group k=8 sigmoid bias renorm x2.827", experts: 384, topK: 8, groups: 1,
            topKGroups: 1, scoring: .sigmoid, renormalize: true, scaling: 2.827, withBias: true),
    ]

    /// Runs every case on `library`'s GPU; one result per case and logits type, covering all batch sizes.
    public static func run(library: KernelLibrary, seed: UInt64) -> [CheckResult] {
        let requests = DType.allCases.flatMap { [GPURouter.request(dtype: $0), GPUGroupedRouter.request(dtype: $0)] }
        let stream: Stream
        do {
            try library.prepare(requests)
            stream = try Stream(device: library.device)
        } catch {
            return [CheckResult(name: "gpu routing setup", passed: false, detail: error.description)]
        }
        var results: [CheckResult] = []
        var caseSeed = seed
        for dtype in DType.allCases {
            for test in softmaxCases {
                caseSeed &+= 1
                results.append(softmax(test, dtype: dtype, library: library, stream: stream, seed: caseSeed))
            }
        }
        for dtype in DType.allCases {
            for test in groupedCases {
                caseSeed &+= 1
                results.append(grouped(test, dtype: dtype, library: library, stream: stream, seed: caseSeed))
            }
        }
        return results
    }

    // MARK: - Cases

    static func softmax(_ test: SoftmaxCase, dtype: DType, library: KernelLibrary, stream: Stream, seed: UInt64)
        -> CheckResult
    {
        let name = "gpu route softmax top-k \(test.name) \(dtype)"
        do {
            let router = try GPURouter(library: library, logitsDType: dtype)
            var generator = SplitMix64(seed: seed)
            var outcomes: [Outcome] = []
            for tokens in batchSizes {
                outcomes.append(
                    try compare(
                        dtype: dtype, tokens: tokens, experts: test.experts, topK: test.topK, bias: nil,
                        generator: &generator, library: library, stream: stream,
                        gpu: { logits, _, ids, weights in
                            try router.route(
                                logits: logits, tokens: tokens, experts: test.experts, topK: test.topK,
                                renormalize: test.renormalize, ids: ids, weights: weights, stream: stream)
                        },
                        cpu: SoftmaxOnHost(topK: test.topK, renormalize: test.renormalize)))
            }
            return result(name, outcomes)
        } catch {
            return CheckResult(name: name, passed: false, detail: "\(error)")
        }
    }

    static func grouped(_ test: GroupedCase, dtype: DType, library: KernelLibrary, stream: Stream, seed: UInt64)
        -> CheckResult
    {
        let name = "gpu route grouped top-k \(test.name) \(dtype)"
        do {
            let router = try GPUGroupedRouter(library: library, logitsDType: dtype)
            var generator = SplitMix64(seed: seed)
            var outcomes: [Outcome] = []
            for tokens in batchSizes {
                let bias =
                    test.withBias
                    ? (0..<test.experts).map { _ in Float.random(in: -0.25..<0.25, using: &generator) } : nil
                outcomes.append(
                    try compare(
                        dtype: dtype, tokens: tokens, experts: test.experts, topK: test.topK, bias: bias,
                        generator: &generator, library: library, stream: stream,
                        gpu: { logits, biasPointer, ids, weights in
                            try router.route(
                                logits: logits, correctionBias: biasPointer, tokens: tokens, experts: test.experts,
                                topK: test.topK, groups: test.groups, topKGroups: test.topKGroups,
                                scoring: test.scoring,
                                renormalize: test.renormalize, scalingFactor: test.scaling, ids: ids, weights: weights,
                                stream: stream)
                        },
                        cpu: GroupedOnHost(test: test, bias: bias)))
            }
            return result(name, outcomes)
        } catch {
            return CheckResult(name: name, passed: false, detail: "\(error)")
        }
    }

    // MARK: - Comparison

    /// One batch size's comparison.
    struct Outcome {
        var tokens: Int
        var slots: Int
        var idsDiffering: Int
        /// Differing ids whose GPU and CPU weights are within the tolerance: swaps of near-equal experts.
        var nearTieSwaps: Int
        var maxRelativeError: Double
        var bitwiseEqualWeights: Bool

        var passed: Bool { idsDiffering == 0 && maxRelativeError <= RoutingChecks.weightTolerance }

        var summary: String {
            let error =
                maxRelativeError == 0 && bitwiseEqualWeights ? "0 (bitwise)" : formatScientific(maxRelativeError)
            let swaps = idsDiffering > 0 ? " (\(nearTieSwaps) near-tie swaps)" : ""
            return "M=\(tokens): ids \(idsDiffering)/\(slots) differ\(swaps), weight rel err \(error)"
        }
    }

    static func result(_ name: String, _ outcomes: [Outcome]) -> CheckResult {
        CheckResult(
            name: name, passed: outcomes.allSatisfy(\.passed), detail: outcomes.map(\.summary).joined(separator: "; "))
    }

    /// Random logits in `[-4, 4)` rounded to `dtype`, routed by `gpu` into poisoned outputs and by `cpu`.
    static func compare(
        dtype: DType, tokens: Int, experts: Int, topK: Int, bias: [Float]?, generator: inout SplitMix64,
        library: KernelLibrary, stream: Stream,
        gpu: (DevicePointer, DevicePointer?, DevicePointer, DevicePointer) throws -> Void,
        cpu: some HostRouting
    ) throws -> Outcome {
        let device = library.device
        let logits = AnyLogits(dtype: dtype, tokens: tokens, experts: experts, generator: &generator)
        let logitsBuffer = try DeviceBuffer(device: device, byteCount: max(tokens * experts * dtype.byteCount, 4))
        try logits.upload(to: logitsBuffer)
        let biasBuffer = try bias.map { values in
            let buffer = try DeviceBuffer(device: device, count: values.count, of: Float.self)
            try buffer.upload(values)
            return buffer
        }
        let slots = tokens * topK
        let ids = try DeviceBuffer(device: device, count: slots, of: Int32.self)
        let weights = try DeviceBuffer(device: device, count: slots, of: Float.self)
        try ids.fill(word: UInt32(bitPattern: -7), on: stream)
        try weights.fill(word: 0x7fc0_0000, on: stream)  // NaN
        try gpu(logitsBuffer.pointer, biasBuffer?.pointer, ids.pointer, weights.pointer)
        try stream.synchronize()
        let gpuIDs = try ids.download(count: slots, as: Int32.self)
        let gpuWeights = try weights.download(count: slots, as: Float.self)
        let expected = try logits.route(with: cpu)

        var outcome = Outcome(
            tokens: tokens, slots: slots, idsDiffering: 0, nearTieSwaps: 0, maxRelativeError: 0,
            bitwiseEqualWeights: true)
        for slot in 0..<slots {
            let (got, want) = (gpuWeights[slot], expected.weights[slot])
            let error =
                got == want ? 0 : (got.isFinite && want != 0 ? Double(abs(got - want)) / Double(abs(want)) : .infinity)
            if gpuIDs[slot] != expected.ids[slot] {
                outcome.idsDiffering += 1
                if error <= weightTolerance { outcome.nearTieSwaps += 1 }
            }
            outcome.maxRelativeError = max(outcome.maxRelativeError, error)
            if got.bitPattern != want.bitPattern { outcome.bitwiseEqualWeights = false }
        }
        return outcome
    }

    /// Random logits of one of the three element types.
    enum AnyLogits {
        case bf16(HostTensor<BFloat16>)
        case fp16(HostTensor<Float16>)
        case fp32(HostTensor<Float>)

        init(dtype: DType, tokens: Int, experts: Int, generator: inout SplitMix64) {
            let shape = [tokens, experts]
            switch dtype {
            case .bf16: self = .bf16(.random(shape: shape, scale: 4, using: &generator))
            case .fp16: self = .fp16(.random(shape: shape, scale: 4, using: &generator))
            case .fp32: self = .fp32(.random(shape: shape, scale: 4, using: &generator))
            }
        }

        func upload(to buffer: DeviceBuffer) throws(CUDAError) {
            switch self {
            case .bf16(let tensor): try buffer.upload(tensor.storage)
            case .fp16(let tensor): try buffer.upload(tensor.storage)
            case .fp32(let tensor): try buffer.upload(tensor.storage)
            }
        }

        /// The logits routed by `router`, whatever their element type.
        func route(with router: some HostRouting) throws(MoEError) -> Routing {
            switch self {
            case .bf16(let tensor): try router.route(tensor)
            case .fp16(let tensor): try router.route(tensor)
            case .fp32(let tensor): try router.route(tensor)
            }
        }
    }
}

extension RoutingChecks {
    /// A CPU router, generic over the logits' element type.
    protocol HostRouting {
        func route<T: MoEScalar>(_ logits: HostTensor<T>) throws(MoEError) -> Routing
    }

    /// `Router.softmaxTopK` with its settings.
    struct SoftmaxOnHost: HostRouting {
        var topK: Int
        var renormalize: Bool

        func route<T: MoEScalar>(_ logits: HostTensor<T>) throws(MoEError) -> Routing {
            try Router.softmaxTopK(logits: logits, topK: topK, renormalize: renormalize)
        }
    }

    /// `Router.groupedTopK` with a case's settings.
    struct GroupedOnHost: HostRouting {
        var test: RoutingChecks.GroupedCase
        var bias: [Float]?

        func route<T: MoEScalar>(_ logits: HostTensor<T>) throws(MoEError) -> Routing {
            try Router.groupedTopK(
                logits: logits, correctionBias: bias, topK: test.topK, groups: test.groups, topKGroups: test.topKGroups,
                scoring: test.scoring, renormalize: test.renormalize, scalingFactor: test.scaling)
        }
    }
}
