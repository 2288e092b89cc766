import CUDA

/// The end-to-end check of the CUDA layer: compile the probe kernel through NVRTC (or load it from
/// the cache), load it, run it on random data and compare with the host.
public enum ProbeCheck {
    public struct Outcome: Sendable {
        public var elements: Int
        public var maxAbsoluteError: Float
        public var compiled: Int
        public var loadedFromCache: Int
        public var registers: Int
        public var passed: Bool
    }

    /// Runs `y = a * x + y` on `elements` random floats and checks every element.
    /// - Throws: `CUDAError` from any CUDA call.
    public static func run(library: KernelLibrary, elements: Int = 1 << 20, seed: UInt64 = 1) throws(CUDAError) -> Outcome {
        let device = library.device
        let request = KernelLibrary.Request(source: .probe)
        let (compiledBefore, loadedBefore) = (library.cache.compiled, library.cache.loaded)
        let kernel = try library.kernel("moe_probe_axpy", in: request)
        let stream = try Stream(device: device)
        var generator = SplitMix64(seed: seed)
        let x = (0..<elements).map { _ in Float.random(in: -1..<1, using: &generator) }
        let y = (0..<elements).map { _ in Float.random(in: -1..<1, using: &generator) }
        let a: Float = 1.5
        let xBuffer = try DeviceBuffer(device: device, count: elements, of: Float.self)
        let yBuffer = try DeviceBuffer(device: device, count: elements, of: Float.self)
        try xBuffer.upload(x)
        try yBuffer.upload(y)
        try kernel.launch(
            grid: Dimensions(min((elements + 255) / 256, 4096)), block: Dimensions(256), on: stream,
            arguments: [a, xBuffer, yBuffer, Int64(elements)])
        try stream.synchronize()
        let result = try yBuffer.download(count: elements, as: Float.self)
        var maxError: Float = 0
        var passed = true
        for index in 0..<elements {
            let expected = a * x[index] + y[index]
            let error = abs(result[index] - expected)
            if !(error <= 1e-6 * max(1, abs(expected))) { passed = false }
            maxError = max(maxError, error.isNaN ? .infinity : error)
        }
        return Outcome(
            elements: elements, maxAbsoluteError: maxError, compiled: library.cache.compiled - compiledBefore,
            loadedFromCache: library.cache.loaded - loadedBefore, registers: try kernel.registersPerThread(),
            passed: passed)
    }
}
