"""The default prompt ensemble for zero-shot classification (a subset of OpenAI's ImageNet
templates): each template holds one ``{}`` for the class name.  Both the in-process pipeline
and the client use it when a call gives no templates."""
from __future__ import annotations

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a photo of the large {}.",
    "a photo of the small {}.", "a close-up photo of a {}.", "a bright photo of a {}.", "itap of a {}.",
)
