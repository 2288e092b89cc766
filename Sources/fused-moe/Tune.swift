import ArgumentParser
import CUDA
import FusedMoE

struct Tune: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Searches kernel configs per batch size on this GPU and writes SGLang-compatible config tables.",
        discussion: """
            For each shape, every candidate (tile, warps, stages, split-K and mode) runs in a real layer and its two \
            GEMMs are timed with events; the fastest pair per BLOCK_M wins, is checked against the reference, and is \
            kept only if it beats the built-in heuristic. Candidates compile in parallel on the host's cores.
            --out names a JSON object mapping SGLang file names (E=..,N=..,device_name=...json) to tables, merged into \
            the file if it exists: Sources/MoEConfigs/configs.json is the one shipped in the binary. --sglang-dir \
            also writes one file per shape in SGLang's layout (FUSED_MOE_CONFIG_DIR reads such a folder). \
            --refine searches only around the plan in use (FUSED_MOE_CONFIG_DIR, the shipped tables or the \
            heuristic): one knob moved at a time, a few candidates per batch size, and the plan in use is what a \
            winner must beat.
            """)

    @Option(name: .customLong("shape"), help: "A preset shape; repeat for several.")
    var shapes: [String] = ["seed4096"]

    @Option(help: "Comma-separated batch sizes. Default: DESIGN.md's 1 ... 8192.")
    var batchSizes: IntegerList?

    @Option(help: "Element type: bf16 or fp16.")
    var dtype: DType = .bf16

    @Option(help: "Merge the tables into this JSON file (file name -> table).")
    var out: String = "configs.json"

    @Option(help: "Also write each table as its own SGLang config file in this folder.")
    var sglangDir: String?

    @Option(help: "Seed for the random inputs.")
    var seed: UInt64 = 7

    @Flag(help: "Search only the neighbours of the plan in use (stages, BLOCK_N, persistent, split, groups, clusters).")
    var refine = false

    @Option(help: "Milliseconds each candidate runs back to back before its stages are timed, so it is timed at the card's clock under sustained load (100 reaches an H200's power cap, for a kernel that draws that much); 0: no warm-up.")
    var sustainMs: Double = Tuner.defaultSustainMilliseconds

    func validate() throws {
        guard dtype != .fp32 else { throw ValidationError("--dtype must be bf16 or fp16 on the GPU") }
        guard sustainMs.isFinite, (0...10_000).contains(sustainMs) else {
            throw ValidationError("--sustain-ms must be between 0 and 10000 milliseconds, got \(sustainMs)")
        }
        try validatePresetNames(shapes)
    }

    func run() throws {
        guard try BackendChoice.auto.resolve() == .cuda else {
            throw ValidationError("tune needs a GPU: it times kernels on the device it tunes for")
        }
        let device = try Device(ordinal: 0)
        let tuner = try Tuner(library: KernelLibrary(device: device))
        let batches = batchSizes?.values ?? ShapePreset.batchSizes
        var merged: [(String, JSON)] = []
        if let text = readTextFile(out), case .object(let members) = try JSON.parse(text, source: out) { merged = members }
        for name in shapes {
            let preset = try ShapePreset.named(name)
            let outcomes = try tuner.tune(
                preset: preset, batchSizes: batches, dtype: dtype, seed: seed, around: refine, sustainMilliseconds: sustainMs,
                progress: ProgressPrinter().show)
            let table = ConfigTable(source: out, entries: outcomes.map { ($0.tokens, $0.plan) })
            let fileName = ConfigTable.fileName(
                experts: preset.shape.experts, n: preset.shape.intermediate, deviceName: device.properties.name, dtype: nil)
            merged.removeAll { $0.0 == fileName }
            merged.append((fileName, table.json))
            print("\(preset.name) -> \(fileName)")
            for outcome in outcomes {
                let baseline = refine ? "in use" : "heuristic"
                print("  M=\(outcome.tokens): \(format(outcome.milliseconds, 4)) ms (\(baseline) \(format(outcome.heuristicMilliseconds, 4)) ms, \(outcome.candidates) candidates) \(outcome.plan)")
            }
            if let sglangDir {
                try writeText(table.json.serialized(indent: 4) + "\n", to: sglangDir + "/" + fileName)
            }
        }
        try writeText(JSON.object(merged).serialized(indent: 1) + "\n", to: out)
        note("wrote \(out)")
    }
}

/// Shows progress on standard error: a bar redrawn in place on a terminal; elsewhere (a log) every
/// status line, but the bar only every 25th update.
final class ProgressPrinter {
    private let terminal = isatty(2) != 0
    private var updates = 0

    func show(_ line: String) {
        let isBar = line.hasPrefix("[")
        if terminal {
            var text = (isBar ? "\r\u{1B}[K" : "\r\u{1B}[K") + line + (isBar ? "" : "\n")
            text.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
            return
        }
        if isBar {
            updates += 1
            if updates % 25 != 1 { return }
        }
        note(line)
    }
}

#if canImport(Glibc)
import Glibc
#endif
