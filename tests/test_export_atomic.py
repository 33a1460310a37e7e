"""The export writes its repository atomically: a failed gate, an error or a kill leaves the
previous repository byte for byte as it was; filesystem errors are one sentence and exit 2."""
from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from filip_engine.io_spec import Tolerance
from filip_export import to_trt
from filip_export.to_trt import main as export_main

ROOT = Path(__file__).resolve().parent.parent


def _snapshot(repo: Path) -> dict[str, str]:
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(repo.rglob("*")) if p.is_file()}


def _staging_left(repo: Path) -> list[str]:
    return sorted(p.name for p in repo.parent.iterdir() if p.name.startswith(f".{repo.name}."))


@pytest.fixture()
def exported(tiny_checkpoint, tmp_path):
    repo = tmp_path / "triton_models"
    assert export_main([str(tiny_checkpoint), "--out", str(repo), "--max-batch", "8"]) == 0
    (repo / "someone_elses_model" / "1").mkdir(parents=True)          # not the export's: carried over
    (repo / "someone_elses_model" / "config.pbtxt").write_text('name: "someone_elses_model"\n')
    return repo, _snapshot(repo)


def test_a_failed_gate_leaves_the_previous_repository(exported, tiny_checkpoint, monkeypatch, capsys):
    repo, before = exported
    real = to_trt.validate_tower
    impossible = Tolerance(max_abs=0.0, min_cosine=1.5)                    # no result can pass it
    monkeypatch.setattr(to_trt, "validate_tower", lambda *a, **k: real(*a, **k, tolerance=impossible))
    assert export_main([str(tiny_checkpoint), "--out", str(repo), "--max-batch", "16"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert _snapshot(repo) == before and _staging_left(repo) == []


def test_a_killed_export_leaves_the_previous_repository(exported, tiny_checkpoint):
    repo, before = exported
    proc = subprocess.Popen([sys.executable, "export/to_trt.py", str(tiny_checkpoint), "--out", str(repo), "--max-batch", "16"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:                      # killed in the middle: after the first tower's ONNX file
        if line.startswith("[3/5] exported image"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert _snapshot(repo) == before
    assert len(_staging_left(repo)) == 1          # the killed export's staging folder ...
    assert export_main([str(tiny_checkpoint), "--out", str(repo), "--max-batch", "16"]) == 0
    assert _staging_left(repo) == []              # ... is removed by the next export
    after = _snapshot(repo)
    assert after != before and after["someone_elses_model/config.pbtxt"] == before["someone_elses_model/config.pbtxt"]
    assert "max_batch_size: 16" in (repo / "filip_text" / "config.pbtxt").read_text()


@pytest.mark.parametrize("case", ["out_is_a_file", "parent_is_a_file", "unwritable"])
def test_filesystem_errors_are_one_sentence(tiny_checkpoint, tmp_path, case):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = {"out_is_a_file": blocker, "parent_is_a_file": blocker / "repo", "unwritable": Path("/proc/filip-repo")}[case]
    r = subprocess.run([sys.executable, "export/to_trt.py", str(tiny_checkpoint), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    err = r.stderr.strip()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: cannot write the model repository {out}"), err
    assert blocker.read_text() == "x"
