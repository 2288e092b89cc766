/// A tensor in host memory: a shape, strides in elements, and contiguous storage.
///
/// Tensors made here are row-major and contiguous; strides are kept so that views from other
/// layouts (a safetensors file, a transposed weight) can be described and checked.
public struct HostTensor<Element: BitwiseCopyable>: Sendable where Element: Sendable {
    public var shape: [Int]
    public var strides: [Int]
    public var storage: [Element]

    /// A row-major tensor over `storage`, whose count must be the product of `shape`.
    /// - Throws: `MoEError.invalidArgument` when a dimension is negative or the count is wrong.
    public init(shape: [Int], storage: [Element], name: String = "tensor") throws(MoEError) {
        guard shape.allSatisfy({ $0 >= 0 }) else {
            throw .invalidArgument(name, "dimensions must be >= 0, got shape \(shape)")
        }
        let count = shape.reduce(1, *)
        guard storage.count == count else {
            throw .invalidArgument(name, "shape \(shape) holds \(count) elements but \(storage.count) were given")
        }
        self.shape = shape
        self.strides = HostTensor.rowMajorStrides(shape)
        self.storage = storage
    }

    /// A row-major tensor filled with `value`.
    public init(shape: [Int], repeating value: Element) {
        precondition(shape.allSatisfy { $0 >= 0 }, "negative dimension in \(shape)")
        self.shape = shape
        self.strides = HostTensor.rowMajorStrides(shape)
        self.storage = [Element](repeating: value, count: shape.reduce(1, *))
    }

    public static func rowMajorStrides(_ shape: [Int]) -> [Int] {
        var strides = [Int](repeating: 1, count: shape.count)
        var running = 1
        for axis in stride(from: shape.count - 1, through: 0, by: -1) {
            strides[axis] = running
            running *= Swift.max(shape[axis], 1)
        }
        return strides
    }

    public var count: Int { storage.count }
    public var rank: Int { shape.count }
    public var isContiguous: Bool { strides == HostTensor.rowMajorStrides(shape) }

    /// The element at a multi-index.
    public subscript(index: Int...) -> Element {
        get { storage[offset(index)] }
        set { storage[offset(index)] = newValue }
    }

    private func offset(_ index: [Int]) -> Int {
        precondition(index.count == shape.count, "index \(index) for a tensor of shape \(shape)")
        var offset = 0
        for axis in 0..<index.count {
            precondition(index[axis] >= 0 && index[axis] < shape[axis], "index \(index) outside shape \(shape)")
            offset += index[axis] * strides[axis]
        }
        return offset
    }
}

extension HostTensor where Element: MoEScalar {
    /// Elements converted to `Float`.
    public var floats: [Float] { storage.map(\.floatValue) }

    /// A tensor of values drawn uniformly from `[-scale, scale)`, rounded to `Element`.
    public static func random<G: RandomNumberGenerator>(shape: [Int], scale: Float = 1, using generator: inout G)
        -> HostTensor
    {
        var tensor = HostTensor(shape: shape, repeating: Element(0))
        for index in 0..<tensor.storage.count {
            tensor.storage[index] = Element(Float.random(in: -scale..<scale, using: &generator))
        }
        return tensor
    }
}

/// A small, fast, seedable generator (SplitMix64), so checks and benchmarks can be reproduced.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
