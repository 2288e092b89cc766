import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Compiled kernels cached on disk, so that a second run compiles nothing.
///
/// An entry's key is a SHA-256 of the source, the headers, the options (which name the
/// architecture), the name expressions and the NVRTC version. Entries are written to a temporary
/// file and renamed into place, so concurrent processes never see a half-written entry; each entry
/// carries a checksum of its contents, and a damaged one is detected, removed and rebuilt.
public final class KernelCache: @unchecked Sendable {
    /// The folder holding the entries.
    public let directory: String

    private let counters = Mutex<(compiled: Int, loaded: Int, rebuiltDamaged: Int)>((0, 0, 0))
    /// Programs this cache compiled in this process.
    public var compiled: Int { counters.withLock { $0.compiled } }
    /// Programs this cache loaded from disk in this process.
    public var loaded: Int { counters.withLock { $0.loaded } }
    /// Damaged entries this cache found, removed and rebuilt in this process.
    public var rebuiltDamaged: Int { counters.withLock { $0.rebuiltDamaged } }

    /// The environment variable that overrides the cache folder.
    public static let directoryEnvironmentVariable = "FUSED_MOE_CACHE_DIR"
    private static let magic: [UInt8] = Array("FMOEJIT1".utf8)
    private static let formatVersion = "swift-fused-moe kernel cache v1"

    /// `FUSED_MOE_CACHE_DIR`, else `$XDG_CACHE_HOME/swift-fused-moe`, else `~/.cache/swift-fused-moe`,
    /// else a folder under /tmp.
    public static var defaultDirectory: String {
        if let value = environment(directoryEnvironmentVariable), !value.isEmpty { return value }
        if let value = environment("XDG_CACHE_HOME"), !value.isEmpty { return value + "/swift-fused-moe" }
        if let home = environment("HOME"), !home.isEmpty { return home + "/.cache/swift-fused-moe" }
        return "/tmp/swift-fused-moe-cache"
    }

    public init(directory: String = KernelCache.defaultDirectory) {
        self.directory = directory
    }

    /// The number of entries and their total size in bytes.
    public func usage() -> (entries: Int, bytes: Int) {
        var entries = 0
        var bytes = 0
        for path in expandGlob(directory + "/*.cubin") {
            var status = stat()
            if stat(path, &status) == 0 {
                entries += 1
                bytes += Int(status.st_size)
            }
        }
        return (entries, bytes)
    }

    /// The key of a program: a hex SHA-256 over everything that changes the compiler's output.
    public static func key(
        source: String, headers: [SourceHeader], options: [String], nameExpressions: [String], compilerVersion: String
    ) -> String {
        var hasher = SHA256()
        hasher.updateField(formatVersion)
        hasher.updateField(compilerVersion)
        hasher.updateField(source)
        for header in headers {
            hasher.updateField(header.includeName)
            hasher.updateField(header.source)
        }
        hasher.updateField("options")
        options.forEach { hasher.updateField($0) }
        hasher.updateField("names")
        nameExpressions.forEach { hasher.updateField($0) }
        return SHA256.hex(hasher.finalize())
    }

    /// Returns the cached program for these inputs, compiling (and storing) it on a miss.
    /// - Throws: the compiler's `CUDAError` on a compile error. A cache folder that cannot be written
    ///   is not an error: the program is compiled and returned uncached.
    public func program(
        compiler: NVRTC, source: String, name: String, headers: [SourceHeader] = [], options: [String],
        nameExpressions: [String] = []
    ) throws(CUDAError) -> (program: CompiledProgram, fromCache: Bool) {
        let key = KernelCache.key(
            source: source, headers: headers, options: options, nameExpressions: nameExpressions,
            compilerVersion: compiler.versionString)
        let path = directory + "/" + key + ".cubin"
        if let bytes = readFile(path) {
            if let program = KernelCache.decode(bytes), Set(program.loweredNames.keys) == Set(nameExpressions) {
                counters.withLock { $0.loaded += 1 }
                return (program, true)
            }
            counters.withLock { $0.rebuiltDamaged += 1 }
            unlink(path)
        }
        let program = try compiler.compile(
            source: source, name: name, headers: headers, options: options, nameExpressions: nameExpressions)
        counters.withLock { $0.compiled += 1 }
        store(KernelCache.encode(program), at: path)
        return (program, false)
    }

    // MARK: - Entry format
    // magic(8) | u64 metadata length | metadata | u64 cubin length | cubin | sha256 of all before (32)
    // metadata: UTF-8 lines "name\u{1}lowered" joined by "\u{0}", then "\u{2}" and the compiler log.

    static func encode(_ program: CompiledProgram) -> [UInt8] {
        let names = program.loweredNames.sorted { $0.key < $1.key }.map { $0.key + "\u{1}" + $0.value }
        let metadata = Array((names.joined(separator: "\u{0}") + "\u{2}" + program.log).utf8)
        var bytes = magic
        appendLength(UInt64(metadata.count), to: &bytes)
        bytes += metadata
        appendLength(UInt64(program.cubin.count), to: &bytes)
        bytes += program.cubin
        bytes += SHA256.hash(bytes)
        return bytes
    }

    static func decode(_ bytes: [UInt8]) -> CompiledProgram? {
        guard bytes.count >= magic.count + 16 + 32, Array(bytes.prefix(magic.count)) == magic else { return nil }
        let body = bytes[0..<(bytes.count - 32)]
        guard SHA256.hash(body) == Array(bytes.suffix(32)) else { return nil }
        var offset = magic.count
        guard let metadataCount = readLength(bytes, &offset), offset + metadataCount <= body.count else { return nil }
        let metadata = String(decoding: bytes[offset..<(offset + metadataCount)], as: UTF8.self)
        offset += metadataCount
        guard let cubinCount = readLength(bytes, &offset), offset + cubinCount == body.count, cubinCount > 0 else {
            return nil
        }
        let cubin = Array(bytes[offset..<(offset + cubinCount)])
        let parts = metadata.split(separator: "\u{2}", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2 else { return nil }
        var lowered: [String: String] = [:]
        for entry in parts[0].split(separator: "\u{0}") {
            let pair = entry.split(separator: "\u{1}", maxSplits: 1, omittingEmptySubsequences: false)
            guard pair.count == 2 else { return nil }
            lowered[String(pair[0])] = String(pair[1])
        }
        return CompiledProgram(cubin: cubin, log: String(parts[1]), loweredNames: lowered)
    }

    private static func appendLength(_ value: UInt64, to bytes: inout [UInt8]) {
        for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: value >> UInt64(shift))) }
    }

    private static func readLength(_ bytes: [UInt8], _ offset: inout Int) -> Int? {
        guard offset + 8 <= bytes.count else { return nil }
        var value: UInt64 = 0
        for index in 0..<8 { value |= UInt64(bytes[offset + index]) << UInt64(8 * index) }
        offset += 8
        guard value < UInt64(Int.max) else { return nil }
        return Int(value)
    }

    // MARK: - Files

    private func store(_ bytes: [UInt8], at path: String) {
        guard makeDirectories(directory) else { return }
        var random = SystemRandomNumberGenerator()
        let temporary = directory + "/.tmp-\(getpid())-\(random.next() as UInt64)"
        guard writeFile(temporary, bytes) else {
            unlink(temporary)
            return
        }
        if rename(temporary, path) != 0 { unlink(temporary) }
    }
}

func readFile(_ path: String) -> [UInt8]? {
    let descriptor = open(path, O_RDONLY)
    guard descriptor >= 0 else { return nil }
    defer { close(descriptor) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let count = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
        if count < 0 { return nil }
        if count == 0 { break }
        bytes += chunk[0..<count]
    }
    return bytes
}

func writeFile(_ path: String, _ bytes: [UInt8]) -> Bool {
    let descriptor = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    guard descriptor >= 0 else { return false }
    defer { close(descriptor) }
    var written = 0
    while written < bytes.count {
        let count = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress! + written, bytes.count - written) }
        if count <= 0 { return false }
        written += count
    }
    return fsync(descriptor) == 0
}

func makeDirectories(_ path: String) -> Bool {
    if isDirectory(path) { return true }
    var prefix = path.hasPrefix("/") ? "" : "."
    for component in path.split(separator: "/") {
        prefix += "/" + component
        if !isDirectory(prefix) && mkdir(prefix, 0o755) != 0 && errno != EEXIST { return false }
    }
    return isDirectory(path)
}
