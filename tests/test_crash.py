"""A crashed Python-backend stub: Triton keeps reporting ready; the deep health check notices."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from filip_client import FilipClient
from filip_export.launch import TritonServer
from filip_export.to_trt import main as export_main


def _stub_pid(repo, model: str) -> int:
    """The Python-backend stub process serving ``model`` of this repository."""
    from pathlib import Path
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and "triton_python_backend_stub" in args and f"{repo}/{model}/1/model.py" in args:
            return int(proc.name)
    raise AssertionError(f"no stub process for {model}")


def test_killed_stub_is_detected_by_the_deep_check(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    assert export_main([str(tiny_checkpoint), "--out", str(repo)]) == 0
    # a dead stub cannot unload: without a short exit timeout Triton waits 30 s on shutdown
    with TritonServer(repo, extra=["--exit-timeout-secs=3"]) as server, FilipClient(server.url, timeout=10) as c:
        assert c.health(deep=True).ok
        probe = [sys.executable, "-m", "filip_client.health", "--url", server.url, "--deep"]
        assert subprocess.run(probe, capture_output=True, text=True).returncode == 0
        os.kill(_stub_pid(repo, "filip_text"), signal.SIGKILL)
        time.sleep(1.0)
        shallow = c.health()
        assert shallow.ok, "Triton's own readiness still says OK after the stub died (the reason for the canary)"
        deep = c.health(deep=True)
        assert not deep.ok and deep.canaries["filip_text"] is not None
        assert deep.canaries["filip_image"] is None and deep.canaries["filip_score"] is None
        r = subprocess.run(probe, capture_output=True, text=True)
        assert r.returncode == 1 and "filip_text" in r.stdout
        assert c.embed_images([np.zeros((8, 8, 3), np.uint8)]).tokens.shape[0] == 1   # other models still serve
