/// The bfloat16 format: 1 sign bit, 8 exponent bits, 7 fraction bits (the top half of a `Float`).
///
/// Conversion from `Float` rounds to nearest, ties to even; NaN stays NaN (quieted), infinities and
/// signed zeros are kept, and values past the largest finite bfloat16 round to infinity.
public struct BFloat16: Hashable, Sendable, BitwiseCopyable, CustomStringConvertible {
    public var bitPattern: UInt16

    public init(bitPattern: UInt16) {
        self.bitPattern = bitPattern
    }

    public init(_ value: Float) {
        let bits = value.bitPattern
        if value.isNaN {
            // Keep the sign and the top payload bits, and set the quiet bit so the result is a NaN
            // even when the payload lived only in the low half.
            bitPattern = UInt16(truncatingIfNeeded: bits >> 16) | 0x0040
            return
        }
        let lsb = (bits >> 16) & 1
        let rounded = bits &+ 0x7FFF &+ lsb
        bitPattern = UInt16(truncatingIfNeeded: rounded >> 16)
    }

    public init(_ value: Double) { self.init(Float(value)) }

    public var floatValue: Float { Float(bitPattern: UInt32(bitPattern) << 16) }

    public var isNaN: Bool { (bitPattern & 0x7F80) == 0x7F80 && (bitPattern & 0x007F) != 0 }

    public var description: String { floatValue.description }

    public static let zero = BFloat16(bitPattern: 0)
    /// The largest finite value, 3.3895314e38.
    public static let greatestFiniteMagnitude = BFloat16(bitPattern: 0x7F7F)
    public static let infinity = BFloat16(bitPattern: 0x7F80)
    public static let nan = BFloat16(bitPattern: 0x7FC0)
}
