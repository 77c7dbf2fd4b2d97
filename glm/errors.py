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
