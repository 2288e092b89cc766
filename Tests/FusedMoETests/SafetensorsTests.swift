import Testing

@testable import FusedMoE

#if canImport(Glibc)
    import Glibc
#endif

/// A fresh folder from `mkdtemp`, removed with everything in it when released.
final class IOTestFolder {
    let path: String

    init() {
        var template = Array("/tmp/fused-moe-io-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(made != nil, "mkdtemp failed")
        path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    func file(_ name: String) -> String { path + "/" + name }

    /// Writes raw bytes (not atomically: the fixtures of malformed files).
    @discardableResult
    func write(_ bytes: [UInt8], to name: String) -> String {
        let target = file(name)
        let handle = fopen(target, "wb")!
        _ = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, handle) }
        fclose(handle)
        return target
    }

    @discardableResult
    func write(text: String, to name: String) -> String { write(Array(text.utf8), to: name) }

    /// The names in the folder.
    func listing() -> [String] { IOTestFolder.entries(path).map(\.name).sorted() }

    deinit { IOTestFolder.remove(path) }

    private static func entries(_ folder: String) -> [(name: String, isFolder: Bool)] {
        guard let directory = opendir(folder) else { return [] }
        defer { closedir(directory) }
        var found: [(String, Bool)] = []
        while let entry = readdir(directory) {
            let name = withUnsafePointer(to: &entry.pointee.d_name) {
                String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self))
            }
            if name != "." && name != ".." { found.append((name, entry.pointee.d_type == UInt8(DT_DIR))) }
        }
        return found
    }

    private static func remove(_ folder: String) {
        for (name, isFolder) in entries(folder) {
            if isFolder { remove(folder + "/" + name) } else { unlink(folder + "/" + name) }
        }
        rmdir(folder)
    }
}

/// The `MoEError` a throwing body threw, or nil (recording an issue for any other error).
func caughtError(_ body: () throws -> Void) -> MoEError? {
    do {
        try body()
        return nil
    } catch let error as MoEError {
        return error
    } catch {
        Issue.record("expected a MoEError, got \(error)")
        return nil
    }
}

/// A file laid out by hand: the declared header length (default: the header's), header, data.
func safetensorsBytes(header: String, data: [UInt8] = [], declaredLength: UInt64? = nil) -> [UInt8] {
    var length = (declaredLength ?? UInt64(header.utf8.count)).littleEndian
    return withUnsafeBytes(of: &length) { Array($0) } + Array(header.utf8) + data
}

func hexBytes(_ text: String) -> [UInt8] {
    var bytes: [UInt8] = []
    var index = text.startIndex
    while index < text.endIndex {
        let next = text.index(index, offsetBy: 2)
        bytes.append(UInt8(text[index..<next], radix: 16)!)
        index = next
    }
    return bytes
}

@Suite struct SafetensorsTests {
    @Test(arguments: SafetensorsDType.known)
    func everyDTypeRoundTrips(dtype: SafetensorsDType) throws {
        let folder = IOTestFolder()
        let size = try #require(dtype.byteCount)
        let shape = [2, 3, 5]
        let bytes = (0..<(30 * size)).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
        let tensors = [
            try SafetensorsTensor(name: "t", dtype: dtype, shape: shape, bytes: bytes),
            try SafetensorsTensor(name: "scalar", dtype: dtype, shape: [], bytes: Array(bytes.prefix(size))),
            try SafetensorsTensor(name: "empty", dtype: dtype, shape: [0, 4], bytes: []),
        ]
        let path = folder.file("round.safetensors")
        try SafetensorsFile.write(tensors, metadata: ["format": "pt", "note": "round trip"], to: path)
        let file = try SafetensorsFile(path: path)
        #expect(file.names == ["t", "scalar", "empty"])
        #expect(file.metadata == ["format": "pt", "note": "round trip"])
        for tensor in tensors {
            let info = try #require(file.info(tensor.name))
            #expect(info.dtype == dtype)
            #expect(info.shape == tensor.shape)
            #expect(try file.bytes(tensor.name) == tensor.bytes)
        }
        #expect(folder.listing() == ["round.safetensors"], "the temporary file must be renamed away")
    }

    @Test func typedTensorsRoundTrip() throws {
        let folder = IOTestFolder()
        var generator = SplitMix64(seed: 7)
        let bf16 = HostTensor<BFloat16>.random(shape: [3, 4], using: &generator)
        let fp16 = HostTensor<Float16>.random(shape: [4, 3], using: &generator)
        let fp32 = HostTensor<Float>.random(shape: [2, 2, 2], using: &generator)
        let i32 = try HostTensor<Int32>(shape: [5], storage: [0, -1, 7, .max, .min])
        let i64 = try HostTensor<Int64>(shape: [2, 2], storage: [3, -1, 1 << 31 - 1, -(1 << 31)])
        let path = folder.file("typed.safetensors")
        try SafetensorsFile.write(
            [
                SafetensorsTensor(name: "bf16", bf16), SafetensorsTensor(name: "fp16", fp16),
                SafetensorsTensor(name: "fp32", fp32), SafetensorsTensor(name: "i32", i32),
                SafetensorsTensor(name: "i64", i64),
            ], to: path)
        let file = try SafetensorsFile(path: path)
        #expect(file.info("bf16")?.dtype == .bf16)
        #expect(file.info("fp16")?.dtype == .f16)
        #expect(file.info("fp32")?.dtype == .f32)
        let readBF16 = try file.tensor("bf16", as: BFloat16.self)
        #expect(readBF16.shape == [3, 4] && readBF16.storage == bf16.storage)
        #expect(try file.tensor("fp16", as: Float16.self).storage == fp16.storage)
        #expect(try file.tensor("fp32", as: Float.self).storage == fp32.storage)
        #expect(try file.integers("i32").storage == i32.storage)
        let ids = try file.integers("i64")
        #expect(ids.shape == [2, 2] && ids.storage == i64.storage.map { Int32($0) })
    }

    @Test func floatTypesConvertOnRead() throws {
        let folder = IOTestFolder()
        let values: [Float] = [0, -0.0, 1, -2.5, 3.140625, 1e-3, 65504, 1e-8, 123456.78]
        let path = folder.file("floats.safetensors")
        let fp32 = try HostTensor(shape: [values.count], storage: values)
        let bf16 = try HostTensor(shape: [values.count], storage: values.map { BFloat16($0) })
        let fp16 = try HostTensor(shape: [values.count], storage: values.map { Float16($0) })
        try SafetensorsFile.write(
            [
                SafetensorsTensor(name: "f32", fp32), SafetensorsTensor(name: "bf16", bf16),
                SafetensorsTensor(name: "f16", fp16),
            ],
            to: path)
        let file = try SafetensorsFile(path: path)
        // Widening is exact; narrowing rounds as the type's own initializer does.
        #expect(try file.tensor("bf16", as: Float.self).storage == bf16.storage.map(\.floatValue))
        #expect(try file.tensor("f16", as: Float.self).storage == fp16.storage.map { Float($0) })
        #expect(try file.tensor("f32", as: BFloat16.self).storage == bf16.storage)
        #expect(try file.tensor("f32", as: Float16.self).storage == fp16.storage)
        #expect(try file.tensor("f16", as: BFloat16.self).storage == fp16.storage.map { BFloat16(Float($0)) })
        #expect(try file.tensor("bf16", as: Float16.self).storage == bf16.storage.map { Float16($0.floatValue) })
        // Integers are not floats.
        let error = caughtError { _ = try file.integers("f32") }
        #expect(
            error == .malformedFile(path, "tensor 'f32': dtype F32 cannot be read as integers; expected I32 or I64"))
    }

    @Test func slicesReadABox() throws {
        let folder = IOTestFolder()
        let values = (0..<60).map { Float($0) }
        let path = folder.file("box.safetensors")
        try SafetensorsFile.write(
            [SafetensorsTensor(name: "t", try HostTensor(shape: [3, 4, 5], storage: values))], to: path)
        let file = try SafetensorsFile(path: path)
        let box = try file.tensor("t", as: Float.self, slice: [1..<3, 0..<4, 2..<4])
        #expect(box.shape == [2, 4, 2])
        var expected: [Float] = []
        for a in 1..<3 { for b in 0..<4 { for c in 2..<4 { expected.append(Float(a * 20 + b * 5 + c)) } } }
        #expect(box.storage == expected)
        let bad = caughtError { _ = try file.tensor("t", as: Float.self, slice: [0..<3, 0..<5, 0..<5]) }
        guard case .invalidArgument("t", let message) = bad else {
            Issue.record("got \(String(describing: bad))")
            return
        }
        #expect(message.contains("dimension 1"))
    }

    @Test func headerIsPaddedToEightBytes() throws {
        let folder = IOTestFolder()
        for nameLength in 1...9 {
            let path = folder.file("pad\(nameLength).safetensors")
            let name = String(repeating: "n", count: nameLength)
            try SafetensorsFile.write(
                [try SafetensorsTensor(name: name, dtype: .u8, shape: [1], bytes: [42])], to: path)
            let file = try SafetensorsFile(path: path)
            #expect(try file.bytes(name) == [42])
            let header = try SafetensorsFile.header(
                for: [try SafetensorsTensor(name: name, dtype: .u8, shape: [1], bytes: [42])])
            #expect(header.count % 8 == 0)
            #expect(header.last == UInt8(ascii: " ") || header.last == UInt8(ascii: "}"))
        }
    }

    @Test func writingReplacesAnExistingFileAtomically() throws {
        let folder = IOTestFolder()
        let path = folder.write(text: "old contents", to: "out.safetensors")
        try SafetensorsFile.write([try SafetensorsTensor(name: "a", dtype: .i8, shape: [2], bytes: [1, 2])], to: path)
        #expect(try SafetensorsFile(path: path).bytes("a") == [1, 2])
        #expect(folder.listing() == ["out.safetensors"])
        let missingFolder = folder.file("no/such/folder/out.safetensors")
        let error = caughtError { try SafetensorsFile.write([], to: missingFolder) }
        guard case .invalidArgument(missingFolder, _) = error else {
            Issue.record("got \(String(describing: error))")
            return
        }
    }

    @Test func writerRejectsBadTensors() throws {
        #expect(
            caughtError { _ = try SafetensorsTensor(name: "a", dtype: .f32, shape: [2], bytes: [0, 0, 0]) }
                == .invalidArgument("a", "shape [2] of F32 needs 8 bytes, got 3"))
        let unknown = caughtError {
            _ = try SafetensorsTensor(name: "a", dtype: SafetensorsDType(rawValue: "F4"), shape: [], bytes: [])
        }
        guard case .invalidArgument("a", _) = unknown else {
            Issue.record("got \(String(describing: unknown))")
            return
        }
        let one = try SafetensorsTensor(name: "a", dtype: .u8, shape: [1], bytes: [1])
        #expect(
            caughtError { _ = try SafetensorsFile.header(for: [one, one]) }
                == .invalidArgument("a", "two tensors of this name; names must be unique"))
        var reserved = one
        reserved.name = "__metadata__"
        #expect(
            caughtError { _ = try SafetensorsFile.header(for: [reserved]) }
                == .invalidArgument("__metadata__", "the name is reserved for the header's metadata"))
    }

    /// A file written by the reference implementation (Python `safetensors.numpy.save`, 0.8.0):
    /// a = F32 [[1.5, -2, 3.25]], b = I64 [1, -2, 300], c = F16 [0.5, -1], d = I32 [7, 8], with
    /// tensors stored in a different order than the header lists them.
    static let referenceFile =
        "00010000000000007b225f5f6d657461646174615f5f223a7b22666f726d6174223a227074227d2c2262223a7b226474797065223a"
        + "22493634222c227368617065223a5b335d2c22646174615f6f666673657473223a5b302c32345d7d2c2261223a7b2264747970"
        + "65223a22463332222c227368617065223a5b312c335d2c22646174615f6f666673657473223a5b32342c33365d7d2c2264223a"
        + "7b226474797065223a22493332222c227368617065223a5b325d2c22646174615f6f666673657473223a5b33362c34345d7d2c"
        + "2263223a7b226474797065223a22463136222c227368617065223a5b325d2c22646174615f6f666673657473223a5b34342c34"
        + "385d7d7d2020200100000000000000feffffffffffffff2c010000000000000000c03f000000c00000504007000000080000000038"
        + "00bc"

    @Test func readsTheReferenceImplementationsFiles() throws {
        let folder = IOTestFolder()
        let file = try SafetensorsFile(
            path: folder.write(hexBytes(SafetensorsTests.referenceFile), to: "ref.safetensors"))
        #expect(file.names == ["b", "a", "d", "c"])
        #expect(file.metadata == ["format": "pt"])
        let a = try file.tensor("a", as: Float.self)
        #expect(a.shape == [1, 3] && a.storage == [1.5, -2, 3.25])
        #expect(try file.integers("b").storage == [1, -2, 300])
        #expect(try file.tensor("c", as: Float.self).storage == [0.5, -1])
        #expect(try file.integers("d").storage == [7, 8])
    }

    @Test func unknownDTypeIsAnErrorOnlyWhenRead() throws {
        let folder = IOTestFolder()
        let header =
            #"{"odd":{"dtype":"F4","shape":[4],"data_offsets":[0,2]},"#
            + #""ok":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}"#
        let path = folder.write(safetensorsBytes(header: header, data: [0xAB, 0xCD, 9]), to: "odd.safetensors")
        let file = try SafetensorsFile(path: path)
        #expect(file.info("odd")?.dtype.rawValue == "F4")
        #expect(file.info("odd")?.dtype.byteCount == nil)
        #expect(try file.bytes("ok") == [9])
        #expect(try file.bytes("odd") == [0xAB, 0xCD])
        #expect(
            caughtError { _ = try file.tensor("odd", as: Float.self) }
                == .malformedFile(
                    path, "tensor 'odd': an unknown dtype F4 cannot be read as fp32; expected BF16, F16 or F32"))
    }

    @Test func missingTensorIsNamed() throws {
        let folder = IOTestFolder()
        let path = folder.file("one.safetensors")
        try SafetensorsFile.write([try SafetensorsTensor(name: "a", dtype: .u8, shape: [1], bytes: [1])], to: path)
        let error = caughtError { _ = try SafetensorsFile(path: path).tensor("b", as: Float.self) }
        #expect(error == .invalidArgument("b", "no tensor of this name in '\(path)' (it holds a)"))
        let absent = folder.file("absent.safetensors")
        guard case .invalidArgument(absent, let message) = caughtError({ _ = try SafetensorsFile(path: absent) }) else {
            Issue.record("opening a missing file must name it")
            return
        }
        #expect(message.contains("No such file"))
    }

    /// Malformed files: (case, header, data, declared length, what the message must contain).
    static let malformed: [(String, String, [UInt8], UInt64?, String)] = [
        ("empty header", "", [], nil, "not valid JSON"),
        ("length past the file", "{}", [], 4096, "header length 4096 exceeds the file"),
        ("not JSON", "{\"a\": ", [], nil, "the header is not valid JSON"),
        ("not an object", "[1, 2]", [], nil, "must be a JSON object"),
        ("entry not an object", #"{"w":3}"#, [], nil, "tensor 'w': expected an object"),
        ("no dtype", #"{"w":{"shape":[1],"data_offsets":[0,4]}}"#, [0, 0, 0, 0], nil, "tensor 'w': 'dtype'"),
        (
            "shape not an array", #"{"w":{"dtype":"F32","shape":4,"data_offsets":[0,4]}}"#, [0, 0, 0, 0], nil,
            "tensor 'w': 'shape'"
        ),
        (
            "negative dimension", #"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, [0, 0, 0, 0], nil,
            "tensor 'w': 'shape' must hold non-negative"
        ),
        (
            "fractional dimension", #"{"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}"#, [0, 0, 0, 0], nil,
            "tensor 'w': 'shape'"
        ),
        (
            "one offset", #"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#, [0, 0, 0, 0], nil,
            "tensor 'w': 'data_offsets' must be"
        ),
        (
            "begin after end", #"{"w":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}}"#, [0, 0, 0, 0], nil,
            "tensor 'w': data_offsets [4, 2] must satisfy"
        ),
        (
            "past the data", #"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, [0, 0, 0, 0], nil,
            "tensor 'w': data_offsets [0, 8] run past the end of the data (4 bytes)"
        ),
        (
            "byte count", #"{"w":{"dtype":"BF16","shape":[3],"data_offsets":[0,4]}}"#, [0, 0, 0, 0], nil,
            "tensor 'w': shape [3] of BF16 needs 3 x 2 = 6 bytes but data_offsets [0, 4] hold 4"
        ),
        (
            "overlap",
            #"{"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},"#
                + #""b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#,
            [0, 0, 0, 0], nil, "tensor 'b': data_offsets 2..<4 overlap those of tensor 'a' 0..<3"
        ),
        (
            "listed twice",
            #"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"#
                + #""a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
            [0, 0], nil, "tensor 'a': listed twice"
        ),
        ("metadata not strings", #"{"__metadata__":{"n":1}}"#, [], nil, "__metadata__: value of 'n' must be a string"),
    ]

    @Test(arguments: 0..<malformed.count)
    func malformedHeadersAreReportedWithFileAndTensor(index: Int) throws {
        let (name, header, data, declared, expected) = SafetensorsTests.malformed[index]
        let folder = IOTestFolder()
        let path = folder.write(
            safetensorsBytes(header: header, data: data, declaredLength: declared), to: "bad.safetensors")
        let error = caughtError { _ = try SafetensorsFile(path: path) }
        guard case .malformedFile(let file, let message) = error else {
            Issue.record("\(name): expected malformedFile, got \(String(describing: error))")
            return
        }
        #expect(file == path, "\(name)")
        #expect(message.contains(expected), "\(name): \(message)")
    }

    @Test func tooShortFilesAreMalformed() throws {
        let folder = IOTestFolder()
        for count in [0, 1, 7] {
            let path = folder.write([UInt8](repeating: 0, count: count), to: "short\(count).safetensors")
            let error = caughtError { _ = try SafetensorsFile(path: path) }
            #expect(error == .malformedFile(path, "the file is \(count) bytes; expected an 8-byte header length first"))
        }
        let path = folder.write(safetensorsBytes(header: "{}", declaredLength: UInt64.max), to: "huge.safetensors")
        guard case .malformedFile(path, let message) = caughtError({ _ = try SafetensorsFile(path: path) }) else {
            Issue.record("a huge header length must be malformed")
            return
        }
        #expect(message.contains("exceeds the file"))
    }

    @Test func gapsBetweenTensorsAndZeroSizedTensorsAreAccepted() throws {
        let folder = IOTestFolder()
        let header =
            #"{"a":{"dtype":"U8","shape":[1],"data_offsets":[3,4]},"#
            + #""z":{"dtype":"F32","shape":[0],"data_offsets":[3,3]},"#
            + #""b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#
        let file = try SafetensorsFile(
            path: folder.write(safetensorsBytes(header: header, data: [1, 2, 0, 4]), to: "gap.safetensors"))
        #expect(try file.bytes("a") == [4])
        #expect(try file.bytes("b") == [1, 2])
        #expect(try file.tensor("z", as: Float.self).shape == [0])
    }
}
