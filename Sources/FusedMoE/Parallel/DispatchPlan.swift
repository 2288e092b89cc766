/// One rank's side of an expert-parallel forward: which of its tokens go to which rank, and where
/// each result comes back. Pure bookkeeping, the same on the CPU simulation and the GPU.
///
/// ## Wire format
///
/// A forward is three exchanges between the ep ranks; within each, every (source, destination)
/// pair of ranks moves contiguous segments, and segments are laid out by peer rank ascending.
///
/// 1. **Counts** (all-gather, before anything else). Each rank contributes `2 * ep` int32:
///    `[rows to rank 0, pairs to rank 0, rows to rank 1, pairs to rank 1, ...]` (`countsMessage`).
///    Gathered, rank s's message sits at `s * 2 * ep`: every rank knows every count (`ExchangeCounts`).
/// 2. **Dispatch** (grouped send/receive), from source s to destination d, two messages:
///    - *rows*: `sendCounts[d]` rows of H elements of the layer's dtype. Row i is
///      `x[sendTokens[sendOffsets[d] + i]]`: one row per token that has at least one expert on d,
///      tokens ascending. A token whose k experts live on several ranks is sent once per
///      destination rank, never once per slot.
///    - *metadata*: per row, k int32 expert ids then k fp32 routed weights (8k bytes per row),
///      `sendMetadata`. Slot j holds (the router's expert id, its weight) when d owns that expert
///      and (-1, 0) otherwise: slot positions are kept, so a row carries every slot it needs and
///      the receiver needs nothing else.
/// 3. **Return** (grouped send/receive), from d back to s: one row of H elements per (token, slot)
///    pair that s routed to d, `pairCounts[d]` rows, in (token, slot) order, which is the order the
///    receiver expands its rows into pairs (`ReceivedPairs`). Row p is the expert's output for that
///    pair already multiplied by its routed weight and rounded to the dtype, exactly the row the
///    single-GPU pipeline's GEMM2 writes for the pair.
///
/// The source then combines: `out[t] = dtype(sum over j = 0..<k, ascending, of returned[returnRowOfPair[t*k + j]])`,
/// skipping unrouted slots, which is the single-GPU combine's arithmetic in its order. Per-pair
/// rows come back rather than per-token partial sums because a partial sum rounded to bf16 (or
/// summed in another order) would not be bit for bit the single-GPU result.
public struct DispatchPlan: Hashable, Sendable {
    /// M, this rank's tokens.
    public let tokens: Int
    /// k, slots per token.
    public let topK: Int
    public let partition: ExpertPartition
    /// Rows sent to each rank.
    public let sendCounts: [Int]
    /// Where each rank's rows start in the send buffer (`ep + 1` entries; the last is the total).
    public let sendOffsets: [Int]
    /// The token each send row copies, grouped by destination, tokens ascending within.
    public let sendTokens: [Int32]
    /// `[rows, k]`: per send row, the router expert id of each slot the destination owns, -1 otherwise.
    public let sendExpertIDs: [Int32]
    /// `[rows, k]`: the routed weight of each such slot, 0 otherwise.
    public let sendWeights: [Float]
    /// (Token, slot) pairs each rank computes for this one, which is the rows it returns.
    public let pairCounts: [Int]
    /// Where each rank's returned rows start in the return buffer (`ep + 1` entries).
    public let pairOffsets: [Int]
    /// The pair index `t * k + j` of each returned row: grouped by rank, (token, slot) ascending within.
    public let returnPairs: [Int32]
    /// For each pair `t * k + j`, the returned row that holds its result; -1 for unrouted slots.
    public let returnRowOfPair: [Int32]

    /// Plans the dispatch of `tokens` tokens routed by `topkIDs [tokens, k]` (router expert ids in
    /// `[0, E)`, or -1 for a slot routed nowhere) with `topkWeights [tokens, k]`.
    /// - Throws: `MoEError.invalidArgument` naming `topk_ids` or `topk_weights` when a count or an id is wrong.
    public init(topkIDs: [Int32], topkWeights: [Float], topK: Int, partition: ExpertPartition) throws(MoEError) {
        guard topK >= 1 else { throw .invalidArgument("topK", "must be >= 1, got \(topK)") }
        guard topkIDs.count % topK == 0 else {
            throw .invalidArgument("topk_ids", "\(topkIDs.count) ids are not a whole number of rows of k = \(topK)")
        }
        guard topkWeights.count == topkIDs.count else {
            throw .invalidArgument(
                "topk_weights", "expected \(topkIDs.count) weights (one per id), got \(topkWeights.count)")
        }
        let ranks = partition.ranks
        let tokens = topkIDs.count / topK
        // The owner of every slot, checked once.
        var ownerOfPair = [Int](repeating: -1, count: topkIDs.count)
        for (pair, id) in topkIDs.enumerated() {
            guard id >= -1, Int(id) < partition.experts else {
                throw .invalidArgument(
                    "topk_ids",
                    "entry [\(pair / topK), \(pair % topK)] is \(id); expected an expert id in 0..<\(partition.experts) or -1"
                )
            }
            if id >= 0 { ownerOfPair[pair] = partition.owner(of: Int(id)) }
        }
        // Count first, so every list is filled in place in its final order.
        var sendCounts = [Int](repeating: 0, count: ranks)
        var pairCounts = [Int](repeating: 0, count: ranks)
        var seen = [Int](repeating: -1, count: ranks)  // the last token counted for each rank
        for token in 0..<tokens {
            for slot in 0..<topK {
                let owner = ownerOfPair[token * topK + slot]
                guard owner >= 0 else { continue }
                pairCounts[owner] += 1
                if seen[owner] != token {
                    seen[owner] = token
                    sendCounts[owner] += 1
                }
            }
        }
        let sendOffsets = DispatchPlan.exclusiveSum(sendCounts)
        let pairOffsets = DispatchPlan.exclusiveSum(pairCounts)
        let rows = sendOffsets[ranks]
        var sendTokens = [Int32](repeating: 0, count: rows)
        var sendExpertIDs = [Int32](repeating: -1, count: rows * topK)
        var sendWeights = [Float](repeating: 0, count: rows * topK)
        var returnPairs = [Int32](repeating: 0, count: pairOffsets[ranks])
        var returnRowOfPair = [Int32](repeating: -1, count: topkIDs.count)
        var rowCursor = Array(sendOffsets.prefix(ranks))
        var pairCursor = Array(pairOffsets.prefix(ranks))
        var rowOfRank = [Int](repeating: -1, count: ranks)  // this token's row for each rank, or -1
        for token in 0..<tokens {
            for rank in 0..<ranks { rowOfRank[rank] = -1 }
            for slot in 0..<topK {
                let pair = token * topK + slot
                let owner = ownerOfPair[pair]
                guard owner >= 0 else { continue }
                if rowOfRank[owner] < 0 {
                    rowOfRank[owner] = rowCursor[owner]
                    sendTokens[rowCursor[owner]] = Int32(token)
                    rowCursor[owner] += 1
                }
                let row = rowOfRank[owner]
                sendExpertIDs[row * topK + slot] = topkIDs[pair]
                sendWeights[row * topK + slot] = topkWeights[pair]
                returnPairs[pairCursor[owner]] = Int32(pair)
                returnRowOfPair[pair] = Int32(pairCursor[owner])
                pairCursor[owner] += 1
            }
        }
        self.tokens = tokens
        self.topK = topK
        self.partition = partition
        self.sendCounts = sendCounts
        self.sendOffsets = sendOffsets
        self.sendTokens = sendTokens
        self.sendExpertIDs = sendExpertIDs
        self.sendWeights = sendWeights
        self.pairCounts = pairCounts
        self.pairOffsets = pairOffsets
        self.returnPairs = returnPairs
        self.returnRowOfPair = returnRowOfPair
    }

    /// Rows in the send buffer.
    public var totalSendRows: Int { sendOffsets[partition.ranks] }
    /// Rows that come back: the routed (token, slot) pairs.
    public var totalPairs: Int { pairOffsets[partition.ranks] }

    /// This rank's contribution to the counts all-gather: `[rows to d, pairs to d]` for each rank d.
    public var countsMessage: [Int32] {
        (0..<partition.ranks).flatMap { [Int32(sendCounts[$0]), Int32(pairCounts[$0])] }
    }

    /// The metadata message of every send row, as 32-bit words: per row k expert ids, then the
    /// bit patterns of k fp32 weights (see the wire format).
    public var sendMetadata: [UInt32] {
        var words = [UInt32](repeating: 0, count: totalSendRows * 2 * topK)
        for row in 0..<totalSendRows {
            for slot in 0..<topK {
                words[row * 2 * topK + slot] = UInt32(bitPattern: sendExpertIDs[row * topK + slot])
                words[row * 2 * topK + topK + slot] = sendWeights[row * topK + slot].bitPattern
            }
        }
        return words
    }

    /// `[0, c0, c0 + c1, ...]`: `counts.count + 1` entries.
    static func exclusiveSum(_ counts: [Int]) -> [Int] {
        var offsets = [0]
        offsets.reserveCapacity(counts.count + 1)
        for count in counts { offsets.append(offsets[offsets.count - 1] + count) }
        return offsets
    }
}

/// Every rank's counts after the all-gather: `rows[s][d]` and `pairs[s][d]` are what rank s sends
/// to rank d (rows) and gets back from it (pairs).
public struct ExchangeCounts: Hashable, Sendable {
    public let ranks: Int
    public let rows: [[Int]]
    public let pairs: [[Int]]

    /// Reads the gathered messages (`ranks` times `DispatchPlan.countsMessage`, in rank order).
    /// - Throws: `MoEError.invalidArgument` for a wrong length or a negative count.
    public init(gathered: [Int32], ranks: Int) throws(MoEError) {
        guard ranks >= 1, gathered.count == 2 * ranks * ranks else {
            throw .invalidArgument(
                "counts", "expected \(2 * ranks * ranks) gathered counts for \(ranks) ranks, got \(gathered.count)")
        }
        if let bad = gathered.firstIndex(where: { $0 < 0 }) {
            throw .invalidArgument("counts", "entry \(bad) is \(gathered[bad]); counts are >= 0")
        }
        self.ranks = ranks
        rows = (0..<ranks).map { s in (0..<ranks).map { d in Int(gathered[(s * ranks + d) * 2]) } }
        pairs = (0..<ranks).map { s in (0..<ranks).map { d in Int(gathered[(s * ranks + d) * 2 + 1]) } }
    }

    /// Where rank `rank` receives its rows and sends its results back.
    public func receiveLayout(rank: Int) -> ReceiveLayout {
        ReceiveLayout(rowCounts: rows.map { $0[rank] }, pairCounts: pairs.map { $0[rank] })
    }

    /// The most rows any one rank receives.
    public var maximumReceivedRows: Int { (0..<ranks).map { d in rows.reduce(0) { $0 + $1[d] } }.max() ?? 0 }
    /// The most pairs any one rank computes.
    public var maximumReceivedPairs: Int { (0..<ranks).map { d in pairs.reduce(0) { $0 + $1[d] } }.max() ?? 0 }
}

/// A destination rank's view of one forward: the rows it receives from each source and the
/// results it sends back, both grouped by source rank ascending.
public struct ReceiveLayout: Hashable, Sendable {
    /// Rows from each source rank.
    public let rowCounts: [Int]
    /// Where each source's rows start in the receive buffer (`ep + 1` entries).
    public let rowOffsets: [Int]
    /// Pairs from each source: the rows returned to it.
    public let pairCounts: [Int]
    /// Where each source's results start in the result buffer (`ep + 1` entries).
    public let pairOffsets: [Int]

    public init(rowCounts: [Int], pairCounts: [Int]) {
        precondition(rowCounts.count == pairCounts.count, "one row count and one pair count per rank")
        self.rowCounts = rowCounts
        self.pairCounts = pairCounts
        rowOffsets = DispatchPlan.exclusiveSum(rowCounts)
        pairOffsets = DispatchPlan.exclusiveSum(pairCounts)
    }

    public var totalRows: Int { rowOffsets[rowCounts.count] }
    public var totalPairs: Int { pairOffsets[pairCounts.count] }
}

/// The pairs a destination rank computes, read from the received metadata: each pair becomes one
/// row of the local layer (its own token, with k = 1), in (source, row, slot) order, which is
/// the order the results go back in.
public struct ReceivedPairs: Hashable, Sendable {
    /// The received row each pair reads.
    public let rows: [Int32]
    /// The router expert id of each pair (owned by this rank).
    public let expertIDs: [Int32]
    /// The routed weight of each pair.
    public let weights: [Float]

    /// - Parameters:
    ///   - metadata: `layout.totalRows` rows of k int32 ids then k fp32 weight bit patterns.
    ///   - rank: this rank: every id must be -1 or an expert it owns.
    /// - Throws: `MoEError.invalidArgument("metadata", ...)` when the metadata disagrees with the
    ///   counts or names an expert this rank does not own (a bug on the sending side).
    public init(
        layout: ReceiveLayout, metadata: [UInt32], topK: Int, partition: ExpertPartition, rank: Int
    ) throws(MoEError) {
        guard metadata.count == layout.totalRows * 2 * topK else {
            throw .invalidArgument(
                "metadata", "expected \(layout.totalRows) rows of \(2 * topK) words, got \(metadata.count) words")
        }
        let owned = partition.experts(of: rank)
        var rows: [Int32] = []
        var expertIDs: [Int32] = []
        var weights: [Float] = []
        rows.reserveCapacity(layout.totalPairs)
        expertIDs.reserveCapacity(layout.totalPairs)
        weights.reserveCapacity(layout.totalPairs)
        for source in 0..<layout.rowCounts.count {
            for row in layout.rowOffsets[source]..<layout.rowOffsets[source + 1] {
                for slot in 0..<topK {
                    let id = Int32(bitPattern: metadata[row * 2 * topK + slot])
                    guard id != -1 else { continue }
                    guard owned.contains(Int(id)) else {
                        throw .invalidArgument(
                            "metadata",
                            "row \(row) from rank \(source) names expert \(id), which rank \(rank) does not own (\(owned))"
                        )
                    }
                    rows.append(Int32(row))
                    expertIDs.append(id)
                    weights.append(Float(bitPattern: metadata[row * 2 * topK + topK + slot]))
                }
            }
            guard rows.count == layout.pairOffsets[source + 1] else {
                throw .invalidArgument(
                    "metadata",
                    "rank \(source) announced \(layout.pairCounts[source]) pairs but its rows hold \(rows.count - layout.pairOffsets[source])"
                )
            }
        }
        self.rows = rows
        self.expertIDs = expertIDs
        self.weights = weights
    }

    public var count: Int { rows.count }
}

/// A run of consecutive rows copied at once: rows `source..<source + count` to
/// `destination..<destination + count`. Gathers and scatters of rows become as few copies as the
/// index lists allow (one for the whole batch when ep = 1).
public struct RowRun: Hashable, Sendable {
    public var source: Int
    public var destination: Int
    public var count: Int

    public init(source: Int, destination: Int, count: Int) {
        self.source = source
        self.destination = destination
        self.count = count
    }

    /// Runs for `destination[i] = source[sourceOfRow[i]]`.
    public static func gather(sourceOfRow: [Int32]) -> [RowRun] {
        coalesce(count: sourceOfRow.count) { (Int(sourceOfRow[$0]), $0) }
    }

    /// Runs for `destination[destinationOfRow[i]] = source[i]`.
    public static func scatter(destinationOfRow: [Int32]) -> [RowRun] {
        coalesce(count: destinationOfRow.count) { ($0, Int(destinationOfRow[$0])) }
    }

    static func coalesce(count: Int, _ rowPair: (Int) -> (source: Int, destination: Int)) -> [RowRun] {
        var runs: [RowRun] = []
        for index in 0..<count {
            let (source, destination) = rowPair(index)
            if let last = runs.last, last.source + last.count == source, last.destination + last.count == destination {
                runs[runs.count - 1].count += 1
            } else {
                runs.append(RowRun(source: source, destination: destination, count: 1))
            }
        }
        return runs
    }
}
