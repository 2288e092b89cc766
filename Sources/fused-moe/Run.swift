import ArgumentParser
import CUDA
import FusedMoE

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Runs the layer on tensors from a safetensors file and writes the output to another.",
        discussion: """
            IN.safetensors holds these tensors (floats in BF16, F16 or F32):
              x              [M, H]      hidden states
              w1             [E, 2I, H]  gate and up projections, gate rows first
              w2             [E, H, I]   down projections
            and the routing, either
              router_logits  [M, E]      routed here: softmax top-k, needs --top-k
            or both of
              topk_ids       [M, k]      I32 or I64 expert ids (-1: unrouted slot)
              topk_weights   [M, k]      routed weights
            OUT.safetensors receives out [M, H] in the run's dtype and, when the
            run routed, topk_ids [M, k] (I32) and topk_weights [M, k] (F32).
            """)

    @Option(name: .customLong("in"), help: ArgumentHelp("The input safetensors file.", valueName: "IN.safetensors"))
    var input: String

    @Option(name: .customLong("out"), help: ArgumentHelp("The output safetensors file.", valueName: "OUT.safetensors"))
    var output: String

    @Option(
        name: .customLong("top-k"),
        help: "Experts per token when routing from router_logits (with topk_ids: their columns).")
    var topK: Int?

    @Flag(help: "Renormalize the top-k softmax weights to sum to 1 (routing from router_logits).")
    var renormalize = false

    @Option(help: "Grouped routing (DeepSeek-V2/V3): the expert groups; with router_logits, routes by grouped top-k (a `correction_bias [E]` tensor in IN is used when present).")
    var groups: Int?

    @Option(help: "Grouped routing: the groups kept per token (default: all).")
    var topKGroups: Int?

    @Option(help: "Grouped routing: the score function, softmax or sigmoid.")
    var scoring: String = "softmax"

    @Option(help: "Grouped routing: the routed scaling factor the weights are multiplied by.")
    var scaling: Double = 1

    @Option(help: "The activation between the projections: silu or gelu.")
    var activation: Activation = .silu

    @Option(help: "GPU: how each token's k expert rows are summed: ordered (bitwise reproducible) or atomic (GEMM2 adds them with 16-bit atomics where its kernel can: faster at large batches, not reproducible; the CPU sums in order).")
    var combine: CombineMode = .ordered

    @Option(help: "Backend: auto (the GPU when one is visible), cpu or cuda.")
    var backend: BackendChoice = .auto

    @Option(help: "Compute in bf16, fp16 or fp32, converting x, w1 and w2 (default: x's; then w1, w2 must match it).")
    var dtype: DType?

    func validate() throws {
        if let topK, topK < 1 { throw ValidationError("--top-k must be >= 1, got \(topK)") }
        guard ["softmax", "sigmoid"].contains(scoring) else {
            throw ValidationError("--scoring must be softmax or sigmoid, got '\(scoring)'")
        }
        guard groups != nil || (topKGroups == nil && scoring == "softmax" && scaling == 1) else {
            throw ValidationError("--top-k-groups, --scoring and --scaling go with --groups (grouped routing)")
        }
    }

    func run() throws {
        let file = try SafetensorsFile(path: input)
        var settings = RunLayer.Settings(topK: topK, renormalize: renormalize, activation: activation, dtype: dtype)
        settings.combine = combine
        if let groups {
            settings.grouped = MoERoutingConfig(
                scoring: scoring == "sigmoid" ? .sigmoid : .softmax, renormalize: renormalize, groups: groups,
                topKGroups: topKGroups ?? groups, scalingFactor: scaling)
        }
        let type = try RunLayer.dtype(input: file, settings: settings)
        var choice = try backend.resolve()
        if choice == .cuda && type == .fp32 {
            guard backend == .auto else {
                throw ValidationError("--backend cuda runs bf16 and fp16; pass --dtype bf16 or fp16, or --backend cpu")
            }
            note("fp32 runs on the CPU backend")
            choice = .cpu
        }
        let layerBackend: RunLayer.Backend =
            choice == .cuda ? .cuda(try KernelLibrary(device: Device(ordinal: 0))) : .cpu
        let start = HostClock.now()
        let result = try RunLayer.run(input: file, settings: settings, backend: layerBackend)
        let seconds = HostClock.now() - start
        for line in result.notes { note(line) }
        try SafetensorsFile.write(result.outputs, metadata: result.metadata, to: output)
        let routed = result.routedFromLogits ? " and topk_ids, topk_weights" : ""
        print(
            "\(layerBackend.name): M=\(result.tokens) \(result.shape) \(result.dtype), \(format(seconds, 3)) s; "
                + "wrote out [\(result.tokens), \(result.shape.hidden)]\(routed) to \(output)")
    }
}

extension Activation: ExpressibleByArgument {}
extension CombineMode: ExpressibleByArgument {}
