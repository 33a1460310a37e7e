"""The gateway's errors: the client library's tree mapped onto HTTP, with OpenAI-style bodies
``{"error": {"message", "type", "param", "code"}}``.

    caller input (FilipInvalidInputError, bad JSON/base64/types)  400 invalid_request_error
    no or wrong API key                                            401 invalid_request_error / invalid_api_key
    unknown model / gallery item / route                           404 invalid_request_error
    a body or an image over the served limits                      413 invalid_request_error
    overload (FilipOverloadedError)                                503 server_error / overloaded, Retry-After
    the server's state (FilipServerError)                          503 server_error / server_error
    Triton unreachable (FilipConnectionError)                      502 server_error / upstream_unreachable
    deadline passed (FilipTimeoutError)                            504 server_error / timeout
    anything else (a bug)                                          500 server_error / internal_error
                                                                   (the message names a request id; the
                                                                   traceback goes to the gateway's log only)
"""
from __future__ import annotations

from filip_client.errors import (FilipConnectionError, FilipError, FilipInvalidInputError, FilipOverloadedError,
                                 FilipServerError, FilipTimeoutError)

RETRY_AFTER_S = 1


class GatewayError(Exception):
    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_input") -> GatewayError:
    return GatewayError(400, message, code=code, param=param)


def too_large(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(413, message, code="payload_too_large", param=param)


def from_filip(e: FilipError, param: str | None = None) -> GatewayError:
    """A client-library error as the HTTP error a caller sees (order matters: subclasses first)."""
    msg = str(e)
    if isinstance(e, FilipInvalidInputError):
        if " bytes; the limit is " in msg:
            return too_large(msg, param)
        return bad_request(msg, param)
    if isinstance(e, FilipTimeoutError):
        return GatewayError(504, msg, code="timeout")
    if isinstance(e, FilipOverloadedError):
        return GatewayError(503, msg, code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, FilipConnectionError):
        return GatewayError(502, f"the inference server cannot be reached: {msg}", code="upstream_unreachable")
    if isinstance(e, FilipServerError):
        return GatewayError(503, msg, code="server_error")
    return GatewayError(502, msg, code="upstream_error")
