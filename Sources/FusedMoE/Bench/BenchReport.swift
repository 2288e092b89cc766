/// One timed case of `fused-moe bench`.
public struct BenchRow: Sendable {
    public var shape: String
    public var moeShape: MoEShape
    public var tokens: Int
    public var variant: String
    public var splitK: Int
    public var splitMode: String
    public var milliseconds: Double
    public var floorMilliseconds: Double
    /// The floor with the matrix rate measured in synchronized bursts (`Ceilings.burstMatrixFlopsPerSecond`),
    /// when the ceilings have one: the stricter reading of a compute-bound row.
    public var burstFloorMilliseconds: Double?
    public var relativeError: Double
    /// Experts with at least one pair, over the timed input sets (their mean: each set routes anew).
    public var expertsTouched: Double
    /// Per-stage milliseconds of one un-graphed forward, when asked for (`bench --stages`).
    public var stages: [(String, Double)] = []

    public init(
        shape: String, moeShape: MoEShape, tokens: Int, variant: String, splitK: Int, splitMode: String,
        milliseconds: Double, floorMilliseconds: Double, relativeError: Double, expertsTouched: Double
    ) {
        self.shape = shape
        self.moeShape = moeShape
        self.tokens = tokens
        self.variant = variant
        self.splitK = splitK
        self.splitMode = splitMode
        self.milliseconds = milliseconds
        self.floorMilliseconds = floorMilliseconds
        self.relativeError = relativeError
        self.expertsTouched = expertsTouched
    }

    /// The floor over the measured time, in percent.
    public var percentOfFloor: Double { milliseconds > 0 ? 100 * floorMilliseconds / milliseconds : 0 }

    /// The burst floor over the measured time, in percent, when there is one.
    public var percentOfBurstFloor: Double? {
        burstFloorMilliseconds.map { milliseconds > 0 ? 100 * $0 / milliseconds : 0 }
    }
}

/// The ceilings of the machine measured in the same run: copy bandwidth and matrix rate.
///
/// `matrixFlopsPerSecond` is what the floor uses: on a GPU, the rate sustained under back-to-back load,
/// the way a bench row is timed (scripts/ceilings.py; bench/NOTES.md v30), of `matrixDType` products.
/// `burstMatrixFlopsPerSecond`, when known, is the higher rate of short synchronized bursts, before the
/// card reaches its power cap.
public struct Ceilings: Sendable {
    public var copyBytesPerSecond: Double
    public var matrixFlopsPerSecond: Double
    public var burstMatrixFlopsPerSecond: Double?
    /// Whose products the matrix rate timed: bf16, or fp16 for fp16 layers where the file has it (at its
    /// power cap the H200 sustains 4% less in fp16: 650 against 679 TFLOP/s, NOTES v41).
    public var matrixDType: DType

    public init(
        copyBytesPerSecond: Double, matrixFlopsPerSecond: Double, burstMatrixFlopsPerSecond: Double? = nil,
        matrixDType: DType = .bf16
    ) {
        self.copyBytesPerSecond = copyBytesPerSecond
        self.matrixFlopsPerSecond = matrixFlopsPerSecond
        self.burstMatrixFlopsPerSecond = burstMatrixFlopsPerSecond
        self.matrixDType = matrixDType
    }

    /// The ceilings of a `--ceilings` file (scripts/ceilings.py's JSON) for layers of `dtype`: positive
    /// `copy_bytes_per_s` and `bf16_flops_per_s`, and `bf16_flops_per_s_burst` if present; for fp16,
    /// `fp16_flops_per_s` (and `_burst`) instead where the file has them (`matrixDType` says which). The
    /// copy ceiling is the faster of the file's and `measuredCopy` (this process's own measurement), when
    /// that is given.
    public static func parse(json text: String, source: String, measuredCopy: Double? = nil, dtype: DType = .bf16)
        throws -> Ceilings
    {
        let json = try JSON.parse(text, source: source)
        guard let copyRate = json["copy_bytes_per_s"]?.doubleValue, copyRate > 0,
            json["bf16_flops_per_s"]?.doubleValue ?? 0 > 0
        else {
            throw MoEError.invalidArgument(
                "--ceilings", "'\(source)' needs positive copy_bytes_per_s and bf16_flops_per_s")
        }
        let matrixDType: DType = dtype == .fp16 && json["fp16_flops_per_s"] != nil ? .fp16 : .bf16
        func rate(_ key: String) throws -> Double? {
            guard let value = json[key] else { return nil }
            guard let rate = value.doubleValue, rate > 0 else {
                throw MoEError.invalidArgument("--ceilings", "'\(source)': \(key) must be a positive number")
            }
            return rate
        }
        return Ceilings(
            copyBytesPerSecond: max(copyRate, measuredCopy ?? 0),
            matrixFlopsPerSecond: try rate("\(matrixDType)_flops_per_s")!,
            burstMatrixFlopsPerSecond: try rate("\(matrixDType)_flops_per_s_burst"), matrixDType: matrixDType)
    }

    /// These ceilings with the burst matrix rate as the matrix rate, when there is one.
    public var burst: Ceilings? {
        burstMatrixFlopsPerSecond.map {
            Ceilings(copyBytesPerSecond: copyBytesPerSecond, matrixFlopsPerSecond: $0, matrixDType: matrixDType)
        }
    }

    /// max(bytes / bandwidth, flops / rate) in milliseconds for `tokens` tokens of a layer.
    public func floorMilliseconds(shape: MoEShape, tokens: Int, expertsTouched: Int, dtype: DType) -> Double {
        let bytes = shape.minimumBytes(tokens: tokens, expertsTouched: expertsTouched, dtype: dtype)
        return 1000 * max(bytes / copyBytesPerSecond, shape.flops(tokens: tokens) / matrixFlopsPerSecond)
    }

    /// The floor per forward of a timed run that goes through several input sets once each, set i
    /// touching `expertsTouched[i]` experts (each set routes its tokens anew): the mean of their floors.
    public func meanFloorMilliseconds(shape: MoEShape, tokens: Int, expertsTouched: [Int], dtype: DType) -> Double {
        guard !expertsTouched.isEmpty else { return 0 }
        return expertsTouched.map { floorMilliseconds(shape: shape, tokens: tokens, expertsTouched: $0, dtype: dtype) }
            .reduce(0, +) / Double(expertsTouched.count)
    }
}

/// A whole bench run, written as DESIGN.md's results file.
public struct BenchReport: Sendable {
    public var device: String
    public var driver: String
    public var commit: String
    public var date: String
    public var ceilings: Ceilings
    public var rows: [BenchRow]
    /// How the routing was drawn when not as usual (`bench --touched-like`); written as "routing".
    public var routing: String?

    public init(
        device: String, driver: String, commit: String, date: String, ceilings: Ceilings, rows: [BenchRow],
        routing: String? = nil
    ) {
        self.device = device
        self.driver = driver
        self.commit = commit
        self.date = date
        self.ceilings = ceilings
        self.rows = rows
        self.routing = routing
    }

    public var json: JSON {
        .object([
            ("device", .string(device)),
            ("driver", .string(driver)),
            ("commit", .string(commit)),
            ("date", .string(date)),
        ] + (routing.map { [("routing", JSON.string($0))] } ?? []) + [
            ("ceilings", .object([
                ("copy_bytes_per_s", .number(ceilings.copyBytesPerSecond)),
                ("\(ceilings.matrixDType)_flops_per_s", .number(ceilings.matrixFlopsPerSecond)),
            ] + (ceilings.burstMatrixFlopsPerSecond.map { [("\(ceilings.matrixDType)_flops_per_s_burst", JSON.number($0))] }
                ?? []))),
            ("rows", .array(rows.map { row in
                .object([
                    ("shape", .string(row.shape)),
                    ("E", .number(Double(row.moeShape.experts))),
                    ("topk", .number(Double(row.moeShape.topK))),
                    ("H", .number(Double(row.moeShape.hidden))),
                    ("I", .number(Double(row.moeShape.intermediate))),
                    ("M", .number(Double(row.tokens))),
                    ("variant", .string(row.variant)),
                    ("split_k", .number(Double(row.splitK))),
                    ("split_mode", .string(row.splitMode)),
                    ("ms", .number(row.milliseconds)),
                    ("floor_ms", .number(row.floorMilliseconds)),
                ] + (row.burstFloorMilliseconds.map { [("floor_ms_burst", JSON.number($0))] } ?? []) + [
                    ("rel_err", .number(row.relativeError)),
                    ("experts_touched", .number(row.expertsTouched)),
                ] + (row.stages.isEmpty ? [] : [("stages_ms", .object(row.stages.map { ($0.0, .number($0.1)) }))]))
            })),
        ])
    }

    /// A fixed-width table, one line per row; a `%burst` column (the % of the burst floor) when any
    /// row has one.
    public func table() -> String {
        let burst = rows.contains { $0.burstFloorMilliseconds != nil }
        var lines = [
            pad("shape", 12) + pad("M", 6) + pad("variant", 16) + pad("split", 6) + pad("mode", 22)
                + pad("ms", 10) + pad("floor_ms", 10) + pad("%floor", 8) + (burst ? pad("%burst", 8) : "") + "rel_err"
        ]
        for row in rows {
            let burstText = burst ? pad(row.percentOfBurstFloor.map { format($0, 1) } ?? "-", 8) : ""
            lines.append(
                pad(row.shape, 12) + pad("\(row.tokens)", 6) + pad(row.variant, 16) + pad("\(row.splitK)", 6)
                    + pad(row.splitMode, 22) + pad(format(row.milliseconds, 4), 10)
                    + pad(format(row.floorMilliseconds, 4), 10) + pad(format(row.percentOfFloor, 1), 8) + burstText
                    + formatScientific(row.relativeError))
        }
        return lines.joined(separator: "\n")
    }
}

func pad(_ text: String, _ width: Int) -> String {
    text.count >= width ? text + " " : text + String(repeating: " ", count: width - text.count)
}

/// `value` with `digits` decimals.
public func format(_ value: Double, _ digits: Int) -> String {
    guard value.isFinite else { return "\(value)" }
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let rounded = (abs(value) * scale).rounded()
    let whole = Int(rounded / scale)
    var text = (value < 0 ? "-" : "") + String(whole)
    if digits > 0 {
        let fraction = Int(rounded - Double(whole) * scale)
        let fractionText = String(fraction)
        text += "." + String(repeating: "0", count: digits - fractionText.count) + fractionText
    }
    return text
}

/// `value` as `1.23e-04`.
public func formatScientific(_ value: Double) -> String {
    guard value.isFinite else { return "\(value)" }
    if value == 0 { return "0" }
    var exponent = 0
    var mantissa = abs(value)
    while mantissa >= 10 { mantissa /= 10; exponent += 1 }
    while mantissa < 1 { mantissa *= 10; exponent -= 1 }
    let sign = exponent < 0 ? "-" : "+"
    let digits = abs(exponent) < 10 ? "0\(abs(exponent))" : "\(abs(exponent))"
    return (value < 0 ? "-" : "") + format(mantissa, 2) + "e" + sign + digits
}
