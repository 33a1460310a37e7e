"""Golden reference outputs from the REAL OpenCLIP + torchvision, for tests/test_goldens.py.

The engine reproduces OpenCLIP's eval preprocessing and CLIP's towers with code of its own;
these goldens are what the reference libraries themselves give, committed as small files
under ``tests/goldens/`` so the tests need neither the libraries nor their environment.

Usage (from the repository root, in the project venv)::

    python -m tools.goldens --make-env build/refenv          # create the reference venv, then generate
    python -m tools.goldens --python build/refenv/bin/python  # generate with an existing one
    python -m tools.goldens --python PY --check               # regenerate into a temp dir, compare bytes

How it works:

1. ``--make-env DIR`` creates a venv and pip-installs exactly :data:`REF_PINS` (OpenCLIP,
   torch, torchvision, Pillow, numpy, ftfy, regex, and scikit-image for its bundled
   public-domain photos).  The project's own venv cannot do this: its torch wheel cannot
   import torchvision.
2. The project side (this process) runs ``PY -m tools.goldens --reference-side model`` in
   that interpreter, which writes the random OpenAI-layout CLIP state dict; checks that
   ``filip_engine.checkpoint.load_checkpoint`` reads it with the intended architecture; then
   runs ``--reference-side goldens``, which writes the input images and every golden.
   The reference side imports only the reference libraries, numpy and PIL: an import hook
   refuses ``filip_engine`` / ``filip_export`` / ``filip_contract`` there.
3. The new folder replaces ``tests/goldens/`` (``--check`` compares instead).

Determinism: seeded generators, one torch thread, fixed zip timestamps in the ``.npz``
files, sorted JSON; two runs with the same library versions give the same bytes.

What is in the goldens (``tests/goldens/README.md``, written by this script, says the same):

- ``images/``: the inputs, one file per pixel mode / container / size case, made here from
  real photographs (matplotlib's grace_hopper.jpg; scikit-image's astronaut, coffee, chelsea,
  camera, logo) and generated pictures (shapes, gradients, seeded noise).
- ``preprocess_224.npz``: for every input, ``open_clip.image_transform(224, is_train=False)``
  applied to ``PIL.Image.open(path)``, stored as the uint8 HxWx3 pixels recovered from the
  float output as ``(x * std + mean) * 255`` (the script asserts the recovery is exact:
  within 1e-3 of integers, and re-normalising reproduces the float output to <= 1e-6).
  ``preprocess_64.npz``: the same at 64 for the tiny and thin inputs.
- ``deviations_224.npz``: OpenCLIP applied to the inputs the engine deliberately reads
  differently, after the engine's documented reading: the 16-bit ramp converted by ``>> 8``,
  the EXIF-rotated JPEG after ``ImageOps.exif_transpose``, the PA image as RGBA.
- ``clip_tiny_openai.pt``: a random OpenAI-layout CLIP built by ``open_clip.model.CLIP``,
  fp16 bare state dict (loaded as fp32 everywhere).
- ``model.npz``: that model's fp32 outputs (pooled and token embeddings for every
  preprocessed input and deviation, tokenizer ids / pooled / token embeddings for the
  captions, the zero-shot classifier and cosines for the photos).
- ``manifest.json``: everything else (versions, per-input mode/size/format/sha256, captions,
  templates, class names, figures the script measured).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "goldens"

# Exact pins of the reference environment (``--make-env``).  ftfy and regex shape the
# tokenizer's output, numpy the arrays written; scikit-image only supplies photos.
REF_PINS = (
    "torch==2.14.1",
    "torchvision==0.29.1",
    "open_clip_torch==3.3.0",
    "pillow==13.0.0",
    "numpy==2.4.6",
    "ftfy==6.3.1",
    "regex==2026.11.19",
    "scikit-image==0.26.0",
)
# The distributions whose versions must match on the reference side (and are recorded).
_CHECKED = ("torch", "torchvision", "open_clip_torch", "pillow", "numpy", "ftfy", "regex")
_BLOCKED = ("filip_engine", "filip_export", "filip_contract")

SEED = 20240613
_SK_PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "logo.png")   # sha256 recorded
SIZE = 224
SMALL_SIZE = 64
CKPT_NAME = "clip_tiny_openai.pt"
LOGIT_SCALE = math.log(50.0)
# The tiny OpenAI-layout CLIP (vision width 64 / 1 head, text width 32 / 1 head: the engine
# infers heads = max(width // 64, 1) from shapes).
VISION_CFG = dict(image_size=224, patch_size=32, width=64, layers=2, head_width=64)
TEXT_CFG = dict(context_length=77, vocab_size=49408, width=32, heads=1, layers=2)
EMBED_DIM = 32
OC_DIR = "openclip_dir"                     # an OpenCLIP model directory's config (weights: CKPT_NAME)
OC_DIR_MEAN = (0.5, 0.45, 0.4)
OC_DIR_STD = (0.25, 0.26, 0.27)

CAPTIONS = (
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "A Photo Of A Cat, Mixed-Case.",
    "",
    "   ",
    "  lots   of \t whitespace \n and\r\nnewlines  ",
    "naïve café résumé — déjà vu",
    "東京タワーの写真",
    "Ελληνικά και русский текст",
    "emoji 🐱🐶🚀 and flags 🇫🇷 and a family 👨‍👩‍👧",
    "html &amp; entities &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39; &amp;amp;",
    "punctuation!!! ??? ... ,,, ;;; --- ((brackets)) [x] {y} <z> @#$%^&*",
    "numbers 1234567890 3.14159 1,000,000 2nd 42nd 1e-5",
    "don't won't it's we're I've you'll she'd",
    "mojibake: Ã©tÃ© and cafÃ©",
    "a literal <|endoftext|> in the middle",
    "zero\u200bwidth\u00a0nbsp\u2028line sep",
    "tab\tseparated\tvalues",
    " ".join(["a very long caption that goes on and on"] * 12),
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
    "x",
)
# OpenCLIP (not the engine) turns its own spelling of the end token, met in a caption, into
# the EOT id, and then pools at that position (argmax of the ids).  The engine keeps it as
# text.  Recorded apart so a test can show the difference is this one rule.
DEVIATION_CAPTIONS = ("a caption with <end_of_text> inside it",)
CLASSNAMES = ("person", "cat", "cup of coffee", "astronaut", "camera")
TEMPLATE_SET = "OPENAI_IMAGENET_TEMPLATES"


# --- deterministic files ---------------------------------------------------------------
def save_npz(path: Path, arrays: dict) -> None:
    """``np.savez_compressed`` with fixed timestamps, so the same arrays give the same bytes."""
    import numpy as np

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, buf.getvalue(), compresslevel=9)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- reference side: environment ------------------------------------------------------
class _BlockProject:
    """Import hook for the reference side: the goldens must not come from the engine's code."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ImportError(f"the reference side of tools.goldens must not import {name}")
        return None


def _versions() -> dict:
    from importlib.metadata import version

    out = {d: version(d) for d in _CHECKED}
    out["python"] = sys.version.split()[0]
    try:
        out["scikit-image"] = version("scikit-image")
    except Exception:
        out["scikit-image"] = None
    return out


def _check_versions(allow_other: bool) -> dict:
    got = _versions()
    want = {p.split("==")[0]: p.split("==")[1] for p in REF_PINS}
    bad = [f"{d} {got[d]} (pinned {want[d]})" for d in _CHECKED
           if got[d].split("+")[0] != want[d]]
    if bad:
        msg = "reference environment differs from the pins: " + ", ".join(bad)
        if not allow_other:
            raise SystemExit(msg + "; create one with --make-env, or pass --allow-other-versions")
        print("warning: " + msg, file=sys.stderr)
    return got


def _skimage_data_dir() -> Path | None:
    """scikit-image's bundled data folder, found without importing scikit-image."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    return d if (d / "astronaut.png").is_file() else None


# --- reference side: the model --------------------------------------------------------
def _build_clip():
    import open_clip

    return open_clip.model.CLIP(embed_dim=EMBED_DIM, vision_cfg=dict(VISION_CFG), text_cfg=dict(TEXT_CFG),
                                quick_gelu=True)


def reference_model(out: Path) -> None:
    """Write the random tiny CLIP: OpenCLIP's own init (seeded), then every LayerNorm, bias
    and positional embedding perturbed so a wrong LN, bias or position cannot go unnoticed."""
    import torch

    torch.manual_seed(SEED)
    model = _build_clip()
    gen = torch.Generator().manual_seed(SEED + 1)

    def randn(shape):
        return torch.randn(shape, generator=gen)

    with torch.no_grad():
        for name, p in model.named_parameters():      # a fixed order: the module's own
            leaf = name.rsplit(".", 1)[-1]
            is_ln = any(part.startswith("ln_") for part in name.split(".")[:-1])
            if is_ln and leaf == "weight":
                p.copy_(1.0 + 0.3 * randn(p.shape))
            elif is_ln and leaf == "bias":
                p.copy_(0.2 * randn(p.shape))
            elif leaf.endswith("bias"):                 # in_proj_bias, out_proj / c_fc / c_proj bias
                p.copy_(0.05 * randn(p.shape))
            elif name == "positional_embedding":       # text: OpenCLIP's 0.01 is too faint to catch a shift
                p.copy_(0.2 * randn(p.shape))
            elif name == "visual.positional_embedding":
                p.add_(0.2 * randn(p.shape))
            elif name == "visual.class_embedding":
                p.add_(0.2 * randn(p.shape))
            elif name == "token_embedding.weight":
                p.copy_(0.1 * randn(p.shape))
        model.logit_scale.fill_(LOGIT_SCALE)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, out / CKPT_NAME)
    print(f"reference: wrote {out / CKPT_NAME} ({len(sd)} tensors, "
          f"{sum(v.numel() for v in sd.values()):,} parameters, fp16)")


def _load_clip(path: Path):
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    model = _build_clip()
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    return model.eval()


# --- reference side: the input images -------------------------------------------------
def make_images(img_dir: Path, hopper: Path, skdata: Path | None) -> list[dict]:
    """Write every input file; returns [{id, file, origin, group, ...}] in a fixed order."""
    import numpy as np
    from PIL import Image, ImageDraw

    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    LANCZOS = Image.Resampling.LANCZOS
    entries: list[dict] = []

    def add(img: Image.Image, file: str, origin: str, group: str, **save_kw):
        path = img_dir / file
        img.save(path, **save_kw)
        entries.append({"id": file.replace(".", "_"), "file": f"images/{file}", "origin": origin,
                        "group": group})
        return path

    def photo(name: str) -> Image.Image:
        if skdata is None:
            raise SystemExit("scikit-image's data folder was not found in the reference env (pip install "
                             "scikit-image==0.26.0 there, or use --make-env)")
        return Image.open(skdata / name)

    def fit(img: Image.Image, size: tuple[int, int]) -> Image.Image:
        """Centre-crop to the target aspect, then LANCZOS to exactly ``size``."""
        w, h = img.size
        tw, th = size
        if w * th > h * tw:                             # too wide
            nw = round(h * tw / th)
            img = img.crop(((w - nw) // 2, 0, (w - nw) // 2 + nw, h))
        elif w * th < h * tw:                           # too tall
            nh = round(w * th / tw)
            img = img.crop((0, (h - nh) // 2, w, (h - nh) // 2 + nh))
        return img.resize(size, LANCZOS)

    def gradient(w: int, h: int) -> np.ndarray:
        x = np.linspace(0, 1, w)[None, :]
        y = np.linspace(0, 1, h)[:, None]
        r = 255 * x + 0 * y
        g = 255 * y + 0 * x
        b = 255 * (0.5 + 0.5 * np.sin(6 * (x + y)))
        return np.clip(np.stack([r, g, b], -1), 0, 255).round().astype(np.uint8)

    def shapes(w: int, h: int) -> Image.Image:
        img = Image.fromarray(gradient(w, h))
        d = ImageDraw.Draw(img)
        d.rectangle((w // 10, h // 8, w // 2, h // 2), fill=(250, 20, 20), outline=(0, 0, 0), width=3)
        d.ellipse((w // 2, h // 3, w - w // 12, h - h // 10), fill=(20, 200, 40), outline=(255, 255, 255), width=2)
        d.polygon([(w // 6, h - h // 8), (w // 3, h // 2), (w // 2, h - h // 6)], fill=(30, 40, 230))
        for i in range(0, w, max(w // 16, 2)):
            d.line((i, 0, w - i, h), fill=(255, 255, 0), width=1)
        return img

    def noise(w: int, h: int, c: int = 3) -> np.ndarray:
        return rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)

    # --- RGB ---------------------------------------------------------------------------
    hop = fit(Image.open(hopper).convert("RGB"), (342, 400))
    add(hop, "hopper_rgb_342x400.jpg", "matplotlib sample_data/grace_hopper.jpg (US Navy photo, public domain)",
        "photo", quality=90)
    coffee = photo("coffee.png").convert("RGB")
    add(fit(coffee, (640, 427)), "coffee_rgb_640x427.jpg",
        "scikit-image data/coffee.png resized to 640x427 (odd width difference after the resize: crop rounding)",
        "photo", quality=90)
    astro = fit(photo("astronaut.png").convert("RGB"), (256, 256))
    add(astro, "astronaut_rgb_256x256.png", "scikit-image data/astronaut.png (NASA, public domain)", "photo")
    chelsea = photo("chelsea.png").convert("RGB")
    add(fit(chelsea, (200, 133)), "chelsea_rgb_200x133.png",
        "scikit-image data/chelsea.png, small: upscaled by the transform", "photo")
    add(shapes(320, 240), "shapes_rgb_320x240.png", "generated: gradient + shapes", "generated")
    add(Image.fromarray(noise(128, 96)), "noise_rgb_128x96.png", "generated: seeded uniform noise (upscaled)",
        "generated")
    add(shapes(1600, 1200), "shapes_rgb_1600x1200.jpg", "generated: gradient + shapes, large", "generated",
        quality=85)
    add(Image.open(hopper).convert("RGB").resize((224, 262), LANCZOS), "hopper_rgb_224x262.jpg",
        "grace_hopper.jpg, short side already 224: the transform only crops", "photo", quality=90)

    # --- L, 1 --------------------------------------------------------------------------
    camera = photo("camera.png").convert("L")
    add(fit(camera, (256, 256)), "camera_l_256x256.png", "scikit-image data/camera.png (greyscale photo)", "photo")
    add(fit(camera, (160, 120)), "camera_l_160x120.jpg", "scikit-image data/camera.png, greyscale JPEG, upscaled",
        "photo", quality=90)
    add(fit(camera, (256, 256)).convert("1"), "camera_1bit_256x256.png",
        "camera.png dithered to 1 bit (Floyd-Steinberg)", "photo")
    add(shapes(300, 200).convert("L").point(lambda v: 255 if v > 110 else 0).convert("1", dither=Image.Dither.NONE),
        "shapes_1bit_300x200.png", "generated shapes thresholded to 1 bit", "generated")

    # --- P without transparency --------------------------------------------------------
    ch_small = fit(chelsea, (300, 200))
    p256 = ch_small.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    add(p256, "chelsea_p256_300x200.png", "chelsea.png quantised to 256 colours (median cut, dithered)", "photo")
    add(p256, "chelsea_p256_300x200.gif", "the same palette image as GIF", "photo", optimize=False)
    add(shapes(240, 160).quantize(16, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE),
        "shapes_p16_240x160.gif", "generated shapes, 16-colour GIF", "generated", optimize=False)

    # --- P with transparency -----------------------------------------------------------
    sp = shapes(240, 160).quantize(16, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    counts = np.bincount(np.asarray(sp).ravel(), minlength=16)
    idx = int(counts.argmax())                          # the commonest colour becomes transparent
    add(sp, "shapes_p16_trns_index_240x160.png", f"generated shapes, 16 colours, palette index {idx} transparent "
        "(PNG tRNS, one index)", "generated", transparency=idx)
    add(sp, "shapes_p16_trns_index_240x160.gif", f"the same as GIF with transparent index {idx}", "generated",
        transparency=idx, optimize=False)
    cp = fit(coffee, (300, 200)).quantize(64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    alpha_per_index = bytes((i * 37) % 256 for i in range(64))
    add(cp, "coffee_p64_trns_alpha_300x200.png", "coffee.png, 64 colours, partial alpha per palette index "
        "(PNG tRNS with 64 alpha values, some 0)", "photo", transparency=alpha_per_index)

    # --- alpha modes -------------------------------------------------------------------
    def alpha_mask(w: int, h: int) -> np.ndarray:
        """Radial ramp 0..255 plus a fully transparent band whose colours stay non-zero."""
        yy, xx = np.mgrid[0:h, 0:w]
        r = np.hypot((xx - w / 2) / w, (yy - h / 2) / h)
        a = np.clip(255 * (1 - r * 1.6), 0, 255)
        a[:, w // 8: w // 8 + max(w // 10, 1)] = 0
        a[h // 6: h // 6 + max(h // 12, 1), :] = 255
        return a.round().astype(np.uint8)

    rgba = Image.fromarray(np.dstack([np.asarray(astro.resize((200, 200), LANCZOS)), alpha_mask(200, 200)]), "RGBA")
    add(rgba, "astronaut_rgba_alpha_200x200.png", "astronaut.png with a radial partial alpha and a fully "
        "transparent band (colours kept under alpha 0)", "photo")
    add(rgba, "astronaut_rgba_alpha_200x200.webp", "the same RGBA as lossless WebP (exact: colours under alpha 0 "
        "kept)", "photo", lossless=True, exact=True, quality=100, method=4)
    logo = photo("logo.png")
    add(logo.resize((200, 200), LANCZOS), "sklogo_rgba_200x200.png",
        "scikit-image data/logo.png: a real RGBA image with transparent surroundings", "generated")
    la = Image.merge("LA", [fit(camera, (256, 256)), Image.fromarray(alpha_mask(256, 256))])
    add(la, "camera_la_alpha_256x256.png", "camera.png with the same partial alpha (LA PNG)", "photo")
    pa = fit(chelsea, (200, 133)).quantize(256, method=Image.Quantize.MEDIANCUT,
                                            dither=Image.Dither.FLOYDSTEINBERG).convert("PA")
    pa.putalpha(Image.fromarray(alpha_mask(200, 133)))
    add(pa, "chelsea_pa_alpha_200x133.tif", "chelsea 256-colour palette + alpha channel (PA; TIFF is the "
        "container Pillow writes PA in)", "photo", compression="tiff_adobe_deflate")

    # --- CMYK --------------------------------------------------------------------------
    def to_cmyk(img: Image.Image) -> Image.Image:
        """RGB -> CMYK with a real black channel (Pillow's own gives K = 0)."""
        a = np.asarray(img).astype(np.float64)
        k = 255 - a.max(axis=2)
        denom = np.where(k < 255, 255 - k, 1)
        cmy = (255 - a - k[..., None]) / denom[..., None] * 255
        return Image.fromarray(np.dstack([cmy, k]).round().clip(0, 255).astype(np.uint8), "CMYK")

    add(to_cmyk(fit(coffee, (300, 200))), "coffee_cmyk_300x200.jpg", "coffee.png as CMYK with black "
        "generation, JPEG (Adobe)", "photo", quality=90)
    add(to_cmyk(fit(chelsea, (200, 133))), "chelsea_cmyk_200x133.tif", "chelsea.png as CMYK with black "
        "generation, TIFF", "photo", compression="tiff_adobe_deflate")

    # --- 16 bit, EXIF (documented deviations) ------------------------------------------
    ramp = np.round(np.arange(512) * 65535 / 511).astype(np.uint16)
    ramp = np.repeat(ramp[None, :], 64, axis=0)
    i16 = Image.fromarray(ramp)
    assert i16.mode == "I;16", i16.mode
    add(i16, "ramp_i16_512x64.png", "generated: 16-bit greyscale ramp 0..65535 (v = round(x * 65535 / 511))",
        "deviation")
    exif = Image.Exif()
    exif[0x0112] = 6                                    # Orientation: rotate 90 CW to display
    add(hop.transpose(Image.Transpose.ROTATE_90), "hopper_rgb_exif6_400x342.jpg",
        "grace_hopper stored rotated (400x342) with EXIF Orientation 6: upright it is 342x400", "deviation",
        quality=90, exif=exif.tobytes())

    # --- tiny, thin --------------------------------------------------------------------
    for w, h in ((1, 1), (3, 5), (7, 2)):
        add(Image.fromarray(noise(w, h)), f"tiny_rgb_{w}x{h}.png", f"generated: {w}x{h} random colours", "tiny")
    add(Image.fromarray(noise(3, 5)).quantize(4, dither=Image.Dither.NONE), "tiny_p4_3x5.png",
        "generated: 3x5, 4-colour palette", "tiny")
    add(Image.fromarray(noise(7, 2, 4), "RGBA"), "tiny_rgba_7x2.png", "generated: 7x2 random RGBA", "tiny")
    thin_v = np.clip(gradient(2, 600).astype(np.int16) + rng.integers(-20, 21, (600, 2, 3)), 0, 255)
    add(Image.fromarray(thin_v.astype(np.uint8)), "thin_rgb_2x600.png", "generated: 2x600 gradient + noise", "thin")
    thin_h = np.clip(gradient(600, 2).astype(np.int16) + rng.integers(-20, 21, (2, 600, 3)), 0, 255)
    add(Image.fromarray(thin_h.astype(np.uint8)), "thin_rgb_600x2.png", "generated: 600x2 gradient + noise", "thin")
    col = (np.linspace(0, 255, 300)[:, None] + rng.integers(-30, 31, (300, 1))).clip(0, 255).astype(np.uint8)
    add(Image.fromarray(col), "thin_l_1x300.png", "generated: 1x300 greyscale ramp + noise", "thin")

    ids = [e["id"] for e in entries]
    assert len(set(ids)) == len(ids), "duplicate input ids"
    return entries


def _describe(path: Path) -> dict:
    """What Pillow says about a file when opened the way OpenCLIP's user opens it."""
    from PIL import ExifTags, Image

    with Image.open(path) as im:
        d = {"mode": im.mode, "size": list(im.size), "format": im.format}
        t = im.info.get("transparency")
        if t is not None:
            d["transparency"] = (f"index {t}" if isinstance(t, int) else
                                 f"{len(t)} per-index alpha values" if isinstance(t, bytes) else repr(t))
        if im.mode == "P":
            d["palette_mode"] = im.palette.mode
        o = im.getexif().get(ExifTags.Base.Orientation)
        if o is not None:
            d["exif_orientation"] = int(o)
    return d


# --- reference side: the goldens ------------------------------------------------------
def reference_goldens(out: Path, hopper: Path) -> None:
    import numpy as np
    import open_clip
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageOps
    from torchvision import transforms as T

    torch.set_num_threads(1)
    entries = make_images(out / "images", hopper, _skimage_data_dir())
    for e in entries:
        e.update(_describe(out / e["file"]))
        e["sha256"] = sha256(out / e["file"])

    mean64 = torch.tensor(open_clip.OPENAI_DATASET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std64 = torch.tensor(open_clip.OPENAI_DATASET_STD, dtype=torch.float64).view(3, 1, 1)
    renorm = T.Compose([T.ToTensor(), T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)])
    worst = {"off_integer": 0.0, "renormalised": 0.0}

    def run(transform, img: Image.Image, what: str):
        """OpenCLIP's float output and the uint8 pixels it was made from (asserted exact)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = transform(img)
        assert x.dtype == torch.float32 and x.ndim == 3 and x.shape[0] == 3, (what, x.shape)
        rec = (x.to(torch.float64) * std64 + mean64) * 255.0
        off = float((rec - rec.round()).abs().max())
        assert off <= 1e-3, f"{what}: recovered pixels are {off} away from integers"
        u8 = rec.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        back = renorm(Image.fromarray(u8, "RGB"))
        d = float((back - x).abs().max())
        assert d <= 1e-6, f"{what}: re-normalised pixels differ from OpenCLIP's output by {d}"
        worst["off_integer"] = max(worst["off_integer"], off)
        worst["renormalised"] = max(worst["renormalised"], d)
        return x, u8, sorted({f"{w.category.__name__}: {w.message}" for w in caught})

    pre = open_clip.image_transform(SIZE, is_train=False)
    pre_small = open_clip.image_transform(SMALL_SIZE, is_train=False)
    print("reference: OpenCLIP eval transform:", repr(pre).replace("\n", " "))
    pixels, floats, pixels_small, dev_pixels, dev_floats = {}, {}, {}, {}, {}
    for e in entries:
        path = out / e["file"]
        with Image.open(path) as img:                  # exactly as an OpenCLIP user calls it
            floats[e["id"]], pixels[e["id"]], warn = run(pre, img, e["file"])
        if warn:
            e["openclip_warnings"] = warn
        if e["group"] in ("tiny", "thin"):
            with Image.open(path) as img:
                _, pixels_small[e["id"]], _ = run(pre_small, img, e["file"] + f" at {SMALL_SIZE}")
        if e["mode"] == "I;16":
            with Image.open(path) as img:
                shifted = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
            assert shifted.mode == "L"
            key = e["id"] + "__shift8"
            dev_floats[key], dev_pixels[key], _ = run(pre, shifted, e["file"] + " >> 8")
            e["deviation"] = {"key": key, "engine_rule": "16-bit samples keep their high byte (v >> 8), then grey -> RGB",
                              "openclip_does": "resizes the I;16 image, then convert('RGB') clips every sample "
                                               "above 255 to 255 (nearly all white)"}
        if e["mode"] == "PA":
            with Image.open(path) as img:
                rgba = img.convert("RGBA")
            key = e["id"] + "__as_rgba"
            dev_floats[key], dev_pixels[key], _ = run(pre, rgba, e["file"] + " as RGBA")
            e["deviation"] = {"key": key, "engine_rule": "PA is read as RGBA (its palette looked up), then resized "
                                                         "like any RGBA image",
                              "openclip_does": "resizes the palette indices themselves (Pillow interpolates PA "
                                               "as plain 8-bit channels and drops the palette): every pixel black"}
        if e.get("exif_orientation", 1) != 1:
            with Image.open(path) as img:
                upright = ImageOps.exif_transpose(img)
            key = e["id"] + "__exif_transpose"
            dev_floats[key], dev_pixels[key], _ = run(pre, upright, e["file"] + " exif_transpose")
            e["deviation"] = {"key": key, "engine_rule": "EXIF orientation applied (ImageOps.exif_transpose)",
                              "openclip_does": "ignores EXIF orientation (the stored, rotated pixels)"}
    print(f"reference: pixel recovery exact: max |recovered - integer| = {worst['off_integer']:.3g}, "
          f"re-normalised max |d| = {worst['renormalised']:.3g} over {len(floats) + len(dev_floats)} outputs "
          f"+ {len(pixels_small)} at {SMALL_SIZE}")
    # Inputs with identical outputs (the same picture in two containers) share one array:
    # each entry's "golden" names the array holding its pixels.
    for e in entries:
        e["golden"] = next(k for k in pixels if np.array_equal(pixels[k], pixels[e["id"]]))
        if e["id"] in pixels_small:
            e["golden_small"] = next(k for k in pixels_small
                                     if np.array_equal(pixels_small[k], pixels_small[e["id"]]))
    save_npz(out / f"preprocess_{SIZE}.npz", {e["id"]: pixels[e["id"]] for e in entries if e["golden"] == e["id"]})
    save_npz(out / f"preprocess_{SMALL_SIZE}.npz",
             {e["id"]: pixels_small[e["id"]] for e in entries if e.get("golden_small") == e["id"]})
    save_npz(out / f"deviations_{SIZE}.npz", dev_pixels)

    # --- the model -----------------------------------------------------------------------
    model = _load_clip(out / CKPT_NAME)
    image_keys = list(floats) + list(dev_floats)
    X = torch.stack([floats[k] for k in floats] + [dev_floats[k] for k in dev_floats])
    with torch.no_grad():
        # Pooled: OpenCLIP's own encode_image(normalize=True).
        pooled = model.encode_image(X, normalize=True)
        # Tokens (FILIP's token path on a CLIP): VisionTransformer with output_tokens=True
        # returns (pooled @ proj, tokens) where tokens = ln_post(x)[:, 1:], i.e. ln_post on
        # every patch token, CLS dropped, not yet projected (pool_type 'tok', ln before pool).
        # They are projected by visual.proj and L2-normalised here.
        model.visual.output_tokens = True
        pooled_raw, tok_raw = model.visual(X)
        model.visual.output_tokens = False
        img_tokens = F.normalize(tok_raw @ model.visual.proj, dim=-1)
        # Cross-check with a forward hook on ln_post during a plain encode_image.
        seen = {}
        h = model.visual.ln_post.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o))
        model.encode_image(X)
        h.remove()
        hook_tokens = F.normalize(seen["x"][:, 1:] @ model.visual.proj, dim=-1)
    d_pool = float((F.normalize(pooled_raw, dim=-1) - pooled).abs().max())
    d_hook = float((hook_tokens - img_tokens).abs().max())
    assert d_pool <= 1e-6 and d_hook <= 1e-6, (d_pool, d_hook)
    n_patches = (VISION_CFG["image_size"] // VISION_CFG["patch_size"]) ** 2
    assert img_tokens.shape == (len(image_keys), n_patches, EMBED_DIM)
    print(f"reference: image tower: pooled from output_tokens vs encode_image max |d| = {d_pool:.3g}; "
          f"tokens from output_tokens vs ln_post hook max |d| = {d_hook:.3g}")

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    captions = list(CAPTIONS) + list(DEVIATION_CAPTIONS)
    ids = tokenizer(captions)
    assert torch.equal(ids, open_clip.tokenize(captions)), "get_tokenizer('ViT-B-32') != open_clip.tokenize"
    lengths = ids.argmax(dim=-1) + 1          # SOT..EOT: OpenCLIP pools at the argmax (EOT is the top id)
    with torch.no_grad():
        seen = {}
        h = model.ln_final.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o))
        txt_pooled = model.encode_text(ids, normalize=True)
        h.remove()
        # Token path: ln_final on every token (captured from OpenCLIP's own encode_text by the
        # hook) times text_projection, L2-normalised, kept for SOT..EOT only.
        txt_tokens = F.normalize(seen["x"] @ model.text_projection, dim=-1)
        valid = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        txt_tokens = txt_tokens * valid[..., None]
    d_txt = float((txt_tokens[torch.arange(len(captions)), lengths - 1] - txt_pooled).abs().max())
    assert d_txt <= 1e-6, d_txt
    print(f"reference: text tower: EOT token vs encode_text max |d| = {d_txt:.3g}; lengths "
          f"{lengths.tolist()}")

    # --- zero-shot ------------------------------------------------------------------------
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    templates = getattr(open_clip, TEMPLATE_SET)
    template_strings = [t("{}") for t in templates]
    for t, s in zip(templates, template_strings):
        for c in CLASSNAMES:
            assert t(c) == s.format(c), (s, c)
    with torch.no_grad():
        classifier = build_zero_shot_classifier(model, tokenizer, list(CLASSNAMES), templates,
                                                num_classes_per_batch=10, device="cpu", use_tqdm=False)
    photos = [e["id"] for e in entries if e["group"] == "photo" and e["mode"] in ("RGB", "L")
              and "deviation" not in e]
    photo_feats = pooled[[image_keys.index(k) for k in photos]]
    cos = photo_feats @ classifier                                 # [n_photos, n_classes]
    top1 = cos.argmax(dim=1)
    srt = cos.sort(dim=1, descending=True).values
    margin = float((srt[:, 0] - srt[:, 1]).min())
    print(f"reference: zero-shot over {len(photos)} photos x {len(CLASSNAMES)} classes, {len(templates)} "
          f"templates; top-1 {[CLASSNAMES[i] for i in top1.tolist()]}; smallest top-1 margin {margin:.3g}")

    # --- an OpenCLIP model directory (open_clip_config.json beside the same weights) -------
    # No quick_gelu in its model_cfg: OpenCLIP then builds exact GELU, which no bare state
    # dict could say; and its own normalisation. Loaded by OpenCLIP itself through local-dir:.
    oc_cfg = {"model_cfg": {"embed_dim": EMBED_DIM, "vision_cfg": dict(VISION_CFG), "text_cfg": dict(TEXT_CFG)},
              "preprocess_cfg": {"mean": list(OC_DIR_MEAN), "std": list(OC_DIR_STD), "interpolation": "bicubic",
                                 "resize_mode": "shortest"}}
    (out / OC_DIR).mkdir(exist_ok=True)
    write_json(out / OC_DIR / "open_clip_config.json", oc_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(out / OC_DIR / "open_clip_config.json", Path(tmp) / "open_clip_config.json")
        shutil.copy(out / CKPT_NAME, Path(tmp) / "open_clip_pytorch_model.bin")
        oc_model, _, oc_pre = open_clip.create_model_and_transforms("local-dir:" + tmp)
        oc_tok = open_clip.get_tokenizer("local-dir:" + tmp)
    oc_model.eval()
    gelus = [type(m).__name__ for m in oc_model.modules() if "GELU" in type(m).__name__]
    assert gelus and set(gelus) == {"GELU"}, gelus
    oc_files = [next(e["file"] for e in entries if e["id"] == k) for k in photos]
    with torch.no_grad():
        oc_img = oc_model.encode_image(torch.stack([oc_pre(Image.open(out / f)) for f in oc_files]), normalize=True)
        oc_txt = oc_model.encode_text(oc_tok(list(CAPTIONS)), normalize=True)
    print(f"reference: OpenCLIP directory (exact GELU, mean {OC_DIR_MEAN}): {len(oc_files)} photos, "
          f"{len(CAPTIONS)} captions; transform {oc_pre!r}")
    save_npz(out / "openclip_dir.npz", {"image_pooled": oc_img.numpy().astype(np.float32),
                                        "text_pooled": oc_txt.numpy().astype(np.float32)})

    save_npz(out / "model.npz", {
        "image_pooled": pooled.numpy().astype(np.float32),
        "image_tokens": img_tokens.numpy().astype(np.float32),
        "text_ids": ids.numpy().astype(np.int64),
        "text_lengths": lengths.numpy().astype(np.int64),
        "text_pooled": txt_pooled.numpy().astype(np.float32),
        "text_tokens": txt_tokens.numpy().astype(np.float32),
        "zeroshot_classifier": classifier.numpy().astype(np.float32),
        "zeroshot_cosines": cos.numpy().astype(np.float32),
        "zeroshot_top1": top1.numpy().astype(np.int64),
    })
    manifest = {
        "generator": "python -m tools.goldens (reference side)",
        "versions": _versions(),
        "seed": SEED,
        "openclip_transform": {"call": f"open_clip.image_transform({SIZE}, is_train=False)", "repr": repr(pre),
                               "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)},
        "pixel_storage": "uint8 HxWx3 = round((x * std + mean) * 255) of OpenCLIP's float CHW output",
        "pixel_recovery": {"max_off_integer": worst["off_integer"], "max_renormalised_abs_diff": worst["renormalised"]},
        "inputs": entries,
        "sources": {"grace_hopper.jpg (matplotlib sample_data)": sha256(hopper),
                    **{f"{n} (scikit-image data)": sha256(_skimage_data_dir() / n) for n in _SK_PHOTOS}},
        "small_size": SMALL_SIZE,
        "small_size_inputs": list(pixels_small),
        "model": {"file": CKPT_NAME, "built_by": "open_clip.model.CLIP(embed_dim=%d, vision_cfg=%r, text_cfg=%r, "
                                                 "quick_gelu=True)" % (EMBED_DIM, VISION_CFG, TEXT_CFG),
                  "storage": "bare OpenAI-layout state dict, fp16; loaded as fp32",
                  "logit_scale": "log(50) before fp16 rounding",
                  "init": "OpenCLIP's init under torch.manual_seed(seed), then LayerNorm weights 1 + 0.3 N(0,1), "
                          "LayerNorm biases 0.2 N(0,1), other biases 0.05 N(0,1), text positional 0.2 N(0,1), "
                          "visual positional and class embedding + 0.2 N(0,1), token embedding 0.1 N(0,1) "
                          "(torch.Generator seeded seed + 1)"},
        "image_keys": image_keys,
        "image_tokens_how": "visual.output_tokens = True -> tokens = ln_post(x)[:, 1:] (every patch token, CLS "
                            "dropped) @ visual.proj, L2-normalised; checked against a forward hook on ln_post",
        "image_pooled_how": "model.encode_image(x, normalize=True)",
        "captions": list(CAPTIONS),
        "deviation_captions": list(DEVIATION_CAPTIONS),
        "tokenizer": "open_clip.get_tokenizer('ViT-B-32') (== open_clip.tokenize), context 77",
        "text_tokens_how": "forward hook on ln_final during model.encode_text: ln_final(x) @ text_projection, "
                           "L2-normalised, zero past SOT..EOT (length = argmax(ids) + 1, OpenCLIP's pooling index)",
        "text_pooled_how": "model.encode_text(ids, normalize=True)",
        "openclip_dir": {"folder": OC_DIR, "photos": photos, "files": oc_files, "captions": "captions",
                         "how": "open_clip.create_model_and_transforms('local-dir:' + a folder holding "
                                "open_clip_config.json and clip_tiny_openai.pt as open_clip_pytorch_model.bin); "
                                "encode_image(transform(Image.open(file)), normalize=True), "
                                "encode_text(get_tokenizer('local-dir:...')(captions), normalize=True)"},
        "zeroshot": {"classnames": list(CLASSNAMES), "template_set": f"open_clip.{TEMPLATE_SET}",
                     "templates": template_strings, "photos": photos,
                     "how": "build_zero_shot_classifier(model, tokenizer, classnames, templates) -> W [D, C]; "
                            "cosines = encode_image(photo, normalize=True) @ W; top-1 = argmax",
                     "min_top1_margin": margin},
    }
    write_json(out / "manifest.json", manifest)


# --- project side ---------------------------------------------------------------------
def _hopper_path() -> Path:
    import matplotlib

    p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not p.is_file():
        raise SystemExit(f"{p} not found (matplotlib's sample data)")
    return p


def _run_reference(python: str, args: list[str], allow_other: bool = False) -> None:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)               # the reference side sees the repo root only (for tools/)
    cmd = [python, "-m", "tools.goldens", "--reference-side", *args]
    if allow_other:
        cmd.append("--allow-other-versions")
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def _check_engine_loads(path: Path) -> None:
    from filip_engine.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    cfg = ck.config
    got = (ck.layout, cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width, cfg.vision.layers,
           cfg.vision.heads, cfg.text.context_length, cfg.text.vocab_size, cfg.text.width, cfg.text.layers,
           cfg.text.heads, cfg.embed_dim, cfg.token_dim, cfg.activation)
    want = ("openclip", VISION_CFG["image_size"], VISION_CFG["patch_size"], VISION_CFG["width"], VISION_CFG["layers"],
            VISION_CFG["width"] // VISION_CFG["head_width"], TEXT_CFG["context_length"], TEXT_CFG["vocab_size"],
            TEXT_CFG["width"], TEXT_CFG["layers"], TEXT_CFG["heads"], EMBED_DIM, EMBED_DIM, "quick_gelu")
    if got != want:
        raise SystemExit(f"the engine reads {path} as {got}, expected {want}")
    print(f"project: filip_engine.checkpoint.load_checkpoint reads {path.name}: layout {ck.layout}, "
          f"vision {cfg.vision.width}w/{cfg.vision.heads}h, text {cfg.text.width}w/{cfg.text.heads}h, "
          f"logit scale {ck.model.similarity_scale():.4g}")


README = """\
# Golden outputs of the real OpenCLIP

Made by `tools/goldens.py` from OpenCLIP + torchvision themselves (not a re-implementation);
read by `tests/test_goldens.py`, which compares the engine with them without the reference
environment.  Regenerate (from the repository root, in the project venv):

    python -m tools.goldens --make-env build/refenv

(or `python -m tools.goldens --python PATH/TO/REFENV/bin/python` with an existing reference
venv; `--check` regenerates into a temporary folder and compares the bytes instead).

Made with: {versions}.

| file | what |
| --- | --- |
| `images/` | the {n_inputs} inputs (mode and origin in each name; details in `manifest.json`) |
| `preprocess_{size}.npz` | `open_clip.image_transform({size}, is_train=False)(PIL.Image.open(path))` of every input, as uint8 HxWx3 (`round((x * std + mean) * 255)`, asserted exact), under the key each input's `golden` in `manifest.json` names (inputs with identical outputs share one array) |
| `preprocess_{small}.npz` | the same at {small} for the tiny and thin inputs (key: `golden_small`) |
| `deviations_{size}.npz` | OpenCLIP applied after the engine's documented reading: `<id>__shift8` (16-bit `>> 8`), `<id>__exif_transpose`, `<id>__as_rgba` (PA read as RGBA) |
| `{ckpt}` | random OpenAI-layout CLIP made by `open_clip.model.CLIP` (vision 64 wide / 1 head, text 32 / 1, embed 32), fp16 state dict |
| `openclip_dir/open_clip_config.json`, `openclip_dir.npz` | an OpenCLIP model directory's config for the same weights (no `quick_gelu`: exact GELU; its own mean / std) and what OpenCLIP gives loading it with `local-dir:` (pooled embeddings of the zero-shot photos and the captions) |
| `model.npz` | that model's fp32 outputs: `image_pooled` / `image_tokens` (rows in `manifest.json` `image_keys`), `text_ids` / `text_lengths` / `text_pooled` / `text_tokens` (rows: `captions` then `deviation_captions`), `zeroshot_classifier` / `zeroshot_cosines` / `zeroshot_top1` |
| `manifest.json` | versions, per-input mode / size / format / sha256 / warnings, captions, templates, class names, measured figures |

What OpenCLIP's transform does per mode (torchvision's `Resize` on a PIL image is
`img.resize(size, BICUBIC)` in the image's own mode; `convert("RGB")` comes last):
`1` and `P` are resized NEAREST (Pillow overrides the filter), palette transparency is
ignored; `RGBA` and `LA` are resized premultiplied (`RGBa` / `La`), so colours under alpha 0
come out black; `PA` is resized BICUBIC on the palette indices and loses its palette, so the
result is all black; `CMYK` is resized as CMYK, then converted naively; `I;16` is resized
in 16 bits, then `convert("RGB")` clips to white; EXIF orientation is ignored; the crop
offset is Python's `round((h - 224) / 2)` (half to even); an image whose short side is
already 224 is not resized at all.

Documented deviations of the engine from OpenCLIP (each has its own test): 16-bit images keep
their high byte (OpenCLIP's `convert("RGB")` clips them to white); EXIF orientation is applied
(OpenCLIP ignores it); a PA image is read as RGBA (OpenCLIP's output for it is black); OpenCLIP's tokenizer maps a literal `<end_of_text>` in a caption to the
end token and pools there, the engine keeps it as text.
"""


def generate(python: str, out: Path, check: bool, allow_other: bool = False) -> int:
    hopper = _hopper_path()
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".goldens-", dir=parent))
    try:
        _run_reference(python, ["model", "--out", str(tmp)], allow_other)
        _check_engine_loads(tmp / CKPT_NAME)
        _run_reference(python, ["goldens", "--out", str(tmp), "--hopper", str(hopper)], allow_other)
        m = json.loads((tmp / "manifest.json").read_text(encoding="utf-8"))
        v = m["versions"]
        versions = ", ".join(f"{k} {v[k]}" for k in ("open_clip_torch", "torch", "torchvision", "pillow", "numpy",
                                                     "ftfy", "regex", "scikit-image", "python"))
        (tmp / "README.md").write_text(README.format(versions=versions, n_inputs=len(m["inputs"]), size=SIZE,
                                                     small=SMALL_SIZE, ckpt=CKPT_NAME), encoding="utf-8")
        # the repository ignores *.pt; this folder's own .gitignore lets the golden state dict in
        (tmp / ".gitignore").write_text(f"!{CKPT_NAME}\n", encoding="utf-8")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        total = sum((tmp / f).stat().st_size for f in files)
        print(f"project: {len(files)} files, {total / 1e6:.2f} MB")
        if total > 8_000_000:
            raise SystemExit(f"the goldens are {total / 1e6:.2f} MB, over the 8 MB budget")
        if check:
            old = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) if out.is_dir() else []
            differ = [f for f in files if f not in old or (tmp / f).read_bytes() != (out / f).read_bytes()]
            missing = [f for f in old if f not in files]
            for f in differ:
                print(f"differs: {f}")
            for f in missing:
                print(f"not regenerated: {f}")
            print("check: identical" if not differ and not missing else "check: DIFFERENT")
            return 0 if not differ and not missing else 1
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        out.chmod(0o755)                      # mkdtemp made it private
        print(f"project: wrote {out}")
        return 0
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def make_env(env_dir: Path) -> Path:
    py = env_dir / "bin" / "python"
    if not py.exists():
        print(f"+ {sys.executable} -m venv {env_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    cmd = [str(py), "-m", "pip", "install", *REF_PINS]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return py


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.goldens", description=__doc__.split("\n\n")[0])
    p.add_argument("--make-env", type=Path, metavar="DIR",
                   help="create a venv in DIR with the pinned reference libraries, then generate with it")
    p.add_argument("--env-only", action="store_true", help="with --make-env: only create the environment")
    p.add_argument("--python", help="the reference environment's interpreter")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"goldens folder (default {DEFAULT_OUT})")
    p.add_argument("--check", action="store_true", help="regenerate into a temporary folder and compare bytes")
    p.add_argument("--allow-other-versions", action="store_true",
                   help="reference side: warn instead of failing when the libraries differ from the pins")
    p.add_argument("--reference-side", choices=["model", "goldens"], help=argparse.SUPPRESS)
    p.add_argument("--hopper", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.reference_side:
        sys.meta_path.insert(0, _BlockProject())
        warnings.filterwarnings("ignore", message=".*pkg_resources.*")
        _check_versions(args.allow_other_versions)
        args.out.mkdir(parents=True, exist_ok=True)
        if args.reference_side == "model":
            reference_model(args.out)
        else:
            reference_goldens(args.out, args.hopper)
        leaked = [m for m in sys.modules if m.split(".")[0] in _BLOCKED]
        assert not leaked, leaked
        return 0

    python = args.python
    if args.make_env:
        python = str(make_env(args.make_env))
        if args.env_only:
            print(f"reference environment ready: {python}")
            return 0
    if not python:
        p.error("give --python PATH (a reference environment's interpreter) or --make-env DIR")
    return generate(python, args.out, args.check, args.allow_other_versions)


if __name__ == "__main__":
    sys.exit(main())
