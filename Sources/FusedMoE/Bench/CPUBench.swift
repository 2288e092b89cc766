import Dispatch

/// `fused-moe bench` on the CPU backend.
public enum CPUBench {
    /// Copy bandwidth (a large memcpy, bytes read plus written) and the CPU backend's own fp32
    /// matrix rate on one expert-sized problem, measured now on this machine.
    public static func measureCeilings() -> Ceilings {
        let count = 32 << 20 / 4
        let source = [Float](repeating: 1.25, count: count)
        var destination = [Float](repeating: 0, count: count)
        var samples: [Double] = []
        for _ in 0..<5 {
            let start = HostClock.now()
            destination.withUnsafeMutableBytes { target in
                source.withUnsafeBytes { target.copyMemory(from: $0) }
            }
            samples.append(HostClock.now() - start)
        }
        let copy = 2.0 * Double(count * 4) / HostClock.median(samples)
        precondition(destination[count - 1] == 1.25)

        let (n, k, rows) = (256, 512, 256)
        var generator = SplitMix64(seed: 7)
        let a = (0..<(rows * k)).map { _ in Float.random(in: -1..<1, using: &generator) }
        let b = (0..<(n * k)).map { _ in Float16(Float.random(in: -1..<1, using: &generator)) }
        var c = [Float](repeating: 0, count: rows * n)
        let pairs = [Array(0..<rows)]
        var rateSamples: [Double] = []
        for _ in 0..<3 {
            let start = HostClock.now()
            a.withUnsafeBufferPointer { input in
                c.withUnsafeMutableBufferPointer { output in
                    CPUBackend.groupedGEMM(
                        a: SharedPointer(input), aRowOf: { $0 }, b: b, n: n, kDim: k, pairsOfExpert: pairs,
                        routedWeights: nil, c: SharedPointer(output), round: { $0 })
                }
            }
            rateSamples.append(HostClock.now() - start)
        }
        let rate = 2.0 * Double(rows * n * k) / HostClock.median(rateSamples)
        return Ceilings(copyBytesPerSecond: copy, matrixFlopsPerSecond: rate)
    }

    /// Times the CPU forward for each batch size (median of `repeats` after one warm-up) and
    /// measures its error against the float64 reference.
    public static func run(
        preset: ShapePreset, batchSizes: [Int], dtype: DType, repeats: Int, ceilings: Ceilings, seed: UInt64,
        progress: (String) -> Void
    ) throws(MoEError) -> [BenchRow] {
        switch dtype {
        case .bf16: try run(BFloat16.self, preset, batchSizes, repeats, ceilings, seed, progress)
        case .fp16: try run(Float16.self, preset, batchSizes, repeats, ceilings, seed, progress)
        case .fp32: try run(Float.self, preset, batchSizes, repeats, ceilings, seed, progress)
        }
    }

    static func run<T: MoEScalar>(
        _: T.Type, _ preset: ShapePreset, _ batchSizes: [Int], _ repeats: Int, _ ceilings: Ceilings, _ seed: UInt64,
        _ progress: (String) -> Void
    ) throws(MoEError) -> [BenchRow] {
        guard repeats >= 1 else { throw .invalidArgument("repeats", "must be >= 1, got \(repeats)") }
        var rows: [BenchRow] = []
        for (index, tokens) in batchSizes.enumerated() {
            guard tokens >= 1 else { throw .invalidArgument("batch-sizes", "every batch size must be >= 1, got \(tokens)") }
            progress("[\(index + 1)/\(batchSizes.count)] \(preset.name) M=\(tokens) on the CPU")
            let sample = try RandomCase<T>(shape: preset.shape, tokens: tokens, seed: seed &+ UInt64(tokens))
            var out = try CPUBackend.forward(x: sample.x, routing: sample.routing, weights: sample.weights)
            var samples: [Double] = []
            for _ in 0..<repeats {
                let start = HostClock.now()
                out = try CPUBackend.forward(x: sample.x, routing: sample.routing, weights: sample.weights)
                samples.append(HostClock.now() - start)
            }
            // The float64 reference is single-threaded: compare at most 64 tokens of the batch.
            let checked = min(tokens, 64)
            let subset = try HostTensor<T>(
                shape: [checked, preset.shape.hidden], storage: Array(sample.x.storage.prefix(checked * preset.shape.hidden)))
            let subRouting = try Routing(
                tokens: checked, topK: preset.shape.topK, ids: Array(sample.routing.ids.prefix(checked * preset.shape.topK)),
                weights: Array(sample.routing.weights.prefix(checked * preset.shape.topK)))
            let reference = try Float64Reference.forward(x: subset, routing: subRouting, weights: sample.weights)
            let error = relativeError(out.floats.prefix(checked * preset.shape.hidden), reference)
            let touched = sample.routing.expertsTouched
            rows.append(BenchRow(
                shape: preset.name, moeShape: preset.shape, tokens: tokens, variant: "cpu", splitK: 1,
                splitMode: "none", milliseconds: 1000 * HostClock.median(samples),
                floorMilliseconds: ceilings.floorMilliseconds(
                    shape: preset.shape, tokens: tokens, expertsTouched: touched, dtype: T.dtype),
                relativeError: error, expertsTouched: Double(touched)))
        }
        return rows
    }
}
