// Declarations of the subset of the CUDA driver API and NVRTC that swift-fused-moe calls.
//
// Nothing here links against CUDA: each function is a pointer type that the Swift layer fills with
// dlsym() after dlopen()ing libcuda and libnvrtc at first use, so the package builds and its tests
// run on machines without CUDA. Values and layouts follow cuda.h and nvrtc.h (CUDA 12/13 ABI).
#ifndef CCUDA_H
#define CCUDA_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// MARK: - Driver API types

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;
typedef struct CUgraph_st *CUgraph;
typedef struct CUgraphExec_st *CUgraphExec;

enum {
    CCUDA_SUCCESS = 0,
    CCUDA_ERROR_NOT_READY = 600,
};

/// CUdevice_attribute values we read.
enum {
    CCUDA_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 1,
    CCUDA_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK = 8,
    CCUDA_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK = 12,
    CCUDA_DEVICE_ATTRIBUTE_CLOCK_RATE = 13,
    CCUDA_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16,
    CCUDA_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE = 36,
    CCUDA_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH = 37,
    CCUDA_DEVICE_ATTRIBUTE_L2_CACHE_SIZE = 38,
    CCUDA_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75,
    CCUDA_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76,
    CCUDA_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 81,
    CCUDA_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97,
};

/// CUfunction_attribute values we read or set.
enum {
    CCUDA_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 0,
    CCUDA_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1,
    CCUDA_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES = 3,
    CCUDA_FUNC_ATTRIBUTE_NUM_REGS = 4,
    CCUDA_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
};

enum {
    CCUDA_STREAM_NON_BLOCKING = 1,
    CCUDA_EVENT_DEFAULT = 0,
    CCUDA_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1,
};

// MARK: - Driver API functions

typedef CUresult (*PFN_cuInit)(unsigned int flags);
typedef CUresult (*PFN_cuDriverGetVersion)(int *version);
typedef CUresult (*PFN_cuGetErrorName)(CUresult error, const char **name);
typedef CUresult (*PFN_cuGetErrorString)(CUresult error, const char **text);
typedef CUresult (*PFN_cuDeviceGetCount)(int *count);
typedef CUresult (*PFN_cuDeviceGet)(CUdevice *device, int ordinal);
typedef CUresult (*PFN_cuDeviceGetName)(char *name, int length, CUdevice device);
typedef CUresult (*PFN_cuDeviceGetAttribute)(int *value, int attribute, CUdevice device);
typedef CUresult (*PFN_cuDeviceTotalMem)(size_t *bytes, CUdevice device);
typedef CUresult (*PFN_cuDevicePrimaryCtxRetain)(CUcontext *context, CUdevice device);
typedef CUresult (*PFN_cuDevicePrimaryCtxRelease)(CUdevice device);
typedef CUresult (*PFN_cuCtxSetCurrent)(CUcontext context);
typedef CUresult (*PFN_cuCtxSynchronize)(void);
typedef CUresult (*PFN_cuMemGetInfo)(size_t *free, size_t *total);
typedef CUresult (*PFN_cuMemAlloc)(CUdeviceptr *pointer, size_t bytes);
typedef CUresult (*PFN_cuMemFree)(CUdeviceptr pointer);
typedef CUresult (*PFN_cuMemcpyHtoD)(CUdeviceptr destination, const void *source, size_t bytes);
typedef CUresult (*PFN_cuMemcpyDtoH)(void *destination, CUdeviceptr source, size_t bytes);
typedef CUresult (*PFN_cuMemcpyDtoDAsync)(CUdeviceptr destination, CUdeviceptr source, size_t bytes, CUstream stream);
typedef CUresult (*PFN_cuMemsetD8Async)(CUdeviceptr destination, unsigned char value, size_t count, CUstream stream);
typedef CUresult (*PFN_cuMemsetD32Async)(CUdeviceptr destination, unsigned int value, size_t count, CUstream stream);
typedef CUresult (*PFN_cuStreamCreate)(CUstream *stream, unsigned int flags);
typedef CUresult (*PFN_cuStreamDestroy)(CUstream stream);
typedef CUresult (*PFN_cuStreamSynchronize)(CUstream stream);
typedef CUresult (*PFN_cuEventCreate)(CUevent *event, unsigned int flags);
typedef CUresult (*PFN_cuEventDestroy)(CUevent event);
typedef CUresult (*PFN_cuEventRecord)(CUevent event, CUstream stream);
typedef CUresult (*PFN_cuEventSynchronize)(CUevent event);
typedef CUresult (*PFN_cuEventElapsedTime)(float *milliseconds, CUevent start, CUevent end);
typedef CUresult (*PFN_cuModuleLoadData)(CUmodule *module, const void *image);
typedef CUresult (*PFN_cuModuleUnload)(CUmodule module);
typedef CUresult (*PFN_cuModuleGetFunction)(CUfunction *function, CUmodule module, const char *name);
typedef CUresult (*PFN_cuFuncGetAttribute)(int *value, int attribute, CUfunction function);
typedef CUresult (*PFN_cuFuncSetAttribute)(CUfunction function, int attribute, int value);
typedef CUresult (*PFN_cuLaunchKernel)(
    CUfunction function, unsigned int gridX, unsigned int gridY, unsigned int gridZ,
    unsigned int blockX, unsigned int blockY, unsigned int blockZ, unsigned int sharedMemoryBytes,
    CUstream stream, void **parameters, void **extra);
typedef CUresult (*PFN_cuStreamBeginCapture)(CUstream stream, int mode);
typedef CUresult (*PFN_cuStreamEndCapture)(CUstream stream, CUgraph *graph);
typedef CUresult (*PFN_cuGraphInstantiateWithFlags)(CUgraphExec *exec, CUgraph graph, unsigned long long flags);
typedef CUresult (*PFN_cuGraphLaunch)(CUgraphExec exec, CUstream stream);
typedef CUresult (*PFN_cuGraphExecDestroy)(CUgraphExec exec);
typedef CUresult (*PFN_cuGraphDestroy)(CUgraph graph);

/// CUlaunchAttribute (cuda.h): an id, padding, and a 64-byte value union of which we use the first int.
typedef struct {
    int id;
    char pad[4];
    union {
        int programmaticStreamSerializationAllowed;
        struct { unsigned int x, y, z; } clusterDim;
        char bytes[64];
    } value;
} CCUDALaunchAttribute;

/// CUlaunchConfig (cuda.h).
typedef struct {
    unsigned int gridDimX, gridDimY, gridDimZ;
    unsigned int blockDimX, blockDimY, blockDimZ;
    unsigned int sharedMemBytes;
    CUstream hStream;
    CCUDALaunchAttribute *attrs;
    unsigned int numAttrs;
} CCUDALaunchConfig;

enum { CCUDA_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4, CCUDA_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6 };

typedef CUresult (*PFN_cuLaunchKernelEx)(const CCUDALaunchConfig *config, CUfunction function, void **parameters, void **extra);

/// `tensorMap` points to a CUtensorMap: an opaque 128-byte descriptor, 64-byte aligned.
typedef CUresult (*PFN_cuTensorMapEncodeTiled)(
    void *tensorMap, int dataType, unsigned int rank, void *globalAddress,
    const unsigned long long *globalDim, const unsigned long long *globalStrides, const unsigned int *boxDim,
    const unsigned int *elementStrides, int interleave, int swizzle, int l2Promotion, int oobFill);

// MARK: - NVRTC

typedef int nvrtcResult;
typedef struct _nvrtcProgram *nvrtcProgram;

typedef nvrtcResult (*PFN_nvrtcVersion)(int *major, int *minor);
typedef const char *(*PFN_nvrtcGetErrorString)(nvrtcResult result);
typedef nvrtcResult (*PFN_nvrtcCreateProgram)(
    nvrtcProgram *program, const char *source, const char *name, int headerCount,
    const char *const *headers, const char *const *includeNames);
typedef nvrtcResult (*PFN_nvrtcDestroyProgram)(nvrtcProgram *program);
typedef nvrtcResult (*PFN_nvrtcCompileProgram)(nvrtcProgram program, int optionCount, const char *const *options);
typedef nvrtcResult (*PFN_nvrtcGetProgramLogSize)(nvrtcProgram program, size_t *size);
typedef nvrtcResult (*PFN_nvrtcGetProgramLog)(nvrtcProgram program, char *log);
typedef nvrtcResult (*PFN_nvrtcGetCUBINSize)(nvrtcProgram program, size_t *size);
typedef nvrtcResult (*PFN_nvrtcGetCUBIN)(nvrtcProgram program, char *cubin);
typedef nvrtcResult (*PFN_nvrtcAddNameExpression)(nvrtcProgram program, const char *nameExpression);
typedef nvrtcResult (*PFN_nvrtcGetLoweredName)(nvrtcProgram program, const char *nameExpression, const char **loweredName);

/// The path of the shared object that holds `symbol` (dladdr), or NULL.
const char *ccuda_path_of_symbol(const void *symbol);

#ifdef __cplusplus
}
#endif

// NCCL, for expert parallelism (declared after CUstream, which it uses).
#include "CNCCL.h"

#endif
