import CUDA

/// `fused-moe bench` on the GPU: CUDA-graph replays of the whole layer per batch size and split
/// setting, with the floor from ceilings measured in the same run.
public final class GPUBench {
    public let library: KernelLibrary
    let stream: Stream
    let tools: DeviceTools

    public init(library: KernelLibrary) throws(CUDAError) {
        self.library = library
        try library.prepare(DeviceTools.requests + [GPUReference.request(dtype: .bf16), GPUReference.request(dtype: .fp16)])
        tools = try DeviceTools(library: library)
        stream = try Stream(device: library.device)
    }

    /// Device-to-device copy bandwidth (bytes read plus written) over a 1 GiB buffer, median of 20.
    public func measureCopyBandwidth() throws(CUDAError) -> Double {
        let bytes = 1 << 30
        let source = try DeviceBuffer(device: library.device, byteCount: bytes)
        let destination = try DeviceBuffer(device: library.device, byteCount: bytes)
        try tools.fillUniform(source.pointer, count: bytes / 4, dtype: .fp32, seed: 1, scale: 1, stream: stream)
        let start = try Event(device: library.device)
        let end = try Event(device: library.device)
        var samples: [Double] = []
        for iteration in 0..<23 {
            try start.record(on: stream)
            try destination.copy(from: source, byteCount: bytes, on: stream)
            try end.record(on: stream)
            let milliseconds = try Event.elapsedMilliseconds(from: start, to: end)
            if iteration >= 3 { samples.append(milliseconds) }
        }
        return 2.0 * Double(bytes) / (HostClock.median(samples) / 1000)
    }

    /// A timed setting: a fixed split, or the plan's own choice (`auto`).
    public enum Setting: Hashable, Sendable {
        case auto
        /// The plan's own choice launched without programmatic dependent launch, for comparison.
        case autoSequential
        /// The plan's own kernels with the activation in GEMM1's epilogue forced on or off (where the
        /// kernel can), for comparison.
        case autoFusion(activation: Bool)
        /// The plan's own choice with align always run (no identity routing for one token).
        case autoAligned
        case split(Int, SplitMode)

        public var label: (variant: String, split: String) {
            switch self {
            case .split(let k, let mode): ("mma", k == 1 ? "none" : mode.rawValue + "\(k)")
            default: ("auto" + variantSuffix, "plan")
            }
        }

        /// What a row of a plan's-own-kernels setting adds to the kernel label: "" for the plan as
        /// chosen, "-nopdl", "-fused", "-unfused" or "-aligned" for the comparisons.
        public var variantSuffix: String {
            switch self {
            case .auto, .split: ""
            case .autoSequential: "-nopdl"
            case .autoFusion(let activation): activation ? "-fused" : "-unfused"
            case .autoAligned: "-aligned"
            }
        }

        /// The plan's own kernels (every setting but a fixed split).
        public var isAuto: Bool {
            if case .split = self { return false }
            return true
        }

        /// The settings `bench --fusion-ab` adds: the activation fused and not, and align always run.
        public static let fusionComparison: [Setting] = [.autoFusion(activation: true), .autoFusion(activation: false), .autoAligned]
    }

    /// The settings of the PR's table: SPLIT_K in {1, 2, 4, 8} in both modes, plus the plan's own.
    public static let tableSettings: [Setting] =
        [.auto, .split(1, .none)] + [2, 4, 8].flatMap { k in [Setting.split(k, .atomic), .split(k, .workspace)] }

    /// A placement diagnostic (NOTES v25): device memory of the size the environment variable `name`
    /// gives, held by the caller so that what it allocates next lands after it; nil when unset or not
    /// positive.
    func pad(_ name: String) throws(CUDAError) -> DeviceBuffer? {
        guard let bytes = environmentInteger(name, atLeast: 1) else { return nil }
        return try DeviceBuffer(device: library.device, byteCount: bytes)
    }

    /// Times every setting at every batch size for one shape.
    public func run(
        preset: ShapePreset, batchSizes: [Int], settings: [Setting], dtype: DType, ceilings: Ceilings, rotations: Int,
        seed: UInt64, stages: Bool = false, touched: [Int: Int] = [:], combine: CombineMode = .ordered,
        heuristic: Bool = false, progress: (String) -> Void
    ) throws -> [BenchRow] {
        let shape = preset.shape
        let multiprocessors = library.device.properties.multiprocessorCount
        func plan(_ setting: Setting, _ tokens: Int) throws -> MoEPlan {
            switch setting {
            case .auto, .autoSequential, .autoFusion, .autoAligned:
                var chosen = try PlanSelector.plan(
                    shape: shape, tokens: tokens, multiprocessors: multiprocessors,
                    sharedMemoryLimit: library.device.properties.sharedMemoryPerBlockOptIn,
                    deviceName: library.device.properties.name,
                    architecture: library.device.properties.architecture, tables: !heuristic)
                if case .autoFusion(let activation) = setting { chosen.fusedActivation = activation }
                if setting == .autoAligned { chosen.identityRouting = false }
                return chosen
            case .split(let k, let mode):
                return PlanSelector.heuristic(shape: shape, tokens: tokens, multiprocessors: multiprocessors).withSplit(k, mode: mode)
            }
        }
        var requests: [KernelLibrary.Request] = []
        for tokens in batchSizes {
            for setting in settings {
                let chosen = try plan(setting, tokens)
                requests += CUDAMoELayer.requests(
                    dtype: dtype, plan: chosen, activation: .silu,
                    atomicCombine: CUDAMoELayer.sumsInGEMM2(combine: combine, topK: shape.topK, plan: chosen))
            }
        }
        let compileStart = HostClock.now()
        try library.prepare(requests)
        let source = PlanSelector.planSource(
            shape: shape, deviceName: library.device.properties.name, architecture: library.device.properties.architecture,
            tables: !heuristic)
        progress("\(preset.name): plans from \(source)")
        progress("\(preset.name): \(Set(requests).count) kernel programs ready in \(format(HostClock.now() - compileStart, 1)) s (compiled \(library.cache.compiled), from cache \(library.cache.loaded))")

        // FUSED_MOE_BENCH_WEIGHT_PAD_BYTES=N: N bytes held before the weights.
        let weightPad = try pad("FUSED_MOE_BENCH_WEIGHT_PAD_BYTES")
        defer { withExtendedLifetime(weightPad) {} }
        let weights = try LayerWeights(tools: tools, shape: shape, dtype: dtype, seed: seed, stream: stream)
        var rows: [BenchRow] = []
        for (index, tokens) in batchSizes.enumerated() {
            // FUSED_MOE_BENCH_PAD_BYTES=N: N bytes held while the row runs, before its inputs and layer.
            let rowPad = try pad("FUSED_MOE_BENCH_PAD_BYTES")
            defer { withExtendedLifetime(rowPad) {} }
            let inputs = try (0..<rotations).map { rotation in
                let setSeed = seed &+ UInt64(1000 * tokens + rotation)
                let input = try LayerInputs(tools: tools, shape: shape, dtype: dtype, tokens: tokens, seed: setSeed, stream: stream)
                if let target = touched[tokens] {
                    let draws = try redrawRouting(input, touching: target, seed: setSeed)
                    if rotation == 0 { progress("\(preset.name) M=\(tokens): routing drawn to touch \(target) experts (\(draws) draws for the first set)") }
                }
                return input
            }
            let reference = try inputs[0].reference(weights: weights, library: library, stream: stream)
            // The timed graph runs every input set once, each with its own routing: the floor is the mean
            // of their floors, and the experts touched the mean of their counts.
            let touchedCounts = try inputs.map { input in
                Set(try input.ids.download(count: tokens * shape.topK, as: Int32.self)).count
            }
            let touched = Double(touchedCounts.reduce(0, +)) / Double(touchedCounts.count)
            let floor = ceilings.meanFloorMilliseconds(
                shape: shape, tokens: tokens, expertsTouched: touchedCounts, dtype: dtype)
            let burstFloor = ceilings.burst?.meanFloorMilliseconds(
                shape: shape, tokens: tokens, expertsTouched: touchedCounts, dtype: dtype)
            let out = try DeviceBuffer(device: library.device, byteCount: tokens * shape.hidden * dtype.byteCount)
            for setting in settings {
                let layerPlan = try plan(setting, tokens)
                let layer = try CUDAMoELayer(
                    library: library, shape: shape, dtype: dtype, w1: weights.w1, w2: weights.w2,
                    options: MoEOptions(combine: combine), plan: layerPlan, maxTokens: tokens,
                    programmaticDependentLaunch: setting != .autoSequential)
                // Correctness of this very configuration, poisoned first.
                let error = relativeError(try inputs[0].runPoisoned(layer, out: out, stream: stream).values, reference)

                let milliseconds = try time(layer: layer, inputs: inputs, out: out)
                let label = setting.label
                var row = BenchRow(
                    shape: preset.name, moeShape: shape, tokens: tokens,
                    variant: (setting.isAuto ? GPUBench.kernelLabel(layerPlan) + setting.variantSuffix : label.variant)
                        + (layer.usesAtomicCombine && combine == .atomic ? "-atomic" : ""),
                    splitK: max(layerPlan.gemm1.splitK, layerPlan.gemm2.splitK),
                    splitMode: setting.isAuto ? "plan:\(layerPlan.gemm1.effectiveMode.rawValue)\(layerPlan.gemm1.splitK)/\(layerPlan.gemm2.effectiveMode.rawValue)\(layerPlan.gemm2.splitK)" : label.split,
                    milliseconds: milliseconds, floorMilliseconds: floor, relativeError: error, expertsTouched: touched)
                row.burstFloorMilliseconds = burstFloor
                if stages {
                    row.stages = try stageBreakdown(layer: layer, inputs: inputs[0], out: out)
                    progress("    stages: " + row.stages.map { "\($0.0) \(format($0.1, 4))" }.joined(separator: ", "))
                    for line in try tileTimeline(layer: layer, inputs: inputs[0], out: out) { progress("    " + line) }
                }
                rows.append(row)
                progress("[\(index + 1)/\(batchSizes.count)] \(preset.name) M=\(tokens) \(label.variant) \(row.splitMode): \(format(milliseconds, 4)) ms, \(format(row.percentOfFloor, 1))% of floor, rel_err \(formatScientific(error)) [\(layerPlan)]")
            }
        }
        return rows
    }

    /// The most routings `redrawRouting` draws before it gives up.
    static let routingDraws = 10_000

    /// Redraws `input`'s routing (seeds derived from `seed`; the activations and weights kept) until it
    /// touches exactly `target` experts: a memory-bound row then streams the weights a peer's run of
    /// that many experts streamed (`bench --touched-like`). Returns the draws it took (1: the first).
    func redrawRouting(_ input: LayerInputs, touching target: Int, seed: UInt64) throws -> Int {
        let (shape, tokens) = (input.shape, input.tokens)
        let reachable = min(shape.experts, tokens * shape.topK)
        guard tokens > 0, (shape.topK...reachable).contains(target) else {
            throw MoEError.invalidArgument(
                "--touched-like",
                "\(tokens) tokens with top-\(shape.topK) of \(shape.experts) experts touch \(shape.topK)...\(reachable) experts, not \(target)")
        }
        for draw in 0..<GPUBench.routingDraws {
            if draw > 0 {
                try tools.fillRandomIDs(
                    input.ids.pointer, tokens: tokens, topK: shape.topK, experts: shape.experts,
                    seed: seed &+ 1 &+ UInt64(draw) &* 0x9E37_79B9_7F4A_7C15, stream: stream)
                try stream.synchronize()
            }
            if Set(try input.ids.download(count: tokens * shape.topK, as: Int32.self)).count == target { return draw + 1 }
        }
        throw MoEError.invalidArgument(
            "--touched-like", "no routing of \(tokens) tokens touched exactly \(target) of \(shape.experts) experts in \(GPUBench.routingDraws) draws")
    }

    /// "wgmma", or "wgmma_swap+mma" when the GEMMs use different kernels.
    static func kernelLabel(_ plan: MoEPlan) -> String {
        plan.gemm1.kernel == plan.gemm2.kernel
            ? plan.gemm1.kernel.rawValue : plan.gemm1.kernel.rawValue + "+" + plan.gemm2.kernel.rawValue
    }

    /// Runs `layer`'s forward back to back for about `milliseconds` (their count from one timed forward),
    /// so that what is timed next runs with the card at its steady clock under that load: for a layer
    /// that draws enough power, an H200's power cap (bench/NOTES.md v30). 0 does nothing.
    func sustain(layer: CUDAMoELayer, inputs: LayerInputs, out: DeviceBuffer, milliseconds: Double) throws {
        guard milliseconds > 0 else { return }
        let start = try Event(device: library.device)
        let end = try Event(device: library.device)
        try start.record(on: stream)
        try inputs.forward(layer, out: out, stream: stream)
        try end.record(on: stream)
        let once = max(try Event.elapsedMilliseconds(from: start, to: end), 1e-3)
        for _ in 0..<min(Int(milliseconds / once), 20_000) { try inputs.forward(layer, out: out, stream: stream) }
        try stream.synchronize()
    }

    /// Median milliseconds of each stage of one forward (align, gemm1, activation, gemm2, combine),
    /// from events recorded between the stages over `repeats` plain (not graph) forwards.
    func stageBreakdown(layer: CUDAMoELayer, inputs: LayerInputs, out: DeviceBuffer, repeats: Int = 20) throws
        -> [(String, Double)]
    {
        let device = library.device
        var names: [String] = []
        var samples: [[Double]] = []
        for _ in 0..<repeats {
            var events = [try Event(device: device)]
            var stageNames: [String] = []
            try events[0].record(on: stream)
            try inputs.forward(layer, out: out, stream: stream) { (name: String) throws(CUDAError) in
                let event = try Event(device: device)
                try event.record(on: self.stream)
                events.append(event)
                stageNames.append(name)
            }
            try stream.synchronize()
            names = stageNames
            var row: [Double] = []
            for index in 1..<events.count {
                row.append(try Event.elapsedMilliseconds(from: events[index - 1], to: events[index]))
            }
            samples.append(row)
        }
        return names.indices.map { index in (names[index], HostClock.median(samples.map { $0[index] })) }
    }

    /// The swap-AB GEMMs' per-program timeline of one plain forward, for kernels compiled with the
    /// diagnostic MOE_SM90_DIAG_TIMES=1 (none otherwise): per GEMM, the median program's microseconds from
    /// its start to its first wgmma, in its K loop and in its epilogue, and the share of each SM's span
    /// (its first program's start to its last program's end) spent between programs (NOTES v39).
    func tileTimeline(layer: CUDAMoELayer, inputs: LayerInputs, out: DeviceBuffer) throws -> [String] {
        for _ in 0..<3 { try inputs.forward(layer, out: out, stream: stream) }
        guard let (gemm1, gemm2) = try layer.diagnosticTimes(stream: stream) else { return [] }
        return [("gemm1", gemm1), ("gemm2", gemm2)].compactMap { name, values in
            GPUBench.timelineSummary(name: name, records: values)
        }
    }

    /// One GEMM's line of `tileTimeline` from its records (8 values per program: SM id, clock at start, at
    /// the first wgmma, after the K loop, after the epilogue, global time at start and at the end); nil
    /// when no program ran a tile.
    static func timelineSummary(name: String, records: [UInt64]) -> String? {
        struct Program { var sm: UInt64; var clocks: [Double]; var start: Double; var end: Double }
        var programs: [Program] = []
        var stride = 0
        while stride + 8 <= records.count {
            let r = Array(records[stride..<(stride + 8)])
            stride += 8
            guard r[4] != 0, r[2] != 0, r[6] > r[5] else { continue }  // no tile (or not this kernel)
            programs.append(Program(
                sm: r[0], clocks: [Double(r[1]), Double(r[2]), Double(r[3]), Double(r[4])], start: Double(r[5]), end: Double(r[6])))
        }
        guard !programs.isEmpty else { return nil }
        // Cycles per nanosecond, from each program's clock and global-time spans.
        let ghz = HostClock.median(programs.map { ($0.clocks[3] - $0.clocks[0]) / max($0.end - $0.start, 1) })
        func micros(_ from: Int, _ to: Int) -> Double {
            HostClock.median(programs.map { ($0.clocks[to] - $0.clocks[from]) / ghz / 1000 })
        }
        // Per SM: the span from its first program's start to its last one's end, less its programs' own time.
        var span = 0.0, gaps = 0.0
        for (_, group) in Dictionary(grouping: programs, by: \.sm) {
            let first = group.map(\.start).min()!, last = group.map(\.end).max()!
            span += last - first
            gaps += (last - first) - group.map { $0.end - $0.start }.reduce(0, +)
        }
        let kernel = (programs.map(\.end).max()! - programs.map(\.start).min()!) / 1000
        return "\(name) timeline: \(programs.count) tiles on \(Set(programs.map(\.sm)).count) SMs, \(format(ghz, 2)) GHz, "
            + "\(format(kernel, 1)) us first start to last end; median tile \(format(micros(0, 1), 2)) us to its first wgmma, "
            + "\(format(micros(1, 2), 2)) K loop, \(format(micros(2, 3), 2)) epilogue; between programs "
            + "\(format(100 * gaps / max(span, 1), 1))% of the SMs' spans"
    }

    /// Median milliseconds per forward: a graph of `rotations` forwards (one per input set, so
    /// repeated runs do not just re-read L2) replayed after warm-up.
    func time(layer: CUDAMoELayer, inputs: [LayerInputs], out: DeviceBuffer) throws -> Double {
        let graph = try Graph(capturing: stream) {
            for input in inputs { try input.forward(layer, out: out, stream: stream) }
        }
        let start = try Event(device: library.device)
        let end = try Event(device: library.device)
        // Warm up, and size the number of timed replays to about 0.3 s.
        try start.record(on: stream)
        for _ in 0..<3 { try graph.launch(on: stream) }
        try end.record(on: stream)
        let warm = try Event.elapsedMilliseconds(from: start, to: end) / 3
        let replays = min(max(Int(300 / max(warm, 1e-3)), 10), 200)
        var samples: [Double] = []
        for _ in 0..<replays {
            try start.record(on: stream)
            try graph.launch(on: stream)
            try end.record(on: stream)
            samples.append(try Event.elapsedMilliseconds(from: start, to: end))
        }
        return HostClock.median(samples) / Double(inputs.count)
    }
}
