"""One error tree for the whole project, and the status code each kind of error travels with.

Every error says whose fault it is, so that a client retries the right things:

    fault      meaning                                         Triton code   gRPC status
    CALLER     the request itself is wrong; never retried      INVALID_ARG   INVALID_ARGUMENT
    SERVER     the server's state: no gallery loaded, a        INTERNAL      INTERNAL
               gallery that failed verification, a dependency
               down, a model that cannot run
    OVERLOAD   refused for now; retried with backoff           UNAVAILABLE   UNAVAILABLE

The served models answer each failed request with the code of its error's ``fault``; the
client maps status codes back onto this tree::

    FilipError
    ├── FilipInvalidInputError   fault CALLER (also a ValueError)
    └── FilipServerError         fault SERVER
        └── FilipOverloadedError fault OVERLOAD

(the client adds FilipConnectionError and FilipTimeoutError; the engine subclasses these
for its own errors: a bad image, a bad checkpoint, a gallery that cannot be served).
"""
from __future__ import annotations

from enum import Enum


class Fault(str, Enum):
    CALLER = "caller"
    SERVER = "server"
    OVERLOAD = "overload"


# the attribute of the Python backend's pb_utils.TritonError a served model answers with
TRITON_CODES = {Fault.CALLER: "INVALID_ARG", Fault.SERVER: "INTERNAL", Fault.OVERLOAD: "UNAVAILABLE"}
# the gRPC status a client then sees (Triton's own queue refusals are UNAVAILABLE too)
GRPC_STATUS = {Fault.CALLER: "INVALID_ARGUMENT", Fault.SERVER: "INTERNAL", Fault.OVERLOAD: "UNAVAILABLE"}
# How Triton words its queue's refusals (a full queue, a queue timeout).  The code alone cannot
# say overload: gRPC reports an unreachable server as UNAVAILABLE too, and an error a served
# model receives from another one through BLS arrives as INTERNAL whatever its code was.
OVERLOAD_MESSAGES = ("exceeds maximum queue size", "request timeout expired")


def is_overload_message(message: str) -> bool:
    low = message.lower()
    return any(m in low for m in OVERLOAD_MESSAGES)


class FilipError(Exception):
    """Base of every error raised on purpose by this project."""
    fault = Fault.SERVER


class FilipInvalidInputError(FilipError, ValueError):
    """The caller gave something that cannot be accepted (type, shape, dtype, value, limit)."""
    fault = Fault.CALLER


class FilipServerError(FilipError):
    """The server cannot serve the request in its present state; ``status`` is the gRPC status
    name when the error came over the wire."""
    fault = Fault.SERVER

    def __init__(self, message: str = "", status: str | None = None):
        super().__init__(message)
        self.status = status


class FilipOverloadedError(FilipServerError):
    """Refused for now (queue full, queue timeout): retry later."""
    fault = Fault.OVERLOAD


def fault_of(error: BaseException) -> Fault:
    """The fault of any exception: its declared one, else the server's."""
    return getattr(error, "fault", Fault.SERVER)
