// Declarations of the subset of NCCL that swift-fused-moe calls for expert parallelism.
//
// As with the driver API in CCUDA.h, nothing here links against NCCL: each function is a pointer
// type that the Swift layer (Sources/CUDA/NCCL.swift) fills with dlsym() after dlopen()ing
// libnccl.so.2 at first use. Values and layouts follow NVIDIA/nccl src/nccl.h.in (NCCL 2.x ABI);
// `cudaStream_t` and `CUstream` are the same type, so the driver's stream handle is passed as is.
#ifndef CNCCL_H
#define CNCCL_H

#include <stddef.h>
#include "CCUDA.h"

#ifdef __cplusplus
extern "C" {
#endif

/// `ncclResult_t`: 0 is success (the enum's values are listed in `CNCCL_*` below).
typedef int ncclResult_t;
/// `ncclDataType_t`.
typedef int ncclDataType_t;
/// `ncclRedOp_t`.
typedef int ncclRedOp_t;
/// An opaque communicator handle.
typedef struct ncclComm *ncclComm_t;

#define CNCCL_UNIQUE_ID_BYTES 128
/// `ncclUniqueId`: 128 opaque bytes, made by `ncclGetUniqueId` on one process and handed to every
/// rank. NCCL names the field `internal`; it is `bytes` here (a Swift keyword otherwise), same layout.
typedef struct {
    char bytes[CNCCL_UNIQUE_ID_BYTES];
} ncclUniqueId;

/// ncclResult_t values.
enum {
    CNCCL_SUCCESS = 0,
    CNCCL_UNHANDLED_CUDA_ERROR = 1,
    CNCCL_SYSTEM_ERROR = 2,
    CNCCL_INTERNAL_ERROR = 3,
    CNCCL_INVALID_ARGUMENT = 4,
    CNCCL_INVALID_USAGE = 5,
    CNCCL_REMOTE_ERROR = 6,
    CNCCL_IN_PROGRESS = 7,
    CNCCL_TIMEOUT = 8,
};

/// ncclDataType_t values we use.
enum {
    CNCCL_INT8 = 0,
    CNCCL_INT32 = 2,
    CNCCL_FLOAT16 = 6,
    CNCCL_FLOAT32 = 7,
    CNCCL_BFLOAT16 = 9,
};

/// ncclRedOp_t values we use.
enum {
    CNCCL_SUM = 0,
    CNCCL_MAX = 2,
};

typedef ncclResult_t (*PFN_ncclGetVersion)(int *version);
typedef ncclResult_t (*PFN_ncclGetUniqueId)(ncclUniqueId *uniqueId);
/// The id is passed by value (a 128-byte struct), as in nccl.h.
typedef ncclResult_t (*PFN_ncclCommInitRank)(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank);
typedef ncclResult_t (*PFN_ncclCommDestroy)(ncclComm_t comm);
typedef ncclResult_t (*PFN_ncclCommAbort)(ncclComm_t comm);
typedef const char *(*PFN_ncclGetErrorString)(ncclResult_t result);
/// Optional (NCCL 2.13 and later).
typedef const char *(*PFN_ncclGetLastError)(ncclComm_t comm);
typedef ncclResult_t (*PFN_ncclCommGetAsyncError)(ncclComm_t comm, ncclResult_t *asyncError);
typedef ncclResult_t (*PFN_ncclGroupStart)(void);
typedef ncclResult_t (*PFN_ncclGroupEnd)(void);
typedef ncclResult_t (*PFN_ncclSend)(
    const void *sendbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm, CUstream stream);
typedef ncclResult_t (*PFN_ncclRecv)(
    void *recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm, CUstream stream);
typedef ncclResult_t (*PFN_ncclAllReduce)(
    const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
    CUstream stream);
typedef ncclResult_t (*PFN_ncclAllGather)(
    const void *sendbuff, void *recvbuff, size_t sendcount, ncclDataType_t datatype, ncclComm_t comm,
    CUstream stream);

#ifdef __cplusplus
}
#endif

#endif
