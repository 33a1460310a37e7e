"""Real-looking inputs for building and gating reduced-precision CPU engines.

Random normal pixels and random token ids (what the fp32 and TensorRT gates feed) are far from
what a served model sees, and a quantised model is only as good as the activation ranges it
was calibrated and checked on.  So the int8 and bf16 engines are calibrated, tuned and gated
on inputs that went through the checkpoint's own preprocessing and tokenizer:

- images: the caller's own (``--calibration-images DIR``: every readable image file in it),
  else drawn pictures (smooth colour fields of a few control points, filled ellipses and
  rectangles, sensor-like noise, at varied sizes and aspect ratios), resized and cropped by
  the checkpoint's transform like any served image;
- texts: the caller's own (``--calibration-texts FILE``: one caption per line), else captions
  from caption-like templates over everyday nouns and adjectives.

Three disjoint splits: ``calibration`` (the statistics a static quantiser needs),
``validation`` (which layers are too sensitive to quantise) and ``held_out`` (the gate, seen
by nothing else).  Drawn inputs are a pure function of the seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from filip_engine.errors import FilipError, InvalidInputError

SPLITS = ("calibration", "validation", "held_out")
DRAWN = {"calibration": 128, "validation": 32, "held_out": 64}      # items per split when drawn
MIN_OWN = 40                   # the caller's own inputs: at least this many (half, a quarter, a quarter)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

NOUNS = ("dog", "cat", "car", "tree", "house", "person", "bird", "boat", "flower", "mountain", "city", "street",
         "table", "chair", "plane", "horse", "train", "computer", "river", "beach", "child", "bicycle", "cup",
         "phone", "window", "road", "field", "kitchen", "book", "bridge")
ADJECTIVES = ("red", "blue", "green", "small", "large", "old", "young", "dark", "bright", "wooden", "shiny",
              "white", "black", "yellow", "empty", "busy")
TEMPLATES = ("a photo of a {a} {n}.", "a {n}.", "the {a} {n} next to a {m}.", "a close-up photo of the {n}",
             "two {n}s and a {a} {m} on a sunny day", "{n}", "a {a} {n} in front of a {m}, seen from above",
             "an old photograph of a {n} and a {m}", "A {A} {N} IN THE {M}!", "a blurry picture of my {n}")


@dataclass(frozen=True)
class Inputs:
    """One split: preprocessed pixels and tokenised texts (zero-padded to the context)."""
    pixel_values: np.ndarray            # float32 [N, 3, S, S]
    input_ids: np.ndarray               # int64 [M, context]
    lengths: np.ndarray                 # int64 [M]

    def tower(self, tower: str) -> dict[str, np.ndarray]:
        if tower == "image":
            return {"pixel_values": self.pixel_values}
        return {"input_ids": self.input_ids, "lengths": self.lengths}


@dataclass(frozen=True)
class GateInputs:
    calibration: Inputs
    validation: Inputs
    held_out: Inputs
    source: dict                        # where the images and texts came from (for the manifest)


def drawn_image(rng: np.random.Generator, size: int) -> Image.Image:
    w, h = (int(v) for v in rng.integers(size // 2, 3 * size, 2))
    field = rng.random((int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3)) * 255
    img = Image.fromarray(field.astype(np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 6))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(4, w)), y0 + int(rng.integers(4, h))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(0, 20), (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def drawn_caption(rng: np.random.Generator) -> str:
    t = str(rng.choice(TEMPLATES))
    a, n, m = str(rng.choice(ADJECTIVES)), str(rng.choice(NOUNS)), str(rng.choice(NOUNS))
    return t.format(a=a, n=n, m=m, A=a.upper(), N=n.upper(), M=m.upper())


def _own_images(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise FilipError(f"--calibration-images {directory}: not a directory")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < MIN_OWN:
        raise FilipError(f"--calibration-images {directory}: {len(files)} image files, at least {MIN_OWN} are needed "
                         "(half calibrate, a quarter tune, a quarter gate)")
    return files


def _own_texts(path: Path) -> list[str]:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise FilipError(f"--calibration-texts {path}: cannot read it as UTF-8 text: {e}") from e
    lines = [ln for ln in lines if ln]
    if len(lines) < MIN_OWN:
        raise FilipError(f"--calibration-texts {path}: {len(lines)} non-empty lines, at least {MIN_OWN} are needed")
    return lines


def _split(items: list, rng: np.random.Generator) -> dict[str, list]:
    order = rng.permutation(len(items))
    half, quarter = len(items) // 2, len(items) // 4
    cut = {"calibration": order[:half], "validation": order[half:half + quarter], "held_out": order[half + quarter:]}
    return {k: [items[i] for i in v] for k, v in cut.items()}


def _drawn(draw, seed: int, stream: int) -> dict[str, list]:
    """DRAWN[k] items per split, each split from one random stream of its own (disjoint, and
    stable when another split's count changes)."""
    out = {}
    for i, k in enumerate(SPLITS):
        rng = np.random.default_rng([seed, stream, i])
        out[k] = [draw(rng) for _ in range(DRAWN[k])]
    return out


def gate_inputs(transform, tokenizer, *, images: Path | None = None, texts: Path | None = None,
                seed: int = 0) -> GateInputs:
    """The three splits for one export (see the module docstring)."""
    size = transform.image_size
    rng = np.random.default_rng(seed)
    image_splits = (_split(_own_images(Path(images)), rng) if images is not None
                    else _drawn(lambda r: drawn_image(r, size), seed, 1))
    text_splits = _split(_own_texts(Path(texts)), rng) if texts is not None else _drawn(drawn_caption, seed, 2)
    out = {}
    for k in SPLITS:
        try:
            pixels = transform.batch(image_splits[k])
        except InvalidInputError as e:
            raise FilipError(f"--calibration-images: {e}") from e
        batch = tokenizer(text_splits[k], pad_to="context")
        out[k] = Inputs(pixels, batch.ids.astype(np.int64), batch.lengths.astype(np.int64))
    source = {"images": f"own ({images.name})" if images is not None else "drawn",
              "texts": f"own ({texts.name})" if texts is not None else "drawn", "seed": seed,
              **{f"{k}_items": [len(out[k].pixel_values), len(out[k].input_ids)] for k in SPLITS}}
    return GateInputs(out["calibration"], out["validation"], out["held_out"], source)


def chunks(feeds: dict[str, np.ndarray], size: int = 16):
    """Batches of ``size`` rows; text batches cut to their longest row (as served: the client
    pads to the batch's longest text, not to the context)."""
    n = len(next(iter(feeds.values())))
    for i in range(0, n, size):
        part = {k: v[i:i + size] for k, v in feeds.items()}
        if "lengths" in part:
            part["input_ids"] = np.ascontiguousarray(part["input_ids"][:, :int(part["lengths"].max())])
        yield part


def run_all(runtime, feeds: dict[str, np.ndarray], size: int = 16) -> dict[str, np.ndarray]:
    """``runtime`` over every row in batches; text outputs padded back to the context."""
    parts = [runtime.infer(c) for c in chunks(feeds, size)]
    out = {}
    for name in parts[0]:
        arrays = [p[name] for p in parts]
        if "lengths" in feeds and arrays[0].ndim == 3:
            width = feeds["input_ids"].shape[1]
            arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0))) for a in arrays]
        out[name] = np.concatenate(arrays)
    return out
