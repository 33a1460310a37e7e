"""In-process pipeline: ONNX Runtime artifacts vs the PyTorch checkpoint, batching invariance, classify."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from filip_engine.compare import compare_outputs
from filip_engine.errors import InvalidInputError, TextInputError
from filip_engine.interaction import build_prompts
from filip_engine.io_spec import FP32_TOLERANCE
from filip_engine.pipeline import FilipPipeline
from filip_export.to_trt import main as export_main

TEXTS = ["a photo of a cat", "two dogs playing in the snow, 4k", "!", "中文 caption with émojis 🐱🐶",
         "word " * 100]


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    assert export_main([str(tiny_checkpoint), "--out", str(out)]) == 0
    return FilipPipeline.from_checkpoint(tiny_checkpoint), FilipPipeline.from_repository(out)


def _images():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    pil = Image.fromarray(rng.integers(0, 256, (64, 40, 3), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return [arr, pil, buf.getvalue()]


def test_onnx_pipeline_equals_pytorch(pipes):
    ref, onnx = pipes
    for a, b in ((ref.embed_images(_images()), onnx.embed_images(_images())),
                 (ref.embed_texts(TEXTS), onnx.embed_texts(TEXTS))):
        assert np.array_equal(a.lengths, b.lengths)
        r = compare_outputs({"tokens": a.tokens, "pooled": a.pooled}, {"tokens": b.tokens, "pooled": b.pooled}, FP32_TOLERANCE)
        assert r.passed, r.summary()
    assert onnx.logit_scale == pytest.approx(ref.logit_scale)


def test_embeddings_contract(pipes):
    _, pipe = pipes
    txt = pipe.embed_texts(TEXTS)
    assert txt.tokens.dtype == np.float32 and txt.lengths.dtype == np.int32 and txt.pooled.dtype == np.float32
    assert txt.lengths[-1] == 77 and txt.tokens.shape == (5, 77, 32)
    for i, n in enumerate(txt.lengths):
        assert np.allclose(np.linalg.norm(txt.tokens[i, :n], axis=-1), 1, atol=1e-5)
        assert np.all(txt.tokens[i, n:] == 0)
    img = pipe.embed_images(_images())
    assert img.tokens.shape == (3, 16, 32) and np.all(img.lengths == 16)
    assert np.allclose(np.linalg.norm(img.pooled, axis=-1), 1, atol=1e-5)


def test_batching_invariance(pipes):
    _, pipe = pipes
    whole = pipe.embed_texts(TEXTS, batch_size=64)
    ones = pipe.embed_texts(TEXTS, batch_size=1)
    assert np.array_equal(whole.lengths, ones.lengths)
    assert np.abs(whole.tokens - ones.tokens).max() < 1e-5 and np.abs(whole.pooled - ones.pooled).max() < 1e-5
    a, b = pipe.embed_images(_images(), batch_size=3), pipe.embed_images(_images(), batch_size=1)
    assert np.abs(a.tokens - b.tokens).max() < 1e-5


def test_classify_is_mean_of_s_i_over_templates(pipes):
    _, pipe = pipes
    img = pipe.embed_images(_images())
    labels, templates = ["cat", "dog", "car"], ("a photo of a {}.", "a drawing of a {}.")
    got = pipe.classify(img, labels, templates=templates)
    s = pipe.score(img, pipe.embed_texts(build_prompts(labels, templates)))   # [n_img, C*T], class-major
    want = s.reshape(len(img), len(labels), len(templates)).mean(-1)
    assert np.allclose(got, want, atol=1e-6)
    assert pipe.alignment(img, pipe.embed_texts(["a cat"])).shape == (4, 4)


@pytest.mark.parametrize("bad", [[], "a string", None])
def test_bad_inputs(pipes, bad):
    _, pipe = pipes
    with pytest.raises(InvalidInputError):
        pipe.embed_texts(bad)
    with pytest.raises(InvalidInputError):
        pipe.embed_images(bad)


def test_empty_text_rejected(pipes):
    with pytest.raises(TextInputError):
        pipes[1].embed_texts(["fine", ""])
