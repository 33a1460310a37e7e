"""A Hugging Face CLIPModel directory exported with ``export/to_trt.py DIR``, served by the real
tritonserver and driven by the client: its pooled embeddings must equal transformers' own
pipeline (the directory's ``CLIPImageProcessor`` + ``get_image_features``, its tokenizer +
``get_text_features``) on real photographs and every pixel mode; its default scoring is
global, and its zero-shot is CLIP's rule on those embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

from filip_client import FilipClient  # noqa: E402
from filip_export.launch import TritonServer  # noqa: E402
from filip_export.to_trt import main as export_main  # noqa: E402
from tests.test_hf_checkpoint import _features, _norm, _random_clip, hf_tokenizer, vocab_files  # noqa: E402,F401

pytestmark = pytest.mark.slow

GOLDENS = Path(__file__).parent / "goldens"
INPUTS = [e for e in json.loads((GOLDENS / "manifest.json").read_text())["inputs"]
          if e["group"] in ("photo", "generated") and e["mode"] != "I;16" and "exif_orientation" not in e]
CAPTIONS = ["a photo of a cat", "an astronaut in a white suit", "a cup of coffee on a table",
            "a grey cat lying down", "naïve café &amp; 中文 🐱"]
# a directory whose processor settings are not the defaults: resize 240, crop 224, other mean/std
PROCESSOR = dict(size={"shortest_edge": 240}, crop_size={"height": 224, "width": 224},
                 image_mean=[0.5, 0.45, 0.4], image_std=[0.25, 0.26, 0.27])


@pytest.fixture(scope="module")
def hf(tmp_path_factory, hf_tokenizer):
    model = _random_clip("gelu", seed=11)
    d = tmp_path_factory.mktemp("hf_served") / "clip-dir"
    model.save_pretrained(d)
    hf_tokenizer.save_pretrained(d)
    CLIPImageProcessorPil(**PROCESSOR).save_pretrained(d)
    return model, hf_tokenizer, CLIPImageProcessorPil.from_pretrained(d), d


@pytest.fixture(scope="module")
def client(hf, tmp_path_factory):
    repo = tmp_path_factory.mktemp("hf_repo") / "triton_models"
    assert export_main([str(hf[3]), "--out", str(repo), "--max-batch", "8"]) == 0
    manifest = json.loads((repo / "filip_image" / "1" / "filip_config.json").read_text())
    assert manifest["checkpoint_layout"] == "hf" and manifest["default_scoring"] == "global"
    assert manifest["preprocess"]["recipe"] == "transformers" and manifest["preprocess"]["resize_size"] == 240
    with TritonServer(repo) as server, FilipClient(server.url, timeout=60) as c:
        yield c
        assert server.proc.poll() is None, "the server died during the tests"


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_served_hf_images_equal_transformers_pipeline(client, hf):
    model, _, processor, _ = hf
    files = [GOLDENS / e["file"] for e in INPUTS]
    with torch.no_grad():
        pixels = [processor(images=Image.open(f), return_tensors="pt")["pixel_values"] for f in files]
        want = _norm(_features(model.get_image_features(pixel_values=torch.cat(pixels))))
    got = client.embed_images(files)
    cos = _cos(got.pooled, want)
    print(f"served vs transformers (processor + get_image_features), {len(files)} images in modes "
          f"{sorted({e['mode'] for e in INPUTS})}: min cosine {cos.min():.7f}, "
          f"max |d| {np.abs(got.pooled - want).max():.2e}")
    assert {e["mode"] for e in INPUTS} >= {"RGB", "L", "P", "RGBA", "LA", "CMYK"}
    assert cos.min() >= 0.9999 and np.abs(got.pooled - want).max() <= 1e-4


def test_served_hf_texts_equal_transformers_pipeline(client, hf):
    model, tokenizer, _, _ = hf
    batch = tokenizer(CAPTIONS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        want = _norm(_features(model.get_text_features(**batch)))
    got = client.embed_texts(CAPTIONS)
    assert np.array_equal(got.lengths, batch["attention_mask"].sum(1).numpy())
    print(f"served vs transformers (tokenizer + get_text_features): max |d| {np.abs(got.pooled - want).max():.2e}")
    assert _cos(got.pooled, want).min() >= 0.9999 and np.abs(got.pooled - want).max() <= 1e-4


def test_served_hf_scores_by_clips_rule(client, hf):
    model, tokenizer, processor, _ = hf
    assert client.default_scoring() == "global"
    photos = [GOLDENS / e["file"] for e in INPUTS if e["group"] == "photo"][:4]
    labels, templates = ["cat", "astronaut", "coffee"], ["a photo of a {}.", "a blurry photo of the {}."]
    with torch.no_grad():
        img = _norm(_features(model.get_image_features(
            pixel_values=torch.cat([processor(images=Image.open(f), return_tensors="pt")["pixel_values"] for f in photos]))))
        prompts = [t.format(label) for label in labels for t in templates]
        txt = _norm(_features(model.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt"))))
    classes = txt.reshape(len(labels), len(templates), -1).mean(1)
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    got = client.classify(photos, labels, templates=templates)
    assert np.abs(got - img @ classes.T).max() <= 1e-4
    assert np.abs(client.score(client.embed_images(photos), client.embed_texts(prompts)) - img @ txt.T).max() <= 1e-4
