import CCUDA

/// An address in device memory, passed to kernels as a pointer argument.
///
/// It does not own memory: take it from a `DeviceBuffer` (which does) with `pointer` or
/// `pointer(offsetBytes:)`, and keep the buffer alive while the work that uses it runs.
public struct DevicePointer: Hashable, Sendable, BitwiseCopyable {
    public var address: UInt64
    public init(address: UInt64) { self.address = address }
    /// The null pointer, for optional kernel arguments.
    public static let null = DevicePointer(address: 0)
    public var isNull: Bool { address == 0 }
}

/// Device memory from `cuMemAlloc`, freed by `cuMemFree` exactly once when the buffer goes away.
public final class DeviceBuffer: @unchecked Sendable {
    public let device: Device
    public let byteCount: Int
    let address: CUdeviceptr
    private let owned: Bool

    /// Allocates `byteCount` bytes (`cuMemAlloc`). A zero-byte buffer is allowed and owns nothing.
    /// - Throws: `CUDAError` (`CUDA_ERROR_OUT_OF_MEMORY` names the size asked for).
    public init(device: Device, byteCount: Int) throws(CUDAError) {
        guard byteCount >= 0 else {
            throw .usage("DeviceBuffer(byteCount:)", "byteCount must be >= 0, got \(byteCount)")
        }
        self.device = device
        self.byteCount = byteCount
        self.owned = true
        if byteCount == 0 {
            address = 0
            return
        }
        try device.makeCurrent()
        var pointer: CUdeviceptr = 0
        let result = device.driver.cuMemAlloc(&pointer, byteCount)
        if result != 0 {
            var error = device.driver.error(result, call: "cuMemAlloc")
            error = CUDAError(
                domain: error.domain, code: error.code, name: error.name, call: error.call,
                message: error.message + " (asked for \(byteCount) bytes)")
            throw error
        }
        address = pointer
    }

    /// Allocates room for `count` elements of `Element`.
    public convenience init<Element>(device: Device, count: Int, of _: Element.Type) throws(CUDAError) {
        guard count >= 0 else {
            throw .usage("DeviceBuffer(count:of:)", "count must be >= 0, got \(count)")
        }
        try self.init(device: device, byteCount: count * MemoryLayout<Element>.stride)
    }

    /// Wraps device memory someone else owns (a framework's tensor): it is never freed here, and
    /// the owner must keep it alive while this buffer is in use.
    /// - Throws: `CUDAError` of domain `.usage` for a null address with a nonzero size or a negative size.
    public init(device: Device, borrowing pointer: DevicePointer, byteCount: Int) throws(CUDAError) {
        guard byteCount >= 0, !(pointer.isNull && byteCount > 0) else {
            throw .usage("DeviceBuffer(borrowing:)", "a borrowed buffer needs a non-null address and byteCount >= 0, got \(pointer.address) and \(byteCount)")
        }
        self.device = device
        self.byteCount = byteCount
        self.address = pointer.address
        self.owned = false
    }

    deinit {
        if owned && address != 0 { _ = device.driver.cuMemFree(address) }
    }

    /// The buffer's start, to pass to a kernel.
    public var pointer: DevicePointer { DevicePointer(address: address) }

    /// An address `offsetBytes` into the buffer.
    /// - Precondition: the offset lies inside the buffer (a bug in the caller otherwise).
    public func pointer(offsetBytes: Int) -> DevicePointer {
        precondition(offsetBytes >= 0 && offsetBytes <= byteCount, "offset \(offsetBytes) outside a \(byteCount)-byte buffer")
        return DevicePointer(address: address + UInt64(offsetBytes))
    }

    /// Copies host bytes into the buffer from its start, and returns once they are in device memory
    /// (`cuMemcpyHtoD`, then a synchronization of the legacy default stream it ran on). The wait
    /// matters: from pageable host memory the copy may return before its DMA lands, and the
    /// library's streams are non-blocking (they do not wait for the legacy stream), so a kernel
    /// launched right after could read the old bytes (seen once, NOTES v16).
    public func upload(_ bytes: UnsafeRawBufferPointer, offsetBytes: Int = 0) throws(CUDAError) {
        guard offsetBytes >= 0, bytes.count + offsetBytes <= byteCount else {
            throw .usage("DeviceBuffer.upload", "\(bytes.count) bytes at offset \(offsetBytes) do not fit a \(byteCount)-byte buffer")
        }
        guard bytes.count > 0, let base = bytes.baseAddress else { return }
        try device.makeCurrent()
        try device.driver.check(device.driver.cuMemcpyHtoD(address + UInt64(offsetBytes), base, bytes.count), "cuMemcpyHtoD")
        try device.driver.check(device.driver.cuStreamSynchronize(nil), "cuStreamSynchronize (legacy stream, after cuMemcpyHtoD)")
    }

    /// Copies an array into the buffer, from its start or `offsetBytes` in.
    public func upload<Element: BitwiseCopyable>(_ elements: [Element], offsetBytes: Int = 0) throws(CUDAError) {
        let result: Result<Void, CUDAError> = elements.withUnsafeBytes { bytes in
            Result { () throws(CUDAError) in try upload(bytes, offsetBytes: offsetBytes) }
        }
        try result.get()
    }

    /// Copies bytes out of the buffer into host memory (`cuMemcpyDtoH`, synchronous).
    public func download(into bytes: UnsafeMutableRawBufferPointer, offsetBytes: Int = 0) throws(CUDAError) {
        guard offsetBytes >= 0, bytes.count + offsetBytes <= byteCount else {
            throw .usage("DeviceBuffer.download", "\(bytes.count) bytes at offset \(offsetBytes) exceed a \(byteCount)-byte buffer")
        }
        guard bytes.count > 0, let base = bytes.baseAddress else { return }
        try device.makeCurrent()
        try device.driver.check(device.driver.cuMemcpyDtoH(base, address + UInt64(offsetBytes), bytes.count), "cuMemcpyDtoH")
    }

    /// Reads `count` elements from the buffer's start into a new array.
    public func download<Element: BitwiseCopyable>(count: Int, as _: Element.Type) throws(CUDAError) -> [Element] {
        guard count >= 0, count * MemoryLayout<Element>.stride <= byteCount else {
            throw .usage("DeviceBuffer.download", "\(count) elements exceed a \(byteCount)-byte buffer")
        }
        var failure: CUDAError? = nil
        let array = [Element](unsafeUninitializedCapacity: count) { storage, initialized in
            do throws(CUDAError) {
                try download(into: UnsafeMutableRawBufferPointer(storage))
                initialized = count
            } catch {
                failure = error
                initialized = 0
            }
        }
        if let failure { throw failure }
        return array
    }

    /// Sets every byte in `[offsetBytes, offsetBytes + byteCount)` to `value` on `stream` (`cuMemsetD8Async`).
    public func fill(byte value: UInt8, offsetBytes: Int = 0, byteCount count: Int? = nil, on stream: Stream)
        throws(CUDAError)
    {
        let count = count ?? (byteCount - offsetBytes)
        guard offsetBytes >= 0, count >= 0, offsetBytes + count <= byteCount else {
            throw .usage("DeviceBuffer.fill", "range \(offsetBytes)+\(count) outside a \(byteCount)-byte buffer")
        }
        guard count > 0 else { return }
        try device.driver.check(
            device.driver.cuMemsetD8Async(address + UInt64(offsetBytes), value, count, stream.handle), "cuMemsetD8Async")
    }

    /// Sets `byteCount` bytes from `pointer` (memory this buffer type need not own, such as a caller's
    /// output) to `value` on `stream` (`cuMemsetD32Async` where address and count are multiples of 4, else
    /// `cuMemsetD8Async`).
    public static func fill(_ pointer: DevicePointer, byte value: UInt8, byteCount: Int, on stream: Stream)
        throws(CUDAError)
    {
        guard byteCount >= 0 else { throw .usage("DeviceBuffer.fill", "byteCount must be >= 0, got \(byteCount)") }
        guard byteCount > 0 else { return }
        guard !pointer.isNull else { throw .usage("DeviceBuffer.fill", "a null device pointer") }
        let driver = stream.device.driver
        if pointer.address % 4 == 0 && byteCount % 4 == 0 {  // in words where it can (the same bytes)
            let word = UInt32(value) * 0x0101_0101
            try driver.check(
                driver.cuMemsetD32Async(pointer.address, word, byteCount / 4, stream.handle), "cuMemsetD32Async")
        } else {
            try driver.check(driver.cuMemsetD8Async(pointer.address, value, byteCount, stream.handle), "cuMemsetD8Async")
        }
    }

    /// Sets `count` 32-bit words from `offsetBytes` (a multiple of 4) to `value` on `stream` (`cuMemsetD32Async`).
    public func fill(word value: UInt32, offsetBytes: Int = 0, count: Int? = nil, on stream: Stream) throws(CUDAError) {
        let count = count ?? (byteCount - offsetBytes) / 4
        guard offsetBytes >= 0, offsetBytes % 4 == 0, count >= 0, offsetBytes + 4 * count <= byteCount else {
            throw .usage("DeviceBuffer.fill(word:)", "range \(offsetBytes)+\(4 * count) outside a \(byteCount)-byte buffer or unaligned")
        }
        guard count > 0 else { return }
        try device.driver.check(
            device.driver.cuMemsetD32Async(address + UInt64(offsetBytes), value, count, stream.handle), "cuMemsetD32Async")
    }

    /// Copies `byteCount` bytes from `source` to `destination` (memory this buffer type need not own, such
    /// as a caller's output) on `stream` (`cuMemcpyDtoDAsync`).
    public static func copy(from source: DevicePointer, to destination: DevicePointer, byteCount: Int, on stream: Stream)
        throws(CUDAError)
    {
        guard byteCount >= 0 else { throw .usage("DeviceBuffer.copy", "byteCount must be >= 0, got \(byteCount)") }
        guard byteCount > 0 else { return }
        guard !source.isNull, !destination.isNull else { throw .usage("DeviceBuffer.copy", "a null device pointer") }
        let driver = stream.device.driver
        try driver.check(
            driver.cuMemcpyDtoDAsync(destination.address, source.address, byteCount, stream.handle), "cuMemcpyDtoDAsync")
    }

    /// Copies `byteCount` bytes from another buffer on `stream` (`cuMemcpyDtoDAsync`).
    public func copy(from source: DeviceBuffer, byteCount count: Int, on stream: Stream) throws(CUDAError) {
        guard count >= 0, count <= byteCount, count <= source.byteCount else {
            throw .usage("DeviceBuffer.copy", "\(count) bytes exceed a buffer (\(source.byteCount) -> \(byteCount))")
        }
        try DeviceBuffer.copy(from: source.pointer, to: pointer, byteCount: count, on: stream)
    }
}
