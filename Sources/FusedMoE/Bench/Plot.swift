#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

private func plotLog2(_ x: Double) -> Double { log2(x) }
private func plotLog10(_ x: Double) -> Double { log10(x) }
private func plotPow10(_ x: Double) -> Double { pow(10, x) }

/// An SVG picture of a bench run (`fused-moe bench --plot FILE.svg`): per shape, time and % of floor
/// against the batch size, one line per variant.
public enum BenchPlot {
    /// The plot as SVG text, self-contained and readable in a browser.
    ///
    /// One row per shape (in the order the report first names them), each with two panels: time in ms
    /// on a log scale against M on a log2 scale, with the floor as a dashed black line; and % of floor
    /// against M. One line per variant label, a row's `variant` and `split_mode` (rows of a label are
    /// joined in order of M; a label with one batch size shows as a point). A label keeps its colour in
    /// every row; the legend beside each row lists the labels it holds. Hovering a point shows its values.
    public static func svg(report: BenchReport) -> String {
        var canvas = SVGCanvas()
        let title = "fused-moe bench: \(report.device), \(report.date)"
        var subtitle = "commit \(report.commit), \(report.driver)"
        let ceilings = report.ceilings
        if ceilings.copyBytesPerSecond > 0 && ceilings.matrixFlopsPerSecond > 0 {
            subtitle +=
                "; floor = max(bytes / \(rate(ceilings.copyBytesPerSecond, "B/s")), "
                + "flops / \(rate(ceilings.matrixFlopsPerSecond, "FLOP/s")))"
        }
        canvas.text(title, x: Layout.margin, y: 30, size: 20, weight: "bold")
        canvas.text(subtitle, x: Layout.margin, y: 52, size: 13, fill: "#444")

        let labels = orderedUnique(report.rows.map(label))
        let styles = Dictionary(
            uniqueKeysWithValues: labels.enumerated().map { ($0.element, SeriesStyle(index: $0.offset)) })
        var top = Layout.titleHeight
        let shapes = orderedUnique(report.rows.map(\.shape))
        if shapes.isEmpty {
            canvas.text("no rows", x: Layout.margin, y: top + 30, size: 14, fill: "#444")
            top += 60
        }
        for shape in shapes {
            let rows = report.rows.filter { $0.shape == shape }
            top += drawShape(shape, rows: rows, styles: styles, top: top, canvas: &canvas)
        }
        return canvas.document(width: Layout.width, height: top + Layout.margin)
    }

    /// A row's variant label: `variant` and `split_mode`; the plan's own rows (whose kernels change
    /// with M) are one line per setting: "plan", or "plan, no PDL" and the other comparisons.
    static func label(_ row: BenchRow) -> String {
        guard row.splitMode.hasPrefix("plan") else { return row.variant + " " + row.splitMode }
        let comparisons = [
            ("-nopdl", "plan, no PDL"), ("-unfused", "plan, activation separate"),
            ("-fused", "plan, activation in GEMM1"), ("-aligned", "plan, align always"),
        ]
        return comparisons.first { row.variant.hasSuffix($0.0) }?.1 ?? "plan"
    }

    enum Layout {
        static let width = 1400.0
        static let margin = 20.0
        static let titleHeight = 70.0
        static let panelLeft = [80.0, 590.0]
        static let panelWidth = 420.0
        static let panelTop = 44.0  // below the row's top
        static let panelHeight = 240.0
        static let legendLeft = 1045.0
        static let legendLine = 17.0
        static let rowGap = 30.0
    }

    /// One shape's row; returns its height.
    static func drawShape(
        _ shape: String, rows: [BenchRow], styles: [String: SeriesStyle], top: Double, canvas: inout SVGCanvas
    ) -> Double {
        let first = rows[0].moeShape
        canvas.text(
            "\(shape)  (E=\(first.experts), k=\(first.topK), H=\(first.hidden), I=\(first.intermediate))",
            x: Layout.margin, y: top + 20, size: 15, weight: "bold")
        let labels = orderedUnique(rows.map(label))
        let series = labels.map { name in
            (name, rows.filter { label($0) == name }.sorted { $0.tokens < $1.tokens })
        }
        let batchSizes = Array(Set(rows.map(\.tokens).filter { $0 > 0 })).sorted()
        let xAxis = LogAxis.batch(batchSizes)
        let plotTop = top + Layout.panelTop

        // Time panel.
        let times = rows.flatMap { [$0.milliseconds, $0.floorMilliseconds] }.filter { $0 > 0 && $0.isFinite }
        let timeAxis = LogAxis.decades(times)
        let timePanel = Panel(left: Layout.panelLeft[0], top: plotTop, x: xAxis, y: .log(timeAxis))
        timePanel.drawFrame(batchSizes: batchSizes, yTitle: "time (ms, log scale)", canvas: &canvas)
        var floor: [Int: Double] = [:]
        for row in rows where row.floorMilliseconds > 0 && row.floorMilliseconds.isFinite && row.tokens > 0 {
            floor[row.tokens] = min(floor[row.tokens] ?? .infinity, row.floorMilliseconds)
        }
        let floorPoints = floor.keys.sorted().map { timePanel.point(m: $0, value: floor[$0]!) }
        canvas.polyline(floorPoints, stroke: "#000", width: 1.2, dash: "5,4", opacity: 0.7)
        for (name, members) in series {
            let style = styles[name]!
            let points = members.filter { $0.tokens > 0 && $0.milliseconds > 0 && $0.milliseconds.isFinite }
            timePanel.drawSeries(
                points.map { ($0.tokens, $0.milliseconds, tooltip(name, $0)) }, style: style, canvas: &canvas)
        }

        // % of floor panel.
        let percents = rows.map(\.percentOfFloor).filter(\.isFinite)
        let percentTop = max(100, ((percents.max() ?? 100) / 20).rounded(.up) * 20)
        let percentPanel = Panel(
            left: Layout.panelLeft[1], top: plotTop, x: xAxis, y: .linear(LinearAxis(minimum: 0, maximum: percentTop)))
        percentPanel.drawFrame(batchSizes: batchSizes, yTitle: "% of floor (floor time / time)", canvas: &canvas)
        let hundred = percentPanel.yPosition(100)
        canvas.line(
            x1: percentPanel.left, y1: hundred, x2: percentPanel.left + Layout.panelWidth, y2: hundred, stroke: "#000",
            width: 1, dash: "5,4", opacity: 0.5)
        for (name, members) in series {
            let points = members.filter { $0.tokens > 0 && $0.percentOfFloor.isFinite }
            percentPanel.drawSeries(
                points.map { ($0.tokens, $0.percentOfFloor, tooltip(name, $0)) }, style: styles[name]!, canvas: &canvas)
        }

        // Legend: the floor, then this row's labels.
        var y = plotTop + 4
        canvas.line(
            x1: Layout.legendLeft, y1: y, x2: Layout.legendLeft + 26, y2: y, stroke: "#000", width: 1.2, dash: "5,4",
            opacity: 0.7)
        canvas.text("floor", x: Layout.legendLeft + 34, y: y + 4, size: 12)
        for name in labels {
            y += Layout.legendLine
            let style = styles[name]!
            canvas.line(
                x1: Layout.legendLeft, y1: y, x2: Layout.legendLeft + 26, y2: y, stroke: style.color, width: 2,
                dash: style.dash)
            canvas.circle(x: Layout.legendLeft + 13, y: y, radius: 2.8, fill: style.color)
            canvas.text(name, x: Layout.legendLeft + 34, y: y + 4, size: 12)
        }
        let legendBottom = y + 10 - top
        return max(Layout.panelTop + Layout.panelHeight + 48, legendBottom) + Layout.rowGap
    }

    /// `value` per second with a prefix that keeps three significant figures or so: 4.27 TB/s, 52.1 GFLOP/s.
    static func rate(_ value: Double, _ unit: String) -> String {
        for (scale, prefix) in [(1e12, "T"), (1e9, "G"), (1e6, "M")] where value >= scale {
            let scaled = value / scale
            return format(scaled, scaled >= 100 ? 0 : scaled >= 10 ? 1 : 2) + " " + prefix + unit
        }
        return format(value, 0) + " " + unit
    }

    static func tooltip(_ name: String, _ row: BenchRow) -> String {
        "\(row.shape) \(name) M=\(row.tokens): \(format(row.milliseconds, 4)) ms, "
            + "floor \(format(row.floorMilliseconds, 4)) ms, \(format(row.percentOfFloor, 1))% of floor, "
            + "rel err \(formatScientific(row.relativeError))"
    }

    static func orderedUnique(_ values: [String]) -> [String] {
        var seen = Set<String>()
        return values.filter { seen.insert($0).inserted }
    }

    // MARK: - Axes and panels

    /// A log axis: `exponent` of `base` from `low` to `high`.
    struct LogAxis {
        var base: Double
        var low: Double
        var high: Double
        var ticks: [Double]

        /// log2 of the batch sizes, from the smallest to the largest power of two around them.
        static func batch(_ sizes: [Int]) -> LogAxis {
            let values = sizes.isEmpty ? [1.0, 2] : sizes.map(Double.init)
            var low = plotLog2(values.min()!).rounded(.down)
            var high = plotLog2(values.max()!).rounded(.up)
            if high <= low { (low, high) = (low - 1, high + 1) }
            return LogAxis(base: 2, low: low, high: high, ticks: values)
        }

        /// log10 of the values, from the largest 1, 2 or 5 times a power of ten at or below the smallest
        /// to the smallest at or above the largest, with ticks at 1, 2 and 5 in each decade (1 alone when
        /// the range spans more than four decades).
        static func decades(_ values: [Double]) -> LogAxis {
            guard let minimum = values.min(), let maximum = values.max() else {
                return LogAxis(base: 10, low: -1, high: 1, ticks: [0.1, 1, 10])
            }
            let firstDecade = plotLog10(minimum).rounded(.down)
            let lastDecade = plotLog10(maximum).rounded(.up)
            let steps: [Double] = lastDecade - firstDecade > 4 ? [1] : [1, 2, 5]
            var candidates: [Double] = []
            var decade = firstDecade
            while decade <= lastDecade {
                candidates += steps.map { $0 * plotPow10(decade) }
                decade += 1
            }
            let lowTick = candidates.last { $0 <= minimum * (1 + 1e-9) } ?? candidates[0]
            let highTick = candidates.first { $0 >= maximum * (1 - 1e-9) } ?? candidates[candidates.count - 1]
            var (low, high) = (plotLog10(lowTick), plotLog10(highTick))
            if high - low < 0.3 { (low, high) = (low - 0.15, high + 0.15) }
            return LogAxis(base: 10, low: low, high: high, ticks: candidates.filter { $0 >= lowTick && $0 <= highTick })
        }

        /// Where `value` falls, from 0 (low) to 1 (high).
        func fraction(_ value: Double) -> Double {
            let exponent = base == 2 ? plotLog2(value) : plotLog10(value)
            return (exponent - low) / (high - low)
        }
    }

    struct LinearAxis {
        var minimum: Double
        var maximum: Double
        var ticks: [Double] {
            let step = maximum > 200 ? 50.0 : 20
            return stride(from: minimum, through: maximum + 1e-9, by: step).map { $0 }
        }
        func fraction(_ value: Double) -> Double { (value - minimum) / (maximum - minimum) }
    }

    enum ValueAxis {
        case log(LogAxis)
        case linear(LinearAxis)
    }

    struct Panel {
        var left: Double
        var top: Double
        var x: LogAxis
        var y: ValueAxis

        var width: Double { Layout.panelWidth }
        var height: Double { Layout.panelHeight }

        func xPosition(_ m: Int) -> Double { left + width * x.fraction(Double(m)) }
        func yPosition(_ value: Double) -> Double {
            let fraction =
                switch y {
                case .log(let axis): axis.fraction(value)
                case .linear(let axis): axis.fraction(value)
                }
            return top + height * (1 - min(max(fraction, -0.02), 1.02))
        }
        func point(m: Int, value: Double) -> (Double, Double) { (xPosition(m), yPosition(value)) }

        /// The frame, the grid, the ticks and the axis titles.
        func drawFrame(batchSizes: [Int], yTitle: String, canvas: inout SVGCanvas) {
            canvas.rect(x: left, y: top, width: width, height: height, fill: "#fbfbfb", stroke: "#999")
            // Vertical grid: every power of two, labelled at the batch sizes measured.
            var power = x.low
            while power <= x.high + 1e-9 {
                let position = left + width * (power - x.low) / (x.high - x.low)
                canvas.line(x1: position, y1: top, x2: position, y2: top + height, stroke: "#e4e4e4", width: 1)
                power += 1
            }
            var lastLabelEnd = -Double.infinity
            for m in batchSizes {
                let position = xPosition(m)
                canvas.line(
                    x1: position, y1: top + height, x2: position, y2: top + height + 5, stroke: "#555", width: 1)
                let text = "\(m)"
                let halfWidth = Double(text.count) * 3.3
                guard position - halfWidth > lastLabelEnd + 2 else { continue }  // skip a label that would overlap
                canvas.text(text, x: position, y: top + height + 17, size: 11, anchor: "middle")
                lastLabelEnd = position + halfWidth
            }
            canvas.text(
                "batch size M (tokens, log2 scale)", x: left + width / 2, y: top + height + 36, size: 12,
                anchor: "middle")
            let ticks: [Double] =
                switch y {
                case .log(let axis): axis.ticks
                case .linear(let axis): axis.ticks
                }
            for tick in ticks {
                let position = yPosition(tick)
                canvas.line(x1: left, y1: position, x2: left + width, y2: position, stroke: "#e4e4e4", width: 1)
                canvas.line(x1: left - 5, y1: position, x2: left, y2: position, stroke: "#555", width: 1)
                canvas.text(tickLabel(tick), x: left - 8, y: position + 4, size: 11, anchor: "end")
            }
            canvas.text(
                yTitle, x: left - 58, y: top + height / 2, size: 12, anchor: "middle", rotate: -90)
        }

        /// A line through `points` (M, value, tooltip), with a marker at each.
        func drawSeries(_ points: [(Int, Double, String)], style: SeriesStyle, canvas: inout SVGCanvas) {
            canvas.polyline(
                points.map { point(m: $0.0, value: $0.1) }, stroke: style.color, width: 1.8, dash: style.dash)
            for (m, value, tooltip) in points {
                canvas.circle(x: xPosition(m), y: yPosition(value), radius: 2.8, fill: style.color, title: tooltip)
            }
        }
    }

    /// `value` with as few decimals as it needs: 0.002, 0.05, 1, 20, 500.
    static func tickLabel(_ value: Double) -> String {
        if value >= 1 || value <= 0 { return format(value, 0) }
        var digits = 0
        var scaled = value
        while scaled < 0.999_999 && digits < 12 {
            scaled *= 10
            digits += 1
        }
        return format(value, digits)
    }

    /// A label's colour and dash pattern: ten colours, then the same ten dashed, then dotted.
    struct SeriesStyle {
        var color: String
        var dash: String?

        static let palette = [
            "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
            "#7f7f7f",
        ]

        init(index: Int) {
            color = SeriesStyle.palette[index % SeriesStyle.palette.count]
            switch index / SeriesStyle.palette.count {
            case 0: dash = nil
            case 1: dash = "7,3"
            default: dash = "2,2"
            }
        }
    }
}

/// SVG text built element by element; text is escaped.
struct SVGCanvas {
    var elements: [String] = []

    static func number(_ value: Double) -> String { format(value, 1) }

    static func escape(_ text: String) -> String {
        var escaped = ""
        for character in text {
            switch character {
            case "&": escaped += "&amp;"
            case "<": escaped += "&lt;"
            case ">": escaped += "&gt;"
            case "\"": escaped += "&quot;"
            case "'": escaped += "&apos;"
            default: escaped.append(character)
            }
        }
        return escaped
    }

    mutating func text(
        _ content: String, x: Double, y: Double, size: Double, anchor: String = "start", weight: String? = nil,
        fill: String = "#111", rotate: Double? = nil
    ) {
        var attributes =
            "x=\"\(Self.number(x))\" y=\"\(Self.number(y))\" font-size=\"\(Self.number(size))\" fill=\"\(fill)\""
        if anchor != "start" { attributes += " text-anchor=\"\(anchor)\"" }
        if let weight { attributes += " font-weight=\"\(weight)\"" }
        if let rotate {
            attributes += " transform=\"rotate(\(Self.number(rotate)) \(Self.number(x)) \(Self.number(y)))\""
        }
        elements.append("<text \(attributes)>\(Self.escape(content))</text>")
    }

    mutating func line(
        x1: Double, y1: Double, x2: Double, y2: Double, stroke: String, width: Double, dash: String? = nil,
        opacity: Double = 1
    ) {
        var attributes =
            "x1=\"\(Self.number(x1))\" y1=\"\(Self.number(y1))\" x2=\"\(Self.number(x2))\" y2=\"\(Self.number(y2))\" "
            + "stroke=\"\(stroke)\" stroke-width=\"\(Self.number(width))\""
        if let dash { attributes += " stroke-dasharray=\"\(dash)\"" }
        if opacity < 1 { attributes += " stroke-opacity=\"\(format(opacity, 2))\"" }
        elements.append("<line \(attributes)/>")
    }

    mutating func rect(x: Double, y: Double, width: Double, height: Double, fill: String, stroke: String) {
        elements.append(
            "<rect x=\"\(Self.number(x))\" y=\"\(Self.number(y))\" width=\"\(Self.number(width))\" "
                + "height=\"\(Self.number(height))\" fill=\"\(fill)\" stroke=\"\(stroke)\"/>")
    }

    mutating func polyline(
        _ points: [(Double, Double)], stroke: String, width: Double, dash: String? = nil, opacity: Double = 1
    ) {
        guard !points.isEmpty else { return }
        let list = points.map { "\(Self.number($0.0)),\(Self.number($0.1))" }.joined(separator: " ")
        var attributes =
            "points=\"\(list)\" fill=\"none\" stroke=\"\(stroke)\" stroke-width=\"\(Self.number(width))\""
            + " stroke-linejoin=\"round\""
        if let dash { attributes += " stroke-dasharray=\"\(dash)\"" }
        if opacity < 1 { attributes += " stroke-opacity=\"\(format(opacity, 2))\"" }
        elements.append("<polyline \(attributes)/>")
    }

    mutating func circle(x: Double, y: Double, radius: Double, fill: String, title: String? = nil) {
        let attributes =
            "cx=\"\(Self.number(x))\" cy=\"\(Self.number(y))\" r=\"\(Self.number(radius))\" fill=\"\(fill)\""
        if let title {
            elements.append("<circle \(attributes)><title>\(Self.escape(title))</title></circle>")
        } else {
            elements.append("<circle \(attributes)/>")
        }
    }

    func document(width: Double, height: Double) -> String {
        let (w, h) = (Self.number(width), Self.number(height))
        return """
            <?xml version="1.0" encoding="UTF-8"?>
            <svg xmlns="http://www.w3.org/2000/svg" width="\(w)" height="\(h)" viewBox="0 0 \(w) \(h)" \
            font-family="Helvetica, Arial, sans-serif">
            <rect x="0" y="0" width="\(w)" height="\(h)" fill="#ffffff"/>

            """ + elements.joined(separator: "\n") + "\n</svg>\n"
    }
}
