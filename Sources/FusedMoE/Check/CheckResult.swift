/// The outcome of one check of `fused-moe check`.
public struct CheckResult: Sendable {
    public var name: String
    public var passed: Bool
    public var detail: String

    public init(name: String, passed: Bool, detail: String) {
        self.name = name
        self.passed = passed
        self.detail = detail
    }

    public var line: String { (passed ? "PASS " : "FAIL ") + name + (detail.isEmpty ? "" : "  " + detail) }
}

/// The relative-error bound a result in `dtype` must meet against the float64 reference.
public func errorBound(_ dtype: DType) -> Double {
    switch dtype {
    case .bf16: 1e-2
    case .fp16: 2e-3
    case .fp32: 1e-5
    }
}
