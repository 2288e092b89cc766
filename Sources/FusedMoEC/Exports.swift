import CUDA
import FusedMoE

// The C functions of fused_moe.h. Each one runs its body through `entry`, which clears the
// thread's last message, turns any thrown `ABIError` into a status and a message, and returns
// the status: no Swift error crosses into C, and every argument is checked before it is used.

/// The library version (fused_moe.h's FUSED_MOE_VERSION_*).
enum Version {
    static let major: Int32 = 0
    static let minor: Int32 = 2
    static let patch: Int32 = 0
}

@inline(__always)
private func entry(_ function: StaticString, _ body: () throws(ABIError) -> Void) -> CInt {
    LastError.clear()
    do {
        try body()
        return Status.ok.rawValue
    } catch {
        LastError.set("\(function): \(error.message)")
        return error.status.rawValue
    }
}

private func requireOutput<T>(_ pointer: UnsafeMutablePointer<T>?, _ name: String) throws(ABIError)
    -> UnsafeMutablePointer<T>
{
    guard let pointer else { throw .invalid(name, "null pointer") }
    return pointer
}

/// `int fused_moe_version(int32_t *major, int32_t *minor, int32_t *patch)`
@_cdecl("fused_moe_version")
public func fused_moe_version(
    _ major: UnsafeMutablePointer<Int32>?, _ minor: UnsafeMutablePointer<Int32>?, _ patch: UnsafeMutablePointer<Int32>?
) -> CInt {
    entry("fused_moe_version") { () throws(ABIError) in
        let (majorOut, minorOut, patchOut) = (
            try requireOutput(major, "major"), try requireOutput(minor, "minor"), try requireOutput(patch, "patch")
        )
        majorOut.pointee = Version.major
        minorOut.pointee = Version.minor
        patchOut.pointee = Version.patch
    }
}

/// `const char *fused_moe_last_error(void)`
@_cdecl("fused_moe_last_error")
public func fused_moe_last_error() -> UnsafePointer<CChar> {
    LastError.current
}

/// `int fused_moe_options_init(fused_moe_options *options)`
@_cdecl("fused_moe_options_init")
public func fused_moe_options_init(_ options: UnsafeMutableRawPointer?) -> CInt {
    entry("fused_moe_options_init") { () throws(ABIError) in
        guard let options else { throw .invalid("options", "null pointer") }
        LayerOptions.writeDefaults(to: options)
    }
}

/// `int fused_moe_layer_create(fused_moe_layer **out, int64_t experts, int64_t top_k, int64_t hidden,
/// int64_t intermediate, int dtype, const fused_moe_options *options)`
@_cdecl("fused_moe_layer_create")
public func fused_moe_layer_create(
    _ out: UnsafeMutablePointer<OpaquePointer?>?, _ experts: Int64, _ topK: Int64, _ hidden: Int64,
    _ intermediate: Int64, _ dtype: CInt, _ options: UnsafeRawPointer?
) -> CInt {
    entry("fused_moe_layer_create") { () throws(ABIError) in
        let out = try requireOutput(out, "out")
        out.pointee = nil
        let handle = try LayerHandle.layer(
            experts: experts, topK: topK, hidden: hidden, intermediate: intermediate, dtype: dtype, options: options)
        out.pointee = try Registry.insert(handle)
    }
}

/// `int fused_moe_router_create(fused_moe_layer **out, int64_t num_experts, int64_t top_k, int renormalize,
/// int device)`
@_cdecl("fused_moe_router_create")
public func fused_moe_router_create(
    _ out: UnsafeMutablePointer<OpaquePointer?>?, _ numExperts: Int64, _ topK: Int64, _ renormalize: CInt,
    _ device: CInt
) -> CInt {
    entry("fused_moe_router_create") { () throws(ABIError) in
        let out = try requireOutput(out, "out")
        out.pointee = nil
        let handle = try LayerHandle.router(
            numExperts: numExperts, topK: topK, renormalize: renormalize, device: device)
        out.pointee = try Registry.insert(handle)
    }
}

/// `int fused_moe_layer_destroy(fused_moe_layer *layer)`
@_cdecl("fused_moe_layer_destroy")
public func fused_moe_layer_destroy(_ layer: OpaquePointer?) -> CInt {
    entry("fused_moe_layer_destroy") { () throws(ABIError) in
        guard let layer else { return }
        let handle = try Registry.remove(layer)
        // Its buffers are freed in this context (the one they were allocated in).
        try? handle.gpu?.device.makeCurrent()
    }
}

/// `int fused_moe_layer_get_info(const fused_moe_layer *layer, fused_moe_layer_info *info)`
@_cdecl("fused_moe_layer_get_info")
public func fused_moe_layer_get_info(_ layer: OpaquePointer?, _ info: UnsafeMutableRawPointer?) -> CInt {
    entry("fused_moe_layer_get_info") { () throws(ABIError) in
        let handle = try Registry.lookup(layer)
        guard let info else { throw .invalid("info", "null pointer") }
        let dtypeCode: Int64 =
            switch handle.dtype {
            case .bf16: 0
            case .fp16: 1
            case .fp32: 2
            case nil: -1
            }
        let fields: [Int64] = [
            Int64(handle.experts), Int64(handle.topK), Int64(handle.hidden), Int64(handle.intermediate),
            Int64(handle.routedExperts), dtypeCode, Int64(handle.maxTokens), Int64(handle.scratchBytes),
            Int64(handle.gpu?.layers.count ?? 0), Int64(handle.deviceOrdinal ?? -1),
        ]
        for (index, value) in fields.enumerated() {
            info.storeBytes(of: value, toByteOffset: index * 8, as: Int64.self)
        }
    }
}

/// `int fused_moe_forward(fused_moe_layer *layer, const void *x, const int32_t *topk_ids,
/// const float *topk_weights, const void *w1, const void *w2, void *out, int64_t tokens,
/// int64_t x_row_stride, int64_t out_row_stride, void *cuda_stream)`
@_cdecl("fused_moe_forward")
public func fused_moe_forward(
    _ layer: OpaquePointer?, _ x: UnsafeRawPointer?, _ topkIDs: UnsafePointer<Int32>?,
    _ topkWeights: UnsafePointer<Float>?, _ w1: UnsafeRawPointer?, _ w2: UnsafeRawPointer?,
    _ out: UnsafeMutableRawPointer?, _ tokens: Int64, _ xRowStride: Int64, _ outRowStride: Int64,
    _ cudaStream: UnsafeMutableRawPointer?
) -> CInt {
    entry("fused_moe_forward") { () throws(ABIError) in
        let handle = try Registry.lookup(layer)
        try handle.forward(
            x: x, topkIDs: UnsafeRawPointer(topkIDs), topkWeights: UnsafeRawPointer(topkWeights), w1: w1, w2: w2,
            out: UnsafeRawPointer(out), tokens: tokens, xRowStride: xRowStride, outRowStride: outRowStride,
            stream: cudaStream)
    }
}

/// `int fused_moe_route(fused_moe_layer *layer, const void *router_logits, int logits_dtype, int64_t tokens,
/// int64_t num_experts, int32_t *topk_ids, float *topk_weights, void *cuda_stream)`
@_cdecl("fused_moe_route")
public func fused_moe_route(
    _ layer: OpaquePointer?, _ routerLogits: UnsafeRawPointer?, _ logitsDType: CInt, _ tokens: Int64,
    _ numExperts: Int64, _ topkIDs: UnsafeMutablePointer<Int32>?, _ topkWeights: UnsafeMutablePointer<Float>?,
    _ cudaStream: UnsafeMutableRawPointer?
) -> CInt {
    entry("fused_moe_route") { () throws(ABIError) in
        let handle = try Registry.lookup(layer)
        try handle.route(
            logits: routerLogits, logitsDType: logitsDType, tokens: tokens, numExperts: numExperts,
            topkIDs: UnsafeRawPointer(topkIDs), topkWeights: UnsafeRawPointer(topkWeights), stream: cudaStream)
    }
}
