"""FILIP's explanations, in numpy on the gateway, from the served token embeddings.

For an image (patch tokens x_k, k < P) and a text (tokens y_r, r < n2, SOT and EOT included):

- the similarity matrix ``sim[k, r] = <x_k, y_r>`` (both sides are L2-normalised on the server);
- token r's contribution to s_T: ``max_k sim[k, r] / n2`` (they sum to s_T, the served S_T);
- its best patch ``argmax_k sim[k, r]`` and that patch's (row, col) on the patch grid;
- its heatmap: ``sim[:, r]`` reshaped to the grid (the row of the image-text token similarity
  matrix for that word);
- each patch's best token ``argmax_r sim[k, r]`` (what filip_score's ALIGNMENT returns).

Token labels: the gateway has no tokenizer.  It splits the text into words with CLIP's
pre-tokenisation pattern (approximated without the ``regex`` package: letter runs, single
digits, runs of other symbols, the English contractions) and learns how many BPE tokens each
word takes from the server itself (each word embedded alone by filip_text: its LENGTHS - 2),
since CLIP's BPE works inside each word.  When the counts add up to the served length the
labels are exact (a word of several pieces labels each piece ``word#i``); when they do not (a
tokenizer that cleans text differently, e.g. ftfy fixes), tokens are labelled by index only.
"""
from __future__ import annotations

import base64
import io
import math
import re
from typing import Sequence

import numpy as np

SOT_LABEL, EOT_LABEL = "<|startoftext|>", "<|endoftext|>"
_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


def words_of(text: str) -> list[str]:
    """CLIP's pre-tokenisation of ``text`` (lower-cased, whitespace-collapsed), approximately."""
    return _WORD.findall(" ".join(text.split()).lower())


def label_tokens(n_tokens: int, words: Sequence[str], counts: Sequence[int] | None) -> tuple[list[dict], list[dict], bool]:
    """(tokens, words, exact): each token's label and word index, each word's token indices.
    ``counts``: BPE tokens per word (None: unknown). ``n_tokens`` includes SOT and EOT; a text
    truncated at 77 tokens keeps its first words."""
    inner = n_tokens - 2
    tokens = [{"index": 0, "label": SOT_LABEL, "word": None}]
    out_words: list[dict] = []
    exact = counts is not None and len(counts) == len(words) and sum(counts) >= inner and all(c >= 1 for c in counts)
    if exact:
        r = 1
        for w, (word, c) in enumerate(zip(words, counts)):
            if r > inner:
                break
            idx = list(range(r, min(r + c, inner + 1)))
            for j, i in enumerate(idx):
                tokens.append({"index": i, "label": word if c == 1 else f"{word}#{j + 1}", "word": len(out_words)})
            out_words.append({"word": word, "tokens": idx})
            r += len(idx)
    else:
        for i in range(1, inner + 1):
            tokens.append({"index": i, "label": f"token {i}", "word": len(out_words)})
            out_words.append({"word": f"token {i}", "tokens": [i]})
    tokens.append({"index": n_tokens - 1, "label": EOT_LABEL, "word": None})
    return tokens, out_words, exact


def grid_of(n_patches: int) -> tuple[int, int]:
    g = math.isqrt(n_patches)
    return (g, g) if g * g == n_patches else (1, n_patches)


def explain_pair(image_tokens: np.ndarray, text_tokens: np.ndarray) -> dict:
    """The explanation of one (image [P, D], text [n2, D]) pair, both cut to their lengths."""
    x = np.asarray(image_tokens, np.float64)
    y = np.asarray(text_tokens, np.float64)
    sim = x @ y.T                                  # [P, n2]
    n2 = sim.shape[1]
    best = sim.argmax(axis=0)                      # per token: its best patch
    contrib = sim.max(axis=0) / n2
    rows, cols = grid_of(sim.shape[0])
    return {"sim": sim, "contributions": contrib, "best_patch": best,
            "best_rc": np.stack([best // cols, best % cols], axis=1), "grid": (rows, cols),
            "s_t": float(contrib.sum()), "patch_alignment": sim.argmax(axis=1)}


def heatmap_grid(sim: np.ndarray, r: int, grid: tuple[int, int]) -> np.ndarray:
    return sim[:, r].reshape(grid)


# --- images as the model saw them ------------------------------------------------------------------
def model_view(data: bytes, side: int):
    """The centre square the image tower sees, at ``side`` pixels: EXIF orientation applied,
    shortest side resized to ``side`` (bicubic), centre crop with rounded offsets (OpenCLIP's
    recipe; a Hugging Face repository floors the offsets: at most one pixel of difference)."""
    from PIL import Image, ImageOps
    img = Image.open(io.BytesIO(data))
    img = ImageOps.exif_transpose(img).convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = side, max(side, int(side * h / w))
    else:
        nw, nh = max(side, int(side * w / h)), side
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - side) / 2.0)), int(round((nh - side) / 2.0))
    return img.crop((left, top, left + side, top + side))


def _colour(v: np.ndarray) -> np.ndarray:
    """[..] values in 0..1 -> [.., 3] uint8, a black-red-yellow-white ramp."""
    r = np.clip(v * 3, 0, 1)
    g = np.clip(v * 3 - 1, 0, 1)
    b = np.clip(v * 3 - 2, 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def normalised(h: np.ndarray) -> np.ndarray:
    lo, hi = float(h.min()), float(h.max())
    return np.zeros_like(h) if hi - lo < 1e-12 else (h - lo) / (hi - lo)


def overlay_png(view, heatmap: np.ndarray, alpha: float = 0.55) -> str:
    """The heatmap (normalised to 0..1, upsampled bilinearly) blended over ``view``; base64 PNG."""
    from PIL import Image
    hm = Image.fromarray((normalised(np.asarray(heatmap, np.float64)) * 255).astype(np.uint8), "L")
    hm = np.asarray(hm.resize(view.size, Image.BILINEAR), np.float64) / 255.0
    base = np.asarray(view.convert("RGB"), np.float64)
    out = base * (1 - alpha) + _colour(hm).astype(np.float64) * alpha
    buf = io.BytesIO()
    Image.fromarray(out.round().clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
