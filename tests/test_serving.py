"""Server-side batch handlers without a server: per-request isolation, stacking/splitting, limits."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from filip_engine.errors import ImageDecodeError, InvalidInputError, TextInputError
from filip_engine.interaction_ref import alignment_ref, s_i_ref, s_t_ref
from filip_engine.pipeline import FilipPipeline
from filip_engine.serving import (ServingLimits, embed_image_requests, embed_text_requests, score_request)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return FilipPipeline.from_checkpoint(tiny_checkpoint)


def _texts(*items):
    return np.array([t.encode() if isinstance(t, str) else t for t in items], dtype=object).reshape(-1, 1)


def _png(seed: int, size=(40, 30)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_text_requests_match_pipeline_and_fail_alone(pipe):
    reqs = [_texts("a cat", "a dog on a long walk in the park"), _texts(""), _texts("x" * 5000),
            _texts(b"\xff\xfe broken"), _texts("one more text")]
    out = embed_text_requests(pipe.tokenizer, pipe.text_runtime, reqs)
    assert isinstance(out[1], TextInputError) and "empty" in str(out[1])
    assert isinstance(out[2], TextInputError) and "5000 characters" in str(out[2])
    assert isinstance(out[3], TextInputError) and "UTF-8" in str(out[3])
    for r, texts in ((0, ["a cat", "a dog on a long walk in the park"]), (4, ["one more text"])):
        want = pipe.embed_texts(texts)
        got = out[r]
        assert got["TOKENS"].shape == want.tokens.shape          # each request keeps its own padding
        assert np.abs(got["TOKENS"] - want.tokens).max() < 1e-5
        assert np.abs(got["POOLED"] - want.pooled).max() < 1e-5
        assert np.array_equal(got["LENGTHS"][:, 0], want.lengths)


def test_text_requests_chunked_equals_whole(pipe):
    reqs = [_texts(*[f"caption number {i}" for i in range(k)]) for k in (1, 5, 3)]
    a = embed_text_requests(pipe.tokenizer, pipe.text_runtime, reqs, max_batch=2)
    b = embed_text_requests(pipe.tokenizer, pipe.text_runtime, reqs, max_batch=64)
    for x, y in zip(a, b):
        assert np.abs(x["TOKENS"] - y["TOKENS"]).max() < 1e-5


def test_text_limits():
    from filip_engine.serving import decode_texts
    with pytest.raises(TextInputError, match="limit is 2"):
        decode_texts(_texts("a", "b", "c"), ServingLimits(max_items_per_request=2))
    with pytest.raises(TextInputError, match="no texts"):
        decode_texts(np.array([], dtype=object), ServingLimits())


def test_image_requests_fail_alone(pipe):
    good = [_png(0), _png(1, (64, 20))]
    pixels = pipe.transform.batch([_png(2)])
    reqs = [{"IMAGE": np.array(good, dtype=object).reshape(-1, 1)},
            {"IMAGE": np.array([b"not an image"], dtype=object)},
            {"IMAGE": np.array([b""], dtype=object)},
            {"PIXEL_VALUES": pixels},
            {"PIXEL_VALUES": pixels.astype(np.float64)},
            {"PIXEL_VALUES": pixels[:, :, :16]},
            {},
            {"IMAGE": np.array([_png(3)], dtype=object), "PIXEL_VALUES": pixels}]
    out = embed_image_requests(pipe.transform, pipe.image_runtime, reqs, max_batch=2)
    want = pipe.embed_images(good)
    assert np.abs(out[0]["TOKENS"] - want.tokens).max() < 1e-5
    assert np.abs(out[3]["POOLED"] - pipe.embed_images([_png(2)]).pooled).max() < 1e-5
    assert isinstance(out[1], ImageDecodeError) and isinstance(out[2], ImageDecodeError)
    assert "float32" in str(out[4]) and "expected [n, 3, 32, 32]" in str(out[5])
    assert "exactly one" in str(out[6]) and "exactly one" in str(out[7])
    assert out[0]["LENGTHS"].tolist() == [[16], [16]]


def test_score_request_matches_reference():
    rng = np.random.default_rng(0)
    it = rng.standard_normal((3, 16, 8)).astype(np.float32)
    it /= np.linalg.norm(it, axis=-1, keepdims=True)
    tt = rng.standard_normal((2, 9, 8)).astype(np.float32)
    tt /= np.linalg.norm(tt, axis=-1, keepdims=True)
    il, tl = np.array([16, 16, 16], np.int32), np.array([9, 4], np.int32)
    tt[1, 4:] = 0
    out = score_request({"IMAGE_TOKENS": it, "IMAGE_LENGTHS": il, "TEXT_TOKENS": tt, "TEXT_LENGTHS": tl},
                        wanted=["S_I", "S_T", "ALIGNMENT"])
    for i in range(3):
        for j in range(2):
            x, y = it[i, :il[i]].astype(np.float64), tt[j, :tl[j]].astype(np.float64)
            assert abs(out["S_I"][i, j] - s_i_ref(x, y)) < 1e-5
            assert abs(out["S_T"][i, j] - s_t_ref(x, y)) < 1e-5
            assert np.array_equal(out["ALIGNMENT"][i, j], alignment_ref(x, y))


@pytest.mark.parametrize("change, match", [
    ({"IMAGE_TOKENS": None}, "missing \\['IMAGE_TOKENS'\\]"),
    ({"TEXT_LENGTHS": np.array([3], np.int32)}, "1 entries for 2 rows"),
    ({"IMAGE_TOKENS": np.zeros((1, 4, 8), np.int32)}, "dtype int32"),
    ({"TEXT_TOKENS": np.zeros((2, 8), np.float32)}, "expected \\[n, T, D\\]"),
    ({"TEXT_LENGTHS": np.array([3, 9], np.int32)}, "length"),
])
def test_score_request_errors(change, match):
    inputs = {"IMAGE_TOKENS": np.ones((1, 4, 8), np.float32), "IMAGE_LENGTHS": np.array([4], np.int32),
              "TEXT_TOKENS": np.ones((2, 5, 8), np.float32), "TEXT_LENGTHS": np.array([3, 5], np.int32)}
    inputs.update(change)
    err = score_request(inputs)
    assert isinstance(err, InvalidInputError), err
    assert __import__("re").search(match, str(err)), str(err)


def test_score_request_global_is_the_pooled_cosine():
    rng = np.random.default_rng(1)
    ip, tp = rng.standard_normal((3, 6)).astype(np.float32), rng.standard_normal((4, 6)).astype(np.float32)
    out = score_request({"IMAGE_POOLED": ip, "TEXT_POOLED": tp}, wanted=["COSINE"])
    a = ip.astype(np.float64) / np.linalg.norm(ip, axis=1, keepdims=True)
    b = tp.astype(np.float64) / np.linalg.norm(tp, axis=1, keepdims=True)
    assert set(out) == {"COSINE"} and np.abs(out["COSINE"] - a @ b.T).max() < 1e-6
    assert set(score_request({"IMAGE_POOLED": ip, "TEXT_POOLED": tp})) == {"COSINE"}      # none named: what fits
    for inputs, wanted, match in [({"IMAGE_POOLED": ip}, ["COSINE"], "missing \\['TEXT_POOLED'\\]"),
                                  ({"IMAGE_POOLED": ip, "TEXT_POOLED": tp[:, :5]}, ["COSINE"], "dimension 6"),
                                  ({"IMAGE_POOLED": ip, "TEXT_POOLED": tp}, ["S_I"], "token scoring"),
                                  ({}, [], "no inputs"),
                                  ({"IMAGE_POOLED": ip[0], "TEXT_POOLED": tp}, ["COSINE"], "float \\[n, E\\]")]:
        err = score_request(inputs, wanted=wanted)
        assert isinstance(err, InvalidInputError) and __import__("re").search(match, str(err)), str(err)
    limited = score_request({"IMAGE_POOLED": ip, "TEXT_POOLED": tp}, wanted=["COSINE"], limits=ServingLimits(max_score_items=11))
    assert isinstance(limited, InvalidInputError) and "exceed the limit" in str(limited)


def test_endpoints_from_triton_args(tiny_checkpoint, tmp_path, pipe):
    """What each model.py does in initialize/execute, without a server."""
    import json
    from filip_engine.serving import ImageEndpoint, ScoreEndpoint, TextEndpoint, triton_context
    from filip_export.to_trt import main as export_main
    from filip_export.triton_repo import parse_config
    repo = tmp_path / "repo"
    assert export_main([str(tiny_checkpoint), "--out", str(repo)]) == 0

    def args(model):   # what Triton hands initialize(): the parsed config as JSON
        from google.protobuf import json_format
        cfg = parse_config((repo / model / "config.pbtxt").read_text())
        return {"model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
                "model_repository": str(repo / model), "model_version": "1"}

    text = TextEndpoint(*triton_context(args("filip_text")))
    image = ImageEndpoint(*triton_context(args("filip_image")))
    score = ScoreEndpoint(*triton_context(args("filip_score")))
    t = text([_texts("a cat"), _texts("")])
    assert isinstance(t[1], TextInputError)
    assert np.abs(t[0]["POOLED"] - pipe.embed_texts(["a cat"]).pooled).max() < 1e-5
    i = image([{"IMAGE": np.array([_png(0)], dtype=object), "PIXEL_VALUES": None}])
    assert np.abs(i[0]["POOLED"] - pipe.embed_images([_png(0)]).pooled).max() < 1e-5
    inputs = {"IMAGE_TOKENS": i[0]["TOKENS"], "IMAGE_LENGTHS": i[0]["LENGTHS"][:, 0],
              "TEXT_TOKENS": t[0]["TOKENS"], "TEXT_LENGTHS": t[0]["LENGTHS"][:, 0]}
    only_si, everything = score([(inputs, ["S_I"]), (inputs, [])])
    assert set(only_si) == {"S_I"} and set(everything) == {"S_I", "S_T"}


def test_score_request_on_a_torch_device_equals_numpy_path():
    """The device path (the GPU when present) through torch tensors; "cpu:0" exercises it here."""
    rng = np.random.default_rng(3)
    it = rng.standard_normal((3, 5, 8)).astype(np.float32)
    tt = rng.standard_normal((2, 4, 8)).astype(np.float32)
    inputs = {"IMAGE_TOKENS": it, "IMAGE_LENGTHS": np.array([5, 3, 1], np.int32),
              "TEXT_TOKENS": tt, "TEXT_LENGTHS": np.array([4, 2], np.int32)}
    a = score_request(inputs)
    b = score_request(inputs, device="cpu:0")
    assert isinstance(b["S_T"], np.ndarray)
    np.testing.assert_allclose(a["S_I"], b["S_I"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["S_T"], b["S_T"], rtol=0, atol=1e-6)
