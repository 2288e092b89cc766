import CUDA
import Testing

@testable import FusedMoE

/// The grouped router's kernel compiles for sm_90a through NVRTC for every logits type, without
/// spills, with no GPU needed.
@Suite(.enabled(if: NVRTC.isAvailable, "NVRTC is not installed here (pip install nvidia-cuda-nvrtc)"))
struct GroupedRouterCompileTests {
    @Test(arguments: DType.allCases)
    func groupedRouterCompilesWithoutSpills(dtype: DType) throws {
        let request = GPUGroupedRouter.request(dtype: dtype)
        let program = try NVRTC.shared().compile(
            source: request.source.text, name: request.source.rawValue, headers: KernelSource.headers,
            options: KernelLibrary.options(architecture: "sm_90a"), nameExpressions: request.expressions)
        #expect(program.cubin.count > 0)
        #expect(program.loweredNames.count == 1)
        #expect(!program.spills, "\(request.expressions): \(program.resourceReport)")
    }
}
