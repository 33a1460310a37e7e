"""ONNX export: parity with PyTorch on ONNX Runtime, graph properties, runtime input checks."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest

from filip_engine.checkpoint import random_model
from filip_engine.compare import compare_outputs
from filip_engine.config import PRESETS
from filip_engine.errors import InvalidInputError, ValidationError
from filip_engine.io_spec import FP32_TOLERANCE, Tolerance, tower_spec
from filip_engine.runtime import OnnxRuntime, TorchRuntime
from filip_export.to_onnx import export_tower, validate_tower


@pytest.fixture(scope="module", params=["shared", "dense"])
def exported(request, tmp_path_factory):
    cfg = PRESETS["tiny"]
    if request.param == "dense":  # DeCLIP-style heads: token_dim != embed_dim, text projection with bias
        cfg = replace(cfg, token_head="dense", token_dim=24, text_projection_bias=True,
                      text=replace(cfg.text, vocab_size=49409))
    model = random_model(cfg, seed=11)
    out = tmp_path_factory.mktemp(f"onnx_{request.param}")
    return model, {t: export_tower(model, t, out / f"{t}.onnx") for t in ("image", "text")}


def meta_opset(proto):
    return {p.key: p.value for p in proto.metadata_props}["filip.opset"]


@pytest.mark.parametrize("tower", ["image", "text"])
def test_onnx_parity(exported, tower):
    model, paths = exported
    results = validate_tower(model, paths[tower], tower, batch_sizes=(1, 2, 5, 8))
    assert len(results) == (4 if tower == "image" else 12)
    for r in results:
        print(r.summary())
        assert r.passed, r.summary()
        for o in r.outputs:  # the gates of the issue, stated explicitly
            assert o.max_abs <= 1e-4 and o.min_cosine >= 0.99999


def test_graph_properties(exported):
    model, paths = exported
    cfg = model.config
    for tower, path in paths.items():
        proto = onnx.load(str(path))
        opsets = {o.domain: o.version for o in proto.opset_import}
        assert opsets[""] >= 18 and meta_opset(proto) == str(opsets[""])
        ops = {n.op_type for n in proto.graph.node}
        assert "LayerNormalization" in ops
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["filip.tower"] == tower
        assert json.loads(meta["filip.config"]) == cfg.to_dict()
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
        if tower == "image":
            assert dims == {"pixel_values": ["batch", 3, 32, 32]}
        else:
            assert dims == {"input_ids": ["batch", "seq"], "lengths": ["batch"]}


def test_text_padding_and_batch_invariance_on_onnx(exported):
    """A row's served tokens do not depend on how far the batch is padded."""
    model, paths = exported
    spec = tower_spec(model.config, "text")
    with OnnxRuntime(paths["text"], spec) as rt:
        ids = np.array([[49406 + (model.config.text.vocab_size == 49409), 320, 1929, 0, 49407 + (model.config.text.vocab_size == 49409)]], dtype=np.int64)
        lengths = np.array([5], dtype=np.int64)
        short = rt.infer({"input_ids": ids, "lengths": lengths})
        padded_ids = np.zeros((3, 20), dtype=np.int64)
        padded_ids[1, :5] = ids[0]
        padded_ids[0, :2] = ids[0, [0, 4]]
        padded_ids[2, :20] = 7
        long = rt.infer({"input_ids": padded_ids, "lengths": np.array([2, 5, 20], dtype=np.int64)})
    r = compare_outputs({"tokens": short["tokens"][0], "pooled": short["pooled"][0]},
                        {"tokens": long["tokens"][1, :5], "pooled": long["pooled"][1]}, Tolerance(1e-5, 0.99999))
    assert r.passed, r.summary()
    assert np.all(long["tokens"][1, 5:] == 0)   # zero past the row's length
    assert np.all(long["tokens"][0, 2:] == 0)


@pytest.mark.parametrize("feeds, match", [
    ({"input_ids": np.zeros((2, 5), np.int32), "lengths": np.array([2, 2], np.int64)}, "dtype int32, expected int64"),
    ({"input_ids": np.zeros((2, 5), np.int64)}, "missing \\['lengths'\\]"),
    ({"input_ids": np.zeros((2, 5), np.int64), "lengths": np.array([2, 2, 2], np.int64)}, "'batch' is 2 in one input and 3"),
    ({"input_ids": np.zeros((2, 78), np.int64), "lengths": np.array([2, 2], np.int64)}, "allowed 2..77"),
    ({"input_ids": np.zeros((2, 5), np.int64), "lengths": np.array([2, 6], np.int64)}, "every length must lie in \\[2, 5\\]"),
    ({"input_ids": np.full((1, 5), 49408, np.int64), "lengths": np.array([5], np.int64)}, "ids must lie in \\[0, 49408\\)"),
    ({"input_ids": np.zeros((5,), np.int64), "lengths": np.array([2], np.int64)}, "has 1 dims, expected 2"),
])
def test_runtime_input_checks(feeds, match):
    cfg = PRESETS["tiny"]
    rt = TorchRuntime(random_model(cfg), tower_spec(cfg, "text"))
    with pytest.raises(InvalidInputError, match=match):
        rt.infer(feeds)


def test_image_input_checks():
    cfg = PRESETS["tiny"]
    rt = TorchRuntime(random_model(cfg), tower_spec(cfg, "image"))
    with pytest.raises(InvalidInputError, match="axis 2 must be 32"):
        rt.infer({"pixel_values": np.zeros((1, 3, 31, 32), np.float32)})
    with pytest.raises(InvalidInputError, match="dtype float64"):
        rt.infer({"pixel_values": np.zeros((1, 3, 32, 32))})


def test_compare_helper_catches_errors():
    ref = {"tokens": np.ones((2, 3, 4), np.float32), "pooled": np.ones((2, 4), np.float32)}
    bad = {"tokens": ref["tokens"] + np.float32(2e-4), "pooled": -ref["pooled"]}
    r = compare_outputs(ref, bad, FP32_TOLERANCE, "synthetic")
    assert not r.passed
    assert [o.passed for o in r.outputs] == [False, False]
    assert "max abs error" in r.outputs[0].failures[0]
    assert any("min cosine" in f for f in r.outputs[1].failures)
    with pytest.raises(ValidationError, match="synthetic: numerics gate failed: tokens"):
        r.raise_if_failed()
    shape = compare_outputs(ref, {"tokens": ref["tokens"][:1], "pooled": ref["pooled"]}, FP32_TOLERANCE)
    assert "shape" in shape.outputs[0].failures[0]
    missing = compare_outputs(ref, {"tokens": ref["tokens"]}, FP32_TOLERANCE)
    assert missing.outputs[1].failures == ("missing from candidate",)
    nan = compare_outputs(ref, {"tokens": ref["tokens"] * np.nan, "pooled": ref["pooled"]}, FP32_TOLERANCE)
    assert not nan.passed


@pytest.mark.gpu
def test_torch_cuda_matches_cpu():
    """The PyTorch reference on CUDA (TF32 off) agrees with the CPU run under the fp32 gates."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = PRESETS["tiny"]
    model = random_model(cfg, seed=1)
    spec = tower_spec(cfg, "image")
    feeds = {"pixel_values": np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)}
    cpu = TorchRuntime(random_model(cfg, seed=1), spec).infer(feeds)
    with TorchRuntime(model, spec, device="cuda") as gpu:
        r = compare_outputs(cpu, gpu.infer(feeds), FP32_TOLERANCE, "torch cuda vs cpu")
    assert r.passed, r.summary()
