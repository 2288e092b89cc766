import CUDA

/// The one entry point that computes a layer from host tensors, on either backend.
///
/// A `FusedMoE` holds the weights (uploaded once for the GPU), the options and the backend.
/// `forward` takes activations and routing (or router logits) and returns the output. This is the
/// convenient path (each call uploads inputs and downloads the output); serving code that keeps
/// tensors on the GPU uses `CUDAMoELayer.forward` on device pointers and a stream instead.
public final class FusedMoE<T: MoEScalar>: @unchecked Sendable {
    public enum Backend {
        case cpu
        case cuda(KernelLibrary)
    }

    public let weights: MoEWeights<T>
    public let options: MoEOptions
    public let backend: Backend
    private let deviceWeights: (w1: DeviceBuffer, w2: DeviceBuffer)?

    /// - Throws: `MoEError.invalidArgument` for bad options, `.unsupported` for fp32 on the GPU,
    ///   `.cuda` when the weights cannot be uploaded.
    public init(weights: MoEWeights<T>, options: MoEOptions = MoEOptions(), backend: Backend) throws(MoEError) {
        try options.validate(localExperts: weights.shape.experts)
        self.weights = weights
        self.options = options
        self.backend = backend
        switch backend {
        case .cpu:
            deviceWeights = nil
        case .cuda(let library):
            guard T.dtype != .fp32 else { throw .unsupported("the CUDA backend runs bf16 and fp16; fp32 runs on the CPU backend") }
            do {
                let w1 = try DeviceBuffer(device: library.device, count: weights.w1.count, of: T.self)
                let w2 = try DeviceBuffer(device: library.device, count: weights.w2.count, of: T.self)
                try w1.upload(weights.w1.storage)
                try w2.upload(weights.w2.storage)
                deviceWeights = (w1, w2)
            } catch {
                throw .cuda(error)
            }
        }
    }

    /// Routes `logits [M, E]` with softmax top-k (renormalized if the options say so), then runs
    /// the layer.
    public func forward<L: MoEScalar>(x: HostTensor<T>, logits: HostTensor<L>) throws(MoEError) -> HostTensor<T> {
        let routing = try Router.softmaxTopK(logits: logits, topK: weights.shape.topK, renormalize: options.renormalize)
        return try forward(x: x, routing: routing)
    }

    /// `out [M, H]` for `x [M, H]` and `routing` (`ids [M, k]` in `[0, E)` or -1, `weights [M, k]`).
    /// - Parameter plan: the GPU plan; nil chooses one from configs or the heuristic.
    /// - Throws: `MoEError.invalidArgument` naming the argument that is wrong, `.cuda` on GPU failure.
    public func forward(x: HostTensor<T>, routing: Routing, plan: MoEPlan? = nil) throws(MoEError) -> HostTensor<T> {
        switch backend {
        case .cpu:
            return try CPUBackend.forward(x: x, routing: routing, weights: weights, options: options)
        case .cuda(let library):
            try CPUBackend.validate(x: x, routing: routing, weights: weights, options: options)
            let shape = weights.shape
            let tokens = x.shape[0]
            if tokens == 0 { return HostTensor(shape: [0, shape.hidden], repeating: T(0)) }
            let device = library.device
            let properties = device.properties
            let chosen: MoEPlan
            if let plan {
                chosen = plan
            } else {
                chosen = try PlanSelector.plan(
                    shape: shape, tokens: tokens, multiprocessors: properties.multiprocessorCount,
                    sharedMemoryLimit: properties.sharedMemoryPerBlockOptIn, deviceName: properties.name,
                    architecture: properties.architecture)
            }
            guard let deviceWeights else { throw .unsupported("no weights on the GPU") }
            let layer = try CUDAMoELayer(
                library: library, shape: shape, dtype: T.dtype, w1: deviceWeights.w1, w2: deviceWeights.w2,
                options: options, plan: chosen, maxTokens: tokens)
            do {
                let stream = try Stream(device: device)
                let xBuffer = try DeviceBuffer(device: device, count: x.count, of: T.self)
                let ids = try DeviceBuffer(device: device, count: routing.ids.count, of: Int32.self)
                let routedWeights = try DeviceBuffer(device: device, count: routing.weights.count, of: Float.self)
                let out = try DeviceBuffer(device: device, count: tokens * shape.hidden, of: T.self)
                try xBuffer.upload(x.storage)
                try ids.upload(routing.ids)
                try routedWeights.upload(routing.weights)
                try layer.forward(
                    x: xBuffer.pointer, topkIDs: ids.pointer, topkWeights: routedWeights.pointer, out: out.pointer,
                    tokens: tokens, stream: stream)
                try stream.synchronize()
                return try HostTensor(
                    shape: [tokens, shape.hidden], storage: out.download(count: tokens * shape.hidden, as: T.self))
            } catch {
                throw MoEError(any: error)
            }
        }
    }
}
