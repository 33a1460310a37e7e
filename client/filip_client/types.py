"""Typed results of the client (no dependency on the engine)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Embeddings:
    """tokens float32 [N, T, D] (zero past each row's length), lengths int32 [N],
    pooled float32 [N, E] (L2-normalised projected image CLS / text EOT).
    Image tokens exclude CLS; text tokens include SOT and EOT."""
    tokens: np.ndarray
    lengths: np.ndarray
    pooled: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def __getitem__(self, idx) -> "Embeddings":
        idx = slice(idx, idx + 1) if isinstance(idx, int) else idx
        return Embeddings(self.tokens[idx], self.lengths[idx], self.pooled[idx])

    @staticmethod
    def concat(parts: list["Embeddings"]) -> "Embeddings":
        """Concatenate along N, padding the token axis with zeros to the widest part."""
        t = max(p.tokens.shape[1] for p in parts)
        tokens = np.concatenate([np.pad(p.tokens, ((0, 0), (0, t - p.tokens.shape[1]), (0, 0))) for p in parts])
        return Embeddings(tokens, np.concatenate([p.lengths for p in parts]), np.concatenate([p.pooled for p in parts]))


@dataclass(frozen=True)
class Hit:
    """One search result: the gallery item's id, its s_T score, and its stored metadata."""
    id: str
    score: float
    metadata: dict


class SearchResults(list):
    """What ``search`` returns: one list of :class:`Hit` per text, in order, best first; ``info``
    holds the server's INFO (gallery, mode, k, timings) of each request the call took (one per
    64 texts), so it travels with the results instead of living in the client."""

    def __init__(self, *args):
        super().__init__(*args)
        self.info: list[dict] = []


@dataclass
class IndexReport:
    """What ``index_images`` did: items added now, already present (skipped), failed (id -> why)."""
    gallery: str
    added: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    total: int = 0                   # items in the gallery afterwards
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.added / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Health:
    live: bool
    ready: bool
    models: dict[str, bool]          # model name -> ready (Triton's own view)
    # model name -> None if the canary request succeeded, else why it failed; only with deep=True.
    # Triton does not restart a crashed Python-backend stub and keeps reporting the model ready,
    # so only a real request shows that the model still works.
    canaries: dict[str, str | None] | None = None

    @property
    def ok(self) -> bool:
        return (self.live and self.ready and all(self.models.values())
                and (self.canaries is None or all(v is None for v in self.canaries.values())))
