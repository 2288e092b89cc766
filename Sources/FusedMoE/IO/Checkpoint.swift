/// How a checkpoint names the experts of a layer `L` (under the prefix, `model.layers` by default).
public enum ExpertNaming: String, CaseIterable, Hashable, Sendable {
    /// Mixtral: `model.layers.{L}.block_sparse_moe.experts.{e}.w1.weight` (gate `[I, H]`),
    /// `.w3.weight` (up `[I, H]`), `.w2.weight` (down `[H, I]`); router `block_sparse_moe.gate.weight`.
    case mixtral
    /// Qwen2/3-MoE and DeepSeek: `model.layers.{L}.mlp.experts.{e}.gate_proj.weight` `[I, H]`,
    /// `.up_proj.weight` `[I, H]`, `.down_proj.weight` `[H, I]`; router `mlp.gate.weight`.
    case gateUpDown
    /// Already stacked (vLLM/SGLang): `model.layers.{L}.mlp.experts.w13_weight` `[E, 2I, H]` (gate
    /// rows, then up rows) and `.w2_weight` `[E, H, I]`, unsplit; router `mlp.gate.weight`.
    case stacked
}

/// One MoE layer read from a checkpoint.
public struct CheckpointLayer<T: MoEScalar>: Sendable {
    /// `w1 [E_local, 2I_local, H]` (gate rows, then up rows) and `w2 [E_local, H, I_local]`.
    public var weights: MoEWeights<T>
    /// The router `gate.weight [E, H]` over all experts, when the checkpoint has it.
    public var router: HostTensor<Float>?
    /// DeepSeek-V3's `gate.e_score_correction_bias [E]`, when the checkpoint has it.
    public var routerCorrectionBias: HostTensor<Float>?
    /// The naming the experts were found under.
    public var naming: ExpertNaming
    /// The experts of the whole layer, before expert parallelism.
    public var globalExperts: Int
    /// The map from global expert ids to this rank's local experts; nil without expert parallelism.
    public var expertMap: [Int32]?
}

/// A safetensors checkpoint: one file, or shards listed by `model.safetensors.index.json`.
///
/// Opening reads only the index (or one header); loading a layer maps the shards that hold it
/// and copies each needed byte once, straight into the stacked `w1`/`w2` layout in the requested
/// type, slicing for a tensor-parallel rank (gate/up rows, down columns) and an expert-parallel
/// rank (a contiguous run of experts).
public struct MoECheckpoint: Sendable {
    /// The file, index or folder the checkpoint was opened from.
    public let path: String
    /// Every tensor name with the file that holds it.
    public let fileOfTensor: [String: String]
    fileprivate let single: SafetensorsFile?

    /// The name of the shard index in a model folder.
    public static let indexFileName = "model.safetensors.index.json"

    /// Opens a checkpoint.
    /// - Parameter path: a `.safetensors` file; an index json (its `weight_map` maps tensor names
    ///   to shard files in the index's folder); or a folder holding `model.safetensors.index.json`
    ///   or `model.safetensors`.
    /// - Throws: `MoEError.invalidArgument(path, ...)` when nothing can be opened there,
    ///   `MoEError.malformedFile` for a malformed index or safetensors header.
    public init(path: String) throws(MoEError) {
        self.path = path
        var file = path
        if FileSystem.isDirectory(path) {
            let index = FileSystem.join(path, MoECheckpoint.indexFileName)
            let whole = FileSystem.join(path, "model.safetensors")
            if FileSystem.isFile(index) {
                file = index
            } else if FileSystem.isFile(whole) {
                file = whole
            } else {
                throw .invalidArgument(
                    path, "the folder holds neither \(MoECheckpoint.indexFileName) nor model.safetensors")
            }
        }
        if file.hasSuffix(".json") {
            single = nil
            fileOfTensor = try MoECheckpoint.readIndex(file)
        } else {
            let opened = try SafetensorsFile(path: file)
            single = opened
            var map: [String: String] = [:]
            for name in opened.names { map[name] = file }
            fileOfTensor = map
        }
    }

    private static func readIndex(_ file: String) throws(MoEError) -> [String: String] {
        let json = try JSON.parse(try FileSystem.readText(file), source: file)
        guard case .object(let entries) = json["weight_map"] else {
            throw .malformedFile(file, "weight_map: expected an object mapping tensor names to shard files")
        }
        let folder = FileSystem.directory(of: file)
        var map: [String: String] = [:]
        for (name, shard) in entries {
            guard let shardName = shard.stringValue else {
                throw .malformedFile(file, "weight_map: the shard of tensor '\(name)' must be a file name string")
            }
            map[name] = FileSystem.join(folder, shardName)
        }
        return map
    }

    /// The naming the checkpoint uses for `layer`'s experts, or nil when it has none there.
    public func naming(layer: Int, prefix: String = "model.layers") -> ExpertNaming? {
        let base = "\(prefix).\(layer)."
        if fileOfTensor[base + "mlp.experts.w13_weight"] != nil { return .stacked }
        if fileOfTensor.keys.contains(where: { $0.hasPrefix(base + "block_sparse_moe.experts.") }) { return .mixtral }
        if fileOfTensor.keys.contains(where: { $0.hasPrefix(base + "mlp.experts.") }) { return .gateUpDown }
        return nil
    }

    /// Loads the MoE layer of a model described by `config`, split as the config says (rank 0).
    /// - Throws: the errors of `layer(_:topK:...)`, and `MoEError.invalidArgument("config.json: ...")`
    ///   when the checkpoint's sizes disagree with the config's.
    public func layer<T: MoEScalar>(_ index: Int, config: MoEModelConfig, as type: T.Type = T.self) throws(MoEError)
        -> CheckpointLayer<T>
    {
        let loaded = try layer(
            index, topK: config.shape.topK, experts: config.globalExperts, tensorParallel: config.tensorParallel,
            expertParallel: config.expertParallel, as: T.self)
        let shape = loaded.weights.shape
        guard shape.hidden == config.shape.hidden else {
            throw .invalidArgument(
                "config.json: hidden_size",
                "\(config.shape.hidden) but the checkpoint's experts have H = \(shape.hidden)")
        }
        guard shape.intermediate == config.shape.intermediate else {
            let field = config.family == .mixtral ? "intermediate_size" : "moe_intermediate_size"
            throw .invalidArgument(
                "config.json: \(field)",
                "\(config.globalIntermediate) but the checkpoint's experts have I = "
                    + "\(shape.intermediate * config.tensorParallel)")
        }
        return loaded
    }

    /// Loads layer `index`'s experts into `MoEWeights<T>`, converting from BF16, F16 or F32.
    /// - Parameters:
    ///   - topK: k, the experts per token.
    ///   - experts: E over all ranks; nil counts the experts the checkpoint holds for the layer.
    ///   - naming: nil detects it from the tensor names.
    ///   - tensorParallel, tensorParallelRank: keep rows `[r*I/tp, (r+1)*I/tp)` of gate and up and
    ///     the same columns of down.
    ///   - expertParallel, expertParallelRank: keep experts `[r*E/ep, (r+1)*E/ep)`.
    ///   - prefix: what comes before the layer index in every name.
    /// - Throws: `MoEError.malformedFile(file, "tensor 'name': ...")` naming a tensor that is
    ///   missing, of the wrong shape or of a dtype that is not a float type;
    ///   `MoEError.invalidArgument` for a layer without experts or a split that does not divide.
    public func layer<T: MoEScalar>(
        _ index: Int, topK: Int, experts: Int? = nil, naming: ExpertNaming? = nil, tensorParallel: Int = 1,
        tensorParallelRank: Int = 0, expertParallel: Int = 1, expertParallelRank: Int = 0,
        prefix: String = "model.layers", as type: T.Type = T.self
    ) throws(MoEError) -> CheckpointLayer<T> {
        guard tensorParallel >= 1, (0..<tensorParallel).contains(tensorParallelRank) else {
            throw .invalidArgument(
                "tensorParallel", "size \(tensorParallel) with rank \(tensorParallelRank); expected rank in 0..<size")
        }
        guard expertParallel >= 1, (0..<expertParallel).contains(expertParallelRank) else {
            throw .invalidArgument(
                "expertParallel", "size \(expertParallel) with rank \(expertParallelRank); expected rank in 0..<size")
        }
        let base = "\(prefix).\(index)."
        guard let naming = naming ?? self.naming(layer: index, prefix: prefix) else {
            throw .invalidArgument(
                "layer",
                "'\(path)' has no MoE experts for layer \(index): looked for "
                    + "\(base)block_sparse_moe.experts.0.w1.weight, \(base)mlp.experts.0.gate_proj.weight and "
                    + "\(base)mlp.experts.w13_weight")
        }
        var reader = ShardReader(checkpoint: self)
        var plan = StackingPlan()
        let globalExperts: Int
        let (hidden, intermediate): (Int, Int)
        switch naming {
        case .stacked:
            let w13 = try reader.tensor(base + "mlp.experts.w13_weight")
            let w2 = try reader.tensor(base + "mlp.experts.w2_weight")
            guard w13.info.shape.count == 3, w13.info.shape[1] % 2 == 0 else {
                throw w13.wrongShape("a [E, 2I, H] tensor (gate rows, then up rows)")
            }
            globalExperts = experts ?? w13.info.shape[0]
            (intermediate, hidden) = (w13.info.shape[1] / 2, w13.info.shape[2])
            try w13.expectShape([globalExperts, 2 * intermediate, hidden], "[E, 2I, H]")
            try w2.expectShape([globalExperts, hidden, intermediate], "[E, H, I]")
            let split = try Split(
                experts: globalExperts, intermediate: intermediate, tensorParallel: tensorParallel,
                tensorParallelRank: tensorParallelRank, expertParallel: expertParallel,
                expertParallelRank: expertParallelRank, source: w13.info.name)
            let upRows = (intermediate + split.columns.lowerBound)..<(intermediate + split.columns.upperBound)
            for expert in split.experts {
                let one = expert..<(expert + 1)
                plan.w1.append((w13, [one, split.columns, 0..<hidden]))
                plan.w1.append((w13, [one, upRows, 0..<hidden]))
                plan.w2.append((w2, [one, 0..<hidden, split.columns]))
            }
            plan.shape = (split.experts.count, split.columns.count)
        case .mixtral, .gateUpDown:
            let (group, gateName, upName, downName) =
                naming == .mixtral
                ? ("block_sparse_moe.experts.", "w1", "w3", "w2")
                : ("mlp.experts.", "gate_proj", "up_proj", "down_proj")
            let name = { (expert: Int, projection: String) in "\(base)\(group)\(expert).\(projection).weight" }
            globalExperts = experts ?? expertCount(prefix: base + group)
            let first = try reader.tensor(name(0, gateName))
            guard first.info.shape.count == 2 else { throw first.wrongShape("a [I, H] tensor (the gate projection)") }
            (intermediate, hidden) = (first.info.shape[0], first.info.shape[1])
            let split = try Split(
                experts: globalExperts, intermediate: intermediate, tensorParallel: tensorParallel,
                tensorParallelRank: tensorParallelRank, expertParallel: expertParallel,
                expertParallelRank: expertParallelRank, source: first.info.name)
            for expert in split.experts {
                let gate = try reader.tensor(name(expert, gateName))
                let up = try reader.tensor(name(expert, upName))
                let down = try reader.tensor(name(expert, downName))
                try gate.expectShape([intermediate, hidden], "[I, H] like expert 0's gate")
                try up.expectShape([intermediate, hidden], "[I, H] like expert 0's gate")
                try down.expectShape([hidden, intermediate], "[H, I] for expert 0's gate [I, H]")
                plan.w1.append((gate, [split.columns, 0..<hidden]))
                plan.w1.append((up, [split.columns, 0..<hidden]))
                plan.w2.append((down, [0..<hidden, split.columns]))
            }
            plan.shape = (split.experts.count, split.columns.count)
        }
        let (localExperts, localIntermediate) = (plan.shape.experts, plan.shape.intermediate)
        let w1 = try plan.read(plan.w1, shape: [localExperts, 2 * localIntermediate, hidden], name: "w1", as: T.self)
        let w2 = try plan.read(plan.w2, shape: [localExperts, hidden, localIntermediate], name: "w2", as: T.self)

        let routerGroup = naming == .mixtral ? "block_sparse_moe.gate." : "mlp.gate."
        var router: HostTensor<Float>?
        var bias: HostTensor<Float>?
        if fileOfTensor[base + routerGroup + "weight"] != nil {
            let gate = try reader.tensor(base + routerGroup + "weight")
            try gate.expectShape([globalExperts, hidden], "[E, H]")
            router = try plan.read(
                [(gate, [0..<globalExperts, 0..<hidden])], shape: gate.info.shape, name: gate.info.name, as: Float.self)
        }
        if fileOfTensor[base + routerGroup + "e_score_correction_bias"] != nil {
            let correction = try reader.tensor(base + routerGroup + "e_score_correction_bias")
            try correction.expectShape([globalExperts], "[E]")
            bias = try plan.read(
                [(correction, [0..<globalExperts])], shape: [globalExperts], name: correction.info.name, as: Float.self)
        }
        let expertMap: [Int32]? =
            expertParallel == 1
            ? nil
            : (0..<globalExperts).map { global in
                global / localExperts == expertParallelRank ? Int32(global % localExperts) : -1
            }
        return CheckpointLayer(
            weights: try MoEWeights(w1: w1, w2: w2, topK: topK), router: router, routerCorrectionBias: bias,
            naming: naming, globalExperts: globalExperts, expertMap: expertMap)
    }

    /// One more than the largest expert index under `prefix` (`...experts.`), or 0.
    private func expertCount(prefix: String) -> Int {
        var largest = -1
        for name in fileOfTensor.keys where name.hasPrefix(prefix) {
            let rest = name.dropFirst(prefix.count)
            if let number = rest.split(separator: ".", maxSplits: 1).first.flatMap({ Int($0) }) {
                largest = max(largest, number)
            }
        }
        return largest + 1
    }
}

/// A tensor found in its shard, with checks that name it.
private struct LocatedTensor {
    var file: SafetensorsFile
    var info: SafetensorsTensorInfo

    func wrongShape(_ expected: String) -> MoEError {
        .malformedFile(file.path, "tensor '\(info.name)': expected \(expected), got shape \(info.shape)")
    }

    func expectShape(_ shape: [Int], _ meaning: String) throws(MoEError) {
        guard info.shape == shape else { throw wrongShape("shape \(shape) (\(meaning))") }
    }
}

/// Opens each shard once per load.
private struct ShardReader {
    let checkpoint: MoECheckpoint
    var opened: [String: SafetensorsFile] = [:]

    init(checkpoint: MoECheckpoint) { self.checkpoint = checkpoint }

    mutating func tensor(_ name: String) throws(MoEError) -> LocatedTensor {
        guard let path = checkpoint.fileOfTensor[name] else {
            throw .malformedFile(checkpoint.path, "tensor '\(name)': missing from the checkpoint")
        }
        let file: SafetensorsFile
        if let cached = opened[path] {
            file = cached
        } else if let single = checkpointSingle(path) {
            file = single
        } else {
            file = try SafetensorsFile(path: path)
            opened[path] = file
        }
        guard let info = file.info(name) else {
            throw .malformedFile(path, "tensor '\(name)': listed in the index for this shard but missing from it")
        }
        return LocatedTensor(file: file, info: info)
    }

    private func checkpointSingle(_ path: String) -> SafetensorsFile? {
        checkpoint.single.flatMap { $0.path == path ? $0 : nil }
    }
}

/// The experts and intermediate columns one rank keeps.
private struct Split {
    var experts: Range<Int>
    var columns: Range<Int>

    init(
        experts total: Int, intermediate: Int, tensorParallel: Int, tensorParallelRank: Int, expertParallel: Int,
        expertParallelRank: Int, source: String
    ) throws(MoEError) {
        guard total >= 1 else { throw .invalidArgument("experts", "must be >= 1, got \(total)") }
        guard intermediate % tensorParallel == 0 else {
            throw .invalidArgument(
                "tensorParallel", "\(tensorParallel) does not divide I = \(intermediate) of tensor '\(source)'")
        }
        guard total % expertParallel == 0 else {
            throw .invalidArgument("expertParallel", "\(expertParallel) does not divide the \(total) experts")
        }
        let (localExperts, localColumns) = (total / expertParallel, intermediate / tensorParallel)
        experts = (expertParallelRank * localExperts)..<((expertParallelRank + 1) * localExperts)
        columns = (tensorParallelRank * localColumns)..<((tensorParallelRank + 1) * localColumns)
    }
}

/// The pieces of each stacked tensor in order, read after every check has passed.
private struct StackingPlan {
    var w1: [(LocatedTensor, [Range<Int>])] = []
    var w2: [(LocatedTensor, [Range<Int>])] = []
    var shape = (experts: 0, intermediate: 0)

    /// Concatenates the boxes of `pieces`, converted to `T`, into one tensor of `shape`.
    func read<T: MoEScalar>(_ pieces: [(LocatedTensor, [Range<Int>])], shape: [Int], name: String, as: T.Type)
        throws(MoEError) -> HostTensor<T>
    {
        for (tensor, _) in pieces { try tensor.file.checkFloat(tensor.info, as: T.self) }
        let count = shape.reduce(1, *)
        precondition(pieces.reduce(0) { $0 + $1.1.reduce(1) { $0 * $1.count } } == count, "pieces do not fill \(shape)")
        let storage = [T](unsafeUninitializedCapacity: count) { buffer, initialized in
            guard count > 0 else {
                initialized = 0
                return
            }
            var offset = 0
            for (tensor, box) in pieces {
                tensor.file.copyFloats(tensor.info, slice: box, to: buffer.baseAddress! + offset)
                offset += box.reduce(1) { $0 * $1.count }
            }
            initialized = count
        }
        return try HostTensor(shape: shape, storage: storage, name: name)
    }
}
