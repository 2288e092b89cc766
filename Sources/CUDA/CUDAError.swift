/// An error from the CUDA layer: a failed driver or NVRTC call, a library that could not be loaded,
/// or a request the layer refuses.
///
/// Like `Errno` in swift-system, this is a struct over the raw result code rather than an enum that
/// traps on codes it does not know. It carries the code's name (`cuGetErrorName`), the call that
/// failed and a message a person can act on.
public struct CUDAError: Error, Hashable, Sendable, CustomStringConvertible {
    /// Where the code comes from.
    public enum Domain: String, Hashable, Sendable {
        /// A `CUresult` from the driver API.
        case driver
        /// An `nvrtcResult` from the run-time compiler.
        case nvrtc
        /// An `ncclResult_t` from NCCL (expert parallelism across GPUs).
        case nccl
        /// A shared library (libcuda, libnvrtc) that could not be found or lacks a symbol.
        case library
        /// The on-disk kernel cache.
        case cache
        /// A request the CUDA layer refuses before calling CUDA (for example a zero-sized launch).
        case usage
    }

    public let domain: Domain
    /// The raw result code (`CUresult`, `nvrtcResult` or `ncclResult_t`); 0 for library, cache and
    /// usage errors.
    public let code: Int32
    /// The code's symbolic name, such as `CUDA_ERROR_OUT_OF_MEMORY`.
    public let name: String
    /// The C function (or layer operation) that failed.
    public let call: String
    /// What happened and what to do about it.
    public let message: String

    public init(domain: Domain, code: Int32, name: String, call: String, message: String) {
        self.domain = domain
        self.code = code
        self.name = name
        self.call = call
        self.message = message
    }

    public var description: String {
        switch domain {
        case .driver, .nvrtc, .nccl:
            return "\(call) failed with \(name) (\(code)): \(message)"
        case .library, .cache, .usage:
            return "\(call): \(message)"
        }
    }

    static func usage(_ call: String, _ message: String) -> CUDAError {
        CUDAError(domain: .usage, code: 0, name: "usage", call: call, message: message)
    }

    static func cache(_ call: String, _ message: String) -> CUDAError {
        CUDAError(domain: .cache, code: 0, name: "cache", call: call, message: message)
    }
}
