/// Expert parallelism simulated in one process on the CPU: the test of the bookkeeping without a GPU
/// or NCCL, and what `fused-moe ep check` runs where no GPU is visible.
///
/// The M tokens are split over the ep ranks in contiguous blocks (each rank's own batch, as data
/// parallel attention would leave them), the experts in contiguous blocks (`ExpertPartition`).
/// Every rank plans its dispatch (`DispatchPlan`), the counts are "all-gathered", rows and metadata
/// "sent" (copied segment by segment in the wire format), each rank runs `CPUBackend.forward` on
/// its received pairs with its own weights and expert map, the results "return", and each source
/// combines its tokens. The exchanges are array copies; everything else is the GPU path's logic.
///
/// ## Why the result is bit for bit `CPUBackend.forward`'s
///
/// The single-process forward computes, for each pair (t, j) with expert e,
/// `down = round(w_tj * dot(w2[e], round(act(round(w1[e] @ x[t])))))`, every dot product over the
/// same fp32 values in the same lane order (`CPUBackend.dot` depends only on the values), then
/// `out[t] = round(0 + down(t,0) + down(t,1) + ...)` in slot order, the sum in fp32.
/// Here every pair becomes one token of a k = 1 layer on its owner: the same x row, the same
/// expert rows (a slice of the same weights) and the same weight give the same `down`, and that
/// layer's combine `round(0 + down)` returns it unchanged (it is already representable; only a
/// -0 becomes +0, which adds the same as -0 to a sum that starts at +0). The source then sums the
/// returned rows in slot order, skipping unrouted slots (the single forward adds +0 for them,
/// which changes nothing since such a sum is never -0). Same operations, same order: equal bits, for
/// fp32, bf16 and fp16 alike, at any ep.
public enum SimulatedExpertParallel {
    /// Rank r's tokens: M split into ep contiguous blocks, the first `M % ep` one token longer.
    public static func tokenRanges(tokens: Int, ranks: Int) -> [Range<Int>] {
        let (base, extra) = tokens.quotientAndRemainder(dividingBy: ranks)
        var ranges: [Range<Int>] = []
        var start = 0
        for rank in 0..<ranks {
            let count = base + (rank < extra ? 1 : 0)
            ranges.append(start..<(start + count))
            start += count
        }
        return ranges
    }

    /// What the simulation did, for checks and reports.
    public struct Trace: Sendable {
        /// Each source rank's plan.
        public var plans: [DispatchPlan]
        /// The gathered counts.
        public var counts: ExchangeCounts
        /// The pairs each destination rank computed.
        public var receivedPairs: [ReceivedPairs]
    }

    /// `out [M, H]` of the layer with its experts spread over `ep` simulated ranks.
    ///
    /// - Parameters:
    ///   - x: `[M, H]` activations.
    ///   - routing: `ids [M, k]` router expert ids in `[0, E)` or -1, `weights [M, k]`.
    ///   - weights: every expert's weights, `w1 [E, 2I, H]`, `w2 [E, H, I]`.
    ///   - ep: ranks, 1...E.
    ///   - options: the activation (an expert map is refused: the weights are the whole layer's).
    /// - Throws: `MoEError.invalidArgument` for inconsistent inputs, as `CPUBackend.forward` would.
    public static func forward<T: MoEScalar>(
        x: HostTensor<T>, routing: Routing, weights: MoEWeights<T>, ep: Int, options: MoEOptions = MoEOptions()
    ) throws(MoEError) -> HostTensor<T> {
        try run(x: x, routing: routing, weights: weights, ep: ep, options: options).output
    }

    /// `forward`, also returning the plans and counts it used.
    public static func run<T: MoEScalar>(
        x: HostTensor<T>, routing: Routing, weights: MoEWeights<T>, ep: Int, options: MoEOptions = MoEOptions()
    ) throws(MoEError) -> (output: HostTensor<T>, trace: Trace) {
        guard options.expertMap == nil else {
            throw .invalidArgument(
                "expert_map", "the simulation splits the whole layer's experts itself; pass no expert map")
        }
        try CPUBackend.validate(x: x, routing: routing, weights: weights, options: options)
        let shape = weights.shape
        let (hidden, k) = (shape.hidden, shape.topK)
        let partition = try ExpertPartition(experts: shape.experts, ranks: ep)
        let ranges = tokenRanges(tokens: x.shape[0], ranks: ep)

        // Each source plans its dispatch and fills its send buffers.
        var plans: [DispatchPlan] = []
        var sendRows: [[T]] = []
        var sendMetadata: [[UInt32]] = []
        for range in ranges {
            let pairs = (range.lowerBound * k)..<(range.upperBound * k)
            let plan = try DispatchPlan(
                topkIDs: Array(routing.ids[pairs]), topkWeights: Array(routing.weights[pairs]), topK: k,
                partition: partition)
            var rows = [T]()
            rows.reserveCapacity(plan.totalSendRows * hidden)
            for token in plan.sendTokens {
                let row = (range.lowerBound + Int(token)) * hidden
                rows += x.storage[row..<(row + hidden)]
            }
            plans.append(plan)
            sendRows.append(rows)
            sendMetadata.append(plan.sendMetadata)
        }

        // Counts: the all-gather.
        let counts = try ExchangeCounts(gathered: plans.flatMap(\.countsMessage), ranks: ep)

        // Dispatch, the experts, and the results each destination sends back.
        var results: [[T]] = []
        var layouts: [ReceiveLayout] = []
        var received: [ReceivedPairs] = []
        for rank in 0..<ep {
            let layout = counts.receiveLayout(rank: rank)
            var rows = [T]()
            var metadata = [UInt32]()
            rows.reserveCapacity(layout.totalRows * hidden)
            metadata.reserveCapacity(layout.totalRows * 2 * k)
            for source in 0..<ep {
                let plan = plans[source]
                rows += sendRows[source][(plan.sendOffsets[rank] * hidden)..<(plan.sendOffsets[rank + 1] * hidden)]
                metadata +=
                    sendMetadata[source][(plan.sendOffsets[rank] * 2 * k)..<(plan.sendOffsets[rank + 1] * 2 * k)]
            }
            let pairs = try ReceivedPairs(layout: layout, metadata: metadata, topK: k, partition: partition, rank: rank)
            // One k = 1 token per pair: its row, its expert, its weight.
            var pairX = [T]()
            pairX.reserveCapacity(pairs.count * hidden)
            for run in RowRun.gather(sourceOfRow: pairs.rows) {
                pairX += rows[(run.source * hidden)..<((run.source + run.count) * hidden)]
            }
            let local = try partition.localWeights(weights, rank: rank, topK: 1)
            let out = try CPUBackend.forward(
                x: HostTensor(shape: [pairs.count, hidden], storage: pairX, name: "x"),
                routing: Routing(tokens: pairs.count, topK: 1, ids: pairs.expertIDs, weights: pairs.weights),
                weights: local,
                options: MoEOptions(activation: options.activation, expertMap: partition.expertMap(rank: rank)))
            results.append(out.storage)
            layouts.append(layout)
            received.append(pairs)
        }

        // Return and combine, per source.
        var output = HostTensor<T>(shape: [x.shape[0], hidden], repeating: T(0))
        for (source, range) in ranges.enumerated() {
            let plan = plans[source]
            var returned = [T]()
            returned.reserveCapacity(plan.totalPairs * hidden)
            for rank in 0..<ep {
                let layout = layouts[rank]
                returned +=
                    results[rank][(layout.pairOffsets[source] * hidden)..<(layout.pairOffsets[source + 1] * hidden)]
            }
            guard returned.count == plan.totalPairs * hidden else {
                throw .mismatch(
                    "rank \(source) expected \(plan.totalPairs) returned rows, got \(returned.count / max(hidden, 1))")
            }
            combine(returned: returned, plan: plan, hidden: hidden, into: &output, firstToken: range.lowerBound)
        }
        return (output, Trace(plans: plans, counts: counts, receivedPairs: received))
    }

    /// `out[t] = T(sum over j ascending of returned[row(t, j)])`, skipping unrouted slots: the
    /// single-GPU combine's arithmetic (see the type's comment).
    static func combine<T: MoEScalar>(
        returned: [T], plan: DispatchPlan, hidden: Int, into output: inout HostTensor<T>, firstToken: Int
    ) {
        let k = plan.topK
        var sums = [Float](repeating: 0, count: hidden)
        for token in 0..<plan.tokens {
            for column in 0..<hidden { sums[column] = 0 }
            for slot in 0..<k {
                let row = Int(plan.returnRowOfPair[token * k + slot])
                guard row >= 0 else { continue }
                for column in 0..<hidden { sums[column] += returned[row * hidden + column].floatValue }
            }
            let base = (firstToken + token) * hidden
            for column in 0..<hidden { output.storage[base + column] = T(sums[column]) }
        }
    }
}
