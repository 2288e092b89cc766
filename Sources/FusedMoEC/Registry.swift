import CUDA
import FusedMoE
import Synchronization

/// The live handles. A `fused_moe_layer *` is a key into this table, never the address of a Swift
/// object, so a destroyed or foreign handle is found missing instead of dereferenced.
enum Registry {
    private struct State {
        var nextKey: UInt = 1
        var handles: [UInt: LayerHandle] = [:]
    }

    private static let state = Mutex(State())

    /// Registers a handle and returns its C value.
    static func insert(_ handle: LayerHandle) throws(ABIError) -> OpaquePointer {
        let key = state.withLock { state in
            let key = state.nextKey
            state.nextKey &+= 1
            state.handles[key] = handle
            return key
        }
        guard let pointer = OpaquePointer(bitPattern: key) else { throw .internal("handle keys ran out") }
        return pointer
    }

    /// The handle behind a C value.
    /// - Throws: invalid argument `name` for NULL or a value that is not live.
    static func lookup(_ pointer: OpaquePointer?, _ name: String = "layer") throws(ABIError) -> LayerHandle {
        guard let pointer else { throw .invalid(name, "null pointer") }
        let key = UInt(bitPattern: pointer)
        guard let handle = state.withLock({ $0.handles[key] }) else { throw notLive(key, name) }
        return handle
    }

    /// Unregisters a handle and returns it (its memory goes when the last user lets go of it).
    static func remove(_ pointer: OpaquePointer, _ name: String = "layer") throws(ABIError) -> LayerHandle {
        let key = UInt(bitPattern: pointer)
        guard let handle = state.withLock({ $0.handles.removeValue(forKey: key) }) else { throw notLive(key, name) }
        return handle
    }

    private static func notLive(_ key: UInt, _ name: String) -> ABIError {
        .invalid(
            name,
            "0x\(String(key, radix: 16)) is not a live layer: destroyed already, or not made by "
                + "fused_moe_layer_create or fused_moe_router_create")
    }
}

/// One `KernelLibrary` per device for the process, so that layers share loaded modules.
enum Libraries {
    private static let libraries = Mutex<[Int: KernelLibrary]>([:])

    /// The library of device `ordinal`, made (driver, context, NVRTC) on first use.
    /// - Throws: invalid argument `argument` for an ordinal out of range; CUDA errors otherwise.
    static func library(ordinal: Int, argument: String) throws(ABIError) -> KernelLibrary {
        try libraries.withLock { (libraries) throws(ABIError) -> KernelLibrary in
            if let library = libraries[ordinal] { return library }
            do {
                let count = try Device.count()
                guard ordinal < count else {
                    throw ABIError.invalid(
                        argument, "device ordinal \(ordinal) is out of range: \(count) GPU(s) are visible")
                }
                let library = try KernelLibrary(device: try Device(ordinal: ordinal))
                libraries[ordinal] = library
                return library
            } catch let error as ABIError {
                throw error
            } catch let error as CUDAError {
                throw ABIError(error)
            } catch {
                throw .internal("\(error)")
            }
        }
    }
}
