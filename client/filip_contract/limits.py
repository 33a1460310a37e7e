"""What one request may carry, with the defaults: the server enforces these, the client
checks them before sending.

The per-request limits are settings of a repository (``python export/to_trt.py --limit
NAME=VALUE``); they are written into every model's ``config.pbtxt`` as ``limit_<name>``
parameters, so a client reads the values the server it talks to enforces
(:meth:`ServingLimits.from_params`).  The search bounds are fixed by the protocol.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Mapping


@dataclass(frozen=True)
class ServingLimits:
    """Per-request limits enforced on the server."""
    max_items_per_request: int = 256     # texts or images in one request
    max_text_chars: int = 2_000          # characters per text (CLIP truncates at 77 tokens anyway)
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000   # declared width x height, checked before decoding
    max_score_items: int = 100_000       # image x text pairs per scoring request

    PARAM_PREFIX = "limit_"

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"limit {f.name} must be a positive integer, got {v!r}")

    def to_params(self) -> dict[str, str]:
        """As Triton config parameters (``limit_<name>``)."""
        return {self.PARAM_PREFIX + k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> "ServingLimits":
        """From a config's string parameters; limits a config does not publish keep their defaults."""
        known = {f.name for f in fields(cls)}
        values = {k[len(cls.PARAM_PREFIX):]: int(v) for k, v in params.items()
                  if k.startswith(cls.PARAM_PREFIX) and k[len(cls.PARAM_PREFIX):] in known}
        return cls(**values)


# --- filip_search ----------------------------------------------------------------------------
SEARCH_MODES = ("exact", "two_stage")
DEFAULT_MODE = "exact"
MAX_QUERIES = 64                 # queries per search request
DEFAULT_K, MAX_K = 10, 1000      # hits per query
DEFAULT_CANDIDATES, MAX_CANDIDATES = 2000, 100_000   # two-stage candidates per query
