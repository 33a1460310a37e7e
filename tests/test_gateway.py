"""The OpenAI-compatible HTTP gateway (client/filip_gateway) against a real tritonserver on a
tiny exported repository: the official ``openai`` client, every kind of bad input, order under
concurrency, FILIP's explanations against filip_score, metrics, the real ``filip-gateway``
command, and the search page in a real headless browser (Debian's chromium via Playwright)."""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filip_client import FilipClient
from filip_client.errors import (FilipConnectionError, FilipInvalidInputError, FilipOverloadedError, FilipServerError,
                                 FilipTimeoutError)
from filip_export.launch import TritonServer, free_ports
from filip_export.to_trt import main as export_main
from filip_gateway import explain as X
from filip_gateway.app import GatewaySettings, create_app, decode_data_uri
from filip_gateway.errors import GatewayError, from_filip

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "goldens" / "images"
PHOTOS = ["chelsea_rgb_200x133.png", "coffee_rgb_640x427.jpg", "astronaut_rgb_256x256.png", "hopper_rgb_342x400.jpg",
          "shapes_rgb_320x240.png"]
KEY = "sk-test-key"
MAX_IMAGE_BYTES, MAX_ITEMS = 300_000, 16          # the tiny repository's served limits
TEXTS = ["a photo of a cat", "two dogs playing in the snow", "中文 caption 🐱", "The QUICK brown fox's tail"]


def data_uri(path: Path) -> str:
    mime = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}[path.suffix.lower()]
    return f"data:image/{mime};base64," + base64.b64encode(path.read_bytes()).decode()


# --- without a server ------------------------------------------------------------------------------
def test_the_gateway_imports_neither_torch_nor_the_engine():
    code = ("import sys, filip_gateway, filip_gateway.app, filip_gateway.cli, filip_gateway.explain\n"
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'faiss', 'filip_engine', 'filip_export', 'tools') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_client_errors_map_to_http():
    cases = [(FilipInvalidInputError("text 0 is empty"), 400, "invalid_input"),
             (FilipInvalidInputError("image 0 has 9 bytes; the limit is 4"), 413, "payload_too_large"),
             (FilipOverloadedError("queue full", "UNAVAILABLE"), 503, "overloaded"),
             (FilipServerError("no gallery is loaded", "INTERNAL"), 503, "server_error"),
             (FilipConnectionError("failed to connect"), 502, "upstream_unreachable"),
             (FilipTimeoutError("Deadline Exceeded"), 504, "timeout")]
    for err, status, code in cases:
        g = from_filip(err)
        assert (g.status, g.code) == (status, code), err
        assert set(g.body()["error"]) == {"message", "type", "param", "code"}
    assert from_filip(FilipOverloadedError("x")).headers == {"Retry-After": "1"}


def test_data_uris_are_checked():
    png = (IMAGES / PHOTOS[0]).read_bytes()
    assert decode_data_uri("data:image/png;base64," + base64.b64encode(png).decode(), "x", 10**6) == png
    for bad, code in [("data:image/png;base64,@@@", "invalid_base64"), ("data:text/plain;base64,aGk=", "invalid_data_uri"),
                      ("data:image/png,rawbytes", "invalid_data_uri"), ("data:image/png;base64,", "invalid_image")]:
        with pytest.raises(GatewayError) as e:
            decode_data_uri(bad, "input[0]", 10**6)
        assert e.value.status == 400 and e.value.code == code, bad
    with pytest.raises(GatewayError) as e:
        decode_data_uri("data:image/png;base64," + base64.b64encode(png).decode(), "x", 100)
    assert e.value.status == 413


def test_explanation_sums_to_s_t_and_labels_follow_the_word_counts():
    rng = np.random.default_rng(0)
    x = X_norm(rng.standard_normal((16, 8)))
    y = X_norm(rng.standard_normal((6, 8)))
    e = X.explain_pair(x, y)
    sim = x.astype(np.float64) @ y.T.astype(np.float64)
    assert abs(e["s_t"] - sim.max(axis=0).mean()) < 1e-12 and e["grid"] == (4, 4)
    assert np.array_equal(e["best_patch"], sim.argmax(axis=0)) and np.array_equal(e["patch_alignment"], sim.argmax(axis=1))
    tokens, words, exact = X.label_tokens(6, ["a", "whiskers", "cat"], [1, 2, 1])
    assert exact and [t["label"] for t in tokens] == ["<|startoftext|>", "a", "whiskers#1", "whiskers#2", "cat", "<|endoftext|>"]
    assert [w["tokens"] for w in words] == [[1], [2, 3], [4]]
    tokens, words, exact = X.label_tokens(6, ["a", "b"], None)
    assert not exact and [t["label"] for t in tokens][1:5] == ["token 1", "token 2", "token 3", "token 4"]
    assert X.words_of("A cat's  whiskers, 12!") == ["a", "cat", "'s", "whiskers", ",", "1", "2", "!"]


def X_norm(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def test_an_unreachable_triton_is_a_502_and_health_a_503():
    from fastapi.testclient import TestClient
    (port,) = free_ports(1)
    app = create_app(GatewaySettings(triton=f"127.0.0.1:{port}", timeout=5))
    with TestClient(app) as c:
        r = c.post("/v1/embeddings", json={"input": "a cat", "model": "filip"})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable", r.text
        assert "Traceback" not in r.text
        assert c.get("/health").status_code == 503
        assert c.get("/v1/models").json()["data"][0]["id"] == "filip"


# --- a real server ----------------------------------------------------------------------------------
class InProcessGateway:
    """The gateway's app served by uvicorn in a thread on a free loopback port."""

    def __init__(self, settings: GatewaySettings):
        import uvicorn
        (self.port,) = free_ports(1)
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the gateway did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    repo = tmp_path_factory.mktemp("gateway") / "triton_models"
    assert export_main([str(tiny_checkpoint), "--out", str(repo), "--max-batch", "16",
                        "--limit", f"max_image_bytes={MAX_IMAGE_BYTES}", "--limit", f"max_items_per_request={MAX_ITEMS}"]) == 0
    with TritonServer(repo) as server:
        yield server
        assert server.proc.poll() is None, "the server died during the tests"


@pytest.fixture(scope="module")
def grpc_client(served):
    with FilipClient(served.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def gateway(served):
    with InProcessGateway(GatewaySettings(triton=served.url, api_keys=(KEY,), timeout=30)) as g:
        yield g


@pytest.fixture(scope="module")
def oai(gateway):
    import openai
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(gateway):
    import httpx
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def gallery(served, grpc_client, tmp_path_factory):
    """A few real photographs indexed on the server (their recorded paths readable by the
    gateway), plus one whose file is deleted afterwards (the gateway cannot read it)."""
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        shutil.copy(IMAGES / name, folder / name)
    shutil.copy(IMAGES / "noise_rgb_128x96.png", folder / "zz_gone.png")
    report = grpc_client.index_images(folder, "gateway", on_server=True, progress=False)
    assert report.added == len(PHOTOS) + 1 and not report.failed
    (folder / "zz_gone.png").unlink()
    info = grpc_client.reload_gallery("gateway")
    assert info["count"] == len(PHOTOS) + 1
    return folder


def _vec(e) -> np.ndarray:
    return np.frombuffer(base64.b64decode(e), "<f4") if isinstance(e, str) else np.array(e, np.float32)


def _pooled(items: list, grpc_client) -> np.ndarray:
    """What the gRPC client gives for the same items (texts, or image files), in order."""
    out = []
    for it in items:
        out.append(grpc_client.embed_images([it]).pooled[0] if isinstance(it, Path) else grpc_client.embed_texts([it]).pooled[0])
    return np.stack(out)


@pytest.mark.slow
@pytest.mark.parametrize("encoding", ["float", "base64", None])
def test_openai_embeddings_equal_the_grpc_client(oai, grpc_client, encoding):
    items = [TEXTS[0], IMAGES / PHOTOS[0], TEXTS[1], IMAGES / PHOTOS[1], TEXTS[2], IMAGES / PHOTOS[2], TEXTS[3]]
    inputs = [data_uri(it) if isinstance(it, Path) else it for it in items]
    kw = {} if encoding is None else {"encoding_format": encoding}     # None: the client's default (base64)
    r = oai.embeddings.create(input=inputs, model="filip", **kw)
    # asked for explicitly, base64 comes back as it is sent; by default the client decodes it
    got = np.stack([_vec(d.embedding) for d in r.data])
    assert [d.index for d in r.data] == list(range(len(items))) and r.model == "filip"
    want = _pooled(items, grpc_client)
    assert np.abs(got - want).max() < 1e-5
    texts = [it for it in items if isinstance(it, str)]
    assert r.usage.prompt_tokens == int(grpc_client.embed_texts(texts).lengths.sum())
    one = oai.embeddings.create(input=TEXTS[0], model="filip", **kw)
    assert len(one.data) == 1 and np.abs(_vec(one.data[0].embedding) - want[0]).max() < 1e-5


@pytest.mark.slow
def test_token_embeddings_extension(http, grpc_client):
    for fmt in ("float", "base64"):
        r = http.post("/v1/embeddings", json={"input": [TEXTS[1], data_uri(IMAGES / PHOTOS[0])], "model": "filip",
                                              "encoding_format": fmt, "filip": {"tokens": True}})
        assert r.status_code == 200, r.text
        t, i = r.json()["data"]
        want_t, want_i = grpc_client.embed_texts([TEXTS[1]]), grpc_client.embed_images([IMAGES / PHOTOS[0]])
        for d, want in ((t, want_t), (i, want_i)):
            n = int(want.lengths[0])
            f = d["filip"]
            assert f["length"] == n and f["shape"] == [n, want.tokens.shape[2]]
            tok = (np.frombuffer(base64.b64decode(f["tokens"]), "<f4") if fmt == "base64" else np.array(f["tokens"])).reshape(n, -1)
            assert np.abs(tok - want.tokens[0, :n]).max() < 1e-5
        assert t["filip"]["kind"] == "text" and i["filip"]["kind"] == "image"


@pytest.mark.slow
def test_api_keys(gateway, http):
    import httpx
    import openai
    bad = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(input="a cat", model="filip")
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(gateway.url + "/v1/embeddings", json={"input": "a cat"})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(gateway.url + "/health").status_code == 200            # open: an orchestrator's probe
    assert httpx.get(gateway.url + "/metrics").status_code == 200
    assert http.get("/v1/models").json()["data"][0]["id"] == "filip"


def _bad_inputs() -> list[tuple[str, object, int, str]]:
    png = data_uri(IMAGES / PHOTOS[0])
    big = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + os.urandom(MAX_IMAGE_BYTES)).decode()
    return [
        ("bad base64", {"input": ["data:image/png;base64,!!not base64!!"]}, 400, "invalid_base64"),
        ("non-image data URI", {"input": ["data:text/plain;base64,aGVsbG8="]}, 400, "invalid_data_uri"),
        ("not an image", {"input": ["data:image/png;base64," + base64.b64encode(b"hello world").decode()]}, 400, "invalid_input"),
        ("empty string", {"input": ""}, 400, "empty_input"),
        ("blank item", {"input": ["a cat", "   "]}, 400, "empty_input"),
        ("empty list", {"input": []}, 400, "empty_input"),
        ("too-long text", {"input": ["x" * 2001]}, 400, "text_too_long"),
        ("too many items", {"input": ["a cat"] * (MAX_ITEMS + 1)}, 400, "too_many_items"),
        ("an image over the limit", {"input": [big]}, 413, "payload_too_large"),
        ("token ids", {"input": [1, 2, 3]}, 400, "invalid_type"),
        ("a number", {"input": 5}, 400, "invalid_type"),
        ("null input", {"input": None}, 400, "invalid_type"),
        ("no input", {"model": "filip"}, 400, "invalid_type"),
        ("wrong encoding", {"input": "a cat", "encoding_format": "hex"}, 400, "invalid_type"),
        ("unknown field", {"input": "a cat", "temperature": 1}, 400, "unknown_parameter"),
        ("unknown model", {"input": "a cat", "model": "gpt-4"}, 404, "model_not_found"),
        ("a list body", ["a cat"], 400, "invalid_json"),
        ("wrong dimensions", {"input": "a cat", "dimensions": 3}, 400, "invalid_value"),
        ("wrong extension type", {"input": "a cat", "filip": {"tokens": "yes"}}, 400, "invalid_type"),
        ("a good image beside a bad one", {"input": [png, "data:image/png;base64,AAAA"]}, 400, "invalid_input"),
    ]


@pytest.mark.slow
def test_every_kind_of_bad_input_is_a_4xx_and_the_gateway_keeps_serving(http, oai):
    import openai
    before = _metrics(http)
    for name, body, status, code in _bad_inputs():
        r = http.post("/v1/embeddings", json=body)
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and set(err) == {"message", "type", "param", "code"}, (name, err)
        assert "Traceback" not in r.text and 'File "' not in r.text, name
        assert oai.embeddings.create(input="still serving", model="filip").data, name
    for name, raw in [("not JSON", b"{input: cat"), ("not UTF-8", b"\xff\xfe{}")]:
        r = http.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", name
    huge = b'{"input": "' + b"a" * (8 * 1024 * 1024) + b'"}'           # over the body limit the served limits give
    r = http.post("/v1/embeddings", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks():                                                      # no Content-Length: counted while read
        yield b'{"input": "'
        for _ in range(9):
            yield b"a" * (1024 * 1024)
        yield b'"}'
    r = http.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    with pytest.raises(openai.BadRequestError):
        oai.embeddings.create(input=["data:image/png;base64,!!"], model="filip")
    for path, body in [("/v1/score", {"images": "x", "texts": ["a"]}), ("/v1/score", {"images": ["!!"], "texts": ["a"]}),
                       ("/v1/classify", {"images": [data_uri(IMAGES / PHOTOS[0])], "labels": []}),
                       ("/v1/search", {"query": "a cat", "k": "ten"}), ("/v1/search", {"query": "a cat", "k": 0}),
                       ("/v1/search", {"query": "a cat", "mode": "fuzzy"}),
                       ("/v1/explain", {"text": "a cat"}), ("/v1/explain", {"text": "a cat", "image": "@@"}),
                       ("/v1/explain", {"text": "", "image": data_uri(IMAGES / PHOTOS[0])})]:
        r = http.post(path, json=body)
        assert r.status_code == 400, (path, body, r.text)
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/health").json()["ok"]
    after = _metrics(http)
    key = 'filip_gateway_errors_total{code="payload_too_large",endpoint="/v1/embeddings",status="413"}'
    assert after[key] - before.get(key, 0) == 3          # the big image, the huge body, the chunked one


@pytest.mark.slow
def test_a_passed_deadline_is_a_504(served):
    from fastapi.testclient import TestClient
    with TestClient(create_app(GatewaySettings(triton=served.url, timeout=1e-4))) as c:
        r = c.post("/v1/embeddings", json={"input": "a cat"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text


@pytest.mark.slow
def test_concurrent_requests_keep_order(oai, grpc_client):
    items = [f"caption number {i} " + "word " * (i % 7) for i in range(24)] + [IMAGES / p for p in PHOTOS]
    want = {i: v for i, v in enumerate(_pooled(items, grpc_client))}
    rng = np.random.default_rng(1)
    jobs = [list(rng.choice(len(items), size=int(rng.integers(1, 6)), replace=False)) for _ in range(64)]

    def one(job):
        r = oai.embeddings.create(input=[data_uri(items[i]) if isinstance(items[i], Path) else items[i] for i in job],
                                  model="filip")
        return job, np.array([d.embedding for d in r.data], np.float32), [d.index for d in r.data]

    with ThreadPoolExecutor(16) as ex:
        for job, got, idx in ex.map(one, jobs):
            assert idx == list(range(len(job)))
            assert np.abs(got - np.stack([want[i] for i in job])).max() < 1e-5, job


def _metrics(http) -> dict[str, float]:
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@pytest.mark.slow
def test_explain_contributions_sum_to_the_served_s_t(http, grpc_client):
    before = _metrics(http)
    text = "a cat's whiskers on the snow"
    for name in PHOTOS[:3]:
        r = http.post("/v1/explain", json={"text": text, "image": data_uri(IMAGES / name), "render": True})
        assert r.status_code == 200, r.text
        b = r.json()
        img, txt = grpc_client.embed_images([IMAGES / name]), grpc_client.embed_texts([text])
        s_t = float(grpc_client.score(img, txt, scoring="token", direction="t2i")[0, 0])
        contrib = [t["contribution"] for t in b["tokens"]]
        assert len(contrib) == int(txt.lengths[0]) == b["n_text_tokens"]
        assert abs(sum(contrib) - s_t) < 1e-5 and abs(b["s_t_served"] - s_t) < 1e-6
        align = grpc_client.alignment(img, txt)                      # filip_score's ALIGNMENT on the grid
        assert np.array_equal(np.array(b["patch_alignment"]), align)
        # each token's best patch: the argmax of its column of the similarity matrix; where
        # ALIGNMENT assigns a patch to a token, that token's best patch is one of them or scores at least as high
        sim = img.tokens[0].astype(np.float64) @ txt.tokens[0, :txt.lengths[0]].astype(np.float64).T
        rows, cols = b["grid"]
        assert rows * cols == sim.shape[0]
        for t in b["tokens"]:
            r_ = t["index"]
            assert t["best_patch"] == int(sim[:, r_].argmax())
            assert t["best_patch_rc"] == [t["best_patch"] // cols, t["best_patch"] % cols]
            owned = np.flatnonzero(align.reshape(-1) == r_)
            if owned.size:
                assert sim[t["best_patch"], r_] >= sim[owned, r_].max() - 1e-6
            assert abs(t["contribution"] - sim[:, r_].max() / sim.shape[1]) < 1e-6
            assert np.allclose(np.array(t["heatmap"]).reshape(-1), sim[:, r_], atol=1e-6)
            png = Image.open(io.BytesIO(base64.b64decode(t["overlay_png"])))
            assert png.size == (b["image_size"], b["image_size"])
        assert [t["label"] for t in b["tokens"]][0] == "<|startoftext|>" and b["labels_exact"]
        assert {w["word"] for w in b["words"]} >= {"cat", "whiskers", "snow"}
        assert abs(sum(w["contribution"] for w in b["words"]) + contrib[0] + contrib[-1] - s_t) < 1e-5
    bad = http.post("/v1/explain", json={"text": text, "image": "data:image/png;base64,!!"})
    assert bad.status_code == 400
    after = _metrics(http)
    key = 'filip_gateway_requests_total{endpoint="/v1/explain",method="POST",status="200"}'
    assert after[key] - before.get(key, 0) == 3
    err = 'filip_gateway_errors_total{code="invalid_base64",endpoint="/v1/explain",status="400"}'
    assert after[err] - before.get(err, 0) == 1
    lat = 'filip_gateway_request_seconds_count{endpoint="/v1/explain"}'
    assert after[lat] - before.get(lat, 0) == 4


@pytest.mark.slow
def test_score_classify_and_search_are_twins_of_the_client(http, grpc_client, gallery):
    imgs = [IMAGES / p for p in PHOTOS[:3]]
    texts = ["a cat", "a cup of coffee"]
    ie, te = grpc_client.embed_images(imgs), grpc_client.embed_texts(texts)
    for scoring, direction in [(None, "i2t"), ("token", "t2i"), ("global", "i2t")]:
        r = http.post("/v1/score", json={"images": [data_uri(p) for p in imgs], "texts": texts, "scoring": scoring,
                                         "direction": direction})
        assert r.status_code == 200, r.text
        want = grpc_client.score(ie, te, scoring=scoring, direction=direction)
        assert np.abs(np.array(r.json()["scores"]) - want).max() < 1e-5
        assert r.json()["scoring"] == (scoring or grpc_client.default_scoring())
    r = http.post("/v1/classify", json={"images": [base64.b64encode(p.read_bytes()).decode() for p in imgs],
                                        "labels": ["cat", "coffee", "astronaut"], "templates": ["a photo of a {}."]})
    want = grpc_client.classify(imgs, ["cat", "coffee", "astronaut"], templates=["a photo of a {}."])
    assert r.status_code == 200 and np.abs(np.array(r.json()["scores"]) - want).max() < 1e-5
    for body in [{"query": "a cat", "k": 3}, {"query": ["a cat", "coffee"], "k": 2, "mode": "two_stage", "candidates": 4},
                 {"query": "a cat", "allowed_ids": [PHOTOS[1], PHOTOS[2]], "scoring": "global"}]:
        r = http.post("/v1/search", json=body)
        assert r.status_code == 200, r.text
        q = [body["query"]] if isinstance(body["query"], str) else body["query"]
        want = grpc_client.search(q, k=body.get("k", 10), mode=body.get("mode", "exact"), candidates=body.get("candidates"),
                                  allowed_ids=body.get("allowed_ids"), scoring=body.get("scoring"))
        got = r.json()["results"] if isinstance(body["query"], list) else [r.json()["results"]]
        assert [[h["id"] for h in row] for row in got] == [[h.id for h in row] for row in want]
        assert np.allclose([h["score"] for row in got for h in row], [h.score for row in want for h in row], atol=1e-6)
    r = http.post("/v1/search", json={"query": "a cat on a sofa", "k": 10, "explain": True})
    hits = r.json()["results"]
    assert len(hits) == len(PHOTOS) + 1
    gone = next(h for h in hits if h["id"] == "zz_gone.png")
    assert gone["explain"] is None and "cannot read" in gone["image_error"]
    for h in hits:
        if h["id"] != "zz_gone.png":
            # s_T of the photo as read now vs the gallery's stored (float16) tokens
            assert abs(h["explain"]["s_t"] - h["score"]) < 2e-3, h["id"]
    png = http.get("/v1/gallery/image", params={"id": PHOTOS[0], "size": 64})
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (64, 64)
    assert http.get("/v1/gallery/image", params={"id": "zz_gone.png"}).status_code == 404
    assert http.get("/v1/gallery/image", params={"id": "no such item"}).json()["error"]["code"] == "item_not_found"
    r = http.post("/v1/explain", json={"text": "a cat", "item_id": PHOTOS[0]})
    want = grpc_client.score(grpc_client.embed_images([gallery / PHOTOS[0]]), grpc_client.embed_texts(["a cat"]),
                             scoring="token", direction="t2i")[0, 0]
    assert r.status_code == 200 and abs(r.json()["s_t"] - want) < 1e-5


@pytest.mark.slow
def test_a_forced_internal_error_reaches_no_caller_as_a_traceback(gateway, http):
    gw = gateway.app.state.gateway
    real = gw.client.embed_texts

    async def broken(*a, **kw):
        raise RuntimeError("SECRET internal detail /etc/passwd")

    gw.client.embed_texts = broken
    try:
        r = http.post("/v1/embeddings", json={"input": "a cat", "model": "filip"})
    finally:
        gw.client.embed_texts = real
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "internal_error" and err["type"] == "server_error" and re.search(r"request [0-9a-f]{12}", err["message"])
    assert "SECRET" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
    assert http.post("/v1/embeddings", json={"input": "a cat"}).status_code == 200


@pytest.mark.slow
def test_the_filip_gateway_command(served, grpc_client, tmp_path):
    import httpx
    import openai
    exe = Path(sys.executable).parent / "filip-gateway"
    assert exe.exists(), "pip install -e './client[gateway]' installs the filip-gateway command"
    (port,) = free_ports(1)
    log = open(tmp_path / "gateway.log", "wb")
    proc = subprocess.Popen([str(exe), "--triton", served.url, "--port", str(port), "--api-key", "k1", "--api-key", "k2"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        for key in ("k1", "k2"):
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
            r = c.embeddings.create(input=["a cat", data_uri(IMAGES / PHOTOS[0])], model="filip")
            assert np.abs(np.array(r.data[0].embedding) - grpc_client.embed_texts(["a cat"]).pooled[0]).max() < 1e-5
        assert httpx.get(f"http://127.0.0.1:{port}/").text.startswith("<!doctype html>")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


# --- the search page in a real browser ---------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"


def _browser_context(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (Debian: apt-get install chromium; `make venv` tries it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (it is in the dev extra)")
    pw = sync_playwright().start()
    try:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            viewport={"width": 1280, "height": 900})
    except Exception as e:
        pw.stop()
        pytest.skip(f"chromium cannot be started here: {str(e).splitlines()[0]}")
    return pw, ctx


def _coloured(region: Image.Image, before: Image.Image) -> float:
    """Share of the region's pixels the overlay changed into a warm colour (red/yellow ramp)."""
    a = np.asarray(region.convert("RGB"), np.int32)
    b = np.asarray(before.convert("RGB"), np.int32)
    changed = np.abs(a - b).max(axis=2) > 24
    warm = (a[..., 0] > a[..., 2] + 20)
    return float((changed & warm).mean())


@pytest.mark.slow
def test_the_search_page_in_a_real_browser(gateway, gallery, tmp_path):
    pw, ctx = _browser_context(tmp_path)
    try:
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        page.goto(gateway.url + "/")
        page.fill("#key", KEY)
        page.fill("#query", "a cat sitting on a sofa")
        page.press("#query", "Enter")
        page.wait_for_selector("#status[data-state=done]", timeout=60_000)
        assert page.locator(".hit").count() == len(PHOTOS) + 1
        assert page.locator(".frame img").count() == len(PHOTOS)
        assert "not readable by the gateway" in page.locator(".frame.missing").first.inner_text()
        first = page.locator(".frame:has(canvas.overlay)").first       # the first hit whose image the gateway read
        box = first.bounding_box()
        clip = (int(box["x"]), int(box["y"]), int(box["x"] + box["width"]), int(box["y"] + box["height"]))
        shot0 = tmp_path / "page-before.png"
        page.screenshot(path=str(shot0))
        alpha0 = page.evaluate("Array.from(document.querySelector('canvas.overlay').getContext('2d')"
                               ".getImageData(0, 0, 224, 224).data).filter((v, i) => i % 4 === 3 && v > 0).length")
        word = page.locator(".word", has_text="cat").first
        word.hover()
        page.wait_for_selector("#hits[data-heatmap]:not([data-heatmap=''])")
        shot = tmp_path / "gateway-page.png"
        page.screenshot(path=str(shot))
        (ROOT / "build").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "build" / "gateway-page.png")
        alpha1 = page.evaluate("Array.from(document.querySelector('canvas.overlay').getContext('2d')"
                               ".getImageData(0, 0, 224, 224).data).filter((v, i) => i % 4 === 3 && v > 0).length")
        assert alpha0 == 0 and alpha1 == 224 * 224, (alpha0, alpha1)
        before, after = Image.open(shot0).crop(clip), Image.open(shot).crop(clip)
        share = _coloured(after, before)
        print(f"heatmap overlay: {share:.0%} of the first image's pixels turned warm; screenshot {shot}")
        assert share > 0.2, share
        assert _coloured(before, before) == 0.0
        assert "of s_T" in page.locator(".hit:has(canvas.overlay) .contrib").first.inner_text()
        word.click()                                   # pinned: stays after the pointer leaves
        page.mouse.move(5, 5)
        assert page.locator(".word.active").count() == 1
    finally:
        ctx.close()
        pw.stop()
