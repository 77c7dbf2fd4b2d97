"""The kinds of failure a caller must tell apart."""


class GLMError(Exception):
    """Base class for errors that carry a message meant for the user."""


class CheckpointError(GLMError):
    """The checkpoint directory is missing, incomplete or inconsistent."""


class InputError(GLMError, ValueError):
    """A request cannot be served as given (bad parameter, prompt too long, ...)."""


class EngineError(GLMError):
    """The generation loop has stopped for good; the message says why."""


class QueueTimeout(GLMError):
    """A request waited in the queue (for KV cache memory) longer than the server's bound."""


# What CUDA says once a kernel has corrupted the context (torch's message or the cudaError name): no
# later call on that device can succeed, so the process must be restarted, not the request retried.
STICKY_DEVICE_ERRORS = (
    "illegal memory access", "cudaErrorIllegalAddress", "unspecified launch failure",
    "cudaErrorLaunchFailure", "uncorrectable ECC error", "cudaErrorECCUncorrectable",
    "illegal instruction", "cudaErrorIllegalInstruction", "misaligned address",
    "cudaErrorMisalignedAddress", "hardware stack error", "cudaErrorHardwareStackError",
    "invalid program counter", "cudaErrorInvalidPc", "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_LAUNCH_FAILED", "CUDA_ERROR_ECC_UNCORRECTABLE",
)


def sticky_device_error(error: BaseException) -> bool:
    """Whether `error` is a CUDA error that leaves the device unusable for this process."""
    text = str(error)
    return isinstance(error, Exception) and any(s.lower() in text.lower() for s in STICKY_DEVICE_ERRORS)
