import Dispatch

/// The whole MoE layer on the CPU, spread over all cores: the reference every GPU path is checked
/// against, and the backend on machines without a GPU.
///
/// It computes what the GPU pipeline computes, stage by stage (GEMM1, activation, GEMM2 with the
/// routed weight, combine), accumulating in fp32 and rounding each stored intermediate to `T`
/// as the GPU stores it.
public enum CPUBackend {
    /// Checks the inputs of a forward and returns (M, k).
    /// - Throws: `MoEError.invalidArgument` naming the first argument that is wrong.
    static func validate<T>(x: HostTensor<T>, routing: Routing, weights: MoEWeights<T>, options: MoEOptions)
        throws(MoEError)
    {
        let shape = weights.shape
        guard x.rank == 2, x.isContiguous else {
            throw .invalidArgument("x", "expected a contiguous [M, H] tensor, got shape \(x.shape)")
        }
        guard x.shape[1] == shape.hidden else {
            throw .invalidArgument("x", "expected H = \(shape.hidden) columns (the weights' hidden size), got \(x.shape[1])")
        }
        guard routing.tokens == x.shape[0] else {
            throw .invalidArgument("topk_ids", "routing is for \(routing.tokens) tokens but x has \(x.shape[0]) rows")
        }
        guard routing.topK == shape.topK else {
            throw .invalidArgument("topk_ids", "expected k = \(shape.topK) experts per token, got \(routing.topK)")
        }
        try options.validate(localExperts: shape.experts)
        try routing.validate(experts: options.routedExperts(local: shape.experts))
    }

    /// Computes `out [M, H]` for `x [M, H]` routed by `routing`.
    /// - Throws: `MoEError.invalidArgument` for inconsistent shapes or ids out of range.
    public static func forward<T: MoEScalar>(
        x: HostTensor<T>, routing: Routing, weights: MoEWeights<T>, options: MoEOptions = MoEOptions()
    ) throws(MoEError) -> HostTensor<T> {
        try validate(x: x, routing: routing, weights: weights, options: options)
        let shape = weights.shape
        let (tokens, k, hidden, intermediate) = (x.shape[0], shape.topK, shape.hidden, shape.intermediate)
        let pairs = tokens * k
        if tokens == 0 { return HostTensor(shape: [0, hidden], repeating: T(0)) }

        // Pairs grouped by local expert; pairs of unowned or unrouted experts produce zeros.
        var pairsOfExpert = [[Int]](repeating: [], count: shape.experts)
        for pair in 0..<pairs {
            let id = Int(routing.ids[pair])
            guard id >= 0 else { continue }
            let local = options.expertMap.map { Int($0[id]) } ?? id
            if local >= 0 { pairsOfExpert[local].append(pair) }
        }

        let xFloats = x.floats
        var gateUp = [Float](repeating: 0, count: pairs * 2 * intermediate)
        xFloats.withUnsafeBufferPointer { input in
            gateUp.withUnsafeMutableBufferPointer { output in
                groupedGEMM(
                    a: SharedPointer(input), aRowOf: { $0 / k }, b: weights.w1.storage, n: 2 * intermediate,
                    kDim: hidden, pairsOfExpert: pairsOfExpert, routedWeights: nil,
                    c: SharedPointer(output), round: T.rounded)
            }
        }
        var activated = [Float](repeating: 0, count: pairs * intermediate)
        for pair in 0..<pairs {
            for column in 0..<intermediate {
                let gate = gateUp[pair * 2 * intermediate + column]
                let up = gateUp[pair * 2 * intermediate + intermediate + column]
                activated[pair * intermediate + column] = T.rounded(options.activation.apply(gate: gate, up: up))
            }
        }
        var down = [Float](repeating: 0, count: pairs * hidden)
        activated.withUnsafeBufferPointer { input in
            down.withUnsafeMutableBufferPointer { output in
                groupedGEMM(
                    a: SharedPointer(input), aRowOf: { $0 }, b: weights.w2.storage, n: hidden, kDim: intermediate,
                    pairsOfExpert: pairsOfExpert, routedWeights: routing.weights, c: SharedPointer(output),
                    round: T.rounded)
            }
        }
        var out = HostTensor<T>(shape: [tokens, hidden], repeating: T(0))
        for token in 0..<tokens {
            for column in 0..<hidden {
                var sum: Float = 0
                for slot in 0..<k { sum += down[(token * k + slot) * hidden + column] }
                out.storage[token * hidden + column] = T(sum)
            }
        }
        return out
    }

    /// `c[p, n] = round(w[p] * dot(b[e, n, :], a[aRowOf(p), :]))` for every pair p of every expert e,
    /// in parallel over (expert, block of n). Rows of pairs no expert owns stay as they are (zero).
    static func groupedGEMM<T: MoEScalar>(
        a: SharedPointer<Float>, aRowOf: @Sendable (Int) -> Int, b: [T], n: Int, kDim: Int,
        pairsOfExpert: [[Int]], routedWeights: [Float]?, c: SharedPointer<Float>, round: @Sendable (Float) -> Float
    ) {
        let rowsPerItem = 32
        let blocks = (n + rowsPerItem - 1) / rowsPerItem
        let experts = pairsOfExpert.indices.filter { !pairsOfExpert[$0].isEmpty }
        b.withUnsafeBufferPointer { weightsBuffer in
            let weights = SharedPointer(weightsBuffer)
            DispatchQueue.concurrentPerform(iterations: experts.count * blocks) { item in
                let expert = experts[item / blocks]
                let firstRow = (item % blocks) * rowsPerItem
                let rows = min(rowsPerItem, n - firstRow)
                // Widen this block of weight rows to fp32 once, then reuse it for every pair.
                var block = [Float](repeating: 0, count: rows * kDim)
                let base = (expert * n + firstRow) * kDim
                for index in 0..<(rows * kDim) { block[index] = weights.base[base + index].floatValue }
                block.withUnsafeBufferPointer { blockRows in
                    for pair in pairsOfExpert[expert] {
                        let aRow = a.base + aRowOf(pair) * kDim
                        let scale = routedWeights?[pair] ?? 1
                        for row in 0..<rows {
                            let value = dot(blockRows.baseAddress! + row * kDim, aRow, kDim)
                            c.base[pair * n + firstRow + row] = round(scale * value)
                        }
                    }
                }
            }
        }
    }

    /// fp32 dot product with 16 lanes of independent accumulators.
    @inline(__always)
    static func dot(_ x: UnsafePointer<Float>, _ y: UnsafePointer<Float>, _ count: Int) -> Float {
        var accumulator = SIMD16<Float>()
        var index = 0
        let rawX = UnsafeRawPointer(x)
        let rawY = UnsafeRawPointer(y)
        while index + 16 <= count {
            let u = rawX.loadUnaligned(fromByteOffset: index * 4, as: SIMD16<Float>.self)
            let v = rawY.loadUnaligned(fromByteOffset: index * 4, as: SIMD16<Float>.self)
            accumulator.addProduct(u, v)
            index += 16
        }
        var sum = accumulator.sum()
        while index < count {
            sum += x[index] * y[index]
            index += 1
        }
        return sum
    }
}

/// A pointer shared by parallel workers that write disjoint parts of one buffer.
struct SharedPointer<Element>: @unchecked Sendable {
    let base: UnsafeMutablePointer<Element>
    /// - Precondition: the buffer is not empty (the forward returns early on empty batches).
    init(_ buffer: UnsafeMutableBufferPointer<Element>) { base = buffer.baseAddress! }
    init(_ buffer: UnsafeBufferPointer<Element>) { base = UnsafeMutablePointer(mutating: buffer.baseAddress!) }
}
