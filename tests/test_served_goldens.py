"""The served path against the real OpenCLIP: a small random OpenAI-layout CLIP (built and
run by OpenCLIP itself in the reference environment, tests/goldens/README.md) exported,
served by the real tritonserver and driven by the client, on every pixel mode the server
accepts; and CLIP's own zero-shot rule, which is the repository's default scoring for a CLIP
checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from filip_client import FilipClient
from filip_export.launch import TritonServer
from filip_export.to_trt import main as export_main

GOLDENS = Path(__file__).parent / "goldens"
MANIFEST = json.loads((GOLDENS / "manifest.json").read_text())
MODEL = np.load(GOLDENS / "model.npz")
ROW = {key: i for i, key in enumerate(MANIFEST["image_keys"])}
# every input, each against OpenCLIP's output for it (for a documented deviation: OpenCLIP's
# output after the engine's reading of the file, e.g. PA as RGBA)
EXACT = [e for e in MANIFEST["inputs"] if e["id"] in ROW]
KEY = {e["id"]: e["deviation"]["key"] if "deviation" in e else e["id"] for e in EXACT}

pytestmark = pytest.mark.slow


def min_token_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    repo = tmp_path_factory.mktemp("served-goldens") / "triton_models"
    assert export_main([str(GOLDENS / MANIFEST["model"]["file"]), "--out", str(repo), "--max-batch", "8"]) == 0
    with TritonServer(repo) as server, FilipClient(server.url, timeout=60) as c:
        yield c
        assert server.proc.poll() is None, "the server died during the tests"


def test_a_clip_checkpoint_is_served_with_global_scoring_by_default(client):
    params = client.model_config("filip_score")["parameters"]
    assert params["default_scoring"]["string_value"] == "global"
    assert client.model_config("filip_search")["parameters"]["default_scoring"]["string_value"] == "global"


@pytest.mark.parametrize("as_pil", [False, True], ids=["file", "pil"])
def test_served_image_embeddings_equal_openclip_in_every_mode(client, as_pil):
    """Files are sent as they are; PIL images (opened, not converted) go through the
    client's lossless encoding in their own mode. Both must give OpenCLIP's numbers."""
    worst = []
    for e in EXACT:
        path = GOLDENS / e["file"]
        item = Image.open(path) if as_pil else path
        got = client.embed_images([item])
        row = ROW[KEY[e["id"]]]
        tok = min_token_cosine(got.tokens[0], MODEL["image_tokens"][row])
        pooled = min_token_cosine(got.pooled, MODEL["image_pooled"][row:row + 1])
        worst.append((min(tok, pooled), e["id"], e["mode"]))
    worst.sort()
    print("lowest min cosines (served vs OpenCLIP):", [(f"{c:.7f}", i, m) for c, i, m in worst[:5]])
    assert len(worst) >= 30 and {m for _, _, m in worst} >= {"RGB", "L", "1", "P", "RGBA", "LA", "PA", "CMYK"}
    assert worst[0][0] >= 0.9999, worst[:5]


def test_served_zero_shot_by_clips_rule_equals_openclip(client):
    zs = MANIFEST["zeroshot"]
    files = [GOLDENS / next(e["file"] for e in MANIFEST["inputs"] if e["id"] == p) for p in zs["photos"]]
    got = client.classify(files, zs["classnames"], templates=zs["templates"])      # the default: global
    want = MODEL["zeroshot_cosines"]
    print(f"max |served - OpenCLIP| zero-shot cosine: {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() <= 1e-4
    assert np.array_equal(got.argmax(axis=1), MODEL["zeroshot_top1"])
    token = client.classify(files, zs["classnames"], templates=zs["templates"], scoring="token")
    assert np.abs(token - want).max() > 1e-3            # FILIP's rule on a CLIP is another number


def test_served_text_embeddings_equal_openclip(client):
    caps = MANIFEST["captions"]
    keep = [i for i, c in enumerate(caps) if c.strip()]          # the client refuses empty texts
    got = client.embed_texts([caps[i] for i in keep])
    lengths = MODEL["text_lengths"][keep]
    assert np.array_equal(got.lengths, lengths)
    for j, i in enumerate(keep):
        n = int(lengths[j])
        assert min_token_cosine(got.tokens[j, :n], MODEL["text_tokens"][i, :n]) >= 0.9999, caps[i]
    assert min_token_cosine(got.pooled, MODEL["text_pooled"][keep]) >= 0.9999


def test_served_global_score_and_search(client, tmp_path):
    """score(scoring="global") is the cosine of OpenCLIP's embeddings; a gallery indexed through
    the server and searched globally ranks as the brute-force cosine of OpenCLIP's embeddings."""
    photos = [e for e in EXACT if e["group"] == "photo" and "deviation" not in e][:6]
    images = client.embed_images([GOLDENS / e["file"] for e in photos])
    caps = [0, 6]                                        # two of the golden captions
    texts = client.embed_texts([MANIFEST["captions"][i] for i in caps])
    want = MODEL["image_pooled"][[ROW[e["id"]] for e in photos]] @ MODEL["text_pooled"][caps].T
    assert np.abs(client.score(images, texts) - want).max() <= 1e-4                # default: global
    folder = tmp_path / "photos"
    folder.mkdir()
    for e in photos:
        (folder / Path(e["file"]).name).write_bytes((GOLDENS / e["file"]).read_bytes())
    client.index_images(folder, "goldens", on_server=True, progress=False)
    client.reload_gallery("goldens")
    hits = client.search([MANIFEST["captions"][0]], k=3)
    assert hits.info[0]["scoring"] == "global"
    order = np.argsort(-want[:, 0], kind="stable")[:3]
    assert [h.id for h in hits[0]] == [Path(photos[r]["file"]).name for r in order]
    assert np.allclose([h.score for h in hits[0]], want[order, 0], atol=1e-4)
    two = client.search([MANIFEST["captions"][0]], k=3, mode="two_stage", candidates=4)
    assert [h.id for h in two[0]] == [h.id for h in hits[0]]
