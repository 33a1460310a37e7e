"""Reading a FILIP gallery (format 1: :mod:`filip_contract.gallery`, docs/GALLERY.md): pre-computed patch tokens, memory-mapped, verified before use.

``Gallery.open`` reads the manifest, checks every listed file's presence, size, SHA-256
(``verify="full"``, the default; ``"size"`` skips the hashing of large galleries) and npy
header (dtype and shape against the manifest), and the item lists (count, unique ids).  Any
problem raises :class:`~filip_contract.gallery.GalleryError` naming the file; nothing is half-opened.
Files that no manifest lists (a writer killed mid-segment) are never read.

Tokens are memory-mapped (``np.load(mmap_mode="r")``), or read into process memory when
``load="memory"`` (``"auto"``, the default: when they take at most half of the memory
available).  Why in memory when they fit: a kernel that reclaims cold page cache
proactively (DAMON) re-reads parts of a large memory-mapped gallery from disk between
queries, while anonymous memory is not reclaimed without swap (docs/GALLERY.md has the
measured difference).  The per-item centroids (first-stage
vectors, [N, D] fp32) and the ids are always in memory.
"""
from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .gallery import FORMAT, MANIFEST, SEGMENTS, TOKEN_DTYPES, VERSION, GalleryError, sha256


@dataclass(frozen=True)
class Segment:
    name: str
    start: int                     # first gallery row
    count: int
    tokens: np.ndarray             # [n, P, D] float16 or int8 (memory-mapped)
    scales: np.ndarray | None      # [n, P] float32 (int8 only)
    pooled: np.ndarray             # [n, E] float32 (memory-mapped)
    centroid: np.ndarray           # [n, D] float32 (memory-mapped)

    def raw(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows a..b (segment-local) as stored: tokens [b-a, P, D] and int8 scales [b-a, P] or None."""
        return self.tokens[a:b], None if self.scales is None else self.scales[a:b]


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _prefetch(a: np.ndarray, rows: np.ndarray) -> None:
    """Ask the kernel to start reading the given rows of a memory-mapped array, all at once
    (madvise WILLNEED), before they are touched one by one.  Without it a gather of 2,000
    random B/32 items from a gallery larger than memory faults them in one at a time; with it
    the reads are queued together (measured at 1M items: docs/BENCHMARKS.md)."""
    mm = getattr(a, "_mmap", None) or getattr(getattr(a, "base", None), "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or len(rows) == 0:
        return
    row_bytes = a.strides[0]
    base = a.offset if isinstance(a, np.memmap) else 0
    page = mmap.PAGESIZE
    for r in rows.tolist():
        start = base + r * row_bytes
        aligned = start - start % page
        try:
            mm.madvise(mmap.MADV_WILLNEED, aligned, start + row_bytes - aligned)
        except (OSError, ValueError):
            return


def _need(cond: bool, where: Path, msg: str) -> None:
    if not cond:
        raise GalleryError(f"{where}: {msg}")


class Gallery:
    """One verified, memory-mapped gallery."""

    def __init__(self, path: Path, manifest: dict, segments: list[Segment], ids: list[str], meta_lines: list[str]):
        self.path, self.manifest, self.segments = path, manifest, segments
        self.ids = ids
        self._meta_lines = meta_lines
        self.count = int(manifest["count"])
        self.dim = int(manifest["dim"] or 0)
        self.tokens_per_item = int(manifest["tokens_per_item"] or 0)
        self.pooled_dim = int(manifest.get("pooled_dim") or 0)
        self.token_dtype = manifest["token_dtype"]
        self._row_of: dict[str, int] | None = None
        self._centroids: np.ndarray | None = None
        self._pooled: np.ndarray | None = None
        self._starts = np.array([s.start for s in segments], np.int64)
        self.in_memory = bool(segments) and not isinstance(segments[0].tokens, np.memmap)

    # --- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, verify: str = "full", load: str = "auto") -> "Gallery":
        if verify not in ("full", "size"):
            raise GalleryError(f"verify must be 'full' or 'size', got {verify!r}")
        if load not in ("auto", "memory", "mmap"):
            raise GalleryError(f"load must be 'auto', 'memory' or 'mmap', got {load!r}")
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise GalleryError(f"no gallery at {path} (not a folder)")
        if not mpath.is_file():
            raise GalleryError(f"no gallery at {path}: {MANIFEST} is missing (never committed, or not a gallery)")
        try:
            m = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise GalleryError(f"{mpath}: unreadable manifest ({e})") from e
        _need(isinstance(m, dict) and m.get("format") == FORMAT, mpath, f"not a {FORMAT} manifest")
        _need(m.get("version") == VERSION, mpath, f"format version {m.get('version')!r}; this engine reads {VERSION}")
        _need(m.get("token_dtype") in TOKEN_DTYPES, mpath, f"unknown token_dtype {m.get('token_dtype')!r}")
        segs_m = m.get("segments")
        _need(isinstance(segs_m, list), mpath, "segments must be a list")
        count = m.get("count")
        _need(isinstance(count, int) and count == sum(int(s.get("count", -1)) for s in segs_m), mpath,
              "count does not equal the sum of the segments' counts")
        if count:
            for key in ("tokens_per_item", "dim", "pooled_dim"):
                _need(isinstance(m.get(key), int) and m[key] > 0, mpath, f"{key} must be a positive integer")
        p, d, e = m.get("tokens_per_item"), m.get("dim"), m.get("pooled_dim")
        want = {"tokens.npy": (TOKEN_DTYPES[m["token_dtype"]], (p, d)), "pooled.npy": (np.float32, (e,)),
                "centroid.npy": (np.float32, (d,))}
        if m["token_dtype"] == "int8":
            want["scales.npy"] = (np.float32, (p,))
        if load == "auto":
            token_bytes = sum(int(s.get("files", {}).get("tokens.npy", {}).get("bytes", 0)) for s in segs_m
                              if isinstance(s, dict))
            load = "memory" if token_bytes <= 0.5 * _available_memory() else "mmap"
        segments, ids, meta_lines, start = [], [], [], 0
        for s in segs_m:
            name, n, files = s.get("name"), s.get("count"), s.get("files")
            _need(isinstance(name, str) and isinstance(n, int) and n > 0 and isinstance(files, dict), mpath,
                  f"malformed segment entry {s!r:.200}")
            arrays: dict[str, np.ndarray] = {}
            for kind in (*want, "items.jsonl"):
                f = path / SEGMENTS / f"{name}.{kind}"
                info = files.get(kind)
                _need(isinstance(info, dict), mpath, f"segment {name} lists no {kind}")
                _need(f.is_file(), f, "missing (the manifest lists it)")
                size = f.stat().st_size
                _need(size == info.get("bytes"), f, f"{size} bytes, the manifest says {info.get('bytes')} (truncated or replaced)")
                if verify == "full":
                    _need(sha256(f) == info.get("sha256"), f, "checksum mismatch (corrupt)")
                if kind == "items.jsonl":
                    continue
                try:
                    a = np.load(f, mmap_mode="r", allow_pickle=False)
                except Exception as ex:  # numpy raises ValueError/OSError/... on a bad header
                    raise GalleryError(f"{f}: not a readable .npy array ({ex})") from ex
                dtype, tail = want[kind]
                _need(a.dtype == dtype and a.shape == (n, *tail), f,
                      f"holds {a.dtype} {list(a.shape)}, expected {np.dtype(dtype)} {[n, *tail]}")
                if load == "memory" and kind in ("tokens.npy", "scales.npy"):
                    a = np.array(a)                     # read into process memory (see the module doc)
                arrays[kind] = a
            items = path / SEGMENTS / f"{name}.items.jsonl"
            lines = items.read_text(encoding="utf-8").splitlines()
            _need(len(lines) == n, items, f"{len(lines)} items for a segment of {n}")
            for i, line in enumerate(lines):
                try:
                    item_id = json.loads(line)["id"]
                except (ValueError, KeyError, TypeError) as ex:
                    raise GalleryError(f"{items}: line {i + 1} is not an item record ({ex})") from ex
                ids.append(item_id)
            meta_lines.extend(lines)
            segments.append(Segment(name, start, n, arrays["tokens.npy"], arrays.get("scales.npy"),
                                    arrays["pooled.npy"], arrays["centroid.npy"]))
            start += n
        _need(len(set(ids)) == len(ids), mpath, "item ids are not unique")
        return cls(path, m, segments, ids, meta_lines)

    # --- access --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.count

    def info(self) -> dict[str, Any]:
        return {"path": str(self.path), "count": self.count, "tokens_per_item": self.tokens_per_item,
                "dim": self.dim, "token_dtype": self.token_dtype, "segments": len(self.segments),
                "in_memory": self.in_memory,
                "updated": self.manifest.get("updated"), "model": self.manifest.get("model", {})}

    def metadata(self, row: int) -> dict:
        return json.loads(self._meta_lines[row]).get("meta", {})

    def rows_of(self, ids) -> np.ndarray:
        """Gallery rows of the given ids (unknown ids are ignored)."""
        if self._row_of is None:
            self._row_of = {item_id: r for r, item_id in enumerate(self.ids)}
        return np.array(sorted({self._row_of[i] for i in ids if i in self._row_of}), np.int64)

    def centroids(self) -> np.ndarray:
        """[N, D] float32 first-stage vectors, concatenated in memory once."""
        if self._centroids is None:
            parts = [np.asarray(s.centroid) for s in self.segments]
            self._centroids = (np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32))
        return self._centroids

    def pooled(self) -> np.ndarray:
        """[N, E] float32 pooled (global) embeddings, concatenated in memory once."""
        if self._pooled is None:
            parts = [np.asarray(s.pooled) for s in self.segments]
            self._pooled = (np.concatenate(parts) if parts else np.zeros((0, self.pooled_dim), np.float32))
        return self._pooled

    def chunks(self, rows_per_chunk: int) -> Iterator[tuple[int, Segment, int, int]]:
        """(gallery row of the chunk, segment, local a, local b) over all rows in order."""
        for s in self.segments:
            for a in range(0, s.count, rows_per_chunk):
                yield s.start + a, s, a, min(a + rows_per_chunk, s.count)

    def raw_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Stored tokens [len(rows), P, D] (fp16 or int8) and int8 scales [len(rows), P] (else
        None) of the given gallery rows, in the order given; read in sorted order per segment."""
        rows = np.asarray(rows, np.int64)
        tokens = np.empty((len(rows), self.tokens_per_item, self.dim), TOKEN_DTYPES[self.token_dtype])
        scales = np.empty((len(rows), self.tokens_per_item), np.float32) if self.token_dtype == "int8" else None
        if len(rows) == 0:
            return tokens, scales
        seg_of = np.searchsorted(self._starts, rows, side="right") - 1
        for si in np.unique(seg_of):
            s = self.segments[si]
            pick = np.nonzero(seg_of == si)[0]
            order = np.argsort(rows[pick], kind="stable")
            local = rows[pick][order] - s.start
            _prefetch(s.tokens, local)
            tokens[pick[order]] = s.tokens[local]
            if scales is not None:
                scales[pick[order]] = s.scales[local]
        return tokens, scales

    def tokens_of(self, rows: np.ndarray) -> np.ndarray:
        """fp32 [len(rows), P, D] tokens of the given rows, dequantised (for checks and references)."""
        tokens, scales = self.raw_rows(rows)
        x = tokens.astype(np.float32)
        if scales is not None:
            x *= scales[:, :, None]
        return x
