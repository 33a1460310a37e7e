"""Graceful shutdown: requests already sent when the server is asked to stop (SIGINT, as an
orchestrator's SIGTERM/SIGINT would) are completed, and the server exits cleanly."""
from __future__ import annotations

import io
import os
import signal
import threading
import time

from PIL import Image

from filip_client import FilipClient
from filip_export.launch import TritonServer
from filip_export.to_trt import main as export_main


def test_in_flight_requests_complete_on_shutdown(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    assert export_main([str(tiny_checkpoint), "--out", str(repo)]) == 0
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), "white").save(buf, format="PNG")
    big = buf.getvalue()                   # a few kB that take ~0.1 s each to decode and resize on the server
    server = TritonServer(repo).start()
    results: list[object] = []
    sent = threading.Barrier(9)

    def one():
        with FilipClient(server.url, timeout=120, max_retries=0) as c:
            c.health()                     # connection and config ready before the barrier
            c._limits("filip_image")
            sent.wait()
            try:
                results.append(c.embed_images([big] * 8, batch_size=8).tokens.shape)
            except Exception as e:          # noqa: BLE001 - recorded and asserted below
                results.append(e)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    sent.wait()
    time.sleep(0.5)                        # all 8 requests are on the server (queued or executing)
    t0 = time.monotonic()
    os.killpg(server.proc.pid, signal.SIGINT)
    for t in threads:
        t.join(120)
    rc = server.proc.wait(60)
    server.stop()
    assert len(results) == 8 and all(r == (8, 16, 32) for r in results), results
    assert rc == 0 and time.monotonic() - t0 < 60
