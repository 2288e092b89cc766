// Embeds the kernel files beside this one with C23 #embed; the compiler tracks them as
// dependencies, so editing a kernel rebuilds the binary.
#include "MoEKernels.h"

#pragma clang diagnostic ignored "-Wc23-extensions"

static const char common_source[] = {
#embed "moe_common.cuh"
    , 0};
const char *moe_kernels_common_source(void) { return common_source; }

static const char probe_source[] = {
#embed "moe_probe.cu"
    , 0};
const char *moe_kernels_probe_source(void) { return probe_source; }

static const char random_source[] = {
#embed "moe_random.cu"
    , 0};
const char *moe_kernels_random_source(void) { return random_source; }

static const char align_source[] = {
#embed "moe_align.cu"
    , 0};
const char *moe_kernels_align_source(void) { return align_source; }

static const char topk_source[] = {
#embed "moe_topk.cu"
    , 0};
const char *moe_kernels_topk_source(void) { return topk_source; }

static const char gemm_source[] = {
#embed "moe_gemm.cu"
    , 0};
const char *moe_kernels_gemm_source(void) { return gemm_source; }

static const char gemm_sm90_source[] = {
#embed "moe_gemm_sm90.cu"
    , 0};
const char *moe_kernels_gemm_sm90_source(void) { return gemm_sm90_source; }

static const char elementwise_source[] = {
#embed "moe_elementwise.cu"
    , 0};
const char *moe_kernels_elementwise_source(void) { return elementwise_source; }

static const char reference_source[] = {
#embed "moe_reference.cu"
    , 0};
const char *moe_kernels_reference_source(void) { return reference_source; }
