"""The export CLI end to end, as a user runs it: exit codes, one-sentence errors, no tracebacks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_export_cli_tiny(tiny_checkpoint, tmp_path):
    out = tmp_path / "repo"
    r = run("export/to_trt.py", str(tiny_checkpoint), "--out", str(out), "--runtime", "onnxruntime")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all numerics gates passed" in r.stdout
    assert r.stdout.count("ok   tokens") == 3 + 9 and "FAIL" not in r.stdout   # 3 image + 9 text cases
    assert "TensorRT engines: skipped" in r.stdout and "Triton model repository" in r.stdout
    for rel in ("filip_image/1/image.onnx", "filip_text/1/text.onnx", "filip_text/1/tokenizer.json",
                "filip_text/config.pbtxt", "filip_image/config.pbtxt", "filip_score/config.pbtxt",
                "filip_text/1/model.py", "filip_image/1/model.py", "filip_score/1/model.py",
                "filip_text/1/filip_config.json", "filip_image/1/filip_config.json"):
        assert (out / rel).is_file(), rel
    manifest = json.loads((out / "filip_text" / "1" / "filip_config.json").read_text())
    assert manifest["checkpoint_layout"] == "native" and manifest["model"]["vision"]["image_size"] == 32


def test_checkpoint_init_cli(tmp_path):
    r = run("-m", "filip_engine.checkpoint", "init", "--preset", "tiny", "--out", str(tmp_path / "t.pt"), "--seed", "3")
    assert r.returncode == 0, r.stderr
    obj = torch.load(tmp_path / "t.pt", weights_only=True)
    assert obj["format"] == "filip-engine" and obj["vocab"].startswith("#version")


@pytest.mark.parametrize("case", ["missing", "garbage", "bad_keys", "tensorrt", "bad_vocab", "max_batch"])
def test_export_cli_errors(tiny_checkpoint, tmp_path, case):
    ckpt = str(tiny_checkpoint)
    extra: list[str] = []
    if case == "missing":
        ckpt = str(tmp_path / "nope.pt")
    elif case == "garbage":
        (tmp_path / "g.pt").write_bytes(b"\x00garbage" * 100)
        ckpt = str(tmp_path / "g.pt")
    elif case == "bad_keys":
        torch.save({"state_dict": {"foo.weight": torch.zeros(3)}}, tmp_path / "k.pt")
        ckpt = str(tmp_path / "k.pt")
    elif case == "tensorrt":
        extra = ["--runtime", "tensorrt"]
    elif case == "bad_vocab":
        (tmp_path / "v.txt").write_text("not a merges file\n")
        extra = ["--vocab", str(tmp_path / "v.txt")]
    elif case == "max_batch":
        extra = ["--max-batch", "0"]
    r = run("export/to_trt.py", ckpt, "--out", str(tmp_path / "o"), *extra)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr and err.startswith("error: ") and len(err.splitlines()) == 1, err
