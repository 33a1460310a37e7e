"""Late interaction: the chunked torch implementation against the NumPy reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import InvalidInputError
from engine.interaction import (DEFAULT_TEMPLATES, alignment_map, build_prompts, late_interaction, plan_chunks,
                                zero_shot_scores)
from engine.interaction_ref import alignment_ref, s_i_ref, s_t_ref, scores_ref, zero_shot_ref

ATOL_FP32 = 1e-5
# fp16 inputs: the reference runs on the same fp16-rounded values in float64, and the fast
# path accumulates in fp32, so the only difference left is fp32 summation order.
ATOL_FP16 = 1e-4


def _tokens(rng, n, t, d, lengths):
    a = rng.standard_normal((n, t, d)).astype(np.float32)
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    for i, n_i in enumerate(lengths):
        a[i, n_i:] = 0
    return a


@pytest.mark.parametrize("ni, t1, nt, t2, d, chunk", [
    (1, 1, 1, 1, 4, None), (7, 16, 5, 11, 8, None), (13, 49, 9, 20, 32, 20_000),
    (4, 16, 30, 77, 16, 1), (40, 10, 3, 6, 8, 5_000),
])
def test_congruent_with_reference(ni, t1, nt, t2, d, chunk):
    rng = np.random.default_rng(ni * 100 + nt)
    il, tl = rng.integers(1, t1 + 1, ni), rng.integers(1, t2 + 1, nt)
    it, tt = _tokens(rng, ni, t1, d, il), _tokens(rng, nt, t2, d, tl)
    kw = {} if chunk is None else {"max_chunk_bytes": chunk}
    s = late_interaction(it, il, tt, tl, **kw)
    ri, rt = scores_ref(it, il, tt, tl)
    assert s.s_i.shape == (ni, nt) and s.s_i.dtype == np.float32
    assert np.abs(s.s_i - ri).max() <= ATOL_FP32 and np.abs(s.s_t - rt).max() <= ATOL_FP32


def test_fp16_inputs_accumulate_in_fp32():
    rng = np.random.default_rng(1)
    il, tl = rng.integers(1, 50, 20), rng.integers(2, 30, 6)
    it = _tokens(rng, 20, 49, 256, il).astype(np.float16)
    tt = _tokens(rng, 6, 30, 256, tl).astype(np.float16)
    s = late_interaction(it, il, tt, tl, max_chunk_bytes=100_000)
    ri, rt = scores_ref(it.astype(np.float64), il, tt.astype(np.float64), tl)
    assert np.abs(s.s_i - ri).max() <= ATOL_FP16 and np.abs(s.s_t - rt).max() <= ATOL_FP16
    b = late_interaction(torch.from_numpy(it).to(torch.bfloat16), il, torch.from_numpy(tt).to(torch.bfloat16), tl,
                         return_tensors=True)
    assert b.s_i.dtype == torch.float32


def test_asymmetry_and_single_vs_batch():
    rng = np.random.default_rng(2)
    il, tl = np.array([16, 9, 12]), np.array([5, 11, 3, 7])
    it, tt = _tokens(rng, 3, 16, 8, il), _tokens(rng, 4, 11, 8, tl)
    s = late_interaction(it, il, tt, tl)
    assert not np.allclose(s.s_i, s.s_t)
    for i in range(3):
        for j in range(4):
            one = late_interaction(it[i:i + 1, :il[i]], il[i:i + 1], tt[j:j + 1, :tl[j]], tl[j:j + 1])
            assert abs(one.s_i[0, 0] - s.s_i[i, j]) < 1e-6 and abs(one.s_t[0, 0] - s.s_t[i, j]) < 1e-6


def test_chunking_invariance():
    rng = np.random.default_rng(3)
    il, tl = rng.integers(1, 20, 33), rng.integers(1, 15, 17)
    it, tt = _tokens(rng, 33, 20, 16, il), _tokens(rng, 17, 15, 16, tl)
    whole = late_interaction(it, il, tt, tl)
    for budget in (1, 2_000, 50_000, 10**6):
        part = late_interaction(it, il, tt, tl, max_chunk_bytes=budget)
        assert np.abs(part.s_i - whole.s_i).max() <= 1e-6 and np.abs(part.s_t - whole.s_t).max() <= 1e-6


def test_padding_is_masked_by_lengths_only():
    """Garbage in the padding changes nothing; with all real similarities negative, a zero pad
    vector would win an unmasked max, so this also catches masking by zero vectors."""
    rng = np.random.default_rng(4)
    d = 8
    x = np.zeros((1, 6, d), np.float32)
    x[0, :4, 0] = 1.0                              # image tokens along +e0
    y = np.zeros((2, 5, d), np.float32)
    y[:, :3, 0] = -1.0                             # text tokens along -e0: all similarities -1
    il, tl = np.array([4]), np.array([3, 3])
    s = late_interaction(x, il, y, tl)
    assert np.allclose(s.s_i, -1) and np.allclose(s.s_t, -1)
    il2, tl2 = rng.integers(1, 10, 5), rng.integers(1, 8, 4)
    a, b = _tokens(rng, 5, 10, d, il2), _tokens(rng, 4, 8, d, tl2)
    base = late_interaction(a, il2, b, tl2)
    ref = scores_ref(a, il2, b, tl2)
    noisy = late_interaction(np.where(np.arange(10)[None, :, None] < il2[:, None, None], a, 50.0).astype(np.float32), il2,
                             np.where(np.arange(8)[None, :, None] < tl2[:, None, None], b, -50.0).astype(np.float32), tl2)
    assert np.abs(noisy.s_i - base.s_i).max() < 1e-6 and np.abs(noisy.s_t - base.s_t).max() < 1e-6
    assert np.abs(base.s_i - ref[0]).max() < 1e-5


def test_chunk_plan_respects_the_bound():
    for ni, t1, nt, t2, budget in ((4000, 49, 50, 16, 8 << 20), (10, 256, 3, 77, 1 << 20), (5, 49, 5, 77, 1)):
        ci, cj = plan_chunks(ni, t1, nt, t2, budget)
        assert 1 <= ci <= ni and 1 <= cj <= nt
        assert ci * cj == 1 or 3 * 4 * ci * t1 * cj * t2 <= budget


def test_many_images_bounded_memory():
    rng = np.random.default_rng(5)
    it = _tokens(rng, 4000, 49, 32, [49] * 4000).astype(np.float16)
    tl = rng.integers(2, 16, 50)
    tt = _tokens(rng, 50, 16, 32, tl)
    s = late_interaction(it, np.full(4000, 49), tt, tl, max_chunk_bytes=8 << 20)
    idx = [0, 1234, 3999]
    ri, rt = scores_ref(it[idx].astype(np.float64), [49] * 3, tt.astype(np.float64), tl)
    assert np.abs(s.s_i[idx] - ri).max() < ATOL_FP16 and np.abs(s.s_t[idx] - rt).max() < ATOL_FP16


def test_zero_shot_matches_reference():
    rng = np.random.default_rng(6)
    il = np.array([16, 16, 10])
    it = _tokens(rng, 3, 16, 8, il)
    pl = rng.integers(3, 12, 4 * 3)
    pt = _tokens(rng, 12, 12, 8, pl)
    for mode in ("mean", "softmax"):
        got = zero_shot_scores(it, il, pt, pl, n_classes=4, n_templates=3, mode=mode, logit_scale=50.0)
        want = zero_shot_ref(it, il, pt, pl, 4, 3, mode=mode, logit_scale=50.0)
        assert np.abs(got - want).max() < 1e-5
    probs = zero_shot_scores(it, il, pt, pl, n_classes=4, n_templates=3, mode="softmax")
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-6)
    a = zero_shot_scores(it, il, pt, pl, n_classes=4, n_templates=3, logit_scale=1.0)
    b = zero_shot_scores(it, il, pt, pl, n_classes=4, n_templates=3, logit_scale=100.0)
    assert np.array_equal(a.argmax(1), b.argmax(1)) and np.array_equal(a, b)   # temperature never ranks
    # template-major layout gives the same numbers once the prompts are permuted accordingly
    perm = [c * 3 + t for t in range(3) for c in range(4)]
    tm = zero_shot_scores(it, il, pt[perm], pl[perm], n_classes=4, n_templates=3, prompt_order="template_major")
    assert np.abs(tm - a).max() < 1e-6


def test_build_prompts_order():
    assert build_prompts(["cat", "dog"], ["a {}.", "the {}!"]) == ["a cat.", "the cat!", "a dog.", "the dog!"]
    assert len(build_prompts(["x"])) == len(DEFAULT_TEMPLATES)
    with pytest.raises(InvalidInputError):
        build_prompts(["cat"], ["no placeholder"])
    with pytest.raises(InvalidInputError):
        build_prompts("cat")


def test_alignment_map():
    rng = np.random.default_rng(7)
    x, y = _tokens(rng, 1, 49, 16, [49])[0], _tokens(rng, 1, 12, 16, [9])[0]
    flat = alignment_map(x, 49, y, 9)
    assert np.array_equal(flat, alignment_ref(x, y[:9])) and flat.max() < 9
    assert alignment_map(x, 49, y, 9, grid=(7, 7)).shape == (7, 7)
    with pytest.raises(InvalidInputError, match="grid"):
        alignment_map(x, 49, y, 9, grid=(5, 5))


@pytest.mark.parametrize("args, match", [
    ((np.zeros((2, 3), np.float32), [3, 3], np.zeros((1, 2, 3), np.float32), [2]), "must be \\[N, T, D\\]"),
    ((np.zeros((1, 3, 4), np.float32), [3], np.zeros((1, 2, 5), np.float32), [2]), "token dims differ"),
    ((np.zeros((2, 3, 4), np.float32), [3], np.zeros((1, 2, 4), np.float32), [2]), "1 entries for 2 rows"),
    ((np.zeros((1, 3, 4), np.float32), [0], np.zeros((1, 2, 4), np.float32), [2]), "lie in \\[1, 3\\]"),
    ((np.zeros((1, 3, 4), np.float32), [3], np.zeros((1, 2, 4), np.float32), [3]), "lie in \\[1, 2\\]"),
    ((np.zeros((1, 3, 4), np.int32), [3], np.zeros((1, 2, 4), np.float32), [2]), "floating point"),
    ((np.zeros((1, 3, 4), np.float32), [1.5], np.zeros((1, 2, 4), np.float32), [2]), "integers"),
])
def test_input_errors(args, match):
    with pytest.raises(InvalidInputError, match=match):
        late_interaction(*args)
