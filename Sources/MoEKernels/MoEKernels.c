// Embeds the .cu files beside this one with C23 #embed; the compiler tracks them as dependencies,
// so editing a kernel rebuilds the binary.
#include "MoEKernels.h"

#pragma clang diagnostic ignored "-Wc23-extensions"

static const char probe_source[] = {
#embed "moe_probe.cu"
    , 0};

const char *moe_kernels_probe_source(void) { return probe_source; }
