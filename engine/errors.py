"""Typed errors raised by the engine.

Every error the engine raises on purpose derives from :class:`FilipError`, so callers
(the Triton adapters, the export CLI) can tell a bad input from a bug.  Bad user input
derives from :class:`InvalidInputError` (also a ``ValueError``), which the server maps
to an INVALID_ARGUMENT response.
"""
from __future__ import annotations


class FilipError(Exception):
    """Base class of every error raised on purpose by this project."""


class InvalidInputError(FilipError, ValueError):
    """A caller passed something the engine cannot accept (wrong type, shape, dtype, value)."""


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


class GalleryError(FilipError):
    """A gallery that is missing, incomplete, corrupt or incompatible (engine/gallery.py),
    or a search that cannot run (no gallery loaded)."""
