import CUDA

/// `fused-moe ep check`: expert parallelism against the one-GPU (or one-process) layer, bit for bit.
public enum ExpertParallelCheck {
    /// The default shape: small enough to hold every expert on each GPU for the reference, with
    /// several experts per rank up to ep = 8 and k = 4 so tokens split over ranks.
    public static let defaultShape = ShapePreset(
        name: "ep_small", shape: try! MoEShape(experts: 16, topK: 4, hidden: 512, intermediate: 256))

    /// The CPU simulation (`SimulatedExpertParallel`) against `CPUBackend.forward` on the same
    /// inputs, bit for bit, in bf16 and fp32, for `ep` ranks at each batch size (the whole batch, split
    /// over the simulated ranks), with every fifth token's last slot unrouted.
    public static func simulated(
        shape: MoEShape, ep: Int, batchSizes: [Int], seed: UInt64, progress: (CheckResult) -> Void
    ) -> [CheckResult] {
        var results: [CheckResult] = []
        func record(_ result: CheckResult) {
            results.append(result)
            progress(result)
        }
        func one<T: MoEScalar>(_: T.Type, tokens: Int, seed: UInt64) {
            let name = "cpu simulation ep=\(ep) \(shape) M=\(tokens) \(T.dtype)"
            do {
                var sample = try RandomCase<T>(shape: shape, tokens: tokens, seed: seed)
                for token in stride(from: 0, to: tokens, by: 5) {
                    sample.routing.ids[token * shape.topK + shape.topK - 1] = -1
                }
                let start = HostClock.now()
                let single = try CPUBackend.forward(x: sample.x, routing: sample.routing, weights: sample.weights)
                let (simulated, trace) = try SimulatedExpertParallel.run(
                    x: sample.x, routing: sample.routing, weights: sample.weights, ep: ep)
                let differing = differingElements(single.storage, simulated.storage)
                let rows = trace.plans.map(\.totalSendRows).reduce(0, +)
                let pairs = trace.plans.map(\.totalPairs).reduce(0, +)
                let nonzero = tokens == 0 || single.storage.contains { $0.floatValue != 0 }
                record(
                    CheckResult(
                        name: name, passed: differing == 0 && nonzero,
                        detail:
                            "\(differing) elements differ in their bits; \(rows) rows sent for \(pairs) pairs, at most \(trace.counts.maximumReceivedPairs) pairs on a rank; \(format(HostClock.now() - start, 2)) s"
                            + (nonzero ? "" : "; the reference is all zeros")))
            } catch {
                record(CheckResult(name: name, passed: false, detail: "\(error)"))
            }
        }
        for (index, tokens) in batchSizes.enumerated() {
            one(BFloat16.self, tokens: tokens, seed: seed &+ UInt64(2 * index))
            one(Float.self, tokens: tokens, seed: seed &+ UInt64(2 * index + 1))
        }
        return results
    }

    /// The deterministic plans a GPU check runs: the mma kernel unsplit and split in workspace mode,
    /// and on Hopper the wgmma kernel unsplit. Atomic split-K is left out: its sums are not reproducible.
    static func plans(shape: MoEShape, tokens: Int, device: Device) -> [(String, MoEPlan)] {
        let heuristic = PlanSelector.heuristic(
            shape: shape, tokens: tokens, multiprocessors: device.properties.multiprocessorCount)
        var plans = [
            ("mma split=1 none", heuristic.withSplit(1, mode: .none)),
            ("mma split=4 workspace", heuristic.withSplit(4, mode: .workspace)),
        ]
        if device.properties.architecture == "sm_90a" {
            plans.append(("wgmma split=1 none", MoEPlan(both: GemmConfig.wgmma(blockM: 64, blockN: 128, stages: 4))))
        }
        return plans
    }

    /// Every rank at once: this rank's tokens through `ExpertParallelLayer` against a `CUDAMoELayer`
    /// that holds every expert, with the same plan, bit for bit; each batch size is tokens per rank.
    /// Every rank must call it with the same arguments (its steps are collective). The last result
    /// sums every rank's failures.
    /// - Throws: `CUDAError` or `MoEError` when the GPU fails outside a case.
    public static func gpu(
        library: KernelLibrary, exchange: any ExpertParallelExchange, shape: MoEShape, dtype: DType, batchSizes: [Int],
        seed: UInt64, progress: (CheckResult) -> Void
    ) throws -> [CheckResult] {
        let device = library.device
        let stream = try Stream(device: device)
        let (rank, ep, k) = (exchange.rank, exchange.worldSize, shape.topK)
        let partition = try ExpertPartition(experts: shape.experts, ranks: ep)
        var results: [CheckResult] = []
        func record(_ result: CheckResult) {
            results.append(result)
            progress(result)
        }
        try library.prepare(DeviceTools.requests)
        let tools = try DeviceTools(library: library)
        let maxTokens = batchSizes.max() ?? 0
        var requests: [KernelLibrary.Request] = []
        for tokens in batchSizes {
            for (_, plan) in plans(shape: shape, tokens: tokens * ep, device: device) {
                requests += CUDAMoELayer.requests(dtype: dtype, plan: plan, activation: .silu)
            }
        }
        try library.prepare(requests)

        // Every expert's weights, the same on every rank (same seed); each rank's share is a view.
        let (h, i, e) = (shape.hidden, shape.intermediate, shape.experts)
        let w1 = try DeviceBuffer(device: device, byteCount: e * 2 * i * h * dtype.byteCount)
        let w2 = try DeviceBuffer(device: device, byteCount: e * h * i * dtype.byteCount)
        try tools.fillUniform(
            w1.pointer, count: e * 2 * i * h, dtype: dtype, seed: seed, scale: 1.7 / Float(h).squareRoot(),
            stream: stream)
        try tools.fillUniform(
            w2.pointer, count: e * h * i, dtype: dtype, seed: seed &+ 1, scale: 1.7 / Float(i).squareRoot(),
            stream: stream)
        let share = partition.localWeightBytes(rank: rank, hidden: h, intermediate: i, dtype: dtype)
        let localW1 = try DeviceBuffer(
            device: device, borrowing: ExpertParallelDevice.offset(w1.pointer, bytes: share.w1Offset),
            byteCount: share.w1Bytes)
        let localW2 = try DeviceBuffer(
            device: device, borrowing: ExpertParallelDevice.offset(w2.pointer, bytes: share.w2Offset),
            byteCount: share.w2Bytes)

        let x = try DeviceBuffer(device: device, byteCount: max(maxTokens * h * dtype.byteCount, 16))
        let ids = try DeviceBuffer(device: device, count: max(maxTokens * k, 1), of: Int32.self)
        let routed = try DeviceBuffer(device: device, count: max(maxTokens * k, 1), of: Float.self)
        let single = try DeviceBuffer(device: device, byteCount: max(maxTokens * h * dtype.byteCount, 16))
        let parallel = try DeviceBuffer(device: device, byteCount: max(maxTokens * h * dtype.byteCount, 16))

        for tokens in batchSizes {
            // This rank's batch: its own inputs; every fifth token's last slot routed nowhere.
            let caseSeed = seed &+ 1000 &* UInt64(rank + 1) &+ UInt64(tokens)
            try tools.fillUniform(x.pointer, count: tokens * h, dtype: dtype, seed: caseSeed, scale: 1, stream: stream)
            try tools.fillRandomIDs(
                ids.pointer, tokens: tokens, topK: k, experts: e, seed: caseSeed &+ 1, stream: stream)
            try tools.fillUniform(
                routed.pointer, count: tokens * k, dtype: .fp32, seed: caseSeed &+ 2, scale: 1, stream: stream)
            try stream.synchronize()
            var hostIDs = try ids.download(count: tokens * k, as: Int32.self)
            for token in stride(from: 0, to: tokens, by: 5) { hostIDs[token * k + k - 1] = -1 }
            try ids.upload(hostIDs)
            try device.synchronize()

            for (name, plan) in plans(shape: shape, tokens: tokens * ep, device: device) {
                let label = "gpu ep=\(ep) rank \(rank) \(shape) M=\(tokens)/rank \(dtype) \(name)"
                // Layer construction is local and the same on every rank: a plan one rank refuses,
                // every rank refuses, and the collective steps stay in step.
                let reference: CUDAMoELayer
                let layer: ExpertParallelLayer
                do {
                    reference = try CUDAMoELayer(
                        library: library, shape: shape, dtype: dtype, w1: w1, w2: w2, plan: plan, maxTokens: maxTokens)
                    layer = try ExpertParallelLayer(
                        library: library, shape: shape, dtype: dtype, w1: localW1, w2: localW2, plan: plan,
                        maxTokens: maxTokens,
                        exchange: exchange)
                } catch {
                    record(CheckResult(name: label, passed: true, detail: "skipped: \(error)"))
                    continue
                }
                try single.fill(byte: 0xEE, on: stream)
                try parallel.fill(byte: 0xDD, on: stream)
                try reference.forward(
                    x: x.pointer, topkIDs: ids.pointer, topkWeights: routed.pointer, out: single.pointer,
                    tokens: tokens, stream: stream)
                let traffic = try layer.forward(
                    x: x.pointer, topkIDs: ids.pointer, topkWeights: routed.pointer, out: parallel.pointer,
                    tokens: tokens, stream: stream)
                try stream.synchronize()
                let bytes = tokens * h * dtype.byteCount
                let expected = try single.download(count: bytes, as: UInt8.self)
                let got = try parallel.download(count: bytes, as: UInt8.self)
                let size = dtype.byteCount
                let differing = (0..<(tokens * h)).filter { index in
                    (0..<size).contains { expected[index * size + $0] != got[index * size + $0] }
                }.count
                let nonzero = tokens == 0 || expected.contains { $0 != 0 }
                record(
                    CheckResult(
                        name: label, passed: differing == 0 && nonzero,
                        detail:
                            "\(differing) of \(tokens * h) elements differ in their bits; sent \(traffic.sentRows) rows, received \(traffic.receivedRows), computed \(traffic.computedPairs) pairs, \(traffic.copies) row copies"
                            + (nonzero ? "" : "; the reference is all zeros")))
            }
        }
        let failures = Int32(results.filter { !$0.passed }.count)
        let everyRank = try exchange.allGather(host: [failures], stream: stream)
        let total = everyRank.reduce(0, +)
        record(
            CheckResult(
                name: "gpu ep=\(ep) all ranks", passed: total == 0,
                detail: "failures per rank: \(everyRank.map(String.init).joined(separator: ", "))"))
        return results
    }

    /// Elements whose bits differ (-1 when the counts differ).
    static func differingElements<T: BitwiseCopyable>(_ a: [T], _ b: [T]) -> Int {
        guard a.count == b.count else { return -1 }
        let size = MemoryLayout<T>.stride
        return a.withUnsafeBytes { x in
            b.withUnsafeBytes { y in
                (0..<a.count).filter { index in (0..<size).contains { x[index * size + $0] != y[index * size + $0] } }
                    .count
            }
        }
    }
}
