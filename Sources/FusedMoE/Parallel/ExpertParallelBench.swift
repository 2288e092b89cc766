import CUDA

/// One batch size of `fused-moe ep bench`: the median of each phase on each rank, then the
/// slowest rank's (a forward ends when its slowest rank does).
public struct ExpertParallelBenchRow: Sendable {
    public var shape: String
    public var moeShape: MoEShape
    public var ranks: Int
    /// Tokens per rank.
    public var tokens: Int
    public var plan: String
    public var times: ExpertParallelTimes
    /// The most pairs any rank computed.
    public var maximumPairs: Int
    /// The most row copies any rank made (what gather and combine kernels would replace).
    public var maximumCopies: Int

    /// The row as JSON.
    public var json: JSON {
        .object([
            ("shape", .string(shape)), ("E", .number(Double(moeShape.experts))),
            ("topk", .number(Double(moeShape.topK))),
            ("H", .number(Double(moeShape.hidden))), ("I", .number(Double(moeShape.intermediate))),
            ("ep", .number(Double(ranks))), ("M_per_rank", .number(Double(tokens))), ("plan", .string(plan)),
            ("dispatch_ms", .number(times.dispatch)), ("experts_ms", .number(times.experts)),
            ("combine_ms", .number(times.combine)), ("total_ms", .number(times.total)),
            ("max_pairs", .number(Double(maximumPairs))), ("max_copies", .number(Double(maximumCopies))),
        ])
    }
}

/// `fused-moe ep bench`: times dispatch, experts and combine of the expert-parallel layer
/// separately, with CUDA events, on every rank at once.
public enum ExpertParallelBench {
    /// Times each batch size (tokens per rank) on this rank and gathers every rank's medians.
    /// Every rank must call it with the same arguments. Weights and inputs are random (never zeros),
    /// each rank drawing its own; routing is uniform over the E experts.
    /// - Throws: `CUDAError` or `MoEError` when the GPU fails.
    public static func run(
        library: KernelLibrary, exchange: any ExpertParallelExchange, preset: ShapePreset, dtype: DType,
        batchSizes: [Int], repeats: Int, seed: UInt64, progress: (String) -> Void
    ) throws -> [ExpertParallelBenchRow] {
        let device = library.device
        let stream = try Stream(device: device)
        let shape = preset.shape
        let (rank, ep, k, h, i) = (exchange.rank, exchange.worldSize, shape.topK, shape.hidden, shape.intermediate)
        let partition = try ExpertPartition(experts: shape.experts, ranks: ep)
        let properties = device.properties
        // The rows per expert of a rank are those of one GPU running all ranks' tokens, so that is
        // the batch the plan is chosen for.
        func plan(_ tokens: Int) throws(MoEError) -> MoEPlan {
            try PlanSelector.plan(
                shape: shape, tokens: max(tokens * ep, 1), multiprocessors: properties.multiprocessorCount,
                sharedMemoryLimit: properties.sharedMemoryPerBlockOptIn, deviceName: properties.name)
        }
        try library.prepare(DeviceTools.requests)
        let tools = try DeviceTools(library: library)
        var requests: [KernelLibrary.Request] = []
        for tokens in batchSizes {
            requests += CUDAMoELayer.requests(dtype: dtype, plan: try plan(tokens), activation: .silu)
        }
        let start = HostClock.now()
        try library.prepare(requests)
        progress(
            "rank \(rank): \(Set(requests).count) kernel programs ready in \(format(HostClock.now() - start, 1)) s")

        let local = partition.localExperts(of: rank)
        let w1 = try DeviceBuffer(device: device, byteCount: local * 2 * i * h * dtype.byteCount)
        let w2 = try DeviceBuffer(device: device, byteCount: local * h * i * dtype.byteCount)
        try tools.fillUniform(
            w1.pointer, count: local * 2 * i * h, dtype: dtype, seed: seed &+ UInt64(rank),
            scale: 1.7 / Float(h).squareRoot(), stream: stream)
        try tools.fillUniform(
            w2.pointer, count: local * h * i, dtype: dtype, seed: seed &+ 100 &+ UInt64(rank),
            scale: 1.7 / Float(i).squareRoot(), stream: stream)
        let timer = try ExpertParallelTimer(device: device)

        var rows: [ExpertParallelBenchRow] = []
        for tokens in batchSizes {
            let chosen = try plan(tokens)
            let layer = try ExpertParallelLayer(
                library: library, shape: shape, dtype: dtype, w1: w1, w2: w2, plan: chosen, maxTokens: tokens,
                exchange: exchange)
            let x = try DeviceBuffer(device: device, byteCount: max(tokens * h * dtype.byteCount, 16))
            let ids = try DeviceBuffer(device: device, count: max(tokens * k, 1), of: Int32.self)
            let routed = try DeviceBuffer(device: device, count: max(tokens * k, 1), of: Float.self)
            let out = try DeviceBuffer(device: device, byteCount: max(tokens * h * dtype.byteCount, 16))
            let caseSeed = seed &+ 7919 &* UInt64(rank + 1) &+ UInt64(tokens)
            try tools.fillUniform(x.pointer, count: tokens * h, dtype: dtype, seed: caseSeed, scale: 1, stream: stream)
            try tools.fillRandomIDs(
                ids.pointer, tokens: tokens, topK: k, experts: shape.experts, seed: caseSeed &+ 1, stream: stream)
            try tools.fillUniform(
                routed.pointer, count: tokens * k, dtype: .fp32, seed: caseSeed &+ 2, scale: 1, stream: stream)
            var samples: [ExpertParallelTimes] = []
            var traffic = ExpertParallelLayer.Traffic(sentRows: 0, receivedRows: 0, computedPairs: 0, copies: 0)
            for iteration in 0..<(repeats + 2) {  // two warm-ups
                traffic = try layer.forward(
                    x: x.pointer, topkIDs: ids.pointer, topkWeights: routed.pointer, out: out.pointer, tokens: tokens,
                    stream: stream, timer: timer)
                let times = try timer.times()
                if iteration >= 2 { samples.append(times) }
            }
            let median = ExpertParallelTimes(
                dispatch: HostClock.median(samples.map(\.dispatch)), experts: HostClock.median(samples.map(\.experts)),
                combine: HostClock.median(samples.map(\.combine)))
            let everyRank = try exchange.allGather(
                host: [
                    median.dispatch, median.experts, median.combine, Double(traffic.computedPairs),
                    Double(traffic.copies),
                ],
                stream: stream)
            func slowest(_ field: Int) -> Double {
                stride(from: field, to: everyRank.count, by: 5).map { everyRank[$0] }.max() ?? 0
            }
            let row = ExpertParallelBenchRow(
                shape: preset.name, moeShape: shape, ranks: ep, tokens: tokens, plan: chosen.description,
                times: ExpertParallelTimes(dispatch: slowest(0), experts: slowest(1), combine: slowest(2)),
                maximumPairs: Int(slowest(3)), maximumCopies: Int(slowest(4)))
            progress(
                "rank \(rank): M=\(tokens)/rank dispatch \(format(median.dispatch, 3)) ms, experts \(format(median.experts, 3)) ms, combine \(format(median.combine, 3)) ms; \(traffic.computedPairs) pairs, \(traffic.copies) copies"
            )
            rows.append(row)
        }
        return rows
    }

    /// The rows as a table (milliseconds, slowest rank per phase).
    public static func table(_ rows: [ExpertParallelBenchRow]) -> String {
        func pad(_ text: String, _ width: Int) -> String {
            text.count >= width ? text + " " : text + String(repeating: " ", count: width - text.count)
        }
        var lines = [
            pad("shape", 12) + pad("ep", 4) + pad("M/rank", 8) + pad("dispatch_ms", 13) + pad("experts_ms", 12)
                + pad("combine_ms", 12) + pad("total_ms", 10) + pad("max_pairs", 10) + "max_copies"
        ]
        for row in rows {
            lines.append(
                pad(row.shape, 12) + pad("\(row.ranks)", 4) + pad("\(row.tokens)", 8)
                    + pad(format(row.times.dispatch, 4), 13)
                    + pad(format(row.times.experts, 4), 12) + pad(format(row.times.combine, 4), 12)
                    + pad(format(row.times.total, 4), 10) + pad("\(row.maximumPairs)", 10) + "\(row.maximumCopies)")
        }
        return lines.joined(separator: "\n")
    }
}
