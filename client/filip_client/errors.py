"""The client's errors: the project's one tree (:mod:`filip_contract.errors`) plus the two
kinds only a client meets, each raised ``from`` the underlying gRPC/Triton error.

    FilipError
    ├── FilipConnectionError    the server cannot be reached (or went away)
    ├── FilipTimeoutError       the call's deadline (``timeout=``) passed
    ├── FilipInvalidInputError  the request was refused as invalid (INVALID_ARGUMENT), or the
    │                           client refused it before sending (also a ValueError)
    └── FilipServerError        the server's state (INTERNAL), an unknown model, anything else
        └── FilipOverloadedError the server refused the request for now (queue full or queue
                                 timeout); the clients retry these with jittered backoff
"""
from __future__ import annotations

from filip_contract.errors import (GRPC_STATUS, Fault, FilipError, FilipInvalidInputError, FilipOverloadedError,
                                   FilipServerError, is_overload_message)

__all__ = ["FilipError", "FilipConnectionError", "FilipTimeoutError", "FilipInvalidInputError", "FilipServerError",
           "FilipOverloadedError", "from_triton"]


class FilipConnectionError(FilipError):
    pass


class FilipTimeoutError(FilipError, TimeoutError):
    pass


# UNAVAILABLE is what Triton's queue answers when it refuses a request (overload), what gRPC
# reports when it cannot reach the server, and what Triton answers for a few states of its own
# (a restricted protocol without its header); only the message tells them apart.
_CONNECTION_MARKERS = ("failed to connect", "connection refused", "connect failed", "socket closed", "connection reset",
                       "dns resolution failed", "handshake", "ssl", "end of tcp stream", "broken pipe", "goaway")


def from_triton(exc: Exception, what: str) -> FilipError:
    """Map a tritonclient ``InferenceServerException`` to our tree (the caller raises it ``from`` exc)."""
    status = ""
    msg = str(exc)
    if hasattr(exc, "status"):
        status = str(exc.status() or "")
        msg = exc.message() if hasattr(exc, "message") else msg
    text = f"{what}: {msg}"
    name = status.rsplit(".", 1)[-1]      # "StatusCode.INVALID_ARGUMENT" -> "INVALID_ARGUMENT"
    if name == GRPC_STATUS[Fault.CALLER]:
        return FilipInvalidInputError(text)
    if name == "DEADLINE_EXCEEDED" or "Deadline Exceeded" in msg:
        return FilipTimeoutError(text)
    if name == GRPC_STATUS[Fault.OVERLOAD]:
        low = msg.lower()
        if is_overload_message(msg):
            return FilipOverloadedError(text, status)
        if any(m in low for m in _CONNECTION_MARKERS):
            return FilipConnectionError(text)
    return FilipServerError(text, status or None)
