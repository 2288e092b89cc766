import CCUDA

/// The properties of one GPU that kernels and plans are sized from.
public struct DeviceProperties: Sendable, Hashable {
    public var ordinal: Int
    public var name: String
    public var computeCapability: (major: Int, minor: Int) {
        (computeCapabilityMajor, computeCapabilityMinor)
    }
    public var computeCapabilityMajor: Int
    public var computeCapabilityMinor: Int
    public var multiprocessorCount: Int
    public var maxThreadsPerBlock: Int
    public var sharedMemoryPerBlock: Int
    /// The most dynamic shared memory a block can have after raising its limit.
    public var sharedMemoryPerBlockOptIn: Int
    public var sharedMemoryPerMultiprocessor: Int
    public var registersPerBlock: Int
    public var l2CacheBytes: Int
    public var totalMemoryBytes: Int
    public var memoryClockKHz: Int
    public var memoryBusWidthBits: Int

    /// The NVRTC target for this GPU: the architecture-specific `sm_90a` on Hopper (wgmma, setmaxnreg
    /// need it), `sm_100a` on Blackwell, plain `sm_XY` elsewhere.
    public var architecture: String {
        let base = "sm_\(computeCapabilityMajor)\(computeCapabilityMinor)"
        return computeCapabilityMajor >= 9 && computeCapabilityMinor == 0 ? base + "a" : base
    }

    /// The theoretical DRAM bandwidth in bytes per second from clock and bus width (double data rate).
    public var theoreticalBandwidth: Double {
        2.0 * Double(memoryClockKHz) * 1000.0 * Double(memoryBusWidthBits) / 8.0
    }
}

/// One GPU and its primary context.
///
/// Creating a `Device` retains the device's primary context and makes it current on the calling
/// thread; the context is released when the last object holding the device (buffers, streams,
/// modules all do) goes away.
public final class Device: @unchecked Sendable {
    public let driver: Driver
    public let ordinal: Int
    public let properties: DeviceProperties
    let handle: CUdevice
    let context: CUcontext

    /// The number of GPUs the driver sees (`cuDeviceGetCount`).
    /// - Throws: `CUDAError` when the driver cannot be loaded or initialized.
    public static func count() throws(CUDAError) -> Int {
        let driver = try Driver.shared()
        var count: Int32 = 0
        try driver.check(driver.cuDeviceGetCount(&count), "cuDeviceGetCount")
        return Int(count)
    }

    /// Opens GPU `ordinal`: wraps `cuDeviceGet` and `cuDevicePrimaryCtxRetain`, then `cuCtxSetCurrent`.
    /// - Throws: `CUDAError` of domain `.usage` when the ordinal is out of range, or the driver's error.
    public init(ordinal: Int = 0) throws(CUDAError) {
        let driver = try Driver.shared()
        let count = try Device.count()
        guard ordinal >= 0 && ordinal < count else {
            throw .usage("Device(ordinal:)", "device ordinal \(ordinal) is out of range: this machine has \(count) GPU(s)")
        }
        var device: CUdevice = 0
        try driver.check(driver.cuDeviceGet(&device, Int32(ordinal)), "cuDeviceGet")
        var context: CUcontext? = nil
        try driver.check(driver.cuDevicePrimaryCtxRetain(&context, device), "cuDevicePrimaryCtxRetain")
        guard let context else {
            throw .usage("cuDevicePrimaryCtxRetain", "the driver returned no context")
        }
        try driver.check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
        self.driver = driver
        self.ordinal = ordinal
        self.handle = device
        self.context = context
        self.properties = try Device.readProperties(driver: driver, device: device, ordinal: ordinal)
    }

    deinit {
        _ = driver.cuDevicePrimaryCtxRelease(handle)
    }

    /// Makes this device's context current on the calling thread (`cuCtxSetCurrent`).
    public func makeCurrent() throws(CUDAError) {
        try driver.check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    }

    /// Waits for all work on the device (`cuCtxSynchronize`).
    public func synchronize() throws(CUDAError) {
        try driver.check(driver.cuCtxSynchronize(), "cuCtxSynchronize")
    }

    /// Free and total device memory in bytes (`cuMemGetInfo`).
    public func memoryInfo() throws(CUDAError) -> (free: Int, total: Int) {
        var free = 0
        var total = 0
        try driver.check(driver.cuMemGetInfo(&free, &total), "cuMemGetInfo")
        return (free, total)
    }

    private static func readProperties(driver: Driver, device: CUdevice, ordinal: Int) throws(CUDAError)
        -> DeviceProperties
    {
        func attribute(_ attribute: Int) throws(CUDAError) -> Int {
            var value: Int32 = 0
            try driver.check(driver.cuDeviceGetAttribute(&value, Int32(attribute), device), "cuDeviceGetAttribute")
            return Int(value)
        }
        var nameBuffer = [CChar](repeating: 0, count: 256)
        try driver.check(driver.cuDeviceGetName(&nameBuffer, 255, device), "cuDeviceGetName")
        let name = String(decoding: nameBuffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var totalBytes = 0
        try driver.check(driver.cuDeviceTotalMem(&totalBytes, device), "cuDeviceTotalMem")
        return DeviceProperties(
            ordinal: ordinal,
            name: name,
            computeCapabilityMajor: try attribute(Int(CCUDA_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)),
            computeCapabilityMinor: try attribute(Int(CCUDA_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)),
            multiprocessorCount: try attribute(Int(CCUDA_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)),
            maxThreadsPerBlock: try attribute(Int(CCUDA_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)),
            sharedMemoryPerBlock: try attribute(Int(CCUDA_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK)),
            sharedMemoryPerBlockOptIn: try attribute(
                Int(CCUDA_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)),
            sharedMemoryPerMultiprocessor: try attribute(
                Int(CCUDA_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)),
            registersPerBlock: try attribute(Int(CCUDA_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK)),
            l2CacheBytes: try attribute(Int(CCUDA_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)),
            totalMemoryBytes: totalBytes,
            memoryClockKHz: try attribute(Int(CCUDA_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)),
            memoryBusWidthBits: try attribute(Int(CCUDA_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)))
    }
}

extension DeviceProperties {
    public static func == (lhs: DeviceProperties, rhs: DeviceProperties) -> Bool {
        lhs.ordinal == rhs.ordinal && lhs.name == rhs.name
            && lhs.computeCapabilityMajor == rhs.computeCapabilityMajor
            && lhs.computeCapabilityMinor == rhs.computeCapabilityMinor
    }
    public func hash(into hasher: inout Hasher) {
        hasher.combine(ordinal)
        hasher.combine(name)
    }
}
