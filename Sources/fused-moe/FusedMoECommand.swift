import ArgumentParser
import CUDA
import FusedMoE

#if canImport(Glibc)
import Glibc
#endif

@main
struct FusedMoECommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fused-moe",
        abstract: "Runs, checks and benchmarks the fused Mixture-of-Experts layer on NVIDIA GPUs (or the CPU).",
        subcommands: [Info.self, Bench.self, Check.self, Tune.self, Run.self, EP.self],
        defaultSubcommand: Bench.self)
}

/// Which backend a command runs on.
enum BackendChoice: String, ExpressibleByArgument, CaseIterable {
    case auto, cpu, cuda

    /// `auto` picks CUDA when a GPU is visible, else the CPU.
    func resolve() throws -> BackendChoice {
        switch self {
        case .cpu, .cuda: return self
        case .auto:
            if let count = try? Device.count(), count > 0 { return .cuda }
            return .cpu
        }
    }
}

extension DType: ExpressibleByArgument {
    public init?(argument: String) { self.init(name: argument) }
}

/// Writes a line to standard error (progress, so that standard output stays the result).
func note(_ text: String) {
    var line = text + "\n"
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

/// Writes `text` to `path` atomically; an error names the path.
func writeText(_ text: String, to path: String) throws {
    try writeTextFile(text, to: path)
}

/// Checks --shape values against the presets.
func validatePresetNames(_ names: [String]) throws {
    for name in names where !ShapePreset.all.contains(where: { $0.name == name }) {
        throw ValidationError(
            "--shape '\(name)' is not a preset; expected one of \(ShapePreset.all.map(\.name).joined(separator: ", "))")
    }
}

/// A comma-separated list of positive integers, such as `1,8,32`.
struct IntegerList: ExpressibleByArgument {
    var values: [Int]
    init?(argument: String) {
        let parts = argument.split(separator: ",").map { Int($0.filter { $0 != " " }) }
        guard !parts.isEmpty, parts.allSatisfy({ $0 != nil && $0! >= 1 }) else { return nil }
        values = parts.map { $0! }
    }
}

