import CUDA

/// An error from the MoE layer: bad input, an unsupported request, or a failure underneath.
public enum MoEError: Error, Hashable, Sendable, CustomStringConvertible {
    /// An argument is wrong: its name, then what was expected and what came.
    case invalidArgument(String, String)
    /// The request is valid but this backend or build cannot do it.
    case unsupported(String)
    /// The GPU layer failed.
    case cuda(CUDAError)
    /// A file (config, safetensors) is malformed: the file, then what is wrong.
    case malformedFile(String, String)
    /// A result failed a check against the reference.
    case mismatch(String)

    public var description: String {
        switch self {
        case .invalidArgument(let name, let message): "invalid argument '\(name)': \(message)"
        case .unsupported(let message): "unsupported: \(message)"
        case .cuda(let error): error.description
        case .malformedFile(let file, let message): "\(file): \(message)"
        case .mismatch(let message): "mismatch: \(message)"
        }
    }

    /// Whatever a layer call threw, as a MoEError: itself, a CUDA error wrapped, anything else as
    /// unsupported.
    public init(any error: any Error) {
        switch error {
        case let error as MoEError: self = error
        case let error as CUDAError: self = .cuda(error)
        default: self = .unsupported("unexpected error \(error)")
        }
    }
}
