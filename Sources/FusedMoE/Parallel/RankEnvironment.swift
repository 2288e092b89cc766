import CUDA

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What a rank process learns from its environment: `fused-moe ep launch` sets these variables in
/// each child it starts (on top of the parent's environment, passed through unchanged), and any
/// other launcher (a job script, mpirun) can set them the same way.
public struct RankEnvironment: Hashable, Sendable {
    /// This process's rank, 0..<worldSize.
    public static let rankVariable = "FUSED_MOE_RANK"
    /// The number of ranks.
    public static let worldSizeVariable = "FUSED_MOE_WORLD_SIZE"
    /// A file holding the NCCL unique id as 256 hex digits (see `NCCLUniqueID`).
    public static let idFileVariable = "FUSED_MOE_NCCL_ID_FILE"
    /// The CUDA device ordinal this rank drives (the launcher sets it to the rank). The GPUs stay
    /// all visible to every rank (CUDA_VISIBLE_DEVICES is left as it is) so NCCL sees the topology.
    public static let deviceVariable = "FUSED_MOE_DEVICE"

    public var rank: Int
    public var worldSize: Int
    public var idFile: String?
    public var deviceOrdinal: Int

    public init(rank: Int, worldSize: Int, idFile: String?, deviceOrdinal: Int) {
        self.rank = rank
        self.worldSize = worldSize
        self.idFile = idFile
        self.deviceOrdinal = deviceOrdinal
    }

    /// The environment's rank settings; nil when `FUSED_MOE_RANK` is unset (not a rank process).
    /// - Throws: `MoEError.invalidArgument` naming the variable that is malformed or missing.
    public static func current() throws(MoEError) -> RankEnvironment? {
        guard let rankText = value(rankVariable) else { return nil }
        guard let rank = Int(rankText), rank >= 0 else {
            throw .invalidArgument(rankVariable, "expected a rank >= 0, got '\(rankText)'")
        }
        guard let sizeText = value(worldSizeVariable), let size = Int(sizeText), size > rank else {
            throw .invalidArgument(
                worldSizeVariable,
                "expected a world size above the rank \(rank), got '\(value(worldSizeVariable) ?? "")'")
        }
        var device = rank
        if let deviceText = value(deviceVariable) {
            guard let ordinal = Int(deviceText), ordinal >= 0 else {
                throw .invalidArgument(deviceVariable, "expected a device ordinal >= 0, got '\(deviceText)'")
            }
            device = ordinal
        }
        let idFile = value(idFileVariable)
        guard size == 1 || idFile != nil else {
            throw .invalidArgument(
                idFileVariable, "world size \(size) needs the NCCL id file's path; `fused-moe ep launch` sets it")
        }
        return RankEnvironment(rank: rank, worldSize: size, idFile: idFile, deviceOrdinal: device)
    }

    private static func value(_ name: String) -> String? {
        guard let raw = getenv(name) else { return nil }
        let text = String(cString: raw)
        return text.isEmpty ? nil : text
    }

    /// This rank's exchange: the loopback for a world of one, else an NCCL communicator from the id
    /// file. When the file does not exist yet, rank 0 makes a fresh id and writes it there
    /// (launchers other than ours need not), and the other ranks wait for it.
    /// - Throws: `MoEError.cuda` with NCCL's or the file's error.
    public func makeExchange(device: Device) throws(MoEError) -> any ExpertParallelExchange {
        guard worldSize > 1 else { return LoopbackExchange(device: device) }
        guard let idFile else { throw .invalidArgument(RankEnvironment.idFileVariable, "is not set") }
        do {
            if rank == 0 && access(idFile, F_OK) != 0 {
                try NCCL.shared().makeUniqueID().write(toFile: idFile)
            }
            let id = try NCCLUniqueID.read(fromFile: idFile)
            let communicator = try NCCLCommunicator(id: id, rank: rank, size: worldSize, device: device)
            return NCCLExchange(communicator: communicator)
        } catch {
            throw .cuda(error)
        }
    }
}
