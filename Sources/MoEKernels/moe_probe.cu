// A small kernel that proves the whole path works: NVRTC compiles it for the device's exact
// architecture, the driver loads the cubin, and a launch computes something checkable.
//
// moe_probe_axpy: grid ceil(n / 256) (grid-stride beyond), block 256, no shared memory.
// Each thread computes y[i] = a * x[i] + y[i] in fp32 for its indices; offsets are 64-bit.
extern "C" __global__ void moe_probe_axpy(float a, const float* __restrict__ x, float* __restrict__ y, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = a * x[i] + y[i];
    }
}
