import CUDA
import FusedMoE

/// Checks of the values that come through the C ABI, each throwing an `ABIError` that names the
/// argument as the header spells it. Nothing here dereferences a device pointer.
enum Arguments {
    /// The largest H or I accepted: keeps every size product far from overflowing `Int`.
    static let maximumDimension = 1 << 20
    /// The largest `max_tokens` and `chunk_tokens` accepted.
    static let maximumTokens = 1 << 24
    /// The most experts the router and align kernels take.
    static let maximumRoutedExperts = 512
    /// The most experts per token the GPU router and align take.
    static let maximumTopK = 32

    /// `value` must lie in `range`.
    static func require(_ value: Int64, in range: ClosedRange<Int64>, _ name: String) throws(ABIError) {
        guard range.contains(value) else {
            throw .invalid(name, "must be in \(range.lowerBound)...\(range.upperBound), got \(value)")
        }
    }

    /// The element type of a dtype code, for layers (bf16, fp16) or for router logits (fp32 too).
    static func dtype(_ code: CInt, _ name: String, allowFP32: Bool) throws(ABIError) -> DType {
        switch code {
        case 0: return .bf16
        case 1: return .fp16
        case 2 where allowFP32: return .fp32
        case 2: throw .unsupported("'\(name)' FUSED_MOE_FP32 (2): the GPU layer runs bf16 and fp16")
        default:
            let codes =
                allowFP32
                ? "FUSED_MOE_BF16 (0), FUSED_MOE_FP16 (1) or FUSED_MOE_FP32 (2)"
                : "FUSED_MOE_BF16 (0) or FUSED_MOE_FP16 (1)"
            throw .invalid(name, "expected \(codes), got \(code)")
        }
    }

    /// A device address `count` bytes long: non-null, aligned, and not wrapping around the address space.
    static func devicePointer(_ pointer: UnsafeRawPointer?, bytes count: Int, alignment: Int, _ name: String)
        throws(ABIError) -> DevicePointer
    {
        guard let pointer else { throw .invalid(name, "null pointer") }
        let address = UInt64(UInt(bitPattern: pointer))
        guard address % UInt64(alignment) == 0 else {
            throw .invalid(name, "address 0x\(String(address, radix: 16)) is not \(alignment)-byte aligned")
        }
        let (_, overflow) = address.addingReportingOverflow(UInt64(count))
        guard !overflow else {
            throw .invalid(name, "address 0x\(String(address, radix: 16)) + \(count) bytes wraps around")
        }
        return DevicePointer(address: address)
    }

    /// `a * b * ...` when it fits an `Int`, else an invalid-argument error naming `name`.
    static func product(_ factors: Int..., name: String) throws(ABIError) -> Int {
        var result = 1
        for factor in factors {
            let (value, overflow) = result.multipliedReportingOverflow(by: factor)
            guard !overflow, value >= 0 else { throw .invalid(name, "the size \(factors) overflows") }
            result = value
        }
        return result
    }
}

/// `fused_moe_options`, read field by field at the offsets the header's layout gives (checked
/// there with a static assert), so that no Swift struct layout is assumed.
struct LayerOptions {
    var activation: Activation = .silu
    var renormalize = false
    /// nil: FUSED_MOE_DEVICE_NONE (check arguments only).
    var device: Int? = 0
    var expertMap: [Int32]? = nil
    var maxTokens = 8192
    /// nil: the layer's default (65536).
    var chunkTokens: Int? = nil
    /// nil: the plan's choice.
    var splitK: Int? = nil
    /// nil: the plan's choice.
    var splitMode: SplitMode? = nil
    var combine: CombineMode = .ordered

    /// sizeof(fused_moe_options) in this version.
    static let size = 64
    /// sizeof(fused_moe_options) in version 0.1 (FUSED_MOE_OPTIONS_SIZE_0_1), the smallest accepted: the
    /// fields after it take their defaults.
    static let firstSize = 56

    enum Offset {
        static let structSize = 0
        static let activation = 4
        static let renormalize = 8
        static let device = 12
        static let expertMap = 16
        static let expertMapLength = 24
        static let maxTokens = 32
        static let chunkTokens = 40
        static let splitK = 48
        static let splitMode = 52
        static let combine = 56
        static let reserved = 60
    }

    /// Writes the defaults in the C layout (`fused_moe_options_init`).
    static func writeDefaults(to options: UnsafeMutableRawPointer) {
        options.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        options.storeBytes(of: UInt32(size), toByteOffset: Offset.structSize, as: UInt32.self)
        options.storeBytes(of: Int64(LayerOptions().maxTokens), toByteOffset: Offset.maxTokens, as: Int64.self)
    }

    /// Reads and checks a `const fused_moe_options *`; nil gives the defaults.
    static func read(_ options: UnsafeRawPointer?) throws(ABIError) -> LayerOptions {
        var result = LayerOptions()
        guard let options else { return result }
        func int32(_ offset: Int) -> Int32 { options.loadUnaligned(fromByteOffset: offset, as: Int32.self) }
        func int64(_ offset: Int) -> Int64 { options.loadUnaligned(fromByteOffset: offset, as: Int64.self) }

        let structSize = options.loadUnaligned(fromByteOffset: Offset.structSize, as: UInt32.self)
        guard structSize >= UInt32(firstSize) else {
            throw .invalid(
                "options.struct_size",
                "must be sizeof(fused_moe_options) = \(size), or \(firstSize) for a 0.1 caller (call fused_moe_options_init first), got \(structSize)")
        }
        switch int32(Offset.activation) {
        case 0: result.activation = .silu
        case 1: result.activation = .gelu
        case let code:
            throw .invalid("options.activation", "expected FUSED_MOE_SILU (0) or FUSED_MOE_GELU (1), got \(code)")
        }
        switch int32(Offset.renormalize) {
        case 0: result.renormalize = false
        case 1: result.renormalize = true
        case let value: throw .invalid("options.renormalize", "expected 0 or 1, got \(value)")
        }
        let device = int32(Offset.device)
        guard device >= -1 else {
            throw .invalid(
                "options.device", "expected a device ordinal >= 0 or FUSED_MOE_DEVICE_NONE (-1), got \(device)")
        }
        result.device = device == -1 ? nil : Int(device)

        let mapPointer = options.loadUnaligned(fromByteOffset: Offset.expertMap, as: UInt.self)
        let mapLength = int64(Offset.expertMapLength)
        if mapPointer == 0 {
            guard mapLength == 0 else {
                throw .invalid("options.expert_map", "null pointer with expert_map_length = \(mapLength)")
            }
        } else {
            try Arguments.require(mapLength, in: 1...Int64(Arguments.maximumRoutedExperts), "options.expert_map_length")
            guard let map = UnsafeRawPointer(bitPattern: mapPointer) else { throw .internal("expert_map address") }
            result.expertMap = (0..<Int(mapLength)).map { map.loadUnaligned(fromByteOffset: $0 * 4, as: Int32.self) }
        }

        let maxTokens = int64(Offset.maxTokens)
        try Arguments.require(maxTokens, in: 1...Int64(Arguments.maximumTokens), "options.max_tokens")
        result.maxTokens = Int(maxTokens)
        let chunkTokens = int64(Offset.chunkTokens)
        if chunkTokens != 0 {
            try Arguments.require(chunkTokens, in: 1...Int64(Arguments.maximumTokens), "options.chunk_tokens")
            result.chunkTokens = Int(chunkTokens)
        }

        let splitK = int32(Offset.splitK)
        guard [0, 1, 2, 4, 8, 16].contains(splitK) else {
            throw .invalid("options.split_k", "expected 0 (the plan's choice), 1, 2, 4, 8 or 16, got \(splitK)")
        }
        result.splitK = splitK == 0 ? nil : Int(splitK)
        switch int32(Offset.splitMode) {
        case 0: result.splitMode = nil
        case 1: result.splitMode = SplitMode.none
        case 2: result.splitMode = .atomic
        case 3: result.splitMode = .workspace
        case let code:
            throw .invalid("options.split_mode", "expected a FUSED_MOE_SPLIT_* code in 0...3, got \(code)")
        }
        if result.splitMode == SplitMode.none, let forced = result.splitK, forced > 1 {
            throw .invalid("options.split_mode", "FUSED_MOE_SPLIT_NONE with split_k = \(forced); use 0 or 1")
        }
        // Since 0.2: read only where the caller's struct has them.
        if structSize >= UInt32(Offset.combine + 4) {
            switch int32(Offset.combine) {
            case 0: result.combine = .ordered
            case 1: result.combine = .atomic
            case let code:
                throw .invalid(
                    "options.combine", "expected FUSED_MOE_COMBINE_ORDERED (0) or FUSED_MOE_COMBINE_ATOMIC (1), got \(code)")
            }
        }
        if structSize >= UInt32(Offset.reserved + 4) {
            let reserved = int32(Offset.reserved)
            guard reserved == 0 else { throw .invalid("options.reserved", "must be 0, got \(reserved)") }
        }
        return result
    }

    /// The plan with the split overrides applied to both GEMMs.
    func applyingOverrides(to plan: MoEPlan) -> MoEPlan {
        func override(_ config: GemmConfig) -> GemmConfig {
            var config = config
            if let splitK { config.splitK = splitK }
            if let splitMode {
                config.splitMode = splitMode
                if splitMode == .none { config.splitK = 1 }
            }
            if config.splitK == 1 {
                config.splitMode = .none
            } else if config.splitMode == .none {
                config.splitMode = .workspace
            }
            return config
        }
        var plan = plan
        plan.gemm1 = override(plan.gemm1)
        plan.gemm2 = override(plan.gemm2)
        return plan
    }
}
