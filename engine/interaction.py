"""FILIP's token-wise late interaction, fast (torch), chunked, masks from lengths.

    s_I(i, j) = (1/n1) * sum_k max_{r<n2} <x_k, y_r>     image-to-text (best word per patch)
    s_T(i, j) = (1/n2) * sum_r max_{k<n1} <x_k, y_r>     text-to-image (best patch per word)

One GEMM per (image chunk, text chunk) gives both: the similarity block
[ci*T_img, cj*T_txt] viewed as [ci, T_img, cj, T_txt], padded text tokens masked to -inf
before the max over r, padded patches before the max over k, then means over the real
tokens.  Inputs may be fp16/bf16; each chunk is converted to fp32 before the matmul, so the
gallery is never upcast as a whole and accumulation is fp32.  Chunk sizes keep the block
and its masked copies under ``max_chunk_bytes``.

Written by hand because no library computes masked, length-aware MaxSim in both directions
(ColBERT-style scorers sum over query tokens only and mask by ids).  The NumPy reference in
:mod:`engine.interaction_ref` is the specification it is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import InvalidInputError

DEFAULT_MAX_CHUNK_BYTES = 256 * 1024 * 1024
_BLOCK_COPIES = 3   # the fp32 similarity block + two masked copies alive at once
# The fp32 copy of an image chunk is kept cache-sized: converting a whole fp16 gallery at once
# streams it through memory three times (read fp16, write fp32, read fp32); 4 MiB chunks
# convert and multiply in cache.  Measured on the 2-core machine, 20,000 B/32 fp16 images x
# one 16-token query: 669 ms unchunked vs 150-200 ms with 4 MiB chunks (docs/BENCHMARKS.md).
_IMAGE_CHUNK_BYTES = 4 * 1024 * 1024

# A CLIP-style prompt ensemble (a subset of OpenAI's ImageNet templates).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a photo of the large {}.",
    "a photo of the small {}.", "a close-up photo of a {}.", "a bright photo of a {}.", "itap of a {}.",
)


@dataclass(frozen=True)
class LateInteractionScores:
    s_i: np.ndarray | torch.Tensor   # [N_img, N_txt] image-to-text
    s_t: np.ndarray | torch.Tensor   # [N_img, N_txt] text-to-image


def _as_tokens(a, what: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{what} must be a numpy array or torch tensor, got {type(a).__name__}")
    if not t.is_floating_point():
        raise InvalidInputError(f"{what} must be floating point, got {t.dtype}")
    if t.ndim != 3 or 0 in t.shape:
        raise InvalidInputError(f"{what} must be [N, T, D] with N, T, D > 0, got shape {list(t.shape)}")
    return t


def _as_lengths(a, n: int, t: int, what: str, device) -> torch.Tensor:
    arr = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a).copy())
    if arr.is_floating_point() or arr.dtype == torch.bool:
        raise InvalidInputError(f"{what} must be integers, got {arr.dtype}")
    arr = arr.reshape(-1).to(torch.int64)
    if arr.shape[0] != n:
        raise InvalidInputError(f"{what} has {arr.shape[0]} entries for {n} rows")
    if n and (int(arr.min()) < 1 or int(arr.max()) > t):
        raise InvalidInputError(f"every {what} entry must lie in [1, {t}] (the padded width), got [{int(arr.min())}, {int(arr.max())}]")
    return arr.to(device)


def plan_chunks(n_img: int, t_img: int, n_txt: int, t_txt: int, max_chunk_bytes: int,
                dim: int = 0) -> tuple[int, int]:
    """(images per chunk, texts per chunk) so that the block and its masked copies fit in
    ``max_chunk_bytes``, and the fp32 image chunk (``dim`` given) stays cache-sized."""
    per_pair = _BLOCK_COPIES * 4 * t_img * t_txt
    budget = max(1, max_chunk_bytes // per_pair)           # pairs per block
    cj = max(1, min(n_txt, budget))
    ci = max(1, min(n_img, budget // cj))
    if dim:
        ci = min(ci, max(1, _IMAGE_CHUNK_BYTES // (4 * t_img * dim)))
    return ci, cj


def late_interaction(img_tokens, img_lengths, txt_tokens, txt_lengths, *,
                     max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, return_tensors: bool = False) -> LateInteractionScores:
    """s_I and s_T for every (image, text) pair.  Tokens must be L2-normalised (as the towers emit)."""
    it, tt = _as_tokens(img_tokens, "image tokens"), _as_tokens(txt_tokens, "text tokens")
    if it.shape[2] != tt.shape[2]:
        raise InvalidInputError(f"token dims differ: images D={it.shape[2]}, texts D={tt.shape[2]}")
    device = it.device
    tt = tt.to(device)
    (ni, t1, d), (nt, t2, _) = it.shape, tt.shape
    il = _as_lengths(img_lengths, ni, t1, "image lengths", device)
    tl = _as_lengths(txt_lengths, nt, t2, "text lengths", device)
    img_valid = torch.arange(t1, device=device)[None, :] < il[:, None]     # [Ni, T1]
    txt_valid = torch.arange(t2, device=device)[None, :] < tl[:, None]     # [Nt, T2]
    img_full = bool(img_valid.all())
    s_i = torch.empty(ni, nt, dtype=torch.float32, device=device)
    s_t = torch.empty(ni, nt, dtype=torch.float32, device=device)
    # only a gallery that needs converting (fp16/bf16) benefits from cache-sized image chunks
    ci, cj = plan_chunks(ni, t1, nt, t2, max_chunk_bytes, dim=0 if it.dtype == torch.float32 else d)
    neg_inf = float("-inf")
    with torch.inference_mode():
        for a in range(0, ni, ci):
            x = it[a:a + ci].float()                                         # [ci, T1, D]
            xv = img_valid[a:a + ci]
            n1 = il[a:a + ci].to(torch.float32)
            for b in range(0, nt, cj):
                y = tt[b:b + cj].float()                                     # [cj, T2, D]
                yv = txt_valid[b:b + cj]
                sim = (x.reshape(-1, d) @ y.reshape(-1, d).T).view(x.shape[0], t1, y.shape[0], t2)
                best_r = sim.masked_fill(~yv[None, None], neg_inf).amax(dim=3)       # [ci, T1, cj]
                s_i[a:a + ci, b:b + cj] = (best_r * xv[:, :, None]).sum(dim=1) / n1[:, None]
                masked = sim if img_full else sim.masked_fill(~xv[:, :, None, None], neg_inf)
                best_k = masked.amax(dim=1)                                          # [ci, cj, T2]
                s_t[a:a + ci, b:b + cj] = (best_k * yv[None]).sum(dim=2) / tl[b:b + cj].to(torch.float32)[None]
    if return_tensors:
        return LateInteractionScores(s_i, s_t)
    return LateInteractionScores(s_i.cpu().numpy(), s_t.cpu().numpy())


def build_prompts(labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    """Class-major prompts: every template of labels[0], then of labels[1], ..."""
    if isinstance(labels, str) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        raise InvalidInputError("labels must be a non-empty list of non-empty strings")
    if isinstance(templates, str) or not templates or any("{}" not in t for t in templates):
        raise InvalidInputError("templates must be a non-empty list of strings, each containing '{}'")
    return [t.format(label) for label in labels for t in templates]


def zero_shot_scores(img_tokens, img_lengths, prompt_tokens, prompt_lengths, *, n_classes: int, n_templates: int,
                     mode: str = "mean", logit_scale: float = 100.0, prompt_order: str = "class_major") -> np.ndarray:
    """[N_img, C]: ``mode="mean"`` (the paper's): mean over templates of s_I(img, prompt);
    ``mode="softmax"`` (Wukong's): mean over templates of softmax over classes of
    ``logit_scale * s_I``.  ``prompt_order``: "class_major" (as :func:`build_prompts`) or
    "template_major" (all classes of template 0, then template 1, ...)."""
    if mode not in ("mean", "softmax"):
        raise InvalidInputError(f"mode must be 'mean' or 'softmax', got {mode!r}")
    if prompt_order not in ("class_major", "template_major"):
        raise InvalidInputError(f"prompt_order must be 'class_major' or 'template_major', got {prompt_order!r}")
    n_prompts = len(prompt_lengths)
    if n_classes < 1 or n_templates < 1 or n_classes * n_templates != n_prompts:
        raise InvalidInputError(f"{n_prompts} prompts are not {n_classes} classes x {n_templates} templates")
    s = torch.from_numpy(late_interaction(img_tokens, img_lengths, prompt_tokens, prompt_lengths).s_i)
    s = s.view(-1, n_classes, n_templates) if prompt_order == "class_major" else s.view(-1, n_templates, n_classes).transpose(1, 2)
    if mode == "mean":
        return s.mean(dim=2).numpy()
    return torch.softmax(logit_scale * s.double(), dim=1).mean(dim=2).float().numpy()


def _single(a, what: str) -> torch.Tensor:
    """One item's tokens [T, D] (or [1, T, D]) as a [1, T, D] tensor."""
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    if isinstance(t, torch.Tensor) and t.ndim == 2:
        t = t[None]
    t = _as_tokens(t, what)
    if t.shape[0] != 1:
        raise InvalidInputError(f"alignment_map takes one image and one text, got {t.shape[0]} {what} rows")
    return t


def alignment_map(img_tokens, img_length: int, txt_tokens, txt_length: int, *, grid=None) -> np.ndarray:
    """Word-patch alignment of one image and one text: for each real patch, the index of its
    most similar real text token (0 = SOT) — the paper's visualisation, a by-product of s_I.
    Returns [n1], or [gh, gw] with ``grid=(gh, gw)``."""
    x, y = _single(img_tokens, "image tokens"), _single(txt_tokens, "text tokens")
    n1 = int(_as_lengths([img_length], 1, x.shape[1], "image length", x.device)[0])
    n2 = int(_as_lengths([txt_length], 1, y.shape[1], "text length", x.device)[0])
    if x.shape[2] != y.shape[2]:
        raise InvalidInputError(f"token dims differ: image D={x.shape[2]}, text D={y.shape[2]}")
    sim = x[0, :n1].float() @ y[0, :n2].float().to(x.device).T                 # [n1, n2]
    idx = sim.argmax(dim=1).cpu().numpy().astype(np.int64)
    if grid is None:
        return idx
    gh, gw = grid
    if gh * gw != n1:
        raise InvalidInputError(f"grid {gh}x{gw} does not hold {n1} patches")
    return idx.reshape(gh, gw)
