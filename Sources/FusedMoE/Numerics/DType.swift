/// The element types the layer accepts for activations and weights.
public enum DType: String, CaseIterable, Sendable, Hashable, CustomStringConvertible {
    case bf16
    case fp16
    case fp32

    /// Bytes per element.
    public var byteCount: Int {
        switch self {
        case .bf16, .fp16: 2
        case .fp32: 4
        }
    }

    public var description: String { rawValue }

    /// Parses `bf16`/`bfloat16`, `fp16`/`float16`/`half`, `fp32`/`float32`/`float`.
    public init?(name: String) {
        switch name.lowercased() {
        case "bf16", "bfloat16": self = .bf16
        case "fp16", "float16", "half", "f16": self = .fp16
        case "fp32", "float32", "float", "f32": self = .fp32
        default: return nil
        }
    }
}

/// A scalar type the layer computes on: stored as itself, computed in `Float`.
public protocol MoEScalar: BitwiseCopyable, Sendable, Hashable {
    static var dtype: DType { get }
    init(_ value: Float)
    var floatValue: Float { get }
}

extension BFloat16: MoEScalar {
    public static var dtype: DType { .bf16 }
}

extension Float16: MoEScalar {
    public static var dtype: DType { .fp16 }
    public var floatValue: Float { Float(self) }
}

extension Float: MoEScalar {
    public static var dtype: DType { .fp32 }
    public var floatValue: Float { self }
}

extension MoEScalar {
    /// Rounds a `Float` to this type and back: what storing a value in this type does to it.
    @inline(__always)
    public static func rounded(_ value: Float) -> Float { Self(value).floatValue }
}
