import CCUDA

/// A source file handed to NVRTC as a header under an include name.
public struct SourceHeader: Hashable, Sendable {
    public var includeName: String
    public var source: String
    public init(includeName: String, source: String) {
        self.includeName = includeName
        self.source = source
    }
}

/// What NVRTC produced for one program.
public struct CompiledProgram: Hashable, Sendable {
    /// The device code, loadable with `Module(device:cubin:)`.
    public var cubin: [UInt8]
    /// The compiler's log: warnings and, with `--ptxas-options=-v`, the resource report.
    public var log: String
    /// Each requested name expression (`moe_gemm<moe_bf16, 64, ...>`) mapped to its mangled name.
    public var loweredNames: [String: String]

    public init(cubin: [UInt8], log: String, loweredNames: [String: String]) {
        self.cubin = cubin
        self.log = log
        self.loweredNames = loweredNames
    }

    /// The ptxas resource lines of the log: registers, shared memory, spill stores and loads per kernel.
    public var resourceReport: [String] {
        log.split(separator: "\n").map(String.init).filter {
            $0.contains("registers") || $0.contains("spill") || $0.contains("Compiling entry")
                || $0.contains("stack frame")
        }
    }

    /// True when ptxas reported spill stores or loads in any kernel.
    public var spills: Bool {
        resourceReport.contains { line in
            guard line.contains("spill") else { return false }
            return !(line.contains(" 0 bytes spill stores") && line.contains(" 0 bytes spill loads"))
        }
    }
}

/// The NVIDIA run-time compiler, loaded with dlopen at first use.
public final class NVRTC: @unchecked Sendable {
    /// Where libnvrtc was found.
    public let libraryPath: String
    public let version: (major: Int, minor: Int)

    let nvrtcVersion: PFN_nvrtcVersion
    let nvrtcGetErrorString: PFN_nvrtcGetErrorString
    let nvrtcCreateProgram: PFN_nvrtcCreateProgram
    let nvrtcDestroyProgram: PFN_nvrtcDestroyProgram
    let nvrtcCompileProgram: PFN_nvrtcCompileProgram
    let nvrtcGetProgramLogSize: PFN_nvrtcGetProgramLogSize
    let nvrtcGetProgramLog: PFN_nvrtcGetProgramLog
    let nvrtcGetCUBINSize: PFN_nvrtcGetCUBINSize
    let nvrtcGetCUBIN: PFN_nvrtcGetCUBIN
    let nvrtcAddNameExpression: PFN_nvrtcAddNameExpression
    let nvrtcGetLoweredName: PFN_nvrtcGetLoweredName

    /// The environment variable naming libnvrtc's path (or its folder), tried before any other place.
    public static let libraryEnvironmentVariable = "FUSED_MOE_NVRTC"

    private static let loaded: Result<NVRTC, CUDAError> = Result { () throws(CUDAError) in try NVRTC() }

    /// The process's NVRTC, loaded on first use.
    ///
    /// Search order: `FUSED_MOE_NVRTC`, `$CUDA_HOME/lib64`, `/usr/local/cuda/lib64`, the dynamic
    /// loader's names, then the `nvidia/cu13/lib` and `nvidia/cu12/lib` (and `nvidia/cuda_nvrtc/lib`)
    /// folders of Python's site-packages, where `pip install nvidia-cuda-nvrtc` puts it.
    /// - Throws: `CUDAError` of domain `.library` listing every place tried.
    public static func shared() throws(CUDAError) -> NVRTC {
        try loaded.get()
    }

    /// Whether NVRTC can be loaded here, without throwing.
    public static var isAvailable: Bool {
        (try? shared()) != nil
    }

    static func searchLoader() -> LibraryLoader {
        var folders: [String] = []
        if let cudaHome = environment("CUDA_HOME") { folders.append(cudaHome + "/lib64") }
        if let cudaPath = environment("CUDA_PATH") { folders.append(cudaPath + "/lib64") }
        folders.append("/usr/local/cuda/lib64")
        var fallback: [String] = []
        for site in pythonSitePackages() {
            fallback += [site + "/nvidia/cu13/lib", site + "/nvidia/cu12/lib", site + "/nvidia/cuda_nvrtc/lib"]
        }
        return LibraryLoader(
            what: "NVRTC (libnvrtc), the CUDA run-time compiler; `pip install nvidia-cuda-nvrtc` provides it",
            environmentVariable: NVRTC.libraryEnvironmentVariable,
            fileNames: ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"],
            folders: folders,
            fallbackFolders: fallback.filter(isDirectory))
    }

    private init() throws(CUDAError) {
        let opened = try NVRTC.searchLoader().open()
        libraryPath = opened.path
        let handle = opened.handle
        func load<F>(_ name: String) throws(CUDAError) -> F {
            try LibraryLoader.symbol(handle, [name], as: F.self, library: opened.path)
        }
        nvrtcVersion = try load("nvrtcVersion")
        nvrtcGetErrorString = try load("nvrtcGetErrorString")
        nvrtcCreateProgram = try load("nvrtcCreateProgram")
        nvrtcDestroyProgram = try load("nvrtcDestroyProgram")
        nvrtcCompileProgram = try load("nvrtcCompileProgram")
        nvrtcGetProgramLogSize = try load("nvrtcGetProgramLogSize")
        nvrtcGetProgramLog = try load("nvrtcGetProgramLog")
        nvrtcGetCUBINSize = try load("nvrtcGetCUBINSize")
        nvrtcGetCUBIN = try load("nvrtcGetCUBIN")
        nvrtcAddNameExpression = try load("nvrtcAddNameExpression")
        nvrtcGetLoweredName = try load("nvrtcGetLoweredName")
        var major: Int32 = 0
        var minor: Int32 = 0
        _ = nvrtcVersion(&major, &minor)
        version = (Int(major), Int(minor))
    }

    /// "13.0"
    public var versionString: String { "\(version.major).\(version.minor)" }

    private func check(_ result: nvrtcResult, _ call: String, log: String = "") throws(CUDAError) {
        guard result != 0 else { return }
        let name = nvrtcGetErrorString(result).map { String(cString: $0) } ?? "NVRTC_ERROR_\(result)"
        var message = name
        if !log.isEmpty { message += "\n" + log }
        throw CUDAError(domain: .nvrtc, code: result, name: name, call: call, message: message)
    }

    /// Compiles CUDA C++ to a cubin (`nvrtcCreateProgram`, `nvrtcAddNameExpression`,
    /// `nvrtcCompileProgram`, `nvrtcGetCUBIN`, `nvrtcGetLoweredName`).
    ///
    /// - Parameters:
    ///   - source: the program text.
    ///   - name: the file name NVRTC uses in messages.
    ///   - headers: sources the program `#include`s by name (NVRTC has no include path of its own).
    ///   - options: compiler options; name a real architecture (`-arch=sm_90a`) to get a cubin.
    ///   - nameExpressions: template instantiations to emit, such as `moe_gemm<moe_bf16, 64>`.
    /// - Throws: `CUDAError` of domain `.nvrtc`; a compile error's message holds the compiler log.
    public func compile(
        source: String, name: String, headers: [SourceHeader] = [], options: [String],
        nameExpressions: [String] = []
    ) throws(CUDAError) -> CompiledProgram {
        var program: nvrtcProgram? = nil
        let headerSources = headers.map { strdup($0.source) }
        let headerNames = headers.map { strdup($0.includeName) }
        let optionStrings = options.map { strdup($0) }
        defer {
            (headerSources + headerNames + optionStrings).forEach { free($0) }
        }
        let created: nvrtcResult = headerSources.map { UnsafePointer<CChar>($0!) }.withUnsafeBufferPointer {
            sources in
            headerNames.map { UnsafePointer<CChar>($0!) }.withUnsafeBufferPointer { names in
                nvrtcCreateProgram(
                    &program, source, name, Int32(headers.count),
                    headers.isEmpty ? nil : sources.baseAddress, headers.isEmpty ? nil : names.baseAddress)
            }
        }
        try check(created, "nvrtcCreateProgram")
        guard program != nil else { throw .usage("nvrtcCreateProgram", "NVRTC returned no program") }
        defer { _ = nvrtcDestroyProgram(&program) }
        for expression in nameExpressions {
            try check(nvrtcAddNameExpression(program, expression), "nvrtcAddNameExpression(\(expression))")
        }
        let compiled: nvrtcResult = optionStrings.map { UnsafePointer<CChar>($0!) }.withUnsafeBufferPointer {
            nvrtcCompileProgram(program, Int32(options.count), $0.baseAddress)
        }
        var logSize = 0
        _ = nvrtcGetProgramLogSize(program, &logSize)
        var logBytes = [CChar](repeating: 0, count: max(logSize, 1))
        _ = nvrtcGetProgramLog(program, &logBytes)
        let log = String(decoding: logBytes.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        try check(compiled, "nvrtcCompileProgram(\(name))", log: log)

        var cubinSize = 0
        try check(nvrtcGetCUBINSize(program, &cubinSize), "nvrtcGetCUBINSize")
        guard cubinSize > 0 else {
            throw .usage("nvrtcGetCUBIN", "no cubin for \(name): name a real architecture such as -arch=sm_90a")
        }
        var cubin = [UInt8](repeating: 0, count: cubinSize)
        let gotCubin = cubin.withUnsafeMutableBufferPointer {
            nvrtcGetCUBIN(program, UnsafeMutableRawPointer($0.baseAddress!).assumingMemoryBound(to: CChar.self))
        }
        try check(gotCubin, "nvrtcGetCUBIN")
        var lowered: [String: String] = [:]
        for expression in nameExpressions {
            var loweredName: UnsafePointer<CChar>? = nil
            try check(nvrtcGetLoweredName(program, expression, &loweredName), "nvrtcGetLoweredName(\(expression))")
            if let loweredName { lowered[expression] = String(cString: loweredName) }
        }
        return CompiledProgram(cubin: cubin, log: log, loweredNames: lowered)
    }
}

#if canImport(Glibc)
import Glibc
#endif
