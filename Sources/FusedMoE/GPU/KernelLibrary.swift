import CUDA
import MoEKernels
import Synchronization
import Dispatch
import Glibc

/// The kernel sources embedded in the binary (Sources/MoEKernels), one per kernel family.
public enum KernelSource: String, CaseIterable, Sendable {
    case probe = "moe_probe.cu"
    case random = "moe_random.cu"
    case align = "moe_align.cu"
    case topk = "moe_topk.cu"
    case gemm = "moe_gemm.cu"
    case gemmSM90 = "moe_gemm_sm90.cu"
    case elementwise = "moe_elementwise.cu"
    case reference = "moe_reference.cu"

    /// The file's text.
    public var text: String {
        let pointer: UnsafePointer<CChar> =
            switch self {
            case .probe: moe_kernels_probe_source()
            case .random: moe_kernels_random_source()
            case .align: moe_kernels_align_source()
            case .topk: moe_kernels_topk_source()
            case .gemm: moe_kernels_gemm_source()
            case .gemmSM90: moe_kernels_gemm_sm90_source()
            case .elementwise: moe_kernels_elementwise_source()
            case .reference: moe_kernels_reference_source()
            }
        return String(cString: pointer)
    }

    /// Headers the sources include by name: the shared device helpers.
    static let headers: [SourceHeader] = [
        SourceHeader(includeName: "moe_common.cuh", source: String(cString: moe_kernels_common_source()))
    ]
}

/// Compiles embedded kernels for one GPU through the on-disk cache and keeps the loaded modules.
///
/// Programs are compiled for the device's exact architecture (`sm_90a` on Hopper). `prepare`
/// compiles several programs concurrently, one per host core at most; after it, `kernel` only
/// looks up what is loaded, so the forward path never compiles.
public final class KernelLibrary: @unchecked Sendable {
    public let device: Device
    public let compiler: NVRTC
    public let cache: KernelCache
    private let modules = Mutex<[ProgramKey: LoadedProgram]>([:])

    struct ProgramKey: Hashable {
        var source: KernelSource
        var expressions: [String]
    }

    struct LoadedProgram {
        var module: Module
        var loweredNames: [String: String]
        var program: CompiledProgram
    }

    public init(device: Device, cache: KernelCache = KernelCache()) throws(CUDAError) {
        self.device = device
        self.compiler = try NVRTC.shared()
        self.cache = cache
        self.defines = try KernelLibrary.experimentDefines(
            getenv(KernelLibrary.definesEnvironmentVariable).map { String(cString: $0) } ?? "")
    }

    /// Macro definitions for kernel experiments (same-binary A/B of a kernel variant: the sources
    /// read a few `MOE_*` switches, bench/NOTES.md names them), as `NAME=VALUE` words separated by
    /// spaces. They are compile options, so they are part of every cache key.
    public static let definesEnvironmentVariable = "FUSED_MOE_KERNEL_DEFINES"

    /// `-D` options from `FUSED_MOE_KERNEL_DEFINES`.
    /// - Throws: `CUDAError` of domain `.usage` for a word that is not `NAME=VALUE` (NAME an upper-case
    ///   identifier starting `MOE_`, VALUE letters, digits and `_`).
    public static func experimentDefines(_ text: String) throws(CUDAError) -> [String] {
        var options: [String] = []
        for word in text.split(whereSeparator: \.isWhitespace) {
            let parts = word.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let nameOK = parts[0].hasPrefix("MOE_") && parts[0].allSatisfy { $0.isUppercase || $0.isNumber || $0 == "_" }
            let valueOK = parts.count == 2 && !parts[1].isEmpty
                && parts[1].allSatisfy { ($0.isASCII && ($0.isLetter || $0.isNumber)) || $0 == "_" }
            guard nameOK && valueOK else {
                throw CUDAError(
                    domain: .usage, code: 0, name: "usage", call: definesEnvironmentVariable,
                    message: "'\(word)': expected NAME=VALUE words (NAME upper-case starting MOE_, VALUE letters, digits, _)")
            }
            options.append("-D\(word)")
        }
        return options
    }

    /// The experiment defines in force (`FUSED_MOE_KERNEL_DEFINES`), as `-D` options.
    public let defines: [String]

    /// The NVRTC options for this device.
    public var options: [String] {
        KernelLibrary.options(architecture: device.properties.architecture) + defines
    }

    public static func options(architecture: String) -> [String] {
        ["-arch=\(architecture)", "-std=c++17", "-default-device", "--ptxas-options=-v"]
    }

    /// A program: one source compiled with a set of template instantiations (name expressions).
    public struct Request: Hashable, Sendable {
        public var source: KernelSource
        public var expressions: [String]
        public init(source: KernelSource, expressions: [String] = []) {
            self.source = source
            self.expressions = expressions
        }
    }

    /// Compiles (or loads from the cache) and loads every requested program not loaded yet,
    /// compiling concurrently on the host's cores.
    /// - Throws: the first `CUDAError` (a compile error carries the compiler log).
    public func prepare(_ requests: [Request]) throws(CUDAError) {
        let missing = Array(Set(requests.map { ProgramKey(source: $0.source, expressions: $0.expressions) }))
            .filter { key in modules.withLock { $0[key] == nil } }
        guard !missing.isEmpty else { return }
        let results = Mutex<[Int: Result<CompiledProgram, CUDAError>]>([:])
        let options = self.options
        DispatchQueue.concurrentPerform(iterations: missing.count) { index in
            let key = missing[index]
            let result = Result { () throws(CUDAError) in
                try cache.program(
                    compiler: compiler, source: key.source.text, name: key.source.rawValue,
                    headers: KernelSource.headers, options: options, nameExpressions: key.expressions
                ).program
            }
            results.withLock { $0[index] = result }
        }
        let compiled = results.withLock { $0 }
        for (index, key) in missing.enumerated() {
            guard let result = compiled[index] else { continue }
            let program = try result.get()
            let module = try Module(device: device, cubin: program.cubin)
            modules.withLock {
                $0[key] = LoadedProgram(module: module, loweredNames: program.loweredNames, program: program)
            }
        }
    }

    /// A kernel of a prepared program: `name` is an `extern "C"` name or one of the request's
    /// name expressions.
    /// - Throws: `CUDAError` of domain `.usage` when the program was not prepared.
    public func kernel(_ name: String, in request: Request) throws(CUDAError) -> Kernel {
        try prepare([request])
        let key = ProgramKey(source: request.source, expressions: request.expressions)
        guard let loaded = modules.withLock({ $0[key] }) else {
            throw CUDAError(domain: .usage, code: 0, name: "usage", call: "KernelLibrary.kernel", message: "\(request.source.rawValue) is not loaded")
        }
        return try loaded.module.kernel(named: loaded.loweredNames[name] ?? name)
    }

    /// The compiler's resource report (registers, spills) of a prepared program.
    public func resourceReport(_ request: Request) -> [String] {
        modules.withLock { $0[ProgramKey(source: request.source, expressions: request.expressions)]?.program.resourceReport } ?? []
    }
}
