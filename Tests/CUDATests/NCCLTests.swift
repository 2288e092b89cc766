import Testing

@testable import CUDA

#if canImport(Glibc)
import Glibc
#endif

@Suite struct NCCLLoadingTests {
    @Test func missingNCCLIsALibraryErrorListingThePlacesTried() {
        // Where NCCL is installed it must load; elsewhere (this machine, CI) the error must say
        // where it looked. Never a crash.
        do {
            let nccl = try NCCL.shared()
            #expect(nccl.version > 0)
            #expect(nccl.versionString.hasPrefix("2."))
        } catch {
            #expect(error.domain == .library)
            #expect(error.message.contains("libnccl.so.2"))
            #expect(error.message.contains(NCCL.libraryEnvironmentVariable))
            #expect(!NCCL.isAvailable)
        }
    }

    @Test func searchIncludesPythonSitePackagesAfterTheLoader() throws {
        let loader = NCCL.searchLoader(environmentVariable: "FUSED_MOE_TEST_NCCL_UNSET")
        #expect(loader.fileNames.first == "libnccl.so.2")
        #expect(loader.fallbackFolders.allSatisfy { $0.hasSuffix("/nvidia/nccl/lib") })
        #expect(loader.fallbackFolders.count == pythonSitePackages().count)
        // With the variable unset and NCCL absent, every place is listed in the order tried.
        guard (try? loader.open()) == nil else { return }  // NCCL installed here: nothing to check
        do {
            _ = try loader.open()
        } catch {
            #expect(error.domain == .library)
            #expect(error.message.contains("FUSED_MOE_TEST_NCCL_UNSET"))
            for folder in loader.fallbackFolders { #expect(error.message.contains(folder + "/libnccl.so.2")) }
        }
    }

    @Test func versionCodesDecodeBothSchemes() {
        #expect(NCCL.versionString(code: 22105) == "2.21.5")
        #expect(NCCL.versionString(code: 2708) == "2.7.8")
        #expect(NCCL.versionString(code: 22703) == "2.27.3")
    }

    @Test func callErrorsNameTheResult() {
        let error = NCCL.callError(5, call: "ncclSend", message: "\(NCCL.resultName(5)): invalid usage")
        #expect(error.domain == .nccl)
        #expect(error.code == 5)
        #expect(error.name == "ncclInvalidUsage")
        #expect(error.description.contains("ncclSend"))
        #expect(error.description.contains("ncclInvalidUsage"))
        #expect(NCCL.resultName(42) == "ncclResult(42)")
    }

    @Test func dataTypesMatchNCCL() {
        #expect(NCCLDataType.int8.rawValue == 0)
        #expect(NCCLDataType.int32.rawValue == 2)
        #expect(NCCLDataType.float16.rawValue == 6)
        #expect(NCCLDataType.float32.rawValue == 7)
        #expect(NCCLDataType.bfloat16.rawValue == 9)
        #expect(NCCLDataType.allCases.map(\.byteCount) == [1, 4, 2, 4, 2])
    }
}

@Suite struct NCCLUniqueIDTests {
    static let bytes: [UInt8] = (0..<128).map { UInt8(($0 * 37 + 11) & 0xff) }

    @Test func hexRoundTrip() throws {
        let id = try NCCLUniqueID(bytes: Self.bytes)
        #expect(id.hex.count == 256)
        #expect(try NCCLUniqueID(hex: id.hex) == id)
        #expect(try NCCLUniqueID(hex: "  " + id.hex.uppercased() + "\n") == id)
        // The C struct carries the same bytes.
        #expect(NCCLUniqueID(raw: id.raw) == id)
        #expect(NCCLUniqueID.cStructSize == 128)
    }

    @Test func refusesWrongSizesAndDigits() {
        #expect(throws: CUDAError.self) { try NCCLUniqueID(bytes: [1, 2, 3]) }
        #expect(throws: CUDAError.self) { try NCCLUniqueID(hex: "abc") }
        #expect(throws: CUDAError.self) { try NCCLUniqueID(hex: String(repeating: "g", count: 256)) }
    }

    @Test func fileExchange() throws {
        var template = Array("/tmp/nccl-id-test.XXXXXX".utf8CString)
        let folder = String(cString: try #require(mkdtemp(&template)))
        let path = folder + "/id"
        defer {
            unlink(path)
            rmdir(folder)
        }
        let id = try NCCLUniqueID(bytes: Self.bytes)
        try id.write(toFile: path)
        #expect(try NCCLUniqueID.read(fromFile: path, timeoutSeconds: 1) == id)
        // No temporary file is left behind.
        #expect(access(path + ".tmp.\(getpid())", F_OK) != 0)
    }

    @Test func missingFileTimesOutWithAMessage() {
        do {
            _ = try NCCLUniqueID.read(fromFile: "/nonexistent-folder/nccl-id", timeoutSeconds: 0.05)
            Issue.record("reading a missing id file must throw")
        } catch {
            #expect(error.domain == .usage)
            #expect(error.message.contains("/nonexistent-folder/nccl-id"))
        }
    }
}
