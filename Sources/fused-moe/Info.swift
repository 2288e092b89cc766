import ArgumentParser
import CUDA
import FusedMoE

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Shows the CUDA driver, NVRTC, the GPUs with their properties, and the kernel cache.")

    func run() throws {
        print("swift-fused-moe")
        do {
            let driver = try Driver.shared()
            print("driver: CUDA \(driver.versionString) (\(driver.libraryPath))")
            let count = try Device.count()
            print("GPUs: \(count)")
            for ordinal in 0..<count {
                let properties = try Device(ordinal: ordinal).properties
                print("  [\(ordinal)] \(properties.name)")
                print("      compute capability \(properties.computeCapabilityMajor).\(properties.computeCapabilityMinor), target \(properties.architecture)")
                print("      multiprocessors \(properties.multiprocessorCount), max threads/block \(properties.maxThreadsPerBlock)")
                print("      shared memory: \(properties.sharedMemoryPerBlock / 1024) KiB/block, \(properties.sharedMemoryPerBlockOptIn / 1024) KiB/block opt-in, \(properties.sharedMemoryPerMultiprocessor / 1024) KiB/SM")
                print("      L2 \(properties.l2CacheBytes / (1 << 20)) MiB, memory \(properties.totalMemoryBytes / (1 << 30)) GiB, bus \(properties.memoryBusWidthBits) bits at \(properties.memoryClockKHz / 1000) MHz (theoretical \(format(properties.theoreticalBandwidth / 1e12, 2)) TB/s)")
            }
        } catch {
            print("driver: not available: \(error)")
        }
        do {
            let compiler = try NVRTC.shared()
            print("NVRTC: \(compiler.versionString) (\(compiler.libraryPath))")
        } catch {
            print("NVRTC: not available: \(error)")
        }
        let cache = KernelCache()
        let usage = cache.usage()
        print("kernel cache: \(cache.directory) (\(usage.entries) entries, \(format(Double(usage.bytes) / 1e6, 2)) MB; set \(KernelCache.directoryEnvironmentVariable) to move it)")
    }
}
