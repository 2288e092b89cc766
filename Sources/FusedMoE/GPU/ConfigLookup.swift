#if canImport(Glibc)
import Glibc
#endif

/// Kernel configs in SGLang's and vLLM's JSON format, and the default heuristic.
///
/// A file is named `E={E},N={N},device_name={GPU name, spaces as _}[,dtype=...].json`; its keys are
/// batch sizes and its values hold `BLOCK_SIZE_M/N/K`, `GROUP_SIZE_M`, `num_warps` and
/// `num_stages`. Our own keys `SPLIT_K` and `SPLIT_MODE` extend it; unknown keys are ignored, so an
/// SGLang file loads as is. The entry whose batch size is nearest to M is used.
public struct ConfigTable: Sendable {
    public var source: String
    /// Batch size -> config, sorted by batch size.
    public var entries: [(batch: Int, config: GemmConfig)]

    /// The environment variable naming a folder of config files, searched first.
    public static let directoryEnvironmentVariable = "FUSED_MOE_CONFIG_DIR"

    /// Parses a config file's text.
    /// - Throws: `MoEError.malformedFile` naming the file and the key that is wrong.
    public static func parse(_ text: String, source: String) throws(MoEError) -> ConfigTable {
        let json = try JSON.parse(text, source: source)
        guard case .object(let members) = json else {
            throw .malformedFile(source, "expected an object mapping batch sizes to configs")
        }
        var entries: [(Int, GemmConfig)] = []
        for (key, value) in members {
            guard let batch = Int(key), batch >= 1 else {
                throw .malformedFile(source, "key '\(key)' is not a positive batch size")
            }
            entries.append((batch, try config(from: value, source: source, key: key)))
        }
        guard !entries.isEmpty else { throw .malformedFile(source, "no batch sizes in the file") }
        return ConfigTable(source: source, entries: entries.sorted { $0.0 < $1.0 })
    }

    static func config(from value: JSON, source: String, key: String) throws(MoEError) -> GemmConfig {
        guard case .object = value else { throw .malformedFile(source, "entry '\(key)' is not an object") }
        func integer(_ name: String, default defaultValue: Int? = nil) throws(MoEError) -> Int {
            guard let field = value[name] else {
                if let defaultValue { return defaultValue }
                throw .malformedFile(source, "entry '\(key)' lacks \(name)")
            }
            guard let number = field.intValue else {
                throw .malformedFile(source, "entry '\(key)': \(name) must be an integer")
            }
            return number
        }
        let blockM = try integer("BLOCK_SIZE_M")
        let blockN = try integer("BLOCK_SIZE_N")
        let blockK = try integer("BLOCK_SIZE_K")
        let warps = try integer("num_warps", default: 4)
        let stages = try integer("num_stages", default: 3)
        let group = try integer("GROUP_SIZE_M", default: 1)
        let splitK = try integer("SPLIT_K", default: 1)
        var mode = SplitMode.none
        if let field = value["SPLIT_MODE"] {
            guard let name = field.stringValue, let parsed = SplitMode(rawValue: name) else {
                throw .malformedFile(source, "entry '\(key)': SPLIT_MODE must be \"none\", \"atomic\" or \"workspace\"")
            }
            mode = parsed
        } else if splitK > 1 {
            mode = .workspace
        }
        // Triton's tiles are 16..256 wide; clamp what our kernel lacks (BLOCK_K 128/256 -> 64).
        let kernelBlockK = min(max(blockK, 32), 64)
        guard let layout = GemmConfig.warpLayout(blockM: blockM, blockN: blockN, warps: warps) else {
            throw .malformedFile(source, "entry '\(key)': num_warps \(warps) cannot tile \(blockM)x\(blockN)")
        }
        return GemmConfig(
            blockM: blockM, blockN: blockN, blockK: kernelBlockK, warpsM: layout.m, warpsN: layout.n,
            stages: min(max(stages, 2), 5), groupSizeM: group, splitK: splitK, splitMode: mode)
    }

    /// The config of the batch size nearest to `tokens` (the smaller on a tie).
    public func nearest(to tokens: Int) -> GemmConfig {
        entries.min { abs($0.batch - tokens) < abs($1.batch - tokens) }!.config
    }

    /// The file name SGLang gives this layer's configs.
    public static func fileName(experts: Int, n: Int, deviceName: String, dtype: DType?) -> String {
        var name = "E=\(experts),N=\(n),device_name=\(deviceName.replacingSpaces())"
        if let dtype, dtype != .bf16 && dtype != .fp16 { name += ",dtype=\(dtype.rawValue)" }
        return name + ".json"
    }
}

extension String {
    func replacingSpaces() -> String { String(map { $0 == " " ? "_" : $0 }) }
}

/// Choosing a plan for a layer and batch size.
public enum PlanSelector {
    /// A config file's table for this layer on this GPU, from `FUSED_MOE_CONFIG_DIR`, else nil.
    /// (SGLang's N is the intermediate size of the shard, `I`.)
    public static func configFile(shape: MoEShape, deviceName: String) throws(MoEError) -> ConfigTable? {
        guard let directory = getenv(ConfigTable.directoryEnvironmentVariable).map({ String(cString: $0) }),
            !directory.isEmpty
        else { return nil }
        let name = ConfigTable.fileName(experts: shape.experts, n: shape.intermediate, deviceName: deviceName, dtype: nil)
        let path = directory + "/" + name
        guard let text = readText(path) else { return nil }
        return try ConfigTable.parse(text, source: path)
    }

    /// The plan: a config file's nearest entry if one exists for this layer, else the heuristic.
    public static func plan(
        shape: MoEShape, tokens: Int, multiprocessors: Int, sharedMemoryLimit: Int, deviceName: String
    ) throws(MoEError) -> MoEPlan {
        if let table = try configFile(shape: shape, deviceName: deviceName) {
            let config = table.nearest(to: tokens)
            try config.validate(sharedMemoryLimit: sharedMemoryLimit)
            return MoEPlan(both: config)
        }
        return heuristic(shape: shape, tokens: tokens, multiprocessors: multiprocessors)
    }

    /// A default that is good without tuning.
    ///
    /// BLOCK_M follows the rows an expert gets (M * k / E): 16 for decode, up to 128 for prefill.
    /// Split-K pays when the output tiles are too few to fill the multiprocessors and K is long:
    /// then each tile's K loop is split (workspace mode, reproducible) until about two programs per
    /// multiprocessor run, keeping at least 4 K tiles per split.
    public static func heuristic(shape: MoEShape, tokens: Int, multiprocessors: Int) -> MoEPlan {
        let pairs = max(tokens * shape.topK, 1)
        let rowsPerExpert = Double(pairs) / Double(shape.experts)
        let base: GemmConfig
        if rowsPerExpert <= 16 {
            base = GemmConfig(blockM: 16, blockN: 64, blockK: 64, warpsM: 1, warpsN: 4, stages: 4, groupSizeM: 1)
        } else if rowsPerExpert <= 32 {
            base = GemmConfig(blockM: 32, blockN: 64, blockK: 64, warpsM: 2, warpsN: 2, stages: 4, groupSizeM: 1)
        } else if rowsPerExpert <= 96 {
            base = GemmConfig(blockM: 64, blockN: 128, blockK: 64, warpsM: 2, warpsN: 4, stages: 3, groupSizeM: 1)
        } else {
            base = GemmConfig(blockM: 128, blockN: 128, blockK: 64, warpsM: 2, warpsN: 4, stages: 3, groupSizeM: 8)
        }
        func split(_ config: GemmConfig, n: Int, k: Int) -> GemmConfig {
            let experts = min(shape.experts, pairs)
            let mBlocks = experts * Int((rowsPerExpert / Double(config.blockM)).rounded(.up))
            let tiles = max(mBlocks, 1) * ((n + config.blockN - 1) / config.blockN)
            let kTiles = (k + config.blockK - 1) / config.blockK
            var splitK = 1
            while splitK < 16, tiles * splitK * 2 <= 2 * multiprocessors, kTiles / (splitK * 2) >= 4 { splitK *= 2 }
            var result = config
            result.splitK = splitK
            result.splitMode = splitK > 1 ? .workspace : .none
            return result
        }
        // The heuristic keeps one config for both GEMMs except for the split, which depends on each K.
        return try! MoEPlan(
            gemm1: split(base, n: 2 * shape.intermediate, k: shape.hidden),
            gemm2: split(base, n: shape.hidden, k: shape.intermediate))
    }
}

func readText(_ path: String) -> String? {
    guard let file = fopen(path, "r") else { return nil }
    defer { fclose(file) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let count = fread(&buffer, 1, buffer.count, file)
        if count == 0 { break }
        bytes += buffer[0..<count]
    }
    return String(decoding: bytes, as: UTF8.self)
}
