"""Gallery search: exact and two-stage, by late interaction or pooled cosine, plus the served endpoint.

With ``scoring="token"`` (FILIP's) ranking is by the text-to-image score
(docs/ARCHITECTURE.md, "Late interaction"):

    s_T(image, text) = (1/n2) * sum_r max_k <x_k, y_r>      (r over the text's real tokens)

With ``scoring="global"`` (CLIP's) it is the cosine of the query's pooled embedding with each
item's stored pooled embedding: exact is a brute-force product over all of them; two-stage
takes its candidates from a faiss index over the pooled embeddings (built when first used)
and re-ranks them by the exact cosine. The rest of this note is about token scoring.

- **exact**: every gallery item is scored.  Chunks of 200 images, as stored (fp16, or int8
  with per-token scales), go through the MaxSim kernel of engine/maxsim.py on ONNX Runtime
  (:class:`MaxSimKernel`, shared with pair scoring): cast to fp32 in cache, one GEMM
  against all queries' real tokens at once (fp32 accumulation), max over patches, and the
  per-query mean as a product with a [L, n_queries] averaging matrix (so no padded query
  token is ever computed).  ONNX Runtime's thread pool uses every core.
- **two_stage**: a first stage proposes ``candidates`` items per query, which are then
  re-ranked exactly.  The default first stage is faiss's exact inner-product index over
  each item's token centroid (the mean of its patch tokens) queried with the mean of the
  query's tokens: that score is a lower bound of s_T (``<mean_k x_k, y_r> <= max_k <x_k, y_r>``),
  so it orders items by a cheap proxy of the real score.  Any object with the
  :class:`CandidateStage` interface can replace it (engine/qdrant_store.py: Qdrant).

Why the kernel is hand-written: faiss and vector databases score single vectors (or, for
multi-vector, ColBERT's sum of maxima with their own masks and no fp16/int8 MaxSim over a
memory-mapped gallery); engine/maxsim.py says more.  Search needs only s_T, streamed over a
memory map, with a running top-k.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from filip_contract.gallery_reader import Gallery
from filip_contract.gallery_writer import GalleryWriter
from filip_contract.limits import (DEFAULT_CANDIDATES, DEFAULT_K, DEFAULT_MODE, MAX_CANDIDATES, MAX_K, MAX_QUERIES,
                                   SEARCH_MODES, ServingLimits)
from filip_contract.scoring import DEFAULT_PARAM as SCORING_PARAM, check_scoring, normalise

from .errors import FilipError, GalleryError, InvalidInputError
from .maxsim import MaxSimKernel, Queries, TorchMaxSimKernel
from .serving import decode_texts, utf8

CHUNK_IMAGES = 200                # ~5 MB of fp16 B/32 tokens per kernel call (measured best: 100-200)


# --- the kernel (engine/maxsim.py) ----------------------------------------------------------------
def exact_scores(gallery: Gallery, q: Queries, *, kernel: MaxSimKernel | None = None,
                 chunk_images: int = CHUNK_IMAGES) -> np.ndarray:
    """s_T of every gallery item for every query -> fp32 [nq, N] (the whole gallery streamed once)."""
    kernel = kernel or MaxSimKernel(gallery.token_dtype, gallery.tokens_per_item, gallery.dim)
    out = np.empty((q.n, gallery.count), np.float32)
    resident = getattr(kernel, "resident_bytes", 0) > 0      # a torch kernel keeping stored chunks on the device
    for row, seg, a, b in gallery.chunks(chunk_images):
        if resident:
            out[:, row:row + b - a] = kernel(*seg.raw(a, b), q, key=(id(seg), a, b))
        else:
            out[:, row:row + b - a] = kernel(*seg.raw(a, b), q)
    return out


def scores_of_rows(gallery: Gallery, rows: np.ndarray, q: Queries, *, kernel: MaxSimKernel | None = None,
                   chunk_images: int = CHUNK_IMAGES) -> np.ndarray:
    """s_T of the given gallery rows only -> fp32 [nq, len(rows)] (gathered from the memory map)."""
    kernel = kernel or MaxSimKernel(gallery.token_dtype, gallery.tokens_per_item, gallery.dim)
    out = np.empty((q.n, len(rows)), np.float32)
    for a in range(0, len(rows), chunk_images):
        part = rows[a:a + chunk_images]
        out[:, a:a + len(part)] = kernel(*gallery.raw_rows(part), q)
    return out


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the k best columns, best first (ties: lower column first) -> (cols, values)."""
    k = min(k, scores.shape[1])
    if k == 0:
        return np.zeros((scores.shape[0], 0), np.int64), np.zeros((scores.shape[0], 0), np.float32)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    cols = np.take_along_axis(part, order, axis=1)
    return cols.astype(np.int64), np.take_along_axis(vals, order, axis=1)


# --- first stages --------------------------------------------------------------------------------
class CandidateStage(Protocol):
    """What two-stage search needs from a first stage (local faiss, or a remote engine)."""
    name: str

    def candidates(self, q: Queries, n: int, allowed: np.ndarray | None) -> list[np.ndarray]:
        """Per query, up to ``n`` gallery rows (int64) likely to score high; only rows in
        ``allowed`` (sorted int64 rows) when given."""
        ...


class VectorStage:
    """faiss inner-product index over one vector per item.

    ``kind="flat"``: exact (IndexFlatIP), one pass over N x D fp32 per query batch; ``"ivf"``:
    IndexIVFFlat with ``nlist`` k-means cells (default 4*sqrt(N)) trained on a fixed-seed
    sample, searching ``nprobe`` cells (default 64); ``"auto"``: flat up to 200,000 items
    (a flat scan of 1M vectors reads 1 GB per query), else ivf."""

    FLAT_MAX = 200_000

    def __init__(self, vectors: np.ndarray, kind: str = "auto", *, label: str = "vector", nlist: int | None = None,
                 nprobe: int = 64):
        import faiss  # imported here: only two-stage search needs it

        if kind not in ("auto", "flat", "ivf"):
            raise InvalidInputError(f"first-stage kind must be auto, flat or ivf, got {kind!r}")
        self._faiss = faiss
        n, d = vectors.shape[0], max(vectors.shape[1], 1)
        if kind == "auto":
            kind = "flat" if n <= self.FLAT_MAX else "ivf"
        self.kind, self.nprobe = kind, nprobe
        self.name = f"{label}-{kind}"
        x = np.ascontiguousarray(vectors, np.float32) if n else np.zeros((0, d), np.float32)
        if kind == "flat" or n == 0:
            self.index = faiss.IndexFlatIP(d)
        else:
            nlist = nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))      # faiss wants >= 39 points per cell
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = x if n <= 64 * nlist else x[np.sort(np.random.default_rng(0).choice(n, 64 * nlist, replace=False))]
            self.index.train(sample)
            self.nlist = nlist
        if n:
            self.index.add(x)

    def nearest(self, vectors: np.ndarray, n: int, allowed: np.ndarray | None) -> list[np.ndarray]:
        """Per query vector, up to ``n`` rows by inner product (only ``allowed`` rows when given)."""
        f = self._faiss
        sel = None if allowed is None else f.IDSelectorBatch(allowed)
        if self.kind == "ivf":
            params = f.SearchParametersIVF(nprobe=self.nprobe, sel=sel) if sel is not None else f.SearchParametersIVF(nprobe=self.nprobe)
        else:
            params = None if sel is None else f.SearchParameters(sel=sel)
        n = min(n, self.index.ntotal if allowed is None else len(allowed))
        if n == 0:
            return [np.zeros(0, np.int64) for _ in range(len(vectors))]
        _, rows = self.index.search(np.ascontiguousarray(vectors, np.float32), n, params=params)
        return [r[r >= 0].astype(np.int64) for r in rows]


class CentroidStage(VectorStage):
    """The token-scoring first stage: a :class:`VectorStage` over the items' token centroids,
    queried with the mean of each query's real tokens."""

    def __init__(self, gallery: Gallery, kind: str = "auto", *, nlist: int | None = None, nprobe: int = 64):
        super().__init__(gallery.centroids(), kind, label="centroid", nlist=nlist, nprobe=nprobe)

    def candidates(self, q: Queries, n: int, allowed: np.ndarray | None) -> list[np.ndarray]:
        return self.nearest(q.mean, n, allowed)


# --- search --------------------------------------------------------------------------------------
@dataclass
class Hits:
    """Each query's hits, best first, padded to the longest: query i has ``counts[i]`` hits,
    rows[i, :counts[i]] and scores[i, :counts[i]]; past them rows are -1 and scores -inf.
    A query's hits are what it gets when searched alone."""
    rows: np.ndarray              # [nq, k'] int64 gallery rows (-1: padding)
    scores: np.ndarray            # [nq, k'] float32 s_T (-inf: padding)
    counts: np.ndarray            # [nq] int64 real hits per query
    timings_ms: dict = field(default_factory=dict)

    @classmethod
    def uniform(cls, rows: np.ndarray, scores: np.ndarray, timings_ms: dict) -> "Hits":
        return cls(rows, scores, np.full(rows.shape[0], rows.shape[1], np.int64), timings_ms)


class Searcher:
    """A gallery with its first stages, ready to answer queries."""

    def __init__(self, gallery: Gallery, stage: CandidateStage | None = None, *, threads: int | None = None,
                 first_stage: str = "auto", device: str | None = None, resident_bytes: int | None = None):
        """``device`` None: token scoring on the ONNX Runtime kernel (CPU); "cuda" (or "cpu", the
        same torch code path): :class:`~filip_engine.maxsim.TorchMaxSimKernel` there, the
        gallery's tokens kept in device memory when they fit (``resident_bytes``; default on
        CUDA: up to half the device's free memory, on the CPU: none)."""
        self.gallery = gallery
        self.device = device
        if device is None:
            self.kernel = MaxSimKernel(gallery.token_dtype, gallery.tokens_per_item or 1, gallery.dim or 1, threads)
        else:
            if resident_bytes is None:
                resident_bytes = 0
                if str(device).startswith("cuda"):
                    import torch
                    free, _ = torch.cuda.mem_get_info(torch.device(device))
                    resident_bytes = free // 2
            self.kernel = TorchMaxSimKernel(gallery.token_dtype, gallery.tokens_per_item or 1, gallery.dim or 1,
                                            device, resident_bytes)
        t = time.perf_counter()
        self.stage = stage if stage is not None else CentroidStage(gallery, first_stage)
        self.stage_build_ms = (time.perf_counter() - t) * 1e3
        self.first_stage = first_stage if first_stage in ("auto", "flat", "ivf") else "auto"
        self._pooled_stage: VectorStage | None = None      # global two-stage: built when first needed

    def pooled_stage(self) -> VectorStage:
        if self._pooled_stage is None:
            self._pooled_stage = VectorStage(self.gallery.pooled(), self.first_stage, label="pooled")
        return self._pooled_stage

    def search(self, q: Queries | None, k: int = DEFAULT_K, *, mode: str = DEFAULT_MODE, candidates: int = DEFAULT_CANDIDATES,
               allowed_ids: Sequence[str] | None = None, scoring: str = "token", pooled: np.ndarray | None = None) -> Hits:
        """Top-``k`` items per query. ``scoring="token"``: by s_T of the query tokens ``q``;
        ``"global"``: by the cosine of the queries' ``pooled`` embeddings [nq, E] with the items'."""
        if mode not in SEARCH_MODES:
            raise InvalidInputError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
        check_scoring(scoring, InvalidInputError)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k must be a positive integer, got {k!r}")
        if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
            raise InvalidInputError(f"candidates must be a positive integer, got {candidates!r}")
        g = self.gallery
        if scoring == "global":
            qn = normalise(_check_pooled(pooled, g.pooled_dim))          # the queries, normalised once
            score_rows = lambda rows, i=None: (qn if i is None else qn[i:i + 1]) @ g.pooled()[rows].T
            score_all = lambda: qn @ g.pooled().T
            first = lambda allowed: self.pooled_stage().nearest(qn, candidates, allowed)
            nq = qn.shape[0]
        else:
            if q is None or q.dim != g.dim:
                raise InvalidInputError(f"query tokens have dimension {None if q is None else q.dim}; "
                                        f"the gallery holds {g.dim}")
            score_rows = lambda rows, i=None: scores_of_rows(g, rows, q if i is None else q.one(i), kernel=self.kernel)
            score_all = lambda: exact_scores(g, q, kernel=self.kernel)
            first = lambda allowed: self.stage.candidates(q, candidates, allowed)
            nq = q.n
        allowed = None if allowed_ids is None else g.rows_of(allowed_ids)
        t0 = time.perf_counter()
        if allowed is not None and len(allowed) <= max(candidates, g.count // 4):
            # Few allowed items: scoring them all exactly is cheaper than any first stage.
            cols, vals = _top_k(score_rows(allowed), k)
            return Hits.uniform(allowed[cols] if len(allowed) else cols, vals, {"exact": _ms(t0)})
        if mode == "exact":
            s = score_all()
            if allowed is not None:
                keep = np.zeros(g.count, bool)
                keep[allowed] = True
                s[:, ~keep] = -np.inf
            cols, vals = _top_k(s, min(k, g.count if allowed is None else len(allowed)))
            return Hits.uniform(cols, vals, {"exact": _ms(t0)})
        cands = first(allowed)
        t1 = time.perf_counter()
        counts = np.array([min(k, len(c)) for c in cands], np.int64)   # a query may get fewer candidates than k
        rows = np.full((nq, int(counts.max(initial=0))), -1, np.int64)
        vals = np.full(rows.shape, -np.inf, np.float32)
        for i, c in enumerate(cands):      # each query re-ranks its own candidates only
            c = np.sort(c)
            cols, v = _top_k(score_rows(c, i), int(counts[i]))
            rows[i, :counts[i]], vals[i, :counts[i]] = c[cols[0]], v[0]
        return Hits(rows, vals, counts, {"first_stage": (t1 - t0) * 1e3, "rerank": _ms(t1)})


def _check_pooled(pooled, dim: int) -> np.ndarray:
    p = None if pooled is None else np.asarray(pooled)
    if p is None or p.ndim != 2 or p.shape[0] < 1 or p.dtype.kind != "f":
        raise InvalidInputError(f"global scoring needs the queries' pooled embeddings as a float [nq, E] array, "
                                f"got {None if p is None else (p.dtype, list(p.shape))}")
    if p.shape[1] != dim:
        raise InvalidInputError(f"query pooled embeddings have dimension {p.shape[1]}; the gallery holds {dim}")
    if not np.isfinite(p).all():
        raise InvalidInputError("query pooled embeddings contain NaN or Inf")
    return p.astype(np.float32, copy=False)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


# --- the served endpoint ---------------------------------------------------------------------------
EmbedTexts = Callable[[list[str]], tuple[np.ndarray, np.ndarray, np.ndarray]]   # tokens, lengths, pooled


def _scalar_str(raw, what: str) -> str:
    items = _strings(raw, what)
    if len(items) != 1:
        raise InvalidInputError(f"{what} must hold exactly one value, got {len(items)}")
    return items[0]


def _scalar_int(raw, what: str, lo: int, hi: int) -> int:
    a = np.asarray(raw)
    if a.dtype.kind not in "iu" or a.size != 1:
        raise InvalidInputError(f"{what} must be one integer, got {a.dtype} {list(a.shape)}")
    v = int(a.reshape(-1)[0])
    if not lo <= v <= hi:
        raise InvalidInputError(f"{what} must lie in [{lo}, {hi}], got {v}")
    return v


def _strings(raw, what: str) -> list[str]:
    return [utf8(v, f"{what}[{i}]") for i, v in enumerate(np.asarray(raw, dtype=object).reshape(-1))]


def _json_object(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InvalidInputError(f"{what} is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise InvalidInputError(f"gallery name {name!r} must be a plain folder name under the gallery root")
    return name


class SearchEndpoint:
    """filip_search: loads the gallery ``<gallery_root>/<gallery>`` at start and on request.

    A request carries RELOAD (a gallery name: load it, verify it, swap it in; on any
    problem the previous gallery stays and the request fails with the reason), or APPEND
    (a gallery name: with TOKENS, POOLED, ITEM_IDS and ITEM_METADATA, one segment appended to
    that gallery under the gallery root, written here with the contract's writer; with
    ITEM_IDS alone, which of them it holds), or TEXT (queries, embedded by ``embed_texts``,
    i.e. the text front end) with optional K, MODE, CANDIDATES and ALLOWED_IDS, or none of
    them (a status request: INFO on the served gallery).  Outputs: IDS, SCORES, METADATA
    (JSON per hit) [nq, k'] and INFO (JSON: gallery, mode, timings; or the answer)."""

    def __init__(self, version_dir: Path | None, params: dict[str, str], embed_texts: EmbedTexts):
        root = os.environ.get("FILIP_GALLERY_ROOT") or params.get("gallery_root") or ""
        # default: "galleries" beside the model repository (version_dir is <repo>/filip_search/1)
        self.root = Path(root) if root else Path(version_dir or "./x/1").resolve().parent.parent.parent / "galleries"
        self.embed_texts = embed_texts
        self.limits = ServingLimits.from_params(params)
        self.default_scoring = check_scoring(params.get(SCORING_PARAM) or "token", GalleryError, SCORING_PARAM)
        self.verify = params.get("gallery_verify", "full")
        self.load = params.get("gallery_load", "auto")
        self.first_stage = params.get("first_stage", "auto")        # auto | flat | ivf | qdrant
        self.qdrant_url = params.get("qdrant_url", "")
        # token scoring: "auto" = CUDA (torch) when torch is a CUDA build that sees a GPU, else
        # the ONNX Runtime kernel on the CPU; "onnxruntime", "cuda" or "cpu" (torch) explicitly
        wanted = params.get("search_device", "auto") or "auto"
        if wanted == "auto":
            from .serving import _cuda_visible
            wanted = "cuda" if _cuda_visible() else "onnxruntime"
        self.device = None if wanted == "onnxruntime" else wanted
        self.qdrant_collection = params.get("qdrant_collection", "")
        if self.first_stage not in ("auto", "flat", "ivf", "qdrant") or (self.first_stage == "qdrant" and not self.qdrant_url):
            raise GalleryError(f"first_stage must be auto, flat, ivf or qdrant (with qdrant_url), got {self.first_stage!r}")
        self.searcher: Searcher | None = None
        self.name: str | None = None
        self.load_error: str | None = None
        name = params.get("gallery", "default")
        try:
            self.reload(name)
        except FilipError as e:   # the model still loads; searches explain what is missing
            self.load_error = str(e)

    def reload(self, name: str) -> dict:
        path = self.root / _check_name(name)
        t = time.perf_counter()
        gallery = Gallery.open(path, verify=self.verify, load=self.load)     # raises before anything is swapped
        stage = None
        if self.first_stage == "qdrant":
            # the first stage on a Qdrant server/cluster, filled beforehand with
            # engine.qdrant_store.QdrantStage.build (docs/DEPLOYMENT.md); checked against this gallery
            from .qdrant_store import QdrantStage, connect
            stage = QdrantStage(connect(url=self.qdrant_url), self.qdrant_collection or name, gallery)
        searcher = Searcher(gallery, stage, first_stage="auto" if self.first_stage == "qdrant" else self.first_stage,
                            device=self.device)
        self.searcher, self.name, self.load_error = searcher, name, None
        return {**searcher.gallery.info(), "name": name, "load_ms": round(_ms(t), 1)}

    def append(self, inputs: dict) -> dict:
        """APPEND: one segment into ``<root>/<name>`` (created if missing), or with ITEM_IDS
        alone the ids of those the gallery holds.  The writer is the one clients use too
        (one writer at a time: a gallery being written elsewhere is refused)."""
        name = _check_name(_scalar_str(inputs["APPEND"], "APPEND"))
        ids = _strings(inputs["ITEM_IDS"], "ITEM_IDS") if inputs.get("ITEM_IDS") is not None else []
        token_dtype = _scalar_str(inputs["TOKEN_DTYPE"], "TOKEN_DTYPE") if inputs.get("TOKEN_DTYPE") is not None else "float16"
        given = [k for k in ("TOKENS", "POOLED", "ITEM_METADATA") if inputs.get(k) is not None]
        if given and not {"TOKENS", "POOLED"} <= set(given):
            raise InvalidInputError(f"APPEND needs TOKENS and POOLED together (ITEM_METADATA optional), got {given}")
        with GalleryWriter(self.root / name, token_dtype=token_dtype) as w:
            if not given:
                return {"gallery": name, "count": w.count, "present": [i for i in ids if i in w]}
            meta = None
            if inputs.get("ITEM_METADATA") is not None:
                meta = [_json_object(m, f"ITEM_METADATA[{j}]") for j, m in enumerate(_strings(inputs["ITEM_METADATA"], "ITEM_METADATA"))]
            t = time.perf_counter()
            count = w.add(ids, inputs["TOKENS"], inputs["POOLED"], meta)
            return {"gallery": name, "added": len(ids), "count": count, "write_ms": round(_ms(t), 1)}

    def _search(self, inputs: dict) -> dict[str, np.ndarray]:
        if inputs.get("RELOAD") is not None:
            info = self.reload(_scalar_str(inputs["RELOAD"], "RELOAD"))
            return {"INFO": np.array([json.dumps(info).encode()], dtype=object)}
        if inputs.get("APPEND") is not None:
            return {"INFO": np.array([json.dumps(self.append(inputs)).encode()], dtype=object)}
        if inputs.get("TEXT") is None:       # a status request: which gallery is served (also the health canary)
            status = {"name": self.name, "root": str(self.root), "load_error": self.load_error,
                      **(self.searcher.gallery.info() if self.searcher is not None else {})}
            return {"INFO": np.array([json.dumps(status).encode()], dtype=object)}
        if self.searcher is None:
            raise GalleryError(f"no gallery is loaded ({self.load_error}); index one into {self.root}/<name> "
                               "and send RELOAD with its name")
        raw = np.asarray(inputs["TEXT"], dtype=object).reshape(-1)
        if not 1 <= len(raw) <= MAX_QUERIES:
            raise InvalidInputError(f"{len(raw)} queries in one request; give 1 to {MAX_QUERIES}")
        # the text front end's own checks, here: an error from it through BLS no longer says whose fault it is
        texts = decode_texts(raw, self.limits)
        k = _scalar_int(inputs["K"], "K", 1, MAX_K) if inputs.get("K") is not None else DEFAULT_K
        mode = _scalar_str(inputs["MODE"], "MODE") if inputs.get("MODE") is not None else DEFAULT_MODE
        cands = (_scalar_int(inputs["CANDIDATES"], "CANDIDATES", 1, MAX_CANDIDATES)
                 if inputs.get("CANDIDATES") is not None else DEFAULT_CANDIDATES)
        allowed = _strings(inputs["ALLOWED_IDS"], "ALLOWED_IDS") if inputs.get("ALLOWED_IDS") is not None else None
        if mode not in SEARCH_MODES:
            raise InvalidInputError(f"MODE must be one of {SEARCH_MODES}, got {mode!r}")
        scoring = _scalar_str(inputs["SCORING"], "SCORING") if inputs.get("SCORING") is not None else self.default_scoring
        check_scoring(scoring, InvalidInputError, "SCORING")
        searcher = self.searcher
        t = time.perf_counter()
        tokens, lengths, pooled = self.embed_texts(texts)
        embed_ms = _ms(t)
        q = Queries.from_tokens(tokens, lengths) if scoring == "token" else None
        hits = searcher.search(q, k, mode=mode, candidates=cands, allowed_ids=allowed, scoring=scoring, pooled=pooled)
        g = searcher.gallery
        # padding past a query's COUNTS: id "" and metadata "{}" (and score -inf)
        ids = np.array([[g.ids[r].encode() if r >= 0 else b"" for r in row] for row in hits.rows],
                       dtype=object).reshape(hits.rows.shape)
        meta = np.array([[json.dumps(g.metadata(r)).encode() if r >= 0 else b"{}" for r in row] for row in hits.rows],
                        dtype=object).reshape(hits.rows.shape)
        info = {"gallery": self.name, "count": g.count, "mode": mode, "scoring": scoring, "k": int(hits.rows.shape[1]),
                "candidates": cands if mode == "two_stage" else None,
                "timings_ms": {"embed": round(embed_ms, 2), **{a: round(b, 2) for a, b in hits.timings_ms.items()}}}
        return {"IDS": ids, "SCORES": hits.scores.astype(np.float32), "METADATA": meta,
                "COUNTS": hits.counts.astype(np.int32),
                "INFO": np.array([json.dumps(info).encode()], dtype=object)}

    def __call__(self, requests: Sequence[dict]) -> list[dict[str, np.ndarray] | FilipError]:
        results: list = []
        for inputs in requests:
            try:
                results.append(self._search(inputs))
            except FilipError as e:
                results.append(e)
        return results
