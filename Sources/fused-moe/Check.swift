import ArgumentParser
import CUDA
import FusedMoE

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Checks the layer against a higher-precision reference on fresh random inputs; exits non-zero on a mismatch.")

    @Option(help: "Backend: auto (the GPU when one is visible), cpu or cuda.")
    var backend: BackendChoice = .auto

    @Option(help: "Seed for the random inputs (default: from the clock, so every run draws fresh inputs).")
    var seed: UInt64?

    @Option(help: "Write the results as JSON to this file.")
    var json: String?

    @Flag(help: "GPU: only seed4096 at M = 1 and 128 (a fast smoke test).")
    var quick = false

    @Flag(help: "GPU: one small shape at M = 1 and 33 with every kernel and plan kind; small enough for compute-sanitizer.")
    var small = false

    func run() throws {
        let seed = self.seed ?? UInt64(HostClock.now() * 1000)
        note("check: seed \(seed)")
        var results = CPUChecks.run(seed: seed) { print($0.line) }
        if try backend.resolve() == .cuda {
            results += try gpuChecks(seed: seed)
        } else {
            note("no GPU in use (--backend \(backend.rawValue)): the GPU checks were skipped; the CPU backend was checked")
        }
        let failed = results.filter { !$0.passed }.count
        if let json {
            let report = JSON.object([
                ("seed", .number(Double(seed))),
                ("results", .array(results.map { .object([("name", .string($0.name)), ("passed", .bool($0.passed)), ("detail", .string($0.detail))]) })),
            ])
            try writeText(report.serialized(indent: 1) + "\n", to: json)
        }
        print("\(results.count - failed) passed, \(failed) failed")
        if failed > 0 { throw ExitCode(1) }
    }

    func gpuChecks(seed: UInt64) throws -> [CheckResult] {
        var results: [CheckResult] = []
        do {
            let device = try Device(ordinal: 0)
            let library = try KernelLibrary(device: device)
            note("GPU: \(device.properties.name), \(device.properties.architecture); NVRTC \(library.compiler.versionString); cache \(library.cache.directory)")
            let start = HostClock.now()
            let outcome = try ProbeCheck.run(library: library, seed: seed)
            let result = CheckResult(
                name: "gpu probe kernel (NVRTC -> cubin -> launch)", passed: outcome.passed,
                detail: "\(outcome.elements) elements, max abs err \(outcome.maxAbsoluteError), compiled \(outcome.compiled), loaded from cache \(outcome.loadedFromCache), \(outcome.registers) registers, \(format(HostClock.now() - start, 3)) s")
            print(result.line)
            results.append(result)
            let checks = try GPUChecks(library: library) { print($0.line) }
            results += checks.run(seed: seed, scope: small ? .small : quick ? .quick : .full)
            // The routers: softmax top-k and grouped top-k on the GPU against the CPU, ids exactly.
            for result in RoutingChecks.run(library: library, seed: seed) {
                print(result.line)
                results.append(result)
            }
        } catch {
            let result = CheckResult(name: "gpu probe kernel", passed: false, detail: error.description)
            print(result.line)
            results.append(result)
        }
        return results
    }
}
