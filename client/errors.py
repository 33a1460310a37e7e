"""One error tree for the client, each raised ``from`` the underlying gRPC/Triton error.

    FilipError
    ├── FilipConnectionError    the server cannot be reached (or went away)
    ├── FilipTimeoutError       the call's deadline (``timeout=``) passed
    ├── FilipInvalidInputError  the request was refused as invalid (INVALID_ARGUMENT), or the
    │                           client refused it before sending (also a ValueError)
    └── FilipServerError        anything else the server answered with (unknown model, internal error)
        └── FilipOverloadedError the server refused the request for now (queue full or queue
                                 timeout); the clients retry these with jittered backoff
"""
from __future__ import annotations


class FilipError(Exception):
    """Base of every error raised by the client."""


class FilipConnectionError(FilipError):
    pass


class FilipTimeoutError(FilipError, TimeoutError):
    pass


class FilipInvalidInputError(FilipError, ValueError):
    pass


class FilipServerError(FilipError):
    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


class FilipOverloadedError(FilipServerError):
    pass


_OVERLOAD_MARKERS = ("exceeds maximum queue size", "request timeout expired")


def from_triton(exc: Exception, what: str) -> FilipError:
    """Map a tritonclient ``InferenceServerException`` to our tree (the caller raises it ``from`` exc)."""
    status = ""
    msg = str(exc)
    if hasattr(exc, "status"):
        status = str(exc.status() or "")
        msg = exc.message() if hasattr(exc, "message") else msg
    text = f"{what}: {msg}"
    if "INVALID_ARGUMENT" in status:
        return FilipInvalidInputError(text)
    if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in msg:
        return FilipTimeoutError(text)
    if "UNAVAILABLE" in status and any(m in msg.lower() for m in _OVERLOAD_MARKERS):
        return FilipOverloadedError(text, status)
    if "UNAVAILABLE" in status and "unknown model" not in msg.lower():
        return FilipConnectionError(text)
    return FilipServerError(text, status or None)
