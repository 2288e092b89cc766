import CUDA

/// `byteCount` bytes to or from rank `peer` at `pointer`: one segment of an exchange.
public struct ExchangeTransfer: Hashable, Sendable {
    public var peer: Int
    public var pointer: DevicePointer
    public var byteCount: Int

    public init(peer: Int, pointer: DevicePointer, byteCount: Int) {
        self.peer = peer
        self.pointer = pointer
        self.byteCount = byteCount
    }
}

/// How the ranks of an expert-parallel layer move bytes between GPUs: NCCL between processes, or a
/// loopback for one rank, so that ep = 1 runs the same code path on one GPU.
///
/// Everything is enqueued on the given stream; nothing here waits for it.
public protocol ExpertParallelExchange: AnyObject, Sendable {
    /// This rank, 0..<worldSize.
    var rank: Int { get }
    /// The number of ranks.
    var worldSize: Int { get }
    /// This rank's GPU.
    var device: Device { get }

    /// Every rank's `byteCount` bytes at `send`; rank r's land at `receive + r * byteCount`.
    func allGather(send: DevicePointer, receive: DevicePointer, byteCount: Int, stream: Stream) throws(CUDAError)

    /// The sends and receives as one grouped operation. The i-th send to a peer pairs with that peer's
    /// i-th receive from this rank and must have its size. Zero-byte transfers are skipped: both
    /// sides skip them alike, since both derive the sizes from the same gathered counts.
    func exchange(sends: [ExchangeTransfer], receives: [ExchangeTransfer], stream: Stream) throws(CUDAError)
}

extension ExpertParallelExchange {
    /// Gathers a few host bytes from every rank (in rank order), through the device; waits for the
    /// stream. For counts and results of checks, not for the forward's data.
    public func allGather(host bytes: [UInt8], stream: Stream) throws(CUDAError) -> [UInt8] {
        let count = bytes.count
        let send = try DeviceBuffer(device: device, byteCount: max(count, 1))
        let receive = try DeviceBuffer(device: device, byteCount: max(count * worldSize, 1))
        try send.upload(bytes)
        try device.synchronize()
        try allGather(send: send.pointer, receive: receive.pointer, byteCount: count, stream: stream)
        try stream.synchronize()
        return try receive.download(count: count * worldSize, as: UInt8.self)
    }

    /// Every rank's `values`, concatenated in rank order.
    public func allGather(host values: [Int32], stream: Stream) throws(CUDAError) -> [Int32] {
        let bytes = values.withUnsafeBytes { Array($0) }
        let gathered = try allGather(host: bytes, stream: stream)
        return gathered.withUnsafeBytes { Array($0.bindMemory(to: Int32.self)) }
    }

    /// Every rank's `values`, concatenated in rank order.
    public func allGather(host values: [Double], stream: Stream) throws(CUDAError) -> [Double] {
        let bytes = values.withUnsafeBytes { Array($0) }
        let gathered = try allGather(host: bytes, stream: stream)
        return gathered.withUnsafeBytes { Array($0.bindMemory(to: Double.self)) }
    }
}

/// The exchange between processes, one per GPU, through an NCCL communicator: `ncclAllGather` for
/// the counts, and `ncclSend` / `ncclRecv` of bytes (`ncclInt8`) grouped in one
/// `ncclGroupStart` / `ncclGroupEnd` for the all-to-alls.
public final class NCCLExchange: ExpertParallelExchange, @unchecked Sendable {
    public let communicator: NCCLCommunicator

    public init(communicator: NCCLCommunicator) {
        self.communicator = communicator
    }

    public var rank: Int { communicator.rank }
    public var worldSize: Int { communicator.size }
    public var device: Device { communicator.device }

    public func allGather(send: DevicePointer, receive: DevicePointer, byteCount: Int, stream: Stream)
        throws(CUDAError)
    {
        try communicator.allGather(send: send, receive: receive, count: byteCount, type: .int8, on: stream)
    }

    public func exchange(sends: [ExchangeTransfer], receives: [ExchangeTransfer], stream: Stream) throws(CUDAError) {
        try communicator.group { () throws(CUDAError) in
            for send in sends where send.byteCount > 0 {
                try communicator.send(send.pointer, count: send.byteCount, type: .int8, to: send.peer, on: stream)
            }
            for receive in receives where receive.byteCount > 0 {
                try communicator.receive(
                    receive.pointer, count: receive.byteCount, type: .int8, from: receive.peer, on: stream)
            }
        }
    }
}

/// The exchange of a single rank: every transfer goes to itself, as device-to-device copies on the
/// stream. With it, ep = 1 runs the expert-parallel code path on one GPU without NCCL.
public final class LoopbackExchange: ExpertParallelExchange, @unchecked Sendable {
    public let device: Device
    public var rank: Int { 0 }
    public var worldSize: Int { 1 }

    public init(device: Device) {
        self.device = device
    }

    public func allGather(send: DevicePointer, receive: DevicePointer, byteCount: Int, stream: Stream)
        throws(CUDAError)
    {
        try ExpertParallelDevice.copy(from: send, to: receive, byteCount: byteCount, device: device, stream: stream)
    }

    public func exchange(sends: [ExchangeTransfer], receives: [ExchangeTransfer], stream: Stream) throws(CUDAError) {
        let sends = sends.filter { $0.byteCount > 0 }
        let receives = receives.filter { $0.byteCount > 0 }
        guard sends.allSatisfy({ $0.peer == 0 }), receives.allSatisfy({ $0.peer == 0 }) else {
            throw CUDAError(
                domain: .usage, code: 0, name: "usage", call: "LoopbackExchange.exchange",
                message: "a single rank can only exchange with rank 0")
        }
        guard sends.count == receives.count else {
            throw CUDAError(
                domain: .usage, code: 0, name: "usage", call: "LoopbackExchange.exchange",
                message: "\(sends.count) sends but \(receives.count) receives")
        }
        for (send, receive) in zip(sends, receives) {
            guard send.byteCount == receive.byteCount else {
                throw CUDAError(
                    domain: .usage, code: 0, name: "usage", call: "LoopbackExchange.exchange",
                    message: "a send of \(send.byteCount) bytes meets a receive of \(receive.byteCount)")
            }
            try ExpertParallelDevice.copy(
                from: send.pointer, to: receive.pointer, byteCount: send.byteCount, device: device, stream: stream)
        }
    }
}

/// Device helpers of the expert-parallel layer, in a namespace of their own.
enum ExpertParallelDevice {
    /// Copies `byteCount` bytes between device addresses on `stream` (`cuMemcpyDtoDAsync` through
    /// borrowed buffers); zero bytes copy nothing.
    static func copy(
        from source: DevicePointer, to destination: DevicePointer, byteCount: Int, device: Device, stream: Stream
    ) throws(CUDAError) {
        guard byteCount > 0 else { return }
        let from = try DeviceBuffer(device: device, borrowing: source, byteCount: byteCount)
        let to = try DeviceBuffer(device: device, borrowing: destination, byteCount: byteCount)
        try to.copy(from: from, byteCount: byteCount, on: stream)
    }

    /// The address `bytes` past `pointer`.
    static func offset(_ pointer: DevicePointer, bytes: Int) -> DevicePointer {
        DevicePointer(address: pointer.address + UInt64(bytes))
    }
}
