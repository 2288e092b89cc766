// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "swift-fused-moe",
    platforms: [.macOS(.v15)],
    products: [
        // MARK: - Public API
        .library(name: "FusedMoE", targets: ["FusedMoE"]),
        .library(name: "CUDA", targets: ["CUDA"]),
        .executable(name: "fused-moe", targets: ["fused-moe"]),
        .library(name: "FusedMoEC", type: .dynamic, targets: ["FusedMoEC"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // MARK: - Implementation details
        /// Declarations of the CUDA driver API and NVRTC subset we call; resolved with dlopen at run time.
        .target(name: "CCUDA"),
        /// The CUDA C++ kernel sources, embedded into the binary at build time with C23 `#embed`.
        .target(
            name: "MoEKernels",
            exclude: [
                "moe_common.cuh", "moe_probe.cu", "moe_random.cu", "moe_align.cu", "moe_topk.cu", "moe_gemm.cu",
                "moe_gemm_sm90.cu",
                "moe_elementwise.cu", "moe_reference.cu",
            ]
        ),

        /// Tuned kernel configs (configs.json, written by `fused-moe tune`), embedded at build time.
        .target(name: "MoEConfigs", exclude: ["configs.json"]),

        // MARK: - Public API
        .target(name: "CUDA", dependencies: ["CCUDA"]),
        .target(name: "FusedMoE", dependencies: ["CUDA", "MoEKernels", "MoEConfigs"]),
        .target(name: "FusedMoEC", dependencies: ["FusedMoE", "CUDA"]),
        .executableTarget(
            name: "fused-moe",
            dependencies: [
                "FusedMoE", "CUDA",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),

        // MARK: - Tests
        .testTarget(name: "CUDATests", dependencies: ["CUDA"]),
        .testTarget(name: "FusedMoETests", dependencies: ["FusedMoE", "CUDA", "MoEKernels"]),
    ]
)
