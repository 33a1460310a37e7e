"""Start and stop a real ``tritonserver`` on free loopback ports (the demo, the tests and the
benchmark use it): ``with TritonServer(repo) as server: FilipClient(server.url)``."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (the sockets stay open together while choosing, so
    the OS cannot hand out the same port twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class TritonServer:
    """``with TritonServer(repo) as server: server.url`` — ready on return, stopped on exit."""

    def __init__(self, repo: Path, *, ready_timeout: float = 120.0, log: Path | None = None, extra: list[str] = ()):
        self.repo, self.ready_timeout = Path(repo), ready_timeout
        self.grpc_port, self.http_port, self.metrics_port = free_ports(3)
        self.url = f"127.0.0.1:{self.grpc_port}"
        self.log = log or Path(tempfile.gettempdir()) / f"tritonserver-{self.grpc_port}.log"
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None
        self.startup_s = float("nan")

    def start(self) -> "TritonServer":
        launcher = Path(sys.executable).parent / "tritonserver"   # this environment's launcher
        if not launcher.exists():
            launcher = Path(shutil.which("tritonserver") or "tritonserver")
        # --disable-auto-complete-config: our configs are complete, and auto-completion would
        # import every model.py once more in an extra stub (about 1.5 s of start-up each time)
        cmd = [str(launcher), "--model-repository", str(self.repo), f"--grpc-port={self.grpc_port}",
               f"--http-port={self.http_port}", f"--metrics-port={self.metrics_port}",
               "--disable-auto-complete-config", *self.extra]
        t0 = time.perf_counter()
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT, start_new_session=True)
        # readiness over HTTP (KServe v2 /v2/health/ready): works whatever the gRPC TLS settings
        ready_url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(ready_url, timeout=1.0) as r:
                    if r.status == 200:
                        self.startup_s = time.perf_counter() - t0
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {self.ready_timeout} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        """The server's error lines (model load failures first), else the end of its log."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        errors = [ln for ln in text.splitlines() if "failed to load" in ln or "Failed to initialize Python stub" in ln]
        return "\n".join(errors)[-n:] if errors else text[-n:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)   # Triton drains in-flight requests on SIGINT
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_logf", None):
            self._logf.close()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
