"""The served encoders never park a request on a timer, and a burst is shed within the
callers' deadlines.  Both are read from the server's own accounting (Triton's per-request
trace timestamps and its statistics API), not from the client's clock."""
from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpc
from PIL import Image

from filip_client import FilipClient, FilipTimeoutError
from filip_export.launch import TritonServer
from filip_export.to_trt import main as export_main
from filip_export.triton_repo import parse_config


@pytest.fixture(scope="module")
def repo(tiny_checkpoint, tmp_path_factory):
    repo = tmp_path_factory.mktemp("tail") / "triton_models"
    assert export_main([str(tiny_checkpoint), "--out", str(repo), "--max-batch", "8"]) == 0
    return repo


def _queue_ms(trace_file) -> dict[int, float]:
    """Per traced request: COMPUTE_START - QUEUE_START, from Triton's TIMESTAMPS trace."""
    stamps: dict[int, dict[str, int]] = {}
    for entry in json.loads(trace_file.read_text()):
        for t in entry.get("timestamps", []):
            stamps.setdefault(entry["id"], {})[t["name"]] = int(t["ns"])
    return {i: (s["COMPUTE_START"] - s["QUEUE_START"]) / 1e6 for i, s in stamps.items()
            if "QUEUE_START" in s and "COMPUTE_START" in s}


def test_idle_server_queues_no_request_for_a_timer(repo, tmp_path):
    """Back-to-back single requests: each one's queue time (Triton's own timestamps) stays far
    below the batcher's 500 ms timer, which a queue policy makes it miss now and then."""
    for model in ("filip_text", "filip_image"):
        assert not parse_config((repo / model / "config.pbtxt").read_text()).dynamic_batching.HasField("default_queue_policy")
    trace = tmp_path / "trace.json"
    flags = [f"--trace-config=triton,file={trace}", "--trace-config=level=TIMESTAMPS", "--trace-config=rate=1",
             "--trace-config=count=-1", "--trace-config=triton,log-frequency=0"]
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    with TritonServer(repo, extra=flags) as server:
        c = grpc.InferenceServerClient(server.url)
        text = grpc.InferInput("TEXT", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([b"a photo of a cat"], dtype=object).reshape(1, 1))
        image = grpc.InferInput("IMAGE", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([buf.getvalue()], dtype=object).reshape(1, 1))
        for _ in range(300):
            c.infer("filip_text", [text])
        for _ in range(100):
            c.infer("filip_image", [image])
    deadline = time.monotonic() + 30                 # the trace file is written when the server exits
    while not trace.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    queue = _queue_ms(trace)
    q = np.array(list(queue.values()))
    print(f"{len(q)} requests: queue p50 {np.percentile(q, 50):.2f} ms, p99 {np.percentile(q, 99):.2f} ms, max {q.max():.2f} ms")
    assert len(q) >= 400 - 5                        # the warm-up requests are traced too
    assert q.max() < 100.0, sorted(q)[-5:]
    assert np.percentile(q, 99) < 20.0


def test_a_burst_is_shed_within_the_callers_deadlines(repo):
    """64 concurrent requests of a large image, each with a 0.5 s deadline, against a server
    that needs about 0.2 s per image: those whose callers gave up are dropped from the queue
    without running (Triton honours the gRPC cancellation), the callers get a timeout error,
    and the server answers at once afterwards."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (1500, 1500, 3), dtype=np.uint8)).save(buf, format="PNG")
    big = buf.getvalue()
    with TritonServer(repo) as server:
        stats = grpc.InferenceServerClient(server.url)

        def executed() -> int:
            return int(stats.get_inference_statistics("filip_image", as_json=True)["model_stats"][0].get("inference_count", 0))

        with FilipClient(server.url, timeout=30) as warm:
            warm.embed_images([big])
        before = executed()

        def one(_):
            with FilipClient(server.url, timeout=0.5, max_retries=0) as c:
                try:
                    c.embed_images([big])
                    return "ok"
                except FilipTimeoutError:
                    return "timeout"
        with ThreadPoolExecutor(64) as ex:
            results = list(ex.map(one, range(64)))
        time.sleep(2.0)                              # let the server finish what it had started
        ran = executed() - before
        print(f"burst: {results.count('ok')} ok, {results.count('timeout')} timed out; the server ran {ran} of 64")
        assert results.count("ok") + results.count("timeout") == 64
        assert results.count("timeout") >= 32
        assert ran <= 40, ran                        # the rest were shed unrun
        with FilipClient(server.url, timeout=10) as c:
            assert c.health(deep=True).ok
