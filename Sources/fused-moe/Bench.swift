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

    @Option(help: "A Hugging Face config.json (or model folder) to take the shape from, instead of a preset.")
    var model: String?

    @Option(help: "With --model: tensor-parallel size (the intermediate size is split over it).")
    var tp: Int = 1

    @Option(help: "With --model: expert-parallel size (the experts are split over it; rank 0's local experts are timed, with tokens routed among them).")
    var ep: Int = 1

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

    @Option(help: "Write an SVG plot of time and % of floor against batch size to this file.")
    var plot: String?

    @Option(help: "GPU: a JSON file with copy_bytes_per_s and bf16_flops_per_s measured on this GPU in this run, and optionally bf16_flops_per_s_burst, fp16_flops_per_s and fp16_flops_per_s_burst (scripts/ceilings.py writes one with torch: the matrix rates sustained back to back, and in bursts for a second %burst column; an fp16 bench takes the fp16 rates where present). Without it the copy bandwidth is measured here and the matrix rate is taken as 715 TFLOP/s, unmeasured.")
    var ceilings: String?

    @Option(help: "GPU: input sets rotated through per timed graph, so repeated replays do not just re-read L2.")
    var rotations: Int = 4

    @Flag(help: "GPU: time only the plan's own choice per batch size, not every split setting of the PR's table.")
    var planOnly = false

    @Flag(help: "GPU: also time the plan's choice launched without programmatic dependent launch (PDL).")
    var withoutPdl = false

    @Flag(help: "GPU: also time the plan's kernels with the activation in GEMM1 forced on and off, and with align always run.")
    var fusionAb = false

    @Flag(help: "GPU: also time each stage (align, gemm1, activation, gemm2, combine) of one forward with events (and, with kernels compiled under MOE_SM90_DIAG_TIMES=1, print the swap-AB GEMMs' per-tile timeline).")
    var stages = false

    @Option(help: "GPU: how each token's k expert rows are summed: ordered (bitwise reproducible) or atomic (GEMM2 adds them with 16-bit atomics where the plan's GEMM2 kernel can; its rows' variant ends in -atomic then). The CPU backend sums in order.")
    var combine: CombineMode = .ordered

    @Flag(help: "GPU: plan every row by the built-in heuristic, not by a config table: what a shape without a tuned table gets (compare with the same rows without it).")
    var heuristic = false

    @Option(help: "GPU: a peer-timing JSON (e.g. ../shared/anchors/h200-sglang.json): every input set of a (shape, M) row it has is drawn to touch the experts_touched that row records, so a memory-bound row streams the weights the peer's run streamed. Other rows draw as usual.")
    var touchedLike: String?

    func validate() throws {
        guard repeats >= 1 else { throw ValidationError("--repeats must be >= 1, got \(repeats)") }
        guard tp >= 1, ep >= 1 else { throw ValidationError("--tp and --ep must be >= 1") }
        guard model != nil || (tp == 1 && ep == 1) else { throw ValidationError("--tp and --ep go with --model") }
        try validatePresetNames(shapes)
    }

    func run() throws {
        if try backend.resolve() == .cuda {
            try runGPU()
            return
        }
        guard touchedLike == nil else { throw ValidationError("--touched-like needs the GPU backend") }
        guard !heuristic else { throw ValidationError("--heuristic needs the GPU backend (the CPU backend has no plans)") }
        if combine == .atomic { note("--combine atomic: the CPU backend sums each token's rows in order") }
        let presets = try selectedPresets(default: ["tiny"])
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
        if let plot {
            try writeText(BenchPlot.svg(report: report), to: plot)
            note("wrote \(plot)")
        }
    }
}

extension Bench {
    /// The presets named by --shape, plus the --model shape; the defaults when neither is given.
    func selectedPresets(default names: [String]) throws -> [ShapePreset] {
        var presets = try shapes.map { try ShapePreset.named($0) }
        if let model {
            presets.append(try ShapePreset.model(configPath: model, tensorParallel: tp, expertParallel: ep))
        }
        return presets.isEmpty ? try names.map { try ShapePreset.named($0) } : presets
    }

    func runGPU() throws {
        guard rotations >= 1 else { throw ValidationError("--rotations must be >= 1, got \(rotations)") }
        guard dtype != .fp32 else { throw ValidationError("--dtype fp32 runs on the CPU backend only; the GPU takes bf16 or fp16") }
        let device = try Device(ordinal: 0)
        let library = try KernelLibrary(device: device)
        let bench = try GPUBench(library: library)
        let presets = try selectedPresets(default: ["seed4096", "seed8192"])
        let batches = batchSizes?.values ?? ShapePreset.batchSizes
        let copy = try bench.measureCopyBandwidth()
        var measured = Ceilings(copyBytesPerSecond: copy, matrixFlopsPerSecond: 715e12)
        if let ceilings {
            guard let text = readTextFile(ceilings) else { throw ValidationError("--ceilings: cannot read '\(ceilings)'") }
            measured = try Ceilings.parse(json: text, source: ceilings, measuredCopy: copy, dtype: dtype)
            if dtype != measured.matrixDType {
                note("'\(ceilings)' has no \(dtype)_flops_per_s: the floor takes the bf16 rate (the H200 sustains 4% less in fp16, NOTES v41)")
            }
        } else {
            note("no --ceilings file: the bf16 matrix rate is taken as 715 TFLOP/s (the anchor's), not measured")
        }
        note("\(device.properties.name): copy \(format(copy / 1e12, 2)) TB/s measured here; ceilings copy \(format(measured.copyBytesPerSecond / 1e12, 2)) TB/s, \(measured.matrixDType) \(format(measured.matrixFlopsPerSecond / 1e12, 0)) TFLOP/s"
            + (measured.burstMatrixFlopsPerSecond.map { " (bursts: \(format($0 / 1e12, 0)) TFLOP/s, the %burst column)" } ?? ""))
        var touched: [String: [Int: Int]] = [:]
        if let touchedLike {
            guard let text = readTextFile(touchedLike) else { throw ValidationError("--touched-like: cannot read '\(touchedLike)'") }
            touched = try PeerTimings.expertsTouched(json: text, source: touchedLike)
        }
        var rows: [BenchRow] = []
        for preset in presets {
            rows += try bench.run(
                preset: preset, batchSizes: batches, settings: (planOnly ? [.auto] : GPUBench.tableSettings) + (withoutPdl ? [.autoSequential] : [])
                    + (fusionAb ? GPUBench.Setting.fusionComparison : []), dtype: dtype,
                ceilings: measured, rotations: rotations, seed: seed, stages: stages, touched: touched[preset.name] ?? [:],
                combine: combine, heuristic: heuristic, progress: note)
        }
        let report = BenchReport(
            device: device.properties.name, driver: "CUDA \(device.driver.versionString)", commit: currentCommit(),
            date: HostClock.isoDate(), ceilings: measured, rows: rows,
            routing: touchedLike.map { "each input set drawn to touch the experts_touched of \($0)'s row" })
        print(report.table())
        if let json {
            try writeText(report.json.serialized(indent: 1) + "\n", to: json)
            note("wrote \(json)")
        }
        if let plot {
            try writeText(BenchPlot.svg(report: report), to: plot)
            note("wrote \(plot)")
        }
    }
}

func cpuCount() -> Int {
    Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
}

#if canImport(Glibc)
import Glibc
#endif
