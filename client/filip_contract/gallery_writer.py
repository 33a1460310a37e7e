"""Writing a FILIP gallery (format 1: :mod:`filip_contract.gallery`, docs/GALLERY.md).

``GalleryWriter`` appends whole segments to one gallery folder, one writer at a time
(flock), each segment's files fsynced and renamed into place before the manifest that lists
them replaces the old one.  Numpy only.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .gallery import FORMAT, MANIFEST, SEGMENT_FILE, SEGMENTS, TOKEN_DTYPES, VERSION, GalleryWriteError


class _HashingFile:
    """A binary file wrapper that hashes what is written (np.save writes through it)."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> dict[str, Any]:
    """Write via ``write(fileobj)`` to a temporary name, fsync, rename into place; -> size and sha256."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        h = _HashingFile(f)
        write(h)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": h.n, "sha256": h.sha.hexdigest()}


def quantize_int8(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: scale = max|x| / 127 per token, q = round(x / scale)."""
    x = np.asarray(tokens, np.float32)
    scale = np.abs(x).max(axis=-1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


class GalleryWriter:
    """Append-only writer of one gallery folder (created if missing, resumed if present).

        with GalleryWriter("galleries/photos", token_dtype="float16") as w:
            w.add(ids, tokens, pooled, metadata)      # one committed segment per call
    """

    def __init__(self, path: str | os.PathLike, *, token_dtype: str = "float16", model: Mapping[str, Any] | None = None):
        if token_dtype not in TOKEN_DTYPES:
            raise GalleryWriteError(f"token_dtype must be one of {tuple(TOKEN_DTYPES)}, got {token_dtype!r}")
        self.path = Path(path)
        (self.path / SEGMENTS).mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise GalleryWriteError(f"{self.path} is being written by another process") from None
        manifest_path = self.path / MANIFEST
        if manifest_path.exists():
            try:
                self.manifest = json.loads(manifest_path.read_text())
            except (OSError, ValueError) as e:
                self.close()
                raise GalleryWriteError(f"{manifest_path} is not a readable gallery manifest ({e}); "
                                        "move it away to start a new gallery") from e
            if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
                self.close()
                raise GalleryWriteError(f"{manifest_path} is not a {FORMAT} version {VERSION} manifest")
            if self.manifest.get("token_dtype") != token_dtype:
                self.close()
                raise GalleryWriteError(f"{self.path} stores {self.manifest.get('token_dtype')} tokens; "
                                        f"cannot append {token_dtype}")
        else:
            self.manifest = {"format": FORMAT, "version": VERSION, "token_dtype": token_dtype, "count": 0,
                             "tokens_per_item": None, "dim": None, "pooled_dim": None,
                             "model": dict(model or {}), "segments": []}
        self.token_dtype = token_dtype
        self._ids: set[str] = set()
        for seg in self.manifest["segments"]:
            with open(self.path / SEGMENTS / f"{seg['name']}.items.jsonl", encoding="utf-8") as f:
                self._ids.update(json.loads(line)["id"] for line in f)
        self.removed_orphans = self._remove_orphans()

    # --- state ---------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._ids

    def __len__(self) -> int:
        return self.count

    def _remove_orphans(self) -> list[str]:
        """Delete files of segments that no manifest lists (left by a killed writer)."""
        listed = {seg["name"] for seg in self.manifest["segments"]}
        removed = []
        for p in (self.path / SEGMENTS).iterdir():
            name = p.name.split(".", 1)[0]
            if SEGMENT_FILE.match(p.name) and name not in listed:
                p.unlink()
                removed.append(p.name)
        return removed

    # --- writing -------------------------------------------------------------------------
    def _check(self, ids: Sequence[str], tokens: np.ndarray, pooled: np.ndarray,
               metadata: Sequence[Mapping[str, Any] | None] | None) -> list[str]:
        problems = []
        n = len(ids)
        if n == 0:
            problems.append("no items to add")
        if tokens.ndim != 3:
            problems.append(f"tokens must be [n, P, D], got shape {list(tokens.shape)}")
        elif tokens.shape[0] != n:
            problems.append(f"{tokens.shape[0]} token rows for {n} ids")
        if pooled.ndim != 2 or pooled.shape[0] != n:
            problems.append(f"pooled must be [n={n}, E], got shape {list(pooled.shape)}")
        if tokens.dtype.kind != "f" or pooled.dtype.kind != "f":
            problems.append(f"tokens and pooled must be floating point, got {tokens.dtype} and {pooled.dtype}")
        elif not (np.isfinite(tokens).all() and np.isfinite(pooled).all()):
            problems.append("tokens or pooled contain NaN or Inf")
        m = self.manifest
        if tokens.ndim == 3 and m["tokens_per_item"] is not None and (
                tokens.shape[1] != m["tokens_per_item"] or tokens.shape[2] != m["dim"]):
            problems.append(f"tokens are [{tokens.shape[1]}, {tokens.shape[2]}] per item; this gallery holds "
                            f"[{m['tokens_per_item']}, {m['dim']}] (another model?)")
        if pooled.ndim == 2 and m["pooled_dim"] is not None and pooled.shape[1] != m["pooled_dim"]:
            problems.append(f"pooled dimension {pooled.shape[1]}; this gallery holds {m['pooled_dim']}")
        seen = set()
        for i, item_id in enumerate(ids):
            if not isinstance(item_id, str) or not item_id or "\n" in item_id:
                problems.append(f"id {i} must be a non-empty one-line string, got {item_id!r}")
            elif item_id in self._ids or item_id in seen:
                problems.append(f"id {item_id!r} is already in the gallery")
            seen.add(item_id)
        if metadata is not None:
            if len(metadata) != n:
                problems.append(f"{len(metadata)} metadata entries for {n} ids")
            else:
                for i, meta in enumerate(metadata):
                    if meta is not None and not isinstance(meta, Mapping):
                        problems.append(f"metadata {i} must be a dict or None, got {type(meta).__name__}")
                        continue
                    try:
                        json.dumps(meta or {}, allow_nan=False)
                    except (TypeError, ValueError) as e:
                        problems.append(f"metadata {i} is not JSON-serialisable: {e}")
        return problems

    def add(self, ids: Sequence[str], tokens: np.ndarray, pooled: np.ndarray,
            metadata: Sequence[Mapping[str, Any] | None] | None = None) -> int:
        """Commit one segment of ``len(ids)`` items; returns the gallery's new item count.

        tokens [n, P, D] (the image tower's TOKENS, L2-normalised per token), pooled [n, E].
        All problems are reported at once and nothing is written when there is one."""
        tokens, pooled = np.asarray(tokens), np.asarray(pooled)
        ids = list(ids)
        problems = self._check(ids, tokens, pooled, metadata)
        if problems:
            raise GalleryWriteError("cannot add to the gallery: " + "; ".join(problems))
        m = self.manifest
        name = f"seg-{len(m['segments']):06d}"
        seg_dir = self.path / SEGMENTS
        x = tokens.astype(np.float32, copy=False)
        files: dict[str, dict] = {}
        if self.token_dtype == "int8":
            q, scales = quantize_int8(x)
            files["tokens.npy"] = _write_file(seg_dir / f"{name}.tokens.npy", lambda f: np.save(f, q))
            files["scales.npy"] = _write_file(seg_dir / f"{name}.scales.npy", lambda f: np.save(f, scales))
        else:
            t16 = x.astype(np.float16)
            files["tokens.npy"] = _write_file(seg_dir / f"{name}.tokens.npy", lambda f: np.save(f, t16))
        files["pooled.npy"] = _write_file(seg_dir / f"{name}.pooled.npy",
                                          lambda f: np.save(f, pooled.astype(np.float32, copy=False)))
        files["centroid.npy"] = _write_file(seg_dir / f"{name}.centroid.npy",
                                            lambda f: np.save(f, x.mean(axis=1, dtype=np.float32)))
        lines = "".join(json.dumps({"id": i, "meta": dict(meta or {})}, ensure_ascii=False, allow_nan=False) + "\n"
                        for i, meta in zip(ids, metadata or [None] * len(ids)))
        files["items.jsonl"] = _write_file(seg_dir / f"{name}.items.jsonl", lambda f: f.write(lines.encode("utf-8")))
        new = dict(m, count=m["count"] + len(ids), tokens_per_item=int(tokens.shape[1]), dim=int(tokens.shape[2]),
                   pooled_dim=int(pooled.shape[1]), updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   segments=m["segments"] + [{"name": name, "count": len(ids), "files": files}])
        text = json.dumps(new, indent=1).encode("utf-8")
        _write_file(self.path / MANIFEST, lambda f: f.write(text))
        _fsync_dir(seg_dir)
        _fsync_dir(self.path)
        self.manifest = new
        self._ids.update(ids)
        return self.count

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

