"""FILIP's token-wise late interaction: chunked, masks from lengths only.

    s_I(i, j) = (1/n1) * sum_k max_{r<n2} <x_k, y_r>     image-to-text (best word per patch)
    s_T(i, j) = (1/n2) * sum_r max_{k<n1} <x_k, y_r>     text-to-image (best patch per word)

Also here: zero-shot scores over a prompt ensemble, prompt building, and the word-patch
alignment map.  :mod:`filip_engine.interaction_ref` is the slow NumPy specification all of this is
tested against (tests/test_interaction.py).

How the scorer works.  Images and texts are cut into chunks (:func:`plan_chunks`); each
(image chunk, text chunk) pair is one call of :func:`_score_block`, which gives the fp32
similarity block [ci, T_img, cj, T_txt] of one GEMM, masks padded text tokens out of the max
over r (-> s_I) and padded patches out of the max over k (-> s_T), and zeroes the per-token
maxima of padded tokens before the masked means, so whatever the padding holds (zeros,
garbage, inf, NaN) cannot leak in.  fp16/bf16/fp64 inputs are converted to fp32 one chunk at
a time (products of fp16 or bf16 values are exact in fp32; sums accumulate in fp32), so a
gallery is never upcast as a whole.  The chunk plan keeps everything a chunk allocates under
``max_chunk_bytes``.

Two backends run the blocks.  numpy inputs go through the ONNX Runtime kernel of
:mod:`filip_engine.maxsim` (the faster one on CPU, shared with gallery search), and zero-shot
aggregation and alignment maps are plain numpy: importing this module does not import torch.
torch tensors (on any device, bf16 included) or ``return_tensors=True`` take the torch path
(GEMM + in-place masked reductions on the image tokens' device), torch being imported then.

GPU note: on CUDA the fp32 GEMM obeys the caller's ``torch.backends.cuda.matmul.allow_tf32``
/ ``torch.set_float32_matmul_precision``; leave them at PyTorch's default ("highest") for
scores within 1e-5 of the reference, since TF32 rounds inputs to 10 mantissa bits.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from filip_contract.prompts import DEFAULT_TEMPLATES

from .errors import InvalidInputError
from .maxsim import pair_scores

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_CHUNK_BYTES = 256 * 1024 * 1024
# When the images are not fp32 (converted per chunk), the fp32 image chunk is also kept
# cache-sized: converting a whole fp16 gallery at once streams it through memory three times
# (read fp16, write fp32, read fp32); chunks this size convert and multiply in cache, and are
# still large enough that the per-call overhead of the kernel stays small (docs/BENCHMARKS.md).
_IMAGE_CHUNK_BYTES = 12 * 1024 * 1024
# The plan tries to give each text chunk at least this many images, so that (when texts are
# many) each converted text chunk is reused by a reasonably tall GEMM.
_MIN_IMAGES_PER_CHUNK = 16


_NUMPY_FLOATS = ("float16", "float32", "float64")   # bf16 exists only as a torch dtype


@dataclass(frozen=True)
class LateInteractionScores:
    """Both directions for every (image, text) pair; numpy float32 unless ``return_tensors``."""
    s_i: np.ndarray | torch.Tensor   # [N_img, N_txt] image-to-text: rank texts for an image
    s_t: np.ndarray | torch.Tensor   # [N_img, N_txt] text-to-image: rank images for a text


# --- chunk planning ----------------------------------------------------------------------------
class ChunkPlan(NamedTuple):
    images: int       # images per chunk (the last chunk may hold fewer)
    texts: int        # texts per chunk (likewise)
    peak_bytes: int   # what one full-size chunk allocates at most (see chunk_bytes)


def chunk_bytes(ci: int, cj: int, t_img: int, t_txt: int, dim: int) -> int:
    """Bytes one chunk of ``ci`` images x ``cj`` texts allocates at most, all alive at once:
    the fp32 similarity block and one masked copy of it (ONNX Runtime's ``Where`` writes a new
    block; torch masks in place), the two per-token maxima and their masked copies, the score
    blocks and their sums, the fp32 copies of both token chunks, and the boolean masks."""
    block = ci * t_img * cj * t_txt                       # [ci, T_img, cj, T_txt]
    maxima = ci * t_img * cj + ci * cj * t_txt            # best word per patch, best patch per word
    scores = 2 * ci * cj                                  # s_I and s_T of the chunk
    tokens = ci * t_img * dim + cj * t_txt * dim          # fp32 copies of the token chunks
    masks = 2 * (ci * t_img + cj * t_txt)                 # bool masks and their negations
    return 4 * (2 * block + 2 * maxima + 2 * scores + tokens) + masks


def plan_chunks(n_img: int, t_img: int, n_txt: int, t_txt: int, dim: int,
                max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, *, convert_images: bool = False) -> ChunkPlan:
    """The largest chunks whose :func:`chunk_bytes` fit in ``max_chunk_bytes``: texts first
    (given room for up to 16 images), then as many images as still fit.  With
    ``convert_images`` (fp16/bf16/fp64 images) the image chunk is also kept cache-sized.  Raises
    :class:`InvalidInputError` when not even one image-text pair fits."""
    if isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, (int, np.integer)):
        raise InvalidInputError(f"max_chunk_bytes must be an integer, got {max_chunk_bytes!r}")
    need = chunk_bytes(1, 1, t_img, t_txt, dim)
    if max_chunk_bytes < need:
        raise InvalidInputError(f"max_chunk_bytes={max_chunk_bytes} is below the {need} bytes that one image "
                                f"({t_img} tokens) x one text ({t_txt} tokens) of dimension {dim} need")
    n_img, n_txt = max(n_img, 1), max(n_txt, 1)

    def most(cost, limit: int) -> int:
        """Largest c in [1, limit] with cost(c) <= max_chunk_bytes (cost is affine in c)."""
        base, step = cost(0), cost(1) - cost(0)
        return max(1, min(limit, (max_chunk_bytes - base) // step))

    ci0 = min(n_img, _MIN_IMAGES_PER_CHUNK)
    while ci0 > 1 and chunk_bytes(ci0, 1, t_img, t_txt, dim) > max_chunk_bytes:
        ci0 //= 2
    cj = most(lambda c: chunk_bytes(ci0, c, t_img, t_txt, dim), n_txt)
    ci = most(lambda c: chunk_bytes(c, cj, t_img, t_txt, dim), n_img)
    if convert_images:
        ci = min(ci, max(1, _IMAGE_CHUNK_BYTES // (4 * t_img * dim)))
    return ChunkPlan(ci, cj, chunk_bytes(ci, cj, t_img, t_txt, dim))


# --- input checks ------------------------------------------------------------------------------
def _is_tensor(a) -> bool:
    """Whether ``a`` is a torch tensor, without importing torch (unloaded, nothing is one)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor)


def _to_tensor(a) -> torch.Tensor:
    """A tensor over the same memory where possible (no copy of a gallery)."""
    import torch
    if isinstance(a, torch.Tensor):
        return a
    arr = np.asarray(a)
    if any(s < 0 for s in arr.strides) or not arr.dtype.isnative:
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    if not arr.flags.writeable:   # never written to; silence torch's one-time warning about it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    return torch.from_numpy(arr)


def _check_tokens(a, what: str, problems: list[str]):
    """The tokens as given (a torch tensor) or as a numpy array over the same memory; None
    (and a problem noted) unless they are floats [N, T, D] with T, D > 0."""
    if _is_tensor(a):
        import torch
        ok = a.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    else:
        try:
            a = np.asarray(a)
        except (TypeError, ValueError, RuntimeError) as e:
            problems.append(f"{what} must be a numpy array or torch tensor of floats, got {type(a).__name__} ({e})")
            return None
        ok = a.dtype.name in _NUMPY_FLOATS
    if not ok:
        problems.append(f"{what} must be floating point (fp16, bf16, fp32 or fp64), got dtype {a.dtype}")
        return None
    if a.ndim != 3 or a.shape[1] == 0 or a.shape[2] == 0:
        problems.append(f"{what} must have 3 dims [N, T, D] with T, D > 0, got shape {list(a.shape)}")
        return None
    return a


def _check_lengths(a, tokens, what: str, problems: list[str]) -> np.ndarray | None:
    """int64 numpy [N], each in [1, T]."""
    try:
        arr = a.detach().cpu().numpy() if _is_tensor(a) else np.asarray(a)
    except (TypeError, ValueError, RuntimeError) as e:
        problems.append(f"{what} must be integers, got {type(a).__name__} ({e})")
        return None
    if arr.dtype.kind not in "iu":
        problems.append(f"{what} must be integers, got dtype {arr.dtype}")
        return None
    if tokens is None:
        return None
    n, t = tokens.shape[0], tokens.shape[1]
    if arr.ndim != 1 or arr.shape[0] != n:
        problems.append(f"{what} must have shape [{n}] (one length per row of the tokens), got shape {list(arr.shape)}")
        return None
    out = arr.astype(np.int64)
    bad = (arr < 1) | (arr > t)   # compared before the cast, so uint64 values cannot wrap
    if bad.any():
        i = int(np.argmax(bad))
        problems.append(f"every entry of {what} must lie in [1, {t}] (the padded width), "
                        f"got {arr[i]} at index {i} ({int(bad.sum())} bad)")
        return None
    return out


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise InvalidInputError("; ".join(problems))


# --- the scorer --------------------------------------------------------------------------------
def _score_block(x, x_valid, n1, y, y_valid, n2):
    """One chunk.  x [ci, T1, D], y [cj, T2, D]; x_valid [ci, T1] / y_valid [cj, T2] bool
    (None: every token is real); n1 [ci], n2 [cj] fp32 lengths -> (s_I, s_T), each [ci, cj].
    numpy chunks (as stored) run on the ONNX Runtime kernel, torch chunks (fp32) on torch."""
    if isinstance(x, np.ndarray):
        return pair_scores(x, x_valid, n1, y, y_valid, n2)
    return _torch_block(x, x_valid, n1, y, y_valid, n2)


def _valid(lengths: np.ndarray, t: int) -> np.ndarray | None:
    """[c, t] real-token mask of one chunk, or None when every token of the chunk is real."""
    if int(lengths.min()) == t:
        return None
    return np.arange(t)[None, :] < lengths[:, None]


def late_interaction(img_tokens, img_lengths, txt_tokens, txt_lengths, *,
                     max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES, return_tensors: bool = False) -> LateInteractionScores:
    """s_I and s_T for every (image, text) pair.

    img_tokens [N_img, T_img, D] and txt_tokens [N_txt, T_txt, D]: numpy arrays or torch
    tensors, fp16/bf16/fp32/fp64, L2-normalised per token (as the towers emit them), padded;
    img_lengths [N_img] / txt_lengths [N_txt]: the real token counts, any integer dtype, in
    [1, T].  Only the lengths decide what is real.  numpy tokens are scored on ONNX Runtime
    (:mod:`filip_engine.maxsim`); if either is a torch tensor, or with ``return_tensors=True``, on
    torch, on the image tokens' device (text tokens are moved there).  Accumulates in fp32,
    and allocates at most ``max_chunk_bytes`` per chunk besides the two [N_img, N_txt]
    results.  Returns numpy float32, or fp32 torch tensors on that device with
    ``return_tensors=True``.
    """
    problems: list[str] = []
    it = _check_tokens(img_tokens, "image tokens", problems)
    tt = _check_tokens(txt_tokens, "text tokens", problems)
    il = _check_lengths(img_lengths, it, "image lengths", problems)
    tl = _check_lengths(txt_lengths, tt, "text lengths", problems)
    if it is not None and tt is not None and it.shape[2] != tt.shape[2]:
        problems.append(f"image and text tokens must have the same dimension D, got {it.shape[2]} and {tt.shape[2]}")
    _raise_if(problems)
    if return_tensors or _is_tensor(it) or _is_tensor(tt):
        return _late_interaction_torch(_to_tensor(it), il, _to_tensor(tt), tl, max_chunk_bytes, return_tensors)
    (ni, t1, d), (nt, t2, _) = it.shape, tt.shape
    plan = plan_chunks(ni, t1, nt, t2, d, max_chunk_bytes, convert_images=it.dtype != np.float32)
    texts = [(slice(b, b + plan.texts), tt[b:b + plan.texts], _valid(tl[b:b + plan.texts], t2),
              tl[b:b + plan.texts].astype(np.float32)) for b in range(0, nt, plan.texts)]
    s_i = np.empty((ni, nt), np.float32)
    s_t = np.empty((ni, nt), np.float32)
    for a in range(0, ni, plan.images):
        b_img = slice(a, a + plan.images)
        x, x_valid, n1 = it[b_img], _valid(il[b_img], t1), il[b_img].astype(np.float32)   # x as stored
        for b_txt, y, y_valid, n2 in texts:
            s_i[b_img, b_txt], s_t[b_img, b_txt] = _score_block(x, x_valid, n1, y, y_valid, n2)
    return LateInteractionScores(s_i, s_t)


# --- the torch path (torch tensors: CUDA, bf16, return_tensors) --------------------------------
def _torch_block(x: torch.Tensor, x_valid: torch.Tensor | None, n1: torch.Tensor,
                 y: torch.Tensor, y_valid: torch.Tensor | None, n2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_score_block` on torch: x, y fp32 on one device; GEMM + in-place masked reductions."""
    ci, t1, d = x.shape
    cj, t2, _ = y.shape
    sim = (x.reshape(ci * t1, d) @ y.reshape(cj * t2, d).T).view(ci, t1, cj, t2)
    if y_valid is not None:
        sim.masked_fill_(~y_valid[None, None], float("-inf"))    # padded words never win a max over r
    best_r = sim.amax(dim=3)                                       # [ci, T1, cj]
    if x_valid is not None:
        best_r.masked_fill_(~x_valid[:, :, None], 0.0)            # padded patches add nothing to s_I
        sim.masked_fill_(~x_valid[:, :, None, None], float("-inf"))
    best_k = sim.amax(dim=1)                                       # [ci, cj, T2]
    if y_valid is not None:
        best_k.masked_fill_(~y_valid[None], 0.0)                  # padded words add nothing to s_T
    return best_r.sum(dim=1) / n1[:, None], best_k.sum(dim=2) / n2[None, :]


def _late_interaction_torch(it: torch.Tensor, il: np.ndarray, tt: torch.Tensor, tl: np.ndarray,
                            max_chunk_bytes: int, return_tensors: bool) -> LateInteractionScores:
    import torch
    (ni, t1, d), (nt, t2, _) = it.shape, tt.shape
    device = it.device
    plan = plan_chunks(ni, t1, nt, t2, d, max_chunk_bytes, convert_images=it.dtype != torch.float32)
    il_dev = torch.from_numpy(il).to(device)
    tl_dev = torch.from_numpy(tl).to(device)

    def valid(lengths: np.ndarray, lengths_dev: torch.Tensor, t: int) -> torch.Tensor | None:
        if int(lengths.min()) == t:
            return None
        return torch.arange(t, device=device)[None, :] < lengths_dev[:, None]

    s_i = torch.empty(ni, nt, dtype=torch.float32, device=device)
    s_t = torch.empty(ni, nt, dtype=torch.float32, device=device)
    with torch.inference_mode():
        for a in range(0, ni, plan.images):
            b_img = slice(a, a + plan.images)
            x = it[b_img].to(torch.float32)                               # [ci, T1, D]
            x_valid = valid(il[b_img], il_dev[b_img], t1)
            n1 = il_dev[b_img].to(torch.float32)
            for b in range(0, nt, plan.texts):
                b_txt = slice(b, b + plan.texts)
                y = tt[b_txt].to(device=device, dtype=torch.float32)      # [cj, T2, D]
                y_valid = valid(tl[b_txt], tl_dev[b_txt], t2)
                s_i[b_img, b_txt], s_t[b_img, b_txt] = _score_block(
                    x, x_valid, n1, y, y_valid, tl_dev[b_txt].to(torch.float32))
    if return_tensors:
        return LateInteractionScores(s_i, s_t)
    return LateInteractionScores(s_i.cpu().numpy(), s_t.cpu().numpy())


# --- zero-shot classification ------------------------------------------------------------------
def build_prompts(labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    """Class-major prompts (``prompt_order="class_major"``): every template of labels[0], then
    every template of labels[1], ...; prompt ``c * len(templates) + t`` is template t of class c."""
    if isinstance(labels, str) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        raise InvalidInputError("labels must be a non-empty list of non-empty strings")
    if isinstance(templates, str) or not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise InvalidInputError("templates must be a non-empty list of strings, each containing '{}'")
    try:
        return [t.format(label) for label in labels for t in templates]
    except (IndexError, KeyError, ValueError) as e:
        raise InvalidInputError(f"a template must contain exactly one '{{}}' and no other braces ({e})") from None


def zero_shot_scores(img_tokens, img_lengths, prompt_tokens, prompt_lengths, *, n_classes: int, n_templates: int,
                     mode: str = "mean", logit_scale: float = 100.0, prompt_order: str = "class_major",
                     max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> np.ndarray:
    """Zero-shot class scores, float32 [N_img, C] (s_I, as FILIP classifies).

    The C*P prompts are laid out by ``prompt_order``: "class_major" (as :func:`build_prompts`:
    prompt ``c*P + t`` is template t of class c) or "template_major" (prompt ``t*C + c``).
    ``mode="mean"`` (the paper's, default): mean over templates of s_I(img, prompt_t(c));
    ``logit_scale`` plays no part.  ``mode="softmax"`` (Wukong's): mean over templates of
    softmax over classes of ``logit_scale * s_I``; rows are probabilities summing to 1.
    """
    if mode not in ("mean", "softmax"):
        raise InvalidInputError(f"mode must be 'mean' or 'softmax', got {mode!r}")
    if prompt_order not in ("class_major", "template_major"):
        raise InvalidInputError(f"prompt_order must be 'class_major' or 'template_major', got {prompt_order!r}")
    for name, v in (("n_classes", n_classes), ("n_templates", n_templates)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float, np.number)) \
            or not math.isfinite(float(logit_scale)) or float(logit_scale) <= 0:
        raise InvalidInputError(f"logit_scale must be a finite positive number, got {logit_scale!r}")
    n_prompts = int(np.shape(prompt_lengths)[0]) if np.ndim(prompt_lengths) == 1 else None
    if n_prompts is not None and n_prompts != n_classes * n_templates:   # else late_interaction says what is wrong
        raise InvalidInputError(f"{n_prompts} prompt lengths given for {n_classes} classes x {n_templates} templates "
                                f"= {n_classes * n_templates} prompts")
    s = late_interaction(img_tokens, img_lengths, prompt_tokens, prompt_lengths,
                         max_chunk_bytes=max_chunk_bytes).s_i                # [N, C*P] fp32
    if prompt_order == "class_major":
        s = s.reshape(-1, n_classes, n_templates)                          # [N, C, P]
    else:
        s = s.reshape(-1, n_templates, n_classes).transpose(0, 2, 1)       # [N, P, C] -> [N, C, P]
    if mode == "mean":
        return s.mean(axis=2).astype(np.float32)
    z = float(logit_scale) * s.astype(np.float64)                          # softmax over classes, per template
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).mean(axis=2).astype(np.float32)


# --- word-patch alignment ----------------------------------------------------------------------
def _one_item(a, what: str):
    """One item's tokens, [T, D] or [1, T, D], as [1, T, D] (numpy, or the torch tensor)."""
    if (isinstance(a, np.ndarray) or _is_tensor(a)) and a.ndim == 2:
        a = a[None]
    problems: list[str] = []
    t = _check_tokens(a, what, problems)
    if t is not None and t.shape[0] != 1:
        problems.append(f"alignment_map takes one image and one text, got {t.shape[0]} rows of {what}")
    _raise_if(problems)
    return t


def _as_row(length):
    """A single length (int, numpy or torch scalar) as a one-entry vector."""
    if _is_tensor(length):
        return length.reshape(-1)
    return np.reshape(np.asarray(length), -1)


def alignment_map(img_tokens, img_length: int, txt_tokens, txt_length: int, *, grid=None) -> np.ndarray:
    """Word-patch alignment of one image and one text: for each real patch k, the index
    ``argmax_{r<n2} <x_k, y_r>`` of its most similar real text token (0 = SOT; the first on a
    tie), the by-product of s_I the paper visualises.

    Tokens are [T, D] or [1, T, D].  Returns int64 [n1]; with ``grid=(gh, gw)`` reshaped to the
    patch grid (gh * gw must equal n1), with ``grid="auto"`` to sqrt(n1) x sqrt(n1).
    """
    x, y = _one_item(img_tokens, "image tokens"), _one_item(txt_tokens, "text tokens")
    problems: list[str] = []
    n1 = _check_lengths(_as_row(img_length), x, "image length", problems)
    n2 = _check_lengths(_as_row(txt_length), y, "text length", problems)
    if x.shape[2] != y.shape[2]:
        problems.append(f"image and text tokens must have the same dimension D, got {x.shape[2]} and {y.shape[2]}")
    _raise_if(problems)
    n1, n2 = int(n1[0]), int(n2[0])
    if _is_tensor(x) or _is_tensor(y):
        import torch
        x, y = _to_tensor(x), _to_tensor(y)
        with torch.inference_mode():
            sim = x[0, :n1].to(torch.float32) @ y[0, :n2].to(device=x.device, dtype=torch.float32).T   # [n1, n2]
            idx = sim.argmax(dim=1).cpu().numpy().astype(np.int64)
    else:
        sim = x[0, :n1].astype(np.float32) @ y[0, :n2].astype(np.float32).T                           # [n1, n2]
        idx = sim.argmax(axis=1).astype(np.int64)
    if grid is None:
        return idx
    if isinstance(grid, str):
        side = math.isqrt(n1)
        if grid != "auto" or side * side != n1:
            raise InvalidInputError(f"grid='auto' needs a square number of patches, got n1={n1}" if grid == "auto"
                                    else f"grid must be None, 'auto' or (rows, cols), got {grid!r}")
        return idx.reshape(side, side)
    try:
        gh, gw = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise InvalidInputError(f"grid must be None, 'auto' or (rows, cols), got {grid!r}") from None
    if gh < 1 or gw < 1 or gh * gw != n1:
        raise InvalidInputError(f"grid {gh}x{gw} does not hold the image's {n1} patches")
    return idx.reshape(gh, gw)
