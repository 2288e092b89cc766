"""The exceptions of fused_moe. Every one is a FusedMoEError, and also the built-in exception a
Python caller expects for its kind (ValueError for a bad argument, TypeError for a wrong dtype or
type, RuntimeError for CUDA failures), so either can be caught."""


class FusedMoEError(Exception):
    """An error from fused_moe or its C library.

    Attributes:
        status: the library's status code (fused_moe.h's FUSED_MOE_ERROR_*), or None for an error
            raised in Python before the library was called.
        message: the library's message (fused_moe_last_error), or the Python check's.
    """

    def __init__(self, message, status=None):
        super().__init__(message)
        self.message = message
        self.status = status


class InvalidArgumentError(FusedMoEError, ValueError):
    """An argument is wrong: shape, device, contiguity, size or option (FUSED_MOE_ERROR_INVALID_ARGUMENT)."""


class ArgumentTypeError(FusedMoEError, TypeError):
    """An argument has the wrong type or dtype."""


class UnsupportedError(FusedMoEError, NotImplementedError):
    """A valid request this build or device cannot do (FUSED_MOE_ERROR_UNSUPPORTED)."""


class CUDAError(FusedMoEError, RuntimeError):
    """CUDA failed: no driver or GPU, NVRTC missing, a compile error, a failed launch (FUSED_MOE_ERROR_CUDA)."""


class OutOfMemoryError(CUDAError, MemoryError):
    """Device memory ran out (FUSED_MOE_ERROR_OUT_OF_MEMORY)."""


class InternalError(FusedMoEError, RuntimeError):
    """A bug in the library (FUSED_MOE_ERROR_INTERNAL): please report the message."""


class LibraryNotFoundError(FusedMoEError, OSError):
    """libFusedMoEC could not be loaded; the message lists the places tried."""


_BY_STATUS = {
    -1: InvalidArgumentError,
    -2: UnsupportedError,
    -3: CUDAError,
    -4: OutOfMemoryError,
    -5: InternalError,
}


def error_for_status(status, message):
    """The exception for a nonzero library status and its message."""
    return _BY_STATUS.get(status, FusedMoEError)(message, status)
