"""A real tritonserver over a tiny exported checkpoint, driven by the client library and by
raw tritonclient calls: parity with in-process PyTorch, batching/concurrency invariance,
per-request failure isolation."""
from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpc
from PIL import Image

from filip_client import (AsyncFilipClient, Embeddings, FilipClient, FilipInvalidInputError, FilipServerError)
from filip_engine.compare import compare_outputs
from filip_engine.interaction_ref import s_i_ref, s_t_ref
from filip_engine.io_spec import Tolerance
from filip_engine.pipeline import FilipPipeline
from filip_export.to_trt import main as export_main
from filip_export.launch import TritonServer

SERVED = Tolerance(max_abs=1e-4, min_cosine=0.9999)
TEXTS = ["a photo of a cat", "two dogs playing in the snow", "!", "中文 caption 🐱", "word " * 100,
         "a red circle", "The QUICK brown fox's tail"]


def _img(seed: int, w: int = 48, h: int = 36) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    repo = tmp_path_factory.mktemp("served") / "triton_models"
    assert export_main([str(tiny_checkpoint), "--out", str(repo), "--max-batch", "16"]) == 0
    with TritonServer(repo) as server:
        print(f"tritonserver ready in {server.startup_s:.1f} s")
        yield server, FilipPipeline.from_checkpoint(tiny_checkpoint)
        assert server.proc.poll() is None, "the server died during the tests"


@pytest.fixture(scope="module")
def client(served):
    with FilipClient(served[0].url, timeout=30) as c:
        yield c


def _same(a: Embeddings, b, label: str) -> None:
    assert np.array_equal(a.lengths, b.lengths), label
    r = compare_outputs({"tokens": b.tokens, "pooled": b.pooled}, {"tokens": a.tokens, "pooled": a.pooled}, SERVED, label)
    assert r.passed, r.summary()


def test_health(client):
    h = client.health()
    assert h.ok and set(h.models) == {"filip_text", "filip_image", "filip_score", "filip_search"} and h.canaries is None
    deep = client.health(deep=True)
    assert deep.ok and deep.canaries == {"filip_text": None, "filip_image": None, "filip_score": None, "filip_search": None}


def test_served_text_equals_pytorch(served, client):
    _same(client.embed_texts(TEXTS), served[1].embed_texts(TEXTS), "served texts vs torch")


def test_served_images_equal_pytorch(served, client, tmp_path):
    arrays = [_img(i, 40 + 7 * i, 30 + 5 * i) for i in range(5)]
    path = tmp_path / "x.png"
    path.write_bytes(_png(arrays[0]))
    inputs = [str(path), _png(arrays[1]), Image.fromarray(arrays[2]), arrays[3], arrays[4]]
    want = served[1].embed_images([arrays[0], arrays[1], arrays[2], arrays[3], arrays[4]])
    _same(client.embed_images(inputs), want, "served images vs torch")


def test_pil_images_keep_orientation_and_mode_through_the_client(served, client):
    """A phone photo opened with PIL (EXIF orientation 6) and a CMYK image: served through the
    client they give what the in-process pipeline gives for the same PIL objects."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(_img(4, 40, 24)).save(buf, format="JPEG", quality=92, exif=exif)
    rotated = Image.open(io.BytesIO(buf.getvalue()))
    cmyk = Image.fromarray(_img(5)).convert("CMYK")
    _same(client.embed_images([rotated, cmyk]), served[1].embed_images([rotated, cmyk]), "PIL rotated + CMYK")


def test_served_scores_equal_numpy_reference(client):
    img = client.embed_images([_img(i) for i in range(3)])
    txt = client.embed_texts(TEXTS)
    s_i, s_t = client.score(img, txt), client.score(img, txt, direction="t2i")
    for i in range(len(img)):
        for j in range(len(txt)):
            x = img.tokens[i, :img.lengths[i]].astype(np.float64)
            y = txt.tokens[j, :txt.lengths[j]].astype(np.float64)
            assert abs(s_i[i, j] - s_i_ref(x, y)) < 1e-5
            assert abs(s_t[i, j] - s_t_ref(x, y)) < 1e-5
    assert not np.allclose(s_i, s_t)


def test_batching_and_concurrency_invariance(served, client):
    texts = [f"caption {i}: " + "word " * (i % 13) for i in range(64)]
    whole = client.embed_texts(texts, batch_size=64)
    ones = client.embed_texts(texts, batch_size=1)     # 64 requests, 4 in flight
    with ThreadPoolExecutor(8) as ex:                  # 64 requests from 8 threads
        threaded = list(ex.map(lambda t: client.embed_texts([t]), texts))
    for i, t in enumerate(threaded):
        n = whole.lengths[i]
        assert t.lengths[0] == n
        assert np.abs(t.tokens[0, :n] - whole.tokens[i, :n]).max() < 1e-5
        assert np.abs(ones.tokens[i, :n] - whole.tokens[i, :n]).max() < 1e-5
    imgs = [_img(i) for i in range(12)]
    a, b = client.embed_images(imgs, batch_size=12), client.embed_images(imgs, batch_size=1)
    assert np.abs(a.tokens - b.tokens).max() < 1e-5


def test_async_equals_sync(served, client):
    async def run():
        async with AsyncFilipClient(served[0].url, timeout=30) as ac:
            t = await ac.embed_texts(TEXTS, batch_size=2)
            i = await ac.embed_images([_img(1), _img(2)], batch_size=1)
            return t, i, await ac.score(i, t), await ac.classify(i, ["cat", "dog"]), await ac.health(deep=True)
    t, i, s, c, h = asyncio.run(run())
    assert np.abs(t.tokens - client.embed_texts(TEXTS).tokens).max() < 1e-6
    assert np.abs(i.tokens - client.embed_images([_img(1), _img(2)]).tokens).max() < 1e-6
    assert np.abs(s - client.score(i, t)).max() < 1e-6
    assert np.abs(c - client.classify(i, ["cat", "dog"])).max() < 1e-6
    assert h.ok and h.canaries is not None


def test_classify_and_alignment(served, client):
    img = client.embed_images([_img(3), _img(4)])
    templates = ("a photo of a {}.", "a sketch of a {}.")
    got = client.classify(img, ["cat", "dog", "car"], templates=templates)
    want = served[1].classify(served[1].embed_images([_img(3), _img(4)]), ["cat", "dog", "car"], templates=templates)
    assert np.abs(got - want).max() < 1e-4
    probs = client.classify(img, ["cat", "dog", "car"], mode="softmax")
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    txt = client.embed_texts(["a cat on a mat"])
    amap = client.alignment(img, txt)
    want_map = served[1].alignment(served[1].embed_images([_img(3)]), served[1].embed_texts(["a cat on a mat"]))
    assert amap.shape == (4, 4) and np.array_equal(amap, want_map)


# --- bad input fails alone ---------------------------------------------------------------
def _raw_text(c: grpc.InferenceServerClient, texts: list[bytes]):
    arr = np.array(texts, dtype=object).reshape(-1, 1)
    inp = grpc.InferInput("TEXT", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return c.infer("filip_text", [inp])


def _raw_image(c, blobs: list[bytes]):
    arr = np.array(blobs, dtype=object).reshape(-1, 1)
    inp = grpc.InferInput("IMAGE", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return c.infer("filip_image", [inp])


def _raw_pixels(c, arr: np.ndarray, dtype: str):
    inp = grpc.InferInput("PIXEL_VALUES", list(arr.shape), dtype)
    inp.set_data_from_numpy(arr)
    return c.infer("filip_image", [inp])


def _bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG header declaring width x height pixels, with almost no data behind it."""
    import struct
    import zlib
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


BAD = {
    "decompression bomb": lambda c: _raw_image(c, [_bomb_png()]),
    "corrupt image": lambda c: _raw_image(c, [b"\x89PNG\r\n\x1a\n" + b"garbage" * 20]),
    "zero-byte image": lambda c: _raw_image(c, [b""]),
    "empty text": lambda c: _raw_text(c, [b""]),
    "5000-char text": lambda c: _raw_text(c, [b"x" * 5000]),
    "invalid utf-8": lambda c: _raw_text(c, [b"\xff\xfe"]),
    "wrong pixel shape": lambda c: _raw_pixels(c, np.zeros((1, 3, 16, 16), np.float32), "FP32"),
    "wrong pixel dtype": lambda c: _raw_pixels(c, np.zeros((1, 3, 32, 32), np.float64), "FP64"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_is_invalid_argument(served, case):
    c = grpc.InferenceServerClient(served[0].url)
    with pytest.raises(Exception) as ei:
        BAD[case](c)
    assert "INVALID_ARGUMENT" in str(ei.value.status()), (case, ei.value)
    assert len(ei.value.message()) > 10


def test_bad_requests_fail_alone_in_one_dynamic_batch(served):
    """Good and bad requests sent together (the batcher groups them): each bad one fails with
    INVALID_ARGUMENT, each good one equals its solo result, and the server keeps answering."""
    url = served[0].url
    good_png = _png(_img(9))
    solo_text = _raw_text(grpc.InferenceServerClient(url), [b"a good caption"]).as_numpy("POOLED")
    solo_img = _raw_image(grpc.InferenceServerClient(url), [good_png]).as_numpy("POOLED")
    jobs = []
    for k in range(6):
        jobs += [("text", None), ("image", None), ("bad", sorted(BAD)[k % len(BAD)])]

    def run(job):
        kind, case = job
        c = grpc.InferenceServerClient(url)
        try:
            if kind == "text":
                return kind, _raw_text(c, [b"a good caption"]).as_numpy("POOLED")
            if kind == "image":
                return kind, _raw_image(c, [good_png]).as_numpy("POOLED")
            BAD[case](c)
            return kind, "no error"
        except Exception as e:
            return kind, str(getattr(e, "status", lambda: "")())

    with ThreadPoolExecutor(len(jobs)) as ex:
        results = list(ex.map(run, jobs))
    for kind, res in results:
        if kind == "bad":
            assert "INVALID_ARGUMENT" in res, res
        else:
            want = solo_text if kind == "text" else solo_img
            assert isinstance(res, np.ndarray) and np.abs(res - want).max() < 1e-5, (kind, res)
    assert served[0].proc.poll() is None
    assert grpc.InferenceServerClient(url).is_server_ready()


def test_a_batch_that_formed_serves_its_good_requests(tiny_checkpoint, tmp_path):
    """Proof that good and bad requests shared one execution: with a long batching delay the
    batcher holds six concurrent image requests (three good, three bad) and runs them as one
    batch of six (Triton's statistics: one execution, batch size 6); each bad one fails alone
    with INVALID_ARGUMENT, each good one equals its solo result."""
    repo = tmp_path / "repo"
    assert export_main([str(tiny_checkpoint), "--out", str(repo), "--max-batch", "16", "--queue-delay-us", "300000"]) == 0
    good = _png(_img(9))
    bad = ["corrupt image", "zero-byte image", "decompression bomb"]
    with TritonServer(repo) as server:
        stats_client = grpc.InferenceServerClient(server.url)
        solo = _raw_image(stats_client, [good]).as_numpy("POOLED")

        def stats():
            s = stats_client.get_inference_statistics("filip_image", as_json=True)["model_stats"][0]
            return int(s.get("execution_count", 0)), {int(b["batch_size"]): int(b["compute_infer"]["count"])
                                                      for b in s.get("batch_stats", [])}

        def run(job):
            c = grpc.InferenceServerClient(server.url)
            try:
                return job, (_raw_image(c, [good]).as_numpy("POOLED") if job == "good" else BAD[job](c))
            except Exception as e:
                return job, str(getattr(e, "status", lambda: "")())

        executions, batches = stats()
        with ThreadPoolExecutor(6) as ex:
            results = list(ex.map(run, ["good"] * 3 + bad))
        executions2, batches2 = stats()
    assert executions2 - executions == 1, (executions, executions2)
    assert batches2.get(6, 0) - batches.get(6, 0) == 1, (batches, batches2)
    for job, res in results:
        if job == "good":
            assert isinstance(res, np.ndarray) and np.abs(res - solo).max() < 1e-5, res
        else:
            assert "INVALID_ARGUMENT" in res, (job, res)


def test_client_errors(served, client):
    with pytest.raises(FilipServerError, match="unknown model|not found"):
        client._call("no_such_model", [], [], None, "probe")
    with pytest.raises(FilipInvalidInputError, match="server|INVALID|could not|image 0"):
        client.embed_images([b"\x89PNG\r\n\x1a\nbroken"])
    with pytest.raises(FilipInvalidInputError, match="text 1 is empty"):
        client.embed_texts(["ok", "  "])               # refused before sending
    with pytest.raises(FilipInvalidInputError, match="image 0 is empty"):
        client.embed_images([b""])
    with pytest.raises(FilipInvalidInputError, match="cannot read"):
        client.embed_images(["/no/such/file.jpg"])
    with pytest.raises(FilipInvalidInputError, match="5000 characters"):
        client.embed_texts(["x" * 5000])
    assert client.health().ok
