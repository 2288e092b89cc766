import Testing

@testable import FusedMoE

@Suite struct PeerTimingsTests {
    @Test func readsExpertsTouchedByShapeAndBatch() throws {
        let text = """
            {"what": "x", "rows": [
              {"shape": "mixtral_tp2", "E": 8, "M": 8, "experts_touched": 7, "sglang_triton_ms": 0.3257},
              {"shape": "mixtral_tp2", "E": 8, "M": 32, "experts_touched": 8},
              {"shape": "seed4096", "E": 128, "M": 8, "experts_touched": 49}
            ]}
            """
        let targets = try PeerTimings.expertsTouched(json: text, source: "anchor.json")
        #expect(targets == ["mixtral_tp2": [8: 7, 32: 8], "seed4096": [8: 49]])
    }

    @Test func rejectsRowsWithoutAnIntegerCount() {
        for (text, what) in [
            (#"{"rows": [{"shape": "a", "M": 8, "experts_touched": 6.5}]}"#, "row 0"),
            (#"{"rows": [{"shape": "a", "M": 0, "experts_touched": 6}]}"#, "row 0"),
            (#"{"rows": [{"M": 8, "experts_touched": 6}]}"#, "row 0"),
            (#"{"peers": {}}"#, "rows"),
        ] {
            #expect(throws: MoEError.malformedFile("anchor.json", what == "rows" ? "no \"rows\" array" : "row 0 needs a shape, an integer M >= 1 and an integer experts_touched >= 1")) {
                try PeerTimings.expertsTouched(json: text, source: "anchor.json")
            }
        }
    }

    @Test func reportNamesTheRoutingOnlyWhenDrawnSo() {
        let ceilings = Ceilings(copyBytesPerSecond: 1e12, matrixFlopsPerSecond: 1e14)
        let plain = BenchReport(device: "d", driver: "v", commit: "c", date: "t", ceilings: ceilings, rows: [])
        #expect(plain.json["routing"] == nil)
        let matched = BenchReport(
            device: "d", driver: "v", commit: "c", date: "t", ceilings: ceilings, rows: [], routing: "drawn like anchor.json")
        #expect(matched.json["routing"]?.stringValue == "drawn like anchor.json")
        #expect(matched.json["ceilings"]?["copy_bytes_per_s"]?.doubleValue == 1e12)
    }
}
