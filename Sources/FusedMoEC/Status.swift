import CUDA
import FusedMoE

/// The status codes of the C ABI: `FUSED_MOE_OK` and the `FUSED_MOE_ERROR_*` codes of fused_moe.h.
enum Status: CInt {
    case ok = 0
    case invalidArgument = -1
    case unsupported = -2
    case cuda = -3
    case outOfMemory = -4
    case `internal` = -5
}

/// A failure on its way out through the C ABI: the status to return and the message that
/// `fused_moe_last_error` will give.
///
/// Every error the library throws is turned into one of these at the boundary, so nothing
/// crosses into C but a status code.
struct ABIError: Error {
    var status: Status
    var message: String

    init(status: Status, message: String) {
        self.status = status
        self.message = message
    }

    /// An argument is wrong: `name` is the C parameter (or `options.field`) as the header spells it.
    static func invalid(_ name: String, _ message: String) -> ABIError {
        ABIError(status: .invalidArgument, message: "invalid argument '\(name)': \(message)")
    }

    static func unsupported(_ message: String) -> ABIError {
        ABIError(status: .unsupported, message: "unsupported: \(message)")
    }

    static func `internal`(_ message: String) -> ABIError {
        ABIError(status: .internal, message: "internal error (please report): \(message)")
    }

    /// Maps a library error: argument and file errors are invalid arguments (a malformed config
    /// file named by `FUSED_MOE_CONFIG_DIR` is the caller's input too).
    init(_ error: MoEError) {
        switch error {
        case .invalidArgument(let name, let message):
            self = .invalid(name, message)
        case .unsupported(let message):
            self = .unsupported(message)
        case .cuda(let error):
            self.init(error)
        case .malformedFile:
            self.init(status: .invalidArgument, message: error.description)
        case .mismatch:
            self = .internal(error.description)
        }
    }

    /// Maps a CUDA error: `CUDA_ERROR_OUT_OF_MEMORY` (2) has its own status, the rest are CUDA errors
    /// (a missing driver or NVRTC included: the message says where it looked).
    init(_ error: CUDAError) {
        let outOfMemory = error.domain == .driver && error.code == 2
        self.init(status: outOfMemory ? .outOfMemory : .cuda, message: error.description)
    }

    /// Maps whatever a library call threw: our own errors as they are (the routers' setup throws
    /// them inside the same blocks), library and CUDA errors as above, anything else (a bug) as an
    /// internal error.
    init(any error: any Error) {
        switch error {
        case let error as ABIError: self = error
        case let error as MoEError: self.init(error)
        case let error as CUDAError: self.init(error)
        default: self = .internal("\(error)")
        }
    }
}
