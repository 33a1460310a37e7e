"""A TensorRT-mode repository served by the real tritonserver, on CPU.

``write_repository`` with a :class:`TensorRTPlans` (placeholder plan files) generates the
repository a GPU export writes: ``filip_text`` / ``filip_image`` forwarding to
``filip_text_trt`` / ``filip_image_trt`` through BLS.  Each ``filip_*_trt`` tensorrt_plan
model is then replaced by a Python-backend stand-in with exactly the generated I/O block
(inputs, outputs, dims, reshape, max_batch_size, dynamic batching, warm-up and its files:
only ``backend: "python"`` instead of ``platform: "tensorrt_plan"``, KIND_CPU, and no plan
file names) that runs the same ONNX on ONNX Runtime and checks every tensor it receives
against the engine's own input spec (what TensorRT would be handed after Triton's reshape).

This is what caught, before any GPU: the front ends' warm-ups BLS-calling the plan models
while the server was still loading ("Server not ready": the load fails and tritonserver
exits), and ``lengths`` sent as [b] where the generated config declares dims [1] (every text
request and every search refused).  The answers must equal the ONNX Runtime repository's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpc
from PIL import Image

from filip_client import FilipClient
from filip_engine.artifacts import read_manifest
from filip_engine.checkpoint import load_checkpoint
from filip_export.launch import TritonServer
from filip_export.to_trt import main as export_main
from filip_export.triton_repo import (TRT_MODELS, RepoSettings, TensorRTPlans, config_text, model_configs, parse_config,
                                      write_repository)
from tritonclient.grpc import model_config_pb2 as mc

ROOT = Path(__file__).resolve().parent.parent
MAX_BATCH = 8
TEXTS = ["a photo of a cat", "two dogs playing in the snow", "!", "word " * 90, "中文 caption 🐱"]

# The stand-in for a tensorrt_plan model: the front end's ONNX on ONNX Runtime, with the
# tensors TensorRT would get (after Triton's reshape) checked against the tower's spec.
STAND_IN = '''"""Python-backend stand-in for a tensorrt_plan model (tests/test_served_trt.py)."""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from filip_engine.artifacts import read_manifest
from filip_engine.io_spec import tower_spec
from filip_engine.runtime import OnnxRuntime

TOWER = {tower!r}


class TritonPythonModel:
    def initialize(self, args):
        front = Path(args["model_repository"]).parent / ("filip_" + TOWER) / "1"
        cfg, _ = read_manifest(front)
        config = json.loads(args["model_config"])
        self.spec = tower_spec(cfg, TOWER, int(config["max_batch_size"]))
        self.runtime = OnnxRuntime(front / (TOWER + ".onnx"), self.spec, intra_op_threads=2)
        self.calls = 0

    def execute(self, requests):
        responses = []
        for r in requests:
            feeds = {{t.name: pb_utils.get_input_tensor_by_name(r, t.name).as_numpy() for t in self.spec.inputs}}
            try:
                # exactly what the engine takes: [batch] lengths, [batch, seq] ids, [batch, 3, S, S] pixels
                out = self.runtime.infer(feeds)
            except Exception as e:  # noqa: BLE001
                shapes = {{k: list(v.shape) for k, v in feeds.items()}}
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"stand-in got {{shapes}}: {{e}}")))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in out.items()]))
        return responses
'''


def _plans() -> TensorRTPlans:
    return TensorRTPlans(files={t: {"9.0": "model.sm90.plan", "8.0": "model.sm80.plan"} for t in TRT_MODELS},
                         default={t: "model.sm90.plan" for t in TRT_MODELS})


def stand_in_config(generated: mc.ModelConfig) -> mc.ModelConfig:
    """The generated tensorrt_plan config with only what makes it a Python model changed."""
    c = mc.ModelConfig()
    c.CopyFrom(generated)
    c.ClearField("platform")
    c.ClearField("default_model_filename")
    c.ClearField("cc_model_filenames")
    c.backend = "python"
    for g in c.instance_group:
        g.kind = mc.ModelInstanceGroup.KIND_CPU
    return c


def make_trt_mode_repository(cpu_repo, out, ckpt) -> dict[str, mc.ModelConfig]:
    """A copy of the ONNX Runtime repository ``cpu_repo`` rewritten in TensorRT mode, the plan
    models replaced by Python stand-ins; returns the generated (tensorrt_plan) configs."""
    shutil.copytree(cpu_repo, out)
    cfg, manifest = read_manifest(out / "filip_text" / "1")
    model = load_checkpoint(ckpt).model
    settings = RepoSettings(max_batch=MAX_BATCH)
    # the CPU part of the repository is what the exporter wrote
    for name, config in model_configs(cfg, settings, model.similarity_scale(), manifest.get("default_scoring", "token")).items():
        assert (cpu_repo / name / "config.pbtxt").read_text() == config_text(config), name
    write_repository(out, cfg, logit_scale=model.similarity_scale(), default_scoring=manifest.get("default_scoring", "token"),
                     settings=settings, tensorrt=_plans())
    generated = {}
    for tower, name in TRT_MODELS.items():
        generated[name] = parse_config((out / name / "config.pbtxt").read_text())
        assert generated[name].platform == "tensorrt_plan"
        for f in ("model.sm90.plan", "model.sm80.plan"):
            (out / name / "1" / f).write_bytes(b"placeholder plan")
        (out / name / "config.pbtxt").write_text(config_text(stand_in_config(generated[name])))
        (out / name / "1" / "model.py").write_text(STAND_IN.format(tower=tower))
    return generated


def _images(base, n=9):
    d = base / "photos"
    d.mkdir()
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (30 + 3 * i, 40, 3), dtype=np.uint8)).save(d / f"p{i}.png")
    return d


@pytest.fixture(scope="module")
def repos(tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("served-trt")
    cpu = base / "cpu_repo"
    assert export_main([str(tiny_checkpoint), "--out", str(cpu), "--max-batch", str(MAX_BATCH)]) == 0
    trt = base / "trt_repo"
    generated = make_trt_mode_repository(cpu, trt, tiny_checkpoint)
    return base, cpu, trt, generated


def test_generated_configs_are_servable_as_written(repos):
    """The front ends forward and do not warm up; the plan models warm up with lengths >= 2
    and declare [batch]-only tensors as dims [1] reshaped to []."""
    _, _, trt, generated = repos
    for tower, name in TRT_MODELS.items():
        front = parse_config((trt / f"filip_{tower}" / "config.pbtxt").read_text())
        assert front.parameters["trt_model"].string_value == name and not front.model_warmup
        plan = generated[name]
        assert len(plan.model_warmup) == 1 and plan.max_batch_size == MAX_BATCH
    text = generated["filip_text_trt"]
    lengths = next(i for i in text.input if i.name == "lengths")
    assert list(lengths.dims) == [1] and lengths.HasField("reshape") and list(lengths.reshape.shape) == []
    w = text.model_warmup[0].inputs
    assert list(w["lengths"].dims) == [1] and w["lengths"].input_data_file == "lengths.bin"
    raw = np.frombuffer((trt / "filip_text_trt" / "warmup" / "lengths.bin").read_bytes(), "<i8")
    assert raw.tolist() == [2] and list(w["input_ids"].dims) == [16] and w["input_ids"].zero_data


def test_trt_mode_repository_serves_what_onnxruntime_serves(repos):
    base, cpu, trt, _ = repos
    photos = _images(base)
    answers = {}
    for label, repo in (("cpu", cpu), ("trt", trt)):
        with TritonServer(repo, ready_timeout=180) as server, FilipClient(server.url, timeout=60) as c:
            h = c.health(deep=True)
            assert h.ok, str(h.canaries)
            # the image's HEALTHCHECK (the deep probe over gRPC) passes against this server
            probe = subprocess.run([str(ROOT / "docker" / "healthcheck.sh")], capture_output=True, text=True, timeout=60,
                                   env={**os.environ, "PYTHON": sys.executable, "FILIP_GRPC_PORT": str(server.grpc_port)})
            assert probe.returncode == 0 and probe.stdout.strip() == "ok", probe.stdout + probe.stderr
            models = set(c.health().models)
            assert models >= {"filip_text", "filip_image", "filip_score", "filip_search"}
            with grpc.InferenceServerClient(server.url) as raw:      # every model, the plan stand-ins too
                index = {m.name: m.state for m in raw.get_model_repository_index().models}
                assert all(state == "READY" for state in index.values()) and len(index) == (6 if label == "trt" else 4), index
            txt = c.embed_texts(TEXTS)
            img = c.embed_images([str(p) for p in sorted(photos.glob("*.png"))])
            scores = (c.score(img, txt), c.score(img, txt, direction="t2i"))
            gallery = base / "galleries" / f"g_{label}"
            c.index_images(photos, gallery, progress=False)
            c.reload_gallery(f"g_{label}")
            hits = c.search(TEXTS[:3], k=4)
            two = c.search(TEXTS[:3], k=4, mode="two_stage", candidates=9)
            answers[label] = (txt, img, scores, hits, two)
            assert server.proc.poll() is None
    (t0, i0, s0, h0, w0), (t1, i1, s1, h1, w1) = answers["cpu"], answers["trt"]
    assert np.array_equal(t0.lengths, t1.lengths) and np.array_equal(i0.lengths, i1.lengths)
    for a, b in ((t0.tokens, t1.tokens), (t0.pooled, t1.pooled), (i0.tokens, i1.tokens), (i0.pooled, i1.pooled),
                 (s0[0], s1[0]), (s0[1], s1[1])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    for hits_a, hits_b in ((h0, h1), (w0, w1)):
        assert [[x.id for x in h] for h in hits_a] == [[x.id for x in h] for h in hits_b]
        np.testing.assert_allclose([[x.score for x in h] for h in hits_a], [[x.score for x in h] for h in hits_b],
                                   rtol=0, atol=1e-5)
