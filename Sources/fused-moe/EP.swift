import ArgumentParser
import CUDA
import FusedMoE

#if canImport(Glibc)
import Glibc
#endif

struct EP: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ep",
        abstract: "Expert parallelism over GPUs through NCCL: one process per GPU, each owning E/ep experts.",
        discussion: """
            `ep launch --ranks N -- ARGS...` starts N processes of this binary with ARGS, rank r on GPU r, \
            with \(RankEnvironment.rankVariable), \(RankEnvironment.worldSizeVariable), \
            \(RankEnvironment.idFileVariable) and \(RankEnvironment.deviceVariable) added to an environment \
            otherwise passed through unchanged (NCCL_* settings reach every rank). `ep bench` and `ep check` \
            with --ep N > 1 start their ranks this way themselves when not already a rank; with --ep 1 they run \
            in this process on one GPU, through the same code path with a loopback exchange.
            """,
        subcommands: [EPLaunch.self, EPBench.self, EPCheck.self])
}

// MARK: - launch

struct EPLaunch: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "launch",
        abstract: "Starts one process per rank running this binary with the arguments after `--`.")

    @Option(help: "The number of ranks (processes, one per GPU).")
    var ranks: Int

    @Argument(parsing: .postTerminator, help: "The subcommand and arguments each rank runs, after `--`.")
    var command: [String] = []

    func validate() throws {
        guard ranks >= 1 else { throw ValidationError("--ranks must be >= 1, got \(ranks)") }
        guard !command.isEmpty else {
            throw ValidationError("give the rank command after `--`, e.g. `ep launch --ranks 2 -- ep check --ep 2`")
        }
    }

    func run() throws {
        let status = try RankLauncher.run(ranks: ranks, arguments: command)
        if status != 0 { throw ExitCode(status) }
    }
}

/// Starts rank processes with posix_spawn and waits for them.
enum RankLauncher {
    /// Runs `arguments` in `ranks` child processes of this binary and returns the first failing
    /// exit status (0 when every rank succeeded). When a rank fails, the others are stopped (SIGTERM,
    /// then SIGKILL after 5 s): they would otherwise wait forever in a collective.
    static func run(ranks: Int, arguments: [String]) throws -> Int32 {
        var folder: String? = nil
        var idFile = ""
        if ranks > 1 {
            // The id is made here and handed over as a file: this process hosts NCCL's bootstrap
            // root and stays alive while the ranks join.
            let nccl = try NCCL.shared()
            var template = Array("/tmp/fused-moe-ep.XXXXXX".utf8CString)
            guard let made = mkdtemp(&template) else {
                throw ValidationError(
                    "cannot make a temporary folder for the NCCL id: \(String(cString: strerror(errno)))")
            }
            folder = String(cString: made)
            idFile = folder! + "/nccl-id"
            try nccl.makeUniqueID().write(toFile: idFile)
            note("ep launch: \(ranks) ranks, NCCL \(nccl.versionString) (\(nccl.libraryPath)), id in \(idFile)")
        }
        defer {
            if let folder {
                unlink(idFile)
                rmdir(folder)
            }
        }
        let executable = selfExecutablePath()
        var children: [(rank: Int, pid: pid_t)] = []
        for rank in 0..<ranks {
            let added = [
                RankEnvironment.rankVariable: "\(rank)", RankEnvironment.worldSizeVariable: "\(ranks)",
                RankEnvironment.idFileVariable: idFile, RankEnvironment.deviceVariable: "\(rank)",
            ].filter { !$0.value.isEmpty }
            do {
                children.append((rank, try spawn(executable, arguments: [executable] + arguments, adding: added)))
            } catch {
                for child in children { kill(child.pid, SIGTERM) }
                throw error
            }
        }
        return waitForRanks(children)
    }

    static func waitForRanks(_ children: [(rank: Int, pid: pid_t)]) -> Int32 {
        var running = children
        var firstFailure: Int32 = 0
        var stopDeadline: Double? = nil
        while !running.isEmpty {
            var stillRunning: [(rank: Int, pid: pid_t)] = []
            for child in running {
                var status: Int32 = 0
                let result = waitpid(child.pid, &status, WNOHANG)
                if result == 0 {
                    stillRunning.append(child)
                    continue
                }
                // WIFEXITED / WEXITSTATUS / WTERMSIG by hand: the macros do not come through to Swift.
                let signal = status & 0x7f
                let code: Int32 = result < 0 ? 1 : signal == 0 ? (status >> 8) & 0xff : 128 + signal
                if code != 0 {
                    note(
                        "ep launch: rank \(child.rank) (pid \(child.pid)) "
                            + (signal == 0 ? "exited with status \(code)" : "was killed by signal \(signal)"))
                    if firstFailure == 0 {
                        firstFailure = code
                        stopDeadline = HostClock.now() + 5
                        for other in running where other.pid != child.pid { kill(other.pid, SIGTERM) }
                    }
                }
            }
            running = stillRunning
            if let deadline = stopDeadline, HostClock.now() > deadline {
                for child in running { kill(child.pid, SIGKILL) }
                stopDeadline = nil
            }
            if !running.isEmpty { usleep(20_000) }
        }
        return firstFailure
    }

    /// This binary's path: /proc/self/exe, else argv[0].
    static func selfExecutablePath() -> String {
        var buffer = [CChar](repeating: 0, count: 4096)
        let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        if count > 0 {
            return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
        return CommandLine.arguments[0]
    }

    /// Starts `path` with `arguments` and this process's environment plus `adding` (replacing
    /// entries of the same names).
    static func spawn(_ path: String, arguments: [String], adding: [String: String]) throws -> pid_t {
        var environment: [String] = []
        let table: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = environ
        if var entry = table {
            while let pointer = entry.pointee {
                let text = String(cString: pointer)
                let name = text.split(separator: "=", maxSplits: 1).first.map(String.init) ?? text
                if adding[name] == nil { environment.append(text) }
                entry += 1
            }
        }
        environment += adding.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
        let argv = arguments.map { strdup($0) } + [nil]
        let envp = environment.map { strdup($0) } + [nil]
        defer {
            for pointer in argv { free(pointer) }
            for pointer in envp { free(pointer) }
        }
        var pid: pid_t = 0
        let result = posix_spawn(&pid, path, nil, nil, argv, envp)
        guard result == 0 else {
            throw ValidationError("cannot start '\(path)': \(String(cString: strerror(result)))")
        }
        return pid
    }
}

// MARK: - Taking part as a rank

/// How a process takes part in an `ep` command: as a rank (under `ep launch`, or in-process for
/// ep = 1), or by starting the ranks itself.
enum RankRole {
    case rank(RankEnvironment)
    case launched(status: Int32)

    /// - Throws: `ValidationError` when the environment's world size disagrees with `--ep`.
    static func resolve(ep: Int) throws -> RankRole {
        if let environment = try RankEnvironment.current() {
            guard environment.worldSize == ep else {
                throw ValidationError("--ep \(ep) but \(RankEnvironment.worldSizeVariable) is \(environment.worldSize)")
            }
            return .rank(environment)
        }
        if ep == 1 {
            return .rank(RankEnvironment(rank: 0, worldSize: 1, idFile: nil, deviceOrdinal: 0))
        }
        let count = (try? Device.count()) ?? 0
        guard count >= ep else {
            throw ValidationError("--ep \(ep) needs \(ep) GPUs (one per rank); this machine has \(count)")
        }
        note("ep: starting \(ep) ranks (as `fused-moe ep launch --ranks \(ep) -- ...` would)")
        return .launched(status: try RankLauncher.run(ranks: ep, arguments: Array(CommandLine.arguments.dropFirst())))
    }
}

/// Prints `text` line by line, prefixed with the rank when there are several.
func rankPrint(_ text: String, _ environment: RankEnvironment) {
    guard environment.worldSize > 1 else {
        print(text)
        return
    }
    for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
        print("[rank \(environment.rank)] \(line)")
    }
}

// MARK: - bench

struct EPBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract:
            "Times dispatch, experts and combine of the expert-parallel layer separately, per batch size (tokens per rank)."
    )

    @Option(help: "Expert-parallel size: ranks, one GPU each.")
    var ep: Int = 1

    @Option(name: .customLong("shape"), help: "A preset shape; repeat for several (default seed4096).")
    var shapes: [String] = []

    @Option(help: "Comma-separated batch sizes: tokens per rank (default 1,8,32,128,512,2048).")
    var batchSizes: IntegerList?

    @Option(help: "Element type: bf16 or fp16.")
    var dtype: DType = .bf16

    @Option(help: "Timed forwards per case (the median of each phase is reported).")
    var repeats: Int = 10

    @Option(help: "Seed for the random inputs.")
    var seed: UInt64 = 2026

    @Option(help: "Rank 0 writes the rows as JSON to this file.")
    var json: String?

    func validate() throws {
        guard ep >= 1 else { throw ValidationError("--ep must be >= 1, got \(ep)") }
        guard repeats >= 1 else { throw ValidationError("--repeats must be >= 1, got \(repeats)") }
        guard dtype != .fp32 else {
            throw ValidationError("--dtype fp32 runs on the CPU only; the GPU takes bf16 or fp16")
        }
    }

    func run() throws {
        guard let count = try? Device.count(), count > 0 else {
            throw ValidationError(
                "ep bench needs a GPU and none is visible; `ep check` runs the CPU simulation without one")
        }
        let environment: RankEnvironment
        switch try RankRole.resolve(ep: ep) {
        case .launched(let status):
            if status != 0 { throw ExitCode(status) }
            return
        case .rank(let rank):
            environment = rank
        }
        let presets = try (shapes.isEmpty ? ["seed4096"] : shapes).map { try ShapePreset.named($0) }
        let batches = batchSizes?.values ?? [1, 8, 32, 128, 512, 2048]
        let device = try Device(ordinal: environment.deviceOrdinal)
        let library = try KernelLibrary(device: device)
        let exchange = try environment.makeExchange(device: device)
        if environment.rank == 0 {
            note(
                "ep bench: \(environment.worldSize) rank(s), \(device.properties.name); "
                    + (exchange is NCCLExchange
                        ? "NCCL \(try NCCL.shared().versionString)" : "loopback exchange (one rank)"))
        }
        var rows: [ExpertParallelBenchRow] = []
        for preset in presets {
            rows += try ExpertParallelBench.run(
                library: library, exchange: exchange, preset: preset, dtype: dtype, batchSizes: batches,
                repeats: repeats, seed: seed,
                progress: { environment.worldSize > 1 ? note("[rank \(environment.rank)] \($0)") : note($0) })
        }
        guard environment.rank == 0 else { return }
        print(ExpertParallelBench.table(rows))
        if let json {
            let report = JSON.object([
                ("device", .string(device.properties.name)), ("driver", .string("CUDA \(device.driver.versionString)")),
                ("ep", .number(Double(environment.worldSize))), ("date", .string(HostClock.isoDate())),
                ("rows", .array(rows.map(\.json))),
            ])
            try writeText(report.serialized(indent: 1) + "\n", to: json)
            note("wrote \(json)")
        }
    }
}

// MARK: - check

struct EPCheck: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract:
            "Checks the expert-parallel layer against the one-GPU layer bit for bit (deterministic plans only); without a GPU, the CPU simulation against the CPU backend."
    )

    @Option(help: "Expert-parallel size: ranks, one GPU each (simulated in one process on the CPU).")
    var ep: Int = 1

    @Option(
        help:
            "A preset shape (default: E=16, k=4, H=512, I=256, which fits every expert on each GPU for the reference).")
    var shape: String?

    @Option(
        help: "Comma-separated batch sizes: tokens per rank on the GPU, the whole batch on the CPU (default 1,33,256).")
    var batchSizes: IntegerList?

    @Option(help: "Element type on the GPU: bf16 or fp16 (the CPU simulation checks bf16 and fp32).")
    var dtype: DType = .bf16

    @Option(help: "Seed for the random inputs (default: from the clock).")
    var seed: UInt64?

    @Flag(help: "Check the CPU simulation even where a GPU is visible.")
    var cpu = false

    func validate() throws {
        guard ep >= 1 else { throw ValidationError("--ep must be >= 1, got \(ep)") }
        guard dtype != .fp32 else {
            throw ValidationError("--dtype fp32 runs on the CPU only; the GPU takes bf16 or fp16")
        }
    }

    func run() throws {
        let seed = self.seed ?? UInt64(HostClock.now() * 1000)
        let preset = try shape.map { try ShapePreset.named($0) } ?? ExpertParallelCheck.defaultShape
        let batches = batchSizes?.values ?? [1, 33, 256]
        let gpus = (try? Device.count()) ?? 0
        if cpu || gpus == 0 {
            // Under a launcher, rank 0 alone runs the simulation (it simulates every rank).
            if let environment = try RankEnvironment.current(), environment.rank != 0 { return }
            note(
                (cpu ? "ep check --cpu" : "no GPU visible")
                    + ": checking the CPU simulation of \(ep) expert-parallel ranks (in one process) against the CPU backend, bit for bit; seed \(seed)"
            )
            let results = ExpertParallelCheck.simulated(
                shape: preset.shape, ep: ep, batchSizes: [0] + batches, seed: seed
            ) { print($0.line) }
            let failed = results.filter { !$0.passed }.count
            print("\(results.count - failed) passed, \(failed) failed (CPU simulation; no GPU was used)")
            if failed > 0 { throw ExitCode(1) }
            return
        }
        let environment: RankEnvironment
        switch try RankRole.resolve(ep: ep) {
        case .launched(let status):
            if status != 0 { throw ExitCode(status) }
            return
        case .rank(let rank):
            environment = rank
        }
        let device = try Device(ordinal: environment.deviceOrdinal)
        let library = try KernelLibrary(device: device)
        let exchange = try environment.makeExchange(device: device)
        if environment.rank == 0 {
            note(
                "ep check: \(environment.worldSize) rank(s) on \(device.properties.name), \(preset.shape), seed \(seed); "
                    + (exchange is NCCLExchange ? "NCCL" : "loopback exchange (one rank, the same code path)"))
        }
        let results = try ExpertParallelCheck.gpu(
            library: library, exchange: exchange, shape: preset.shape, dtype: dtype, batchSizes: batches, seed: seed
        ) { rankPrint($0.line, environment) }
        let failed = results.filter { !$0.passed }.count
        rankPrint("\(results.count - failed) passed, \(failed) failed", environment)
        if failed > 0 { throw ExitCode(1) }
    }
}
