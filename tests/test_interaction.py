"""Late interaction, zero-shot scores and alignment maps: both backends of engine.interaction
(numpy inputs on the ONNX Runtime kernel of engine.maxsim, torch tensors on torch) against
the slow NumPy reference (engine.interaction_ref)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from filip_engine import interaction
from filip_engine.errors import InvalidInputError
from filip_engine.interaction import (DEFAULT_TEMPLATES, alignment_map, build_prompts, chunk_bytes, late_interaction,
                                plan_chunks, zero_shot_scores)
from filip_engine.interaction_ref import alignment_ref, s_i_ref, s_t_ref, scores_ref, zero_shot_ref

# fp32 inputs: the fast path differs from the float64 reference only by fp32 rounding of the
# D-term dot products, the sums over tokens and the mean: ~1e-7 observed.
ATOL_FP32 = 1e-5
# fp16/bf16 inputs: the reference runs in float64 on the *same rounded values*, so input
# rounding cancels out.  A product of two fp16 (11-bit significand) or bf16 (8-bit) values is
# exact in fp32 (24-bit), so what is left is fp32 accumulation over D = 256 terms (worst case
# ~D * 2^-24 ~ 1.5e-5, typically far less).  An fp16 accumulator would miss by ~1e-3, so
# this gate still catches one.
ATOL_HALF = 1e-4
# Chunking and batching change only which fp32 GEMM kernel and reduction order run.
ATOL_SAME = 1e-6


def _tokens(rng, n, t, d, lengths, pad=0.0, dtype=np.float32):
    """[n, t, d] unit-norm tokens, ``pad`` past each row's length."""
    a = rng.standard_normal((n, t, d))
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    a[np.arange(t)[None, :] >= np.asarray(lengths)[:, None]] = pad
    return a.astype(dtype)


def _lengths(rng, n, t):
    """Ragged lengths in [1, t]: the first row full, the last (when n > 1) shorter than t."""
    out = rng.integers(1, t + 1, n)
    out[0] = t
    if n > 1:
        out[-1] = max(1, t - 1 - int(rng.integers(0, t)) % t)
    return out


def _as_f64(a):
    return a.double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)


def _max_diff(got, ref_i, ref_t):
    return max(np.abs(got.s_i - ref_i).max(), np.abs(got.s_t - ref_t).max())


# --- congruence with the reference --------------------------------------------------------------
CASES = [  # n_img, T_img, n_txt, T_txt, D, dtype, chunks
    (1, 1, 1, 1, 4, "fp32", None),                 # N = 1, T = 1
    (1, 49, 1, 77, 16, "fp32", None),
    (7, 16, 5, 11, 8, "fp32", None),
    (13, 49, 9, 20, 32, "fp32", (3, 2)),           # ragged last chunks on both axes
    (4, 16, 30, 77, 16, "fp32", (1, 1)),           # one pair per chunk
    (5, 10, 4, 8, 8, "fp64", None),
    (20, 49, 6, 30, 256, "fp16", (8, 4)),
    (9, 49, 7, 77, 64, "bf16", (2, 2)),
]


def _cast(a, dtype):
    if dtype == "bf16":
        return torch.from_numpy(a).to(torch.bfloat16)
    return a.astype({"fp32": np.float32, "fp64": np.float64, "fp16": np.float16}[dtype])


@pytest.mark.parametrize("ni, t1, nt, t2, d, dtype, chunks", CASES)
def test_congruent_with_reference(ni, t1, nt, t2, d, dtype, chunks):
    rng = np.random.default_rng(ni * 1000 + nt * 10 + d)
    il, tl = _lengths(rng, ni, t1), _lengths(rng, nt, t2)
    it, tt = _cast(_tokens(rng, ni, t1, d, il), dtype), _cast(_tokens(rng, nt, t2, d, tl), dtype)
    kw = {}
    if chunks is not None:   # a budget that fits exactly the wanted chunk, so the plan picks it
        budget = chunk_bytes(*chunks, t1, t2, d)
        kw["max_chunk_bytes"] = budget
        plan = plan_chunks(ni, t1, nt, t2, d, budget, convert_images=dtype != "fp32")
        assert (plan.images, plan.texts) == chunks and plan.peak_bytes <= budget
        assert chunks == (1, 1) or (ni % plan.images and nt % plan.texts)
    got = late_interaction(it, il, tt, tl, **kw)
    assert got.s_i.dtype == np.float32 and got.s_t.dtype == np.float32
    assert got.s_i.shape == got.s_t.shape == (ni, nt)
    ref_i, ref_t = scores_ref(_as_f64(it), il, _as_f64(tt), tl)
    tol = ATOL_HALF if dtype in ("fp16", "bf16") else ATOL_FP32
    assert _max_diff(got, ref_i, ref_t) <= tol


def test_return_tensors_and_input_kinds():
    rng = np.random.default_rng(11)
    il, tl = _lengths(rng, 3, 6), _lengths(rng, 2, 5)
    it, tt = _tokens(rng, 3, 6, 8, il), _tokens(rng, 2, 5, 8, tl)
    base = late_interaction(it, il, tt, tl)                       # numpy: the ONNX Runtime kernel
    t = late_interaction(torch.from_numpy(it), torch.from_numpy(il), torch.from_numpy(tt), tl, return_tensors=True)
    assert isinstance(t.s_i, torch.Tensor) and t.s_i.dtype == torch.float32 and t.s_i.device == torch.device("cpu")
    # tensors take the torch path: return_tensors changes no number of it, and the two
    # backends differ only in fp32 GEMM and reduction order
    on_torch = late_interaction(torch.from_numpy(it), il, torch.from_numpy(tt), tl)
    assert np.array_equal(t.s_i.numpy(), on_torch.s_i) and np.array_equal(t.s_t.numpy(), on_torch.s_t)
    assert _max_diff(on_torch, base.s_i, base.s_t) <= ATOL_SAME
    for cast in (np.uint8, np.int16, np.int32, np.uint64, list, lambda v: torch.from_numpy(v).to(torch.int32)):
        other = late_interaction(it, cast(il), tt, cast(tl))
        assert np.array_equal(other.s_i, base.s_i) and np.array_equal(other.s_t, base.s_t)
    ro = it.copy()
    ro.setflags(write=False)                   # read-only arrays (as Triton hands them over) work
    assert np.array_equal(late_interaction(ro, il, tt, tl).s_i, base.s_i)


# --- invariances ----------------------------------------------------------------------------------
def test_asymmetry_and_batch_vs_single():
    rng = np.random.default_rng(2)
    il, tl = np.array([16, 9, 12]), np.array([5, 11, 3, 7])
    it, tt = _tokens(rng, 3, 16, 8, il), _tokens(rng, 4, 11, 8, tl)
    s = late_interaction(it, il, tt, tl)
    assert np.abs(s.s_i - s.s_t).max() > 0.05           # s_I and s_T are different numbers
    for i in range(3):
        for j in range(4):
            x, y = it[i:i + 1, :il[i]], tt[j:j + 1, :tl[j]]   # unpadded, alone
            one = late_interaction(x, il[i:i + 1], y, tl[j:j + 1])
            assert abs(one.s_i[0, 0] - s.s_i[i, j]) <= ATOL_SAME and abs(one.s_t[0, 0] - s.s_t[i, j]) <= ATOL_SAME
            assert abs(one.s_i[0, 0] - s_i_ref(x[0], y[0])) <= ATOL_FP32
            assert abs(one.s_t[0, 0] - s_t_ref(x[0], y[0])) <= ATOL_FP32


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_chunking_invariance(dtype):
    rng = np.random.default_rng(3)
    il, tl = _lengths(rng, 33, 20), _lengths(rng, 17, 15)
    it, tt = _tokens(rng, 33, 20, 16, il, dtype=dtype), _tokens(rng, 17, 15, 16, tl, dtype=dtype)
    whole = late_interaction(it, il, tt, tl)
    smallest = chunk_bytes(1, 1, 20, 15, 16)
    for budget in (smallest, smallest + 5_000, 50_000, 300_000, 10**6):
        part = late_interaction(it, il, tt, tl, max_chunk_bytes=budget)
        assert _max_diff(part, whole.s_i, whole.s_t) <= ATOL_SAME, budget


# --- masking: lengths, and only lengths, decide what is real ----------------------------------------
@pytest.mark.parametrize("garbage", [50.0, -1e30, np.inf, np.nan])
def test_padding_garbage_changes_nothing(garbage):
    rng = np.random.default_rng(4)
    il, tl = _lengths(rng, 5, 10), _lengths(rng, 4, 8)
    a, b = _tokens(rng, 5, 10, 8, il), _tokens(rng, 4, 8, 8, tl)
    base = late_interaction(a, il, b, tl)
    noisy_a, noisy_b = _tokens(rng, 5, 10, 8, il, pad=garbage), _tokens(rng, 4, 8, 8, tl, pad=garbage)
    noisy_a[np.arange(10)[None, :] < il[:, None]] = a[np.arange(10)[None, :] < il[:, None]]
    noisy_b[np.arange(8)[None, :] < tl[:, None]] = b[np.arange(8)[None, :] < tl[:, None]]
    kept_a, kept_b = noisy_a.copy(), noisy_b.copy()
    for budget in (interaction.DEFAULT_MAX_CHUNK_BYTES, chunk_bytes(2, 3, 10, 8, 8)):
        noisy = late_interaction(noisy_a, il, noisy_b, tl, max_chunk_bytes=budget)
        assert np.isfinite(noisy.s_i).all() and np.isfinite(noisy.s_t).all()
        assert _max_diff(noisy, base.s_i, base.s_t) <= ATOL_SAME
    np.testing.assert_array_equal(noisy_a, kept_a)     # inputs are never written to
    np.testing.assert_array_equal(noisy_b, kept_b)
    assert _max_diff(base, *scores_ref(a, il, b, tl)) <= ATOL_FP32


def test_zero_padding_never_wins_a_max():
    """Every real similarity is -1, so a zero pad vector (similarity 0) would win any max it
    were let into: unmasked padding would give 0 or a mix, masked gives exactly -1."""
    d = 8
    x = np.zeros((2, 6, d), np.float32)
    x[:, :, 0] = 1.0
    x[1, 4:] = 0.0                                # image 1: 4 real patches along +e0, 2 zero pads
    y = np.zeros((2, 5, d), np.float32)
    y[:, :3, 0] = -1.0                            # texts: 3 real tokens along -e0, 2 zero pads
    s = late_interaction(x, [6, 4], y, [3, 3])
    assert np.array_equal(s.s_i, np.full((2, 2), -1, np.float32))
    assert np.array_equal(s.s_t, np.full((2, 2), -1, np.float32))


def test_a_real_zero_vector_is_a_real_token():
    """Masks come from lengths, not from zero vectors (or ids: id 0 is the real token "!").
    A zero vector inside the length counts in n and in the maxima."""
    d = 4
    x = np.zeros((1, 5, d), np.float32)
    x[0, :3, 0] = 1.0                             # patches 0-2 along +e0, patch 3 a real zero vector, 4 pad
    y = np.zeros((1, 4, d), np.float32)
    y[0, :2, 0] = -1.0                            # words 0-1 along -e0, word 2 a real zero vector, 3 pad
    s = late_interaction(x, [4], y, [3])
    # s_I: patches 0-2 take the zero word (0), patch 3 scores 0 against everything: 0 / 4
    # s_T: words 0-1 take the zero patch (0), word 2 scores 0: 0 / 3
    assert s.s_i[0, 0] == 0.0 and s.s_t[0, 0] == 0.0
    s = late_interaction(x[:, :3], [3], y, [3])   # without the zero patch: words 0-1 score -1
    assert abs(s.s_t[0, 0] - (-2 / 3)) <= 1e-7 and s.s_i[0, 0] == 0.0
    s = late_interaction(x, [4], y[:, :2], [2])   # without the zero word: patches 0-2 score -1
    assert abs(s.s_i[0, 0] - (-3 / 4)) <= 1e-7 and s.s_t[0, 0] == 0.0


# --- memory bound --------------------------------------------------------------------------------
@pytest.mark.parametrize("ni, t1, nt, t2, d, budget", [
    (4000, 49, 50, 16, 256, 8 << 20), (10, 256, 3, 77, 256, 1 << 20), (5, 49, 5, 77, 32, 200_000),
    (1, 49, 100_000, 77, 256, 256 << 20), (1_000_000, 49, 16, 16, 256, 256 << 20), (3, 7, 3, 5, 4, 10**12),
])
def test_chunk_plan_fits_the_bound_and_is_maximal(ni, t1, nt, t2, d, budget):
    plan = plan_chunks(ni, t1, nt, t2, d, budget)
    assert 1 <= plan.images <= ni and 1 <= plan.texts <= nt
    assert plan.peak_bytes == chunk_bytes(plan.images, plan.texts, t1, t2, d) <= budget
    assert plan.images == ni or chunk_bytes(plan.images + 1, plan.texts, t1, t2, d) > budget
    capped = plan_chunks(ni, t1, nt, t2, d, budget, convert_images=True)   # fp16 gallery: fp32 chunk cache-sized
    assert capped.texts == plan.texts and capped.peak_bytes <= budget
    assert capped.images * t1 * d * 4 <= max(interaction._IMAGE_CHUNK_BYTES, t1 * d * 4)


def test_budget_below_one_pair_is_refused():
    need = chunk_bytes(1, 1, 49, 77, 256)
    assert plan_chunks(3, 49, 3, 77, 256, need) == (1, 1, need)
    with pytest.raises(InvalidInputError, match=f"max_chunk_bytes={need - 1} is below the {need} bytes"):
        late_interaction(np.ones((3, 49, 256), np.float32), [49] * 3, np.ones((3, 77, 256), np.float32), [77] * 3,
                         max_chunk_bytes=need - 1)


def test_4000_images_x_50_texts_stay_under_a_small_bound(monkeypatch):
    rng = np.random.default_rng(5)
    ni, t1, nt, t2, d, budget = 4000, 49, 50, 16, 32, 2 << 20
    il, tl = _lengths(rng, ni, t1), _lengths(rng, nt, t2)
    it, tt = _tokens(rng, ni, t1, d, il, dtype=np.float16), _tokens(rng, nt, t2, d, tl)
    seen = []
    real_block = interaction._score_block

    def recording_block(x, x_valid, n1, y, y_valid, n2):
        seen.append((x.shape[0], y.shape[0], chunk_bytes(x.shape[0], y.shape[0], t1, t2, d)))
        return real_block(x, x_valid, n1, y, y_valid, n2)

    monkeypatch.setattr(interaction, "_score_block", recording_block)
    s = late_interaction(it, il, tt, tl, max_chunk_bytes=budget)
    plan = plan_chunks(ni, t1, nt, t2, d, budget, convert_images=True)
    assert plan.images < ni                                    # the bound really forces chunking
    assert max(b for _, _, b in seen) <= budget
    assert len(seen) == math.ceil(ni / plan.images) * math.ceil(nt / plan.texts)
    assert sum(ci * cj for ci, cj, _ in seen) == ni * nt       # every pair scored exactly once
    rows = [0, 1, 1234, 3998, 3999]
    ref_i, ref_t = scores_ref(it[rows].astype(np.float64), il[rows], tt.astype(np.float64), tl)
    assert max(np.abs(s.s_i[rows] - ref_i).max(), np.abs(s.s_t[rows] - ref_t).max()) <= ATOL_HALF
    monkeypatch.undo()
    assert _max_diff(late_interaction(it, il, tt, tl), s.s_i, s.s_t) <= ATOL_SAME


# --- zero-shot ------------------------------------------------------------------------------------
def _prompt_set(seed, n_img=3, n_classes=4, n_templates=3, d=8):
    rng = np.random.default_rng(seed)
    il = _lengths(rng, n_img, 16)
    pl = _lengths(rng, n_classes * n_templates, 12)
    return _tokens(rng, n_img, 16, d, il), il, _tokens(rng, n_classes * n_templates, 12, d, pl), pl


@pytest.mark.parametrize("mode, logit_scale", [("mean", 100.0), ("softmax", 1.0), ("softmax", 50.0), ("softmax", 100.0)])
def test_zero_shot_matches_reference(mode, logit_scale):
    it, il, pt, pl = _prompt_set(6)
    got = zero_shot_scores(it, il, pt, pl, n_classes=4, n_templates=3, mode=mode, logit_scale=logit_scale)
    want = zero_shot_ref(it, il, pt, pl, 4, 3, mode=mode, logit_scale=logit_scale)
    assert got.shape == (3, 4) and got.dtype == np.float32
    # softmax's Jacobian has max-norm <= 1/2, so an s_I error e moves a probability by <= logit_scale * e / 2
    tol = ATOL_FP32 if mode == "mean" else logit_scale * ATOL_FP32 / 2
    assert np.abs(got - want).max() <= tol


def test_zero_shot_mean_ignores_temperature_and_softmax_is_normalised():
    it, il, pt, pl = _prompt_set(7, n_img=5, n_classes=6, n_templates=4)
    kw = dict(n_classes=6, n_templates=4)
    a = zero_shot_scores(it, il, pt, pl, logit_scale=1.0, **kw)
    b = zero_shot_scores(it, il, pt, pl, logit_scale=100.0, **kw)
    assert np.array_equal(a, b)                                 # temperature never ranks in "mean" mode
    probs = zero_shot_scores(it, il, pt, pl, mode="softmax", **kw)
    assert np.abs(probs.sum(axis=1) - 1).max() <= 1e-6 and (probs >= 0).all()
    per_template = []
    for t in range(4):                                          # each template's softmax over classes
        rows = [c * 4 + t for c in range(6)]
        p_t = zero_shot_scores(it, il, pt[rows], pl[rows], n_classes=6, n_templates=1, mode="softmax")
        assert np.abs(p_t.sum(axis=1) - 1).max() <= 1e-6
        one_t = zero_shot_scores(it, il, pt[rows], pl[rows], n_classes=6, n_templates=1, mode="softmax", logit_scale=3.0)
        assert np.array_equal(p_t.argmax(1), one_t.argmax(1))   # one template: temperature keeps the ranking
        per_template.append(p_t)
    assert np.abs(np.mean(per_template, axis=0) - probs).max() <= 1e-6


def test_zero_shot_template_major_layout():
    it, il, pt, pl = _prompt_set(8)
    class_major = zero_shot_scores(it, il, pt, pl, n_classes=4, n_templates=3)
    perm = [c * 3 + t for t in range(3) for c in range(4)]     # template t of class c at t * C + c
    for mode in ("mean", "softmax"):
        cm = zero_shot_scores(it, il, pt, pl, n_classes=4, n_templates=3, mode=mode)
        tm = zero_shot_scores(it, il, pt[perm], pl[perm], n_classes=4, n_templates=3, mode=mode,
                              prompt_order="template_major")
        assert np.abs(tm - cm).max() <= ATOL_SAME
    assert np.abs(class_major - zero_shot_ref(it, il, pt, pl, 4, 3)).max() <= ATOL_FP32


@pytest.mark.parametrize("kw, match", [
    (dict(mode="max"), "mode must be"), (dict(prompt_order="random"), "prompt_order must be"),
    (dict(n_classes=5), "12 prompt lengths given for 5 classes x 3 templates"), (dict(n_templates=0), "n_templates"),
    (dict(logit_scale=float("nan")), "logit_scale"), (dict(logit_scale=-1.0), "logit_scale"),
])
def test_zero_shot_errors(kw, match):
    it, il, pt, pl = _prompt_set(9)
    args = dict(n_classes=4, n_templates=3) | kw
    with pytest.raises(InvalidInputError, match=match):
        zero_shot_scores(it, il, pt, pl, **args)


def test_build_prompts_order():
    assert build_prompts(["cat", "dog"], ["a {}.", "the {}!"]) == ["a cat.", "the cat!", "a dog.", "the dog!"]
    prompts = build_prompts(["x", "y"])
    assert prompts[:len(DEFAULT_TEMPLATES)] == [t.format("x") for t in DEFAULT_TEMPLATES]
    assert len(prompts) == 2 * len(DEFAULT_TEMPLATES)
    assert all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES) and len(set(DEFAULT_TEMPLATES)) == len(DEFAULT_TEMPLATES)
    for labels, templates in ((["cat"], ["no placeholder"]), ("cat", ["a {}"]), ([], ["a {}"]), ([""], ["a {}"]),
                              (["cat"], ["{} and {}"]), (["cat"], "a {}")):
        with pytest.raises(InvalidInputError):
            build_prompts(labels, templates)


def test_default_templates_are_the_contracts():
    import filip_client
    from filip_contract import prompts
    assert filip_client.DEFAULT_TEMPLATES is DEFAULT_TEMPLATES is prompts.DEFAULT_TEMPLATES


# --- word-patch alignment ---------------------------------------------------------------------------
def test_alignment_matches_reference_and_s_i():
    rng = np.random.default_rng(10)
    il, tl = np.array([49, 30, 1]), np.array([12, 9, 1])
    x, y = _tokens(rng, 3, 49, 16, il, pad=7.0), _tokens(rng, 3, 12, 16, tl, pad=7.0)
    s = late_interaction(x, il, y, tl)
    for i in range(3):
        for j in range(3):
            got = alignment_map(x[i], il[i], y[j], tl[j])
            assert got.dtype == np.int64 and got.shape == (il[i],)
            assert np.array_equal(got, alignment_ref(x[i, :il[i]], y[j, :tl[j]]))
            assert 0 <= got.min() and got.max() < tl[j]
            best = np.einsum("kd,kd->k", x[i, :il[i]].astype(np.float64), y[j, got].astype(np.float64))
            assert abs(best.mean() - s.s_i[i, j]) <= ATOL_FP32      # the map is s_I's argmax
    half = x.astype(np.float16), y.astype(np.float16)
    got = alignment_map(half[0][0], 49, torch.from_numpy(half[1][1:2]), np.int32(9))
    assert np.array_equal(got, alignment_ref(half[0][0].astype(np.float64), half[1][1, :9].astype(np.float64)))


def test_alignment_grid():
    rng = np.random.default_rng(12)
    x, y = _tokens(rng, 1, 49, 16, [49])[0], _tokens(rng, 1, 12, 16, [9])[0]
    flat = alignment_map(x, 49, y, 9)
    assert np.array_equal(alignment_map(x, 49, y, 9, grid=(7, 7)), flat.reshape(7, 7))
    assert np.array_equal(alignment_map(x, 49, y, 9, grid="auto"), flat.reshape(7, 7))
    assert alignment_map(x[None], 48, y[None], 9, grid=(6, 8)).shape == (6, 8)
    with pytest.raises(InvalidInputError, match="grid 5x5 does not hold the image's 49 patches"):
        alignment_map(x, 49, y, 9, grid=(5, 5))
    with pytest.raises(InvalidInputError, match="square number of patches, got n1=48"):
        alignment_map(x, 48, y, 9, grid="auto")
    with pytest.raises(InvalidInputError, match="grid must be"):
        alignment_map(x, 49, y, 9, grid="square")


@pytest.mark.parametrize("args, match", [
    ((np.zeros((49, 8), np.float32), 0, np.zeros((5, 8), np.float32), 3), r"image length must lie in \[1, 49\]"),
    ((np.zeros((49, 8), np.float32), 49, np.zeros((5, 8), np.float32), 6), r"text length must lie in \[1, 5\]"),
    ((np.zeros((49, 8), np.float32), 49, np.zeros((5, 4), np.float32), 3), "same dimension D, got 8 and 4"),
    ((np.zeros((2, 49, 8), np.float32), 49, np.zeros((5, 8), np.float32), 3), "one image and one text, got 2 rows"),
    ((np.zeros((49, 8), np.float32), 4.0, np.zeros((5, 8), np.float32), 3), "image length must be integers"),
])
def test_alignment_errors(args, match):
    with pytest.raises(InvalidInputError, match=match):
        alignment_map(*args)


# --- input validation ------------------------------------------------------------------------------
F32 = np.float32


@pytest.mark.parametrize("args, match", [
    ((np.zeros((2, 3), F32), [3, 3], np.zeros((1, 2, 3), F32), [2]),
     r"image tokens must have 3 dims \[N, T, D\] with T, D > 0, got shape \[2, 3\]"),
    ((np.zeros((1, 3, 4), F32), [3], np.zeros((1, 0, 4), F32), [1]), r"text tokens must have 3 dims .* got shape \[1, 0, 4\]"),
    ((np.zeros((1, 3, 4), F32), [3], np.zeros((1, 2, 5), F32), [2]), "same dimension D, got 4 and 5"),
    ((np.zeros((2, 3, 4), F32), [3], np.zeros((1, 2, 4), F32), [2]), r"image lengths must have shape \[2\] .* got shape \[1\]"),
    ((np.zeros((2, 3, 4), F32), [[3], [3]], np.zeros((1, 2, 4), F32), [2]), r"image lengths must have shape \[2\]"),
    ((np.zeros((1, 3, 4), F32), [0], np.zeros((1, 2, 4), F32), [2]), r"image lengths must lie in \[1, 3\] .* got 0"),
    ((np.zeros((1, 3, 4), F32), [3], np.zeros((2, 2, 4), F32), [2, 3]), r"text lengths must lie in \[1, 2\] .* got 3 at index 1"),
    ((np.zeros((1, 3, 4), np.int32), [3], np.zeros((1, 2, 4), F32), [2]), "image tokens must be floating point"),
    ((np.zeros((1, 3, 4), F32), [3], torch.zeros(1, 2, 4, dtype=torch.int64), [2]), "text tokens must be floating point"),
    ((np.zeros((1, 3, 4), F32), [1.5], np.zeros((1, 2, 4), F32), [2]), "image lengths must be integers, got dtype float64"),
    ((np.zeros((1, 3, 4), F32), [3], np.zeros((1, 2, 4), F32), np.array([True])), "text lengths must be integers, got dtype bool"),
    ((np.zeros((1, 3, 4), F32), [3], "tokens", [2]), "text tokens must be floating point"),
])
def test_input_errors(args, match):
    with pytest.raises(InvalidInputError, match=match):
        late_interaction(*args)


def test_all_input_problems_reported_at_once():
    with pytest.raises(InvalidInputError) as e:
        late_interaction(np.zeros((2, 3), F32), [3, 3], np.zeros((1, 2, 4), F32), [2.0])
    assert "image tokens must have 3 dims" in str(e.value) and "text lengths must be integers" in str(e.value)


def test_empty_gallery_gives_empty_scores():
    rng = np.random.default_rng(13)
    s = late_interaction(np.zeros((0, 49, 8), F32), np.zeros(0, np.int32), _tokens(rng, 2, 5, 8, [5, 3]), [5, 3])
    assert s.s_i.shape == s.s_t.shape == (0, 2)


# --- the two backends --------------------------------------------------------------------------
@pytest.fixture
def onnx_calls(monkeypatch):
    """Every chunk the ONNX Runtime kernel scores: (x dtype, ci, cj, x masked, y masked)."""
    calls = []
    real = interaction.pair_scores

    def recording(x, x_valid, n1, y, y_valid, n2):
        calls.append((x.dtype, x.shape[0], y.shape[0], x_valid is not None, y_valid is not None))
        return real(x, x_valid, n1, y, y_valid, n2)

    monkeypatch.setattr(interaction, "pair_scores", recording)
    return calls


ONNX_CASES = [  # n_img, T_img, n_txt, T_txt, D, chunks (None: one chunk), lengths ("ragged", "full", "one")
    (1, 1, 1, 1, 4, None, "full"), (1, 49, 1, 77, 16, None, "one"), (6, 9, 5, 7, 8, None, "ragged"),
    (17, 49, 11, 16, 32, (4, 3), "ragged"), (17, 49, 11, 16, 32, (4, 3), "full"), (17, 49, 11, 16, 32, (4, 3), "one"),
    (9, 16, 30, 77, 16, (1, 1), "ragged"), (8, 49, 8, 20, 64, (8, 8), "ragged"), (8, 49, 8, 20, 64, (7, 1), "ragged"),
    (25, 49, 3, 16, 256, (6, 2), "ragged"), (40, 256, 2, 77, 32, (13, 2), "ragged"),
]


def _case_lengths(rng, n, t, kind):
    if kind == "ragged":
        return _lengths(rng, n, t)
    return np.full(n, t if kind == "full" else 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("ni, t1, nt, t2, d, chunks, kind", ONNX_CASES)
def test_onnx_path_congruent_with_reference(onnx_calls, ni, t1, nt, t2, d, chunks, kind, dtype):
    rng = np.random.default_rng(ni * 7 + nt * 3 + d + t2)
    il, tl = _case_lengths(rng, ni, t1, kind), _case_lengths(rng, nt, t2, kind)
    if kind == "ragged":                          # one length-1 item on each side as well
        il[rng.integers(0, ni)], tl[rng.integers(0, nt)] = 1, 1
        il[0], tl[0] = t1, t2
    it, tt = _tokens(rng, ni, t1, d, il, pad=np.nan, dtype=dtype), _tokens(rng, nt, t2, d, tl, pad=np.nan, dtype=dtype)
    budget = chunk_bytes(*chunks, t1, t2, d) if chunks else interaction.DEFAULT_MAX_CHUNK_BYTES
    got = late_interaction(it, il, tt, tl, max_chunk_bytes=budget)
    assert got.s_i.dtype == got.s_t.dtype == np.float32 and got.s_i.shape == (ni, nt)
    assert np.isfinite(got.s_i).all() and np.isfinite(got.s_t).all()
    ref_i, ref_t = scores_ref(it.astype(np.float64), il, tt.astype(np.float64), tl)
    assert _max_diff(got, ref_i, ref_t) <= (ATOL_HALF if dtype == np.float16 else ATOL_FP32)
    plan = plan_chunks(ni, t1, nt, t2, d, budget, convert_images=dtype != np.float32)
    assert len(onnx_calls) == math.ceil(ni / plan.images) * math.ceil(nt / plan.texts)   # every chunk on ORT
    assert all(x_dtype == dtype for x_dtype, *_ in onnx_calls)                 # images reach it as stored
    assert sum(ci * cj for _, ci, cj, _, _ in onnx_calls) == ni * nt
    if kind == "full":                                                         # masks only where padding is
        assert not any(mx or my for *_, mx, my in onnx_calls)
    if chunks is None:
        whole = got
    else:
        whole = late_interaction(it, il, tt, tl)
        assert _max_diff(got, whole.s_i, whole.s_t) <= ATOL_SAME               # chunking changes nothing
    on_torch = late_interaction(torch.from_numpy(it), il, torch.from_numpy(tt), tl, max_chunk_bytes=budget)
    assert _max_diff(on_torch, whole.s_i, whole.s_t) <= ATOL_SAME              # the backends agree


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("garbage", [0.0, 50.0, -1e30, np.inf, -np.inf, np.nan])
def test_onnx_path_ignores_padding_content(onnx_calls, dtype, garbage):
    rng = np.random.default_rng(15)
    il, tl = np.array([10, 1, 7, 10, 3]), np.array([8, 1, 5, 8])
    clean_a, clean_b = _tokens(rng, 5, 10, 16, il, dtype=dtype), _tokens(rng, 4, 8, 16, tl, dtype=dtype)
    real_a, real_b = np.arange(10)[None, :] < il[:, None], np.arange(8)[None, :] < tl[:, None]
    noisy_a, noisy_b = clean_a.copy(), clean_b.copy()
    with np.errstate(over="ignore"):             # -1e30 is -inf in fp16
        noisy_a[~real_a], noisy_b[~real_b] = garbage, garbage
    kept_a, kept_b = noisy_a.copy(), noisy_b.copy()
    ref_i, ref_t = scores_ref(clean_a.astype(np.float64), il, clean_b.astype(np.float64), tl)
    for budget in (interaction.DEFAULT_MAX_CHUNK_BYTES, chunk_bytes(2, 3, 10, 8, 16), chunk_bytes(1, 1, 10, 8, 16)):
        clean = late_interaction(clean_a, il, clean_b, tl, max_chunk_bytes=budget)
        noisy = late_interaction(noisy_a, il, noisy_b, tl, max_chunk_bytes=budget)
        assert np.isfinite(noisy.s_i).all() and np.isfinite(noisy.s_t).all()
        assert _max_diff(noisy, clean.s_i, clean.s_t) <= ATOL_SAME
        assert _max_diff(noisy, ref_i, ref_t) <= (ATOL_HALF if dtype == np.float16 else ATOL_FP32)
    assert onnx_calls and any(mx and my for *_, mx, my in onnx_calls)
    np.testing.assert_array_equal(noisy_a, kept_a)     # inputs are never written to
    np.testing.assert_array_equal(noisy_b, kept_b)


def _old_torch_scores(it, il, tt, tl):
    """The torch scorer as it was before the ONNX Runtime kernel (one chunk), for regression."""
    x, y = it.to(torch.float32), tt.to(torch.float32)
    (ci, t1, d), (cj, t2, _) = x.shape, y.shape
    x_valid = torch.arange(t1)[None, :] < torch.as_tensor(il)[:, None]
    y_valid = torch.arange(t2)[None, :] < torch.as_tensor(tl)[:, None]
    sim = (x.reshape(ci * t1, d) @ y.reshape(cj * t2, d).T).view(ci, t1, cj, t2)
    sim.masked_fill_(~y_valid[None, None], float("-inf"))
    best_r = sim.amax(dim=3).masked_fill_(~x_valid[:, :, None], 0.0)
    sim.masked_fill_(~x_valid[:, :, None, None], float("-inf"))
    best_k = sim.amax(dim=1).masked_fill_(~y_valid[None], 0.0)
    n1, n2 = torch.as_tensor(il, dtype=torch.float32), torch.as_tensor(tl, dtype=torch.float32)
    return (best_r.sum(dim=1) / n1[:, None]).numpy(), (best_k.sum(dim=2) / n2[None, :]).numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_torch_inputs_take_the_torch_path_unchanged(onnx_calls, dtype):
    rng = np.random.default_rng(17)
    il, tl = np.array([12, 5, 1, 12]), np.array([9, 1, 4])
    it = torch.from_numpy(_tokens(rng, 4, 12, 16, il, pad=np.nan)).to(dtype)
    tt = torch.from_numpy(_tokens(rng, 3, 9, 16, tl, pad=np.nan)).to(dtype)
    with torch.inference_mode():
        old_i, old_t = _old_torch_scores(it, il, tt, tl)
    got = late_interaction(it, il, tt, tl)
    assert isinstance(got.s_i, np.ndarray) and np.array_equal(got.s_i, old_i) and np.array_equal(got.s_t, old_t)
    ref_i, ref_t = scores_ref(it.double().numpy(), il, tt.double().numpy(), tl)
    assert _max_diff(got, ref_i, ref_t) <= (ATOL_FP32 if dtype in (torch.float32, torch.float64) else ATOL_HALF)
    mixed = late_interaction(it.float().numpy() if dtype == torch.float32 else it, il, tt, tl)   # one tensor is enough
    assert np.array_equal(mixed.s_i, old_i) and np.array_equal(mixed.s_t, old_t)
    assert onnx_calls == []                                                    # nothing went through ORT
    zs = zero_shot_scores(it, il, tt, tl, n_classes=3, n_templates=1)
    assert np.abs(zs - ref_i).max() <= (ATOL_FP32 if dtype in (torch.float32, torch.float64) else ATOL_HALF)


def test_numpy_inputs_with_return_tensors_use_torch():
    rng = np.random.default_rng(18)
    it, tt = _tokens(rng, 3, 6, 8, [6, 2, 4]), _tokens(rng, 2, 5, 8, [5, 1])
    t = late_interaction(it, [6, 2, 4], tt, [5, 1], return_tensors=True)
    assert isinstance(t.s_i, torch.Tensor) and isinstance(t.s_t, torch.Tensor)
    assert _max_diff(late_interaction(it, [6, 2, 4], tt, [5, 1]), t.s_i.numpy(), t.s_t.numpy()) <= ATOL_SAME


def test_importing_interaction_and_search_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, filip_engine.interaction, filip_engine.search; "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "import numpy as np; "
            "from filip_engine.interaction import late_interaction, zero_shot_scores, alignment_map; "
            "x = np.ones((2, 3, 4), np.float16); y = np.ones((3, 2, 4), np.float32); "
            "s = late_interaction(x, [3, 1], y, [2, 1, 2]); assert s.s_i.shape == (2, 3); "
            "zero_shot_scores(x, [3, 1], y, [2, 1, 2], n_classes=3, n_templates=1, mode='softmax'); "
            "alignment_map(x[0], 3, y[0], 2); "
            "assert 'torch' not in sys.modules, 'scoring numpy imported torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# --- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_matches_reference():
    rng = np.random.default_rng(14)
    il, tl = _lengths(rng, 40, 49), _lengths(rng, 9, 20)
    it, tt = _tokens(rng, 40, 49, 256, il, dtype=np.float16), _tokens(rng, 9, 20, 256, tl, dtype=np.float16)
    got = late_interaction(torch.from_numpy(it).cuda(), torch.from_numpy(il).cuda(), torch.from_numpy(tt).cuda(), tl,
                           max_chunk_bytes=chunk_bytes(7, 4, 49, 20, 256), return_tensors=True)
    assert got.s_i.device.type == "cuda"
    ref_i, ref_t = scores_ref(it.astype(np.float64), il, tt.astype(np.float64), tl)
    assert max(np.abs(got.s_i.cpu().numpy() - ref_i).max(), np.abs(got.s_t.cpu().numpy() - ref_t).max()) <= ATOL_HALF
