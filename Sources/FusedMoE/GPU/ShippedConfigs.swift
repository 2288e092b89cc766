import MoEConfigs

/// The tuned config tables shipped in the binary (Sources/MoEConfigs/configs.json), found by the
/// same file names SGLang uses.
public enum ShippedConfigs {
    /// The file names of the shipped tables.
    public static var names: [String] {
        guard case .object(let members) = parsed else { return [] }
        return members.map(\.0)
    }

    /// The shipped table with this file name, or nil.
    /// - Throws: `MoEError.malformedFile` when the shipped table is malformed (a packaging bug).
    public static func table(named name: String) throws(MoEError) -> ConfigTable? {
        guard let value = parsed[name] else { return nil }
        return try ConfigTable.parse(value.serialized(), source: "shipped configs.json: \(name)")
    }

    private static let parsed: JSON = (try? JSON.parse(String(cString: moe_configs_json()), source: "configs.json")) ?? .object([])
}
