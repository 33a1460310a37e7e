"""The engine against golden outputs of the REAL OpenCLIP + torchvision (tests/goldens/).

The goldens were made by ``python -m tools.goldens`` in a separate environment with the
reference libraries (tests/goldens/README.md says which versions); these tests need only the
committed files.  Preprocessing and model are checked apart: the towers are fed OpenCLIP's own
preprocessed pixels, and end to end they get the image files.

Gates: preprocessing is exact (the uint8 pixels OpenCLIP's float output was made from are
equal; normalised max |d| <= 1e-6) for every input except the engine's documented deviations
(16-bit samples ``>> 8``; EXIF orientation applied; PA read as RGBA), which have their own tests; embeddings
reach cosine >= 0.9999 per pooled row and per token; tokenizer ids are equal.
Run with ``-s`` to see the measured figures of every case.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from filip_engine.preprocess import ImageTransform

GOLDENS = Path(__file__).resolve().parent / "goldens"
MANIFEST = json.loads((GOLDENS / "manifest.json").read_text(encoding="utf-8"))
INPUTS = MANIFEST["inputs"]
EXACT = [e for e in INPUTS if "deviation" not in e]
DEVIATED = [e for e in INPUTS if "deviation" in e]
SMALL = [e for e in INPUTS if "golden_small" in e]
SIZE = 224
SMALL_SIZE = MANIFEST["small_size"]
MEAN = np.asarray(MANIFEST["openclip_transform"]["mean"], np.float32)
STD = np.asarray(MANIFEST["openclip_transform"]["std"], np.float32)
CKPT = GOLDENS / MANIFEST["model"]["file"]
MIN_COSINE = 0.9999
# Pillow says this when a palette image with per-index alpha is read as RGB, as OpenCLIP reads it.
pytestmark = pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")


def _ids(entries):
    return [e["id"] for e in entries]


@lru_cache(maxsize=None)
def golden(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDENS / name) as z:
        return {k: z[k] for k in z.files}


def pixels_of(entry: dict, size: int = SIZE) -> np.ndarray:
    if size == SIZE:
        return golden(f"preprocess_{SIZE}.npz")[entry["golden"]]
    return golden(f"preprocess_{SMALL_SIZE}.npz")[entry["golden_small"]]


def normalise(u8: np.ndarray) -> np.ndarray:
    """torchvision's ToTensor + Normalize in float32: HxWx3 uint8 -> 3xHxW."""
    x = u8.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    return (x - MEAN[:, None, None]) / STD[:, None, None]


def compare_pixels(got: np.ndarray, want_u8: np.ndarray) -> tuple[float, int, float]:
    """(max pixel difference in 0..255 units, number of differing values, normalised max |d|)
    between the engine's float CHW output and OpenCLIP's pixels."""
    assert got.shape == (3,) + want_u8.shape[:2], got.shape
    px = np.rint((got.astype(np.float64) * STD[:, None, None] + MEAN[:, None, None]) * 255.0).transpose(1, 2, 0)
    diff = np.abs(px - want_u8.astype(np.float64))
    return float(diff.max()), int((diff > 0).sum()), float(np.abs(got - normalise(want_u8)).max())


def _figures(entry: dict, max_px: float, n_diff: int, max_norm: float, n: int) -> str:
    return (f"{entry['file']} (mode {entry['mode']}, {entry['size'][0]}x{entry['size'][1]} {entry['format']}): "
            f"max pixel diff {max_px:g} (0..255), {n_diff} of {n} values differ, normalised max |d| {max_norm:.3g}")


# --- the golden files themselves -------------------------------------------------------
def test_golden_files_are_the_ones_the_goldens_were_made_from():
    import hashlib

    bad = [e["file"] for e in INPUTS if hashlib.sha256((GOLDENS / e["file"]).read_bytes()).hexdigest() != e["sha256"]]
    assert not bad, f"input files changed since the goldens were made (rerun python -m tools.goldens): {bad}"
    rec = MANIFEST["pixel_recovery"]
    assert rec["max_off_integer"] <= 1e-3 and rec["max_renormalised_abs_diff"] <= 1e-6, rec
    total = sum(p.stat().st_size for p in GOLDENS.rglob("*") if p.is_file())
    assert total < 8_000_000, f"tests/goldens is {total / 1e6:.2f} MB"


# --- preprocessing ---------------------------------------------------------------------
@pytest.mark.parametrize("entry", EXACT, ids=_ids(EXACT))
def test_preprocess_matches_openclip(entry):
    want = pixels_of(entry)
    got = ImageTransform(SIZE)(GOLDENS / entry["file"])
    max_px, n_diff, max_norm = compare_pixels(got, want)
    msg = _figures(entry, max_px, n_diff, max_norm, want.size)
    print(msg)
    assert max_px == 0 and max_norm <= 1e-6, "engine != open_clip.image_transform: " + msg


@pytest.mark.parametrize("entry", SMALL, ids=_ids(SMALL))
def test_preprocess_matches_openclip_small(entry):
    want = pixels_of(entry, SMALL_SIZE)
    got = ImageTransform(SMALL_SIZE)(GOLDENS / entry["file"])
    max_px, n_diff, max_norm = compare_pixels(got, want)
    msg = f"at {SMALL_SIZE}: " + _figures(entry, max_px, n_diff, max_norm, want.size)
    print(msg)
    assert max_px == 0 and max_norm <= 1e-6, "engine != open_clip.image_transform: " + msg


def _deviation(kind: str) -> list[dict]:
    return [e for e in DEVIATED if e["deviation"]["key"].endswith(kind)]


@pytest.mark.parametrize("entry", _deviation("__shift8"), ids=_ids(_deviation("__shift8")))
def test_16bit_keeps_the_high_byte_where_openclip_clips_to_white(entry):
    """Documented deviation: the engine reads 16-bit samples as ``v >> 8``; it then equals
    OpenCLIP applied to the image converted that way.  OpenCLIP on the file itself clips
    every sample above 255 to white."""
    got = ImageTransform(SIZE)(GOLDENS / entry["file"])
    want = golden(f"deviations_{SIZE}.npz")[entry["deviation"]["key"]]
    max_px, n_diff, max_norm = compare_pixels(got, want)
    print("vs OpenCLIP(v >> 8): " + _figures(entry, max_px, n_diff, max_norm, want.size))
    assert max_px == 0 and max_norm <= 1e-6
    as_is = pixels_of(entry)
    off, _, _ = compare_pixels(got, as_is)
    print(f"vs OpenCLIP(file as is): max pixel diff {off:g}; OpenCLIP's output is white in "
          f"{(as_is == 255).mean():.1%} of values, the engine's mean value is {want.mean():.1f}")
    assert (as_is == 255).mean() > 0.95 and off > 100     # the deviation is real, and is this one


@pytest.mark.parametrize("entry", _deviation("__exif_transpose"), ids=_ids(_deviation("__exif_transpose")))
def test_exif_orientation_is_applied_where_openclip_ignores_it(entry):
    """Documented deviation: the engine applies the EXIF orientation; it equals OpenCLIP applied
    to ``ImageOps.exif_transpose(img)``.  Without the tag (the same pixels as an array) it
    equals OpenCLIP on the file as is, so orientation is the only difference."""
    from PIL import Image

    got = ImageTransform(SIZE)(GOLDENS / entry["file"])
    want = golden(f"deviations_{SIZE}.npz")[entry["deviation"]["key"]]
    max_px, n_diff, max_norm = compare_pixels(got, want)
    print("vs OpenCLIP(exif_transpose(img)): " + _figures(entry, max_px, n_diff, max_norm, want.size))
    assert max_px == 0 and max_norm <= 1e-6
    with Image.open(GOLDENS / entry["file"]) as img:
        stored = np.asarray(img.convert("RGB"))
    max_px, n_diff, max_norm = compare_pixels(ImageTransform(SIZE)(stored), pixels_of(entry))
    print("stored pixels without the tag vs OpenCLIP(file as is): "
          + _figures(entry, max_px, n_diff, max_norm, want.size))
    assert max_px == 0 and max_norm <= 1e-6
    assert compare_pixels(got, pixels_of(entry))[0] > 50


@pytest.mark.parametrize("entry", _deviation("__as_rgba"), ids=_ids(_deviation("__as_rgba")))
def test_palette_alpha_is_read_as_rgba_where_openclip_blackens_it(entry):
    """Documented deviation: a PA image is read as RGBA (palette looked up) and then follows
    OpenCLIP exactly; OpenCLIP on the file itself resizes the palette indices as numbers and
    loses the palette, so its output is black everywhere."""
    got = ImageTransform(SIZE)(GOLDENS / entry["file"])
    want = golden(f"deviations_{SIZE}.npz")[entry["deviation"]["key"]]
    max_px, n_diff, max_norm = compare_pixels(got, want)
    print("vs OpenCLIP(img.convert('RGBA')): " + _figures(entry, max_px, n_diff, max_norm, want.size))
    assert max_px == 0 and max_norm <= 1e-6
    as_is = pixels_of(entry)
    print(f"OpenCLIP on the file as is: max value {as_is.max()} (black), the engine's mean {want.mean():.1f}")
    assert as_is.max() == 0 and want.mean() > 20


# --- the model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    from filip_engine.pipeline import FilipPipeline

    return FilipPipeline.from_checkpoint(CKPT)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine over the last axis (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def test_engine_loads_the_openclip_state_dict():
    from filip_engine.checkpoint import load_checkpoint

    ck = load_checkpoint(CKPT)
    c = ck.config
    assert ck.layout == "openclip"
    assert (c.vision.image_size, c.vision.patch_size, c.vision.width, c.vision.layers, c.vision.heads) == (224, 32, 64, 2, 1)
    assert (c.text.context_length, c.text.vocab_size, c.text.width, c.text.layers, c.text.heads) == (77, 49408, 32, 2, 1)
    assert (c.embed_dim, c.token_dim, c.activation) == (32, 32, "quick_gelu")
    assert abs(ck.model.similarity_scale() - 50.0) < 0.05       # log(50), rounded to fp16


def _image_rows(key: str) -> int:
    return MANIFEST["image_keys"].index(key)


def test_image_tower_on_openclip_pixels(pipe):
    """Model alone: OpenCLIP's preprocessed pixels (every input and deviation) through the
    engine's image tower vs OpenCLIP's encode_image and ln_post token path."""
    dev = golden(f"deviations_{SIZE}.npz")
    by_id = {e["id"]: e for e in INPUTS}
    keys = MANIFEST["image_keys"]
    x = np.stack([normalise(dev[k] if k in dev else pixels_of(by_id[k])) for k in keys])
    out = pipe.image_runtime.infer({"pixel_values": x})
    m = golden("model.npz")
    pooled_cos = cosines(out["pooled"], m["image_pooled"])
    token_cos = cosines(out["tokens"], m["image_tokens"])
    worst = keys[int(token_cos.min(axis=1).argmin())]
    print(f"image tower on OpenCLIP pixels ({len(keys)} images): min pooled cosine {pooled_cos.min():.7f}, "
          f"min token cosine {token_cos.min():.7f} ({worst}), max |d| pooled "
          f"{np.abs(out['pooled'] - m['image_pooled']).max():.3g}, tokens {np.abs(out['tokens'] - m['image_tokens']).max():.3g}")
    assert out["tokens"].shape == m["image_tokens"].shape
    assert pooled_cos.min() >= MIN_COSINE and token_cos.min() >= MIN_COSINE


@pytest.mark.parametrize("entry", INPUTS, ids=_ids(INPUTS))
def test_images_end_to_end(pipe, entry):
    """Engine preprocessing + tower on the file vs OpenCLIP's (for a documented deviation,
    vs OpenCLIP after the engine's reading of the file)."""
    key = entry["deviation"]["key"] if "deviation" in entry else entry["id"]
    m = golden("model.npz")
    row = _image_rows(key)
    emb = pipe.embed_images([str(GOLDENS / entry["file"])])
    pooled_cos = float(cosines(emb.pooled[0], m["image_pooled"][row]))
    token_cos = cosines(emb.tokens[0], m["image_tokens"][row])
    print(f"{entry['file']} (mode {entry['mode']}) end to end vs {key}: pooled cosine {pooled_cos:.7f}, "
          f"min token cosine {token_cos.min():.7f}")
    assert int(emb.lengths[0]) == m["image_tokens"].shape[1]
    assert pooled_cos >= MIN_COSINE and token_cos.min() >= MIN_COSINE, (pooled_cos, float(token_cos.min()))


CAPTIONS = MANIFEST["captions"]


def test_tokenizer_ids_equal_openclip(pipe):
    m = golden("model.npz")
    batch = pipe.tokenizer(CAPTIONS, allow_empty=True)          # padded to the context, like OpenCLIP
    want = m["text_ids"][:len(CAPTIONS)]
    bad = [(c, batch.ids[i][batch.ids[i] != 0].tolist(), want[i][want[i] != 0].tolist())
           for i, c in enumerate(CAPTIONS) if not np.array_equal(batch.ids[i], want[i])]
    assert not bad, "ids differ from open_clip.tokenize for: " + "; ".join(f"{c!r}: engine {g} vs OpenCLIP {w}"
                                                                          for c, g, w in bad)
    assert np.array_equal(batch.lengths, m["text_lengths"][:len(CAPTIONS)])


def test_end_of_text_spelling_is_text_for_the_engine(pipe):
    """Documented deviation: OpenCLIP's tokenizer turns its own spelling ``<end_of_text>`` met in
    a caption into the EOT id (and its argmax pooling then stops there); the engine tokenises
    it as the characters it is made of.  Both agree on every id before it."""
    m = golden("model.npz")
    eot = pipe.tokenizer.eot_token_id
    for j, caption in enumerate(MANIFEST["deviation_captions"]):
        ref = m["text_ids"][len(CAPTIONS) + j]
        ref = ref[ref != 0]
        cut = int(np.flatnonzero(ref == eot)[0])
        got = pipe.tokenizer([caption]).ids[0]
        got = got[got != 0]
        assert cut < len(ref) - 1, "OpenCLIP no longer maps <end_of_text> inside a caption to EOT"
        assert np.array_equal(got[:cut], ref[:cut])
        assert got[cut] != eot and np.flatnonzero(got == eot).tolist() == [len(got) - 1]


def test_text_tower_on_openclip_ids(pipe):
    """Model alone: OpenCLIP's ids (context 77, every caption incl. the empty ones) through the
    engine's text tower vs encode_text and the ln_final token path."""
    m = golden("model.npz")
    ids, lengths = m["text_ids"], m["text_lengths"]
    out = pipe.text_runtime.infer({"input_ids": ids.astype(np.int64), "lengths": lengths.astype(np.int64)})
    pooled_cos = cosines(out["pooled"], m["text_pooled"])
    valid = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    token_cos = cosines(out["tokens"], m["text_tokens"])[valid]
    print(f"text tower on OpenCLIP ids ({len(ids)} captions): min pooled cosine {pooled_cos.min():.7f}, "
          f"min token cosine {token_cos.min():.7f}, max |d| tokens {np.abs(out['tokens'] - m['text_tokens']).max():.3g}")
    assert np.abs(out["tokens"][~valid]).max() == 0
    assert pooled_cos.min() >= MIN_COSINE and token_cos.min() >= MIN_COSINE


def test_texts_end_to_end(pipe):
    """Engine tokenizer + tower (padded to the longest) vs OpenCLIP, for every caption the
    engine accepts (it refuses captions that clean to nothing: "" and whitespace)."""
    from filip_engine.tokenizer import clean_text

    m = golden("model.npz")
    rows = [i for i, c in enumerate(CAPTIONS) if clean_text(c)]
    emb = pipe.embed_texts([CAPTIONS[i] for i in rows])
    assert np.array_equal(emb.lengths, m["text_lengths"][rows])
    t = emb.tokens.shape[1]
    want = m["text_tokens"][rows, :t]
    valid = np.arange(t)[None, :] < emb.lengths[:, None]
    pooled_cos = cosines(emb.pooled, m["text_pooled"][rows])
    token_cos = cosines(emb.tokens, want)[valid]
    print(f"texts end to end ({len(rows)} captions): min pooled cosine {pooled_cos.min():.7f}, "
          f"min token cosine {token_cos.min():.7f}")
    assert pooled_cos.min() >= MIN_COSINE and token_cos.min() >= MIN_COSINE


def test_zero_shot_global_equals_openclip_classifier(pipe):
    """CLIP's rule (OpenCLIP's build_zero_shot_classifier: mean of the normalised prompt
    embeddings per class, renormalised; cosine with the normalised image embedding) with
    OpenCLIP's 80 OPENAI_IMAGENET_TEMPLATES."""
    zs = MANIFEST["zeroshot"]
    m = golden("model.npz")
    by_id = {e["id"]: e for e in INPUTS}
    images = pipe.embed_images([str(GOLDENS / by_id[k]["file"]) for k in zs["photos"]])
    got = np.asarray(pipe.classify(images, zs["classnames"], templates=zs["templates"], scoring="global"))
    want = m["zeroshot_cosines"]
    print(f"zero-shot ({len(zs['photos'])} photos x {len(zs['classnames'])} classes): max |d| "
          f"{np.abs(got - want).max():.3g}, top-1 {got.argmax(1).tolist()} vs OpenCLIP {m['zeroshot_top1'].tolist()}")
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4
    assert np.array_equal(got.argmax(axis=1), m["zeroshot_top1"])


# --- an OpenCLIP model directory -----------------------------------------------------------
def test_openclip_directory_says_what_a_bare_state_dict_cannot(tmp_path):
    """open_clip_config.json beside the weights: its model_cfg has no quick_gelu, so OpenCLIP
    builds exact GELU, and its preprocess_cfg has its own mean / std. Loaded as OpenCLIP itself
    loads it (local-dir:), the engine must give OpenCLIP's embeddings with no --activation."""
    import shutil

    from filip_engine.checkpoint import load_checkpoint
    from filip_engine.pipeline import FilipPipeline

    info = MANIFEST["openclip_dir"]
    d = tmp_path / "oc"
    shutil.copytree(GOLDENS / info["folder"], d)
    shutil.copy(CKPT, d / "open_clip_pytorch_model.bin")
    ck = load_checkpoint(d)
    assert ck.layout == "openclip" and ck.config.activation == "gelu" and ck.default_scoring == "global"
    assert ck.preprocess["mean"] == [0.5, 0.45, 0.4]
    assert load_checkpoint(d / "open_clip_pytorch_model.bin").config.activation == "gelu"   # the file: same
    pipe = FilipPipeline.from_checkpoint(d)
    want = golden("openclip_dir.npz")
    img = pipe.embed_images([str(GOLDENS / f) for f in info["files"]])
    keep = [i for i, c in enumerate(MANIFEST["captions"]) if c.strip()]     # the engine refuses empty texts
    caps = [MANIFEST["captions"][i] for i in keep]
    txt = pipe.embed_texts(caps)
    ci, ct = cosines(img.pooled, want["image_pooled"]), cosines(txt.pooled, want["text_pooled"][keep])
    print(f"OpenCLIP directory: image pooled min cosine {ci.min():.7f}, text {ct.min():.7f}")
    assert ci.min() >= MIN_COSINE and ct.min() >= MIN_COSINE
    bare = FilipPipeline.from_checkpoint(CKPT)       # the same weights read as a bare state dict: QuickGELU
    assert cosines(bare.embed_texts(caps).pooled, want["text_pooled"][keep]).min() < 0.9999
    with pytest.raises(Exception, match="says activation 'gelu'"):
        load_checkpoint(d, activation="quick_gelu")


@pytest.mark.parametrize("part, key, value", [("vision_cfg", "attentional_pool", True),
                                              ("text_cfg", "hf_model_name", "bert-base-uncased"),
                                              ("preprocess_cfg", "resize_mode", "squash")])
def test_openclip_directory_settings_the_engine_does_not_compute_are_refused(tmp_path, part, key, value):
    import shutil

    from filip_engine.checkpoint import load_checkpoint
    from filip_engine.errors import CheckpointError

    d = tmp_path / "oc"
    shutil.copytree(GOLDENS / MANIFEST["openclip_dir"]["folder"], d)
    shutil.copy(CKPT, d / "open_clip_pytorch_model.bin")
    cfg = json.loads((d / "open_clip_config.json").read_text())
    (cfg["model_cfg"] if part != "preprocess_cfg" else cfg).setdefault(part, {})[key] = value
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"{part}.{key}"):
        load_checkpoint(d)
