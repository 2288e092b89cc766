/// The layer in plain float64, with no intermediate rounding: the yardstick for both backends.
/// Single-threaded and simple on purpose; use it on small problems.
public enum Float64Reference {
    /// `out [M, H]` in Double for `x [M, H]` routed by `routing`.
    public static func forward<T: MoEScalar>(
        x: HostTensor<T>, routing: Routing, weights: MoEWeights<T>, options: MoEOptions = MoEOptions()
    ) throws(MoEError) -> [Double] {
        try CPUBackend.validate(x: x, routing: routing, weights: weights, options: options)
        let shape = weights.shape
        let (tokens, k, hidden, intermediate) = (x.shape[0], shape.topK, shape.hidden, shape.intermediate)
        var out = [Double](repeating: 0, count: tokens * hidden)
        var activated = [Double](repeating: 0, count: intermediate)
        for token in 0..<tokens {
            for slot in 0..<k {
                let id = Int(routing.ids[token * k + slot])
                guard id >= 0 else { continue }
                let expert = options.expertMap.map { Int($0[id]) } ?? id
                guard expert >= 0 else { continue }
                for column in 0..<intermediate {
                    var gate = 0.0
                    var up = 0.0
                    for h in 0..<hidden {
                        let value = Double(x.storage[token * hidden + h].floatValue)
                        gate += Double(weights.w1.storage[(expert * 2 * intermediate + column) * hidden + h].floatValue) * value
                        up += Double(
                            weights.w1.storage[(expert * 2 * intermediate + intermediate + column) * hidden + h].floatValue)
                            * value
                    }
                    activated[column] = options.activation.apply(gate: gate, up: up)
                }
                let weight = Double(routing.weights[token * k + slot])
                for h in 0..<hidden {
                    var sum = 0.0
                    for column in 0..<intermediate {
                        sum += Double(weights.w2.storage[(expert * hidden + h) * intermediate + column].floatValue)
                            * activated[column]
                    }
                    out[token * hidden + h] += weight * sum
                }
            }
        }
        return out
    }
}

/// ‖out − ref‖ / ‖ref‖, the relative error used by checks and benchmarks. NaN anywhere gives NaN
/// (so it never passes a `<` bound); an all-zero reference compares the absolute norm.
public func relativeError<S: Collection, R: Collection>(_ output: S, _ reference: R) -> Double
where S.Element: BinaryFloatingPoint, R.Element: BinaryFloatingPoint {
    precondition(output.count == reference.count, "comparing \(output.count) values with \(reference.count)")
    var difference = 0.0
    var norm = 0.0
    for (value, expected) in zip(output, reference) {
        let (v, e) = (Double(value), Double(expected))
        if v.isNaN || e.isNaN || v.isInfinite { return .nan }
        difference += (v - e) * (v - e)
        norm += e * e
    }
    return norm > 0 ? (difference / norm).squareRoot() : difference.squareRoot()
}
