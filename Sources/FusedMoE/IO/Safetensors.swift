#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// The format stores little-endian values and this reader copies them as they lie in memory.
#if _endian(big)
#error("the safetensors reader and writer assume a little-endian host")
#endif

// MARK: - Element types

/// A safetensors element type: the header's `dtype` string.
///
/// A struct over the string rather than an enum, so that a file holding a type this reader does
/// not know (a new fp4 or fp6 format) still opens; such a tensor is an error only when it is read.
public struct SafetensorsDType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: String

    public init(rawValue: String) { self.rawValue = rawValue }

    public static let bool = SafetensorsDType(rawValue: "BOOL")
    public static let u8 = SafetensorsDType(rawValue: "U8")
    public static let i8 = SafetensorsDType(rawValue: "I8")
    public static let f8E4M3 = SafetensorsDType(rawValue: "F8_E4M3")
    public static let f8E5M2 = SafetensorsDType(rawValue: "F8_E5M2")
    public static let f8E8M0 = SafetensorsDType(rawValue: "F8_E8M0")
    public static let i16 = SafetensorsDType(rawValue: "I16")
    public static let u16 = SafetensorsDType(rawValue: "U16")
    public static let f16 = SafetensorsDType(rawValue: "F16")
    public static let bf16 = SafetensorsDType(rawValue: "BF16")
    public static let i32 = SafetensorsDType(rawValue: "I32")
    public static let u32 = SafetensorsDType(rawValue: "U32")
    public static let f32 = SafetensorsDType(rawValue: "F32")
    public static let f64 = SafetensorsDType(rawValue: "F64")
    public static let i64 = SafetensorsDType(rawValue: "I64")
    public static let u64 = SafetensorsDType(rawValue: "U64")

    /// Every type whose element size this reader knows.
    public static let known: [SafetensorsDType] = [
        .bool, .u8, .i8, .f8E4M3, .f8E5M2, .f8E8M0, .i16, .u16, .f16, .bf16, .i32, .u32, .f32, .f64, .i64, .u64,
    ]

    /// The safetensors name of a layer element type: `BF16`, `F16` or `F32`.
    public init(_ dtype: DType) {
        switch dtype {
        case .bf16: self = .bf16
        case .fp16: self = .f16
        case .fp32: self = .f32
        }
    }

    /// Bytes per element; nil for a type this reader does not know.
    public var byteCount: Int? {
        switch rawValue {
        case "BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2", "F8_E8M0": 1
        case "I16", "U16", "F16", "BF16": 2
        case "I32", "U32", "F32": 4
        case "I64", "U64", "F64": 8
        default: nil
        }
    }

    /// The layer element type this is (`BF16`, `F16`, `F32`), or nil.
    public var floatType: DType? {
        switch self {
        case .bf16: .bf16
        case .f16: .fp16
        case .f32: .fp32
        default: nil
        }
    }

    /// Whether the tensor holds integers the layer reads as ids (`I32`, `I64`).
    public var isIndexType: Bool { self == .i32 || self == .i64 }

    public var description: String { rawValue }
}

// MARK: - Reading

/// One tensor's entry in a safetensors header.
public struct SafetensorsTensorInfo: Hashable, Sendable {
    public var name: String
    public var dtype: SafetensorsDType
    public var shape: [Int]
    /// The tensor's bytes within the data section (the bytes after the header).
    public var dataOffsets: Range<Int>

    /// The product of the shape (1 for a scalar).
    public var elementCount: Int { shape.reduce(1, *) }
}

/// A safetensors file, memory-mapped and validated when opened.
///
/// The layout: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name
/// to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets into the data that follows the
/// header) plus an optional `"__metadata__"` object of strings, then the data. Opening checks all
/// of it (the header length against the file, the JSON, every entry's fields, offsets in range,
/// ordered and not overlapping, and each byte count against shape and element size), so reads
/// cannot fail on the layout. The mapping is private and read-only: tensors are copied out of the
/// page cache once, straight into the caller's type, and the mapping is released with the value.
public final class SafetensorsFile: @unchecked Sendable {
    /// The path the file was opened from; every error names it.
    public let path: String
    /// Tensors in the order the header lists them.
    public let tensors: [SafetensorsTensorInfo]
    /// The header's `__metadata__` (empty when absent).
    public let metadata: [String: String]
    private let indexOfName: [String: Int]
    private let mapping: MappedFile
    private let dataStart: Int

    /// The largest header this reader accepts, as the reference implementation does.
    public static let maximumHeaderLength = 100_000_000

    /// Opens and validates `path`.
    /// - Throws: `MoEError.invalidArgument(path, ...)` when the file cannot be opened or mapped;
    ///   `MoEError.malformedFile(path, ...)` when the layout is wrong, naming the tensor
    ///   (`"tensor 'name': ..."`) and what was expected.
    public init(path: String) throws(MoEError) {
        self.path = path
        let mapping = try MappedFile(path: path)
        self.mapping = mapping
        let fileLength = mapping.count
        guard fileLength >= 8 else {
            throw .malformedFile(path, "the file is \(fileLength) bytes; expected an 8-byte header length first")
        }
        let headerLength = UInt64(littleEndian: mapping.base.loadUnaligned(as: UInt64.self))
        guard headerLength <= UInt64(fileLength - 8) else {
            throw .malformedFile(
                path,
                "header length \(headerLength) exceeds the file (\(fileLength) bytes, so at most \(fileLength - 8))")
        }
        guard headerLength <= UInt64(SafetensorsFile.maximumHeaderLength) else {
            throw .malformedFile(
                path, "header length \(headerLength) exceeds the limit of \(SafetensorsFile.maximumHeaderLength) bytes")
        }
        dataStart = 8 + Int(headerLength)
        let dataLength = fileLength - dataStart
        let headerBytes = UnsafeRawBufferPointer(start: mapping.base + 8, count: Int(headerLength))
        let header = try SafetensorsFile.parseHeader(headerBytes, path: path, dataLength: dataLength)
        tensors = header.tensors
        metadata = header.metadata
        var indexOfName: [String: Int] = [:]
        for (index, tensor) in tensors.enumerated() { indexOfName[tensor.name] = index }
        self.indexOfName = indexOfName
    }

    /// The tensor names in header order.
    public var names: [String] { tensors.map(\.name) }

    /// The entry of the tensor called `name`, or nil when the file has none.
    public func info(_ name: String) -> SafetensorsTensorInfo? {
        indexOfName[name].map { tensors[$0] }
    }

    /// The entry of `name`.
    /// - Throws: `MoEError.invalidArgument(name, ...)` when the file has no such tensor.
    public func requireInfo(_ name: String) throws(MoEError) -> SafetensorsTensorInfo {
        guard let info = info(name) else {
            let held = tensors.count <= 12 ? names.joined(separator: ", ") : "\(tensors.count) tensors"
            throw .invalidArgument(
                name, "no tensor of this name in '\(path)' (it holds \(held.isEmpty ? "none" : held))")
        }
        return info
    }

    /// Reads a floating-point tensor as `T`, converting from whichever of `BF16`, `F16` and `F32`
    /// the file holds (rounding to nearest even where `T` is narrower).
    /// - Parameter slice: one range per dimension to read only that box (nil: the whole tensor).
    /// - Throws: `MoEError.invalidArgument(name, ...)` when the tensor is missing or the slice is
    ///   outside its shape; `MoEError.malformedFile(path, "tensor 'name': ...")` when its dtype is
    ///   not one of the three.
    public func tensor<T: MoEScalar>(_ name: String, as type: T.Type = T.self, slice: [Range<Int>]? = nil)
        throws(MoEError) -> HostTensor<T>
    {
        let info = try requireInfo(name)
        let box = try checkedSlice(slice, of: info)
        try checkFloat(info, as: T.self)
        let shape = box.map(\.count)
        let count = shape.reduce(1, *)
        let storage = [T](unsafeUninitializedCapacity: count) { buffer, initialized in
            if count > 0 { copyFloats(info, slice: box, to: buffer.baseAddress!) }
            initialized = count
        }
        return try HostTensor(shape: shape, storage: storage, name: name)
    }

    /// Reads an `I32` or `I64` tensor as `Int32` (ids and counts).
    /// - Throws: `MoEError.invalidArgument(name, ...)` when the tensor is missing;
    ///   `MoEError.malformedFile(path, "tensor 'name': ...")` for another dtype or an `I64` value
    ///   outside the `Int32` range.
    public func integers(_ name: String) throws(MoEError) -> HostTensor<Int32> {
        let info = try requireInfo(name)
        guard info.dtype.isIndexType else {
            throw .malformedFile(
                path, "tensor '\(name)': dtype \(info.dtype) cannot be read as integers; expected I32 or I64")
        }
        let count = info.elementCount
        let source = mapping.base + dataStart + info.dataOffsets.lowerBound
        var storage = [Int32](repeating: 0, count: count)
        for index in 0..<count {
            if info.dtype == .i32 {
                storage[index] = Int32(littleEndian: source.loadUnaligned(fromByteOffset: 4 * index, as: Int32.self))
            } else {
                let value = Int64(littleEndian: source.loadUnaligned(fromByteOffset: 8 * index, as: Int64.self))
                guard let narrow = Int32(exactly: value) else {
                    throw .malformedFile(
                        path, "tensor '\(name)': element \(index) is \(value), outside the int32 range")
                }
                storage[index] = narrow
            }
        }
        return try HostTensor(shape: info.shape, storage: storage, name: name)
    }

    /// A copy of the tensor's bytes as stored, whatever its dtype (the way to read a type this
    /// reader does not convert).
    /// - Throws: `MoEError.invalidArgument(name, ...)` when the file has no such tensor.
    public func bytes(_ name: String) throws(MoEError) -> [UInt8] {
        let info = try requireInfo(name)
        return Array(UnsafeRawBufferPointer(rebasing: dataBuffer[info.dataOffsets]))
    }

    // MARK: Internals shared with checkpoint loading

    private var dataBuffer: UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: mapping.base + dataStart, count: mapping.count - dataStart)
    }

    /// Checks that `info` holds `BF16`, `F16` or `F32`, so that `copyFloats` can read it as `T`.
    func checkFloat<T: MoEScalar>(_ info: SafetensorsTensorInfo, as: T.Type) throws(MoEError) {
        guard info.dtype.floatType != nil else {
            let known = info.dtype.byteCount == nil ? "an unknown dtype" : "dtype"
            throw .malformedFile(
                path,
                "tensor '\(info.name)': \(known) \(info.dtype) cannot be read as \(T.dtype); expected BF16, F16 or F32")
        }
    }

    /// The slice as ranges, checked against the shape (nil: the whole tensor).
    func checkedSlice(_ slice: [Range<Int>]?, of info: SafetensorsTensorInfo) throws(MoEError) -> [Range<Int>] {
        guard let slice else { return info.shape.map { 0..<$0 } }
        guard slice.count == info.shape.count else {
            throw .invalidArgument(info.name, "a slice of \(slice.count) ranges for a tensor of shape \(info.shape)")
        }
        for (axis, range) in slice.enumerated() where range.lowerBound < 0 || range.upperBound > info.shape[axis] {
            throw .invalidArgument(
                info.name,
                "slice \(range) of dimension \(axis) is outside 0..<\(info.shape[axis]) (shape \(info.shape))")
        }
        return slice
    }

    /// Copies the box `slice` of a float tensor (checked by `checkFloat` and `checkedSlice`) to
    /// `destination` in row-major order, converted to `T`: one contiguous run of the last
    /// dimension at a time, so each byte of the mapping is read once.
    func copyFloats<T: MoEScalar>(
        _ info: SafetensorsTensorInfo, slice: [Range<Int>], to destination: UnsafeMutablePointer<T>
    ) {
        guard let source = info.dtype.floatType, let size = info.dtype.byteCount else {
            preconditionFailure("copyFloats on \(info.dtype) without checkFloat")
        }
        guard !slice.contains(where: \.isEmpty) else { return }
        let base = mapping.base + dataStart + info.dataOffsets.lowerBound
        let rank = info.shape.count
        guard rank > 0 else {
            SafetensorsFile.convert(from: base, type: source, count: 1, to: destination)
            return
        }
        let strides = HostTensor<T>.rowMajorStrides(info.shape)
        let run = slice[rank - 1].count
        var index = slice.map(\.lowerBound)
        var written = 0
        while true {
            var element = 0
            for axis in 0..<rank { element += index[axis] * strides[axis] }
            SafetensorsFile.convert(from: base + element * size, type: source, count: run, to: destination + written)
            written += run
            // Odometer over every dimension but the last.
            var axis = rank - 2
            while axis >= 0 {
                index[axis] += 1
                if index[axis] < slice[axis].upperBound { break }
                index[axis] = slice[axis].lowerBound
                axis -= 1
            }
            if axis < 0 { return }
        }
    }

    @inline(__always)
    static func convert<T: MoEScalar>(
        from source: UnsafeRawPointer, type: DType, count: Int, to destination: UnsafeMutablePointer<T>
    ) {
        if type == T.dtype {
            UnsafeMutableRawPointer(destination).copyMemory(from: source, byteCount: count * type.byteCount)
            return
        }
        switch type {
        case .bf16:
            for index in 0..<count {
                let bits = UInt16(littleEndian: source.loadUnaligned(fromByteOffset: 2 * index, as: UInt16.self))
                destination[index] = T(BFloat16(bitPattern: bits).floatValue)
            }
        case .fp16:
            for index in 0..<count {
                let bits = UInt16(littleEndian: source.loadUnaligned(fromByteOffset: 2 * index, as: UInt16.self))
                destination[index] = T(Float(Float16(bitPattern: bits)))
            }
        case .fp32:
            for index in 0..<count {
                let bits = UInt32(littleEndian: source.loadUnaligned(fromByteOffset: 4 * index, as: UInt32.self))
                destination[index] = T(Float(bitPattern: bits))
            }
        }
    }

    // MARK: Header

    private static func parseHeader(_ bytes: UnsafeRawBufferPointer, path: String, dataLength: Int) throws(MoEError)
        -> (tensors: [SafetensorsTensorInfo], metadata: [String: String])
    {
        let json: JSON
        do {
            json = try JSON.parse(String(decoding: bytes, as: UTF8.self), source: path)
        } catch {
            let detail = if case .malformedFile(_, let message) = error { message } else { error.description }
            throw .malformedFile(path, "the header is not valid JSON: \(detail)")
        }
        guard case .object(let members) = json else {
            throw .malformedFile(path, "the header must be a JSON object of tensor entries")
        }
        var tensors: [SafetensorsTensorInfo] = []
        var metadata: [String: String] = [:]
        var seen = Set<String>()
        for (name, value) in members {
            guard seen.insert(name).inserted else {
                throw .malformedFile(path, "tensor '\(name)': listed twice in the header")
            }
            if name == "__metadata__" {
                guard case .object(let entries) = value else {
                    throw .malformedFile(path, "__metadata__: expected an object of strings")
                }
                for (key, entry) in entries {
                    guard let text = entry.stringValue else {
                        throw .malformedFile(path, "__metadata__: value of '\(key)' must be a string")
                    }
                    metadata[key] = text
                }
                continue
            }
            tensors.append(try parseEntry(name: name, value: value, path: path, dataLength: dataLength))
        }
        // Offsets ordered and disjoint: sorted by start, each non-empty tensor begins at or after
        // the end of the one before.
        let sorted = tensors.filter { !$0.dataOffsets.isEmpty }.sorted {
            let (a, b) = ($0.dataOffsets, $1.dataOffsets)
            return (a.lowerBound, a.upperBound) < (b.lowerBound, b.upperBound)
        }
        for (previous, next) in zip(sorted, sorted.dropFirst())
        where next.dataOffsets.lowerBound < previous.dataOffsets.upperBound {
            throw .malformedFile(
                path,
                "tensor '\(next.name)': data_offsets \(next.dataOffsets) overlap those of tensor '\(previous.name)' "
                    + "\(previous.dataOffsets)")
        }
        return (tensors, metadata)
    }

    private static func parseEntry(name: String, value: JSON, path: String, dataLength: Int) throws(MoEError)
        -> SafetensorsTensorInfo
    {
        func fail(_ message: String) -> MoEError { .malformedFile(path, "tensor '\(name)': \(message)") }
        guard case .object = value else { throw fail("expected an object with dtype, shape and data_offsets") }
        guard let dtypeName = value["dtype"]?.stringValue else {
            throw fail("'dtype' must be a string such as \"BF16\"")
        }
        guard case .array(let dimensions) = value["shape"] else { throw fail("'shape' must be an array of integers") }
        var shape: [Int] = []
        for dimension in dimensions {
            guard let size = dimension.intValue, size >= 0 else {
                throw fail("'shape' must hold non-negative integers, got \(dimension.serialized())")
            }
            shape.append(size)
        }
        guard case .array(let offsets) = value["data_offsets"], offsets.count == 2,
            let begin = offsets[0].intValue, let end = offsets[1].intValue
        else { throw fail("'data_offsets' must be an array of two integers [begin, end]") }
        guard begin >= 0, begin <= end else {
            throw fail("data_offsets [\(begin), \(end)] must satisfy 0 <= begin <= end")
        }
        guard end <= dataLength else {
            throw fail("data_offsets [\(begin), \(end)] run past the end of the data (\(dataLength) bytes)")
        }
        let dtype = SafetensorsDType(rawValue: dtypeName)
        if let size = dtype.byteCount {
            var count = 1
            for dimension in shape {
                let (product, overflow) = count.multipliedReportingOverflow(by: dimension)
                guard !overflow else { throw fail("shape \(shape) overflows") }
                count = product
            }
            let (expected, overflow) = count.multipliedReportingOverflow(by: size)
            guard !overflow, expected == end - begin else {
                throw fail(
                    "shape \(shape) of \(dtype) needs \(count) x \(size) = \(count &* size) bytes but data_offsets "
                        + "[\(begin), \(end)] hold \(end - begin)")
            }
        }
        return SafetensorsTensorInfo(name: name, dtype: dtype, shape: shape, dataOffsets: begin..<end)
    }
}

// MARK: - Writing

/// A tensor to write: its name, dtype, shape and bytes (little-endian, row-major).
public struct SafetensorsTensor: Hashable, Sendable {
    public var name: String
    public var dtype: SafetensorsDType
    public var shape: [Int]
    public var bytes: [UInt8]

    /// - Throws: `MoEError.invalidArgument(name, ...)` when the dtype is unknown, a dimension is
    ///   negative, or the byte count is not the product of the shape times the element size.
    public init(name: String, dtype: SafetensorsDType, shape: [Int], bytes: [UInt8]) throws(MoEError) {
        guard let size = dtype.byteCount else {
            let known = SafetensorsDType.known.map(\.rawValue).joined(separator: ", ")
            throw .invalidArgument(name, "dtype '\(dtype)' is unknown; expected one of \(known)")
        }
        guard shape.allSatisfy({ $0 >= 0 }) else {
            throw .invalidArgument(name, "negative dimension in shape \(shape)")
        }
        let count = shape.reduce(1, *)
        guard bytes.count == count * size else {
            throw .invalidArgument(name, "shape \(shape) of \(dtype) needs \(count * size) bytes, got \(bytes.count)")
        }
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.bytes = bytes
    }

    /// A float tensor, stored in its own type (`BF16`, `F16` or `F32`).
    public init<T: MoEScalar>(name: String, _ tensor: HostTensor<T>) {
        precondition(tensor.isContiguous, "tensor '\(name)' must be contiguous")
        self.name = name
        dtype = SafetensorsDType(T.dtype)
        shape = tensor.shape
        bytes = tensor.storage.withUnsafeBytes { Array($0) }
    }

    /// An `I32` tensor.
    public init(name: String, _ tensor: HostTensor<Int32>) {
        precondition(tensor.isContiguous, "tensor '\(name)' must be contiguous")
        self.name = name
        dtype = .i32
        shape = tensor.shape
        bytes = tensor.storage.withUnsafeBytes { Array($0) }
    }

    /// An `I64` tensor.
    public init(name: String, _ tensor: HostTensor<Int64>) {
        precondition(tensor.isContiguous, "tensor '\(name)' must be contiguous")
        self.name = name
        dtype = .i64
        shape = tensor.shape
        bytes = tensor.storage.withUnsafeBytes { Array($0) }
    }
}

extension SafetensorsFile {
    /// The header bytes for `tensors` laid out back to back in the given order: JSON, padded with
    /// spaces so that the data starts at a multiple of 8 bytes (as the format allows).
    public static func header(for tensors: [SafetensorsTensor], metadata: [String: String] = [:]) throws(MoEError)
        -> [UInt8]
    {
        var members: [(String, JSON)] = []
        if !metadata.isEmpty {
            members.append(
                ("__metadata__", .object(metadata.sorted { $0.key < $1.key }.map { ($0.key, .string($0.value)) })))
        }
        var seen = Set<String>()
        var offset = 0
        for tensor in tensors {
            guard tensor.name != "__metadata__" else {
                throw .invalidArgument(tensor.name, "the name is reserved for the header's metadata")
            }
            guard seen.insert(tensor.name).inserted else {
                throw .invalidArgument(tensor.name, "two tensors of this name; names must be unique")
            }
            let entry = JSON.object([
                ("dtype", .string(tensor.dtype.rawValue)),
                ("shape", .array(tensor.shape.map { .number(Double($0)) })),
                ("data_offsets", .array([.number(Double(offset)), .number(Double(offset + tensor.bytes.count))])),
            ])
            members.append((tensor.name, entry))
            offset += tensor.bytes.count
        }
        var text = Array(JSON.object(members).serialized().utf8)
        text += [UInt8](repeating: UInt8(ascii: " "), count: (8 - text.count % 8) % 8)
        var length = UInt64(text.count).littleEndian
        return withUnsafeBytes(of: &length) { Array($0) } + text
    }

    /// Writes `tensors` (in this order) and `metadata` to `path` atomically: into a temporary file
    /// in the same folder, flushed, then renamed over `path`.
    /// - Throws: `MoEError.invalidArgument` naming a tensor that cannot be written (a duplicate or
    ///   reserved name) or the path when the file cannot be written.
    public static func write(_ tensors: [SafetensorsTensor], metadata: [String: String] = [:], to path: String)
        throws(MoEError)
    {
        let header = try header(for: tensors, metadata: metadata)
        try FileSystem.writeAtomically(path: path, parts: [header] + tensors.map(\.bytes))
    }
}

// MARK: - Files

/// A whole file mapped read-only and private; unmapped when released.
final class MappedFile: @unchecked Sendable {
    let base: UnsafeRawPointer
    let count: Int

    /// - Throws: `MoEError.invalidArgument(path, ...)` when the file cannot be opened or mapped.
    init(path: String) throws(MoEError) {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { throw .invalidArgument(path, "cannot open: \(FileSystem.lastError())") }
        defer { close(descriptor) }
        var status = stat()
        guard fstat(descriptor, &status) == 0 else {
            throw .invalidArgument(path, "cannot stat: \(FileSystem.lastError())")
        }
        guard (status.st_mode & S_IFMT) == S_IFREG else { throw .invalidArgument(path, "not a regular file") }
        count = Int(status.st_size)
        guard count > 0 else {
            // mmap refuses empty files; a one-byte anonymous page stands in, and the 8-byte check fails.
            base = UnsafeRawPointer(UnsafeMutableRawPointer.allocate(byteCount: 1, alignment: 1))
            return
        }
        guard let mapped = mmap(nil, count, PROT_READ, MAP_PRIVATE, descriptor, 0),
            mapped != UnsafeMutableRawPointer(bitPattern: -1)
        else { throw .invalidArgument(path, "cannot map \(count) bytes: \(FileSystem.lastError())") }
        base = UnsafeRawPointer(mapped)
    }

    deinit {
        if count > 0 {
            munmap(UnsafeMutableRawPointer(mutating: base), count)
        } else {
            UnsafeMutableRawPointer(mutating: base).deallocate()
        }
    }
}

/// The C calls of the IO folder beside the mapping: reading text, atomic writes, file tests.
enum FileSystem {
    static func lastError() -> String { String(cString: strerror(errno)) }

    /// Whether `path` names a directory.
    static func isDirectory(_ path: String) -> Bool {
        var status = stat()
        return stat(path, &status) == 0 && (status.st_mode & S_IFMT) == S_IFDIR
    }

    /// Whether `path` names an existing regular file.
    static func isFile(_ path: String) -> Bool {
        var status = stat()
        return stat(path, &status) == 0 && (status.st_mode & S_IFMT) == S_IFREG
    }

    /// The whole file as UTF-8 text.
    /// - Throws: `MoEError.invalidArgument(path, ...)` when it cannot be read.
    static func readText(_ path: String) throws(MoEError) -> String {
        let mapping = try MappedFile(path: path)
        return String(decoding: UnsafeRawBufferPointer(start: mapping.base, count: mapping.count), as: UTF8.self)
    }

    /// The folder part of a path (`.` when it has none).
    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// `name` relative to `directory`, unless it is absolute.
    static func join(_ directory: String, _ name: String) -> String {
        if name.hasPrefix("/") || directory == "." { return name }
        return directory.hasSuffix("/") ? directory + name : directory + "/" + name
    }

    /// Writes `parts` one after another into a temporary file beside `path`, flushes it, and
    /// renames it over `path`, so readers never see a partial file.
    /// - Throws: `MoEError.invalidArgument(path, ...)` with the system's reason.
    static func writeAtomically(path: String, parts: [[UInt8]]) throws(MoEError) {
        var template = Array((path + ".tmp-XXXXXX").utf8CString)
        let descriptor = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard descriptor >= 0 else {
            throw .invalidArgument(path, "cannot create a temporary file beside it: \(lastError())")
        }
        let temporary = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        var failure: String?
        writing: for part in parts {
            var written = 0
            while written < part.count {
                let result = part.withUnsafeBytes { write(descriptor, $0.baseAddress! + written, $0.count - written) }
                if result < 0 {
                    if errno == EINTR { continue }
                    failure = "cannot write: \(lastError())"
                    break writing
                }
                written += result
            }
        }
        if failure == nil, fchmod(descriptor, 0o644) != 0 || fsync(descriptor) != 0 {
            failure = "cannot flush: \(lastError())"
        }
        if close(descriptor) != 0, failure == nil { failure = "cannot close: \(lastError())" }
        if failure == nil, rename(temporary, path) != 0 {
            failure = "cannot rename the temporary file into place: \(lastError())"
        }
        if let failure {
            unlink(temporary)
            throw .invalidArgument(path, failure)
        }
    }
}
