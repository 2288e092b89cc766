import Testing
@testable import FusedMoE

let smallShape = try! MoEShape(experts: 6, topK: 2, hidden: 80, intermediate: 48)

@Suite struct CPUBackendTests {
    func agreesWithFloat64<T: MoEScalar>(_: T.Type, tokens: Int, options: MoEOptions, seed: UInt64) throws {
        let sample = try RandomCase<T>(shape: smallShape, tokens: tokens, options: options, seed: seed)
        let out = try CPUBackend.forward(x: sample.x, routing: sample.routing, weights: sample.weights, options: options)
        let reference = try Float64Reference.forward(x: sample.x, routing: sample.routing, weights: sample.weights, options: options)
        #expect(out.shape == [tokens, smallShape.hidden])
        let error = relativeError(out.floats, reference)
        #expect(error < errorBound(T.dtype), "\(T.dtype) M=\(tokens): rel_err \(error)")
        #expect(reference.contains { $0 != 0 }, "the reference must not be all zeros")
    }

    @Test(arguments: [1, 5, 40], [Activation.silu, .gelu])
    func agreesWithFloat64InEveryDType(tokens: Int, activation: Activation) throws {
        let options = MoEOptions(activation: activation)
        try agreesWithFloat64(BFloat16.self, tokens: tokens, options: options, seed: UInt64(tokens))
        try agreesWithFloat64(Float16.self, tokens: tokens, options: options, seed: UInt64(tokens) + 1)
        try agreesWithFloat64(Float.self, tokens: tokens, options: options, seed: UInt64(tokens) + 2)
    }

    @Test func emptyBatchGivesEmptyOutput() throws {
        let sample = try RandomCase<BFloat16>(shape: smallShape, tokens: 0, seed: 1)
        let out = try CPUBackend.forward(x: sample.x, routing: sample.routing, weights: sample.weights)
        #expect(out.shape == [0, smallShape.hidden])
    }

    @Test func unownedExpertsContributeNothing() throws {
        // Every expert on another rank: the output is exactly zero.
        let options = MoEOptions(expertMap: [Int32](repeating: -1, count: 12))
        let sample = try RandomCase<BFloat16>(shape: smallShape, tokens: 9, options: options, seed: 4)
        let out = try CPUBackend.forward(x: sample.x, routing: sample.routing, weights: sample.weights, options: options)
        #expect(out.floats.allSatisfy { $0 == 0 })
        // Half owned: agrees with the float64 reference under the same map.
        let half = MoEOptions(expertMap: (0..<12).map { $0 % 2 == 0 ? Int32($0 / 2) : -1 })
        try agreesWithFloat64(BFloat16.self, tokens: 9, options: half, seed: 5)
    }

    @Test func unroutedSlotsContributeNothing() throws {
        var sample = try RandomCase<Float>(shape: smallShape, tokens: 3, seed: 8)
        sample.routing.ids = [Int32](repeating: -1, count: 6)
        let out = try CPUBackend.forward(x: sample.x, routing: sample.routing, weights: sample.weights)
        #expect(out.floats.allSatisfy { $0 == 0 })
    }

    @Test func inputChecksNameTheArgument() throws {
        let sample = try RandomCase<BFloat16>(shape: smallShape, tokens: 4, seed: 2)
        func argumentName(_ body: () throws -> Void) -> String? {
            do { try body() } catch let error as MoEError { if case .invalidArgument(let name, _) = error { return name } } catch {}
            return nil
        }
        let wrongX = HostTensor<BFloat16>(shape: [4, smallShape.hidden + 1], repeating: BFloat16(Float(1)))
        #expect(argumentName { _ = try CPUBackend.forward(x: wrongX, routing: sample.routing, weights: sample.weights) } == "x")
        var badIDs = sample.routing
        badIDs.ids[3] = Int32(smallShape.experts)
        #expect(argumentName { _ = try CPUBackend.forward(x: sample.x, routing: badIDs, weights: sample.weights) } == "topk_ids")
        let fewer = try Routing(tokens: 3, topK: 2, ids: [0, 1, 2, 3, 4, 5], weights: [Float](repeating: 0.5, count: 6))
        #expect(argumentName { _ = try CPUBackend.forward(x: sample.x, routing: fewer, weights: sample.weights) } == "topk_ids")
        let oneSlot = try Routing(tokens: 4, topK: 1, ids: [0, 1, 2, 3], weights: [1, 1, 1, 1])
        #expect(argumentName { _ = try CPUBackend.forward(x: sample.x, routing: oneSlot, weights: sample.weights) } == "topk_ids")
        var badWeight = sample.routing
        badWeight.weights[0] = .infinity
        #expect(argumentName { _ = try CPUBackend.forward(x: sample.x, routing: badWeight, weights: sample.weights) } == "topk_weights")
        #expect(argumentName { _ = try CPUBackend.forward(x: sample.x, routing: sample.routing, weights: sample.weights, options: MoEOptions(expertMap: [0, 7])) } == "expert_map")
        #expect(argumentName { _ = try MoEWeights(w1: sample.weights.w1, w2: sample.weights.w1, topK: 2) } == "w2")
        let oddW1 = HostTensor<BFloat16>(shape: [2, 3, 8], repeating: BFloat16(Float(0)))
        #expect(argumentName { _ = try MoEWeights(w1: oddW1, w2: oddW1, topK: 1) } == "w1")
        #expect(argumentName { _ = try Routing(tokens: 2, topK: 2, ids: [0, 1, 2], weights: [1, 1, 1, 1]) } == "topk_ids")
    }

    @Test func shapeChecks() throws {
        #expect(throws: MoEError.invalidArgument("topK", "must be <= experts (4), got 5")) {
            try MoEShape(experts: 4, topK: 5, hidden: 8, intermediate: 8)
        }
        #expect(throws: MoEError.self) { try MoEShape(experts: 0, topK: 1, hidden: 8, intermediate: 8) }
        #expect(throws: MoEError.self) { try MoEShape(experts: 4, topK: 1, hidden: 0, intermediate: 8) }
        #expect(throws: MoEError.self) { try ShapePreset.named("nope") }
        #expect(try ShapePreset.named("seed4096").shape.flops(tokens: 1) == 2 * 8 * 3 * 384 * 4096)
    }

    @Test func benchReportHasDesignFields() {
        let ceilings = Ceilings(copyBytesPerSecond: 4e12, matrixFlopsPerSecond: 7e14)
        let shape = try! MoEShape(experts: 128, topK: 8, hidden: 4096, intermediate: 384)
        let floor = ceilings.floorMilliseconds(shape: shape, tokens: 1, expertsTouched: 8, dtype: .bf16)
        // 8 experts * 3 * 384 * 4096 * 2 bytes + 2 * 4096 * 2 bytes over 4 TB/s.
        #expect(abs(floor - 1000 * (8.0 * 3 * 384 * 4096 * 2 + 4 * 4096) / 4e12) < 1e-9)
        let row = BenchRow(shape: "seed4096", moeShape: shape, tokens: 1, variant: "cpu", splitK: 1, splitMode: "none",
                           milliseconds: 2 * floor, floorMilliseconds: floor, relativeError: 1e-3, expertsTouched: 8)
        #expect(abs(row.percentOfFloor - 50) < 1e-9)
        // Input sets touching 7 and 8 experts (memory-bound at one token): the floor of 7.5 experts.
        let mixed = ceilings.meanFloorMilliseconds(shape: shape, tokens: 1, expertsTouched: [7, 8], dtype: .bf16)
        #expect(abs(mixed - 1000 * (7.5 * 3 * 384 * 4096 * 2 + 4 * 4096) / 4e12) < 1e-9)
        #expect(ceilings.meanFloorMilliseconds(shape: shape, tokens: 1, expertsTouched: [8], dtype: .bf16) == floor)
        let json = BenchReport(device: "d", driver: "x", commit: "c", date: "t", ceilings: ceilings, rows: [row]).json
        for key in ["device", "driver", "commit", "date", "ceilings", "rows"] { #expect(json[key] != nil, "\(key)") }
        guard case .array(let rows) = json["rows"]! else { Issue.record("rows"); return }
        for key in ["shape", "E", "topk", "H", "I", "M", "variant", "split_k", "split_mode", "ms", "floor_ms", "rel_err"] {
            #expect(rows[0][key] != nil, "\(key)")
        }
    }
}
