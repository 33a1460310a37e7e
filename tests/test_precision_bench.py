"""tools.precision_bench's pure parts: the measuring order, the reuse check, the manifest
figures and the tables, from given numbers (no export, no server)."""
from __future__ import annotations

import argparse
import json
import math
import os

import pytest

from tools import precision_bench as pb
from tools.measure import SECTIONS, keep_section, write_section


def test_rounds_are_interleaved_across_precisions():
    assert pb.interleaved(["fp32", "bf16", "int8"], 2) == [
        (0, "fp32"), (0, "bf16"), (0, "int8"), (1, "fp32"), (1, "bf16"), (1, "int8")]


def test_measure_runs_the_rounds_in_that_order():
    seen = []

    def call(name):
        def f(i):
            seen.append((name, i))
            return 8
        return f

    got = pb.measure({"a": call("a"), "b": call("b")}, rounds=3, window=0.0, warmup=1, min_requests=2)
    # warm-up (one each), then per round two requests of a, two of b; request numbers continue
    assert seen == [("a", 0), ("b", 0)] + [(n, 1 + 2 * r + k) for r in range(3) for n in "ab" for k in range(2)]
    assert set(got) == {"a", "b"} and len(got["a"].rounds) == 3 and got["a"].items_per_s > 0


def test_speed_median_and_percentiles():
    s = pb.Speed.of([10.0, 30.0, 20.0], [i / 1000 for i in range(1, 101)])
    assert s.items_per_s == 20.0 and s.p50_ms == pytest.approx(50.5) and s.p99_ms == pytest.approx(99.01)
    assert math.isnan(pb.Speed.of([], []).p50_ms)


def test_captions_are_8_to_12_words_and_reproducible():
    caps = pb.captions(200, seed=3)
    assert all(8 <= len(c.split()) <= 12 for c in caps)
    assert caps == pb.captions(200, seed=3) and caps != pb.captions(200, seed=4)


def _manifest(ckpt="m.pt", engine=None):
    return {"checkpoint": ckpt, **({"engine": engine} if engine else {})}


def _repo(tmp_path, precision="fp32", ckpt="m.pt", engine=None):
    repo = tmp_path / precision / "triton_models"
    for tower, sub in pb.TOWER_DIRS.items():
        d = repo / sub
        d.mkdir(parents=True)
        e = dict(engine, model_file=f"{tower}.int8.onnx") if precision == "int8" else engine
        (d / pb.MANIFEST).write_text(json.dumps(_manifest(ckpt, e)))
        (d / ((e or {}).get("model_file") or f"{tower}.onnx")).write_bytes(b"")
    return repo


def test_reuse_check(tmp_path):
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"x")
    old = ckpt.stat().st_mtime - 100
    os.utime(ckpt, (old, old))
    fp32 = _repo(tmp_path)
    assert pb.reuse_problem(fp32, ckpt, "fp32") is None
    assert "not bf16" in pb.reuse_problem(fp32, ckpt, "bf16")
    assert "not 'other.pt'" in pb.reuse_problem(fp32, tmp_path / "other.pt", "fp32")
    assert "no filip_image/1" in pb.reuse_problem(tmp_path / "missing", ckpt, "fp32")
    int8 = _repo(tmp_path, "int8", engine={"precision": "int8", "engine": "onnxruntime"})
    assert pb.reuse_problem(int8, ckpt, "int8") is None
    (int8 / "filip_text/1/text.int8.onnx").unlink()
    assert "text.int8.onnx missing" in pb.reuse_problem(int8, ckpt, "int8")
    (fp32 / "filip_image_trt").mkdir()
    assert "TensorRT" in pb.reuse_problem(fp32, ckpt, "fp32")
    bf16 = _repo(tmp_path, "bf16", engine={"precision": "bf16", "engine": "openvino"})
    assert pb.reuse_problem(bf16, ckpt, "bf16") is None
    later = (tmp_path / "bf16/triton_models/filip_text/1" / pb.MANIFEST).stat().st_mtime + 100
    os.utime(ckpt, (later, later))      # the checkpoint changed after the export
    assert "newer" in pb.reuse_problem(bf16, ckpt, "bf16")


def _gate(cos, s_t=0.97, glob=0.99):
    return {"held_out": {"tokens": {"min_cosine": cos, "max_abs": 0.01}, "pooled": {"min_cosine": 0.9999}},
            "top10_s_T": s_t, "top10_global": glob}


INT8 = {"image": {"engine": {"precision": "int8", "engine": "onnxruntime", "details": {
            "gate": _gate(0.9991), "quantization": {"method": "onnxruntime dynamic", "quantized": 22,
                                                    "kept_fp32": ["a", "b"]}}}},
        "text": {"engine": {"precision": "int8", "engine": "openvino", "details": {
            "gate": _gate(0.9995), "quantization": {"method": "nncf static (QDQ)", "quantized": 24, "kept_fp32": []}}}}}
BF16 = {t: {"engine": {"precision": "bf16", "engine": "openvino", "details": {"gate": _gate(0.99962, 1.0, 1.0)}}}
        for t in ("image", "text")}
FP32 = {"image": {}, "text": {}}


def test_accuracy_and_engines_from_manifests():
    assert pb.accuracy_of(FP32) == pb.Accuracy(exact=True)
    a = pb.accuracy_of(INT8)
    assert (a.image_min_cos, a.text_min_cos, a.top10_s_t, a.top10_global) == (0.9991, 0.9995, 0.97, 0.99)
    assert math.isnan(pb.accuracy_of({"image": {"engine": {"precision": "bf16"}}, "text": {}}).image_min_cos)
    assert pb.engines_cell(FP32) == "onnxruntime fp32"
    assert pb.engines_cell(BF16) == "openvino bf16"
    assert pb.engines_cell(INT8) == "onnxruntime int8 dynamic (2 of 24 MatMuls fp32) / openvino int8 static"


def _speeds(*rates):
    return {w: pb.Speed(r, 2.0 * r, 3.0 * r) for (w, _, _), r in zip(pb.WORKLOADS, rates)}


def test_tables_from_given_numbers():
    rows = [pb.Row("fp32", pb.engines_cell(FP32), _speeds(100, 200, 40, 400), pb.accuracy_of(FP32)),
            pb.Row("bf16", pb.engines_cell(BF16), _speeds(150, 500, 60, 400), pb.accuracy_of(BF16)),
            pb.Row("int8", pb.engines_cell(INT8), _speeds(50, 300, 20, float("nan")), pb.accuracy_of(INT8))]
    lines = pb.table(rows, served=False).splitlines()
    assert lines[0].startswith("| precision | engine (image / text) | image b1 items/s (x fp32) | image b8 items/s "
                               "(x fp32) | text b1 items/s (x fp32) | text b8 items/s (x fp32) |")
    assert len(lines) == 5 and all(ln.count("|") == 9 for ln in lines)
    assert lines[2] == (f"| fp32 | onnxruntime fp32 | 100.0 (1.00x) | 200.0 (1.00x) | 40.0 (1.00x) | 400.0 (1.00x) | "
                        f"{pb.FP32_EXACT} | 1.0 / 1.0 (exact) |")
    assert lines[3] == ("| bf16 | openvino bf16 | 150.0 (1.50x) | 500.0 (2.50x) | 60.0 (1.50x) | 400.0 (1.00x) | "
                        "0.99962 / 0.99962 | 1.000 / 1.000 |")
    assert "| 50.0 (0.50x) | 300.0 (1.50x) | 20.0 (0.50x) | n/a | 0.99910 / 0.99950 | 0.970 / 0.990 |" in lines[4]
    served = pb.table(rows, served=True).splitlines()
    assert "image b1 p50 / p99 ms | text b1 p50 / p99 ms" in served[0]
    assert "| 200.00 / 300.00 | 80.00 / 120.00 |" in served[2]
    # no fp32 row: rates without speed-ups
    assert "| 150.0 | 500.0 | 60.0 | 400.0 |" in pb.table(rows[1:], served=False)


def test_report_section_is_kept_by_the_benchmark_report(tmp_path):
    assert pb.SECTION in SECTIONS
    doc = tmp_path / "B.md"
    write_section(doc, pb.report_section(tmp_path / "m.pt", "CPU: x", "| t1 |", "| t2 |"), pb.SECTION)
    kept = keep_section(doc, "# Benchmarks\n")
    assert pb.HEADING in kept and "| t1 |" in kept and "| t2 |" in kept and kept.startswith("# Benchmarks")


def test_precisions_argument():
    assert pb._precisions("fp32, int8,fp32") == ["fp32", "int8"]
    with pytest.raises(argparse.ArgumentTypeError):
        pb._precisions("fp16")


def test_scenes_table_lists_each_precision_and_chance():
    z = {"token": {"colour": 1.0, "shape": 0.58, "both": 0.58}, "global": {"colour": 1.0, "shape": 0.55, "both": 0.55},
         "chance": {"colour": 1 / 6, "shape": 0.25, "both": 1 / 24}, "n": 300}
    r = {"token": {"R@1": 0.074, "R@5": 0.335}, "global": {"R@1": 0.124, "R@5": 0.422},
         "chance": {"R@1": 0.001, "R@5": 0.005}, "n": 1000}
    tower = {"image": {}, "text": {}}
    text = pb.scenes_table({"fp32": (z, r), "int8": (z, r)}, {"fp32": tower, "int8": tower})
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert [ln.split("|")[1].strip() for ln in rows] == ["precision", "fp32", "int8", "chance"]
    assert "| 1.000 / 1.000 | 0.580 / 0.550 |" in rows[1] and "0.074 / 0.124 | 0.335 / 0.422 |" in rows[1]
    assert "0.167 | 0.250 | 0.042 | 0.001 | 0.005 |" in rows[3]
    assert "over 300 held-out" in text and "over 1000 held-out" in text


def test_instances_bench_rewrites_only_the_encoders_layout():
    from filip_engine.config import PRESETS
    from filip_export.triton_repo import RepoSettings, config_text, model_configs, parse_config
    from tools.instances_bench import layouts, with_layout

    assert layouts(2) == {"1 x 2": (1, 2), "2 x 1": (2, 1), "2 x 2 (oversubscribed)": (2, 2)}
    configs = model_configs(PRESETS["tiny"], RepoSettings(), logit_scale=10.0)
    for name in ("filip_image", "filip_text"):
        original = parse_config(config_text(configs[name]))
        changed = parse_config(with_layout(config_text(configs[name]), 3, 1))
        assert changed.instance_group[0].count == 3 and changed.parameters["intra_op_threads"].string_value == "1"
        changed.instance_group[0].count = original.instance_group[0].count
        changed.parameters["intra_op_threads"].string_value = original.parameters["intra_op_threads"].string_value
        assert changed == original
    with pytest.raises(ValueError):
        with_layout(config_text(configs["filip_score"]), 2, 1)
