"""The in-process half of ``make demo``: load the exported ONNX artifacts on ONNX Runtime,
embed a few images and texts, print late-interaction scores, a zero-shot classification
and a word-patch alignment map.

    python -m engine.demo --export-dir build/demo/triton_models/onnx

A random-initialised checkpoint gives meaningless rankings; the demo shows the machinery
(and checks the ONNX path against PyTorch on the same inputs when --checkpoint is given).
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .compare import compare_outputs
from .errors import FilipError
from .io_spec import Tolerance
from .pipeline import FilipPipeline

TEXTS = ["a photo of a woman in uniform", "a red circle on a white background",
         "a blue square", "a diagram of a neural network", "!"]
LABELS = ["person", "circle", "square", "cat"]


def demo_images() -> dict[str, object]:
    """A real photograph shipped with matplotlib (when installed) and two drawn images,
    given in the different input forms the engine accepts (path, bytes, PIL, array)."""
    images: dict[str, object] = {}
    try:
        import matplotlib
        photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if photo.is_file():
            images["grace_hopper.jpg (path)"] = str(photo)
    except ImportError:
        pass
    circle = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(circle).ellipse((90, 50, 230, 190), fill="red")
    buf = io.BytesIO()
    circle.save(buf, format="PNG")
    images["red circle (PNG bytes)"] = buf.getvalue()
    square = Image.new("RGB", (200, 300), "white")
    ImageDraw.Draw(square).rectangle((40, 90, 160, 210), fill="blue")
    images["blue square (PIL)"] = square
    images["noise (uint8 array)"] = np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    return images


def _table(title: str, rows: list[str], cols: list[str], m: np.ndarray, fmt: str = "{:+.4f}") -> str:
    w = max(len(r) for r in rows)
    head = " " * w + " | " + " ".join(f"{c[:14]:>14}" for c in cols)
    lines = [title, head, "-" * len(head)]
    lines += [f"{r:<{w}} | " + " ".join(f"{fmt.format(v):>14}" for v in m[i]) for i, r in enumerate(rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.demo", description="In-process FILIP demo on exported ONNX artifacts.")
    p.add_argument("--export-dir", type=Path, required=True, help="the onnx/ folder written by export/to_trt.py")
    p.add_argument("--checkpoint", type=Path, default=None, help="also run PyTorch on the same inputs and compare")
    args = p.parse_args(argv)
    try:
        pipe = FilipPipeline.from_export_dir(args.export_dir)
        images = demo_images()
        names = list(images)
        t = time.perf_counter()
        img = pipe.embed_images(list(images.values()))
        t_img = time.perf_counter() - t
        t = time.perf_counter()
        txt = pipe.embed_texts(TEXTS)
        t_txt = time.perf_counter() - t
        print(f"embedded {len(img)} images in {t_img * 1e3:.0f} ms: tokens {img.tokens.shape}, pooled {img.pooled.shape}")
        print(f"embedded {len(txt)} texts in {t_txt * 1e3:.0f} ms: tokens {txt.tokens.shape}, lengths {txt.lengths.tolist()}")
        print()
        print(_table("s_I (image -> text: mean over patches of the best word)", names, TEXTS, pipe.score(img, txt)))
        print()
        print(_table("s_T (text -> image: mean over words of the best patch)", names, TEXTS, pipe.score(img, txt, direction="t2i")))
        print()
        zs = pipe.classify(img, LABELS)
        print(_table("zero-shot (mean s_I over the prompt ensemble)", names, LABELS, zs))
        for n, row in zip(names, zs):
            print(f"  {n}: {LABELS[int(np.argmax(row))]}")
        print()
        amap = pipe.alignment(img, txt, 0, 0)
        print(f"word-patch alignment of '{names[0]}' with '{TEXTS[0]}' (token index per patch; 0 = SOT):")
        print("\n".join("  " + " ".join(f"{v:2d}" for v in row) for row in amap))
        if args.checkpoint is not None:
            ref = FilipPipeline.from_checkpoint(args.checkpoint)
            for what, a, b in (("images", ref.embed_images(list(images.values())), img), ("texts", ref.embed_texts(TEXTS), txt)):
                r = compare_outputs({"tokens": a.tokens, "pooled": a.pooled}, {"tokens": b.tokens, "pooled": b.pooled},
                                    Tolerance(max_abs=1e-4, min_cosine=0.99999), f"ONNX Runtime vs PyTorch, demo {what}")
                print(r.summary())
                r.raise_if_failed()
        print("\n(random weights: the rankings above are meaningless; the numbers are exact)")
    except FilipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
