// The CUDA C++ kernel sources of swift-fused-moe, embedded into the binary at build time.
// Each function returns a NUL-terminated copy of one file of Sources/MoEKernels.
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

const char *moe_kernels_probe_source(void);

#endif
