"""The Qdrant first stage (engine/qdrant_store.py) against Qdrant's embedded local mode.

Checked: the local mode's MAX_SIM multivector ranking is exact ColBERT MaxSim (against an
independent NumPy brute force), two-stage search with Qdrant candidates equals exact search,
the allowed-ids filter, refusal of collections that do not match the gallery, and a resumed
upload after a failure part-way."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

qdrant_client = pytest.importorskip("qdrant_client", reason="qdrant-client is not installed (pip install qdrant-client)")
from qdrant_client import QdrantClient, models  # noqa: E402

from tools.gallery_synth import SyntheticSpec, load_queries, synthesize  # noqa: E402
from filip_engine.errors import GalleryError  # noqa: E402
from filip_contract.gallery_reader import Gallery  # noqa: E402
from filip_engine.qdrant_store import QdrantStage  # noqa: E402
from filip_engine.search import Queries, Searcher  # noqa: E402

SPEC = dict(dim=64, tokens=12, topics=40, words=300, words_per_topic=12, seed=11)
N_ITEMS = 1500


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    path = tmp_path_factory.mktemp("qdrant") / "g"
    synthesize(path, N_ITEMS, segment=600, spec=SyntheticSpec(**SPEC), n_queries=16)
    return Gallery.open(path)


@pytest.fixture(scope="module")
def stage(gallery):
    return QdrantStage.build(gallery, QdrantClient(":memory:"), collection="g", batch=300)


@pytest.fixture(scope="module")
def queries(gallery):
    qt, ql, _ = load_queries(gallery.path)
    return qt, ql


def colbert_brute_force(tokens: np.ndarray, q_tokens: np.ndarray, q_lengths: np.ndarray) -> np.ndarray:
    """Independent NumPy MaxSim in float64, ColBERT form: [nq, N] sum over the query's real
    tokens of the max over the item's patches."""
    x = tokens.astype(np.float64)
    out = np.empty((len(q_lengths), len(x)))
    for i, n in enumerate(q_lengths):
        sims = np.einsum("npd,td->ntp", x, q_tokens[i, :n].astype(np.float64))
        out[i] = sims.max(axis=2).sum(axis=1)
    return out


def assert_same_ranking(got: np.ndarray, ref_scores: np.ndarray, k: int) -> None:
    """got (ids, best first) is the top-k of ref_scores: equal ids, or (for exact ties only)
    an order whose reference scores equal the reference top-k's within 1e-9."""
    want = np.argsort(-ref_scores, kind="stable")[:k]
    if list(got) != list(want):
        np.testing.assert_allclose(ref_scores[got], ref_scores[want], rtol=0, atol=1e-9)


def test_local_mode_max_sim_is_exact_colbert(gallery, stage, queries):
    qt, ql = queries
    ref = colbert_brute_force(gallery.tokens_of(np.arange(gallery.count)), qt, ql)
    cands = stage.candidates(Queries.from_tokens(qt, ql), 10, None)
    for i, n in enumerate(ql):
        res = stage.client.query_points("g", query=qt[i, :n].tolist(), limit=10, with_payload=True).points
        ids = np.array([p.id for p in res], np.int64)
        assert_same_ranking(ids, ref[i], 10)
        # the score is the ColBERT sum (n2 * FILIP's s_T), in float32
        np.testing.assert_allclose([p.score for p in res], ref[i, ids], rtol=0, atol=1e-4)
        assert [p.payload["item_id"] for p in res] == [gallery.ids[r] for r in ids]
        assert list(cands[i]) == list(ids)


def test_two_stage_with_qdrant_equals_exact_search(gallery, stage, queries):
    q = Queries.from_tokens(*queries)
    s = Searcher(gallery, stage=stage)
    exact = s.search(q, 10, mode="exact")
    for c in (10, 100):
        two = s.search(q, 10, mode="two_stage", candidates=c)
        assert np.array_equal(two.rows, exact.rows), c
        np.testing.assert_allclose(two.scores, exact.scores, rtol=0, atol=1e-5)
        assert set(two.timings_ms) == {"first_stage", "rerank"}


def test_allowed_rows_are_respected(gallery, stage, queries):
    qt, ql = queries
    q = Queries.from_tokens(qt, ql)
    allowed = np.array([r for r in range(gallery.count) if r % 3], np.int64)       # 1000 of 1500 rows
    ref = colbert_brute_force(gallery.tokens_of(allowed), qt, ql)
    for i, c in enumerate(stage.candidates(q, 20, allowed)):
        assert len(c) == 20 and np.isin(c, allowed).all()
        assert_same_ranking(np.searchsorted(allowed, c), ref[i], 20)
    # through the searcher: 1000 allowed > max(candidates, count // 4), so Qdrant is asked
    s = Searcher(gallery, stage=stage)
    ids = [gallery.ids[r] for r in allowed]
    two = s.search(q, 10, mode="two_stage", candidates=50, allowed_ids=ids)
    exact = s.search(q, 10, mode="exact", allowed_ids=ids)
    assert "first_stage" in two.timings_ms
    assert np.isin(two.rows, allowed).all()
    assert np.array_equal(two.rows, exact.rows)
    # fewer allowed rows than asked for: all of them, nothing else
    few = allowed[:5]
    assert all(sorted(c) == list(few) for c in stage.candidates(q, 50, few))


def test_mismatched_collections_are_refused(gallery, stage):
    client = QdrantClient(":memory:")
    mv = models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)
    client.create_collection("small", vectors_config=models.VectorParams(
        size=gallery.dim // 2, distance=models.Distance.DOT, multivector_config=mv))
    with pytest.raises(GalleryError, match="size 32.*dimension 64"):
        QdrantStage(client, "small", gallery)
    with pytest.raises(GalleryError, match="size 32"):
        QdrantStage.build(gallery, client, collection="small")
    with pytest.raises(GalleryError, match="no collection 'absent'"):
        QdrantStage(client, "absent", gallery)
    # right size, wrong count
    client.create_collection("part", vectors_config=models.VectorParams(
        size=gallery.dim, distance=models.Distance.DOT, multivector_config=mv))
    tok = gallery.tokens_of(np.arange(3))
    client.upsert("part", points=[models.PointStruct(id=r, vector=tok[r].tolist(), payload={"item_id": gallery.ids[r]})
                                  for r in range(3)])
    with pytest.raises(GalleryError, match=f"holds 3 points; the gallery has {N_ITEMS} items"):
        QdrantStage(client, "part", gallery)
    # not multivector
    client.create_collection("flat", vectors_config=models.VectorParams(size=gallery.dim, distance=models.Distance.DOT))
    with pytest.raises(GalleryError, match="not a MAX_SIM multivector"):
        QdrantStage(client, "flat", gallery)
    # right size and count, another gallery's items
    stage.client.set_payload("g", payload={"item_id": "someone-else"}, points=[0])
    try:
        with pytest.raises(GalleryError, match="another gallery"):
            QdrantStage(stage.client, "g", gallery)
    finally:
        stage.client.set_payload("g", payload={"item_id": gallery.ids[0]}, points=[0])
    QdrantStage(stage.client, "g", gallery)                     # restored: accepted


def test_build_resumes_after_a_failed_upload(gallery, tmp_path, monkeypatch):
    store = tmp_path / "qdrant"
    client = QdrantClient(path=str(store))
    real, calls = client.upsert, []

    def failing_upsert(*args, **kwargs):
        calls.append(len(kwargs["points"]))
        if len(calls) == 3:
            raise ConnectionError("connection reset by peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(client, "upsert", failing_upsert)
    with pytest.raises(GalleryError, match="uploading rows 800..1199.*connection reset"):
        QdrantStage.build(gallery, client, batch=400)
    assert client.count("filip", exact=True).count == 800
    client.close()

    client = QdrantClient(path=str(store))                       # a new process would do the same
    sent = []
    real = client.upsert
    monkeypatch.setattr(client, "upsert", lambda *a, **kw: (sent.append([p.id for p in kw["points"]]), real(*a, **kw))[1])
    stage = QdrantStage.build(gallery, client, batch=400)
    assert sorted(r for b in sent for r in b) == list(range(800, N_ITEMS))   # only the missing rows
    assert client.count("filip", exact=True).count == gallery.count
    sent.clear()
    QdrantStage.build(gallery, client, batch=400)                # complete: nothing to send
    assert sent == []
    got = client.retrieve("filip", ids=[0, 799, 800, N_ITEMS - 1], with_vectors=True)
    for p in got:
        np.testing.assert_array_equal(np.array(p.vector, np.float32), gallery.tokens_of(np.array([p.id]))[0])
    assert stage.candidates(Queries.from_tokens(*load_queries(gallery.path)[:2]), 5, None)[0].shape == (5,)
    client.close()


def test_engine_imports_without_qdrant_client():
    code = ("import sys; sys.modules['qdrant_client'] = None\n"
            "import filip_engine.search, engine.qdrant_store\n"
            "from filip_engine.errors import GalleryError\n"
            "try:\n    engine.qdrant_store.connect()\nexcept GalleryError as e:\n    print('refused:', e)\n")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "needs the qdrant-client package" in out.stdout
