#if canImport(Glibc)
import Glibc
#endif

/// Kernel configs in SGLang's and vLLM's JSON format, and the default heuristic.
///
/// A file is named `E={E},N={N},device_name={GPU name, spaces as _}[,dtype=...].json`; its keys are
/// batch sizes and its values hold `BLOCK_SIZE_M/N/K`, `GROUP_SIZE_M`, `num_warps` and
/// `num_stages`. Our own keys `SPLIT_K` and `SPLIT_MODE` extend it; unknown keys are ignored, so an
/// SGLang file loads as is. The entry whose batch size is nearest to M serves it when M is within 1/16
/// of that batch size and its tiles cut the experts' rows alike (`entry(serving:shape:)`); other
/// batches take the heuristic's plan (SGLang takes the nearest entry at any distance). SGLang runs both
/// GEMMs with one config; an entry may carry a `GEMM2` object with the second GEMM's own keys
/// (same BLOCK_SIZE_M), which our tuner writes and SGLang ignores.
public struct ConfigTable: Sendable {
    public var source: String
    /// Batch size -> plan, sorted by batch size.
    public var entries: [(batch: Int, plan: MoEPlan)]

    public init(source: String, entries: [(batch: Int, plan: MoEPlan)]) {
        self.source = source
        self.entries = entries.sorted { $0.batch < $1.batch }
    }

    /// The environment variable naming a folder of config files, searched first.
    public static let directoryEnvironmentVariable = "FUSED_MOE_CONFIG_DIR"

    /// Parses a config file's text.
    /// - Throws: `MoEError.malformedFile` naming the file and the key that is wrong.
    public static func parse(_ text: String, source: String) throws(MoEError) -> ConfigTable {
        let json = try JSON.parse(text, source: source)
        guard case .object(let members) = json else {
            throw .malformedFile(source, "expected an object mapping batch sizes to configs")
        }
        var entries: [(Int, MoEPlan)] = []
        for (key, value) in members {
            guard let batch = Int(key), batch >= 1 else {
                throw .malformedFile(source, "key '\(key)' is not a positive batch size")
            }
            let gemm1 = try config(from: value, source: source, key: key)
            var gemm2 = gemm1
            if let second = value["GEMM2"] {
                gemm2 = try config(from: second, source: source, key: key + ".GEMM2")
            }
            entries.append((batch, MoEPlan(gemm1: gemm1, gemm2: gemm2)))
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
        let cluster = try integer("CLUSTER_M", default: 1)
        let unit = try integer("UNIT", default: 1)
        let fit = try integer("FIT", default: 1)
        guard fit == 0 || fit == 1 else { throw .malformedFile(source, "entry '\(key)': FIT must be 0 or 1, got \(fit)") }
        var mode = SplitMode.none
        if let field = value["SPLIT_MODE"] {
            guard let name = field.stringValue, let parsed = SplitMode(rawValue: name) else {
                throw .malformedFile(source, "entry '\(key)': SPLIT_MODE must be \"none\", \"atomic\" or \"workspace\"")
            }
            mode = parsed
        } else if splitK > 1 {
            mode = .workspace
        }
        var kernel = GemmKernel.mma
        if let field = value["KERNEL"] {
            guard let name = field.stringValue, let parsed = GemmKernel(rawValue: name) else {
                throw .malformedFile(source, "entry '\(key)': KERNEL must be one of \(GemmKernel.allCases.map(\.rawValue))")
            }
            kernel = parsed
        }
        if kernel != .mma {
            var config = GemmConfig.wgmma(
                blockM: blockM, blockN: blockN, stages: stages, groupSizeM: group, swapAB: kernel == .wgmmaSwap,
                persistent: kernel == .wgmmaPersistent, pingpong: kernel == .wgmmaPingpong,
                streamK: kernel == .wgmmaStreamK)
            config.splitK = splitK
            config.splitMode = splitK > 1 ? mode : .none
            config.clusterM = cluster
            config.unit = unit
            config.fitRows = fit == 1
            return config
        }
        guard cluster == 1 else {
            throw .malformedFile(source, "entry '\(key)': CLUSTER_M \(cluster) needs KERNEL wgmma (the mma kernel takes 1)")
        }
        guard unit == 1 else {
            throw .malformedFile(source, "entry '\(key)': UNIT \(unit) needs KERNEL wgmma_swap (the mma kernel takes 1)")
        }
        guard fit == 1 else {
            throw .malformedFile(source, "entry '\(key)': FIT 0 needs KERNEL wgmma_swap (the mma kernel takes 1)")
        }
        // Triton's tiles are 16..256 wide; clamp what our kernel lacks (BLOCK_K 128/256 -> 64).
        let kernelBlockK = min(max(blockK, 32), 64)
        var layout: (m: Int, n: Int)
        if value["WARPS_M"] != nil {
            let warpsM = try integer("WARPS_M")
            guard warpsM >= 1, warps % warpsM == 0 else {
                throw .malformedFile(source, "entry '\(key)': WARPS_M \(warpsM) does not divide num_warps \(warps)")
            }
            layout = (warpsM, warps / warpsM)
        } else {
            guard let chosen = GemmConfig.warpLayout(blockM: blockM, blockN: blockN, warps: warps) else {
                throw .malformedFile(source, "entry '\(key)': num_warps \(warps) cannot tile \(blockM)x\(blockN)")
            }
            layout = chosen
        }
        return GemmConfig(
            blockM: blockM, blockN: blockN, blockK: kernelBlockK, warpsM: layout.m, warpsN: layout.n,
            stages: min(max(stages, 2), 5), groupSizeM: group, splitK: splitK, splitMode: mode)
    }

    /// The plan of the batch size nearest to `tokens` (the smaller on a tie).
    public func nearest(to tokens: Int) -> MoEPlan {
        nearestEntry(to: tokens).plan
    }

    func nearestEntry(to tokens: Int) -> (batch: Int, plan: MoEPlan) {
        entries.min { abs($0.batch - tokens) < abs($1.batch - tokens) }!
    }

    /// How far from its batch size an entry still serves a batch, either way: 1/16.
    public static let servingTolerance = 1.0 / 16

    /// The plan of the entry that serves a batch of `tokens` on a layer of `shape`, or nil when none
    /// does (the caller takes the heuristic's plan). The nearest entry serves when `tokens` is within
    /// `servingTolerance` of its batch size and each GEMM's token tile cuts an expert's rows into as
    /// many blocks as at that batch size (`blocksPerExpert`). An entry's tiles are tuned for its own
    /// batch: between the shipped tables' keys the nearest entry ran up to 35% slower than the
    /// heuristic, whose tiles follow the rows per expert (Mixtral 384 and 640 tokens; NOTES v40).
    public func entry(serving tokens: Int, shape: MoEShape) -> MoEPlan? {
        let (batch, plan) = nearestEntry(to: tokens)
        let ratio = Double(max(batch, tokens)) / Double(max(min(batch, tokens), 1))
        guard ratio <= 1 + Self.servingTolerance else { return nil }
        for config in [plan.gemm1, plan.gemm2] {
            let atKey = Self.blocksPerExpert(shape: shape, tokens: batch, blockM: config.blockM)
            guard Self.blocksPerExpert(shape: shape, tokens: tokens, blockM: config.blockM) == atKey else { return nil }
        }
        return plan
    }

    /// The token blocks of `blockM` rows that an expert's run needs at the mean plus one standard
    /// deviation of its rows under uniform routing (M * k / E, Poisson): the count that decides
    /// whether its weights stream once or twice. (Mixtral's 512 entry cuts 128 + 11.3 rows into one
    /// 144-token block; at 544 tokens 136 + 11.7 need two.)
    static func blocksPerExpert(shape: MoEShape, tokens: Int, blockM: Int) -> Int {
        let rows = PlanSelector.rowsPerExpert(shape: shape, tokens: tokens)
        return Int(((rows + rows.squareRoot()) / Double(max(blockM, 1))).rounded(.up))
    }

    /// The table as a config file: SGLang's keys, plus SPLIT_K, SPLIT_MODE, CLUSTER_M and UNIT (when not 1),
    /// FIT (when 0) and GEMM2 where needed.
    public var json: JSON {
        func object(_ config: GemmConfig) -> [(String, JSON)] {
            let cluster: [(String, JSON)] = (config.clusterM == 1 ? [] : [("CLUSTER_M", .number(Double(config.clusterM)))])
                + (config.unit == 1 ? [] : [("UNIT", .number(Double(config.unit)))])
                + (config.fitRows ? [] : [("FIT", .number(0))])
            return [
                ("BLOCK_SIZE_M", .number(Double(config.blockM))), ("BLOCK_SIZE_N", .number(Double(config.blockN))),
                ("BLOCK_SIZE_K", .number(Double(config.blockK))), ("GROUP_SIZE_M", .number(Double(config.groupSizeM))),
                ("num_warps", .number(Double(config.warps))), ("num_stages", .number(Double(config.stages))),
                ("WARPS_M", .number(Double(config.warpsM))), ("KERNEL", .string(config.kernel.rawValue)),
                ("SPLIT_K", .number(Double(config.splitK))), ("SPLIT_MODE", .string(config.effectiveMode.rawValue)),
            ] + cluster
        }
        return .object(entries.map { entry in
            var members = object(entry.plan.gemm1)
            if entry.plan.gemm2 != entry.plan.gemm1 { members.append(("GEMM2", .object(object(entry.plan.gemm2)))) }
            return (String(entry.batch), .object(members))
        })
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
    /// The config table for this layer on this GPU: a file in `FUSED_MOE_CONFIG_DIR`, else the
    /// configs shipped in the binary, else nil. (SGLang's N is the shard's intermediate size, `I`.)
    public static func configFile(shape: MoEShape, deviceName: String) throws(MoEError) -> ConfigTable? {
        let name = tableName(shape: shape, deviceName: deviceName)
        if let (path, text) = directoryTable(named: name) { return try ConfigTable.parse(text, source: path) }
        return try ShippedConfigs.table(named: name)
    }

    /// The file name of the table for a layer of this shape on this GPU (SGLang's: E and N = I).
    static func tableName(shape: MoEShape, deviceName: String) -> String {
        ConfigTable.fileName(experts: shape.experts, n: shape.intermediate, deviceName: deviceName, dtype: nil)
    }

    /// `FUSED_MOE_CONFIG_DIR`, when set and not empty.
    static var configDirectory: String? {
        guard let value = getenv(ConfigTable.directoryEnvironmentVariable).map({ String(cString: $0) }), !value.isEmpty
        else { return nil }
        return value
    }

    /// The table file `name` in `FUSED_MOE_CONFIG_DIR`, with its path, when there is one.
    static func directoryTable(named name: String) -> (path: String, text: String)? {
        guard let directory = configDirectory, let text = readTextFile(directory + "/" + name) else { return nil }
        return (directory + "/" + name, text)
    }

    /// Where `plan` takes the plans of a layer of this shape from on this GPU, in words for progress
    /// lines: a table in `FUSED_MOE_CONFIG_DIR` or a shipped table (with the heuristic for batches no
    /// entry serves), or the heuristic (with the table name it looked for, so a user sees whether
    /// their model runs tuned plans).
    public static func planSource(shape: MoEShape, deviceName: String, architecture: String, tables: Bool = true) -> String {
        let heuristic = architecture == "sm_90a" ? "the Hopper heuristic" : "the heuristic"
        guard tables else { return heuristic + " (tables off)" }
        let name = tableName(shape: shape, deviceName: deviceName)
        let offHopper = architecture == "sm_90a" ? "" : " (entries naming wgmma kernels fall back to \(heuristic) here)"
        let between = ", \(heuristic) between its batch sizes"
        if let (path, _) = directoryTable(named: name) { return "table \(path)" + between + offHopper }
        if ShippedConfigs.names.contains(name) { return "shipped table \(name)" + between + offHopper }
        return heuristic + " (no table named \(name))"
    }

    /// The plan: the entry of this layer's config file that serves `tokens`
    /// (`ConfigTable.entry(serving:shape:)`), else the heuristic (the Hopper one on `sm_90a`, which
    /// uses the wgmma kernels). `tables: false` skips the config
    /// files: the heuristic's plan, what a shape without a tuned table gets (`bench --heuristic`).
    public static func plan(
        shape: MoEShape, tokens: Int, multiprocessors: Int, sharedMemoryLimit: Int, deviceName: String,
        architecture: String = "", tables: Bool = true
    ) throws(MoEError) -> MoEPlan {
        let table = tables ? try configFile(shape: shape, deviceName: deviceName) : nil
        return try plan(
            table: table, shape: shape, tokens: tokens, multiprocessors: multiprocessors,
            sharedMemoryLimit: sharedMemoryLimit, architecture: architecture)
    }

    /// The batch sizes 1...`maxTokens` cut into the runs that `plan` gives one plan, in order: each
    /// batch size up to `exactUpTo` gets exactly the plan `bench` runs at it. A layer that serves any
    /// batch size (the C ABI) keeps one layer per run. (A plan per power-of-two bucket, the plan of its
    /// upper bound, ran Mixtral at 600 tokens 25% slower: the 1024-token entry's two 144-token blocks
    /// per expert where one 176-token block holds the rows; NOTES v41.) Past `exactUpTo` the batch
    /// sizes go in steps of 1/64 of their size, each on the plan of its largest batch, so that a
    /// maximum of millions of tokens costs a few hundred plans' evaluation, not millions. The table
    /// is read once.
    public static func planRuns(
        shape: MoEShape, maxTokens: Int, multiprocessors: Int, sharedMemoryLimit: Int, deviceName: String,
        architecture: String = "", tables: Bool = true, exactUpTo: Int = 65536
    ) throws(MoEError) -> [(upTo: Int, plan: MoEPlan)] {
        let table = tables ? try configFile(shape: shape, deviceName: deviceName) : nil
        var runs: [(upTo: Int, plan: MoEPlan)] = []
        var tokens = 0
        while tokens < max(maxTokens, 1) {
            tokens = min(max(maxTokens, 1), tokens < exactUpTo ? tokens + 1 : tokens + max(tokens / 64, 1))
            let plan = try plan(
                table: table, shape: shape, tokens: tokens, multiprocessors: multiprocessors,
                sharedMemoryLimit: sharedMemoryLimit, architecture: architecture)
            if let last = runs.last, last.plan == plan {
                runs[runs.count - 1].upTo = tokens
            } else {
                runs.append((tokens, plan))
            }
        }
        return runs
    }

    /// `plan` with the layer's config table already read (nil: none, or tables off).
    static func plan(
        table: ConfigTable?, shape: MoEShape, tokens: Int, multiprocessors: Int, sharedMemoryLimit: Int,
        architecture: String
    ) throws(MoEError) -> MoEPlan {
        var plan: MoEPlan
        if let table, let entry = table.entry(serving: tokens, shape: shape),
            // A table tuned on Hopper may name wgmma kernels; elsewhere fall back to the heuristic.
            architecture == "sm_90a" || !(entry.gemm1.kernel.needsHopper || entry.gemm2.kernel.needsHopper)
        {
            try entry.gemm1.validate(sharedMemoryLimit: sharedMemoryLimit)
            try entry.gemm2.validate(sharedMemoryLimit: sharedMemoryLimit)
            plan = entry
        } else if architecture == "sm_90a" {
            plan = hopperHeuristic(shape: shape, tokens: tokens, multiprocessors: multiprocessors)
        } else {
            plan = heuristic(shape: shape, tokens: tokens, multiprocessors: multiprocessors)
        }
        return plan
    }

    /// The default on Hopper, distilled from `fused-moe tune` and the A/Bs on the H200 over the five
    /// presets (bench/NOTES.md v37 measures it against their tables), by the rows an expert gets
    /// (M * k / E):
    /// - below 12 (decode): swap-AB wgmma, 16 tokens on wgmma's N side. Each GEMM on 128-row weight
    ///   tiles while its programs (the touched experts times its n-blocks) still give every
    ///   multiprocessor one, else on 64-row ones with an 8-stage ring (Mixtral M = 1: GEMM2's 2
    ///   experts x 32 n-blocks of 128 rows left half of them idle, +22%; GEMM1 on 64-row tiles +10%);
    ///   GEMM2's ring deep for a long intermediate size (its K); GEMM1's K split (workspace mode)
    ///   where its programs would leave a third of them idle;
    /// - 12 to 32: swap-AB on 32 tokens, GEMM1 on 256-row tiles with a deep ring where H (its K) is
    ///   long, GEMM2 on 3 stages (three programs per multiprocessor; dsv3 512: -4.5% for both); for a
    ///   long intermediate size from 16 rows the wide kernel's 64-row tiles, as from 32 (Mixtral 64
    ///   and 96 tokens: -4.5% and -5.4%);
    /// - 32 to 64: 64-row tiles, for a short intermediate size (below 2048) GEMM1 on the swap-AB
    ///   kernel's 64-token tile and GEMM2 on the persistent kernel, as every table of a short-K shape
    ///   has it; for a long one both GEMMs on the wide kernel (Mixtral 128);
    /// - from 64: a wide token tile (`swapTokenWidth`) that pads each expert's run less than 128-row
    ///   blocks do, for both GEMMs when GEMM2's K is long (Mixtral: -5..-15%, NOTES v18; its blocks
    ///   grouped per expert, or GEMM1 in units where one 128- or 144-token block holds them, or two
    ///   blocks of 112-176 at whole widths, `gemm1Unit`), for GEMM1 only from 100 rows when it is short (GEMM2 keeps the persistent
    ///   128-row kernel on its own align: -2..-7% at 2048-4096 tokens on the 128/256-expert presets;
    ///   the one-tile-per-program swap kernel loses 40-50% on a short-K GEMM2);
    /// - 64 to 100 rows of a short intermediate size: both GEMMs on the persistent 128 x 256 kernel, as
    ///   the tables have it (seed and qwen 1024, dsv3 2048).
    /// No split-K elsewhere: the tuner never found it worth its partial-sum traffic with these kernels.
    /// `multiprocessors`: the GPU's (132 on the H200).
    public static func hopperHeuristic(shape: MoEShape, tokens: Int, multiprocessors: Int = 132) -> MoEPlan {
        let rows = rowsPerExpert(shape: shape, tokens: tokens)
        let longIntermediate = shape.intermediate >= 2048
        let longHidden = shape.hidden >= 6144
        if rows < 12 {
            // 128-row weight tiles where they still give every multiprocessor a program.
            let touched = min(shape.experts, max(tokens * shape.topK, 1))
            // A GEMM's programs: the touched experts (one token block each) times its n-blocks.
            func programs(n: Int, blockN: Int) -> Int { touched * ((n + blockN - 1) / blockN) }
            let wideGemm1 = programs(n: 2 * shape.intermediate, blockN: 128) >= multiprocessors
            let wideGemm2 = programs(n: shape.hidden, blockN: 128) >= multiprocessors
            var gemm1 = GemmConfig.wgmma(blockM: 16, blockN: wideGemm1 ? 128 : 64, stages: wideGemm1 ? 6 : 8, swapAB: true)
            // Split GEMM1's K (workspace mode) when fewer than two thirds of the multiprocessors would
            // have a program, until each has one (at most 4): a short intermediate size over a long H,
            // Kimi-K2 tp 8 (64 programs) -16%, Qwen3-Coder-480B tp 8 (80) -6% (NOTES v37).
            let programs1 = programs(n: 2 * shape.intermediate, blockN: gemm1.blockN)
            if 3 * programs1 < 2 * multiprocessors {
                while gemm1.splitK < 4 && programs1 * gemm1.splitK < multiprocessors { gemm1.splitK *= 2 }
                gemm1.splitMode = .workspace
            }
            return MoEPlan(
                gemm1: gemm1,
                gemm2: .wgmma(
                    blockM: 16, blockN: wideGemm2 ? 128 : 64, stages: longIntermediate || !wideGemm2 ? 8 : 4, swapAB: true))
        }
        if rows >= 16 && rows < 32 && longIntermediate {
            // From 16 rows a long intermediate size takes the 64-row tiles of 32-64 rows already (Mixtral
            // 64 and 96 tokens: -4.5% and -5.4% against the 32-token swap-AB tiles, NOTES v40).
            return MoEPlan(both: .wgmma(blockM: 64, blockN: 256, stages: 4))
        }
        if rows < 32 {
            // GEMM2 on a 3-stage ring: three programs per multiprocessor (dsv3 512: -4% against 4 stages).
            return MoEPlan(
                gemm1: .wgmma(blockM: 32, blockN: longHidden ? 256 : 128, stages: longHidden ? 6 : 4, swapAB: true),
                gemm2: .wgmma(blockM: 32, blockN: 128, stages: 3, swapAB: true))
        }
        if rows < 64 {
            if longIntermediate { return MoEPlan(both: .wgmma(blockM: 64, blockN: 256, stages: 4)) }
            return MoEPlan(
                gemm1: .wgmma(blockM: 64, blockN: 256, stages: 5, swapAB: true),
                gemm2: .wgmma(blockM: 64, blockN: 256, stages: 4, persistent: true))
        }
        let persistent = GemmConfig.wgmma(blockM: 128, blockN: 256, stages: 4, persistent: true)
        if let width = swapTokenWidth(rowsPerExpert: rows) {
            var swap = GemmConfig.wgmma(
                blockM: width, blockN: 256, stages: GemmConfig.deepestSwapRing(tokens: width, blockN: 256), swapAB: true)
            if longIntermediate {
                // An expert's blocks side by side (groups of twice the average run) while it gets two
                // or more: Mixtral 1024 -4..-5%; the short-K shapes' swap GEMM1 lost 0-2% (NOTES v23).
                let blocks = Int((rows / Double(width)).rounded(.up))
                if blocks >= 2 { swap.groupSizeM = min(2 * blocks, 32) }
                var plan = MoEPlan(both: swap)
                plan.gemm1.unit = gemm1Unit(shape: shape, tokens: tokens, width: width, multiprocessors: multiprocessors)
                if plan.gemm1.unit > 1 && ConfigTable.blocksPerExpert(shape: shape, tokens: tokens, blockM: width) == 2 {
                    // Two blocks per expert walk units only at one pace: whole widths on both GEMMs.
                    plan.gemm1.fitRows = false
                    plan.gemm2.fitRows = false
                }
                return plan
            }
            if rows >= 100 { return MoEPlan(gemm1: swap, gemm2: persistent) }
        }
        return MoEPlan(both: persistent)
    }

    /// GEMM1's units (`GemmConfig.unit`) for a long intermediate size's swap-AB tile of `width` tokens: as
    /// many n-blocks per program (2 to 8) as make one wave of the multiprocessors, where each expert's rows
    /// (the mean plus one deviation) take
    /// - one block of 128 or 144 tokens: Mixtral at 450 tokens (144) -2.4/-2.6%, as its tables' 384 and
    ///   512 entries (-1.7..-3.1%, NOTES v40); even on 96 (300 tokens, +0.5%), 176 and 192 (600-700; v41);
    /// - two blocks of 112 to 176 tokens, which the plan then runs at whole widths (`fitRows` false, both
    ///   GEMMs) so that an expert's two blocks keep one pace and read each weight tile together: Mixtral
    ///   768-1200 tokens -1.9..-4.4% (NOTES v42). With fitted widths the narrower block ran ahead and the
    ///   units lost 6-13% (v41); on 192 tokens (1400) they lose 7% even at whole widths.
    /// Else 1: three blocks or more (2048: +4%, v42), or more than 8 n-blocks per program.
    static func gemm1Unit(shape: MoEShape, tokens: Int, width: Int, multiprocessors: Int) -> Int {
        let blocks = ConfigTable.blocksPerExpert(shape: shape, tokens: tokens, blockM: width)
        guard (blocks == 1 && (128...144).contains(width)) || (blocks == 2 && (112...176).contains(width)) else { return 1 }
        let touched = min(shape.experts, max(tokens * shape.topK, 1))
        let nBlocks = (2 * shape.intermediate + 255) / 256
        let mBlocks = touched * blocks
        let unit = (mBlocks * nBlocks + multiprocessors - 1) / max(multiprocessors, 1)
        // One wave: the m-blocks times their units at most one program per multiprocessor.
        guard (2...8).contains(unit), mBlocks * ((nBlocks + unit - 1) / unit) <= multiprocessors else { return 1 }
        return unit
    }

    /// The rows an expert gets on average, M * k / E (at least one pair in all).
    static func rowsPerExpert(shape: MoEShape, tokens: Int) -> Double {
        Double(max(tokens * shape.topK, 1)) / Double(max(shape.experts, 1))
    }

    /// The token width (BLOCK_M) of a wide swap-AB tile for experts that get `rowsPerExpert` rows on
    /// average, from 64 (below: decode's widths). An expert's run is cut into as many blocks of at most
    /// 192 as the mean plus one standard deviation of its rows (uniform routing) needs, and the width is
    /// the narrowest the kernel has that holds the mean plus two deviations in those blocks (one from
    /// 320 rows), or 192: most experts pad by less than a block, and an expert's weights are streamed
    /// through its blocks as few times as most experts need. Measured on Mixtral: 192 at 512 rows
    /// -4..-5%, 176 at 1024 -1.3..-1.5%, 192 at 2048 -1.5..-1.8%, each against 128-row persistent tiles;
    /// 192 at 1024 +1.2..+1.7% (NOTES v23, v24); on the short-K GEMM1 of seed 8192, 192 at 512 rows
    /// -1..-3.5%; Kimi-K2 tp 8 at 8192 tokens (171 rows), one block of 192 against two of 112 -9%
    /// (v37).
    public static func swapTokenWidth(rowsPerExpert rows: Double) -> Int? {
        guard rows >= 64 else { return nil }
        let deviation = rows.squareRoot()
        let blocks = ((rows + deviation) / 192).rounded(.up)
        let cover = rows + (rows <= 320 ? 2 : 1) * deviation
        return GemmConfig.swapTokenWidths.first { Double($0) * blocks >= cover } ?? 192
    }

    /// GROUP_SIZE_M for a tile of `blockM` rows on `kernel`, so the programs that read one weight
    /// tile run together and it comes from HBM once rather than once per group, which matters when
    /// an expert's weights do not stay in L2 between its m-blocks (few experts with large K and N, as
    /// Mixtral's). mma (Triton's swizzle, groups may straddle experts): the m-blocks one expert gets
    /// on average (1...8). The wgmma kernels cut each expert's run of m-blocks into groups of at
    /// most GROUP_SIZE_M, never mixing experts: 1 while an expert's GEMM1 tiles (its m-blocks times
    /// the 256-column n-blocks of 2I) fit in one wave of 128 programs (the plain order already runs
    /// them together; measured: grouping cost 1-8% on the 128-expert shapes, NOTES v12), else
    /// twice the average run (the experts routing favours get more than the average), at most 32,
    /// so each run stays in one group.
    public static func groupSizeM(shape: MoEShape, tokens: Int, blockM: Int, kernel: GemmKernel = .mma) -> Int {
        let rowsPerExpert = tokens * shape.topK / max(shape.experts, 1)
        let blockM = max(blockM, 1)
        if kernel == .mma { return min(max(rowsPerExpert / blockM, 1), 8) }
        let blocks = max((rowsPerExpert + blockM - 1) / blockM, 1)
        let nBlocks = (2 * shape.intermediate + 255) / 256
        return blocks * nBlocks <= 128 ? 1 : min(2 * blocks, 32)
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
        return MoEPlan(
            gemm1: split(base, n: 2 * shape.intermediate, k: shape.hidden),
            gemm2: split(base, n: shape.hidden, k: shape.intermediate))
    }
}

/// The text of a file, or nil when it cannot be read.
public func readTextFile(_ path: String) -> String? {
    try? FileSystem.readText(path)
}

/// Writes `text` to `path` atomically (a temporary file beside it, then a rename).
/// - Throws: `MoEError.invalidArgument(path, ...)` with the system's reason.
public func writeTextFile(_ text: String, to path: String) throws(MoEError) {
    try FileSystem.writeAtomically(path: path, parts: [Array(text.utf8)])
}
