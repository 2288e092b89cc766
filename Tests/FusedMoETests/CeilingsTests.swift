import Testing

@testable import FusedMoE

/// `--ceilings` files and the burst floor (bench/NOTES.md v30): the floor uses the sustained matrix
/// rate; a file's burst rate adds a stricter `%burst` reading beside it.
@Suite struct CeilingsTests {
    @Test func parsesSustainedAndBurstRates() throws {
        let text = #"{"copy_bytes_per_s": 4.1e12, "bf16_flops_per_s": 6.7e14, "bf16_flops_per_s_burst": 7.7e14}"#
        let ceilings = try Ceilings.parse(json: text, source: "c.json", measuredCopy: 4.2e12)
        #expect(ceilings.copyBytesPerSecond == 4.2e12)  // the faster copy of the file's and this process's
        #expect(ceilings.matrixFlopsPerSecond == 6.7e14)
        #expect(ceilings.burstMatrixFlopsPerSecond == 7.7e14)
        #expect(ceilings.burst?.matrixFlopsPerSecond == 7.7e14)
        #expect(ceilings.burst?.copyBytesPerSecond == 4.2e12)
        let old = try Ceilings.parse(json: #"{"copy_bytes_per_s": 4.1e12, "bf16_flops_per_s": 7.7e14}"#, source: "c.json")
        #expect(old.copyBytesPerSecond == 4.1e12)
        #expect(old.burstMatrixFlopsPerSecond == nil && old.burst == nil)
    }

    /// An fp16 bench takes the file's fp16 rates where it has them, else the bf16 ones; the report
    /// names the rate it used.
    @Test func fp16TakesItsOwnRatesWherePresent() throws {
        let text = #"{"copy_bytes_per_s": 4.2e12, "bf16_flops_per_s": 6.8e14, "bf16_flops_per_s_burst": 7.8e14, "fp16_flops_per_s": 6.5e14, "fp16_flops_per_s_burst": 7.5e14}"#
        let fp16 = try Ceilings.parse(json: text, source: "c.json", dtype: .fp16)
        #expect(fp16.matrixDType == .fp16 && fp16.matrixFlopsPerSecond == 6.5e14 && fp16.burstMatrixFlopsPerSecond == 7.5e14)
        #expect(fp16.burst?.matrixDType == .fp16)
        let bf16 = try Ceilings.parse(json: text, source: "c.json", dtype: .bf16)
        #expect(bf16.matrixDType == .bf16 && bf16.matrixFlopsPerSecond == 6.8e14 && bf16.burstMatrixFlopsPerSecond == 7.8e14)
        let old = try Ceilings.parse(json: #"{"copy_bytes_per_s": 4.2e12, "bf16_flops_per_s": 6.8e14}"#, source: "c.json", dtype: .fp16)
        #expect(old.matrixDType == .bf16 && old.matrixFlopsPerSecond == 6.8e14)
        #expect(throws: MoEError.invalidArgument("--ceilings", "'c.json': fp16_flops_per_s must be a positive number")) {
            try Ceilings.parse(
                json: #"{"copy_bytes_per_s": 4e12, "bf16_flops_per_s": 7e14, "fp16_flops_per_s": 0}"#, source: "c.json",
                dtype: .fp16)
        }
        let report = BenchReport(device: "d", driver: "v", commit: "c", date: "t", ceilings: fp16, rows: [])
        #expect(report.json["ceilings"]?["fp16_flops_per_s"]?.doubleValue == 6.5e14)
        #expect(report.json["ceilings"]?["fp16_flops_per_s_burst"]?.doubleValue == 7.5e14)
        #expect(report.json["ceilings"]?["bf16_flops_per_s"] == nil)
    }

    @Test func rejectsMissingOrNonPositiveRates() {
        for text in [
            #"{"copy_bytes_per_s": 4e12}"#,
            #"{"copy_bytes_per_s": 0, "bf16_flops_per_s": 7e14}"#,
            #"{"copy_bytes_per_s": 4e12, "bf16_flops_per_s": -1}"#,
        ] {
            #expect(throws: MoEError.invalidArgument("--ceilings", "'c.json' needs positive copy_bytes_per_s and bf16_flops_per_s")) {
                try Ceilings.parse(json: text, source: "c.json")
            }
        }
        for burst in ["0", "\"fast\""] {
            #expect(throws: MoEError.invalidArgument("--ceilings", "'c.json': bf16_flops_per_s_burst must be a positive number")) {
                try Ceilings.parse(
                    json: #"{"copy_bytes_per_s": 4e12, "bf16_flops_per_s": 7e14, "bf16_flops_per_s_burst": "# + burst + "}",
                    source: "c.json")
            }
        }
    }

    @Test func reportCarriesTheBurstFloorWhenThereIsOne() throws {
        let shape = try MoEShape(experts: 8, topK: 2, hidden: 4096, intermediate: 7168)
        let ceilings = Ceilings(copyBytesPerSecond: 4e12, matrixFlopsPerSecond: 6e14, burstMatrixFlopsPerSecond: 8e14)
        // 8192 tokens: compute-bound, so the burst floor is the sustained one times 6/8.
        let floor = ceilings.floorMilliseconds(shape: shape, tokens: 8192, expertsTouched: 8, dtype: .bf16)
        let burstFloor = try #require(ceilings.burst).floorMilliseconds(shape: shape, tokens: 8192, expertsTouched: 8, dtype: .bf16)
        #expect(abs(burstFloor - 0.75 * floor) < 1e-12 * floor)
        var row = BenchRow(
            shape: "mixtral_tp2", moeShape: shape, tokens: 8192, variant: "wgmma", splitK: 1, splitMode: "none",
            milliseconds: 2 * floor, floorMilliseconds: floor, relativeError: 1e-3, expertsTouched: 8)
        #expect(row.percentOfBurstFloor == nil)
        let plain = BenchReport(device: "d", driver: "v", commit: "c", date: "t", ceilings: ceilings, rows: [row])
        #expect(!plain.table().contains("%burst"))
        #expect(firstRow(plain)?["floor_ms_burst"] == nil)
        row.burstFloorMilliseconds = burstFloor
        #expect(abs((row.percentOfBurstFloor ?? 0) - 37.5) < 1e-9)
        let report = BenchReport(device: "d", driver: "v", commit: "c", date: "t", ceilings: ceilings, rows: [row])
        let lines = report.table().split(separator: "\n")
        #expect(lines[0].contains("%floor  %burst  rel_err"))
        #expect(lines[1].contains(" 50.0    37.5    1.00e-03"))
        #expect(report.json["ceilings"]?["bf16_flops_per_s_burst"]?.doubleValue == 8e14)
        #expect(firstRow(report)?["floor_ms_burst"]?.doubleValue == burstFloor)
    }
}

private func firstRow(_ report: BenchReport) -> JSON? {
    if case .array(let rows)? = report.json["rows"] { return rows.first }
    return nil
}
