import Testing
@testable import FusedMoE

/// `fused-moe run` end to end through `RunLayer`, the code the command calls, on the CPU backend.
@Suite struct RunLayerTests {
    static let shape = try! MoEShape(experts: 4, topK: 2, hidden: 16, intermediate: 8)

    /// Writes x, w1, w2 and the routing tensors given, and returns the file and the sample.
    func writeInput<T: MoEScalar>(
        _: T.Type, in folder: IOTestFolder, tokens: Int = 5, seed: UInt64 = 3,
        routing: (RandomCase<T>) -> [SafetensorsTensor]
    ) throws -> (path: String, sample: RandomCase<T>) {
        let sample = try RandomCase<T>(shape: RunLayerTests.shape, tokens: tokens, seed: seed)
        let tensors = [
            SafetensorsTensor(name: "x", sample.x), SafetensorsTensor(name: "w1", sample.weights.w1),
            SafetensorsTensor(name: "w2", sample.weights.w2),
        ]
        let path = folder.file("in.safetensors")
        try SafetensorsFile.write(tensors + routing(sample), to: path)
        return (path, sample)
    }

    @Test(arguments: [Activation.silu, .gelu], [false, true])
    func routerLogitsRunLikeTheCPUBackend(activation: Activation, renormalize: Bool) throws {
        let folder = IOTestFolder()
        let (input, sample) = try writeInput(BFloat16.self, in: folder) { sample in
            [SafetensorsTensor(name: "router_logits", sample.logits)]
        }
        let output = folder.file("out.safetensors")
        let settings = RunLayer.Settings(topK: 2, renormalize: renormalize, activation: activation)
        let result = try RunLayer.run(inputPath: input, outputPath: output, settings: settings, backend: .cpu)
        #expect(result.routedFromLogits)
        #expect(result.dtype == .bf16)
        #expect(result.notes.isEmpty)

        let options = MoEOptions(activation: activation, renormalize: renormalize)
        let routing = try Router.softmaxTopK(logits: sample.logits, topK: 2, renormalize: renormalize)
        let expected = try CPUBackend.forward(x: sample.x, routing: routing, weights: sample.weights, options: options)
        let file = try SafetensorsFile(path: output)
        #expect(file.names == ["out", "topk_ids", "topk_weights"])
        #expect(file.info("out")?.dtype == .bf16)
        #expect(file.info("topk_ids")?.dtype == .i32)
        #expect(file.info("topk_weights")?.dtype == .f32)
        let out = try file.tensor("out", as: BFloat16.self)
        #expect(out.shape == [5, 16])
        #expect(out.storage == expected.storage)
        #expect(expected.floats.contains { $0 != 0 })
        #expect(try file.integers("topk_ids").storage == routing.ids)
        #expect(try file.tensor("topk_weights", as: Float.self).storage == routing.weights)
        #expect(file.metadata["producer"] == "fused-moe run")
    }

    @Test(arguments: [false, true])
    func groupedRoutingWithAndWithoutCorrectionBias(withBias: Bool) throws {
        let folder = IOTestFolder()
        let bias: [Float] = [0.5, -0.25, 0, 0.125]
        let (input, sample) = try writeInput(BFloat16.self, in: folder) { sample in
            [SafetensorsTensor(name: "router_logits", sample.logits)]
                + (withBias ? [SafetensorsTensor(name: "correction_bias", try! HostTensor(shape: [4], storage: bias))] : [])
        }
        var settings = RunLayer.Settings(topK: 2, renormalize: true)
        settings.grouped = MoERoutingConfig(scoring: .sigmoid, renormalize: false, groups: 2, topKGroups: 1, scalingFactor: 2.5)
        let result = try RunLayer.run(
            inputPath: input, outputPath: folder.file("out.safetensors"), settings: settings, backend: .cpu)
        #expect(result.routedFromLogits)
        let routing = try Router.groupedTopK(
            logits: sample.logits, correctionBias: withBias ? bias : nil, topK: 2, groups: 2, topKGroups: 1,
            scoring: .sigmoid, renormalize: true, scalingFactor: 2.5)
        let file = try SafetensorsFile(path: folder.file("out.safetensors"))
        #expect(try file.integers("topk_ids").storage == routing.ids)
        // One group kept of two: both experts of a token come from the same half.
        for token in 0..<5 { #expect(routing.ids[2 * token] / 2 == routing.ids[2 * token + 1] / 2) }
        let expected = try CPUBackend.forward(x: sample.x, routing: routing, weights: sample.weights)
        #expect(try file.tensor("out", as: BFloat16.self).storage == expected.storage)
    }

    @Test func topKIDsAsInt64WithBF16WeightsAndUnroutedSlots() throws {
        let folder = IOTestFolder()
        var routing = Routing?.none
        let (input, sample) = try writeInput(Float16.self, in: folder, tokens: 4) { sample in
            var ids = sample.routing.ids.map { Int64($0) }
            ids[3] = -1
            let weights = sample.routing.weights.map { BFloat16($0) }
            routing = try! Routing(tokens: 4, topK: 2, ids: ids.map { Int32($0) }, weights: weights.map(\.floatValue))
            return [
                SafetensorsTensor(name: "topk_ids", try! HostTensor(shape: [4, 2], storage: ids)),
                SafetensorsTensor(name: "topk_weights", try! HostTensor(shape: [4, 2], storage: weights)),
            ]
        }
        let output = folder.file("out.safetensors")
        let result = try RunLayer.run(
            inputPath: input, outputPath: output, settings: RunLayer.Settings(renormalize: true), backend: .cpu)
        #expect(!result.routedFromLogits)
        #expect(result.notes == ["--renormalize applies to router_logits; topk_weights are used as given"])
        let expected = try CPUBackend.forward(x: sample.x, routing: try #require(routing), weights: sample.weights)
        let file = try SafetensorsFile(path: output)
        #expect(file.names == ["out"])
        #expect(try file.tensor("out", as: Float16.self).storage == expected.storage)
    }

    @Test func dtypesMustAgreeOrBeConverted() throws {
        let folder = IOTestFolder()
        let sample = try RandomCase<Float>(shape: RunLayerTests.shape, tokens: 3, seed: 9)
        let x = try HostTensor(shape: sample.x.shape, storage: sample.x.storage.map { BFloat16($0) })
        let path = folder.file("in.safetensors")
        try SafetensorsFile.write(
            [
                SafetensorsTensor(name: "x", x), SafetensorsTensor(name: "w1", sample.weights.w1),
                SafetensorsTensor(name: "w2", sample.weights.w2),
                SafetensorsTensor(name: "router_logits", sample.logits),
            ], to: path)
        let file = try SafetensorsFile(path: path)
        let error = caughtError {
            _ = try RunLayer.run(input: file, settings: RunLayer.Settings(topK: 2), backend: .cpu)
        }
        guard case .invalidArgument("w1", let message) = error else {
            Issue.record("got \(String(describing: error))")
            return
        }
        #expect(message.hasPrefix("dtype F32 differs from x's BF16; x, w1 and w2 must agree, or pass --dtype"))

        // Converted to bf16 on request: the same as converting first and running the CPU backend.
        let result = try RunLayer.run(input: file, settings: RunLayer.Settings(topK: 2, dtype: .bf16), backend: .cpu)
        #expect(result.notes == ["converted w1 from F32 to bf16", "converted w2 from F32 to bf16"])
        let weights = try MoEWeights(
            w1: try HostTensor(shape: sample.weights.w1.shape, storage: sample.weights.w1.storage.map { BFloat16($0) }),
            w2: try HostTensor(shape: sample.weights.w2.shape, storage: sample.weights.w2.storage.map { BFloat16($0) }),
            topK: 2)
        let expected = try CPUBackend.forward(x: x, routing: sample.routing, weights: weights)
        #expect(result.outputs[0].bytes == SafetensorsTensor(name: "out", expected).bytes)
        // Or to fp32, converting x.
        let wide = try RunLayer.run(input: file, settings: RunLayer.Settings(topK: 2, dtype: .fp32), backend: .cpu)
        #expect(wide.dtype == .fp32 && wide.notes == ["converted x from BF16 to fp32"])
    }

    /// Inputs that must fail, each with the tensor (or option) the error names.
    @Test func badInputsNameTheTensor() throws {
        let folder = IOTestFolder()
        let sample = try RandomCase<BFloat16>(shape: RunLayerTests.shape, tokens: 3, seed: 5)
        let x = SafetensorsTensor(name: "x", sample.x)
        let w1 = SafetensorsTensor(name: "w1", sample.weights.w1)
        let w2 = SafetensorsTensor(name: "w2", sample.weights.w2)
        let logits = SafetensorsTensor(name: "router_logits", sample.logits)
        let ids = SafetensorsTensor(name: "topk_ids", try HostTensor(shape: [3, 2], storage: sample.routing.ids))
        let weights = SafetensorsTensor(
            name: "topk_weights", try HostTensor(shape: [3, 2], storage: sample.routing.weights))
        func tensor<T: MoEScalar>(_ name: String, _ shape: [Int], _: T.Type) -> SafetensorsTensor {
            SafetensorsTensor(name: name, HostTensor<T>(shape: shape, repeating: T(0.5)))
        }
        var badIDs = sample.routing.ids
        badIDs[4] = 4
        let xInts = SafetensorsTensor(name: "x", HostTensor<Int32>(shape: [3, 16], repeating: 0))
        let idsOfWrongM = SafetensorsTensor(name: "topk_ids", HostTensor<Int32>(shape: [2, 2], repeating: 0))
        let idsOutOfRange = SafetensorsTensor(name: "topk_ids", try HostTensor(shape: [3, 2], storage: badIDs))
        let wideLogits = tensor("router_logits", [3, 5], Float.self)
        let narrowWeights = tensor("topk_weights", [3, 1], Float.self)
        let k2 = RunLayer.Settings(topK: 2)
        let none = RunLayer.Settings()
        let cases: [(String, [SafetensorsTensor], RunLayer.Settings, String, String)] = [
            ("no x", [w1, w2, logits], k2, "x", "missing from"),
            ("no w1", [x, w2, logits], k2, "w1", "missing from"),
            ("no w2", [x, w1, logits], k2, "w2", "missing from"),
            ("no routing", [x, w1, w2], k2, "router_logits", "missing from"),
            ("ids without weights", [x, w1, w2, ids], none, "topk_weights", "missing from"),
            ("both routings", [x, w1, w2, logits, ids, weights], k2, "router_logits", "holds both"),
            ("x of rank 3", [tensor("x", [1, 3, 16], BFloat16.self), w1, w2, logits], k2, "x", "expected rank 2"),
            ("x of wrong H", [tensor("x", [3, 12], BFloat16.self), w1, w2, logits], k2, "w1", "H = 12"),
            ("x of integers", [xInts, w1, w2, logits], k2, "x", "dtype I32"),
            ("odd 2I", [x, tensor("w1", [4, 15, 16], BFloat16.self), w2, logits], k2, "w1", "even"),
            ("w2 transposed", [x, w1, tensor("w2", [4, 8, 16], BFloat16.self), logits], k2, "w2", "= [4, 16, 8]"),
            ("logits of wrong E", [x, w1, w2, wideLogits], k2, "router_logits", "= [3, 4]"),
            ("no top-k", [x, w1, w2, logits], none, "top-k", "required"),
            ("top-k > E", [x, w1, w2, logits], .init(topK: 5), "top-k", "1...4"),
            ("float ids", [x, w1, w2, tensor("topk_ids", [3, 2], Float.self), weights], none, "topk_ids", "I32 or I64"),
            ("ids of wrong M", [x, w1, w2, idsOfWrongM, weights], none, "topk_ids", "M = 3"),
            ("id out of range", [x, w1, w2, idsOutOfRange, weights], none, "topk_ids", "entry [2, 0] is 4"),
            ("weights of wrong shape", [x, w1, w2, ids, narrowWeights], none, "topk_weights", "like topk_ids"),
            ("top-k disagrees", [x, w1, w2, ids, weights], .init(topK: 3), "top-k", "disagrees"),
        ]
        for (label, tensors, settings, name, fragment) in cases {
            let path = folder.file("bad.safetensors")
            try SafetensorsFile.write(tensors, to: path)
            let error = caughtError {
                _ = try RunLayer.run(input: try SafetensorsFile(path: path), settings: settings, backend: .cpu)
            }
            guard case .invalidArgument(let named, let message) = error else {
                Issue.record("\(label): expected invalidArgument, got \(String(describing: error))")
                continue
            }
            #expect(named == name, "\(label): \(message)")
            #expect(message.contains(fragment), "\(label): \(message)")
        }
    }
}
