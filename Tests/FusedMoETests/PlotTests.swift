import Testing

@testable import FusedMoE

@Suite struct PlotTests {
    /// Two shapes, four variant labels (one with a single batch size, one with characters to escape).
    static func sampleReport() throws -> BenchReport {
        let small = try MoEShape(experts: 8, topK: 2, hidden: 256, intermediate: 128)
        let large = try MoEShape(experts: 128, topK: 8, hidden: 4096, intermediate: 384)
        var rows: [BenchRow] = []
        for (shapeName, shape) in [("tiny", small), ("seed4096", large)] {
            for (index, tokens) in [1, 8, 32, 128, 1024].enumerated() {
                let floor = 0.01 * Double(tokens).squareRoot()
                let settings: [(String, Int, String, Double)] = [
                    ("mma", 1, "none", 1.6), ("mma", 4, "workspace4", 1.3), ("wgmma<&>", 2, "atomic2", 1.1),
                ]
                for (variant, split, mode, slowdown) in settings {
                    rows.append(
                        BenchRow(
                            shape: shapeName, moeShape: shape, tokens: tokens, variant: variant, splitK: split,
                            splitMode: mode, milliseconds: floor * slowdown * (1 + 0.1 * Double(index)),
                            floorMilliseconds: floor, relativeError: 1e-3, expertsTouched: Double(shape.experts)))
                }
                if tokens == 8 {
                    rows.append(
                        BenchRow(
                            shape: shapeName, moeShape: shape, tokens: tokens, variant: "wgmma_swap", splitK: 1,
                            splitMode: "plan:none1/none1", milliseconds: floor * 1.05, floorMilliseconds: floor,
                            relativeError: 2e-3, expertsTouched: Double(shape.experts)))
                }
            }
        }
        return BenchReport(
            device: "NVIDIA H200", driver: "CUDA 13.0", commit: "abc1234", date: "2026-11-29T12:00:00Z",
            ceilings: Ceilings(copyBytesPerSecond: 4.27e12, matrixFlopsPerSecond: 715e12), rows: rows)
    }

    /// The element names in order of opening, or nil when a tag is unbalanced or text holds a raw `<` or `&`.
    static func balancedElements(_ svg: String) -> [String]? {
        var stack: [String] = []
        var opened: [String] = []
        var rest = Substring(svg)
        while let open = rest.firstIndex(where: { $0 == "<" || $0 == "&" }) {
            if rest[open] == "&" {
                let entity = rest[open...].prefix { $0 != ";" }
                guard ["&amp", "&lt", "&gt", "&quot", "&apos"].contains(String(entity)) else { return nil }
                rest = rest[rest.index(after: open)...]
                continue
            }
            guard let close = rest[open...].firstIndex(of: ">") else { return nil }
            let tag = rest[rest.index(after: open)..<close]
            rest = rest[rest.index(after: close)...]
            if tag.hasPrefix("?") { continue }
            if tag.contains("<") { return nil }
            if tag.hasPrefix("/") {
                guard stack.popLast() == String(tag.dropFirst()) else { return nil }
                continue
            }
            let name = String(tag.prefix { $0 != " " && $0 != "/" })
            opened.append(name)
            if !tag.hasSuffix("/") { stack.append(name) }
        }
        return stack.isEmpty ? opened : nil
    }

    @Test func plotIsWellFormedWithALinePerVariant() throws {
        let report = try PlotTests.sampleReport()
        let svg = BenchPlot.svg(report: report)
        #expect(svg.hasPrefix("<?xml"))
        #expect(svg.hasSuffix("</svg>\n"))
        let elements = try #require(PlotTests.balancedElements(svg), "unbalanced tags or unescaped text")
        #expect(elements.first == "svg")
        // Per shape: two panels of 4 labels each, and the floor line.
        #expect(elements.filter { $0 == "polyline" }.count == 2 * (2 * 4 + 1))
        for label in ["mma none", "mma workspace4", "wgmma&lt;&amp;&gt; atomic2", "plan"] {
            #expect(svg.contains(">\(label)</text>"), "legend entry \(label)")
        }
        #expect(!svg.contains("wgmma<&>"))
        for text in [
            "batch size M", "time (ms, log scale)", "% of floor", "NVIDIA H200", "2026-11-29T12:00:00Z", "floor",
        ] {
            #expect(svg.contains(text), "\(text)")
        }
        // Tick labels at the batch sizes.
        for m in [1, 8, 32, 128, 1024] { #expect(svg.contains(">\(m)</text>")) }
        #expect(svg.contains(">100</text>"))
    }

    @Test func emptyReportStillRenders() {
        let report = BenchReport(
            device: "CPU", driver: "none", commit: "x", date: "today",
            ceilings: Ceilings(copyBytesPerSecond: 1e10, matrixFlopsPerSecond: 1e11), rows: [])
        let svg = BenchPlot.svg(report: report)
        #expect(PlotTests.balancedElements(svg) != nil)
        #expect(svg.contains("no rows"))
    }

    @Test func tickLabels() {
        #expect(BenchPlot.tickLabel(0.002) == "0.002")
        #expect(BenchPlot.tickLabel(0.05) == "0.05")
        #expect(BenchPlot.tickLabel(0.1) == "0.1")
        #expect(BenchPlot.tickLabel(1) == "1")
        #expect(BenchPlot.tickLabel(500) == "500")
    }

    /// The plan's own rows are one line per comparison setting, labelled by the variant's suffix.
    @Test func planRowsAreLabelledBySetting() throws {
        let shape = try MoEShape(experts: 8, topK: 2, hidden: 256, intermediate: 128)
        func row(_ variant: String, _ mode: String) -> BenchRow {
            BenchRow(
                shape: "tiny", moeShape: shape, tokens: 1, variant: variant, splitK: 1, splitMode: mode, milliseconds: 1,
                floorMilliseconds: 1, relativeError: 0, expertsTouched: 2)
        }
        #expect(BenchPlot.label(row("wgmma_swap", "plan:none1/none1")) == "plan")
        #expect(BenchPlot.label(row("wgmma_swap-nopdl", "plan:none1/none1")) == "plan, no PDL")
        #expect(BenchPlot.label(row("wgmma-unfused", "plan:none1/none1")) == "plan, activation separate")
        #expect(BenchPlot.label(row("wgmma-fused", "plan:none1/none1")) == "plan, activation in GEMM1")
        #expect(BenchPlot.label(row("wgmma_swap-aligned", "plan:none1/none1")) == "plan, align always")
        #expect(BenchPlot.label(row("mma", "workspace4")) == "mma workspace4")
        #expect(GPUBench.Setting.autoFusion(activation: false).label.variant == "auto-unfused")
        #expect(GPUBench.Setting.split(4, .atomic).label == ("mma", "atomic4"))
    }

    /// The swap-AB timeline diagnostic's summary (MOE_SM90_DIAG_TIMES): two tiles on one SM at 2 GHz, 500 ns
    /// apart in a 2500 ns span (20% between programs), a program without a tile skipped; none: nil.
    @Test func tileTimelineSummary() throws {
        // SM id, clock at start, first wgmma, K loop end, epilogue end, global ns at start and end.
        let a: [UInt64] = [3, 10_000, 10_400, 11_600, 12_000, 0, 1000]
        let b: [UInt64] = [3, 13_000, 13_200, 14_600, 15_000, 1500, 2500]
        let idle: [UInt64] = [5, 20_000, 0, 0, 0, 100, 0]
        let records = (a + [0]) + (idle + [0]) + (b + [0])
        let line = try #require(GPUBench.timelineSummary(name: "gemm1", records: records))
        #expect(line.contains("2 tiles on 1 SMs"), "\(line)")
        #expect(line.contains("2.00 GHz"), "\(line)")
        #expect(line.contains("2.5 us first start to last end"), "\(line)")
        // Medians: to the first wgmma (400, 200 cycles) 0.15 us; K loop (1200, 1400) 0.65 us; epilogue 0.20 us.
        #expect(line.contains("0.15 us to its first wgmma") && line.contains("0.65 K loop") && line.contains("0.20 epilogue"), "\(line)")
        #expect(line.contains("20.0% of the SMs' spans"), "\(line)")
        #expect(GPUBench.timelineSummary(name: "gemm2", records: idle + [0]) == nil)
    }

}
