"""Pixel modes that no image file format stores, and what both sides make of them.

The engine resizes an image in its own pixel mode before converting it to RGB, as OpenCLIP
does, and the client sends a PIL image losslessly in its own mode so that the server sees
what the engine sees in-process. A few Pillow modes arise only from in-process conversions
and fit in no container (PNG, TIFF): both sides first convert those to the mode given here,
so in-process and served results stay identical.
"""
from __future__ import annotations

UNSTORED_MODES: dict[str, str] = {
    "La": "LA",        # premultiplied luminance + alpha (Pillow has no La -> RGB conversion)
    "RGBa": "RGBA",    # premultiplied RGBA
    "HSV": "RGB",
}
