import CCUDA

/// The CUDA driver API, loaded with dlopen at first use.
///
/// Every driver call in the package goes through this one table (as swift-system routes every
/// syscall through one file), so a missing driver is an error at the first use, never a link failure.
public final class Driver: @unchecked Sendable {
    // Immutable after init; the function pointers are thread-safe C entry points.
    /// Where libcuda was found.
    public let libraryPath: String
    /// `cuDriverGetVersion`, as 1000 * major + 10 * minor (13000 for CUDA 13.0).
    public let version: Int32

    let cuInit: PFN_cuInit
    let cuDriverGetVersion: PFN_cuDriverGetVersion
    let cuGetErrorName: PFN_cuGetErrorName
    let cuGetErrorString: PFN_cuGetErrorString
    let cuDeviceGetCount: PFN_cuDeviceGetCount
    let cuDeviceGet: PFN_cuDeviceGet
    let cuDeviceGetName: PFN_cuDeviceGetName
    let cuDeviceGetAttribute: PFN_cuDeviceGetAttribute
    let cuDeviceTotalMem: PFN_cuDeviceTotalMem
    let cuDevicePrimaryCtxRetain: PFN_cuDevicePrimaryCtxRetain
    let cuDevicePrimaryCtxRelease: PFN_cuDevicePrimaryCtxRelease
    let cuCtxSetCurrent: PFN_cuCtxSetCurrent
    let cuCtxSynchronize: PFN_cuCtxSynchronize
    let cuMemGetInfo: PFN_cuMemGetInfo
    let cuMemAlloc: PFN_cuMemAlloc
    let cuMemFree: PFN_cuMemFree
    let cuMemcpyHtoD: PFN_cuMemcpyHtoD
    let cuMemcpyDtoH: PFN_cuMemcpyDtoH
    let cuMemcpyDtoDAsync: PFN_cuMemcpyDtoDAsync
    let cuMemsetD8Async: PFN_cuMemsetD8Async
    let cuMemsetD32Async: PFN_cuMemsetD32Async
    let cuStreamCreate: PFN_cuStreamCreate
    let cuStreamDestroy: PFN_cuStreamDestroy
    let cuStreamSynchronize: PFN_cuStreamSynchronize
    let cuEventCreate: PFN_cuEventCreate
    let cuEventDestroy: PFN_cuEventDestroy
    let cuEventRecord: PFN_cuEventRecord
    let cuEventSynchronize: PFN_cuEventSynchronize
    let cuEventElapsedTime: PFN_cuEventElapsedTime
    let cuModuleLoadData: PFN_cuModuleLoadData
    let cuModuleUnload: PFN_cuModuleUnload
    let cuModuleGetFunction: PFN_cuModuleGetFunction
    let cuFuncGetAttribute: PFN_cuFuncGetAttribute
    let cuFuncSetAttribute: PFN_cuFuncSetAttribute
    let cuLaunchKernel: PFN_cuLaunchKernel
    let cuStreamBeginCapture: PFN_cuStreamBeginCapture
    let cuStreamEndCapture: PFN_cuStreamEndCapture
    let cuGraphInstantiateWithFlags: PFN_cuGraphInstantiateWithFlags
    let cuGraphLaunch: PFN_cuGraphLaunch
    let cuGraphExecDestroy: PFN_cuGraphExecDestroy
    let cuGraphDestroy: PFN_cuGraphDestroy
    /// Optional (CUDA 12+): launches with attributes, for programmatic dependent launch.
    let cuLaunchKernelEx: PFN_cuLaunchKernelEx?
    /// Optional: drivers before CUDA 12 lack it; Hopper kernels that use TMA need it.
    let cuTensorMapEncodeTiled: PFN_cuTensorMapEncodeTiled?

    /// The environment variable that names libcuda's path, tried before any other place.
    public static let libraryEnvironmentVariable = "FUSED_MOE_CUDA_DRIVER"

    private static let loaded: Result<Driver, CUDAError> = Result { () throws(CUDAError) in try Driver() }

    /// The process's driver table, loaded and initialized (`cuInit(0)`) on first use.
    /// - Throws: `CUDAError` with domain `.library` when libcuda is not found (the message lists where
    ///   it looked), or `.driver` when `cuInit` fails (no GPU, driver/kernel mismatch).
    public static func shared() throws(CUDAError) -> Driver {
        try loaded.get()
    }

    private init() throws(CUDAError) {
        let loader = LibraryLoader(
            what: "the CUDA driver (libcuda)",
            environmentVariable: Driver.libraryEnvironmentVariable,
            fileNames: ["libcuda.so.1", "libcuda.so"],
            folders: [],
            fallbackFolders: ["/usr/local/nvidia/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib/wsl/lib"])
        let opened = try loader.open()
        libraryPath = opened.path
        let handle = opened.handle
        func load<F>(_ names: String...) throws(CUDAError) -> F {
            try LibraryLoader.symbol(handle, names, as: F.self, library: opened.path)
        }
        cuInit = try load("cuInit")
        cuDriverGetVersion = try load("cuDriverGetVersion")
        cuGetErrorName = try load("cuGetErrorName")
        cuGetErrorString = try load("cuGetErrorString")
        cuDeviceGetCount = try load("cuDeviceGetCount")
        cuDeviceGet = try load("cuDeviceGet")
        cuDeviceGetName = try load("cuDeviceGetName")
        cuDeviceGetAttribute = try load("cuDeviceGetAttribute")
        cuDeviceTotalMem = try load("cuDeviceTotalMem_v2", "cuDeviceTotalMem")
        cuDevicePrimaryCtxRetain = try load("cuDevicePrimaryCtxRetain")
        cuDevicePrimaryCtxRelease = try load("cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxRelease")
        cuCtxSetCurrent = try load("cuCtxSetCurrent")
        cuCtxSynchronize = try load("cuCtxSynchronize")
        cuMemGetInfo = try load("cuMemGetInfo_v2", "cuMemGetInfo")
        cuMemAlloc = try load("cuMemAlloc_v2", "cuMemAlloc")
        cuMemFree = try load("cuMemFree_v2", "cuMemFree")
        cuMemcpyHtoD = try load("cuMemcpyHtoD_v2", "cuMemcpyHtoD")
        cuMemcpyDtoH = try load("cuMemcpyDtoH_v2", "cuMemcpyDtoH")
        cuMemcpyDtoDAsync = try load("cuMemcpyDtoDAsync_v2", "cuMemcpyDtoDAsync")
        cuMemsetD8Async = try load("cuMemsetD8Async")
        cuMemsetD32Async = try load("cuMemsetD32Async")
        cuStreamCreate = try load("cuStreamCreate")
        cuStreamDestroy = try load("cuStreamDestroy_v2", "cuStreamDestroy")
        cuStreamSynchronize = try load("cuStreamSynchronize")
        cuEventCreate = try load("cuEventCreate")
        cuEventDestroy = try load("cuEventDestroy_v2", "cuEventDestroy")
        cuEventRecord = try load("cuEventRecord")
        cuEventSynchronize = try load("cuEventSynchronize")
        cuEventElapsedTime = try load("cuEventElapsedTime_v2", "cuEventElapsedTime")
        cuModuleLoadData = try load("cuModuleLoadData")
        cuModuleUnload = try load("cuModuleUnload")
        cuModuleGetFunction = try load("cuModuleGetFunction")
        cuFuncGetAttribute = try load("cuFuncGetAttribute")
        cuFuncSetAttribute = try load("cuFuncSetAttribute")
        cuLaunchKernel = try load("cuLaunchKernel")
        cuStreamBeginCapture = try load("cuStreamBeginCapture_v2", "cuStreamBeginCapture")
        cuStreamEndCapture = try load("cuStreamEndCapture")
        cuGraphInstantiateWithFlags = try load("cuGraphInstantiateWithFlags")
        cuGraphLaunch = try load("cuGraphLaunch")
        cuGraphExecDestroy = try load("cuGraphExecDestroy")
        cuGraphDestroy = try load("cuGraphDestroy")
        cuLaunchKernelEx = try? LibraryLoader.symbol(
            handle, ["cuLaunchKernelEx"], as: PFN_cuLaunchKernelEx.self, library: opened.path)
        cuTensorMapEncodeTiled = try? LibraryLoader.symbol(
            handle, ["cuTensorMapEncodeTiled"], as: PFN_cuTensorMapEncodeTiled.self, library: opened.path)

        var rawVersion: Int32 = 0
        version = cuDriverGetVersion(&rawVersion) == 0 ? rawVersion : 0
        try check(cuInit(0), "cuInit")
    }

    /// Throws a `CUDAError` carrying the result's name and description unless `result` is success.
    @inline(__always)
    func check(_ result: CUresult, _ call: StaticString) throws(CUDAError) {
        if result != 0 { throw error(result, call: "\(call)") }
    }

    /// Builds the error for a failed driver call, naming the code with `cuGetErrorName`.
    func error(_ result: CUresult, call: String) -> CUDAError {
        var namePointer: UnsafePointer<CChar>? = nil
        var textPointer: UnsafePointer<CChar>? = nil
        _ = cuGetErrorName(result, &namePointer)
        _ = cuGetErrorString(result, &textPointer)
        let name = namePointer.map { String(cString: $0) } ?? "CUDA_ERROR_UNKNOWN_CODE"
        var message = textPointer.map { String(cString: $0) } ?? "unrecognized CUresult"
        if result == 100 {
            message += " (is a GPU visible to this process? check CUDA_VISIBLE_DEVICES and nvidia-smi)"
        } else if result == 35 {
            message += " (the installed NVIDIA driver is older than this call requires)"
        }
        return CUDAError(domain: .driver, code: result, name: name, call: call, message: message)
    }

    /// Whether `cuLaunchKernelEx` (launch attributes, programmatic dependent launch) is available.
    public var cuLaunchKernelExAvailable: Bool { cuLaunchKernelEx != nil }

    /// The driver version as "13.0".
    public var versionString: String {
        "\(version / 1000).\((version % 1000) / 10)"
    }
}
