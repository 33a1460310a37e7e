"""Search and scoring on torch (CUDA when present): the same code path run here on the CPU
(device "cpu" torch), against the ONNX Runtime kernel and a NumPy brute force; the gallery
kept resident on the device when it fits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from filip_contract.gallery_reader import Gallery
from filip_engine.maxsim import TorchMaxSimKernel
from filip_engine.search import Queries, Searcher, exact_scores
from filip_engine.serving import score_request
from tools.gallery_synth import SyntheticSpec, load_queries, synthesize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def brute_force_s_t(tokens, q_tokens, q_lengths):
    x = tokens.astype(np.float64)
    return np.stack([np.einsum("npd,td->ntp", x, q_tokens[i, :n].astype(np.float64)).max(axis=2).mean(axis=1)
                     for i, n in enumerate(q_lengths)])


@pytest.fixture(scope="module", params=["float16", "int8"])
def gallery(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"dev-search-{request.param}") / "g"
    synthesize(path, 900, segment=250, token_dtype=request.param, spec=SyntheticSpec(tokens=12, dim=32, topics=16, words=200, words_per_topic=10, seed=3),
               n_queries=12)
    return Gallery.open(path)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_kernel_search_equals_onnxruntime_and_numpy(gallery, device):
    qt, ql, _ = load_queries(gallery.path)
    q = Queries.from_tokens(qt, ql)
    ref = brute_force_s_t(gallery.tokens_of(np.arange(gallery.count)), qt, ql)
    cpu, dev = Searcher(gallery), Searcher(gallery, device=device, resident_bytes=1 << 30)
    assert isinstance(dev.kernel, TorchMaxSimKernel)
    np.testing.assert_allclose(exact_scores(gallery, q, kernel=dev.kernel), ref, rtol=0, atol=2e-6)
    held = dev.kernel.held_bytes
    assert held >= gallery.count * 12 * 32        # every stored chunk is resident now ...
    np.testing.assert_allclose(exact_scores(gallery, q, kernel=dev.kernel), ref, rtol=0, atol=2e-6)
    assert dev.kernel.held_bytes == held          # ... and the second scan reads it from there
    for mode in ("exact", "two_stage"):
        a, b = cpu.search(q, 10, mode=mode, candidates=200), dev.search(q, 10, mode=mode, candidates=200)
        assert np.array_equal(a.rows, b.rows), mode
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=2e-6)
    allowed = [gallery.ids[i] for i in range(0, gallery.count, 7)] if hasattr(gallery, "ids") else None
    if allowed is not None:
        a, b = cpu.search(q, 5, allowed_ids=allowed), dev.search(q, 5, allowed_ids=allowed)
        assert np.array_equal(a.rows, b.rows)
    pooled = np.random.default_rng(0).standard_normal((3, gallery.pooled_dim)).astype(np.float32)
    a, b = cpu.search(None, 5, scoring="global", pooled=pooled), dev.search(None, 5, scoring="global", pooled=pooled)
    assert np.array_equal(a.rows, b.rows)          # the global path is the lead's, untouched by the device


def test_no_residency_without_budget(gallery):
    qt, ql, _ = load_queries(gallery.path)
    s = Searcher(gallery, device="cpu")            # the CPU default: nothing kept
    exact_scores(gallery, Queries.from_tokens(qt, ql), kernel=s.kernel)
    assert s.kernel.held_bytes == 0
    small = Searcher(gallery, device="cpu", resident_bytes=2 * 250 * 12 * 32)
    exact_scores(gallery, Queries.from_tokens(qt, ql), kernel=small.kernel)
    assert 0 < small.kernel.held_bytes <= 2 * 250 * 12 * 32


@pytest.mark.parametrize("device", DEVICES)
def test_scorer_on_torch_device_equals_numpy(device):
    rng = np.random.default_rng(1)
    it = rng.standard_normal((4, 10, 16)).astype(np.float32)
    tt = rng.standard_normal((3, 6, 16)).astype(np.float32)
    il, tl = np.array([[10], [3], [10], [7]], np.int32), np.array([[6], [2], [4]], np.int32)
    inputs = {"IMAGE_TOKENS": it, "IMAGE_LENGTHS": il, "TEXT_TOKENS": tt, "TEXT_LENGTHS": tl}
    a = score_request(inputs, wanted=("S_I", "S_T"))
    b = score_request(inputs, wanted=("S_I", "S_T"), device=device)
    for k in ("S_I", "S_T"):
        np.testing.assert_allclose(np.asarray(b[k]), a[k], rtol=0, atol=1e-5)
