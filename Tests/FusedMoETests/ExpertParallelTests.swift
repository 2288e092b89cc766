import CUDA
import Testing

@testable import FusedMoE

/// The elements of `a` and `b` whose bits differ (`==` on floats would equate -0 and +0), or -1
/// for every element when the counts differ: 0 means bit for bit equal.
private func differingBits<T: BitwiseCopyable>(_ a: [T], _ b: [T]) -> Int {
    guard a.count == b.count else { return -1 }
    let size = MemoryLayout<T>.stride
    return a.withUnsafeBytes { x in
        b.withUnsafeBytes { y in
            (0..<a.count).filter { index in
                (0..<size).contains { x[index * size + $0] != y[index * size + $0] }
            }.count
        }
    }
}

@Suite struct ExpertPartitionTests {
    @Test func contiguousBlocks() throws {
        let partition = try ExpertPartition(experts: 16, ranks: 4)
        #expect((0..<4).map { partition.experts(of: $0) } == [0..<4, 4..<8, 8..<12, 12..<16])
        #expect((0..<16).map { partition.owner(of: $0) } == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
        #expect((0..<16).map { partition.localIndex(of: $0) } == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])
        #expect(partition.expertMap(rank: 1) == [-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, -1, -1, -1, -1])
    }

    @Test func unevenSplitGivesTheFirstRanksOneMore() throws {
        let partition = try ExpertPartition(experts: 10, ranks: 4)
        #expect((0..<4).map { partition.experts(of: $0) } == [0..<3, 3..<6, 6..<8, 8..<10])
        for expert in 0..<10 {
            let owner = partition.owner(of: expert)
            #expect(partition.experts(of: owner).contains(expert))
            #expect(partition.expertMap(rank: owner)[expert] == Int32(partition.localIndex(of: expert)))
        }
        // Every expert has exactly one owner.
        for expert in 0..<10 {
            #expect((0..<4).filter { partition.expertMap(rank: $0)[expert] >= 0 }.count == 1)
        }
    }

    @Test func oneRankOwnsEverything() throws {
        let partition = try ExpertPartition(experts: 8, ranks: 1)
        #expect(partition.experts(of: 0) == 0..<8)
        #expect(partition.expertMap(rank: 0) == (0..<8).map { Int32($0) })
    }

    @Test func refusesMoreRanksThanExperts() {
        #expect(throws: MoEError.self) { try ExpertPartition(experts: 4, ranks: 5) }
        #expect(throws: MoEError.self) { try ExpertPartition(experts: 4, ranks: 0) }
    }

    @Test func localWeightsAreTheOwnedSlices() throws {
        let shape = try MoEShape(experts: 6, topK: 2, hidden: 8, intermediate: 4)
        var generator = SplitMix64(seed: 3)
        let weights = try MoEWeights<Float>.random(shape: shape, using: &generator)
        let partition = try ExpertPartition(experts: 6, ranks: 3)
        let local = try partition.localWeights(weights, rank: 1, topK: 1)
        #expect(local.shape.experts == 2 && local.shape.topK == 1)
        #expect(local.w1.storage == Array(weights.w1.storage[(2 * 64)..<(4 * 64)]))
        #expect(local.w2.storage == Array(weights.w2.storage[(2 * 32)..<(4 * 32)]))
        let bytes = partition.localWeightBytes(rank: 1, hidden: 8, intermediate: 4, dtype: .bf16)
        #expect(bytes.w1Offset == 2 * 64 * 2 && bytes.w1Bytes == 2 * 64 * 2)
        #expect(bytes.w2Offset == 2 * 32 * 2 && bytes.w2Bytes == 2 * 32 * 2)
    }
}

@Suite struct DispatchPlanTests {
    /// E = 8 over 4 ranks (rank r owns experts 2r and 2r + 1), k = 3, four tokens:
    /// t0 has two experts on rank 0 and one on rank 2; t1 has a slot routed nowhere; t3 two on
    /// rank 2; expert 3 is hit by no token, and rank 1 gets a single pair.
    static let ids: [Int32] = [0, 1, 5, 7, 2, -1, 4, 0, 6, 1, 4, 5]
    static let weights: [Float] = (0..<12).map { Float($0) + 0.5 }

    @Test func countsOffsetsAndOrder() throws {
        let partition = try ExpertPartition(experts: 8, ranks: 4)
        let plan = try DispatchPlan(topkIDs: Self.ids, topkWeights: Self.weights, topK: 3, partition: partition)
        #expect(plan.tokens == 4)
        // A token goes once to each rank holding any of its experts, not once per slot.
        #expect(plan.sendCounts == [3, 1, 3, 2])
        #expect(plan.sendOffsets == [0, 3, 4, 7, 9])
        #expect(plan.sendTokens == [0, 2, 3, 1, 0, 2, 3, 1, 2])
        #expect(
            plan.sendExpertIDs == [
                0, 1, -1, /**/ -1, 0, -1, /**/ 1, -1, -1,  // rank 0: t0, t2, t3
                -1, 2, -1,  // rank 1: t1
                -1, -1, 5, /**/ 4, -1, -1, /**/ -1, 4, 5,  // rank 2: t0, t2, t3
                7, -1, -1, /**/ -1, -1, 6,  // rank 3: t1, t2
            ])
        // Weights travel with their slots, zero where the slot is elsewhere.
        #expect(plan.sendWeights[0..<3] == [0.5, 1.5, 0])
        #expect(plan.sendWeights[18..<21] == [0, 10.5, 11.5])
        // Pairs: 11 routed of 12 (t1's last slot is unrouted).
        #expect(plan.pairCounts == [4, 1, 4, 2])
        #expect(plan.pairOffsets == [0, 4, 5, 9, 11])
        #expect(plan.returnPairs == [0, 1, 7, 9, /**/ 4, /**/ 2, 6, 10, 11, /**/ 3, 8])
        #expect(plan.returnRowOfPair == [0, 1, 5, 9, 4, -1, 6, 2, 10, 3, 7, 8])
        // The inverse map really is the inverse.
        for (row, pair) in plan.returnPairs.enumerated() { #expect(plan.returnRowOfPair[Int(pair)] == Int32(row)) }
        #expect(plan.countsMessage == [3, 4, 1, 1, 3, 4, 2, 2])
        // Metadata words: k ids, then k weight bit patterns, per row.
        let words = plan.sendMetadata
        #expect(words.count == 9 * 6)
        #expect(words[0..<3].map { Int32(bitPattern: $0) } == [0, 1, -1])
        #expect(words[3..<6].map { Float(bitPattern: $0) } == [0.5, 1.5, 0])
    }

    @Test func ranksNoTokenReachesGetNothing() throws {
        let partition = try ExpertPartition(experts: 8, ranks: 4)
        // Every token on experts 0..3 (ranks 0 and 1).
        let plan = try DispatchPlan(
            topkIDs: [0, 2, 1, 3, 3, 0], topkWeights: [1, 1, 1, 1, 1, 1], topK: 2, partition: partition)
        #expect(plan.sendCounts == [3, 3, 0, 0])
        #expect(plan.pairCounts == [3, 3, 0, 0])
        #expect(plan.sendOffsets == [0, 3, 6, 6, 6])
        #expect(plan.returnPairs == [0, 2, 5, 1, 3, 4])
    }

    @Test func emptyBatch() throws {
        let partition = try ExpertPartition(experts: 16, ranks: 8)
        let plan = try DispatchPlan(topkIDs: [], topkWeights: [], topK: 4, partition: partition)
        #expect(plan.tokens == 0 && plan.totalSendRows == 0 && plan.totalPairs == 0)
        #expect(plan.countsMessage == [Int32](repeating: 0, count: 16))
    }

    @Test func refusesBadInput() throws {
        let partition = try ExpertPartition(experts: 8, ranks: 2)
        #expect(throws: MoEError.self) {
            try DispatchPlan(topkIDs: [0, 8], topkWeights: [1, 1], topK: 2, partition: partition)
        }
        #expect(throws: MoEError.self) {
            try DispatchPlan(topkIDs: [0, -2], topkWeights: [1, 1], topK: 2, partition: partition)
        }
        #expect(throws: MoEError.self) {
            try DispatchPlan(topkIDs: [0, 1, 2], topkWeights: [1, 1, 1], topK: 2, partition: partition)
        }
        #expect(throws: MoEError.self) {
            try DispatchPlan(topkIDs: [0, 1], topkWeights: [1], topK: 2, partition: partition)
        }
    }

    /// Two source ranks, E = 4 over 2 ranks, k = 2: the receive side's layout and pair order.
    @Test func receiveLayoutAndPairOrder() throws {
        let partition = try ExpertPartition(experts: 4, ranks: 2)
        // Rank 0's tokens: [0, 3], [1, 0]; rank 1's: [2, 3], [3, 1], [2, -1].
        let plan0 = try DispatchPlan(topkIDs: [0, 3, 1, 0], topkWeights: [1, 2, 3, 4], topK: 2, partition: partition)
        let plan1 = try DispatchPlan(
            topkIDs: [2, 3, 3, 1, 2, -1], topkWeights: [5, 6, 7, 8, 9, 10], topK: 2, partition: partition)
        let counts = try ExchangeCounts(gathered: plan0.countsMessage + plan1.countsMessage, ranks: 2)
        #expect(counts.rows == [[2, 1], [1, 3]])
        #expect(counts.pairs == [[3, 1], [1, 4]])
        #expect(counts.maximumReceivedRows == 4)
        #expect(counts.maximumReceivedPairs == 5)

        let layout0 = counts.receiveLayout(rank: 0)
        #expect(layout0.rowCounts == [2, 1] && layout0.rowOffsets == [0, 2, 3])
        #expect(layout0.pairCounts == [3, 1] && layout0.pairOffsets == [0, 3, 4])
        let metadata0 = Array(plan0.sendMetadata[0..<(2 * 4)]) + Array(plan1.sendMetadata[0..<(1 * 4)])
        let pairs0 = try ReceivedPairs(layout: layout0, metadata: metadata0, topK: 2, partition: partition, rank: 0)
        // (source, row, slot) order: rank 0's t0 slot 0, its t1 slots 0 and 1, then rank 1's t1 slot 1.
        #expect(pairs0.rows == [0, 1, 1, 2])
        #expect(pairs0.expertIDs == [0, 1, 0, 1])
        #expect(pairs0.weights == [1, 3, 4, 8])
        // Which is the order each source expects its results back in.
        #expect(plan0.returnPairs[0..<3] == [0, 2, 3])
        #expect(plan1.returnPairs[0..<1] == [3])

        let layout1 = counts.receiveLayout(rank: 1)
        let metadata1 = Array(plan0.sendMetadata[(2 * 4)...]) + Array(plan1.sendMetadata[(1 * 4)...])
        let pairs1 = try ReceivedPairs(layout: layout1, metadata: metadata1, topK: 2, partition: partition, rank: 1)
        #expect(pairs1.rows == [0, 1, 1, 2, 3])
        #expect(pairs1.expertIDs == [3, 2, 3, 3, 2])
        #expect(pairs1.weights == [2, 5, 6, 7, 9])

        // Metadata naming another rank's expert, or disagreeing with the counts, is refused.
        #expect(throws: MoEError.self) {
            try ReceivedPairs(
                layout: layout1, metadata: metadata0 + [0, 0, 0, 0], topK: 2, partition: partition, rank: 1)
        }
        #expect(throws: MoEError.self) {
            try ReceivedPairs(
                layout: layout0, metadata: Array(metadata0.dropLast(4)), topK: 2, partition: partition, rank: 0)
        }
    }

    @Test func rowRunsCoalesce() {
        #expect(RowRun.gather(sourceOfRow: [0, 1, 2, 3]) == [RowRun(source: 0, destination: 0, count: 4)])
        #expect(
            RowRun.gather(sourceOfRow: [4, 5, 5, 6, 0]) == [
                RowRun(source: 4, destination: 0, count: 2), RowRun(source: 5, destination: 2, count: 2),
                RowRun(source: 0, destination: 4, count: 1),
            ])
        #expect(
            RowRun.scatter(destinationOfRow: [3, 4, 0, 1, 2]) == [
                RowRun(source: 0, destination: 3, count: 2), RowRun(source: 2, destination: 0, count: 3),
            ])
        #expect(RowRun.gather(sourceOfRow: []).isEmpty)
    }
}

@Suite struct SimulatedExpertParallelTests {
    static let shape = try! MoEShape(experts: 16, topK: 4, hidden: 72, intermediate: 40)

    /// A random case; with `unrouted`, every third token's last slot is routed nowhere (-1).
    func sample<T: MoEScalar>(_: T.Type, tokens: Int, seed: UInt64, unrouted: Bool = false) throws -> RandomCase<T> {
        var sample = try RandomCase<T>(shape: Self.shape, tokens: tokens, seed: seed)
        if unrouted {
            for token in stride(from: 0, to: tokens, by: 3) {
                sample.routing.ids[token * Self.shape.topK + Self.shape.topK - 1] = -1
            }
        }
        return sample
    }

    func expectBitEqual<T: MoEScalar>(_: T.Type, ep: Int, tokens: Int, seed: UInt64, unrouted: Bool = false) throws {
        let sample = try sample(T.self, tokens: tokens, seed: seed, unrouted: unrouted)
        let single = try CPUBackend.forward(x: sample.x, routing: sample.routing, weights: sample.weights)
        let simulated = try SimulatedExpertParallel.forward(
            x: sample.x, routing: sample.routing, weights: sample.weights, ep: ep)
        #expect(simulated.shape == [tokens, Self.shape.hidden])
        let differing = differingBits(simulated.storage, single.storage)
        #expect(differing == 0, "\(T.dtype) ep=\(ep) M=\(tokens): \(differing) elements differ in their bits")
        if tokens > 0 { #expect(single.storage.contains { $0.floatValue != 0 }, "never compare zeros") }
    }

    @Test(arguments: [1, 2, 4, 8], [0, 1, 33])
    func bitEqualToTheSingleProcessForward(ep: Int, tokens: Int) throws {
        let seed = UInt64(ep * 100 + tokens)
        try expectBitEqual(Float.self, ep: ep, tokens: tokens, seed: seed)
        try expectBitEqual(BFloat16.self, ep: ep, tokens: tokens, seed: seed + 1)
    }

    @Test(arguments: [1, 2, 4, 8, 16])
    func bitEqualWithUnroutedSlotsAndHalfPrecision(ep: Int) throws {
        try expectBitEqual(BFloat16.self, ep: ep, tokens: 33, seed: 77, unrouted: true)
        try expectBitEqual(Float16.self, ep: ep, tokens: 33, seed: 78, unrouted: true)
        try expectBitEqual(Float.self, ep: ep, tokens: 33, seed: 79, unrouted: true)
    }

    @Test func bitEqualWithAnUnevenPartition() throws {
        let shape = try MoEShape(experts: 10, topK: 3, hidden: 24, intermediate: 16)
        let sample = try RandomCase<BFloat16>(shape: shape, tokens: 21, options: MoEOptions(activation: .gelu), seed: 9)
        let options = MoEOptions(activation: .gelu)
        let single = try CPUBackend.forward(
            x: sample.x, routing: sample.routing, weights: sample.weights, options: options)
        for ep in [3, 4, 7] {
            let simulated = try SimulatedExpertParallel.forward(
                x: sample.x, routing: sample.routing, weights: sample.weights, ep: ep, options: options)
            #expect(differingBits(simulated.storage, single.storage) == 0, "ep=\(ep)")
        }
    }

    @Test func traceAccountsForEveryPair() throws {
        let sample = try sample(BFloat16.self, tokens: 33, seed: 5, unrouted: true)
        let routed = sample.routing.ids.filter { $0 >= 0 }.count
        let (_, trace) = try SimulatedExpertParallel.run(
            x: sample.x, routing: sample.routing, weights: sample.weights, ep: 4)
        #expect(trace.plans.map(\.tokens) == [9, 8, 8, 8])
        #expect(trace.plans.map(\.totalPairs).reduce(0, +) == routed)
        #expect(trace.receivedPairs.map(\.count).reduce(0, +) == routed)
        // Rows are sent once per (token, rank), so never more rows than pairs, and dedup happens.
        let rows = trace.plans.map(\.totalSendRows).reduce(0, +)
        #expect(rows <= routed)
        #expect(rows < routed, "with k = 4 over 4 ranks some token must have two experts on one rank")
        let partition = try ExpertPartition(experts: 16, ranks: 4)
        for (rank, pairs) in trace.receivedPairs.enumerated() {
            #expect(pairs.expertIDs.allSatisfy { partition.owner(of: Int($0)) == rank })
        }
    }

    @Test func tokenRangesCoverTheBatch() {
        #expect(SimulatedExpertParallel.tokenRanges(tokens: 33, ranks: 8).map(\.count) == [5, 4, 4, 4, 4, 4, 4, 4])
        #expect(SimulatedExpertParallel.tokenRanges(tokens: 1, ranks: 4) == [0..<1, 1..<1, 1..<1, 1..<1])
        #expect(SimulatedExpertParallel.tokenRanges(tokens: 0, ranks: 2) == [0..<0, 0..<0])
    }

    @Test func refusesAnExpertMapAndTooManyRanks() throws {
        let sample = try sample(Float.self, tokens: 3, seed: 1)
        #expect(throws: MoEError.self) {
            try SimulatedExpertParallel.forward(
                x: sample.x, routing: sample.routing, weights: sample.weights, ep: 2,
                options: MoEOptions(expertMap: (0..<16).map { Int32($0) }))
        }
        #expect(throws: MoEError.self) {
            try SimulatedExpertParallel.forward(x: sample.x, routing: sample.routing, weights: sample.weights, ep: 17)
        }
    }
}

/// A GPU and NVRTC are visible: the ep = 1 layer can run here.
private let expertParallelGPUVisible: Bool = ((try? Device.count()) ?? 0) > 0 && NVRTC.isAvailable

@Suite(
    .enabled(
        if: expertParallelGPUVisible, "needs a GPU and NVRTC (ep = 1 runs on one GPU through the loopback exchange)"))
struct ExpertParallelLayerGPUTests {
    /// The same code path as multi-GPU expert parallelism, with the loopback in NCCL's place: bit
    /// for bit the one-GPU layer, for every deterministic plan, with empty and odd batches.
    @Test func oneRankThroughTheLoopbackIsBitForBitTheOneGPULayer() throws {
        let device = try Device(ordinal: 0)
        let library = try KernelLibrary(device: device)
        let results = try ExpertParallelCheck.gpu(
            library: library, exchange: LoopbackExchange(device: device), shape: ExpertParallelCheck.defaultShape.shape,
            dtype: .bf16, batchSizes: [0, 1, 33], seed: 11
        ) { _ in }
        #expect(results.count > 1)
        for result in results { #expect(result.passed, "\(result.line)") }
    }
}
