import ArgumentParser
import CUDA
import FusedMoE

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Times the layer per batch size against the machine's floor (ceilings measured in the same run).",
        discussion: """
            Without a GPU it runs the CPU backend on the small 'tiny' preset. Presets: \
            \(ShapePreset.all.map { "\($0.name) (\($0.shape))" }.joined(separator: ", ")).
            """)

    @Option(help: "Backend: auto (the GPU when one is visible), cpu or cuda.")
    var backend: BackendChoice = .auto

    @Option(name: .customLong("shape"), help: "A preset shape; repeat for several. Default: tiny on the CPU, seed4096 and seed8192 on a GPU.")
    var shapes: [String] = []

    @Option(help: "Comma-separated batch sizes M. Default: 1,8,32,128 on the CPU.")
    var batchSizes: IntegerList?

    @Option(help: "Element type: bf16, fp16 or fp32.")
    var dtype: DType = .bf16

    @Option(help: "Timed repetitions per case (the median is reported).")
    var repeats: Int = 5

    @Option(help: "Seed for the random inputs.")
    var seed: UInt64 = 2026

    @Option(help: "Write the results as JSON (DESIGN.md's format) to this file.")
    var json: String?

    func validate() throws {
        guard repeats >= 1 else { throw ValidationError("--repeats must be >= 1, got \(repeats)") }
        for name in shapes where !ShapePreset.all.contains(where: { $0.name == name }) {
            throw ValidationError("--shape '\(name)' is not a preset; expected one of \(ShapePreset.all.map(\.name).joined(separator: ", "))")
        }
    }

    func run() throws {
        let resolved = try backend.resolve()
        guard resolved == .cpu else {
            throw ValidationError("the CUDA bench is not built yet; run with --backend cpu")
        }
        let presets = try (shapes.isEmpty ? ["tiny"] : shapes).map { try ShapePreset.named($0) }
        let batches = batchSizes?.values ?? [1, 8, 32, 128]
        note("measuring the CPU's ceilings...")
        let ceilings = CPUBench.measureCeilings()
        note("copy \(format(ceilings.copyBytesPerSecond / 1e9, 1)) GB/s, fp32 matrix \(format(ceilings.matrixFlopsPerSecond / 1e9, 1)) GFLOP/s")
        var rows: [BenchRow] = []
        for preset in presets {
            rows += try CPUBench.run(
                preset: preset, batchSizes: batches, dtype: dtype, repeats: repeats, ceilings: ceilings, seed: seed,
                progress: note)
        }
        let report = BenchReport(
            device: "CPU (\(cpuCount()) cores)", driver: "none", commit: currentCommit(), date: HostClock.isoDate(),
            ceilings: ceilings, rows: rows)
        print(report.table())
        if let json {
            try writeText(report.json.serialized(indent: 1) + "\n", to: json)
            note("wrote \(json)")
        }
    }
}

func cpuCount() -> Int {
    Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
}

#if canImport(Glibc)
import Glibc
#endif
