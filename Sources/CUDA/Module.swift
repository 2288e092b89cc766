import CCUDA

/// A value that can be passed to a kernel by value: its bytes are copied into the launch's
/// parameter block.
public protocol KernelArgument {
    /// Size and alignment of the parameter in the kernel's signature.
    var kernelArgumentLayout: (size: Int, alignment: Int) { get }
    /// Writes the parameter's bytes at `destination` (which has the layout's size and alignment).
    func writeKernelArgument(to destination: UnsafeMutableRawPointer)
}

/// Plain values whose memory layout is the kernel parameter's.
public protocol TrivialKernelArgument: KernelArgument, BitwiseCopyable {}

extension TrivialKernelArgument {
    public var kernelArgumentLayout: (size: Int, alignment: Int) {
        (MemoryLayout<Self>.size, MemoryLayout<Self>.alignment)
    }
    public func writeKernelArgument(to destination: UnsafeMutableRawPointer) {
        destination.storeBytes(of: self, as: Self.self)
    }
}

extension Int32: TrivialKernelArgument {}
extension UInt32: TrivialKernelArgument {}
extension Int64: TrivialKernelArgument {}
extension UInt64: TrivialKernelArgument {}
extension Float: TrivialKernelArgument {}
extension DevicePointer: TrivialKernelArgument {}

extension Bool: KernelArgument {
    public var kernelArgumentLayout: (size: Int, alignment: Int) { (1, 1) }
    public func writeKernelArgument(to destination: UnsafeMutableRawPointer) {
        destination.storeBytes(of: self ? 1 : 0, as: UInt8.self)
    }
}

extension DeviceBuffer: KernelArgument {
    public var kernelArgumentLayout: (size: Int, alignment: Int) { (8, 8) }
    public func writeKernelArgument(to destination: UnsafeMutableRawPointer) {
        destination.storeBytes(of: address, as: UInt64.self)
    }
}

/// A loaded cubin (`cuModuleLoadData`), unloaded when the module goes away.
public final class Module: @unchecked Sendable {
    public let device: Device
    let handle: CUmodule

    /// Loads a cubin image into the device's context (`cuModuleLoadData`).
    public init(device: Device, cubin: [UInt8]) throws(CUDAError) {
        guard !cubin.isEmpty else { throw .usage("Module(cubin:)", "the cubin image is empty") }
        try device.makeCurrent()
        var module: CUmodule? = nil
        let result = cubin.withUnsafeBytes { device.driver.cuModuleLoadData(&module, $0.baseAddress) }
        try device.driver.check(result, "cuModuleLoadData")
        guard let module else { throw .usage("cuModuleLoadData", "the driver returned no module") }
        self.device = device
        self.handle = module
    }

    deinit {
        _ = device.driver.cuModuleUnload(handle)
    }

    /// Looks up a kernel by its (lowered, for templates) name (`cuModuleGetFunction`).
    public func kernel(named name: String) throws(CUDAError) -> Kernel {
        var function: CUfunction? = nil
        let result = device.driver.cuModuleGetFunction(&function, handle, name)
        if result != 0 {
            let error = device.driver.error(result, call: "cuModuleGetFunction")
            throw CUDAError(
                domain: .driver, code: error.code, name: error.name, call: error.call,
                message: "no kernel named \(name) in the module: \(error.message)")
        }
        guard let function else { throw .usage("cuModuleGetFunction", "the driver returned no function") }
        return Kernel(module: self, function: function, name: name)
    }
}

/// Launch geometry: three dimensions, each at least 1.
public struct Dimensions: Hashable, Sendable {
    public var x: Int
    public var y: Int
    public var z: Int
    public init(_ x: Int, _ y: Int = 1, _ z: Int = 1) {
        self.x = x
        self.y = y
        self.z = z
    }
}

/// One kernel of a loaded module.
public final class Kernel: @unchecked Sendable {
    public let module: Module
    public let name: String
    let function: CUfunction
    private var dynamicSharedLimit = 48 * 1024

    init(module: Module, function: CUfunction, name: String) {
        self.module = module
        self.function = function
        self.name = name
    }

    /// Registers per thread (`cuFuncGetAttribute(CU_FUNC_ATTRIBUTE_NUM_REGS)`).
    public func registersPerThread() throws(CUDAError) -> Int {
        try attribute(Int32(CCUDA_FUNC_ATTRIBUTE_NUM_REGS))
    }

    /// Local (spill and stack) bytes per thread (`CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES`).
    public func localBytesPerThread() throws(CUDAError) -> Int {
        try attribute(Int32(CCUDA_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES))
    }

    private func attribute(_ attribute: Int32) throws(CUDAError) -> Int {
        var value: Int32 = 0
        try module.device.driver.check(
            module.device.driver.cuFuncGetAttribute(&value, attribute, function), "cuFuncGetAttribute")
        return Int(value)
    }

    /// Raises the kernel's dynamic shared-memory limit (`cuFuncSetAttribute`,
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`); launches past 48 KB need it.
    public func setMaxDynamicSharedMemory(bytes: Int) throws(CUDAError) {
        let optIn = module.device.properties.sharedMemoryPerBlockOptIn
        guard bytes <= optIn else {
            throw .usage(
                "Kernel.setMaxDynamicSharedMemory",
                "\(name) asks for \(bytes) bytes of shared memory; this GPU allows \(optIn) per block")
        }
        try module.device.driver.check(
            module.device.driver.cuFuncSetAttribute(
                function, Int32(CCUDA_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), Int32(bytes)),
            "cuFuncSetAttribute")
        dynamicSharedLimit = bytes
    }

    /// Whether this driver can launch with programmatic stream serialization (`cuLaunchKernelEx`).
    public var supportsProgrammaticDependentLaunch: Bool { module.device.driver.cuLaunchKernelEx != nil }

    /// Enqueues the kernel on `stream` (`cuLaunchKernel`, or `cuLaunchKernelEx` with
    /// `programmaticDependentLaunch` or a cluster).
    ///
    /// The arguments are packed into a temporary parameter block with each one's size and alignment,
    /// and a `void*[]` pointing into it, both alive only for the call.
    ///
    /// With `programmaticDependentLaunch` (Hopper), the launch may begin while the previous kernel on
    /// the stream drains; the kernel must execute `griddepcontrol.wait` before touching memory the
    /// previous kernels wrote (every forward kernel of this package does so first).
    ///
    /// `clusterX` > 1 (Hopper) launches thread-block clusters of `clusterX x 1 x 1` blocks; `grid.x`
    /// must be a multiple of it.
    /// - Throws: `CUDAError` for an empty grid or block, a grid that the cluster does not divide, a
    ///   cluster without `cuLaunchKernelEx`, shared memory over the kernel's limit, or the driver's
    ///   launch error.
    public func launch(
        grid: Dimensions, block: Dimensions, sharedMemoryBytes: Int = 0, on stream: Stream,
        arguments: [any KernelArgument], programmaticDependentLaunch: Bool = false, clusterX: Int = 1
    ) throws(CUDAError) {
        guard grid.x >= 1, grid.y >= 1, grid.z >= 1, block.x >= 1, block.y >= 1, block.z >= 1 else {
            throw .usage("Kernel.launch", "\(name): grid \(grid) and block \(block) must be at least 1 in every dimension")
        }
        guard (1...8).contains(clusterX), grid.x % clusterX == 0 else {
            throw .usage("Kernel.launch", "\(name): cluster width \(clusterX) must be 1...8 and divide grid.x = \(grid.x)")
        }
        guard clusterX == 1 || module.device.driver.cuLaunchKernelEx != nil else {
            throw .usage("Kernel.launch", "\(name): a cluster launch needs cuLaunchKernelEx, which this driver lacks")
        }
        guard grid.x <= Int(Int32.max), grid.y <= 65535, grid.z <= 65535 else {
            throw .usage("Kernel.launch", "\(name): grid \(grid) exceeds the hardware limits (2^31-1, 65535, 65535)")
        }
        guard sharedMemoryBytes <= dynamicSharedLimit else {
            throw .usage(
                "Kernel.launch",
                "\(name) needs \(sharedMemoryBytes) bytes of dynamic shared memory; raise the limit with setMaxDynamicSharedMemory first")
        }
        var offsets: [Int] = []
        offsets.reserveCapacity(arguments.count)
        var total = 0
        for argument in arguments {
            let layout = argument.kernelArgumentLayout
            total = (total + layout.alignment - 1) / layout.alignment * layout.alignment
            offsets.append(total)
            total += layout.size
        }
        let driver = module.device.driver
        let result: CUresult = withUnsafeTemporaryAllocation(byteCount: max(total, 1), alignment: 64) {
            parameterBlock in
            withUnsafeTemporaryAllocation(of: UnsafeMutableRawPointer?.self, capacity: max(arguments.count, 1)) {
                pointers in
                let base = parameterBlock.baseAddress!
                for (index, argument) in arguments.enumerated() {
                    argument.writeKernelArgument(to: base + offsets[index])
                    pointers[index] = base + offsets[index]
                }
                if programmaticDependentLaunch || clusterX > 1, let launchEx = driver.cuLaunchKernelEx {
                    // At most two attributes, on the stack: launch runs on every forward.
                    return withUnsafeTemporaryAllocation(of: CCUDALaunchAttribute.self, capacity: 2) { attributes in
                        var count = 0
                        if programmaticDependentLaunch {
                            var attribute = CCUDALaunchAttribute()
                            attribute.id = Int32(CCUDA_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
                            attribute.value.programmaticStreamSerializationAllowed = 1
                            attributes.initializeElement(at: count, to: attribute)
                            count += 1
                        }
                        if clusterX > 1 {
                            var attribute = CCUDALaunchAttribute()
                            attribute.id = Int32(CCUDA_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION)
                            attribute.value.clusterDim.x = UInt32(clusterX)
                            attribute.value.clusterDim.y = 1
                            attribute.value.clusterDim.z = 1
                            attributes.initializeElement(at: count, to: attribute)
                            count += 1
                        }
                        var config = CCUDALaunchConfig(
                            gridDimX: UInt32(grid.x), gridDimY: UInt32(grid.y), gridDimZ: UInt32(grid.z),
                            blockDimX: UInt32(block.x), blockDimY: UInt32(block.y), blockDimZ: UInt32(block.z),
                            sharedMemBytes: UInt32(sharedMemoryBytes), hStream: stream.handle,
                            attrs: attributes.baseAddress, numAttrs: UInt32(count))
                        return launchEx(&config, function, pointers.baseAddress, nil)
                    }
                }
                return driver.cuLaunchKernel(
                    function, UInt32(grid.x), UInt32(grid.y), UInt32(grid.z),
                    UInt32(block.x), UInt32(block.y), UInt32(block.z), UInt32(sharedMemoryBytes), stream.handle,
                    pointers.baseAddress, nil)
            }
        }
        if result != 0 {
            let error = driver.error(result, call: "cuLaunchKernel")
            throw CUDAError(
                domain: .driver, code: error.code, name: error.name, call: error.call,
                message: "\(name) grid \(grid) block \(block) smem \(sharedMemoryBytes): \(error.message)")
        }
    }
}
