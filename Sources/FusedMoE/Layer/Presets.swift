/// Named layer shapes from DESIGN.md: the PR's table and the models people run.
public struct ShapePreset: Hashable, Sendable {
    public var name: String
    public var shape: MoEShape

    /// `name: E, k, H, I`.
    public static let all: [ShapePreset] = [
        preset("seed4096", 128, 8, 4096, 384),
        preset("seed8192", 128, 8, 8192, 384),
        preset("mixtral_tp2", 8, 2, 4096, 7168),
        preset("qwen235_tp2", 128, 8, 4096, 768),
        preset("dsv3_tp4", 256, 8, 7168, 512),
        // The CPU default: small enough for a laptop core, still every stage and several experts.
        preset("tiny", 8, 2, 256, 128),
    ]

    /// The batch sizes of DESIGN.md.
    public static let batchSizes = [1, 8, 32, 128, 256, 512, 1024, 2048, 4096, 8192]

    public static func named(_ name: String) throws(MoEError) -> ShapePreset {
        guard let preset = all.first(where: { $0.name == name }) else {
            throw .invalidArgument("shape", "unknown preset '\(name)'; expected one of \(all.map(\.name).joined(separator: ", "))")
        }
        return preset
    }

    private static func preset(_ name: String, _ e: Int, _ k: Int, _ h: Int, _ i: Int) -> ShapePreset {
        // The table's values are valid by construction.
        ShapePreset(name: name, shape: try! MoEShape(experts: e, topK: k, hidden: h, intermediate: i))
    }
}
