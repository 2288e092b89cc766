// The CUDA C++ kernel sources of swift-fused-moe, embedded into the binary at build time.
// Each function returns a NUL-terminated copy of one file of Sources/MoEKernels.
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

/// moe_common.cuh
const char *moe_kernels_common_source(void);
/// moe_probe.cu
const char *moe_kernels_probe_source(void);
/// moe_random.cu
const char *moe_kernels_random_source(void);
/// moe_align.cu
const char *moe_kernels_align_source(void);
/// moe_topk.cu
const char *moe_kernels_topk_source(void);
/// moe_gemm.cu
const char *moe_kernels_gemm_source(void);
/// moe_gemm_sm90.cu
const char *moe_kernels_gemm_sm90_source(void);
/// moe_elementwise.cu
const char *moe_kernels_elementwise_source(void);
/// moe_reference.cu
const char *moe_kernels_reference_source(void);

#endif
