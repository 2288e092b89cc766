import CCUDA

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// NCCL, NVIDIA's collective communication library, loaded with dlopen at first use.
///
/// Like `Driver`, every NCCL call in the package goes through this one table, so a machine
/// without NCCL builds and runs everything except multi-GPU expert parallelism, and fails there
/// with an error that lists where the library was looked for.
///
/// Errors: a library that cannot be loaded is a `CUDAError` of domain `.library`. A failed NCCL
/// call is a `CUDAError` of domain `.nccl` whose `code` is the `ncclResult_t` and whose `name` is
/// the enumerator's (`ncclInvalidUsage`); the message carries NCCL's description of the code and,
/// when the library has it, `ncclGetLastError`.
public final class NCCL: @unchecked Sendable {
    // Immutable after init; the function pointers are thread-safe C entry points.
    /// Where libnccl was found.
    public let libraryPath: String
    /// `ncclGetVersion`: `NCCL_VERSION_CODE`, 22105 for 2.21.5 (X * 10000 + Y * 100 + Z since 2.9).
    public let version: Int32

    let ncclGetVersion: PFN_ncclGetVersion
    let ncclGetUniqueId: PFN_ncclGetUniqueId
    let ncclCommInitRank: PFN_ncclCommInitRank
    let ncclCommDestroy: PFN_ncclCommDestroy
    let ncclCommAbort: PFN_ncclCommAbort
    let ncclGetErrorString: PFN_ncclGetErrorString
    let ncclGroupStart: PFN_ncclGroupStart
    let ncclGroupEnd: PFN_ncclGroupEnd
    let ncclSend: PFN_ncclSend
    let ncclRecv: PFN_ncclRecv
    let ncclAllReduce: PFN_ncclAllReduce
    let ncclAllGather: PFN_ncclAllGather
    /// Optional: NCCL 2.13 and later.
    let ncclGetLastError: PFN_ncclGetLastError?
    let ncclCommGetAsyncError: PFN_ncclCommGetAsyncError?

    /// The environment variable that names libnccl's path (or a folder holding it), tried first.
    public static let libraryEnvironmentVariable = "FUSED_MOE_NCCL"

    private static let loaded: Result<NCCL, CUDAError> = Result { () throws(CUDAError) in
        try NCCL(loader: NCCL.searchLoader())
    }

    /// The process's NCCL table, loaded on first use.
    ///
    /// Search order: `FUSED_MOE_NCCL`, the dynamic loader's `libnccl.so.2` (LD_LIBRARY_PATH,
    /// ld.so.cache), then the `nvidia/nccl/lib` folder of each Python site-packages, where
    /// `pip install nvidia-nccl-cu12` (or a PyTorch install) puts it.
    /// - Throws: `CUDAError` of domain `.library` listing every place tried, or naming a missing symbol.
    public static func shared() throws(CUDAError) -> NCCL {
        try loaded.get()
    }

    /// Whether NCCL can be loaded here, without throwing.
    public static var isAvailable: Bool {
        (try? shared()) != nil
    }

    /// The places NCCL is looked for; `environmentVariable` is a parameter so tests can point it
    /// at a variable that is certainly unset.
    static func searchLoader(environmentVariable: String = libraryEnvironmentVariable) -> LibraryLoader {
        var folders: [String] = []
        if let home = environment("NCCL_HOME"), !home.isEmpty { folders.append(home + "/lib") }
        return LibraryLoader(
            what:
                "NCCL (libnccl), NVIDIA's collective communication library; `pip install nvidia-nccl-cu12` provides it",
            environmentVariable: environmentVariable,
            fileNames: ["libnccl.so.2", "libnccl.so"],
            folders: folders,
            fallbackFolders: pythonSitePackages().map { $0 + "/nvidia/nccl/lib" })
    }

    init(loader: LibraryLoader) throws(CUDAError) {
        let opened = try loader.open()
        let handle = opened.handle
        func load<F>(_ names: String...) throws(CUDAError) -> F {
            try LibraryLoader.symbol(handle, names, as: F.self, library: opened.path)
        }
        ncclGetVersion = try load("ncclGetVersion")
        ncclGetUniqueId = try load("ncclGetUniqueId")
        ncclCommInitRank = try load("ncclCommInitRank")
        ncclCommDestroy = try load("ncclCommDestroy")
        ncclCommAbort = try load("ncclCommAbort")
        ncclGetErrorString = try load("ncclGetErrorString")
        ncclGroupStart = try load("ncclGroupStart")
        ncclGroupEnd = try load("ncclGroupEnd")
        ncclSend = try load("ncclSend")
        ncclRecv = try load("ncclRecv")
        ncclAllReduce = try load("ncclAllReduce")
        ncclAllGather = try load("ncclAllGather")
        ncclGetLastError = try? LibraryLoader.symbol(
            handle, ["ncclGetLastError"], as: PFN_ncclGetLastError.self, library: opened.path)
        ncclCommGetAsyncError = try? LibraryLoader.symbol(
            handle, ["ncclCommGetAsyncError"], as: PFN_ncclCommGetAsyncError.self, library: opened.path)
        // The loader's dladdr probe knows only CUDA's symbols: ask where ncclGetVersion lives.
        if let symbol = dlsym(handle, "ncclGetVersion"), let path = ccuda_path_of_symbol(symbol) {
            libraryPath = String(cString: path)
        } else {
            libraryPath = opened.path
        }
        var code: Int32 = 0
        version = ncclGetVersion(&code) == 0 ? code : 0
    }

    /// The version as "2.21.5".
    public var versionString: String {
        NCCL.versionString(code: Int(version))
    }

    /// Decodes `NCCL_VERSION_CODE`: X * 1000 + Y * 100 + Z up to 2.8, X * 10000 + Y * 100 + Z after.
    static func versionString(code: Int) -> String {
        if code >= 10000 {
            return "\(code / 10000).\((code % 10000) / 100).\(code % 100)"
        }
        return "\(code / 1000).\((code % 1000) / 100).\(code % 100)"
    }

    /// A fresh id for a new communicator (`ncclGetUniqueId`). The process that makes it hosts the
    /// communicator's bootstrap root, so it must live until every rank has joined.
    /// - Throws: `CUDAError` when NCCL fails (no network interface it can use, for example).
    public func makeUniqueID() throws(CUDAError) -> NCCLUniqueID {
        var raw = ncclUniqueId()
        try check(ncclGetUniqueId(&raw), "ncclGetUniqueId")
        return NCCLUniqueID(raw: raw)
    }

    /// Fuses the NCCL calls `body` makes into one operation (`ncclGroupStart` / `ncclGroupEnd`):
    /// required for sends and receives between several peers to progress together. The group is
    /// ended even when `body` throws.
    public func group(_ body: () throws(CUDAError) -> Void) throws(CUDAError) {
        try check(ncclGroupStart(), "ncclGroupStart")
        do {
            try body()
        } catch {
            _ = ncclGroupEnd()
            throw error
        }
        try check(ncclGroupEnd(), "ncclGroupEnd")
    }

    /// Throws unless `result` is `ncclSuccess`.
    @inline(__always)
    func check(_ result: ncclResult_t, _ call: String, communicator: ncclComm_t? = nil) throws(CUDAError) {
        if result != 0 { throw error(result, call: call, communicator: communicator) }
    }

    /// The error for a failed NCCL call, with NCCL's name and description of the code.
    func error(_ result: ncclResult_t, call: String, communicator: ncclComm_t? = nil) -> CUDAError {
        var message =
            "\(NCCL.resultName(result)): " + (ncclGetErrorString(result).map { String(cString: $0) } ?? "unknown")
        if let ncclGetLastError, let last = ncclGetLastError(communicator), last.pointee != 0 {
            message += " (\(String(cString: last)))"
        }
        if result == CNCCL_SYSTEM_ERROR || result == CNCCL_REMOTE_ERROR || result == CNCCL_INTERNAL_ERROR {
            message += "; run with NCCL_DEBUG=WARN (or INFO) for NCCL's own account"
        }
        return NCCL.callError(result, call: call, message: message)
    }

    /// `CUDAError(domain: .nccl, code: result, name: "ncclInvalidUsage", ...)`.
    static func callError(_ result: ncclResult_t, call: String, message: String) -> CUDAError {
        CUDAError(domain: .nccl, code: result, name: resultName(result), call: call, message: message)
    }

    /// The `ncclResult_t` enumerator's name.
    static func resultName(_ result: ncclResult_t) -> String {
        let names = [
            "ncclSuccess", "ncclUnhandledCudaError", "ncclSystemError", "ncclInternalError", "ncclInvalidArgument",
            "ncclInvalidUsage", "ncclRemoteError", "ncclInProgress", "ncclTimeout",
        ]
        return result >= 0 && Int(result) < names.count ? names[Int(result)] : "ncclResult(\(result))"
    }
}

/// The element types NCCL moves (`ncclDataType_t`). Sends and receives only copy bytes, so the
/// type matters for reductions; byte counts travel as `.int8`.
public enum NCCLDataType: Int32, Sendable, CaseIterable {
    case int8 = 0
    case int32 = 2
    case float16 = 6
    case float32 = 7
    case bfloat16 = 9

    public var byteCount: Int {
        switch self {
        case .int8: 1
        case .float16, .bfloat16: 2
        case .int32, .float32: 4
        }
    }
}

/// The 128 bytes that name one communicator (`ncclUniqueId`), made by one process and read by every
/// rank. It travels as a file of 256 hex digits: the launcher writes it, the ranks read it, with no
/// socket of our own (NCCL's bootstrap makes its own connections from what the id holds).
public struct NCCLUniqueID: Hashable, Sendable {
    public static let byteCount = Int(CNCCL_UNIQUE_ID_BYTES)
    /// The size of the C struct handed to `ncclCommInitRank`, which must be NCCL's 128.
    static let cStructSize = MemoryLayout<ncclUniqueId>.size
    public let bytes: [UInt8]

    /// - Throws: `CUDAError` of domain `.usage` unless there are exactly 128 bytes.
    public init(bytes: [UInt8]) throws(CUDAError) {
        guard bytes.count == NCCLUniqueID.byteCount else {
            throw .usage("NCCLUniqueID", "an NCCL unique id is \(NCCLUniqueID.byteCount) bytes, got \(bytes.count)")
        }
        self.bytes = bytes
    }

    init(raw: ncclUniqueId) {
        var copy = raw
        bytes = withUnsafeBytes(of: &copy) { Array($0) }
    }

    var raw: ncclUniqueId {
        var raw = ncclUniqueId()
        withUnsafeMutableBytes(of: &raw) { destination in
            for index in 0..<NCCLUniqueID.byteCount { destination[index] = bytes[index] }
        }
        return raw
    }

    /// The id as 256 lowercase hex digits.
    public var hex: String {
        let digits = Array("0123456789abcdef".utf8)
        var text: [UInt8] = []
        text.reserveCapacity(2 * bytes.count)
        for byte in bytes {
            text.append(digits[Int(byte >> 4)])
            text.append(digits[Int(byte & 15)])
        }
        return String(decoding: text, as: UTF8.self)
    }

    /// Parses 256 hex digits (surrounding white space ignored).
    /// - Throws: `CUDAError` of domain `.usage` for anything else.
    public init(hex: String) throws(CUDAError) {
        let text = Array(hex.utf8).filter { $0 != 0x20 && $0 != 0x0A && $0 != 0x0D && $0 != 0x09 }
        func value(_ digit: UInt8) -> UInt8? {
            switch digit {
            case 0x30...0x39: digit - 0x30
            case 0x61...0x66: digit - 0x61 + 10
            case 0x41...0x46: digit - 0x41 + 10
            default: nil
            }
        }
        guard text.count == 2 * NCCLUniqueID.byteCount else {
            throw .usage(
                "NCCLUniqueID(hex:)", "expected \(2 * NCCLUniqueID.byteCount) hex digits, got \(text.count) characters")
        }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(NCCLUniqueID.byteCount)
        for index in stride(from: 0, to: text.count, by: 2) {
            guard let high = value(text[index]), let low = value(text[index + 1]) else {
                throw .usage("NCCLUniqueID(hex:)", "character \(index) of the id is not a hex digit")
            }
            bytes.append(high << 4 | low)
        }
        try self.init(bytes: bytes)
    }

    /// Writes the id to `path` atomically (a temporary file in the same folder, then `rename`), so a
    /// rank polling for the file never reads half of it.
    /// - Throws: `CUDAError` of domain `.usage` naming the path and the system's reason.
    public func write(toFile path: String) throws(CUDAError) {
        let temporary = path + ".tmp.\(getpid())"
        let descriptor = open(temporary, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        guard descriptor >= 0 else { throw NCCLUniqueID.fileError("open", temporary) }
        var text = hex + "\n"
        let written = text.withUTF8 { posixWrite(descriptor, $0.baseAddress, $0.count) }
        let closed = close(descriptor)
        guard written == 2 * NCCLUniqueID.byteCount + 1, closed == 0 else {
            unlink(temporary)
            throw NCCLUniqueID.fileError("write", temporary)
        }
        guard rename(temporary, path) == 0 else {
            unlink(temporary)
            throw NCCLUniqueID.fileError("rename", path)
        }
    }

    /// Reads an id from `path`, waiting up to `timeoutSeconds` for the file to appear (rank 0 or
    /// the launcher may still be writing it).
    /// - Throws: `CUDAError` of domain `.usage` when the file does not appear in time or is not an id.
    public static func read(fromFile path: String, timeoutSeconds: Double = 120) throws(CUDAError) -> NCCLUniqueID {
        let deadline = monotonicSeconds() + timeoutSeconds
        while true {
            if let text = readSmallFile(path) {
                return try NCCLUniqueID(hex: text)
            }
            guard monotonicSeconds() < deadline else {
                throw .usage(
                    "NCCLUniqueID.read",
                    "no NCCL id file at '\(path)' after \(Int(timeoutSeconds)) s: is rank 0 (or the launcher) running?")
            }
            usleep(10_000)
        }
    }

    private static func fileError(_ call: String, _ path: String) -> CUDAError {
        .usage("NCCLUniqueID", "\(call) '\(path)' failed: \(String(cString: strerror(errno)))")
    }

    private static func readSmallFile(_ path: String) -> String? {
        let descriptor = open(path, O_RDONLY)
        guard descriptor >= 0 else { return nil }
        defer { close(descriptor) }
        var buffer = [UInt8](repeating: 0, count: 1024)
        var count = 0
        while count < buffer.count {
            let read = buffer.withUnsafeMutableBytes {
                posixRead(descriptor, $0.baseAddress! + count, $0.count - count)
            }
            if read <= 0 { break }
            count += read
        }
        return String(decoding: buffer[0..<count], as: UTF8.self)
    }

    private static func monotonicSeconds() -> Double {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return Double(time.tv_sec) + Double(time.tv_nsec) * 1e-9
    }
}

/// One rank's handle on an NCCL communicator (`ncclComm_t`), destroyed with `ncclCommDestroy` when
/// the object goes away (or aborted with `abort()` first).
///
/// One process drives one GPU: the communicator is bound to `device`, whose context is made current
/// before `ncclCommInitRank` (NCCL takes the current device as its own).
public final class NCCLCommunicator: @unchecked Sendable {
    public let nccl: NCCL
    public let device: Device
    /// This process's rank, 0..<size.
    public let rank: Int
    /// The number of ranks.
    public let size: Int
    let handle: ncclComm_t
    private var released = false

    /// Joins the communicator named by `id` as `rank` of `size` (`ncclCommInitRank`); blocks until
    /// every rank has joined.
    /// - Throws: `CUDAError` of domain `.usage` for a rank out of range, `.library` when NCCL cannot
    ///   be loaded, or NCCL's error.
    public init(id: NCCLUniqueID, rank: Int, size: Int, device: Device, nccl given: NCCL? = nil) throws(CUDAError) {
        guard size >= 1, rank >= 0, rank < size else {
            throw .usage("NCCLCommunicator", "rank \(rank) of \(size): expected 0 <= rank < size")
        }
        let nccl: NCCL
        if let given { nccl = given } else { nccl = try NCCL.shared() }
        try device.makeCurrent()
        var communicator: ncclComm_t? = nil
        try nccl.check(nccl.ncclCommInitRank(&communicator, Int32(size), id.raw, Int32(rank)), "ncclCommInitRank")
        guard let communicator else { throw .usage("ncclCommInitRank", "NCCL returned no communicator") }
        self.nccl = nccl
        self.device = device
        self.rank = rank
        self.size = size
        self.handle = communicator
    }

    deinit {
        if !released { _ = nccl.ncclCommDestroy(handle) }
    }

    /// Tears the communicator down without waiting for work in flight (`ncclCommAbort`): the way out
    /// when another rank has failed and a collective would never finish. The object is unusable after.
    public func abort() {
        guard !released else { return }
        released = true
        _ = nccl.ncclCommAbort(handle)
    }

    private func usable(_ call: String) throws(CUDAError) {
        if released { throw .usage(call, "the communicator was aborted") }
    }

    private static func raw(_ pointer: DevicePointer) -> UnsafeMutableRawPointer? {
        UnsafeMutableRawPointer(bitPattern: UInt(pointer.address))
    }

    /// Enqueues sending `count` elements at `pointer` to rank `peer` on `stream` (`ncclSend`). Between
    /// several peers, call it inside `group { }` so the transfers progress together.
    public func send(_ pointer: DevicePointer, count: Int, type: NCCLDataType, to peer: Int, on stream: Stream)
        throws(CUDAError)
    {
        try usable("ncclSend")
        guard peer >= 0, peer < size, count >= 0 else {
            throw .usage("ncclSend", "peer \(peer) of \(size) ranks, count \(count): out of range")
        }
        try nccl.check(
            nccl.ncclSend(NCCLCommunicator.raw(pointer), count, type.rawValue, Int32(peer), handle, stream.handle),
            "ncclSend", communicator: handle)
    }

    /// Enqueues receiving `count` elements from rank `peer` into `pointer` on `stream` (`ncclRecv`).
    public func receive(_ pointer: DevicePointer, count: Int, type: NCCLDataType, from peer: Int, on stream: Stream)
        throws(CUDAError)
    {
        try usable("ncclRecv")
        guard peer >= 0, peer < size, count >= 0 else {
            throw .usage("ncclRecv", "peer \(peer) of \(size) ranks, count \(count): out of range")
        }
        try nccl.check(
            nccl.ncclRecv(NCCLCommunicator.raw(pointer), count, type.rawValue, Int32(peer), handle, stream.handle),
            "ncclRecv", communicator: handle)
    }

    /// Gathers `count` elements from every rank: rank r's `send` lands at `receive + r * count`
    /// (`ncclAllGather`).
    public func allGather(
        send: DevicePointer, receive: DevicePointer, count: Int, type: NCCLDataType, on stream: Stream
    ) throws(CUDAError) {
        try usable("ncclAllGather")
        try nccl.check(
            nccl.ncclAllGather(
                NCCLCommunicator.raw(send), NCCLCommunicator.raw(receive), count, type.rawValue, handle, stream.handle),
            "ncclAllGather", communicator: handle)
    }

    /// Sums `count` elements over all ranks into every rank's `receive` (`ncclAllReduce` with `ncclSum`).
    public func allReduceSum(
        send: DevicePointer, receive: DevicePointer, count: Int, type: NCCLDataType, on stream: Stream
    ) throws(CUDAError) {
        try usable("ncclAllReduce")
        try nccl.check(
            nccl.ncclAllReduce(
                NCCLCommunicator.raw(send), NCCLCommunicator.raw(receive), count, type.rawValue, Int32(CNCCL_SUM),
                handle,
                stream.handle),
            "ncclAllReduce", communicator: handle)
    }

    /// Fuses the calls `body` makes (`ncclGroupStart` / `ncclGroupEnd`); see `NCCL.group`.
    public func group(_ body: () throws(CUDAError) -> Void) throws(CUDAError) {
        try usable("ncclGroupStart")
        try nccl.group(body)
    }

    /// Throws the communicator's asynchronous error, if it has one (`ncclCommGetAsyncError`):
    /// a peer that died, a network failure. Without that symbol (NCCL before 2.4) it never throws.
    public func checkAsyncError() throws(CUDAError) {
        try usable("ncclCommGetAsyncError")
        guard let getAsyncError = nccl.ncclCommGetAsyncError else { return }
        var asyncError: ncclResult_t = 0
        try nccl.check(getAsyncError(handle, &asyncError), "ncclCommGetAsyncError", communicator: handle)
        try nccl.check(asyncError, "NCCL (asynchronous)", communicator: handle)
    }
}

// `write` and `read` at file scope: inside `NCCLUniqueID` the methods of those names would shadow them.
private func posixWrite(_ descriptor: Int32, _ bytes: UnsafeRawPointer?, _ count: Int) -> Int {
    write(descriptor, bytes, count)
}

private func posixRead(_ descriptor: Int32, _ bytes: UnsafeMutableRawPointer?, _ count: Int) -> Int {
    read(descriptor, bytes, count)
}
