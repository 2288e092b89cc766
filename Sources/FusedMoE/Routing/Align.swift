/// The (token, slot) pairs sorted by expert, each expert's run padded to a multiple of `blockM`:
/// what the grouped GEMM walks, one `blockM` block of rows per program.
public struct AlignedRouting: Hashable, Sendable {
    /// Pair indices `t * k + j` grouped by expert (ascending within an expert), padded with `padValue`.
    public var sortedTokenIDs: [Int32]
    /// One entry per `blockM` block: the (local) expert of the block, or -1 for an expert this rank
    /// does not own.
    public var expertIDs: [Int32]
    /// The padded row count: `sortedTokenIDs.count`, a multiple of `blockM`.
    public var paddedCount: Int
    /// The padding value, `M * k`: one past the last pair.
    public var padValue: Int32
    public var blockM: Int
}

/// Sorting pairs by expert, as SGLang's and vLLM's `moe_align_block_size` do.
public enum Align {
    /// The largest padded count `align` can produce for `pairs` pairs: every expert may add up to
    /// `blockM - 1` padding rows, and every block holds at least one pair, so it is also at most
    /// `pairs * blockM` (the tighter bound while pairs < experts, as in decode). Device buffers for
    /// `sortedTokenIDs` and the GEMM grids are sized from this: a loose bound launches programs
    /// that only find their block empty.
    public static func maximumPaddedCount(pairs: Int, experts: Int, blockM: Int) -> Int {
        min(pairs + experts * (blockM - 1), pairs * blockM)
    }

    /// Aligns routed expert ids to blocks of `blockM`.
    ///
    /// For each expert e in order, the pairs `i = t * k + j` with `ids[i] == e` in ascending order,
    /// then padding up to a multiple of `blockM` with the value `ids.count`. Ids of -1 (unrouted) are
    /// skipped. With `expertMap` (global expert -> local expert, or -1 when this rank does not own
    /// it), `expertIDs` holds local ids and -1 for blocks whose rows must come out zero.
    ///
    /// - Parameters:
    ///   - ids: row-major `[M, k]` expert ids in `[0, experts)` or -1.
    ///   - experts: E, the global expert count.
    ///   - blockM: rows per block, >= 1.
    ///   - expertMap: optional `[E]` map from global to local expert ids (-1 = not owned).
    /// - Throws: `MoEError.invalidArgument` naming `topk_ids`, `blockM` or `expert_map`.
    public static func align(ids: [Int32], experts: Int, blockM: Int, expertMap: [Int32]? = nil) throws(MoEError)
        -> AlignedRouting
    {
        guard blockM >= 1 else { throw .invalidArgument("blockM", "must be >= 1, got \(blockM)") }
        guard experts >= 1 else { throw .invalidArgument("experts", "must be >= 1, got \(experts)") }
        if let expertMap {
            guard expertMap.count == experts else {
                throw .invalidArgument("expert_map", "expected \(experts) entries (one per expert), got \(expertMap.count)")
            }
            if let bad = expertMap.firstIndex(where: { $0 < -1 }) {
                throw .invalidArgument("expert_map", "entry \(bad) is \(expertMap[bad]); expected a local id >= 0 or -1")
            }
        }
        var counts = [Int](repeating: 0, count: experts)
        for (index, id) in ids.enumerated() {
            guard id >= -1 && Int(id) < experts else {
                throw .invalidArgument("topk_ids", "entry \(index) is \(id); expected an expert id in 0..<\(experts) or -1")
            }
            if id >= 0 { counts[Int(id)] += 1 }
        }
        var starts = [Int](repeating: 0, count: experts)
        var padded = 0
        for expert in 0..<experts {
            starts[expert] = padded
            padded += (counts[expert] + blockM - 1) / blockM * blockM
        }
        let padValue = Int32(ids.count)
        var sorted = [Int32](repeating: padValue, count: padded)
        var cursor = starts
        for (index, id) in ids.enumerated() where id >= 0 {
            sorted[cursor[Int(id)]] = Int32(index)
            cursor[Int(id)] += 1
        }
        var expertIDs = [Int32](repeating: -1, count: padded / blockM)
        for expert in 0..<experts {
            let blocks = (counts[expert] + blockM - 1) / blockM
            let local = expertMap.map { $0[expert] } ?? Int32(expert)
            for block in 0..<blocks { expertIDs[starts[expert] / blockM + block] = local }
        }
        return AlignedRouting(
            sortedTokenIDs: sorted, expertIDs: expertIDs, paddedCount: padded, padValue: padValue, blockM: blockM)
    }
}
