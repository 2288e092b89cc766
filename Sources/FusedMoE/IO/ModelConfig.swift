/// How a model's router turns its logits into top-k experts and weights, as `config.json` says.
///
/// The layer's own router (`Router.softmaxTopK`) does softmax top-k with optional
/// renormalization; the grouped sigmoid routing of DeepSeek-V3 is described here so that callers
/// (and benchmarks) know what the model does.
public struct MoERoutingConfig: Hashable, Sendable, CustomStringConvertible {
    /// How logits become scores.
    public enum Scoring: String, Hashable, Sendable {
        case softmax
        case sigmoid
    }

    /// Softmax over all experts (Mixtral, Qwen, DeepSeek-V2) or a sigmoid per expert (DeepSeek-V3).
    public var scoring: Scoring
    /// Divide the k selected weights by their sum (`norm_topk_prob`; Mixtral always does).
    public var renormalize: Bool
    /// Expert groups (`n_group`); 1 when the model does not group experts.
    public var groups: Int
    /// Groups each token may choose experts from (`topk_group`); equals `groups` when ungrouped.
    public var topKGroups: Int
    /// The factor applied to the routed weights (`routed_scaling_factor`); 1 when absent.
    public var scalingFactor: Double
    /// The model's own name for the selection (`topk_method`: `greedy`, `group_limited_greedy`,
    /// `noaux_tc`), when its config names one.
    public var method: String?

    /// A description; the defaults are plain softmax top-k without renormalization.
    public init(
        scoring: Scoring = .softmax, renormalize: Bool = false, groups: Int = 1, topKGroups: Int = 1,
        scalingFactor: Double = 1, method: String? = nil
    ) {
        self.scoring = scoring
        self.renormalize = renormalize
        self.groups = groups
        self.topKGroups = topKGroups
        self.scalingFactor = scalingFactor
        self.method = method
    }

    public var description: String {
        var parts = ["\(scoring) top-k" + (renormalize ? ", renormalized" : "")]
        if groups > 1 { parts.append("\(topKGroups) of \(groups) groups") }
        if scalingFactor != 1 { parts.append("scaled by \(scalingFactor)") }
        if let method { parts.append(method) }
        return parts.joined(separator: ", ")
    }
}

/// The MoE layer of a Hugging Face model, from its `config.json`, split for tensor and expert
/// parallelism.
///
/// Three families are recognised, by `model_type`, then `architectures`, then by which keys the
/// config holds (a multimodal config's `text_config` is used when the keys live there):
/// - Mixtral: `num_local_experts`, `intermediate_size`, `num_experts_per_tok`, `hidden_size`;
///   softmax top-k, always renormalized.
/// - Qwen2-MoE / Qwen3-MoE: `num_experts`, `moe_intermediate_size`, `num_experts_per_tok`,
///   `norm_topk_prob`.
/// - DeepSeek-V2 / V3 (and Kimi-K2): `n_routed_experts`, `moe_intermediate_size`,
///   `num_experts_per_tok`, `n_group`, `topk_group`, `scoring_func`, `routed_scaling_factor`,
///   `norm_topk_prob`.
///
/// Tensor parallelism of size `tp` splits each expert's intermediate size (which must divide, and
/// leave a multiple of 8 for the kernels); expert parallelism of size `ep` splits the experts
/// (which must divide). Shared experts are not part of the routed layer and are not counted.
public struct MoEModelConfig: Hashable, Sendable, CustomStringConvertible {
    /// The model families whose configs and checkpoints this reads.
    public enum Family: String, Hashable, Sendable {
        case mixtral
        case qwenMoE
        case deepSeek
    }

    /// The architecture and the split, such as `"Qwen3MoeForCausalLM tp=2"`.
    public var name: String
    /// `architectures[0]`, else `model_type`.
    public var architecture: String
    /// Which family's keys the config was read with.
    public var family: Family
    /// The layer one rank computes: local experts under `ep`, intermediate size under `tp`.
    public var shape: MoEShape
    /// The experts of the whole layer, before expert parallelism.
    public var globalExperts: Int
    /// Each expert's intermediate size before tensor parallelism.
    public var globalIntermediate: Int
    /// tp: the ranks each expert's intermediate dimension is split over.
    public var tensorParallel: Int
    /// ep: the ranks the experts are split over.
    public var expertParallel: Int
    /// How the model routes tokens to experts.
    public var routing: MoERoutingConfig
    /// The activation between the projections (`hidden_act`).
    public var activation: Activation

    /// The smallest intermediate granule the kernels accept after tensor-parallel splitting.
    public static let intermediateAlignment = 8

    /// Reads `config.json` (or the `config.json` inside a model folder).
    /// - Parameters:
    ///   - path: the file, or a folder holding `config.json`.
    ///   - tensorParallel: tp, the number of ranks each expert's intermediate dimension is split over.
    ///   - expertParallel: ep, the number of ranks the experts are split over.
    /// - Throws: `MoEError.invalidArgument(path, ...)` when the file cannot be read,
    ///   `MoEError.malformedFile` when it is not JSON, and the errors of `init(json:...)`.
    public init(contentsOf path: String, tensorParallel: Int = 1, expertParallel: Int = 1) throws(MoEError) {
        let file = FileSystem.isDirectory(path) ? FileSystem.join(path, "config.json") : path
        let json = try JSON.parse(try FileSystem.readText(file), source: file)
        try self.init(json: json, tensorParallel: tensorParallel, expertParallel: expertParallel, source: file)
    }

    /// Reads a parsed `config.json`.
    /// - Parameter source: the file the JSON came from, named in error messages.
    /// - Throws: `MoEError.invalidArgument("config.json: <field>", ...)` naming the field that is
    ///   missing, of the wrong type or inconsistent (k > E, tp or ep not dividing);
    ///   `MoEError.invalidArgument("tp" or "ep", ...)` for a size below 1.
    public init(json: JSON, tensorParallel: Int = 1, expertParallel: Int = 1, source: String = "config.json")
        throws(MoEError)
    {
        guard tensorParallel >= 1 else { throw .invalidArgument("tp", "must be >= 1, got \(tensorParallel)") }
        guard expertParallel >= 1 else { throw .invalidArgument("ep", "must be >= 1, got \(expertParallel)") }
        guard case .object = json else {
            throw .invalidArgument("config.json", "expected a JSON object in '\(source)'")
        }
        let fields = ConfigFields(json: json, source: source)
        let family = try fields.family()
        // Multimodal configs keep the language model's fields in text_config.
        let text = fields.textConfig(for: family)
        let modelType = json["model_type"]?.stringValue ?? text.json["model_type"]?.stringValue
        var architecture = modelType ?? family.rawValue
        if case .array(let names) = json["architectures"], let first = names.first?.stringValue { architecture = first }

        let expertsKey: String
        let intermediateKey: String
        var routing = MoERoutingConfig()
        switch family {
        case .mixtral:
            (expertsKey, intermediateKey) = ("num_local_experts", "intermediate_size")
            routing.renormalize = true
        case .qwenMoE:
            (expertsKey, intermediateKey) = ("num_experts", "moe_intermediate_size")
            routing.renormalize = try text.bool("norm_topk_prob", default: false)
        case .deepSeek:
            (expertsKey, intermediateKey) = ("n_routed_experts", "moe_intermediate_size")
            routing.renormalize = try text.bool("norm_topk_prob", default: modelType != "deepseek_v2")
        }
        let hidden = try text.positiveInteger("hidden_size")
        let experts = try text.positiveInteger(expertsKey)
        let intermediate = try text.positiveInteger(intermediateKey)
        let topK = try text.positiveInteger("num_experts_per_tok")
        guard topK <= experts else {
            throw text.error("num_experts_per_tok", "k = \(topK) exceeds the \(experts) experts of \(expertsKey)")
        }

        if family == .deepSeek {
            let scoring = try text.string("scoring_func", default: "softmax")
            guard let parsed = MoERoutingConfig.Scoring(rawValue: scoring) else {
                throw text.error("scoring_func", "'\(scoring)' is not supported; expected \"softmax\" or \"sigmoid\"")
            }
            routing.scoring = parsed
            routing.groups = try text.positiveInteger("n_group", default: 1)
            routing.topKGroups = try text.positiveInteger("topk_group", default: routing.groups)
            routing.scalingFactor = try text.number("routed_scaling_factor", default: 1)
            routing.method = text.json["topk_method"]?.stringValue
            guard experts % routing.groups == 0 else {
                throw text.error("n_group", "\(routing.groups) groups do not divide the \(experts) experts")
            }
            guard routing.topKGroups <= routing.groups else {
                throw text.error("topk_group", "\(routing.topKGroups) exceeds n_group = \(routing.groups)")
            }
            let reachable = routing.topKGroups * (experts / routing.groups)
            guard topK <= reachable else {
                throw text.error(
                    "num_experts_per_tok",
                    "k = \(topK) exceeds the \(reachable) experts in \(routing.topKGroups) groups")
            }
            guard routing.scalingFactor > 0, routing.scalingFactor.isFinite else {
                throw text.error("routed_scaling_factor", "must be a positive number, got \(routing.scalingFactor)")
            }
        }

        let activationName = try text.string("hidden_act", default: "silu")
        switch activationName {
        case "silu", "swish": activation = .silu
        case "gelu": activation = .gelu
        default:
            throw text.error("hidden_act", "'\(activationName)' is not supported; expected \"silu\" or \"gelu\"")
        }

        // Tensor parallelism splits I; expert parallelism splits E.
        let alignment = MoEModelConfig.intermediateAlignment
        let workable = (1...intermediate).filter { intermediate % $0 == 0 && (intermediate / $0) % alignment == 0 }
        let workableList =
            workable.count <= 12 ? workable.map(String.init).joined(separator: ", ") : "\(workable.count) sizes"
        guard intermediate % tensorParallel == 0 else {
            throw text.error(
                intermediateKey,
                "\(intermediate) is not divisible by tp = \(tensorParallel); tp sizes that work: \(workableList)")
        }
        let localIntermediate = intermediate / tensorParallel
        guard localIntermediate % alignment == 0 else {
            throw text.error(
                intermediateKey,
                "\(intermediate) / tp = \(tensorParallel) is \(localIntermediate), not a multiple of \(alignment); "
                    + "tp sizes that work: \(workableList)")
        }
        guard experts % expertParallel == 0 else {
            throw text.error(expertsKey, "\(experts) experts are not divisible by ep = \(expertParallel)")
        }
        let localExperts = experts / expertParallel
        guard topK <= localExperts else {
            throw text.error(
                "num_experts_per_tok",
                "k = \(topK) exceeds the \(localExperts) local experts at ep = \(expertParallel)")
        }

        self.family = family
        self.architecture = architecture
        var name = architecture
        if tensorParallel > 1 { name += " tp=\(tensorParallel)" }
        if expertParallel > 1 { name += " ep=\(expertParallel)" }
        self.name = name
        self.shape = try MoEShape(experts: localExperts, topK: topK, hidden: hidden, intermediate: localIntermediate)
        self.globalExperts = experts
        self.globalIntermediate = intermediate
        self.tensorParallel = tensorParallel
        self.expertParallel = expertParallel
        self.routing = routing
    }

    /// Expert parallelism: the map from global expert ids to `rank`'s local experts (experts
    /// `rank * E/ep ..< (rank + 1) * E/ep`, in order), -1 elsewhere; nil when `ep` is 1.
    /// - Precondition: `rank` is in `0..<expertParallel`.
    public func expertMap(rank: Int = 0) -> [Int32]? {
        precondition(rank >= 0 && rank < expertParallel, "expert-parallel rank \(rank) outside 0..<\(expertParallel)")
        guard expertParallel > 1 else { return nil }
        let first = rank * shape.experts
        return (0..<globalExperts).map { global in
            (first..<(first + shape.experts)).contains(global) ? Int32(global - first) : -1
        }
    }

    /// Rank 0's expert map (nil when `ep` is 1), usable as `MoEOptions.expertMap`.
    public var expertMap: [Int32]? { expertMap(rank: 0) }

    /// The layer options for rank 0: activation, renormalization and expert map.
    public var options: MoEOptions {
        MoEOptions(activation: activation, renormalize: routing.renormalize, expertMap: expertMap)
    }

    /// The shape as a named preset, for the benchmark.
    public var preset: ShapePreset { ShapePreset(name: name, shape: shape) }

    public var description: String { "\(name): \(shape), \(routing)" }
}

extension ShapePreset {
    /// The MoE layer of a Hugging Face model as a preset, named like `"Qwen3MoeForCausalLM tp=2"`.
    /// - Parameters:
    ///   - configPath: `config.json`, or the model folder holding it.
    ///   - tensorParallel: tp, dividing each expert's intermediate size.
    ///   - expertParallel: ep, dividing the experts.
    /// - Throws: the errors of `MoEModelConfig(contentsOf:tensorParallel:expertParallel:)`.
    public static func model(configPath: String, tensorParallel: Int = 1, expertParallel: Int = 1) throws(MoEError)
        -> ShapePreset
    {
        let config = try MoEModelConfig(
            contentsOf: configPath, tensorParallel: tensorParallel, expertParallel: expertParallel)
        return config.preset
    }
}

/// Typed access to a config's fields, with errors that name the field.
private struct ConfigFields {
    var json: JSON
    var source: String

    func error(_ field: String, _ message: String) -> MoEError {
        .invalidArgument("config.json: \(field)", source == "config.json" ? message : "\(message) (in '\(source)')")
    }

    func has(_ key: String) -> Bool { json[key] != nil }

    /// The family by `model_type`, then `architectures`, then the keys present.
    func family() throws(MoEError) -> MoEModelConfig.Family {
        let modelType = json["model_type"]?.stringValue ?? ""
        switch modelType {
        case "mixtral": return .mixtral
        case "qwen2_moe", "qwen3_moe": return .qwenMoE
        case "deepseek_v2", "deepseek_v3", "kimi_k2": return .deepSeek
        default: break
        }
        if case .array(let names) = json["architectures"] {
            for name in names.compactMap(\.stringValue) {
                if name.hasPrefix("Mixtral") { return .mixtral }
                if name.hasPrefix("Qwen2Moe") || name.hasPrefix("Qwen3Moe") { return .qwenMoE }
                if name.hasPrefix("DeepseekV2") || name.hasPrefix("DeepseekV3") { return .deepSeek }
            }
        }
        for fields in [self, textConfig(for: nil)] {
            if fields.has("n_routed_experts") { return .deepSeek }
            if fields.has("num_local_experts") { return .mixtral }
            if fields.has("num_experts") && fields.has("moe_intermediate_size") { return .qwenMoE }
        }
        let described = modelType.isEmpty ? "no model_type" : "model_type '\(modelType)'"
        throw error(
            "model_type",
            "\(described) and no MoE keys; expected a Mixtral (num_local_experts), Qwen2/3-MoE (num_experts, "
                + "moe_intermediate_size) or DeepSeek-V2/V3 (n_routed_experts) config")
    }

    /// The nested `text_config` when it holds the layer's keys and the top level does not.
    func textConfig(for family: MoEModelConfig.Family?) -> ConfigFields {
        guard let nested = json["text_config"], case .object = nested else { return self }
        let key =
            switch family {
            case .mixtral: "num_local_experts"
            case .qwenMoE: "num_experts"
            case .deepSeek: "n_routed_experts"
            case nil: "num_experts_per_tok"
            }
        return has(key) ? self : ConfigFields(json: nested, source: source)
    }

    func positiveInteger(_ key: String, default defaultValue: Int? = nil) throws(MoEError) -> Int {
        guard let value = json[key], value != .null else {
            if let defaultValue { return defaultValue }
            throw error(key, "missing; expected a positive integer")
        }
        guard let number = value.intValue, number >= 1 else {
            throw error(key, "expected a positive integer, got \(value.serialized())")
        }
        return number
    }

    func number(_ key: String, default defaultValue: Double) throws(MoEError) -> Double {
        guard let value = json[key], value != .null else { return defaultValue }
        guard let number = value.doubleValue else { throw error(key, "expected a number, got \(value.serialized())") }
        return number
    }

    func bool(_ key: String, default defaultValue: Bool) throws(MoEError) -> Bool {
        guard let value = json[key], value != .null else { return defaultValue }
        guard case .bool(let flag) = value else {
            throw error(key, "expected true or false, got \(value.serialized())")
        }
        return flag
    }

    func string(_ key: String, default defaultValue: String) throws(MoEError) -> String {
        guard let value = json[key], value != .null else { return defaultValue }
        guard let text = value.stringValue else { throw error(key, "expected a string, got \(value.serialized())") }
        return text
    }
}
