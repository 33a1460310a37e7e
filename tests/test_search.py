"""Search over a gallery: exact MaxSim against a NumPy brute force, two-stage recall measured
against exact, filters, and the served endpoint's behaviour (errors, reload that keeps the
previous gallery) without a server."""
from __future__ import annotations

import json

import numpy as np
import pytest

from filip_contract.gallery_writer import GalleryWriter
from tools.gallery_synth import SyntheticSpec, load_queries, synthesize
from filip_engine.errors import GalleryError, InvalidInputError
from filip_contract.gallery_reader import Gallery
from filip_engine.search import Queries, Searcher, SearchEndpoint, exact_scores

SPEC = dict(dim=64, tokens=12, topics=40, words=300, words_per_topic=12, seed=7)


def brute_force_s_t(tokens: np.ndarray, q_tokens: np.ndarray, q_lengths: np.ndarray) -> np.ndarray:
    """Independent NumPy MaxSim in float64: [nq, N] mean over real query tokens of max over patches."""
    x = tokens.astype(np.float64)
    out = np.empty((len(q_lengths), len(x)))
    for i, n in enumerate(q_lengths):
        sims = np.einsum("npd,td->ntp", x, q_tokens[i, :n].astype(np.float64))
        out[i] = sims.max(axis=2).mean(axis=1)
    return out


def top_ids(scores: np.ndarray, k: int) -> list[list[int]]:
    return [list(np.argsort(-row, kind="stable")[:k]) for row in scores]


@pytest.fixture(scope="module", params=["float16", "int8"])
def gallery(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"search-{request.param}") / "g"
    synthesize(path, 3000, segment=700, token_dtype=request.param, spec=SyntheticSpec(**SPEC), n_queries=24)
    return Gallery.open(path)


def test_exact_search_equals_numpy_brute_force(gallery):
    qt, ql, _ = load_queries(gallery.path)
    stored = gallery.tokens_of(np.arange(gallery.count))     # the values the gallery holds
    ref = brute_force_s_t(stored, qt, ql)
    hits = Searcher(gallery).search(Queries.from_tokens(qt, ql), 10)
    assert [list(r) for r in hits.rows] == top_ids(ref, 10)
    np.testing.assert_allclose(hits.scores, np.take_along_axis(ref, hits.rows, axis=1), rtol=0, atol=2e-6)
    # every score, not just the top: the streamed scan over all segments and workers
    np.testing.assert_allclose(exact_scores(gallery, Queries.from_tokens(qt, ql)), ref, rtol=0, atol=2e-6)
    np.testing.assert_allclose(exact_scores(gallery, Queries.from_tokens(qt, ql), chunk_images=7), ref,
                               rtol=0, atol=2e-6)


def test_memory_and_mmap_loads_agree(gallery):
    qt, ql, _ = load_queries(gallery.path)
    q = Queries.from_tokens(qt[:4], ql[:4])
    a = Gallery.open(gallery.path, load="memory")
    b = Gallery.open(gallery.path, load="mmap")
    assert a.in_memory and not b.in_memory
    assert np.array_equal(exact_scores(a, q), exact_scores(b, q))


def test_padding_of_queries_never_counts(gallery):
    qt, ql, _ = load_queries(gallery.path)
    garbage = qt.copy()
    for i, n in enumerate(ql):
        garbage[i, n:] = 123.0
    s1 = exact_scores(gallery, Queries.from_tokens(qt, ql))
    s2 = exact_scores(gallery, Queries.from_tokens(garbage, ql))
    assert np.array_equal(s1, s2)


def test_two_stage_recall_is_measured(gallery):
    """Recall@10 of two-stage against exact, at a few candidate counts; all candidates = exact."""
    qt, ql, _ = load_queries(gallery.path)
    q = Queries.from_tokens(qt, ql)
    s = Searcher(gallery)
    exact = s.search(q, 10)
    recalls = {}
    for c in (50, 200, 3000):
        two = s.search(q, 10, mode="two_stage", candidates=c)
        recalls[c] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.rows, two.rows)])
        # re-ranked scores are exact scores of the returned items
        full = exact_scores(gallery, q)
        np.testing.assert_allclose(two.scores, np.take_along_axis(full, two.rows, axis=1), rtol=0, atol=1e-6)
    print(f"recall@10 by candidates: {recalls}")
    assert recalls[3000] == 1.0                          # every item a candidate: exactly the exact result
    assert recalls[50] <= recalls[200] <= recalls[3000]
    assert recalls[200] >= 0.9, recalls                  # this clustered gallery: the centroid stage works


def test_ivf_first_stage_recall_and_filter(gallery):
    from filip_engine.search import CentroidStage
    qt, ql, _ = load_queries(gallery.path)
    q = Queries.from_tokens(qt, ql)
    exact = Searcher(gallery).search(q, 10)
    stage = CentroidStage(gallery, "ivf", nprobe=16)
    assert stage.kind == "ivf" and stage.nlist == 3000 // 39
    two = Searcher(gallery, stage=stage).search(q, 10, mode="two_stage", candidates=200)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.rows, two.rows)])
    print(f"ivf recall@10 at 200 candidates: {recall}")
    assert recall >= 0.9
    allowed = np.arange(0, 3000, 3)
    filt = Searcher(gallery, stage=stage).search(q, 10, mode="two_stage", candidates=300,
                                                 allowed_ids=[gallery.ids[r] for r in allowed])
    assert set(filt.rows.ravel()) <= set(allowed)


def _same_hits(rows_a, scores_a, rows_b, scores_b, label: str, atol: float = 1e-6) -> None:
    """The same ranked hits up to the GEMM's rounding (a batch multiplies all queries' tokens
    at once): equal score sequences within ``atol``, and items may differ or swap only where
    their scores tie within ``atol``."""
    np.testing.assert_allclose(scores_a, scores_b, rtol=0, atol=atol, err_msg=label)
    score_of = dict(zip(rows_a.tolist(), scores_a.tolist())) | dict(zip(rows_b.tolist(), scores_b.tolist()))
    for j, (a, b) in enumerate(zip(rows_a.tolist(), rows_b.tolist())):
        assert a == b or abs(score_of[a] - score_of[b]) <= atol, (label, j, a, b)
    cutoff = float(min(scores_a.min(initial=np.inf), scores_b.min(initial=np.inf)))
    for r in set(rows_a.tolist()) ^ set(rows_b.tolist()):
        assert score_of[r] - cutoff <= atol, (label, r)


def test_batched_queries_get_what_each_gets_alone(gallery):
    """A batch of queries returns, per query, exactly its solo result, also when the first
    stage proposes different numbers of candidates per query (IVF with one probed cell,
    filters, k beyond a small candidate list)."""
    from filip_engine.search import CentroidStage
    qt, ql, _ = load_queries(gallery.path)
    q = Queries.from_tokens(qt[:8], ql[:8])
    narrow = Searcher(gallery, stage=CentroidStage(gallery, "ivf", nprobe=1))
    allowed = [gallery.ids[r] for r in range(0, gallery.count, 7)]
    cases = [(narrow, dict(mode="two_stage", candidates=2000)),
             (narrow, dict(mode="two_stage", candidates=2000, allowed_ids=allowed)),
             (Searcher(gallery), dict(mode="exact")), (Searcher(gallery), dict(mode="exact", allowed_ids=allowed[:30]))]
    ragged = False
    for s, kw in cases:
        batch = s.search(q, 100, **kw)
        assert batch.rows.shape[0] == q.n and batch.counts.shape == (q.n,)
        for i in range(q.n):
            alone = s.search(q.one(i), 100, **kw)
            n = int(batch.counts[i])
            assert n == int(alone.counts[0]) and n <= 100, kw
            _same_hits(batch.rows[i, :n], batch.scores[i, :n], alone.rows[0, :n], alone.scores[0, :n], str((i, kw)))
            assert (batch.rows[i, n:] == -1).all() and np.isneginf(batch.scores[i, n:]).all()
        ragged |= len(set(batch.counts.tolist())) > 1
    assert ragged, "no case gave queries different hit counts: the test would not catch the old truncation"


def test_allowed_ids_filter(gallery):
    qt, ql, _ = load_queries(gallery.path)
    q = Queries.from_tokens(qt[:3], ql[:3])
    s = Searcher(gallery)
    full = exact_scores(gallery, q)
    rng = np.random.default_rng(0)
    for n_allowed in (5, 40, 2500):                       # gather path, and mask path
        allowed_rows = np.sort(rng.choice(gallery.count, n_allowed, replace=False))
        allowed = [gallery.ids[r] for r in allowed_rows]
        for mode in ("exact", "two_stage"):
            hits = s.search(q, 10, mode=mode, candidates=3000, allowed_ids=allowed)
            assert set(hits.rows.ravel()) <= set(allowed_rows)
            sub = full[:, allowed_rows]
            want = [list(allowed_rows[np.argsort(-r, kind="stable")[:min(10, n_allowed)]]) for r in sub]
            assert [list(r) for r in hits.rows] == want, (n_allowed, mode)
    assert s.search(q, 10, allowed_ids=["no-such-id"]).rows.shape == (3, 0)


def test_k_larger_than_gallery_and_bad_arguments(tmp_path):
    rng = np.random.default_rng(0)
    t = rng.standard_normal((3, 4, 8)).astype(np.float32)
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    with GalleryWriter(tmp_path / "g") as w:
        w.add(["a", "b", "c"], t, np.zeros((3, 2), np.float32))
    s = Searcher(Gallery.open(tmp_path / "g"))
    q = Queries.from_tokens(t[:2, :3], np.array([3, 2]))
    for mode in ("exact", "two_stage"):
        assert s.search(q, 50, mode=mode).rows.shape == (2, 3)
    with pytest.raises(InvalidInputError, match="mode"):
        s.search(q, 5, mode="fast")
    with pytest.raises(InvalidInputError, match="k must be"):
        s.search(q, 0)
    with pytest.raises(InvalidInputError, match="dimension"):
        s.search(Queries.from_tokens(np.ones((1, 2, 4), np.float32), np.array([2])), 5)
    with pytest.raises(InvalidInputError, match="lengths must lie"):
        Queries.from_tokens(t[:1], np.array([9]))
    with pytest.raises(InvalidInputError, match="NaN"):
        Queries.from_tokens(np.full((1, 2, 8), np.nan, np.float32), np.array([2]))


# --- the served endpoint, without a server ------------------------------------------------------
class FakeTextTower:
    """Deterministic stand-in for filip_text: a text's tokens are seeded by the text."""

    def __init__(self, dim: int):
        self.dim, self.calls = dim, 0

    def __call__(self, texts):
        self.calls += 1
        if any(not t.strip() for t in texts):
            raise InvalidInputError("text 0 is empty")
        n = [min(2 + len(t.split()), 9) for t in texts]
        out = np.zeros((len(texts), max(n), self.dim), np.float32)
        for i, t in enumerate(texts):
            v = np.random.default_rng(abs(hash(t)) % 2**32).standard_normal((n[i], self.dim))
            out[i, :n[i]] = v / np.linalg.norm(v, axis=-1, keepdims=True)
        pooled = out.sum(axis=1)
        return out, np.array(n, np.int32), pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def _request(**kw):
    return {k: (np.array([x.encode() if isinstance(x, str) else x for x in v], dtype=object)
                if isinstance(v, list) and v and isinstance(v[0], str) else np.asarray(v)) for k, v in kw.items()}


def test_endpoint_search_reload_and_errors(tmp_path):
    root = tmp_path / "galleries"
    spec = SyntheticSpec(**SPEC)
    embed = FakeTextTower(SPEC["dim"])
    ep = SearchEndpoint(None, {"gallery_root": str(root)}, embed)     # no gallery yet: still loads
    [res] = ep([_request(TEXT=["a cat"])])
    assert isinstance(res, GalleryError) and "no gallery is loaded" in str(res)
    [status] = ep([{}])
    assert json.loads(status["INFO"][0])["name"] is None and "no gallery at" in json.loads(status["INFO"][0])["load_error"]
    synthesize(root / "one", 500, spec=spec)
    synthesize(root / "two", 800, spec=spec)
    good, = ep([_request(RELOAD=["one"])])
    assert json.loads(good["INFO"][0])["count"] == 500
    out = ep([_request(TEXT=["a cat", "two dogs"], K=np.array([5], np.int32)),
              _request(TEXT=[""]),                                        # bad request: fails alone
              _request(TEXT=["a cat"], MODE=["fastest"]),
              _request(TEXT=["a cat"], K=np.array([0], np.int32)),
              _request(K=np.array([3], np.int32)),
              _request(TEXT=["a cat"], K=np.array([3], np.int32), MODE=["two_stage"], CANDIDATES=np.array([500], np.int32))])
    ok, empty, mode, k0, notext, two = out
    assert ok["IDS"].shape == ok["SCORES"].shape == ok["METADATA"].shape == (2, 5)
    assert "empty" in str(empty) and "MODE" in str(mode) and "K must lie" in str(k0)
    status = json.loads(notext["INFO"][0])                                # no TEXT: a status request
    assert status["name"] == "one" and status["count"] == 500 and status["load_error"] is None
    assert list(two["IDS"][0]) == list(ok["IDS"][0][:3])                 # all 500 candidates: exact
    assert json.loads(ok["METADATA"][0][0])["topic"] >= 0
    # a direct check of one score against the brute force
    g = Gallery.open(root / "one")
    qt, ql, _ = embed(["a cat"])
    ref = brute_force_s_t(g.tokens_of(np.arange(500)), qt, ql)[0]
    best = int(np.argmax(ref))
    assert ok["IDS"][0][0].decode() == g.ids[best] and abs(ok["SCORES"][0][0] - ref[best]) < 2e-6
    # a corrupt gallery is refused and the previous one keeps serving
    tok = root / "two" / "segments" / "seg-000000.tokens.npy"
    tok.write_bytes(tok.read_bytes()[:-100])
    bad, = ep([_request(RELOAD=["two"])])
    assert isinstance(bad, GalleryError) and "truncated" in str(bad)
    again, = ep([_request(TEXT=["a cat", "two dogs"], K=np.array([5], np.int32))])
    assert np.array_equal(again["IDS"], ok["IDS"]) and json.loads(again["INFO"][0])["gallery"] == "one"
    for name in ("../one", "", "a/b"):
        r, = ep([_request(RELOAD=[name])])
        assert isinstance(r, InvalidInputError), name


# --- global (pooled cosine) scoring -----------------------------------------------------------
def _pooled_queries(gallery, n=6, seed=3):
    """Query vectors near some items' pooled embeddings (not normalised: the search must)."""
    rng = np.random.default_rng(seed)
    base = gallery.pooled()[rng.choice(gallery.count, n, replace=False)]
    return (base + 0.2 * rng.standard_normal(base.shape)).astype(np.float32) * 3.0


def test_global_exact_equals_numpy_cosine(gallery):
    q = _pooled_queries(gallery)
    pooled = np.concatenate([np.asarray(s.pooled, np.float64) for s in gallery.segments])
    qn = q.astype(np.float64) / np.linalg.norm(q, axis=1, keepdims=True)
    ref = qn @ (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)).T
    s = Searcher(gallery)
    hits = s.search(None, 10, scoring="global", pooled=q)
    assert [list(r) for r in hits.rows] == top_ids(ref, 10)
    np.testing.assert_allclose(hits.scores, np.take_along_axis(ref, hits.rows, axis=1), rtol=0, atol=2e-6)
    # two-stage over the flat pooled index re-ranked by the exact cosine: the same hits
    two = s.search(None, 10, mode="two_stage", candidates=50, scoring="global", pooled=q)
    assert np.array_equal(two.rows, hits.rows) and np.allclose(two.scores, hits.scores, atol=1e-6)
    assert s.pooled_stage().name == "pooled-flat"
    # a filter: only the allowed items, best first
    allowed = [gallery.ids[r] for r in range(0, gallery.count, 3)]
    few = s.search(None, 5, scoring="global", pooled=q, allowed_ids=allowed)
    keep = np.zeros(gallery.count, bool)
    keep[::3] = True
    assert [list(r) for r in few.rows] == top_ids(np.where(keep, ref, -np.inf), 5)


def test_global_search_errors(gallery):
    s = Searcher(gallery)
    with pytest.raises(InvalidInputError, match="pooled embeddings"):
        s.search(None, 5, scoring="global")
    with pytest.raises(InvalidInputError, match="dimension 3"):
        s.search(None, 5, scoring="global", pooled=np.ones((1, 3), np.float32))
    with pytest.raises(InvalidInputError, match="NaN"):
        s.search(None, 5, scoring="global", pooled=np.full((1, gallery.pooled_dim), np.nan, np.float32))
    with pytest.raises(InvalidInputError, match="scoring must be one of"):
        s.search(None, 5, scoring="cosine", pooled=np.ones((1, gallery.pooled_dim), np.float32))


def test_endpoint_scoring_input_and_repository_default(tmp_path):
    root = tmp_path / "galleries"
    synthesize(root / "default", 400, segment=150, spec=SyntheticSpec(**SPEC), n_queries=2)
    embed = FakeTextTower(SPEC["dim"])
    token_ep = SearchEndpoint(None, {"gallery_root": str(root)}, embed)
    global_ep = SearchEndpoint(None, {"gallery_root": str(root), "default_scoring": "global"}, embed)
    g = Gallery.open(root / "default")
    _, _, qp = embed(["a cat"])
    want = np.argsort(-(qp @ g.pooled().T)[0], kind="stable")[:4]
    by_default, = global_ep([_request(TEXT=["a cat"], K=np.array([4], np.int32))])
    asked, = token_ep([_request(TEXT=["a cat"], K=np.array([4], np.int32), SCORING=["global"])])
    token, = token_ep([_request(TEXT=["a cat"], K=np.array([4], np.int32))])
    for out in (by_default, asked):
        assert [i.decode() for i in out["IDS"][0]] == [g.ids[r] for r in want]
        assert json.loads(out["INFO"][0])["scoring"] == "global"
    assert json.loads(token["INFO"][0])["scoring"] == "token"
    bad, = token_ep([_request(TEXT=["a cat"], SCORING=["cosine"])])
    assert isinstance(bad, InvalidInputError) and "SCORING must be one of" in str(bad)
    with pytest.raises(GalleryError, match="default_scoring"):
        SearchEndpoint(None, {"gallery_root": str(root), "default_scoring": "x"}, embed)
