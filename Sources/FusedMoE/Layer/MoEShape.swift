/// The sizes of one MoE layer: `w1 [E, 2I, H]`, `w2 [E, H, I]`, `k` experts per token.
public struct MoEShape: Hashable, Sendable, CustomStringConvertible {
    /// E: the experts this layer holds weights for.
    public var experts: Int
    /// k: experts each token is routed to.
    public var topK: Int
    /// H: the hidden size (model dimension).
    public var hidden: Int
    /// I: each expert's intermediate size (after tensor-parallel splitting).
    public var intermediate: Int

    /// - Throws: `MoEError.invalidArgument` naming the field when a size is out of range.
    public init(experts: Int, topK: Int, hidden: Int, intermediate: Int) throws(MoEError) {
        guard experts >= 1 else { throw .invalidArgument("experts", "must be >= 1, got \(experts)") }
        guard experts <= 4096 else { throw .invalidArgument("experts", "must be <= 4096, got \(experts)") }
        guard topK >= 1 else { throw .invalidArgument("topK", "must be >= 1, got \(topK)") }
        guard topK <= experts else {
            throw .invalidArgument("topK", "must be <= experts (\(experts)), got \(topK)")
        }
        guard hidden >= 1 else { throw .invalidArgument("hidden", "must be >= 1, got \(hidden)") }
        guard intermediate >= 1 else {
            throw .invalidArgument("intermediate", "must be >= 1, got \(intermediate)")
        }
        self.experts = experts
        self.topK = topK
        self.hidden = hidden
        self.intermediate = intermediate
    }

    public var description: String { "E=\(experts) k=\(topK) H=\(hidden) I=\(intermediate)" }

    /// FLOPs of the layer for `tokens` tokens: 2 * M * k * 3 * I * H (GEMM1 is 2I x H, GEMM2 H x I).
    public func flops(tokens: Int) -> Double {
        2.0 * Double(tokens) * Double(topK) * 3.0 * Double(intermediate) * Double(hidden)
    }

    /// The fewest bytes a forward must move: the touched experts' weights read once, plus x in and out.
    public func minimumBytes(tokens: Int, expertsTouched: Int, dtype: DType) -> Double {
        let weights = Double(expertsTouched) * 3.0 * Double(intermediate) * Double(hidden)
        let activations = 2.0 * Double(tokens) * Double(hidden)
        return (weights + activations) * Double(dtype.byteCount)
    }
}

/// The function between the two projections.
public enum Activation: String, CaseIterable, Sendable, Hashable {
    /// `silu(gate) * up` (SwiGLU), the default.
    case silu
    /// `gelu(gate) * up` with the exact (erf) GELU.
    case gelu

    @inline(__always)
    public func apply(gate: Float, up: Float) -> Float {
        switch self {
        case .silu: return gate / (1 + _exp(-gate)) * up
        case .gelu: return 0.5 * gate * (1 + _erf(gate * 0.70710678118654752)) * up
        }
    }

    public func apply(gate: Double, up: Double) -> Double {
        switch self {
        case .silu: return gate / (1 + _exp(-gate)) * up
        case .gelu: return 0.5 * gate * (1 + _erf(gate * 0.70710678118654752440)) * up
        }
    }
}

#if canImport(Glibc)
import Glibc
@inline(__always) func _exp(_ x: Float) -> Float { expf(x) }
@inline(__always) func _erf(_ x: Float) -> Float { erff(x) }
@inline(__always) func _exp(_ x: Double) -> Double { exp(x) }
@inline(__always) func _erf(_ x: Double) -> Double { erf(x) }
#elseif canImport(Darwin)
import Darwin
@inline(__always) func _exp(_ x: Float) -> Float { expf(x) }
@inline(__always) func _erf(_ x: Float) -> Float { erff(x) }
@inline(__always) func _exp(_ x: Double) -> Double { exp(x) }
@inline(__always) func _erf(_ x: Double) -> Double { erf(x) }
#endif
