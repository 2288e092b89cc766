import CCUDA

/// A tensor-memory-accelerator descriptor (`CUtensorMap`, 128 bytes) for a 2-D tile of a
/// row-major matrix in device memory, passed to kernels by value as a `__grid_constant__`.
public struct TensorMap: KernelArgument, Sendable {
    /// The 128 bytes of the CUtensorMap.
    var storage = [UInt64](repeating: 0, count: 16)

    /// The 16-bit and 32-bit element types we describe.
    public enum ElementType: Int32, Sendable {
        case float16 = 6
        case float32 = 7
        case bfloat16 = 9

        var byteCount: Int { self == .float32 ? 4 : 2 }
    }

    /// Shared-memory swizzle of the tile (`CUtensorMapSwizzle`).
    public enum Swizzle: Int32, Sendable {
        case none = 0
        case bytes32 = 1
        case bytes64 = 2
        case bytes128 = 3
    }

    /// Describes tiles of `boxRows x boxColumns` elements of a `[rows, columns]` matrix whose rows
    /// are `rowStrideBytes` apart (`cuTensorMapEncodeTiled`, rank 2, no interleave, 256-byte L2
    /// promotion, out-of-bounds elements read as zero).
    /// - Throws: `CUDAError` of domain `.usage` for sizes TMA cannot describe (box sides over 256,
    ///   a stride that is not a multiple of 16, an unaligned address), or the driver's error.
    public init(
        device: Device, address: DevicePointer, elementType: ElementType, rows: Int, columns: Int, rowStrideBytes: Int,
        boxRows: Int, boxColumns: Int, swizzle: Swizzle
    ) throws(CUDAError) {
        guard let encode = device.driver.cuTensorMapEncodeTiled else {
            throw .usage("cuTensorMapEncodeTiled", "this driver has no tensor maps (CUDA 12 or newer is needed)")
        }
        guard rows >= 1, columns >= 1, boxRows >= 1, boxRows <= 256, boxColumns >= 1, boxColumns <= 256 else {
            throw .usage("TensorMap", "a \(rows)x\(columns) matrix with a \(boxRows)x\(boxColumns) box: sides must be >= 1 and boxes <= 256")
        }
        guard rowStrideBytes % 16 == 0, address.address % 16 == 0 else {
            throw .usage("TensorMap", "the address and row stride (\(rowStrideBytes) bytes) must be multiples of 16")
        }
        guard boxColumns * elementType.byteCount <= (swizzle == .bytes128 ? 128 : swizzle == .bytes64 ? 64 : swizzle == .bytes32 ? 32 : Int.max) else {
            throw .usage("TensorMap", "a \(boxColumns)-element box row exceeds the \(swizzle) swizzle span")
        }
        let map = UnsafeMutableRawPointer.allocate(byteCount: 128, alignment: 64)
        defer { map.deallocate() }
        var dimensions: [UInt64] = [UInt64(columns), UInt64(rows)]
        var strides: [UInt64] = [UInt64(rowStrideBytes)]
        var box: [UInt32] = [UInt32(boxColumns), UInt32(boxRows)]
        var elementStrides: [UInt32] = [1, 1]
        let result = encode(
            map, elementType.rawValue, 2, UnsafeMutableRawPointer(bitPattern: UInt(address.address)), &dimensions,
            &strides, &box, &elementStrides, 0, swizzle.rawValue, 3, 0)
        try device.driver.check(result, "cuTensorMapEncodeTiled")
        storage = (0..<16).map { map.load(fromByteOffset: 8 * $0, as: UInt64.self) }
    }

    public var kernelArgumentLayout: (size: Int, alignment: Int) { (128, 64) }

    public func writeKernelArgument(to destination: UnsafeMutableRawPointer) {
        storage.withUnsafeBytes { destination.copyMemory(from: $0.baseAddress!, byteCount: 128) }
    }
}
