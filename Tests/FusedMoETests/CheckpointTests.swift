import Testing

@testable import FusedMoE

/// Per-expert projections of a small layer and the stacking the layer expects from them.
struct ExpertFixture {
    static let (experts, hidden, intermediate) = (4, 16, 8)
    var gate: [HostTensor<BFloat16>]
    var up: [HostTensor<BFloat16>]
    var down: [HostTensor<BFloat16>]
    var router: HostTensor<BFloat16>

    init(seed: UInt64) {
        var generator = SplitMix64(seed: seed)
        let (e, h, i) = (ExpertFixture.experts, ExpertFixture.hidden, ExpertFixture.intermediate)
        gate = (0..<e).map { _ in HostTensor.random(shape: [i, h], using: &generator) }
        up = (0..<e).map { _ in HostTensor.random(shape: [i, h], using: &generator) }
        down = (0..<e).map { _ in HostTensor.random(shape: [h, i], using: &generator) }
        router = HostTensor.random(shape: [e, h], using: &generator)
    }

    /// `w1 [E/ep, 2I/tp, H]` and `w2 [E/ep, H, I/tp]` of rank 0, built element by element.
    func expected(tp: Int = 1, ep: Int = 1) -> (w1: [BFloat16], w2: [BFloat16]) {
        let (h, i) = (ExpertFixture.hidden, ExpertFixture.intermediate)
        let columns = i / tp
        var w1: [BFloat16] = []
        var w2: [BFloat16] = []
        for e in 0..<(ExpertFixture.experts / ep) {
            for row in 0..<columns { for c in 0..<h { w1.append(gate[e][row, c]) } }
            for row in 0..<columns { for c in 0..<h { w1.append(up[e][row, c]) } }
            for row in 0..<h { for c in 0..<columns { w2.append(down[e][row, c]) } }
        }
        return (w1, w2)
    }

    /// The stacked tensors of all experts, unsplit.
    var stacked: (w13: HostTensor<BFloat16>, w2: HostTensor<BFloat16>) {
        let (e, h, i) = (ExpertFixture.experts, ExpertFixture.hidden, ExpertFixture.intermediate)
        let whole = expected()
        return (
            try! HostTensor(shape: [e, 2 * i, h], storage: whole.w1),
            try! HostTensor(shape: [e, h, i], storage: whole.w2)
        )
    }

    /// The layer's tensors in a naming, with the router, plus unrelated tensors of other layers.
    func tensors(naming: ExpertNaming, layer: Int, includeRouter: Bool = true) -> [SafetensorsTensor] {
        let base = "model.layers.\(layer)."
        var tensors: [SafetensorsTensor] = [
            SafetensorsTensor(
                name: base + "self_attn.q_proj.weight",
                try! HostTensor<BFloat16>(shape: [2, 2], storage: .init(repeating: .zero, count: 4))),
            SafetensorsTensor(name: "model.layers.\(layer + 1).mlp.experts.0.gate_proj.weight", gate[0]),
        ]
        switch naming {
        case .mixtral:
            for e in 0..<ExpertFixture.experts {
                tensors.append(SafetensorsTensor(name: base + "block_sparse_moe.experts.\(e).w1.weight", gate[e]))
                tensors.append(SafetensorsTensor(name: base + "block_sparse_moe.experts.\(e).w3.weight", up[e]))
                tensors.append(SafetensorsTensor(name: base + "block_sparse_moe.experts.\(e).w2.weight", down[e]))
            }
            if includeRouter { tensors.append(SafetensorsTensor(name: base + "block_sparse_moe.gate.weight", router)) }
        case .gateUpDown:
            // Experts listed out of order, as sharded checkpoints often are.
            for e in (0..<ExpertFixture.experts).reversed() {
                tensors.append(SafetensorsTensor(name: base + "mlp.experts.\(e).down_proj.weight", down[e]))
                tensors.append(SafetensorsTensor(name: base + "mlp.experts.\(e).gate_proj.weight", gate[e]))
                tensors.append(SafetensorsTensor(name: base + "mlp.experts.\(e).up_proj.weight", up[e]))
            }
            if includeRouter { tensors.append(SafetensorsTensor(name: base + "mlp.gate.weight", router)) }
        case .stacked:
            tensors.append(SafetensorsTensor(name: base + "mlp.experts.w13_weight", stacked.w13))
            tensors.append(SafetensorsTensor(name: base + "mlp.experts.w2_weight", stacked.w2))
            if includeRouter { tensors.append(SafetensorsTensor(name: base + "mlp.gate.weight", router)) }
        }
        return tensors
    }
}

@Suite struct CheckpointTests {
    static let fixture = ExpertFixture(seed: 31)

    @Test(arguments: ExpertNaming.allCases)
    func eachNamingLoadsIntoTheStackedLayout(naming: ExpertNaming) throws {
        let folder = IOTestFolder()
        let path = folder.file("model.safetensors")
        try SafetensorsFile.write(CheckpointTests.fixture.tensors(naming: naming, layer: 3), to: path)
        let checkpoint = try MoECheckpoint(path: path)
        #expect(checkpoint.naming(layer: 3) == naming)
        let layer = try checkpoint.layer(3, topK: 2, as: BFloat16.self)
        let expected = CheckpointTests.fixture.expected()
        #expect(layer.naming == naming)
        #expect(layer.globalExperts == 4)
        #expect(layer.expertMap == nil)
        #expect(layer.weights.shape == (try MoEShape(experts: 4, topK: 2, hidden: 16, intermediate: 8)))
        #expect(layer.weights.w1.storage == expected.w1)
        #expect(layer.weights.w2.storage == expected.w2)
        #expect(layer.router?.shape == [4, 16])
        #expect(layer.router?.storage == CheckpointTests.fixture.router.storage.map(\.floatValue))
        #expect(layer.routerCorrectionBias == nil)
        // The same file opened through its folder.
        let again = try MoECheckpoint(path: folder.path).layer(3, topK: 2, as: BFloat16.self)
        #expect(again.weights.w1.storage == expected.w1)
    }

    @Test(arguments: ExpertNaming.allCases, [(1, 2), (2, 1), (2, 2), (4, 4)])
    func tensorAndExpertParallelKeepRankZerosSlice(naming: ExpertNaming, split: (tp: Int, ep: Int)) throws {
        let folder = IOTestFolder()
        let path = folder.file("model.safetensors")
        try SafetensorsFile.write(CheckpointTests.fixture.tensors(naming: naming, layer: 0), to: path)
        let layer = try MoECheckpoint(path: path).layer(
            0, topK: 1, tensorParallel: split.tp, expertParallel: split.ep, as: BFloat16.self)
        let expected = CheckpointTests.fixture.expected(tp: split.tp, ep: split.ep)
        #expect(
            layer.weights.shape
                == (try MoEShape(experts: 4 / split.ep, topK: 1, hidden: 16, intermediate: 8 / split.tp)))
        #expect(layer.weights.w1.storage == expected.w1)
        #expect(layer.weights.w2.storage == expected.w2)
        let localExperts = 4 / split.ep
        let map = (0..<4).map { $0 < localExperts ? Int32($0) : -1 }
        #expect(layer.expertMap == (split.ep == 1 ? nil : map))
        #expect(layer.router?.shape == [4, 16], "the router covers every expert")
    }

    @Test func otherRanksTakeTheirOwnSlices() throws {
        let folder = IOTestFolder()
        let path = folder.file("model.safetensors")
        let fixture = CheckpointTests.fixture
        try SafetensorsFile.write(fixture.tensors(naming: .gateUpDown, layer: 0), to: path)
        let layer = try MoECheckpoint(path: path).layer(
            0, topK: 1, tensorParallel: 2, tensorParallelRank: 1, expertParallel: 2, expertParallelRank: 1,
            as: BFloat16.self)
        // Local expert 0 is global expert 2; columns 4..<8 of the intermediate dimension.
        #expect(layer.weights.w1[0, 0, 5] == fixture.gate[2][4, 5])
        #expect(layer.weights.w1[1, 3, 0] == fixture.gate[3][7, 0])
        #expect(layer.weights.w1[0, 4, 9] == fixture.up[2][4, 9])
        #expect(layer.weights.w2[1, 15, 3] == fixture.down[3][15, 7])
        #expect(layer.expertMap == [-1, -1, 0, 1])
    }

    @Test func convertsFromTheStoredType() throws {
        let folder = IOTestFolder()
        let path = folder.file("model.safetensors")
        // Stored as F32: loading as BFloat16 gives back the same values (they came from bf16).
        let tensors = CheckpointTests.fixture.tensors(naming: .mixtral, layer: 1).map { tensor -> SafetensorsTensor in
            let values = tensor.bytes.withUnsafeBytes { Array($0.bindMemory(to: BFloat16.self)) }.map(\.floatValue)
            return SafetensorsTensor(name: tensor.name, try! HostTensor(shape: tensor.shape, storage: values))
        }
        try SafetensorsFile.write(tensors, to: path)
        let layer = try MoECheckpoint(path: path).layer(1, topK: 2, as: BFloat16.self)
        #expect(layer.weights.w1.storage == CheckpointTests.fixture.expected().w1)
        let wide = try MoECheckpoint(path: path).layer(1, topK: 2, as: Float.self)
        #expect(wide.weights.w2.storage == CheckpointTests.fixture.expected().w2.map(\.floatValue))
    }

    /// Writes the layer over three shards and an index, as `save_pretrained` does.
    func writeSharded(_ tensors: [SafetensorsTensor], in folder: IOTestFolder) throws -> [String: String] {
        var weightMap: [(String, JSON)] = []
        var shardOf: [String: String] = [:]
        for shard in 0..<3 {
            let name = "model-0000\(shard + 1)-of-00003.safetensors"
            let part = tensors.enumerated().filter { $0.offset % 3 == shard }.map(\.element)
            try SafetensorsFile.write(part, metadata: ["format": "pt"], to: folder.file(name))
            for tensor in part {
                weightMap.append((tensor.name, .string(name)))
                shardOf[tensor.name] = name
            }
        }
        let index = JSON.object([
            ("metadata", .object([("total_size", .number(Double(tensors.reduce(0) { $0 + $1.bytes.count })))])),
            ("weight_map", .object(weightMap)),
        ])
        folder.write(text: index.serialized(indent: 2), to: MoECheckpoint.indexFileName)
        return shardOf
    }

    @Test(arguments: ExpertNaming.allCases)
    func shardedCheckpointsLoadThroughTheIndex(naming: ExpertNaming) throws {
        let folder = IOTestFolder()
        _ = try writeSharded(CheckpointTests.fixture.tensors(naming: naming, layer: 5), in: folder)
        let expected = CheckpointTests.fixture.expected(tp: 2)
        for path in [folder.path, folder.file(MoECheckpoint.indexFileName)] {
            let checkpoint = try MoECheckpoint(path: path)
            #expect(checkpoint.fileOfTensor.count == CheckpointTests.fixture.tensors(naming: naming, layer: 5).count)
            let layer = try checkpoint.layer(5, topK: 2, tensorParallel: 2, as: BFloat16.self)
            #expect(layer.weights.w1.storage == expected.w1)
            #expect(layer.weights.w2.storage == expected.w2)
            #expect(layer.router != nil)
        }
    }

    @Test func loadsWithAModelConfig() throws {
        let folder = IOTestFolder()
        try SafetensorsFile.write(
            CheckpointTests.fixture.tensors(naming: .gateUpDown, layer: 0), to: folder.file("model.safetensors"))
        let json = JSON.object([
            ("architectures", .array([.string("Qwen3MoeForCausalLM")])), ("model_type", .string("qwen3_moe")),
            ("hidden_size", .number(16)), ("moe_intermediate_size", .number(16)), ("num_experts", .number(4)),
            ("num_experts_per_tok", .number(2)), ("norm_topk_prob", .bool(true)),
        ])
        // The config says I = 16, the checkpoint holds I = 8: named as the config's field.
        let config = try MoEModelConfig(json: json, tensorParallel: 2)
        let error = caughtError { _ = try MoECheckpoint(path: folder.path).layer(0, config: config, as: BFloat16.self) }
        guard case .invalidArgument("config.json: moe_intermediate_size", _) = error else {
            Issue.record("got \(String(describing: error))")
            return
        }
        let matching = try MoEModelConfig(
            json: ModelConfigSamples.editing(json, "moe_intermediate_size", .number(8)), expertParallel: 2)
        let layer = try MoECheckpoint(path: folder.path).layer(0, config: matching, as: BFloat16.self)
        #expect(layer.weights.shape == matching.shape)
        #expect(layer.expertMap == matching.expertMap)
        #expect(layer.weights.w1.storage == CheckpointTests.fixture.expected(ep: 2).w1)
    }

    @Test func missingTensorIsNamed() throws {
        let folder = IOTestFolder()
        let path = folder.file("model.safetensors")
        let missing = "model.layers.0.mlp.experts.2.up_proj.weight"
        try SafetensorsFile.write(
            CheckpointTests.fixture.tensors(naming: .gateUpDown, layer: 0).filter { $0.name != missing }, to: path)
        let error = caughtError { _ = try MoECheckpoint(path: path).layer(0, topK: 2, as: BFloat16.self) }
        #expect(error == .malformedFile(path, "tensor '\(missing)': missing from the checkpoint"))
        // Experts past the ones the file holds, when the caller says there are more.
        let more = caughtError { _ = try MoECheckpoint(path: path).layer(0, topK: 2, experts: 6, as: BFloat16.self) }
        guard case .malformedFile(_, let message) = more, message.contains("tensor 'model.layers.0.mlp.experts.") else {
            Issue.record("got \(String(describing: more))")
            return
        }
    }

    @Test func wrongShapeIsNamed() throws {
        let folder = IOTestFolder()
        let path = folder.file("model.safetensors")
        let name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
        let tensors = CheckpointTests.fixture.tensors(naming: .mixtral, layer: 0).map { tensor in
            tensor.name == name ? SafetensorsTensor(name: name, CheckpointTests.fixture.gate[1]) : tensor
        }
        try SafetensorsFile.write(tensors, to: path)
        let error = caughtError { _ = try MoECheckpoint(path: path).layer(0, topK: 2, as: BFloat16.self) }
        #expect(
            error
                == .malformedFile(
                    path,
                    "tensor '\(name)': expected shape [16, 8] ([H, I] for expert 0's gate [I, H]), got shape [8, 16]"))

        let stackedPath = folder.file("stacked.safetensors")
        let stacked = CheckpointTests.fixture.tensors(naming: .stacked, layer: 0).map { tensor in
            tensor.name.hasSuffix("w2_weight")
                ? SafetensorsTensor(
                    name: tensor.name,
                    try! HostTensor<BFloat16>(shape: [4, 16, 4], storage: .init(repeating: .zero, count: 256)))
                : tensor
        }
        try SafetensorsFile.write(stacked, to: stackedPath)
        let stackedError = caughtError { _ = try MoECheckpoint(path: stackedPath).layer(0, topK: 2, as: BFloat16.self) }
        #expect(
            stackedError
                == .malformedFile(
                    stackedPath,
                    "tensor 'model.layers.0.mlp.experts.w2_weight': expected shape [4, 16, 8] ([E, H, I]), "
                        + "got shape [4, 16, 4]"
                ))
    }

    @Test func errorsForLayersAndSplits() throws {
        let folder = IOTestFolder()
        let path = folder.file("model.safetensors")
        try SafetensorsFile.write(CheckpointTests.fixture.tensors(naming: .gateUpDown, layer: 0), to: path)
        let checkpoint = try MoECheckpoint(path: path)
        guard
            case .invalidArgument("layer", let message) = caughtError({
                _ = try checkpoint.layer(7, topK: 2, as: Float.self)
            })
        else {
            Issue.record("a layer without experts must be an error")
            return
        }
        #expect(message.contains("model.layers.7.mlp.experts.0.gate_proj.weight"))
        guard
            case .invalidArgument("tensorParallel", _) = caughtError({
                _ = try checkpoint.layer(0, topK: 2, tensorParallel: 3, as: Float.self)
            })
        else {
            Issue.record("tp = 3 does not divide I = 8")
            return
        }
        guard
            case .invalidArgument("expertParallel", _) = caughtError({
                _ = try checkpoint.layer(0, topK: 1, expertParallel: 3, as: Float.self)
            })
        else {
            Issue.record("ep = 3 does not divide E = 4")
            return
        }
        // An index naming a shard that lacks the tensor.
        folder.write(
            text: #"{"weight_map": {"model.layers.0.mlp.experts.w13_weight": "model.safetensors"}}"#, to: "index.json")
        let lying = caughtError {
            _ = try MoECheckpoint(path: folder.file("index.json")).layer(0, topK: 2, as: Float.self)
        }
        #expect(
            lying
                == .malformedFile(
                    path,
                    "tensor 'model.layers.0.mlp.experts.w13_weight': listed in the index for this shard but "
                        + "missing from it"
                ))
        folder.write(text: #"{"weight_map": []}"#, to: "bad.json")
        #expect(
            caughtError { _ = try MoECheckpoint(path: folder.file("bad.json")) }
                == .malformedFile(
                    folder.file("bad.json"), "weight_map: expected an object mapping tensor names to shard files"))
    }
}
