"""TensorRT stage: the pure decisions (profiles, builder flags, naming, sidecars, plan matching,
tensorrt_plan configs, gates) run everywhere; building and running engines needs an NVIDIA
GPU with TensorRT (marker `gpu`, skipped with a stated reason elsewhere)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from filip_engine.compare import compare_outputs
from filip_engine.config import PRESETS
from filip_engine.errors import ExportError, ValidationError
from filip_engine.io_spec import tower_spec
from filip_export import trt as T
from filip_export.triton_repo import (RepoSettings, TensorRTPlans, config_text, model_configs, parse_config, tensorrt_config,
                                     tensorrt_configs, write_repository)

ROOT = Path(__file__).resolve().parent.parent
CFG = PRESETS["ViT-B-32"]


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
        return True
    except ImportError:
        return False


# --- profiles -------------------------------------------------------------------------------
def test_profiles_image_and_text():
    img = T.optimisation_profile(tower_spec(CFG, "image", 64), 64)
    assert img == (T.InputProfile("pixel_values", (1, 3, 224, 224), (16, 3, 224, 224), (64, 3, 224, 224)),)
    ids, lengths = T.optimisation_profile(tower_spec(CFG, "text", 64), 64)
    assert ids == T.InputProfile("input_ids", (1, 2), (16, 16), (64, 77))
    assert lengths == T.InputProfile("lengths", (1,), (16,), (64,))


@pytest.mark.parametrize("max_batch, opt", [(1, 1), (4, 4), (16, 16), (1024, 16)])
def test_profile_opt_batch_is_clamped(max_batch, opt):
    (p,) = T.optimisation_profile(tower_spec(CFG, "image", max_batch), max_batch)
    assert p.min[0] == 1 and p.opt[0] == opt and p.max[0] == max_batch
    assert all(a <= b <= c for a, b, c in zip(p.min, p.opt, p.max))


def test_profile_seq_clamped_to_context_and_bad_batch():
    cfg = PRESETS["tiny"]
    ids, _ = T.optimisation_profile(tower_spec(cfg, "text", 8), 8, opt_seq=500)
    assert ids.opt == (8, cfg.text.context_length) and ids.max == (8, cfg.text.context_length)
    with pytest.raises(ExportError, match="at least 1"):
        T.optimisation_profile(tower_spec(cfg, "image", 8), 0)


# --- builder flags ---------------------------------------------------------------------------
def test_flags_fp16_on_trt10_pins_norm_and_softmax():
    """D7: the pins are preferred, not obeyed (OBEY with blanket fp32 pins can leave a layer
    without a conforming tactic and fail the build); "obey" stays available to try."""
    f = T.build_flags("fp16", "10.7.0")
    assert f.fp16 and f.prefer_precision_constraints and not f.obey_precision_constraints and not f.strongly_typed
    assert {"NORMALIZATION", "SOFTMAX"} <= set(f.fp32_layer_types)
    o = T.build_flags("fp16", "10.7.0", "obey")
    assert o.obey_precision_constraints and not o.prefer_precision_constraints
    with pytest.raises(ExportError, match="prefer or obey"):
        T.build_flags("fp16", "10.7.0", "sometimes")


def test_timing_cache_per_architecture_and_tensorrt_version():
    """D6: one cache per GPU architecture and TensorRT version (never loaded with ignore_mismatch)."""
    base = Path("/ckpt/.filip/trt_timing.cache")
    a = T.timing_cache_path(base, (9, 0), "10.7.0.23")
    assert a == Path("/ckpt/.filip/trt_timing.sm90.trt10.7.0.23.cache")
    assert len({a, T.timing_cache_path(base, (8, 0), "10.7.0.23"), T.timing_cache_path(base, (9, 0), "10.8.0.1")}) == 3
    src = (ROOT / "export" / "trt.py").read_text()
    assert "ignore_mismatch=True)" not in src and "PREFER_PRECISION_CONSTRAINTS" in src


def test_gpu_detection_needs_no_torch(monkeypatch):
    """D3: GPUs come from the driver (NVML / nvidia-smi), not torch; CUDA_VISIBLE_DEVICES is honoured."""
    from filip_engine import gpu as G
    smi = "0, NVIDIA H200, 9.0, GPU-aaaa\n1, NVIDIA A100-SXM4-80GB, 8.0, GPU-bbbb\n2, NVIDIA H200, 9.0, GPU-cccc\nbad line\n"
    gpus = G.parse_nvidia_smi(smi)
    assert [(g.index, g.sm, g.uuid) for g in gpus] == [(0, "sm90", "GPU-aaaa"), (1, "sm80", "GPU-bbbb"), (2, "sm90", "GPU-cccc")]
    assert [g.uuid for g in G.distinct_architectures(gpus)] == ["GPU-aaaa", "GPU-bbbb"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,2")
    assert [g.index for g in G._visible(gpus)] == [1, 2]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert G._visible(gpus) == []
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; sys.modules['pynvml'] = None; "
                        "import filip_engine.gpu as g, filip_export.trt, filip_engine.serving as s; "
                        "print(g.list_gpus(), s._cuda_visible())"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[] False", r.stderr      # this machine: no GPU, no torch needed


def test_check_every_architecture(tmp_path, monkeypatch, capsys):
    """Plans for each GPU architecture present: `missing` names one GPU per architecture without plans."""
    repo = _fake_repo(tmp_path)                                  # sm90 plans only
    found = {"tensorrt_version": "10.7.0", "gpu_name": "NVIDIA H200", "compute_capability": (9, 0),
             "gpus": [{"uuid": "GPU-a", "name": "H200", "compute_capability": "9.0"},
                      {"uuid": "GPU-b", "name": "A100", "compute_capability": "8.0"},
                      {"uuid": "GPU-c", "name": "A100", "compute_capability": "8.0"}]}
    monkeypatch.setattr(T, "detect_environment", lambda: found)
    assert T.main(["missing", str(repo)]) == 0 and capsys.readouterr().out.split() == ["GPU-b"]
    assert T.main(["check", str(repo)]) == 3
    assert "model.sm80.plan" in capsys.readouterr().out
    found["gpus"] = found["gpus"][:1]
    assert T.main(["check", str(repo)]) == 0 and capsys.readouterr().out.startswith("ok: ")
    assert T.main(["missing", str(repo)]) == 0 and capsys.readouterr().out.strip() == ""


@pytest.mark.parametrize("version", ["10.7.0", "10.16.1.11", "11.4.0.106"])
def test_flags_fp32_is_plain_fp32(version):
    f = T.build_flags("fp32", version)
    assert not f.fp16 and not f.tf32 and not f.obey_precision_constraints and not f.prefer_precision_constraints
    assert f.fp32_layer_types == ()
    assert f.strongly_typed == version.startswith("11")


@pytest.mark.parametrize("precision, version, match", [("fp16", "11.4.0.106", "TensorRT 11 removed"),
                                                       ("fp32", "8.6.1", "too old"),
                                                       ("int8", "10.7.0", "fp32 or fp16"),
                                                       ("fp32", "garbage", "cannot read")])
def test_flags_refused(precision, version, match):
    with pytest.raises(ExportError, match=match):
        T.build_flags(precision, version)


# --- naming, sidecar, matching ------------------------------------------------------------------
def _sidecar(**kw):
    args = dict(tower="image", precision="fp16", trt_version="10.7.0", gpu_name="NVIDIA H200",
                compute_capability=(9, 0), profiles=T.optimisation_profile(tower_spec(CFG, "image", 64), 64),
                flags=T.build_flags("fp16", "10.7.0"), max_batch=64, checkpoint={"name": "c.pt", "bytes": 1, "mtime_ns": 2})
    args.update(kw)
    return json.loads(json.dumps(T.sidecar_content(**args)))   # as read back from disk


def test_names():
    assert T.plan_filename((9, 0)) == "model.sm90.plan" and T.plan_filename((12, 0)) == "model.sm120.plan"
    assert T.cc_key((8, 6)) == "8.6"
    assert T.sidecar_path("/r/m/1/model.sm90.plan") == Path("/r/m/1/model.sm90.plan.json")


def test_sidecar_content():
    s = _sidecar()
    assert s["tensorrt_version"] == "10.7.0" and s["compute_capability"] == "9.0" and s["gpu_name"] == "NVIDIA H200"
    assert s["precision"] == "fp16" and s["plan"] == "model.sm90.plan" and s["max_batch"] == 64
    assert s["profiles"] == [{"input": "pixel_values", "min": [1, 3, 224, 224], "opt": [16, 3, 224, 224], "max": [64, 3, 224, 224]}]
    assert s["builder_flags"]["fp16"] is True and "NORMALIZATION" in s["builder_flags"]["fp32_layer_types"]


@pytest.mark.parametrize("change, ok, why", [
    ({}, True, "matches"),
    ({"trt_version": "10.8.0"}, False, "TensorRT version"),
    ({"cc": (8, 0)}, False, "compute capability"),
    ({"precision": "fp32"}, False, "precision"),
    ({"max_batch": 32}, False, "max batch"),
    ({"checkpoint": {"name": "other.pt", "bytes": 1, "mtime_ns": 2}}, False, "checkpoint"),
])
def test_plan_matches(change, ok, why):
    want = dict(trt_version="10.7.0", compute_capability=change.get("cc", (9, 0)), precision=change.get("precision", "fp16"),
                max_batch=change.get("max_batch", 64), checkpoint=change.get("checkpoint", {"name": "c.pt", "bytes": 1, "mtime_ns": 2}))
    if "trt_version" in change:
        want["trt_version"] = change["trt_version"]
    got, reason = T.plan_matches(_sidecar(), **want)
    assert got is ok and why in reason


def test_plan_matches_ignores_what_is_not_asked_and_old_sidecars():
    assert T.plan_matches(_sidecar(), trt_version="10.7.0", compute_capability=(9, 0))[0]
    assert not T.plan_matches({**_sidecar(), "sidecar_version": 0}, trt_version="10.7.0", compute_capability=(9, 0))[0]


def _fake_repo(tmp_path, cc=(9, 0), version="10.7.0"):
    for tower, model in T.TRT_MODELS.items():
        d = tmp_path / model / "1"
        d.mkdir(parents=True)
        (tmp_path / model / "config.pbtxt").write_text("x")
        plan = d / T.plan_filename(cc)
        plan.write_bytes(b"plan")
        T.sidecar_path(plan).write_text(json.dumps(_sidecar(tower=tower, compute_capability=cc, trt_version=version)))
    return tmp_path


def test_repository_plans_status(tmp_path):
    repo = _fake_repo(tmp_path)
    assert T.repository_plans_status(repo, trt_version="10.7.0", compute_capability=(9, 0))[0]
    ok, why = T.repository_plans_status(repo, trt_version="10.7.0", compute_capability=(8, 9))
    assert not ok and "model.sm89.plan" in why                       # another GPU: no plan for it yet
    ok, why = T.repository_plans_status(repo, trt_version="10.8.0", compute_capability=(9, 0))
    assert not ok and "TensorRT version" in why                      # the image was upgraded
    (repo / "filip_text_trt" / "1" / "model.sm90.plan").unlink()
    assert not T.repository_plans_status(repo, trt_version="10.7.0", compute_capability=(9, 0))[0]
    assert not T.repository_plans_status(tmp_path / "empty", trt_version="10.7.0", compute_capability=(9, 0))[0]


def test_plans_in_lists_every_architecture(tmp_path):
    d = tmp_path / "v"
    d.mkdir()
    for cc in ((8, 0), (9, 0)):
        (d / T.plan_filename(cc)).write_bytes(b"p")
        T.sidecar_path(d / T.plan_filename(cc)).write_text(json.dumps(_sidecar(compute_capability=cc)))
    (d / "model.sm75.plan.json").write_text("{}")                     # sidecar without a plan: ignored
    assert T.plans_in(d) == {"8.0": "model.sm80.plan", "9.0": "model.sm90.plan"}


# --- tensorrt_plan configs --------------------------------------------------------------------
def _io(entries) -> dict:
    return {e.name: (mc.DataType.Name(e.data_type), list(e.dims), e.HasField("reshape") and list(e.reshape.shape))
            for e in entries}


def test_tensorrt_config_text():
    s = RepoSettings(max_batch=64)
    config = tensorrt_config("filip_text_trt", tower_spec(CFG, "text", 64), s,
                             {"9.0": "model.sm90.plan", "8.0": "model.sm80.plan"}, "model.sm90.plan")
    text = config_text(config)
    c = parse_config(text)                                   # the written text parses back to the same config
    assert c == config
    assert (c.name, c.platform, c.max_batch_size, c.default_model_filename) == (
        "filip_text_trt", "tensorrt_plan", 64, "model.sm90.plan")
    assert dict(c.cc_model_filenames) == {"8.0": "model.sm80.plan", "9.0": "model.sm90.plan"}
    assert _io(c.input) == {"input_ids": ("TYPE_INT64", [-1], False), "lengths": ("TYPE_INT64", [1], [])}
    assert _io(c.output) == {"tokens": ("TYPE_FP32", [-1, 256], False), "pooled": ("TYPE_FP32", [256], False)}
    assert [g.kind for g in c.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert c.dynamic_batching.max_queue_delay_microseconds == 500 and not c.backend
    image = tensorrt_config("filip_image_trt", tower_spec(CFG, "image", 64), s, {"9.0": "model.sm90.plan"}, "model.sm90.plan")
    assert _io(image.input) == {"pixel_values": ("TYPE_FP32", [3, 224, 224], False)}
    assert _io(image.output)["tokens"] == ("TYPE_FP32", [49, 256], False)


def test_tensorrt_configs_only_add_to_the_cpu_configs():
    s = RepoSettings()
    base = model_configs(CFG, s, 100.0)
    before = {k: config_text(v) for k, v in base.items()}
    plans = TensorRTPlans(files={"text": {"9.0": "model.sm90.plan"}, "image": {"9.0": "model.sm90.plan"}},
                          default={"text": "model.sm90.plan", "image": "model.sm90.plan"})
    extra = tensorrt_configs(CFG, s, plans, base)
    assert set(extra) == {"filip_text", "filip_image", "filip_text_trt", "filip_image_trt"}
    for front, model in (("filip_text", "filip_text_trt"), ("filip_image", "filip_image_trt")):
        expected = mc.ModelConfig()
        expected.CopyFrom(base[front])
        expected.parameters["trt_model"].string_value = model
        del expected.model_warmup[:]       # a front end would BLS-call the plan model during load (D1)
        assert extra[front] == expected
    assert {k: config_text(v) for k, v in base.items()} == before   # not mutated


def test_write_repository_cpu_path_unchanged_and_trt_models(tmp_path):
    """Without plans the repository is exactly what model_configs says (no TensorRT model);
    with plans the tensorrt_plan models get a config and no model.py adapter."""
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    names = [p.name for p in write_repository(cpu, CFG, logit_scale=100.0)]
    assert not any(n.endswith("_trt") for n in names)
    for name, config in model_configs(CFG, RepoSettings(), 100.0).items():
        assert (cpu / name / "config.pbtxt").read_text() == config_text(config)
    plans = TensorRTPlans(files={"text": {"9.0": "model.sm90.plan"}, "image": {"9.0": "model.sm90.plan"}},
                          default={"text": "model.sm90.plan", "image": "model.sm90.plan"})
    names = [p.name for p in write_repository(gpu, CFG, logit_scale=100.0, tensorrt=plans)]
    assert names[-2:] == ["filip_text_trt", "filip_image_trt"]
    assert parse_config((gpu / "filip_text_trt" / "config.pbtxt").read_text()).platform == "tensorrt_plan"
    assert not (gpu / "filip_text_trt" / "1" / "model.py").exists()
    assert parse_config((gpu / "filip_text" / "config.pbtxt").read_text()).parameters["trt_model"].string_value == "filip_text_trt"
    assert (gpu / "filip_score" / "config.pbtxt").read_text() == (cpu / "filip_score" / "config.pbtxt").read_text()


# --- gates ---------------------------------------------------------------------------------
def test_topk_agreement():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((16, 64))
    r = T.topk_agreement(ref, ref + 1e-9)
    assert r.passed and r.mean_overlap == 1.0 and r.k == 10 and r.n_queries == 16 and r.n_items == 64
    r = T.topk_agreement(ref, rng.standard_normal((16, 64)))
    assert not r.passed and r.mean_overlap < 0.5 and "FAIL" in r.line()
    assert T.topk_agreement(ref[:, :4], ref[:, :4]).k == 4           # fewer items than k
    with pytest.raises(ValueError):
        T.topk_agreement(ref, ref[:, :3])


def _case(noise: float, label: str):
    rng = np.random.default_rng(1)
    tok = rng.standard_normal((4, 49, 256)).astype(np.float32)
    tok /= np.linalg.norm(tok, axis=-1, keepdims=True)
    cand = tok + noise * rng.standard_normal(tok.shape).astype(np.float32)
    return compare_outputs({"tokens": tok}, {"tokens": cand}, T.engine_tolerance("fp16" if "fp16" in label else "fp32"), label)


def test_gates_pass_and_fail_loudly():
    ok = [_case(1e-5, "fp32 image"), _case(1e-3, "fp16 image")]
    assert T.gate_failures(ok) == []
    T.raise_if_gates_failed(ok, T.topk_agreement(np.eye(12), np.eye(12)))
    bad32 = _case(2e-3, "fp32 image")           # cosine ~0.999: enough for fp16, not for fp32
    assert not bad32.passed and bad32.outputs[0].min_cosine < 0.9999
    with pytest.raises(ValidationError, match=r"fp32 image: tokens: .*min cosine 0\.99\d+ < 0\.9999"):
        T.raise_if_gates_failed([ok[0], bad32])
    rng = np.random.default_rng(2)
    bad_rank = T.topk_agreement(rng.standard_normal((8, 64)), rng.standard_normal((8, 64)))
    with pytest.raises(ValidationError, match="top-10 agreement"):
        T.raise_if_gates_failed(ok, bad_rank)
    assert T.TRT_FP32_TOLERANCE.min_cosine == 0.9999 and T.TRT_FP16_TOLERANCE.min_cosine == 0.999


# --- without TensorRT / GPU -------------------------------------------------------------------
def test_runtime_module_imports_without_tensorrt():
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['tensorrt'] = None; import filip_engine.runtime as r; "
                        "print(r.TensorRTRuntime.__name__)"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "TensorRTRuntime" in r.stdout, r.stderr


def test_tensorrt_runtime_fails_with_one_clear_error(tmp_path):
    from filip_engine.runtime import TensorRTRuntime
    if _has_tensorrt() and __import__("torch").cuda.is_available():
        pytest.skip("TensorRT and a GPU are present: covered by the gpu tests")
    with pytest.raises(ExportError, match="TensorRT is not installed|no CUDA device"):
        TensorRTRuntime(tmp_path / "x.plan", tower_spec(CFG, "image"))


def test_check_cli_without_gpu_or_tensorrt(tmp_path):
    if _has_tensorrt() and __import__("torch").cuda.is_available():
        pytest.skip("TensorRT and a GPU are present")
    r = subprocess.run([sys.executable, "-m", "export.trt", "check", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _fake_pb(config: mc.ModelConfig, tokens_width=None):
    """A fake triton_python_backend_utils whose InferenceRequest checks every input against the
    generated tensorrt_plan config as Triton does: [batch] + dims (-1 any), batch <= max_batch,
    the declared dtype; outputs shaped as the config declares them."""
    declared = {i.name: i for i in config.input}
    np_types = {mc.TYPE_FP32: np.float32, mc.TYPE_INT64: np.int64}

    class Tensor:
        def __init__(self, name, a):
            self.name, self.a = name, a

        def as_numpy(self):
            return self.a

        def is_cpu(self):
            return True

    class Response:
        def __init__(self, outs):
            self.outs = outs

        def has_error(self):
            return False

    class Request:
        def __init__(self, model_name, inputs, requested_output_names, preferred_memory=None):
            assert model_name == config.name
            self.inputs, self.names = inputs, requested_output_names

        def exec(self):
            got = {t.name: t.a for t in self.inputs}
            assert set(got) == set(declared), (set(got), set(declared))
            n = None
            for name, a in got.items():
                want = [-1] + list(declared[name].dims)
                assert a.ndim == len(want) and all(w in (-1, g) for w, g in zip(want, a.shape)), \
                    f"unexpected shape for input '{name}': expected {want}, got {list(a.shape)}"
                assert a.dtype == np_types[declared[name].data_type], (name, a.dtype)
                assert n in (None, a.shape[0]) and a.shape[0] <= config.max_batch_size
                n = a.shape[0]
            outs = {}
            for o in config.output:
                dims = [tokens_width if d == -1 else d for d in o.dims]
                outs[o.name] = np.ones((n, *dims), np.float32)
            return Response(outs)

    class PB:
        pass
    pb = PB()
    pb.Tensor, pb.InferenceRequest = Tensor, Request
    pb.get_output_tensor_by_name = lambda resp, name: Tensor(name, resp.outs[name])
    return pb


def test_triton_model_runtime_sends_what_the_generated_configs_declare():
    """The BLS runtime a front end uses to forward to filip_*_trt, against a fake stub that
    validates shapes by the generated plan configs (lengths: [b] in the engine, [b, 1] on the wire)."""
    from filip_engine.io_spec import as_triton_input, triton_dims
    from filip_engine.runtime import TritonModelRuntime

    s = RepoSettings(max_batch=8)
    for tower, model in T.TRT_MODELS.items():
        spec = tower_spec(CFG, tower, 8)
        config = tensorrt_config(model, spec, s, {"9.0": "model.sm90.plan"}, "model.sm90.plan")
        rt = TritonModelRuntime(model, spec, pb_utils=_fake_pb(config, tokens_width=7))
        if tower == "image":
            out = rt.infer({"pixel_values": np.zeros((3, 3, 224, 224), np.float32)})
            assert out["tokens"].shape == (3, 49, 256) and out["pooled"].shape == (3, 256)
        else:
            out = rt.infer({"input_ids": np.zeros((3, 7), np.int64), "lengths": np.full(3, 2, np.int64)})
            assert out["tokens"].shape == (3, 7, 256) and out["pooled"].shape == (3, 256)
    lengths = tower_spec(CFG, "text").inputs[1]
    assert triton_dims(lengths) == ([1], []) and as_triton_input(lengths, np.arange(3)).shape == (3, 1)
    assert triton_dims(tower_spec(CFG, "text").inputs[0]) == ([-1], None)


def test_plan_warmups_and_front_ends_without_warmup(tmp_path):
    """D1: in TensorRT mode the plan models warm up (lengths >= 2 from a file), the front ends,
    which would BLS-call them during load, do not; in CPU mode the front ends keep theirs."""
    plans = TensorRTPlans(files={"text": {"9.0": "model.sm90.plan"}, "image": {"9.0": "model.sm90.plan"}},
                          default={"text": "model.sm90.plan", "image": "model.sm90.plan"})
    write_repository(tmp_path, CFG, logit_scale=100.0, tensorrt=plans)
    cpu = model_configs(CFG, RepoSettings(), 100.0)
    assert cpu["filip_text"].model_warmup and cpu["filip_image"].model_warmup
    for name in ("filip_text", "filip_image", "filip_score", "filip_search"):
        c = parse_config((tmp_path / name / "config.pbtxt").read_text())
        assert not c.model_warmup or "trt_model" not in c.parameters, name
        if "trt_model" in c.parameters:
            assert not c.model_warmup
    text = parse_config((tmp_path / "filip_text_trt" / "config.pbtxt").read_text())
    w = text.model_warmup[0]
    assert w.batch_size == 1 and w.inputs["lengths"].input_data_file == "lengths.bin"
    assert list(w.inputs["lengths"].dims) == [1] and list(w.inputs["input_ids"].dims) == [16]
    value = np.frombuffer((tmp_path / "filip_text_trt" / "warmup" / "lengths.bin").read_bytes(), "<i8")
    assert value.tolist() == [2] and value.min() >= 2 and value.max() <= 16
    image = parse_config((tmp_path / "filip_image_trt" / "config.pbtxt").read_text())
    assert list(image.model_warmup[0].inputs["pixel_values"].dims) == [3, 224, 224]
    assert image.model_warmup[0].inputs["pixel_values"].zero_data


def test_gpu_check_script_skips_without_cuda():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tools/gpu_check.py runs for real there")
    r = subprocess.run([sys.executable, "tools/gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1 and "skipped" in r.stdout, r.stdout + r.stderr


# What a bare torch + CUDA machine lacks: the check must not need any of it.
_BARE = ("ftfy", "open_clip", "onnxruntime", "onnx", "onnxscript", "tensorrt", "tensorrt_bindings", "tritonclient",
         "pytriton", "PIL", "tokenizers", "faiss", "pynvml", "google")
_RUN_BARE = ("import sys, runpy\n"
             "class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in %r: raise ImportError('not installed on a bare machine: ' + name)\n"
             "sys.meta_path.insert(0, Block())\n"
             "sys.argv = ['tools/gpu_check.py'] + sys.argv[1:]\n"
             "runpy.run_path('tools/gpu_check.py', run_name='__main__')\n") % (_BARE,)


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu_without_the_serving_dependencies():
    """D8: every bare stage runs (--device cpu) with no ftfy, merges file, ONNX Runtime, TensorRT,
    tritonserver, PIL or NVML bindings importable: one line per stage, no traceback."""
    r = subprocess.run([sys.executable, "-c", _RUN_BARE, "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Traceback" not in out
    for stage in ("env", "towers", "fp16 numerics margin", "scorer", "search"):
        assert any(ln.startswith("ok   " + stage) for ln in r.stdout.splitlines()), out
    assert "late_interaction (serving does not import here" in r.stdout      # the scorer's kernel, without PIL
    assert "gpu_check: passed" in r.stdout


def test_gpu_check_failures_are_one_line_each():
    """A stage over its time bound, and the image stages without TensorRT: FAIL lines, exit 1, no traceback."""
    r = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--stage-timeout", "0.3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in out, out
    assert any(ln.startswith("FAIL towers") and "StageTimeout" in ln for ln in r.stdout.splitlines()), out
    if _has_tensorrt():
        return
    r = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--stage", "image"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in out, out
    fails = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL image: build")]
    assert len(fails) == 2 and all("tensorrt" in ln.lower() for ln in fails), out
    assert sum(ln.startswith("skip image: serve") for ln in r.stdout.splitlines()) == 2, out


def test_entrypoint_scripts_are_valid_bash():
    for script in ("docker/entrypoint.sh", "docker/healthcheck.sh", "docker/check_image.py"):
        check = ["bash", "-n"] if script.endswith(".sh") else [sys.executable, "-m", "py_compile"]
        r = subprocess.run([*check, script], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"


# --- on a GPU with TensorRT -----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not _has_tensorrt(), reason="needs the tensorrt package (pip install tensorrt-cu12); not installed here")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trt_engine_parity(tiny_checkpoint, tmp_path, precision):
    import tensorrt
    from filip_engine.checkpoint import load_checkpoint
    from filip_export.to_onnx import export_tower
    if precision == "fp16" and T.trt_major(tensorrt.__version__) >= 11:
        pytest.skip(f"fp16 needs TensorRT 10.x (weak typing); this is {tensorrt.__version__}")
    model = load_checkpoint(tiny_checkpoint).model
    plans = {}
    for tower in ("image", "text"):
        onnx_path = export_tower(model, tower, tmp_path / f"{tower}.onnx", max_batch=8)
        plans[tower] = tmp_path / tower / T.plan_filename(T.detect_environment()["compute_capability"])
        meta = T.build_engine(onnx_path, plans[tower], tower_spec(model.config, tower, 8), precision=precision,
                              max_batch=8, timing_cache=tmp_path / "timing.cache")
        assert meta["precision"] == precision and T.sidecar_path(plans[tower]).is_file()
    assert (tmp_path / "timing.cache").is_file()
    results, ranking = T.validate_engines(model, plans, precision=precision, max_batch=8)
    for r in results:
        print(r.summary())
    T.raise_if_gates_failed(results, ranking)
    assert (ranking is not None) == (precision == "fp16")
