import Testing
@testable import CUDA

#if canImport(Glibc)
import Glibc
#endif

/// True when a GPU is visible; GPU tests are skipped (and say so) otherwise.
let gpuAvailable: Bool = ((try? Device.count()) ?? 0) > 0

@Suite struct SHA256Tests {
    @Test func knownVectors() {
        #expect(SHA256.hex(SHA256.hash(Array("".utf8))) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(SHA256.hex(SHA256.hash(Array("abc".utf8))) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        let long = Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)
        #expect(SHA256.hex(SHA256.hash(long)) == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
    }
}

@Suite struct CUDAErrorTests {
    @Test func descriptionNamesCallAndCode() {
        let error = CUDAError(domain: .driver, code: 2, name: "CUDA_ERROR_OUT_OF_MEMORY", call: "cuMemAlloc", message: "out of memory")
        #expect(error.description.contains("cuMemAlloc"))
        #expect(error.description.contains("CUDA_ERROR_OUT_OF_MEMORY"))
        #expect(error.description.contains("(2)"))
    }

    @Test func missingDriverIsAnErrorNotACrash() {
        // On a machine without libcuda this must throw a library error listing where it looked;
        // on a GPU machine it must load.
        do {
            let driver = try Driver.shared()
            #expect(driver.version > 0)
        } catch {
            #expect(error.domain == .library || error.domain == .driver)
            if error.domain == .library {
                #expect(error.message.contains("libcuda.so.1"))
                #expect(error.message.contains(Driver.libraryEnvironmentVariable))
            }
        }
    }

    @Test func loaderListsEveryPlaceTried() {
        let loader = LibraryLoader(
            what: "a library that does not exist", environmentVariable: "FUSED_MOE_TEST_NO_SUCH_VARIABLE",
            fileNames: ["libfused-moe-absent.so.7"], folders: ["/nonexistent-folder"], fallbackFolders: ["/also-absent"])
        #expect(throws: CUDAError.self) { try loader.open() }
        do {
            _ = try loader.open()
        } catch {
            #expect(error.domain == .library)
            #expect(error.message.contains("/nonexistent-folder/libfused-moe-absent.so.7"))
            #expect(error.message.contains("/also-absent/libfused-moe-absent.so.7"))
            #expect(error.message.contains("FUSED_MOE_TEST_NO_SUCH_VARIABLE"))
        }
    }
}

/// A fresh cache folder per test.
func temporaryDirectory() -> String {
    var template = Array("/tmp/fused-moe-test-XXXXXX".utf8CString)
    let path = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
    return String(cString: path!)
}

let probeSource = """
    template <int N> __global__ void scale(float* y) { y[threadIdx.x] *= N; }
    extern "C" __global__ void add_one(float* y) { y[threadIdx.x] += 1.0f; }
    """

@Suite struct KernelCacheTests {
    @Test func entriesRoundTripAndDetectDamage() {
        let program = CompiledProgram(cubin: [1, 2, 3, 4, 5], log: "ptxas info", loweredNames: ["f<1>": "_Z1fILi1EEvv"])
        let encoded = KernelCache.encode(program)
        #expect(KernelCache.decode(encoded) == program)
        for index in [0, 9, encoded.count / 2, encoded.count - 1] {
            var damaged = encoded
            damaged[index] ^= 0x40
            #expect(KernelCache.decode(damaged) == nil, "flipping byte \(index) must be detected")
        }
        #expect(KernelCache.decode(Array(encoded.dropLast())) == nil)
        #expect(KernelCache.decode([]) == nil)
    }

    @Test func keyDependsOnEveryInput() {
        let base = KernelCache.key(source: "a", headers: [], options: ["-arch=sm_90a"], nameExpressions: [], compilerVersion: "13.0")
        #expect(base != KernelCache.key(source: "b", headers: [], options: ["-arch=sm_90a"], nameExpressions: [], compilerVersion: "13.0"))
        #expect(base != KernelCache.key(source: "a", headers: [], options: ["-arch=sm_80"], nameExpressions: [], compilerVersion: "13.0"))
        #expect(base != KernelCache.key(source: "a", headers: [], options: ["-arch=sm_90a"], nameExpressions: ["f<1>"], compilerVersion: "13.0"))
        #expect(base != KernelCache.key(source: "a", headers: [], options: ["-arch=sm_90a"], nameExpressions: [], compilerVersion: "13.1"))
        #expect(base != KernelCache.key(source: "a", headers: [SourceHeader(includeName: "h", source: "")], options: ["-arch=sm_90a"], nameExpressions: [], compilerVersion: "13.0"))
    }
}

@Suite(.enabled(if: NVRTC.isAvailable, "NVRTC is not installed here (pip install nvidia-cuda-nvrtc)"))
struct NVRTCTests {
    @Test func compilesForHopperWithoutAGPU() throws {
        let compiler = try NVRTC.shared()
        let program = try compiler.compile(
            source: probeSource, name: "probe.cu", options: ["-arch=sm_90a", "--ptxas-options=-v"],
            nameExpressions: ["scale<3>"])
        #expect(program.cubin.count > 100)
        #expect(Array(program.cubin.prefix(4)) == [0x7F, 0x45, 0x4C, 0x46], "a cubin is an ELF file")
        #expect(program.loweredNames["scale<3>"]?.hasPrefix("_Z") == true)
        #expect(program.resourceReport.contains { $0.contains("registers") })
        #expect(!program.spills)
    }

    @Test func compileErrorCarriesTheLog() throws {
        let compiler = try NVRTC.shared()
        do {
            _ = try compiler.compile(source: "__global__ void broken() { undeclared_name = 1; }", name: "broken.cu", options: ["-arch=sm_90a"])
            Issue.record("a broken program compiled")
        } catch {
            #expect(error.domain == .nvrtc)
            #expect(error.message.contains("undeclared_name"))
            #expect(error.call.contains("broken.cu"))
        }
    }

    @Test func cacheCompilesOnceThenLoadsAndRebuildsDamage() throws {
        let compiler = try NVRTC.shared()
        let directory = temporaryDirectory() + "/nested/cache"
        let cache = KernelCache(directory: directory)
        let options = ["-arch=sm_90a"]
        let first = try cache.program(compiler: compiler, source: probeSource, name: "p.cu", options: options, nameExpressions: ["scale<2>"])
        #expect(!first.fromCache)
        let second = try cache.program(compiler: compiler, source: probeSource, name: "p.cu", options: options, nameExpressions: ["scale<2>"])
        #expect(second.fromCache)
        #expect(second.program == first.program)
        #expect(cache.compiled == 1 && cache.loaded == 1)
        #expect(cache.usage().entries == 1)

        // Damage the entry on disk: it must be detected and rebuilt, not loaded.
        let key = KernelCache.key(source: probeSource, headers: [], options: options, nameExpressions: ["scale<2>"], compilerVersion: compiler.versionString)
        let path = directory + "/" + key + ".cubin"
        var bytes = try #require(readFile(path))
        bytes[bytes.count / 2] ^= 0xFF
        #expect(writeFile(path, bytes))
        let third = try cache.program(compiler: compiler, source: probeSource, name: "p.cu", options: options, nameExpressions: ["scale<2>"])
        #expect(!third.fromCache)
        #expect(cache.rebuiltDamaged == 1)
        #expect(third.program.cubin == first.program.cubin)
        let fourth = try cache.program(compiler: compiler, source: probeSource, name: "p.cu", options: options, nameExpressions: ["scale<2>"])
        #expect(fourth.fromCache)
    }
}

@Suite(.enabled(if: gpuAvailable, "no GPU visible: device tests skipped"))
struct DeviceTests {
    @Test func buffersCopyAndKernelsRun() throws {
        let device = try Device(ordinal: 0)
        #expect(device.properties.multiprocessorCount > 0)
        let program = try NVRTC.shared().compile(
            source: probeSource, name: "probe.cu", options: ["-arch=\(device.properties.architecture)"])
        let module = try Module(device: device, cubin: program.cubin)
        let kernel = try module.kernel(named: "add_one")
        let stream = try Stream(device: device)
        let buffer = try DeviceBuffer(device: device, count: 64, of: Float.self)
        let values = (0..<64).map { Float($0) * 0.5 - 3 }
        try buffer.upload(values)
        try kernel.launch(grid: Dimensions(1), block: Dimensions(64), on: stream, arguments: [buffer])
        try stream.synchronize()
        #expect(try buffer.download(count: 64, as: Float.self) == values.map { $0 + 1 })
    }

    @Test func badRequestsAreErrors() throws {
        let device = try Device(ordinal: 0)
        #expect(throws: CUDAError.self) { try Device(ordinal: 1 << 20) }
        #expect(throws: CUDAError.self) { try DeviceBuffer(device: device, byteCount: -1) }
        let buffer = try DeviceBuffer(device: device, byteCount: 16)
        #expect(throws: CUDAError.self) { try buffer.upload([Float](repeating: 0, count: 5)) }
    }
}
