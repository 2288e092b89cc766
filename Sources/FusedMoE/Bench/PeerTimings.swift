/// Reading a peer's timing file (`../shared/anchors/*.json`: `rows` of shape, M, experts_touched, …).
public enum PeerTimings {
    /// The experts_touched of each row, by shape name and M: what `bench --touched-like` draws each
    /// input set's routing to touch.
    /// - Throws: `MoEError.malformedFile` naming `source` when the text is not JSON, has no `rows`
    ///   array, or a row lacks a shape, an integer M >= 1 or an integer experts_touched >= 1.
    public static func expertsTouched(json text: String, source: String) throws -> [String: [Int: Int]] {
        let json = try JSON.parse(text, source: source)
        guard case .array(let rows) = json["rows"] else { throw MoEError.malformedFile(source, "no \"rows\" array") }
        var targets: [String: [Int: Int]] = [:]
        for (index, row) in rows.enumerated() {
            guard let shape = row["shape"]?.stringValue, let m = row["M"]?.intValue,
                let touched = row["experts_touched"]?.intValue, m >= 1, touched >= 1
            else {
                throw MoEError.malformedFile(
                    source, "row \(index) needs a shape, an integer M >= 1 and an integer experts_touched >= 1")
            }
            targets[shape, default: [:]][m] = touched
        }
        return targets
    }
}
