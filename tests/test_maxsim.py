"""The ONNX Runtime MaxSim kernel itself (engine.maxsim): both graph forms against NumPy in
float64, every mask and dtype variant, masking by Where, per-chunk casts, session caching."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from filip_engine import interaction, maxsim
from filip_engine.errors import InvalidInputError
from filip_engine.interaction_ref import scores_ref
from filip_engine.maxsim import GraphKey, MaxSimKernel, Queries, pair_scores

# fp32 GEMM over D <= 64 terms and means over <= 49 tokens, against float64 on the same
# (rounded) input values: ~1e-7 observed.
ATOL = 2e-6


def _unit(rng, *shape):
    a = rng.standard_normal(shape)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _brute_s_t(x, scales, q_tokens, q_lengths):
    """[nq, c] float64: mean over each query's real tokens of the max over (scaled) patches."""
    xs = x.astype(np.float64) * (1.0 if scales is None else scales.astype(np.float64)[:, :, None])
    return np.stack([np.einsum("cpd,td->ctp", xs, q_tokens[i, :n].astype(np.float64)).max(axis=2).mean(axis=1)
                     for i, n in enumerate(q_lengths)])


# --- gallery form ------------------------------------------------------------------------------------
@pytest.mark.parametrize("token_dtype", ["float16", "int8"])
def test_gallery_kernel_matches_brute_force(token_dtype):
    rng = np.random.default_rng(1)
    c, p, d = 37, 12, 32
    x = _unit(rng, c, p, d)
    if token_dtype == "int8":
        scales = (np.abs(x).max(axis=-1) / 127).astype(np.float32)
        x = np.round(x / scales[:, :, None]).astype(np.int8)
    else:
        scales, x = None, x.astype(np.float16)
    ql = np.array([5, 1, 9, 9])
    qt = _unit(rng, 4, 9, d).astype(np.float32)
    qt[0, 5:] = np.nan                                     # query padding never counts
    kernel = MaxSimKernel(token_dtype, p, d)
    q = Queries.from_tokens(qt, ql)
    want = _brute_s_t(x, scales, qt, ql)
    for step in (1, 7, c):
        got = np.concatenate([kernel(x[a:a + step], None if scales is None else scales[a:a + step], q)
                              for a in range(0, c, step)], axis=1)
        assert got.shape == (4, c) and got.dtype == np.float32
        assert np.abs(got - want).max() <= ATOL
    one = kernel(x, scales, q.one(2))
    assert one.shape == (1, c) and np.abs(one[0] - want[2]).max() <= ATOL


def test_gallery_kernel_refuses_other_dtypes():
    with pytest.raises(InvalidInputError, match="float16 or int8"):
        MaxSimKernel("float32", 49, 256)


# --- pair form -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_x, mask_y", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("x_dtype, y_dtype", [(np.float32, np.float32), (np.float16, np.float32),
                                              (np.float32, np.float16), (np.float16, np.float16),
                                              (np.float64, np.float32), (np.float64, np.float64)])
def test_pair_kernel_every_variant(mask_x, mask_y, x_dtype, y_dtype):
    rng = np.random.default_rng(2)
    ci, t1, cj, t2, d = 6, 10, 4, 7, 16
    n1 = np.array([10, 1, 4, 10, 9, 2]) if mask_x else np.full(ci, t1)
    n2 = np.array([7, 1, 3, 6]) if mask_y else np.full(cj, t2)
    x, y = _unit(rng, ci, t1, d).astype(x_dtype), _unit(rng, cj, t2, d).astype(y_dtype)
    x_valid, y_valid = np.arange(t1)[None] < n1[:, None], np.arange(t2)[None] < n2[:, None]
    x[~x_valid], y[~y_valid] = np.nan, np.inf              # padding content is irrelevant
    s_i, s_t = pair_scores(x, x_valid if mask_x else None, n1, y, y_valid if mask_y else None, n2)
    ref_i, ref_t = scores_ref(x.astype(np.float64), n1, y.astype(np.float64), n2)
    assert s_i.dtype == s_t.dtype == np.float32 and s_i.shape == s_t.shape == (ci, cj)
    assert max(np.abs(s_i - ref_i).max(), np.abs(s_t - ref_t).max()) <= ATOL
    s1 = pair_scores(x, x_valid if mask_x else None, n1, y, y_valid if mask_y else None, n2, threads=1)
    assert max(np.abs(s1[0] - s_i).max(), np.abs(s1[1] - s_t).max()) <= 1e-6


def _ops(key: GraphKey) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(maxsim._graph(key)).graph.node]


@pytest.mark.parametrize("x, y", [("float16", "float32"), ("float32", "float32"), ("float64", "float16")])
@pytest.mark.parametrize("mask_x, mask_y", [(False, False), (True, False), (False, True), (True, True)])
def test_pair_graph_masks_with_where_and_casts_in_graph(x, y, mask_x, mask_y):
    key = GraphKey(x, y, mask_x=mask_x, mask_y=mask_y)
    model = onnx.load_from_string(maxsim._graph(key))
    onnx.checker.check_model(model, full_check=True)
    ops = _ops(key)
    assert ops.count("Where") == 2 * (mask_x + mask_y)     # block and maxima, per masked side
    assert not {"Add", "Sub"} & set(ops)                   # never -inf added: NaN + -inf is NaN
    assert ops.count("Cast") == (x != "float32") + (y != "float32")
    assert ops.count("MatMul") == 1
    x_in = next(i for i in model.graph.input if i.name == "X")
    assert x_in.type.tensor_type.elem_type == getattr(onnx.TensorProto, maxsim._ONNX_TYPES[x])
    assert [d.dim_param for d in x_in.type.tensor_type.shape.dim] == ["ci", "t1", "d"]   # symbolic


def test_sessions_are_cached_per_variant_not_per_shape():
    rng = np.random.default_rng(3)
    key_count = len(maxsim._SESSIONS)
    for ci, cj, t1, t2, d in ((1, 1, 5, 6, 8), (9, 3, 5, 2, 8), (4, 7, 11, 77, 8), (2, 2, 3, 1, 16)):
        x, y = _unit(rng, ci, t1, d).astype(np.float16), _unit(rng, cj, t2, d).astype(np.float32)
        s_i, s_t = pair_scores(x, None, np.full(ci, t1), y, None, np.full(cj, t2))
        ref_i, ref_t = scores_ref(x.astype(np.float64), [t1] * ci, y.astype(np.float64), [t2] * cj)
        assert max(np.abs(s_i - ref_i).max(), np.abs(s_t - ref_t).max()) <= ATOL
    assert len(maxsim._SESSIONS) <= key_count + 1          # one variant: float16 x float32, no masks
    assert maxsim._session(GraphKey("float16", "float32")) is maxsim._session(GraphKey("float16", "float32"))
    assert MaxSimKernel("float16", 49, 64).session is MaxSimKernel("float16", 49, 64).session


def test_fp16_gallery_reaches_the_kernel_in_cache_sized_fp16_chunks(monkeypatch):
    """late_interaction hands the kernel fp16 chunks as stored, each within the image-chunk
    cap: the gallery is never upcast as a whole."""
    seen = []
    real = interaction.pair_scores

    def recording(x, *rest):
        seen.append((x.dtype, x.shape[0]))
        return real(x, *rest)

    monkeypatch.setattr(interaction, "pair_scores", recording)
    rng = np.random.default_rng(4)
    n, t1, d = 700, 49, 256
    it, tt = _unit(rng, n, t1, d).astype(np.float16), _unit(rng, 2, 16, d).astype(np.float32)
    s = interaction.late_interaction(it, np.full(n, t1), tt, [16, 9])
    cap = max(1, interaction._IMAGE_CHUNK_BYTES // (4 * t1 * d))
    assert len(seen) == math.ceil(n / cap) > 1
    assert all(dtype == np.float16 and ci <= cap for dtype, ci in seen)
    rows = [0, 350, 699]
    ref_i, ref_t = scores_ref(it[rows].astype(np.float64), [t1] * 3, tt.astype(np.float64), [16, 9])
    assert max(np.abs(s.s_i[rows] - ref_i).max(), np.abs(s.s_t[rows] - ref_t).max()) <= 1e-4   # fp32 sums over D
