/// Fresh random inputs for one forward: x, routing from random logits, and weights.
public struct RandomCase<T: MoEScalar>: Sendable {
    public var x: HostTensor<T>
    public var logits: HostTensor<Float>
    public var routing: Routing
    public var weights: MoEWeights<T>

    /// Draws `x [M, H]` in [-1, 1), logits `[M, E_routed]` in [-4, 4) routed by softmax top-k, and
    /// weights scaled to keep outputs near unit size.
    public init(shape: MoEShape, tokens: Int, options: MoEOptions = MoEOptions(), seed: UInt64) throws(MoEError) {
        var generator = SplitMix64(seed: seed)
        weights = try MoEWeights<T>.random(shape: shape, using: &generator)
        x = HostTensor<T>.random(shape: [tokens, shape.hidden], using: &generator)
        logits = HostTensor<Float>.random(
            shape: [tokens, options.routedExperts(local: shape.experts)], scale: 4, using: &generator)
        routing = try Router.softmaxTopK(logits: logits, topK: shape.topK, renormalize: options.renormalize)
    }
}
