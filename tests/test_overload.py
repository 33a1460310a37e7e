"""Overload: a full queue answers at once with UNAVAILABLE; the client retries those with
jittered backoff within its deadline and never retries invalid input."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from filip_client import AsyncFilipClient, FilipClient, FilipInvalidInputError, FilipOverloadedError
from filip_client._protocol import backoff
from filip_export.launch import TritonServer
from filip_export.to_trt import main as export_main


@pytest.fixture(scope="module")
def tiny_queue_server(tiny_checkpoint, tmp_path_factory):
    repo = tmp_path_factory.mktemp("overload") / "repo"
    assert export_main([str(tiny_checkpoint), "--out", str(repo), "--max-queue-size", "1", "--max-batch", "4",
                        "--limit", "max_text_chars=100", "--limit", "max_items_per_request=3"]) == 0
    with TritonServer(repo) as server:
        yield server


def _burst(client, n=48):
    imgs = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(3)]

    def one(i):
        try:
            client.embed_images(imgs, batch_size=3)
            return "ok"
        except FilipOverloadedError:
            return "overloaded"
    with ThreadPoolExecutor(24) as ex:
        return list(ex.map(one, range(n)))


def test_burst_without_retries_is_refused_fast(tiny_queue_server):
    with FilipClient(tiny_queue_server.url, concurrency=24, max_retries=0) as c:
        results = _burst(c)
    assert results.count("overloaded") > 0 and results.count("ok") > 0


def test_burst_with_retries_all_served(tiny_queue_server):
    with FilipClient(tiny_queue_server.url, concurrency=24, timeout=60) as c:
        assert _burst(c).count("ok") == 48


def test_async_retries(tiny_queue_server):
    async def run():
        async with AsyncFilipClient(tiny_queue_server.url, concurrency=24, timeout=60) as ac:
            img = [np.zeros((32, 32, 3), np.uint8)] * 3
            return await asyncio.gather(*(ac.embed_images(img, batch_size=3) for _ in range(32)))
    assert len(asyncio.run(run())) == 32


def test_invalid_input_is_not_retried(tiny_queue_server):
    """Counted at the client's transport: one server-side INVALID_ARGUMENT, exactly one attempt."""
    with FilipClient(tiny_queue_server.url) as c:
        calls = []
        real = c._grpc.infer
        c._grpc.infer = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        with pytest.raises(FilipInvalidInputError):
            c.embed_images([b"\x89PNG\r\n\x1a\nnot really"])
    assert len(calls) == 1


def test_backoff_is_capped_and_jittered():
    waits = [backoff(k) for k in range(1, 12)]
    assert all(0.025 <= w <= 1.5 for w in waits)
    assert 0.025 <= backoff(1) <= 0.075 and 0.5 <= backoff(10) <= 1.5


def test_limits_are_settings_enforced_by_the_server_and_echoed_by_the_client(tiny_queue_server):
    import tritonclient.grpc as grpc
    with FilipClient(tiny_queue_server.url) as c:
        with pytest.raises(FilipInvalidInputError, match="150 characters; the limit is 100"):
            c.embed_texts(["x" * 150])                              # refused before sending
        assert len(c.embed_texts(["a caption"] * 7, batch_size=32)) == 7   # split into requests of <= 3
    arr = np.array([b"x" * 150], dtype=object).reshape(1, 1)
    inp = grpc.InferInput("TEXT", [1, 1], "BYTES")
    inp.set_data_from_numpy(arr)
    with pytest.raises(Exception, match="limit is 100"):            # and refused by the server
        grpc.InferenceServerClient(tiny_queue_server.url).infer("filip_text", [inp])
