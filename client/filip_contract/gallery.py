"""The gallery format (version 1): pre-computed image tokens in a folder that needs nothing
but the filesystem.  One writer (:mod:`filip_contract.gallery_writer`) and one reader
(:mod:`filip_contract.gallery_reader`) share these definitions; both are numpy-only, so the
client writes galleries without torch and the server reads the same code.

A gallery folder::

    gallery.json                      the manifest; written last, atomically (os.replace)
    segments/seg-000000.tokens.npy    [n, P, D] float16 (default) or int8 patch tokens
    segments/seg-000000.scales.npy    [n, P] float32 per-token scale (int8 only: x ~ q * scale)
    segments/seg-000000.pooled.npy    [n, E] float32 pooled (CLS) embeddings
    segments/seg-000000.centroid.npy  [n, D] float32 mean of the item's fp32 patch tokens
    segments/seg-000000.items.jsonl   one {"id": str, "meta": {...}} per item, in row order
    .lock                             held (flock) by the one writer

The manifest (``format: "filip-gallery"``, ``version: 1``) lists the committed segments in
row order with each file's byte size and SHA-256.  Segments are immutable: a writer adds a
whole segment (files fsynced, then renamed into place) and only then replaces the manifest,
so a killed writer loses nothing it had committed, and files of an uncommitted segment are
never listed (the next writer deletes them).  A reader sees only what a manifest lists and
verifies sizes and checksums before serving.

The centroid is the plain mean of the item's patch tokens (before any quantisation).  For
a query with tokens y_r, ``<centroid, mean_r y_r>`` is a lower bound of FILIP's s_T (each
``<x_k, y_r>`` is at most ``max_k <x_k, y_r>``), which is why it is the first-stage vector
of two-stage search.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from .errors import FilipInvalidInputError, FilipServerError

FORMAT = "filip-gallery"
VERSION = 1
MANIFEST = "gallery.json"
SEGMENTS = "segments"
TOKEN_DTYPES = {"float16": np.float16, "int8": np.int8}     # how tokens may be stored
SEGMENT_FILE = re.compile(r"^seg-\d{6}\.")                  # files that belong to some segment


class GalleryError(FilipServerError):
    """A gallery that is missing, incomplete, corrupt or incompatible, or a search that cannot
    run (no gallery loaded): the server's state, not the caller's request."""


class GalleryWriteError(FilipInvalidInputError):
    """The gallery cannot be written as asked (bad items, incompatible gallery, locked)."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def gallery_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a gallery's committed files (its manifest's sizes plus the manifest)."""
    path = Path(path)
    m = json.loads((path / MANIFEST).read_text())
    return (path / MANIFEST).stat().st_size + sum(f["bytes"] for s in m["segments"] for f in s["files"].values())
