/// The checks of the CPU backend: the align example, and the layer against float64 on fresh
/// random inputs in every dtype, with and without expert parallelism.
public enum CPUChecks {
    /// SGLang's docstring example for `moe_align_block_size`.
    public static let alignExample = (
        ids: [Int32]([2, 3, 4, 1, 2, 4, 1, 3, 4, 1, 2, 3]), experts: 5, blockM: 4,
        sorted: [Int32]([3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]), expertIDs: [Int32]([1, 2, 3, 4])
    )

    public static func run(seed: UInt64, progress: (CheckResult) -> Void) -> [CheckResult] {
        var results: [CheckResult] = []
        func record(_ result: CheckResult) {
            results.append(result)
            progress(result)
        }
        do {
            let example = alignExample
            let aligned = try Align.align(ids: example.ids, experts: example.experts, blockM: example.blockM)
            let passed = aligned.sortedTokenIDs == example.sorted && aligned.expertIDs == example.expertIDs
            record(CheckResult(
                name: "cpu align example", passed: passed,
                detail: passed ? "" : "got \(aligned.sortedTokenIDs) / \(aligned.expertIDs)"))
        } catch {
            record(CheckResult(name: "cpu align example", passed: false, detail: "\(error)"))
        }
        let shapes: [(String, MoEShape, MoEOptions)] = [
            ("tiny", try! MoEShape(experts: 8, topK: 2, hidden: 256, intermediate: 128), MoEOptions()),
            ("k1-gelu", try! MoEShape(experts: 4, topK: 1, hidden: 96, intermediate: 40), MoEOptions(activation: .gelu)),
            ("renorm", try! MoEShape(experts: 16, topK: 4, hidden: 64, intermediate: 48), MoEOptions(renormalize: true)),
            ("ep-half", try! MoEShape(experts: 4, topK: 2, hidden: 64, intermediate: 32),
             MoEOptions(expertMap: [0, -1, 1, -1, 2, -1, 3, -1])),
        ]
        var caseSeed = seed
        for (name, shape, options) in shapes {
            for tokens in [0, 1, 7, 33] {
                caseSeed &+= 1
                record(check(BFloat16.self, name: name, shape: shape, tokens: tokens, options: options, seed: caseSeed))
                record(check(Float16.self, name: name, shape: shape, tokens: tokens, options: options, seed: caseSeed))
                record(check(Float.self, name: name, shape: shape, tokens: tokens, options: options, seed: caseSeed))
            }
        }
        return results
    }

    static func check<T: MoEScalar>(
        _: T.Type, name: String, shape: MoEShape, tokens: Int, options: MoEOptions, seed: UInt64
    ) -> CheckResult {
        let label = "cpu \(name) \(T.dtype) M=\(tokens)"
        do {
            let sample = try RandomCase<T>(shape: shape, tokens: tokens, options: options, seed: seed)
            let out = try CPUBackend.forward(x: sample.x, routing: sample.routing, weights: sample.weights, options: options)
            let reference = try Float64Reference.forward(
                x: sample.x, routing: sample.routing, weights: sample.weights, options: options)
            guard out.shape == [tokens, shape.hidden] else {
                return CheckResult(name: label, passed: false, detail: "output shape \(out.shape)")
            }
            let error = relativeError(out.floats, reference)
            let bound = errorBound(T.dtype)
            return CheckResult(
                name: label, passed: error < bound || (tokens == 0 && error == 0),
                detail: "rel_err \(formatScientific(error)) (bound \(formatScientific(bound)))")
        } catch {
            return CheckResult(name: label, passed: false, detail: "\(error)")
        }
    }
}
