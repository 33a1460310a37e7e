"""Typed errors raised by the engine.

The tree and its status codes are declared by the served contract
(:mod:`filip_contract.errors`): every error raised on purpose derives from
:class:`FilipError`; bad caller input derives from :class:`InvalidInputError` (also a
``ValueError``), which the served models answer with INVALID_ARGUMENT; the server's own
state (a gallery that cannot be served) with INTERNAL.  The engine adds its own kinds here.
"""
from __future__ import annotations

from filip_contract.errors import FilipError, FilipInvalidInputError as InvalidInputError, FilipServerError
from filip_contract.gallery import GalleryError

__all__ = ["FilipError", "InvalidInputError", "FilipServerError", "GalleryError", "ImageDecodeError", "TextInputError",
           "CheckpointError", "TokenizerError", "ExportError", "ValidationError"]


class ImageDecodeError(InvalidInputError):
    """An image could not be read: corrupt, truncated, empty, too large or unsupported."""


class TextInputError(InvalidInputError):
    """A text could not be tokenised: not a string, empty, or over a limit."""


class CheckpointError(FilipError):
    """A checkpoint file is missing, unreadable, of an unknown layout, or inconsistent.

    The message names the file and, where relevant, the offending keys and shapes.
    """


class TokenizerError(FilipError):
    """A vocabulary file is missing, malformed, or does not match the model."""


class ExportError(FilipError):
    """Exporting a tower to ONNX (or building an engine from it) failed."""


class ValidationError(FilipError):
    """A numerics gate (runtime vs PyTorch) failed; the message names the output and figures."""
