"""Reduced-precision CPU engines (export/to_trt.py --precision bf16 | int8): each gate passes
on real subjects and fails when it must (leaving the previous repository as it was), the
record reaches the manifest and the served models' config, a CPU without the instructions is
refused, and the served engines answer as the in-process ones and within the gate of PyTorch.

The reference throughout is the PyTorch fp32 model; the reduced-precision engines are
OpenVINO's and ONNX Runtime's own, not code of this project."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import filip_engine.precision as P
import filip_export.cpu_precision as C
from filip_engine.artifacts import read_manifest
from filip_engine.checkpoint import load_checkpoint
from filip_engine.compare import compare_outputs
from filip_engine.errors import FilipError
from filip_engine.io_spec import Tolerance
from filip_engine.pipeline import FilipPipeline
from filip_export.to_trt import main as export_main
from filip_export.triton_repo import parse_config

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "models" / "filip-scenes.pt"
GATE = C.GATE_TOLERANCE
TEXTS = ["a photo of a dog on the beach", "two red cars parked in a busy street", "x", "中文 caption 🐱",
         "the small wooden chair next to a window", "A BRIGHT YELLOW FLOWER"]


def _photos(n: int, seed: int = 3) -> list[np.ndarray]:
    from filip_export.calibration import drawn_image
    rng = np.random.default_rng(seed)
    return [np.asarray(drawn_image(rng, 48)) for _ in range(n)]


def _export(ckpt, out: Path, *extra: str) -> int:
    return export_main([str(ckpt), "--out", str(out), "--max-batch", "16", *extra])


def _config(repo: Path, model: str):
    return parse_config((repo / model / "config.pbtxt").read_text())


def _snapshot(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()
            and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def repos(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported at each CPU precision."""
    base = tmp_path_factory.mktemp("precision")
    out = {}
    for precision in ("fp32", "bf16", "int8"):
        out[precision] = base / precision / "triton_models"
        assert _export(tiny_checkpoint, out[precision], "--precision", precision) == 0
    return out


def _within_gate(pipe: FilipPipeline, ref: FilipPipeline, label: str) -> None:
    for kind, a, b in (("image", pipe.embed_images(_photos(8)), ref.embed_images(_photos(8))),
                       ("text", pipe.embed_texts(TEXTS), ref.embed_texts(TEXTS))):
        r = compare_outputs({"tokens": b.tokens, "pooled": b.pooled}, {"tokens": a.tokens, "pooled": a.pooled},
                            GATE, f"{label} {kind}")
        assert r.passed, r.summary()


@pytest.mark.parametrize("precision,engine", [("bf16", "openvino"), ("int8", None)])
def test_each_precision_passes_its_gate_and_is_recorded(repos, tiny_checkpoint, precision, engine):
    repo = repos[precision]
    for tower in ("image", "text"):
        _, manifest = read_manifest(repo / f"filip_{tower}" / "1")
        rec = manifest["engine"]
        assert rec["precision"] == precision and (engine is None or rec["engine"] == engine)
        assert (repo / f"filip_{tower}" / "1" / rec["model_file"]).is_file()
        gate = rec["details"]["gate"]
        assert gate["held_out"]["tokens"]["min_cosine"] >= GATE.min_cosine
        assert gate["top10_s_T"] >= 0.9 and gate["top10_global"] >= 0.9
        assert gate["inputs"]["images"] == "drawn" and gate["inputs"]["held_out_items"] == [64, 64]
        params = {k: v.string_value for k, v in _config(repo, f"filip_{tower}").parameters.items()}
        assert {k: params[k] for k in P.PARAMS} == {k: rec[k] for k in P.PARAMS}   # the model metadata says it too
    score = read_manifest(repo / "filip_score" / "1")[1]
    assert set(score["engines"]) == {"image", "text"}
    pipe = FilipPipeline.from_repository(repo)
    assert pipe.image_runtime.name.startswith("openvino" if engine == "openvino" else ("openvino", "onnxruntime"))
    _within_gate(pipe, FilipPipeline.from_checkpoint(tiny_checkpoint), precision)


def test_int8_keeps_the_layers_the_gate_needs_in_fp32(repos):
    """Every weight MatMul is either quantised or listed as kept fp32, and the quantised file
    really is int8 (ONNX Runtime's integer MatMuls, or NNCF's FakeQuantize in OpenVINO IR)."""
    import onnx
    for tower in ("image", "text"):
        d = repos["int8"] / f"filip_{tower}" / "1"
        rec = read_manifest(d)[1]["engine"]
        q = rec["details"]["quantization"]
        n = len(C.weight_matmuls(d / f"{tower}.onnx"))
        assert q["quantized"] + len(q["kept_fp32"]) == n and q["quantized"] >= 1
        assert q["validation_min_cosine"] >= C.VALIDATION_MIN_COSINE
        if rec["engine"] == "onnxruntime":
            ops = {node.op_type for node in onnx.load(str(d / rec["model_file"])).graph.node}
            assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops or "DynamicQuantizeMatMul" in ops, ops
        else:
            assert "FakeQuantize" in (d / rec["model_file"]).read_text()
        leftovers = {p.name for p in d.iterdir()} - {"filip_config.json", "model.py", f"{tower}.onnx", "tokenizer.json",
                                                     rec["model_file"], "__pycache__"}
        assert leftovers <= ({f"{tower}.int8.bin"} if rec["model_file"].endswith(".xml") else set()), leftovers


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_a_failed_gate_leaves_the_previous_repository_and_says_by_how_much(repos, tiny_checkpoint, tmp_path,
                                                                         monkeypatch, capsys, precision):
    out = tmp_path / "triton_models"
    assert _export(tiny_checkpoint, out) == 0
    before = _snapshot(out)
    monkeypatch.setattr(C, "GATE_TOLERANCE", Tolerance(max_abs=1e-7, min_cosine=0.9999999))
    assert _export(tiny_checkpoint, out, "--precision", precision, "--int8-engine", "onnxruntime") == 1
    err = capsys.readouterr().err
    assert "failed numerics gates" in err and "min cosine 0.99" in err and "< 0.9999999" in err, err
    assert _snapshot(out) == before
    assert not list(tmp_path.glob(".*staging*")) and not list(out.rglob("*.int8.*"))


def test_a_cpu_without_bf16_is_refused_in_one_sentence(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(P, "openvino_capabilities", lambda: ("FP32", "FP16", "INT8"))
    assert _export(tiny_checkpoint, tmp_path / "r", "--precision", "bf16") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs a CPU with bf16 instructions" in err and "--precision int8" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv,says", [
    (["--precision", "int8", "--runtime", "tensorrt"], "builds CPU engines"),
    (["--precision", "fp16", "--runtime", "onnxruntime"], "fp16 is a TensorRT precision"),
    (["--calibration-texts", "x.txt"], "apply to --precision bf16 or int8"),
])
def test_precision_flags_that_cannot_work_are_refused(tiny_checkpoint, tmp_path, capsys, argv, says):
    assert _export(tiny_checkpoint, tmp_path / "r", *argv) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_own_calibration_inputs(tiny_checkpoint, tmp_path, capsys):
    images, texts = tmp_path / "images", tmp_path / "texts.txt"
    images.mkdir()
    for i, arr in enumerate(_photos(39, seed=8)):
        Image.fromarray(arr).save(images / f"{i}.png")
    texts.write_text("\n".join(f"{t} number {i}" for i, t in enumerate(TEXTS * 8)))
    out = tmp_path / "r"
    assert _export(tiny_checkpoint, out, "--precision", "bf16", "--calibration-images", str(images),
                   "--calibration-texts", str(texts)) == 2
    assert "39 image files, at least 40" in capsys.readouterr().err
    Image.fromarray(_photos(1, seed=9)[0]).save(images / "last.jpg")
    assert _export(tiny_checkpoint, out, "--precision", "bf16", "--calibration-images", str(images),
                   "--calibration-texts", str(texts)) == 0
    src = read_manifest(out / "filip_text" / "1")[1]["engine"]["details"]["gate"]["inputs"]
    assert src["images"] == "own (images)" and src["texts"] == "own (texts.txt)"
    assert src["held_out_items"] == [10, 12] and src["calibration_items"] == [20, 24]


def test_the_layer_search_finds_the_fewest_fp32_layers():
    """Pure logic: a fake quantiser whose validation cosine is fixed by which layers stay fp32."""
    nodes = [f"n{i}" for i in range(13)]
    harm = {n: (0.0005 if n in ("n3", "n7", "n11") else 0.00001) for n in nodes}

    def build(fp32):
        return [n for n in nodes if n not in fp32]          # "the runtime": the quantised layers

    def validate(quantised):
        return 1.0 - sum(harm[n] for n in quantised)

    fp32, reached = C.search_fp32_layers(build, nodes, validate, log=lambda *_: None)
    assert set(fp32) == {"n3", "n7", "n11"} and reached >= C.VALIDATION_MIN_COSINE
    fp32, _ = C.search_fp32_layers(build, nodes, lambda q: 1.0, log=lambda *_: None)
    assert fp32 == []
    fp32, reached = C.search_fp32_layers(build, nodes, lambda q: 0.99, log=lambda *_: None)   # never enough
    assert fp32 == nodes and reached < C.VALIDATION_MIN_COSINE


def test_manifest_records_read_back():
    rec = P.TowerEngine("int8", "openvino", "image.int8.xml", "f32", {"gate": {"x": 1}})
    assert P.TowerEngine.from_mapping(rec.to_dict("image")) == rec
    assert P.TowerEngine.from_mapping(None).to_params("text") == {
        "precision": "fp32", "engine": "onnxruntime", "model_file": "text.onnx", "inference_precision": "f32"}
    with pytest.raises(FilipError, match="unknown CPU precision"):
        P.TowerEngine("fp8")


@pytest.mark.slow
def test_served_reduced_precision_answers_as_in_process_and_within_the_gate(repos, tiny_checkpoint):
    from filip_client import FilipClient
    from filip_export.launch import TritonServer

    ref = FilipPipeline.from_checkpoint(tiny_checkpoint)
    photos = _photos(8)
    pngs = []
    for a in photos:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    for precision in ("bf16", "int8"):
        repo = repos[precision]
        pipe = FilipPipeline.from_repository(repo)
        with TritonServer(repo) as server, FilipClient(server.url, timeout=60) as client:
            params = {k: v for k, v in client.model_config("filip_image")["parameters"].items()}
            assert params["precision"]["string_value"] == precision
            for kind, served, local, exact in (
                    ("text", client.embed_texts(TEXTS), pipe.embed_texts(TEXTS), ref.embed_texts(TEXTS)),
                    ("image", client.embed_images(pngs), pipe.embed_images(photos), ref.embed_images(photos))):
                assert np.array_equal(served.lengths, local.lengths)
                # the same engine on the same batch: the same numbers
                same = compare_outputs({"tokens": local.tokens, "pooled": local.pooled},
                                       {"tokens": served.tokens, "pooled": served.pooled},
                                       Tolerance(max_abs=1e-5, min_cosine=0.99999), f"{precision} {kind} served")
                assert same.passed, same.summary()
                gate = compare_outputs({"tokens": exact.tokens, "pooled": exact.pooled},
                                       {"tokens": served.tokens, "pooled": served.pooled}, GATE,
                                       f"{precision} {kind} served vs PyTorch")
                assert gate.passed, gate.summary()
            scores = client.score(client.embed_images(pngs), client.embed_texts(TEXTS))
            assert np.asarray(scores).shape == (8, len(TEXTS))
            assert server.proc.poll() is None


@pytest.mark.slow
def test_the_trained_model_keeps_what_it_learned_at_each_precision(tmp_path):
    """The trained demo model as a second gate subject: both gates pass on it, and zero-shot
    accuracy and retrieval on held-out scenes stay close to fp32's (in-process, on the engines
    the repositories serve)."""
    from tools.scene_eval import retrieval, zero_shot

    results = {}
    for precision in ("fp32", "bf16", "int8"):
        out = tmp_path / precision
        assert export_main([str(TRAINED), "--out", str(out), "--precision", precision]) == 0
        pipe = FilipPipeline.from_repository(out)
        results[precision] = (zero_shot(pipe, n=200), retrieval(pipe, n=300))
    z32, r32 = results["fp32"]
    for precision in ("bf16", "int8"):
        z, r = results[precision]
        for scoring in ("token", "global"):
            for k in ("colour", "shape"):
                assert abs(z[scoring][k] - z32[scoring][k]) <= 0.03, (precision, scoring, k, z, z32)
            for k in ("R@1", "R@5"):
                assert abs(r[scoring][k] - r32[scoring][k]) <= 0.03, (precision, scoring, k, r, r32)
    print(json.dumps({p: {"zero_shot": z, "retrieval": r} for p, (z, r) in results.items()}, indent=1))


def test_threads_per_instance_never_oversubscribes_onnx_runtime(monkeypatch):
    monkeypatch.setattr(P, "default_threads", lambda: 8)
    assert P.threads_per_instance(0, 1) == 8 and P.threads_per_instance(0, 2) == 4 and P.threads_per_instance(0, 16) == 1
    assert P.threads_per_instance(0, 2, "openvino") == 8        # OpenVINO's idle threads sleep
    assert P.threads_per_instance(3, 2) == 3 and P.threads_per_instance(3, 2, "openvino") == 3


def test_served_instances_divide_the_cores(monkeypatch):
    """What a served encoder opens: the instance count from its config, the engine from its parameters."""
    import filip_engine.runtime as R
    from filip_engine.serving import triton_context
    seen = {}
    monkeypatch.setattr(P, "default_threads", lambda: 8)
    monkeypatch.setattr(P, "open_cpu_runtime", lambda d, t, s, rec, threads: seen.setdefault(rec.engine, threads))
    for engine in ("onnxruntime", "openvino"):
        config = {"parameters": {"intra_op_threads": {"string_value": "0"}, "engine": {"string_value": engine}},
                  "instance_group": [{"count": 2, "kind": "KIND_CPU"}]}
        _, params = triton_context({"model_config": json.dumps(config), "model_repository": "/r", "model_version": "1"})
        assert params["instance_count"] == "2"
        R.open_tower_runtime("/r/1", "image", None, params)
    assert seen == {"onnxruntime": 4, "openvino": 8}


def test_gate_inputs_are_distinct_disjoint_and_reproducible(tiny_checkpoint):
    from filip_engine.pipeline import checkpoint_transform, load_tokenizer
    from filip_export.calibration import gate_inputs
    ck = load_checkpoint(tiny_checkpoint)
    tok, _ = load_tokenizer(ck.config, embedded=ck.vocab_text)
    a, b = (gate_inputs(checkpoint_transform(ck), tok, seed=0) for _ in range(2))
    splits = (a.calibration, a.validation, a.held_out)
    for split in splits:
        images = {x.tobytes() for x in split.pixel_values}
        texts = {r[:n].tobytes() for r, n in zip(split.input_ids, split.lengths)}
        assert len(images) == len(split.pixel_values) and len(texts) >= 0.8 * len(split.input_ids)   # no copies
    seen = [{x.tobytes() for x in s.pixel_values} for s in splits]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert np.array_equal(a.held_out.pixel_values, b.held_out.pixel_values)
    assert np.array_equal(a.held_out.input_ids, b.held_out.input_ids)
