"""Gallery search through a real tritonserver: index images through the server, reload
without a restart, search (sync and async) equal to an independent brute force over the
served embeddings, and the failure cases (no gallery yet, corrupt gallery, bad requests)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from filip_client import AsyncFilipClient, FilipClient, FilipError, FilipInvalidInputError, FilipServerError
from filip_client.indexing import main as index_main
from filip_export.launch import TritonServer
from filip_export.to_trt import main as export_main


def brute_force_s_t(img_tokens: np.ndarray, q_tokens: np.ndarray, q_len: int) -> np.ndarray:
    sims = np.einsum("npd,td->ntp", img_tokens.astype(np.float64), q_tokens[:q_len].astype(np.float64))
    return sims.max(axis=2).mean(axis=1)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("served-search")
    repo = base / "triton_models"
    assert export_main([str(tiny_checkpoint), "--out", str(repo), "--max-batch", "8"]) == 0
    images = base / "photos"
    (images / "sub").mkdir(parents=True)
    for i in range(14):
        arr = np.random.default_rng(i).integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).save(images / ("sub" if i % 4 == 0 else "") / f"p{i:02d}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    with TritonServer(repo) as server:
        yield server, base, images
        assert server.proc.poll() is None, "the server died during the tests"


def test_search_before_any_gallery_is_a_clear_error(setup):
    server, _, _ = setup
    with FilipClient(server.url) as c:
        with pytest.raises(FilipServerError, match="no gallery is loaded") as e:   # the server's state, not the caller's
            c.search(["a cat"])
        assert not isinstance(e.value, FilipInvalidInputError) and "INTERNAL" in str(e.value.status)
        assert c.health().models["filip_search"] and c.health(deep=True).ok
        status = c.gallery_info()
        assert status["name"] is None and "no gallery at" in status["load_error"]


def test_index_reload_search(setup, capsys):
    server, base, images = setup
    gallery = base / "galleries" / "default"          # the default root: beside the repository
    assert index_main(["--url", server.url, "--gallery", str(gallery), "--commit-every", "5", "--no-progress",
                       str(images)]) == 1             # 1: one image failed, the rest indexed
    out = capsys.readouterr()
    assert "added 14" in out.out and "failed broken.jpg" in out.err
    with FilipClient(server.url) as c:
        again = c.index_images(images, gallery, progress=False)       # resumable: nothing new
        assert (again.added, again.skipped, len(again.failed), again.total) == (0, 14, 1, 14)
        info = c.reload_gallery("default")
        assert info["count"] == 14 and info["segments"] == 3
        assert c.gallery_info()["name"] == "default" and c.gallery_info()["count"] == 14
        texts = ["a photo of a cat", "noise", "two dogs in the snow"]
        hits = c.search(texts, k=5)
        assert [len(h) for h in hits] == [5, 5, 5]
        # independent check: brute force over embeddings fetched from the server itself
        files = sorted(p for p in images.rglob("*.png"))
        ids = [p.relative_to(images).as_posix() for p in files]
        img = c.embed_images([str(p) for p in files])
        tokens16 = img.tokens.astype(np.float16)                       # what the gallery stores
        txt = c.embed_texts(texts)
        for q, h in enumerate(hits):
            ref = brute_force_s_t(tokens16, txt.tokens[q], int(txt.lengths[q]))
            order = np.argsort(-ref, kind="stable")[:5]
            assert [x.id for x in h] == [ids[i] for i in order]
            np.testing.assert_allclose([x.score for x in h], ref[order], rtol=0, atol=1e-5)
            assert h[0].metadata["path"].endswith(h[0].id.split("/")[-1])
        two = c.search(texts, k=5, mode="two_stage", candidates=14)
        assert [[x.id for x in h] for h in two] == [[x.id for x in h] for h in hits]
        allowed = ids[3:6]
        filt = c.search(texts[:1], k=5, allowed_ids=allowed)
        assert sorted(x.id for x in filt[0]) == sorted(allowed)
        assert c.search(texts[:1], allowed_ids=[]) == [[]]
        assert [i["gallery"] for i in hits.info] == ["default"] and hits.info[0]["mode"] == "exact"

        async def run():
            async with AsyncFilipClient(server.url) as ac:
                report = await ac.index_images(images, base / "galleries" / "async", commit_every=6, progress=False)
                info = await ac.reload_gallery("async")
                return report, info, await ac.search(texts, k=5)
        report, info, async_hits = asyncio.run(run())
        assert (report.added, len(report.failed), info["count"], info["segments"]) == (14, 1, 14, 3)
        assert [[x.id for x in h] for h in async_hits] == [[x.id for x in h] for h in hits]
        np.testing.assert_allclose([[x.score for x in h] for h in async_hits], [[x.score for x in h] for h in hits],
                                   rtol=0, atol=1e-6)
        c.reload_gallery("default")


def test_index_on_the_server_needs_no_shared_filesystem(setup):
    """on_server=True: the client sends each segment's embeddings to filip_search, which writes
    the gallery under its own root with the contract's writer; what it stores is exactly what
    the client embedded (fp16), a second run adds nothing, and the gallery serves."""
    from filip_contract.gallery_reader import Gallery
    server, base, images = setup
    with FilipClient(server.url) as c:
        report = c.index_images(images, "remote", on_server=True, commit_every=5, progress=False)
        assert (report.added, report.skipped, list(report.failed), report.total) == (14, 0, ["broken.jpg"], 14)
        g = Gallery.open(base / "galleries" / "remote")               # on the server's side, verified
        assert g.count == 14 and len(g.segments) == 3
        files = sorted(p for p in images.rglob("*.png"))
        ids = [p.relative_to(images).as_posix() for p in files]
        emb = c.embed_images([str(p) for p in files])
        rows = np.array([g.ids.index(i) for i in ids])
        assert np.array_equal(g.raw_rows(rows)[0], emb.tokens.astype(np.float16))
        assert g.metadata(int(rows[0]))["path"] == str(files[0])
        again = c.index_images(images, "remote", on_server=True, progress=False)
        assert (again.added, again.skipped, again.total) == (0, 14, 14)
        assert c.reload_gallery("remote")["count"] == 14
        assert [h.id for h in c.search(["a photo of a cat"], k=14)[0]] and c.gallery_info()["name"] == "remote"
        with pytest.raises(FilipInvalidInputError, match="plain folder name"):
            c.index_images(images, "../outside", on_server=True, progress=False)
        with pytest.raises(FilipInvalidInputError, match="1 token rows for 2 ids"):
            import tritonclient.grpc as grpc
            from filip_client import _protocol as P
            c._call(P.SEARCH_MODEL, P.append_inputs(grpc, "remote", ["x", "y"], "float16", emb.tokens[:1], emb.pooled[:1]),
                    ["INFO"], 30, "append")

        async def run():
            async with AsyncFilipClient(server.url) as ac:
                return await ac.index_images(images, "remote-async", on_server=True, commit_every=7, progress=False)
        r = asyncio.run(run())
        assert (r.added, len(r.failed), r.total) == (14, 1, 14)
        assert Gallery.open(base / "galleries" / "remote-async").count == 14
        c.reload_gallery("default")


def test_a_bad_query_through_filip_search_is_the_callers_fault(setup):
    """filip_search checks its query texts itself (an error relayed from filip_text through BLS
    arrives as INTERNAL, whatever its code): a raw request with a blank query is INVALID_ARGUMENT."""
    import tritonclient.grpc as grpc
    server, _, _ = setup
    c = grpc.InferenceServerClient(server.url)
    for query in (b"   ", b"\xff\xfe", b"x" * 5000):
        text = grpc.InferInput("TEXT", [1], "BYTES")
        text.set_data_from_numpy(np.array([query], dtype=object))
        with pytest.raises(Exception) as e:
            c.infer("filip_search", [text])
        assert "INVALID_ARGUMENT" in str(e.value.status()), (query[:8], e.value)


def test_overload_of_filip_text_seen_through_search_is_overload(tiny_checkpoint, tmp_path):
    """With a queue bound of 1 on the encoders and filip_text flooded, searches whose BLS call
    filip_text refuses answer UNAVAILABLE (FilipOverloadedError, which clients retry), not a
    server or caller error."""
    import threading
    import time

    import tritonclient.grpc as grpc
    from filip_client import FilipOverloadedError
    repo = tmp_path / "triton_models"
    assert export_main([str(tiny_checkpoint), "--out", str(repo), "--max-batch", "2", "--max-queue-size", "1"]) == 0
    imgs = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(4)]
    with TritonServer(repo) as server:
        with FilipClient(server.url) as c:
            c.index_images(imgs, "default", ids=[f"i{i}" for i in range(4)], on_server=True, progress=False)
            c.reload_gallery("default")
        stop = time.monotonic() + 4

        def flood():
            cl = grpc.InferenceServerClient(server.url)
            x = grpc.InferInput("TEXT", [1, 1], "BYTES")
            x.set_data_from_numpy(np.array([b"word " * 300], dtype=object).reshape(1, 1))
            while time.monotonic() < stop:
                try:
                    cl.infer("filip_text", [x])
                except Exception:
                    pass
        threads = [threading.Thread(target=flood) for _ in range(16)]
        for t in threads:
            t.start()
        outcomes = []
        with FilipClient(server.url, max_retries=0, timeout=10) as c:
            while time.monotonic() < stop:
                try:
                    c.search(["a photo"], k=2)
                    outcomes.append("ok")
                except FilipError as e:
                    outcomes.append(type(e).__name__)
        for t in threads:
            t.join()
    kinds = set(outcomes)
    assert FilipOverloadedError.__name__ in kinds, outcomes[:20]
    assert kinds <= {"ok", FilipOverloadedError.__name__}, kinds


def test_corrupt_gallery_refused_and_previous_kept(setup):
    server, base, images = setup
    with FilipClient(server.url) as c:
        c.index_images(images, base / "galleries" / "second", commit_every=100, progress=False)
        before = c.search(["a photo of a cat"], k=3)
        seg = base / "galleries" / "second" / "segments" / "seg-000000.centroid.npy"
        b = bytearray(seg.read_bytes())
        b[-1] ^= 0x01
        seg.write_bytes(bytes(b))
        with pytest.raises(FilipServerError, match="checksum mismatch") as e:      # a corrupt gallery: server state
            c.reload_gallery("second")
        assert "INTERNAL" in str(e.value.status)
        with pytest.raises(FilipInvalidInputError, match="plain folder name"):
            c.reload_gallery("../galleries")
        assert c.search(["a photo of a cat"], k=3) == before          # still the first gallery
        for bad, match in [(dict(k=0), "k must be"), (dict(mode="fast"), "mode must be"),
                           (dict(candidates=0), "candidates must be")]:
            with pytest.raises(FilipInvalidInputError, match=match):
                c.search(["x"], **bad)
        with pytest.raises(FilipInvalidInputError, match="empty"):
            c.search(["   "])
        assert c.search(["a photo of a cat"], k=3) == before
