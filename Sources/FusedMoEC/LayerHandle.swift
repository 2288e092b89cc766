import CUDA
import FusedMoE

/// What a `fused_moe_layer *` stands for: a layer's shape and options and, on a device, its
/// kernels for every batch size up to `max_tokens` and one scratch they share; or a router only.
///
/// Everything is made in `init` and never changes after, so any thread may use a handle without
/// a lock. `forward` and `route` check every argument before they touch the GPU.
final class LayerHandle: Sendable {
    /// One plan's layer, serving batches of up to `upTo` tokens (and more than the bucket before): a
    /// run of batch sizes that `PlanSelector.plan` gives one plan (`PlanSelector.planRuns`).
    struct Bucket: Sendable {
        let upTo: Int
        let layer: CUDAMoELayer
    }

    /// What lives on the GPU; absent for `FUSED_MOE_DEVICE_NONE`.
    struct GPU: Sendable {
        let device: Device
        /// Sorted by `upTo`; the last one's `upTo` is the layer's `max_tokens`. Empty for a router.
        let buckets: [Bucket]
        /// The buckets' intermediates, allocated once at the largest bucket's sizes: the header asks
        /// that a layer's forwards never run at the same time. Nil for a router.
        let scratch: CUDAMoELayer.SharedScratch?

        /// The distinct layers (plans) of the buckets, in bucket order.
        var layers: [CUDAMoELayer] {
            var seen: Set<ObjectIdentifier> = []
            return buckets.map(\.layer).filter { seen.insert(ObjectIdentifier($0)).inserted }
        }
        let routers: [DType: GPURouter]
    }

    let experts: Int
    let topK: Int
    /// H; 0 for a router.
    let hidden: Int
    /// I; 0 for a router.
    let intermediate: Int
    /// nil for a router.
    let dtype: DType?
    let routedExperts: Int
    let renormalize: Bool
    /// 0 for a router.
    let maxTokens: Int
    let deviceOrdinal: Int?
    let gpu: GPU?

    private init(
        experts: Int, topK: Int, hidden: Int, intermediate: Int, dtype: DType?, routedExperts: Int, renormalize: Bool,
        maxTokens: Int, deviceOrdinal: Int?, gpu: GPU?
    ) {
        self.experts = experts
        self.topK = topK
        self.hidden = hidden
        self.intermediate = intermediate
        self.dtype = dtype
        self.routedExperts = routedExperts
        self.renormalize = renormalize
        self.maxTokens = maxTokens
        self.deviceOrdinal = deviceOrdinal
        self.gpu = gpu
    }

    /// Device memory held for scratch: the shared intermediates once, and each bucket's own (align's
    /// outputs, counters).
    var scratchBytes: Int {
        (gpu?.scratch?.byteCount ?? 0) + (gpu?.layers.reduce(0) { $0 + $1.scratchBytes } ?? 0)
    }

    // MARK: - Making

    /// `fused_moe_layer_create` after its `out` check: arguments in the header's order, then the GPU.
    static func layer(
        experts: Int64, topK: Int64, hidden: Int64, intermediate: Int64, dtype code: CInt,
        options pointer: UnsafeRawPointer?
    ) throws(ABIError) -> LayerHandle {
        try Arguments.require(experts, in: 1...4096, "experts")
        try Arguments.require(topK, in: 1...Int64(Arguments.maximumTopK), "top_k")
        guard topK <= experts else { throw .invalid("top_k", "must be <= experts (\(experts)), got \(topK)") }
        try Arguments.require(hidden, in: 1...Int64(Arguments.maximumDimension), "hidden")
        guard hidden % 8 == 0 else { throw .invalid("hidden", "must be a multiple of 8 (16-byte rows), got \(hidden)") }
        try Arguments.require(intermediate, in: 1...Int64(Arguments.maximumDimension), "intermediate")
        guard intermediate % 8 == 0 else {
            throw .invalid("intermediate", "must be a multiple of 8 (16-byte rows), got \(intermediate)")
        }
        let dtype = try Arguments.dtype(code, "dtype", allowFP32: false)
        let options = try LayerOptions.read(pointer)
        let routed = options.expertMap?.count ?? Int(experts)
        guard routed <= Arguments.maximumRoutedExperts else {
            throw .invalid("experts", "the GPU router and align take at most 512 experts, got \(routed)")
        }
        guard Int(topK) <= routed else {
            throw .invalid("top_k", "must be <= the router's experts (expert_map_length = \(routed)), got \(topK)")
        }
        let shape: MoEShape
        do {
            shape = try MoEShape(
                experts: Int(experts), topK: Int(topK), hidden: Int(hidden), intermediate: Int(intermediate))
        } catch {
            throw ABIError(error)
        }
        let moeOptions = MoEOptions(
            activation: options.activation, renormalize: options.renormalize, expertMap: options.expertMap,
            combine: options.combine)
        do {
            try moeOptions.validate(localExperts: shape.experts)
        } catch {
            if case .invalidArgument(_, let message) = error { throw .invalid("options.expert_map", message) }
            throw ABIError(error)
        }

        var gpu: GPU? = nil
        if let ordinal = options.device {
            gpu = try makeGPU(ordinal: ordinal, shape: shape, dtype: dtype, options: options, moeOptions: moeOptions)
        }
        return LayerHandle(
            experts: shape.experts, topK: shape.topK, hidden: shape.hidden, intermediate: shape.intermediate,
            dtype: dtype, routedExperts: routed, renormalize: options.renormalize, maxTokens: options.maxTokens,
            deviceOrdinal: options.device, gpu: gpu)
    }

    /// `fused_moe_router_create` after its `out` check.
    static func router(numExperts: Int64, topK: Int64, renormalize: CInt, device: CInt) throws(ABIError)
        -> LayerHandle
    {
        try Arguments.require(numExperts, in: 1...Int64(Arguments.maximumRoutedExperts), "num_experts")
        try Arguments.require(topK, in: 1...min(numExperts, Int64(Arguments.maximumTopK)), "top_k")
        guard renormalize == 0 || renormalize == 1 else {
            throw .invalid("renormalize", "expected 0 or 1, got \(renormalize)")
        }
        guard device >= -1 else {
            throw .invalid("device", "expected a device ordinal >= 0 or FUSED_MOE_DEVICE_NONE (-1), got \(device)")
        }
        var gpu: GPU? = nil
        if device >= 0 {
            let library = try Libraries.library(ordinal: Int(device), argument: "device")
            gpu = GPU(device: library.device, buckets: [], scratch: nil, routers: try routers(library: library))
        }
        return LayerHandle(
            experts: Int(numExperts), topK: Int(topK), hidden: 0, intermediate: 0, dtype: nil,
            routedExperts: Int(numExperts), renormalize: renormalize == 1, maxTokens: 0,
            deviceOrdinal: device >= 0 ? Int(device) : nil, gpu: gpu)
    }

    /// One bucket per run of batch sizes with one plan (`PlanSelector.planRuns`, so each batch runs
    /// the plan `bench` times at its size), with the options' overrides applied and neighbours that
    /// then agree merged. Batches past `chunkTokens` run in chunks on the chunk's plan, so the last
    /// bucket reaches `maxTokens`.
    static func buckets(
        shape: MoEShape, options: LayerOptions, chunkTokens: Int, properties: DeviceProperties
    ) throws(MoEError) -> [(upTo: Int, plan: MoEPlan)] {
        let runs = try PlanSelector.planRuns(
            shape: shape, maxTokens: min(options.maxTokens, chunkTokens), multiprocessors: properties.multiprocessorCount,
            sharedMemoryLimit: properties.sharedMemoryPerBlockOptIn, deviceName: properties.name,
            architecture: properties.architecture)
        var groups: [(upTo: Int, plan: MoEPlan)] = []
        for run in runs {
            let chosen = options.applyingOverrides(to: run.plan)
            if let last = groups.last, last.plan == chosen {
                groups[groups.count - 1].upTo = run.upTo
            } else {
                groups.append((run.upTo, chosen))
            }
        }
        groups[groups.count - 1].upTo = options.maxTokens
        return groups
    }

    /// Chooses a plan per bucket, compiles all their kernels and the routers' at once, and makes one
    /// `CUDAMoELayer` per plan, all on one scratch.
    private static func makeGPU(
        ordinal: Int, shape: MoEShape, dtype: DType, options: LayerOptions, moeOptions: MoEOptions
    ) throws(ABIError) -> GPU {
        let library = try Libraries.library(ordinal: ordinal, argument: "options.device")
        let device = library.device
        let properties = device.properties
        let chunkTokens = options.chunkTokens ?? 65536
        let groups: [(upTo: Int, plan: MoEPlan)]
        do {
            groups = try buckets(shape: shape, options: options, chunkTokens: chunkTokens, properties: properties)
        } catch {
            throw ABIError(error)
        }
        var requests = DType.allCases.map { GPURouter.request(dtype: $0) }
        for group in groups {
            requests += CUDAMoELayer.requests(
                dtype: dtype, plan: group.plan, activation: options.activation,
                atomicCombine: options.combine == .atomic)
        }
        do {
            // Compiles every missing program at once, one per host core: later makes only look up.
            try library.prepare(requests)
            // Zero-byte w1/w2 make a CUDAMoELayer whose weights come with each forward: one layer's
            // kernels and scratch then serve every weight pair of this shape.
            let noWeights = try DeviceBuffer(device: device, borrowing: .null, byteCount: 0)
            // One layer per distinct plan, made for the largest batch of its runs (a plan can serve two
            // runs apart, e.g. a heuristic tile between a table's keys and again past them), all on one
            // scratch that holds the largest of their needs.
            var largest: [MoEPlan: Int] = [:]
            for group in groups { largest[group.plan] = max(largest[group.plan] ?? 0, group.upTo) }
            let sizes = largest.reduce(CUDAMoELayer.ScratchSizes()) {
                $0.union(
                    CUDAMoELayer.ScratchSizes(
                        shape: shape, dtype: dtype, plan: $1.key, maxTokens: $1.value, chunkTokens: chunkTokens))
            }
            let scratch = try CUDAMoELayer.SharedScratch(device: device, sizes: sizes)
            var layers: [MoEPlan: CUDAMoELayer] = [:]
            var buckets: [Bucket] = []
            for group in groups {
                if layers[group.plan] == nil {
                    layers[group.plan] = try CUDAMoELayer(
                        library: library, shape: shape, dtype: dtype, w1: noWeights, w2: noWeights, options: moeOptions,
                        plan: group.plan, maxTokens: largest[group.plan]!, chunkTokens: chunkTokens, sharedScratch: scratch)
                }
                buckets.append(Bucket(upTo: group.upTo, layer: layers[group.plan]!))
            }
            return GPU(device: device, buckets: buckets, scratch: scratch, routers: try routers(library: library))
        } catch {
            throw ABIError(any: error)
        }
    }

    /// The GPU router for each logits dtype, compiled now so that `route` never compiles.
    private static func routers(library: KernelLibrary) throws(ABIError) -> [DType: GPURouter] {
        var routers: [DType: GPURouter] = [:]
        do {
            try library.prepare(DType.allCases.map { GPURouter.request(dtype: $0) })
            for dtype in DType.allCases { routers[dtype] = try GPURouter(library: library, logitsDType: dtype) }
        } catch {
            throw ABIError(error)
        }
        return routers
    }

    // MARK: - Running

    /// `fused_moe_forward` after the handle lookup.
    func forward(
        x: UnsafeRawPointer?, topkIDs: UnsafeRawPointer?, topkWeights: UnsafeRawPointer?, w1: UnsafeRawPointer?,
        w2: UnsafeRawPointer?, out: UnsafeRawPointer?, tokens: Int64, xRowStride: Int64, outRowStride: Int64,
        stream: UnsafeMutableRawPointer?
    ) throws(ABIError) {
        guard let dtype else {
            throw .unsupported(
                "this handle is a router (fused_moe_router_create): it has no experts to run; use fused_moe_route")
        }
        guard tokens >= 0 && tokens <= Int64(maxTokens) else {
            throw .invalid("tokens", "must be in 0...\(maxTokens) (the layer's max_tokens), got \(tokens)")
        }
        guard xRowStride == Int64(hidden) else {
            throw .invalid(
                "x_row_stride", "only contiguous rows are supported: expected \(hidden) (H), got \(xRowStride)")
        }
        guard outRowStride == Int64(hidden) else {
            throw .invalid(
                "out_row_stride", "only contiguous rows are supported: expected \(hidden) (H), got \(outRowStride)")
        }
        let element = dtype.byteCount
        let w1Bytes = try Arguments.product(experts, 2 * intermediate, hidden, element, name: "w1")
        let w2Bytes = try Arguments.product(experts, hidden, intermediate, element, name: "w2")
        let w1Pointer = try Arguments.devicePointer(w1, bytes: w1Bytes, alignment: 16, "w1")
        let w2Pointer = try Arguments.devicePointer(w2, bytes: w2Bytes, alignment: 16, "w2")
        let count = Int(tokens)
        var pointers = (
            x: DevicePointer.null, ids: DevicePointer.null, weights: DevicePointer.null, out: DevicePointer.null
        )
        if count > 0 {
            let rowBytes = try Arguments.product(count, hidden, element, name: "tokens")
            let slotBytes = try Arguments.product(count, topK, 4, name: "tokens")
            pointers.x = try Arguments.devicePointer(x, bytes: rowBytes, alignment: 16, "x")
            pointers.ids = try Arguments.devicePointer(topkIDs, bytes: slotBytes, alignment: 4, "topk_ids")
            pointers.weights = try Arguments.devicePointer(topkWeights, bytes: slotBytes, alignment: 4, "topk_weights")
            pointers.out = try Arguments.devicePointer(out, bytes: rowBytes, alignment: 16, "out")
        }
        guard let gpu else {
            throw .unsupported("this layer was made with FUSED_MOE_DEVICE_NONE: the arguments are valid, nothing ran")
        }
        guard count > 0 else { return }
        guard let bucket = gpu.buckets.first(where: { count <= $0.upTo }) else {
            throw .internal("no bucket holds \(count) tokens (max_tokens \(maxTokens))")
        }
        do {
            try gpu.device.makeCurrent()
            let cudaStream = Stream(device: gpu.device, borrowing: UInt(bitPattern: stream))
            try bucket.layer.forward(
                x: pointers.x, topkIDs: pointers.ids, topkWeights: pointers.weights, w1: w1Pointer, w2: w2Pointer,
                out: pointers.out, tokens: count, stream: cudaStream)
        } catch {
            throw ABIError(any: error)
        }
    }

    /// `fused_moe_route` after the handle lookup.
    func route(
        logits: UnsafeRawPointer?, logitsDType code: CInt, tokens: Int64, numExperts: Int64,
        topkIDs: UnsafeRawPointer?, topkWeights: UnsafeRawPointer?, stream: UnsafeMutableRawPointer?
    ) throws(ABIError) {
        let logitsDType = try Arguments.dtype(code, "logits_dtype", allowFP32: true)
        try Arguments.require(tokens, in: 0...Int64(Int32.max), "tokens")
        guard numExperts == Int64(routedExperts) else {
            throw .invalid("num_experts", "must be the layer's routed experts (\(routedExperts)), got \(numExperts)")
        }
        let count = Int(tokens)
        var pointers = (logits: DevicePointer.null, ids: DevicePointer.null, weights: DevicePointer.null)
        if count > 0 {
            let element = logitsDType.byteCount
            let logitBytes = try Arguments.product(count, routedExperts, element, name: "tokens")
            let slotBytes = try Arguments.product(count, topK, 4, name: "tokens")
            pointers.logits = try Arguments.devicePointer(
                logits, bytes: logitBytes, alignment: element, "router_logits")
            pointers.ids = try Arguments.devicePointer(topkIDs, bytes: slotBytes, alignment: 4, "topk_ids")
            pointers.weights = try Arguments.devicePointer(topkWeights, bytes: slotBytes, alignment: 4, "topk_weights")
        }
        guard let gpu else {
            throw .unsupported("this layer was made with FUSED_MOE_DEVICE_NONE: the arguments are valid, nothing ran")
        }
        guard count > 0 else { return }
        guard let router = gpu.routers[logitsDType] else { throw .internal("no router for \(logitsDType)") }
        do {
            try gpu.device.makeCurrent()
            let cudaStream = Stream(device: gpu.device, borrowing: UInt(bitPattern: stream))
            try router.route(
                logits: pointers.logits, tokens: count, experts: routedExperts, topK: topK, renormalize: renormalize,
                ids: pointers.ids, weights: pointers.weights, stream: cudaStream)
        } catch {
            throw ABIError(any: error)
        }
    }
}
