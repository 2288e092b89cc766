import CCUDA

/// A CUDA stream: an ordered queue of device work (`cuStreamCreate`, non-blocking).
public final class Stream: @unchecked Sendable {
    public let device: Device
    let handle: CUstream?
    private let owned: Bool

    /// Creates a non-blocking stream on `device` (`cuStreamCreate` with `CU_STREAM_NON_BLOCKING`).
    public init(device: Device) throws(CUDAError) {
        try device.makeCurrent()
        var stream: CUstream? = nil
        try device.driver.check(
            device.driver.cuStreamCreate(&stream, UInt32(CCUDA_STREAM_NON_BLOCKING)), "cuStreamCreate")
        guard let stream else { throw .usage("cuStreamCreate", "the driver returned no stream") }
        self.device = device
        self.handle = stream
        self.owned = true
    }

    /// Wraps a stream someone else owns (a framework's current stream, passed as its raw
    /// `CUstream` value; 0 is the legacy default stream). It is not destroyed with this object.
    public init(device: Device, borrowing rawHandle: UInt) {
        self.device = device
        self.handle = CUstream(bitPattern: rawHandle)
        self.owned = false
    }

    deinit {
        if owned, let handle { _ = device.driver.cuStreamDestroy(handle) }
    }

    /// Waits until all work queued on the stream has finished (`cuStreamSynchronize`).
    public func synchronize() throws(CUDAError) {
        try device.driver.check(device.driver.cuStreamSynchronize(handle), "cuStreamSynchronize")
    }
}

/// A CUDA event, for timing device work (`cuEventCreate`).
public final class Event: @unchecked Sendable {
    public let device: Device
    let handle: CUevent

    public init(device: Device) throws(CUDAError) {
        try device.makeCurrent()
        var event: CUevent? = nil
        try device.driver.check(
            device.driver.cuEventCreate(&event, UInt32(CCUDA_EVENT_DEFAULT)), "cuEventCreate")
        guard let event else { throw .usage("cuEventCreate", "the driver returned no event") }
        self.device = device
        self.handle = event
    }

    deinit {
        _ = device.driver.cuEventDestroy(handle)
    }

    /// Records the event on `stream` (`cuEventRecord`).
    public func record(on stream: Stream) throws(CUDAError) {
        try device.driver.check(device.driver.cuEventRecord(handle, stream.handle), "cuEventRecord")
    }

    /// Waits for the event (`cuEventSynchronize`).
    public func synchronize() throws(CUDAError) {
        try device.driver.check(device.driver.cuEventSynchronize(handle), "cuEventSynchronize")
    }

    /// Milliseconds between two recorded events (`cuEventElapsedTime`); waits for `end` first.
    public static func elapsedMilliseconds(from start: Event, to end: Event) throws(CUDAError) -> Double {
        try end.synchronize()
        var milliseconds: Float = 0
        try start.device.driver.check(
            start.device.driver.cuEventElapsedTime(&milliseconds, start.handle, end.handle), "cuEventElapsedTime")
        return Double(milliseconds)
    }
}

/// A captured and instantiated CUDA graph, replayed with one launch (`cuGraphLaunch`).
public final class Graph: @unchecked Sendable {
    public let device: Device
    let graph: CUgraph
    let executable: CUgraphExec

    /// Captures the work `body` enqueues on `stream` (`cuStreamBeginCapture` / `cuStreamEndCapture`)
    /// and instantiates it. The body must not synchronize or allocate.
    public init(capturing stream: Stream, _ body: () throws -> Void) throws {
        let driver = stream.device.driver
        try driver.check(
            driver.cuStreamBeginCapture(stream.handle, Int32(CCUDA_STREAM_CAPTURE_MODE_THREAD_LOCAL)),
            "cuStreamBeginCapture")
        var captured: CUgraph? = nil
        do {
            try body()
        } catch {
            _ = driver.cuStreamEndCapture(stream.handle, &captured)
            if let captured { _ = driver.cuGraphDestroy(captured) }
            throw error
        }
        try driver.check(driver.cuStreamEndCapture(stream.handle, &captured), "cuStreamEndCapture")
        guard let captured else { throw CUDAError.usage("cuStreamEndCapture", "the capture produced no graph") }
        var executable: CUgraphExec? = nil
        let result = driver.cuGraphInstantiateWithFlags(&executable, captured, 0)
        guard result == 0, let executable else {
            _ = driver.cuGraphDestroy(captured)
            throw driver.error(result, call: "cuGraphInstantiateWithFlags")
        }
        self.device = stream.device
        self.graph = captured
        self.executable = executable
    }

    deinit {
        _ = device.driver.cuGraphExecDestroy(executable)
        _ = device.driver.cuGraphDestroy(graph)
    }

    /// Replays the graph on `stream` (`cuGraphLaunch`).
    public func launch(on stream: Stream) throws(CUDAError) {
        try device.driver.check(device.driver.cuGraphLaunch(executable, stream.handle), "cuGraphLaunch")
    }
}
