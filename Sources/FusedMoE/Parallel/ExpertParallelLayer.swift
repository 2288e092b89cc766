import CUDA

/// The MoE layer with its experts spread over GPUs (expert parallelism): this rank's share.
///
/// Each rank holds the weights of its experts (`ExpertPartition`: contiguous blocks) and its own
/// batch of tokens. A forward, in the wire format of `DispatchPlan`:
/// 1. **dispatch**: read the routing back, plan, all-gather the counts, gather the rows each rank
///    needs into a send buffer, all-to-all rows and metadata (grouped send/receive), then expand
///    the received rows into one row per (token, slot) pair this rank owns;
/// 2. **experts**: a `CUDAMoELayer` with k = 1 and this rank's expert map computes every pair's
///    weighted output row (its combine over one slot returns that row unchanged);
/// 3. **combine**: all-to-all the pair rows back, put them in (token, slot) order and sum each
///    token's slots with the pipeline's `moe_combine`, in slot order.
/// With the same plan and a deterministic split mode, the output is bit for bit the one-GPU
/// layer's on the same tokens: each pair's row is computed by the same kernel from the same
/// operands, and the sum over slots runs in the same order (see `SimulatedExpertParallel`).
///
/// With one rank, `LoopbackExchange` stands in for NCCL and the same code path runs on one GPU.
///
/// **Host synchronization.** Unlike `CUDAMoELayer.forward`, this forward waits for the GPU three
/// times: to read the routing (the counts decide every transfer size NCCL is given), after the
/// counts all-gather, and after the metadata arrives (to plan the expansion). It therefore cannot
/// be captured in a CUDA graph. Row gathers and scatters are device-to-device copies, one per run
/// of consecutive rows (`RowRun`): correct, but slow when routing scatters rows; a gather kernel
/// and an indexed combine kernel would replace them.
public final class ExpertParallelLayer: @unchecked Sendable {
    /// The whole layer's shape: E is the router's expert count, k its experts per token.
    public let shape: MoEShape
    public let dtype: DType
    public let partition: ExpertPartition
    public let exchange: any ExpertParallelExchange
    /// This rank's experts, run on one row per (token, slot) pair.
    public let local: CUDAMoELayer
    /// The most tokens this rank's `forward` accepts.
    public let maxTokens: Int
    /// The most rows any rank may receive in one forward.
    public let maxReceivedRows: Int
    /// The most (token, slot) pairs any rank may compute in one forward.
    public let maxReceivedPairs: Int

    public var rank: Int { exchange.rank }
    public var ranks: Int { exchange.worldSize }

    let counts: DeviceBuffer
    let gatheredCounts: DeviceBuffer
    let sendRows: DeviceBuffer
    let sendMetadata: DeviceBuffer
    let receiveRows: DeviceBuffer
    let receiveMetadata: DeviceBuffer
    let pairRows: DeviceBuffer
    let pairIDs: DeviceBuffer
    let pairWeights: DeviceBuffer
    let pairOutput: DeviceBuffer
    let returnRows: DeviceBuffer
    let slotRows: DeviceBuffer

    /// Makes this rank's share of the layer.
    ///
    /// - Parameters:
    ///   - shape: the whole layer: E experts (all ranks together), k, H, I.
    ///   - w1: this rank's experts' `[E_local, 2I, H]` weights (`partition.experts(of: rank)`), contiguous.
    ///   - w2: this rank's experts' `[E_local, H, I]` weights.
    ///   - options: the activation; the expert map is the layer's own (one given is refused).
    ///   - plan: the GEMM plan of the local layer.
    ///   - maxTokens: the most tokens this rank's forward takes.
    ///   - maxReceivedPairs: the most pairs a rank may have to compute; by default the worst case,
    ///     every rank's every token on this rank's experts (`ep * maxTokens * min(k, E_local)`).
    ///     Sized lower, a forward that would exceed it fails on every rank alike, before any row moves.
    ///   - exchange: NCCL between ranks, or `LoopbackExchange` for one rank.
    /// - Throws: `MoEError.invalidArgument` for inconsistent sizes, `.cuda` for CUDA failures.
    public init(
        library: KernelLibrary, shape: MoEShape, dtype: DType, w1: DeviceBuffer, w2: DeviceBuffer,
        options: MoEOptions = MoEOptions(), plan: MoEPlan, maxTokens: Int, maxReceivedPairs: Int? = nil,
        exchange: any ExpertParallelExchange
    ) throws(MoEError) {
        guard options.expertMap == nil else {
            throw .invalidArgument(
                "expert_map", "the expert-parallel layer makes its rank's expert map itself; pass none")
        }
        guard maxTokens >= 0 else { throw .invalidArgument("maxTokens", "must be >= 0, got \(maxTokens)") }
        guard exchange.device.ordinal == library.device.ordinal else {
            throw .invalidArgument(
                "exchange",
                "the exchange is on GPU \(exchange.device.ordinal), the kernels on GPU \(library.device.ordinal)")
        }
        let partition = try ExpertPartition(experts: shape.experts, ranks: exchange.worldSize)
        let rank = exchange.rank
        let localExperts = partition.localExperts(of: rank)
        let (ep, k, hidden) = (exchange.worldSize, shape.topK, shape.hidden)
        let maxRows = ep * maxTokens
        let maxPairs = maxReceivedPairs ?? ep * maxTokens * min(k, localExperts)
        guard maxPairs >= 0 else { throw .invalidArgument("maxReceivedPairs", "must be >= 0, got \(maxPairs)") }
        let localShape = try MoEShape(experts: localExperts, topK: 1, hidden: hidden, intermediate: shape.intermediate)
        local = try CUDAMoELayer(
            library: library, shape: localShape, dtype: dtype, w1: w1, w2: w2,
            options: MoEOptions(activation: options.activation, expertMap: partition.expertMap(rank: rank)), plan: plan,
            maxTokens: maxPairs)
        self.shape = shape
        self.dtype = dtype
        self.partition = partition
        self.exchange = exchange
        self.maxTokens = maxTokens
        self.maxReceivedRows = min(maxRows, maxPairs)
        self.maxReceivedPairs = maxPairs
        let device = library.device
        let rowBytes = hidden * dtype.byteCount
        let metadataBytes = 8 * k
        let sendRowCount = maxTokens * min(ep, k)
        do {
            counts = try DeviceBuffer(device: device, count: 2 * ep, of: Int32.self)
            gatheredCounts = try DeviceBuffer(device: device, count: 2 * ep * ep, of: Int32.self)
            sendRows = try DeviceBuffer(device: device, byteCount: sendRowCount * rowBytes)
            sendMetadata = try DeviceBuffer(device: device, byteCount: sendRowCount * metadataBytes)
            receiveRows = try DeviceBuffer(device: device, byteCount: maxReceivedRows * rowBytes)
            receiveMetadata = try DeviceBuffer(device: device, byteCount: maxReceivedRows * metadataBytes)
            pairRows = try DeviceBuffer(device: device, byteCount: maxPairs * rowBytes)
            pairIDs = try DeviceBuffer(device: device, count: maxPairs, of: Int32.self)
            pairWeights = try DeviceBuffer(device: device, count: maxPairs, of: Float.self)
            pairOutput = try DeviceBuffer(device: device, byteCount: maxPairs * rowBytes)
            returnRows = try DeviceBuffer(device: device, byteCount: maxTokens * k * rowBytes)
            slotRows = try DeviceBuffer(device: device, byteCount: maxTokens * k * rowBytes)
        } catch {
            throw .cuda(error)
        }
    }

    /// What one forward moved.
    public struct Traffic: Hashable, Sendable {
        /// Rows this rank sent (one per token and destination rank).
        public var sentRows: Int
        /// Rows this rank received.
        public var receivedRows: Int
        /// Pairs this rank computed and sent back.
        public var computedPairs: Int
        /// Device-to-device copies the row gathers and scatters took.
        public var copies: Int
    }

    /// Computes `out [M, H]` for this rank's `x [M, H]`, routed by `topkIDs [M, k]` (int32 router
    /// expert ids in `[0, E)` or -1) with `topkWeights [M, k]` (fp32), on `stream`.
    ///
    /// Every rank must call it, the same number of times, even with `tokens == 0`: the exchanges
    /// are collective. It synchronizes the stream (see the type's comment).
    /// - Throws: `MoEError.invalidArgument` when `tokens` exceeds `maxTokens` or a rank would
    ///   receive more than the layer was sized for (on every rank alike); `.cuda` on CUDA or NCCL failure.
    @discardableResult
    public func forward(
        x: DevicePointer, topkIDs: DevicePointer, topkWeights: DevicePointer, out: DevicePointer, tokens: Int,
        stream: Stream, timer: ExpertParallelTimer? = nil
    ) throws(MoEError) -> Traffic {
        guard tokens >= 0 && tokens <= maxTokens else {
            throw .invalidArgument("tokens", "must be in 0...\(maxTokens) (the layer's maxTokens), got \(tokens)")
        }
        do {
            return try forwardEnqueuing(
                x: x, topkIDs: topkIDs, topkWeights: topkWeights, out: out, tokens: tokens, stream: stream, timer: timer
            )
        } catch {
            throw MoEError(any: error)
        }
    }

    private func forwardEnqueuing(
        x: DevicePointer, topkIDs: DevicePointer, topkWeights: DevicePointer, out: DevicePointer, tokens: Int,
        stream: Stream, timer: ExpertParallelTimer?
    ) throws -> Traffic {
        let device = local.library.device
        let (ep, k, hidden) = (ranks, shape.topK, shape.hidden)
        let rowBytes = hidden * dtype.byteCount
        let metadataBytes = 8 * k
        var copies = 0
        try timer?.record(0, on: stream)

        // 1. Dispatch. The routing comes to the host: NCCL needs every size before it starts. The
        // whole device is waited for, so no earlier forward (on any stream) still uses the buffers.
        try device.synchronize()
        let pairs = tokens * k
        let ids = try DeviceBuffer(device: device, borrowing: topkIDs, byteCount: pairs * 4).download(
            count: pairs, as: Int32.self)
        let weights = try DeviceBuffer(device: device, borrowing: topkWeights, byteCount: pairs * 4)
            .download(count: pairs, as: Float.self)
        let plan = try DispatchPlan(topkIDs: ids, topkWeights: weights, topK: k, partition: partition)
        try counts.upload(plan.countsMessage)
        try device.synchronize()
        try exchange.allGather(send: counts.pointer, receive: gatheredCounts.pointer, byteCount: 8 * ep, stream: stream)
        try stream.synchronize()
        let gathered = try ExchangeCounts(
            gathered: gatheredCounts.download(count: 2 * ep * ep, as: Int32.self), ranks: ep)
        // Every rank sees every count, so every rank takes this decision alike and none is left waiting.
        guard gathered.maximumReceivedRows <= maxReceivedRows, gathered.maximumReceivedPairs <= maxReceivedPairs else {
            throw MoEError.invalidArgument(
                "maxReceivedPairs",
                "a rank would receive \(gathered.maximumReceivedRows) rows and \(gathered.maximumReceivedPairs) pairs; the layer holds \(maxReceivedRows) and \(maxReceivedPairs)"
            )
        }
        let layout = gathered.receiveLayout(rank: rank)

        // Rows `first..<first + count` of `buffer` (rows of `bytes` bytes) as one transfer with `peer`.
        func segment(_ buffer: DeviceBuffer, _ peer: Int, first: Int, count: Int, bytes: Int) -> ExchangeTransfer {
            ExchangeTransfer(
                peer: peer, pointer: ExpertParallelDevice.offset(buffer.pointer, bytes: first * bytes),
                byteCount: count * bytes)
        }
        // Copies rows between buffers, one device copy per run of consecutive rows.
        func copyRows(_ runs: [RowRun], from source: DevicePointer, to destination: DeviceBuffer) throws(CUDAError) {
            for run in runs {
                try ExpertParallelDevice.copy(
                    from: ExpertParallelDevice.offset(source, bytes: run.source * rowBytes),
                    to: ExpertParallelDevice.offset(destination.pointer, bytes: run.destination * rowBytes),
                    byteCount: run.count * rowBytes, device: device, stream: stream)
            }
            copies += runs.count
        }

        try copyRows(RowRun.gather(sourceOfRow: plan.sendTokens), from: x, to: sendRows)
        try sendMetadata.upload(plan.sendMetadata)
        try device.synchronize()
        var sends: [ExchangeTransfer] = []
        var receives: [ExchangeTransfer] = []
        for peer in 0..<ep {
            let (first, count) = (plan.sendOffsets[peer], plan.sendCounts[peer])
            sends.append(segment(sendRows, peer, first: first, count: count, bytes: rowBytes))
            sends.append(segment(sendMetadata, peer, first: first, count: count, bytes: metadataBytes))
            let (start, received) = (layout.rowOffsets[peer], layout.rowCounts[peer])
            receives.append(segment(receiveRows, peer, first: start, count: received, bytes: rowBytes))
            receives.append(segment(receiveMetadata, peer, first: start, count: received, bytes: metadataBytes))
        }
        try exchange.exchange(sends: sends, receives: receives, stream: stream)
        try stream.synchronize()
        let metadata = try receiveMetadata.download(count: layout.totalRows * 2 * k, as: UInt32.self)
        let received = try ReceivedPairs(layout: layout, metadata: metadata, topK: k, partition: partition, rank: rank)
        try copyRows(RowRun.gather(sourceOfRow: received.rows), from: receiveRows.pointer, to: pairRows)
        try pairIDs.upload(received.expertIDs)
        try pairWeights.upload(received.weights)
        try device.synchronize()
        try timer?.record(1, on: stream)

        // 2. Experts: one k = 1 token per pair.
        try local.forward(
            x: pairRows.pointer, topkIDs: pairIDs.pointer, topkWeights: pairWeights.pointer, out: pairOutput.pointer,
            tokens: received.count, stream: stream)
        try timer?.record(2, on: stream)

        // 3. Return the pair rows to their sources, put them in slot order, and sum each token's slots.
        sends = (0..<ep).map {
            segment(pairOutput, $0, first: layout.pairOffsets[$0], count: layout.pairCounts[$0], bytes: rowBytes)
        }
        receives = (0..<ep).map {
            segment(returnRows, $0, first: plan.pairOffsets[$0], count: plan.pairCounts[$0], bytes: rowBytes)
        }
        try exchange.exchange(sends: sends, receives: receives, stream: stream)
        try copyRows(RowRun.scatter(destinationOfRow: plan.returnPairs), from: returnRows.pointer, to: slotRows)
        if tokens > 0 {
            // moe_combine: out[t] = sum over j ascending of slotRows[t * k + j], skipping ids < 0.
            let blocks = min(max((tokens * hidden + 256 * 8 - 1) / (256 * 8), 1), 8192)
            try local.kernels.combine.launch(
                grid: Dimensions(blocks), block: Dimensions(256), on: stream,
                arguments: [slotRows, out, Int64(tokens), Int32(k), Int64(hidden), topkIDs])
        }
        try timer?.record(3, on: stream)
        return Traffic(
            sentRows: plan.totalSendRows, receivedRows: layout.totalRows, computedPairs: received.count, copies: copies)
    }

    /// The device bytes this rank's share allocated for scratch (weights not counted).
    public var scratchBytes: Int {
        local.scratchBytes
            + [
                counts, gatheredCounts, sendRows, sendMetadata, receiveRows, receiveMetadata, pairRows, pairIDs,
                pairWeights, pairOutput, returnRows, slotRows,
            ].map(\.byteCount).reduce(0, +)
    }
}

/// Events around the three phases of an expert-parallel forward: dispatch, experts, combine.
public final class ExpertParallelTimer: @unchecked Sendable {
    let events: [Event]

    public init(device: Device) throws(CUDAError) {
        var events: [Event] = []
        for _ in 0..<4 { events.append(try Event(device: device)) }
        self.events = events
    }

    func record(_ index: Int, on stream: Stream) throws(CUDAError) {
        try events[index].record(on: stream)
    }

    /// The phases of the last forward, in milliseconds; waits for its end.
    public func times() throws(CUDAError) -> ExpertParallelTimes {
        ExpertParallelTimes(
            dispatch: try Event.elapsedMilliseconds(from: events[0], to: events[1]),
            experts: try Event.elapsedMilliseconds(from: events[1], to: events[2]),
            combine: try Event.elapsedMilliseconds(from: events[2], to: events[3]))
    }
}

/// Milliseconds of the three phases of one expert-parallel forward. Dispatch includes the host
/// work and synchronizations of planning; combine includes the return all-to-all.
public struct ExpertParallelTimes: Hashable, Sendable {
    public var dispatch: Double
    public var experts: Double
    public var combine: Double

    public init(dispatch: Double, experts: Double, combine: Double) {
        self.dispatch = dispatch
        self.experts = experts
        self.combine = combine
    }

    public var total: Double { dispatch + experts + combine }
}
