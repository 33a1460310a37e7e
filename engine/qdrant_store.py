"""A first stage on Qdrant: the gallery's patch tokens as multivector points, MAX_SIM comparator.

Two-stage search (engine/search.py) asks its first stage for ``n`` candidate rows per query
and re-ranks them exactly with our own MaxSim kernel, reading the candidates' tokens from the
local (memory-mapped) gallery.  :class:`QdrantStage` is that first stage on Qdrant, so the
candidate generation can run on a sharded, replicated Qdrant cluster while the exact re-rank
stays here.  The same client API drives the embedded local mode (``QdrantClient(":memory:")``
or ``QdrantClient(path=...)``, used by the tests) and a cluster (``QdrantClient(url=...)``).

Layout: one point per gallery row; point id = gallery row, payload ``{"item_id": <id>}``, and
one unnamed multivector of the item's P patch tokens (fp32 as the gallery holds them,
dequantised for int8), ``VectorParams(size=D, distance=DOT,
multivector_config=MultiVectorConfig(comparator=MAX_SIM))``.  The tokens are L2-normalised
already, so DOT is the cosine; COSINE would only re-normalise.

Score: Qdrant's MAX_SIM is ColBERT's ``sum_r max_k <x_k, y_r>``; FILIP's s_T is the *mean*
over the query's n2 real tokens.  For one query n2 is a constant, so the two order the gallery
identically (Qdrant's score = n2 * s_T); the re-rank recomputes s_T exactly anyway.

qdrant_client is imported lazily: the engine imports (and two-stage search with the faiss
stage runs) without it.  Any failure to reach Qdrant, or a collection that does not match the
gallery, raises :class:`~filip_engine.errors.GalleryError` with a sentence saying which.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import numpy as np

from .errors import FilipError, GalleryError
from filip_contract.gallery_reader import Gallery

T = TypeVar("T")

DEFAULT_COLLECTION = "filip"
UPLOAD_BATCH = 256                # points per upsert request (B/32 fp32: ~12.5 MB of JSON floats)
SCROLL_PAGE = 10_000              # ids per scroll page when looking for rows already uploaded


def _qdrant():
    try:
        import qdrant_client
        from qdrant_client import models
    except ImportError as e:      # pragma: no cover - depends on the environment
        raise GalleryError("the Qdrant first stage needs the qdrant-client package (pip install qdrant-client)") from e
    return qdrant_client, models


def _call(what: str, fn: Callable[[], T]) -> T:
    """Run one client call; anything it raises becomes a GalleryError saying what failed."""
    try:
        return fn()
    except FilipError:
        raise
    except Exception as e:        # connection refused, timeouts, HTTP/gRPC errors, local-mode ValueErrors
        raise GalleryError(f"Qdrant: {what} failed ({type(e).__name__}: {e})") from e


def connect(*, path: str | None = None, url: str | None = None, **kwargs: Any):
    """A QdrantClient: ``url`` (a server or cluster, e.g. http://qdrant:6333), ``path`` (embedded,
    on disk) or neither (embedded, in memory).  Extra arguments go to QdrantClient (api_key,
    prefer_grpc, timeout, ...)."""
    qdrant_client, _ = _qdrant()
    if path is not None and url is not None:
        raise GalleryError("give Qdrant either a path (embedded) or a url (server), not both")
    if url is not None:
        return _call(f"connecting to {url}", lambda: qdrant_client.QdrantClient(url=url, **kwargs))
    if path is not None:
        return _call(f"opening the embedded store at {path}", lambda: qdrant_client.QdrantClient(path=str(path), **kwargs))
    return qdrant_client.QdrantClient(":memory:", **kwargs)


class QdrantStage:
    """A :class:`~filip_engine.search.CandidateStage` answered by a Qdrant collection of the gallery.

    ``QdrantStage(client, collection, gallery)`` attaches to a collection built before (by
    :meth:`build`), checking that it matches the gallery; ``QdrantStage.build(gallery, ...)``
    uploads what is missing first.  ``exact=True`` asks Qdrant for a full scan instead of its
    HNSW graph (the embedded local mode always scans)."""

    def __init__(self, client, collection: str = DEFAULT_COLLECTION, gallery: Gallery | None = None, *,
                 exact: bool = False, check: bool = True):
        _, self._models = _qdrant()
        self.client, self.collection, self.exact = client, collection, exact
        self.name = f"qdrant-maxsim:{collection}"
        if gallery is not None and check:
            self.check(gallery)

    # --- building ---------------------------------------------------------------------------
    @classmethod
    def build(cls, gallery: Gallery, client=None, *, collection: str = DEFAULT_COLLECTION, path: str | None = None,
              url: str | None = None, batch: int = UPLOAD_BATCH, shard_number: int | None = None,
              replication_factor: int | None = None, exact: bool = False, progress: bool = False) -> "QdrantStage":
        """Create the collection if needed and upload every gallery row not in it yet.

        Resumable: the ids already present are read back (scroll, ids only) and only missing
        rows are sent, so a run killed half-way continues where it stopped; re-running over
        a complete collection uploads nothing.  ``shard_number`` / ``replication_factor`` are
        passed to create_collection (cluster deployments; see docs/DEPLOYMENT.md)."""
        if batch < 1:
            raise GalleryError(f"batch must be a positive integer, got {batch!r}")
        if client is None:
            client = connect(path=path, url=url)
        _, models = _qdrant()
        exists = _call(f"looking up collection {collection!r}", lambda: client.collection_exists(collection))
        if not exists:
            params = models.VectorParams(
                size=gallery.dim, distance=models.Distance.DOT,
                multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM))
            extra = {k: v for k, v in (("shard_number", shard_number), ("replication_factor", replication_factor))
                     if v is not None}
            _call(f"creating collection {collection!r}",
                  lambda: client.create_collection(collection, vectors_config=params, **extra))
        stage = cls(client, collection, exact=exact)
        stage._check_vectors(gallery)
        have = stage._uploaded_rows()
        if have.size and (have.min() < 0 or have.max() >= gallery.count):
            raise GalleryError(f"Qdrant collection {collection!r} holds point ids outside this gallery's rows "
                               f"0..{gallery.count - 1}: it was built from another gallery")
        missing = np.setdiff1d(np.arange(gallery.count, dtype=np.int64), have, assume_unique=True)
        for a in range(0, len(missing), batch):
            rows = missing[a:a + batch]
            tokens = gallery.tokens_of(rows)                     # fp32 [b, P, D]
            points = [models.PointStruct(id=int(r), vector=t.tolist(), payload={"item_id": gallery.ids[r]})
                      for r, t in zip(rows, tokens)]
            _call(f"uploading rows {int(rows[0])}..{int(rows[-1])} to {collection!r}",
                  lambda: client.upsert(collection, points=points, wait=True))
            if progress:
                print(f"  qdrant {collection}: {len(have) + a + len(rows)}/{gallery.count} points", flush=True)
        stage.check(gallery)
        return stage

    def _uploaded_rows(self) -> np.ndarray:
        """Sorted int64 ids of the points in the collection (ids only, page by page)."""
        out: list[int] = []
        offset = None
        while True:
            page, offset = _call(f"listing the points of {self.collection!r}", lambda: self.client.scroll(
                self.collection, limit=SCROLL_PAGE, offset=offset, with_payload=False, with_vectors=False))
            out.extend(int(p.id) for p in page)
            if offset is None:
                break
        return np.unique(np.array(out, np.int64))

    # --- checks -----------------------------------------------------------------------------
    def _check_vectors(self, gallery: Gallery) -> None:
        m = self._models
        if not _call(f"looking up collection {self.collection!r}", lambda: self.client.collection_exists(self.collection)):
            raise GalleryError(f"Qdrant has no collection {self.collection!r}; build it with QdrantStage.build(gallery, ...)")
        info = _call(f"reading collection {self.collection!r}", lambda: self.client.get_collection(self.collection))
        vp = info.config.params.vectors
        if not isinstance(vp, m.VectorParams):
            raise GalleryError(f"Qdrant collection {self.collection!r} has named vectors {sorted(vp or {})}; "
                               "expected one unnamed multivector per point")
        if vp.size != gallery.dim:
            raise GalleryError(f"Qdrant collection {self.collection!r} holds vectors of size {vp.size}; "
                               f"the gallery's tokens have dimension {gallery.dim}")
        mv = vp.multivector_config
        if mv is None or mv.comparator != m.MultiVectorComparator.MAX_SIM:
            raise GalleryError(f"Qdrant collection {self.collection!r} is not a MAX_SIM multivector collection")
        if vp.distance != m.Distance.DOT:
            raise GalleryError(f"Qdrant collection {self.collection!r} uses distance {vp.distance}; expected Dot")

    def check(self, gallery: Gallery) -> None:
        """The collection matches the gallery: vector size, MAX_SIM multivectors, point count,
        and the item ids of a few rows (first, middle, last)."""
        self._check_vectors(gallery)
        n = _call(f"counting the points of {self.collection!r}",
                  lambda: self.client.count(self.collection, exact=True).count)
        if n != gallery.count:
            raise GalleryError(f"Qdrant collection {self.collection!r} holds {n} points; the gallery has "
                               f"{gallery.count} items (an unfinished upload: run QdrantStage.build again)")
        if n:
            probe = sorted({0, n // 2, n - 1})
            got = _call(f"reading points {probe} of {self.collection!r}", lambda: self.client.retrieve(
                self.collection, ids=probe, with_payload=True, with_vectors=False))
            seen = {int(p.id): (p.payload or {}).get("item_id") for p in got}
            for r in probe:
                if seen.get(r) != gallery.ids[r]:
                    raise GalleryError(f"Qdrant collection {self.collection!r}: point {r} is item {seen.get(r)!r}, "
                                       f"the gallery's row {r} is {gallery.ids[r]!r}: built from another gallery")

    # --- the first stage ----------------------------------------------------------------------
    def candidates(self, q, n: int, allowed: np.ndarray | None) -> list[np.ndarray]:
        """Per query, Qdrant's top ``n`` points by MAX_SIM against the query's real tokens
        (one batched request for all queries), restricted to ``allowed`` rows when given."""
        m = self._models
        if allowed is not None:
            n = min(n, len(allowed))
        if n <= 0:
            return [np.zeros(0, np.int64) for _ in range(q.n)]
        flt = None if allowed is None else m.Filter(must=[m.HasIdCondition(has_id=[int(r) for r in allowed])])
        params = m.SearchParams(exact=True) if self.exact else None
        requests = []
        for i in range(q.n):
            # Qdrant's MAX_SIM sums over the query tokens (ColBERT); s_T averages.  n2 is constant
            # within a query, so the order of the items, and thus the candidates, is the same.
            tokens = q.one(i).tokens_t.T                         # [n2, D] real tokens only
            requests.append(m.QueryRequest(query=tokens.tolist(), limit=int(n), filter=flt, params=params,
                                           with_payload=False, with_vector=False))
        res = _call(f"querying collection {self.collection!r}",
                    lambda: self.client.query_batch_points(self.collection, requests=requests))
        return [np.array([int(p.id) for p in r.points], np.int64) for r in res]
