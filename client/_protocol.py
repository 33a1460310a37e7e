"""What the sync and async clients share: model names, input encoding, request building,
output parsing and the zero-shot aggregation.  No I/O happens here."""
from __future__ import annotations

import io
import os
import random
import time
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from .errors import FilipInvalidInputError
from .types import Embeddings, Hit

TEXT_MODEL = "filip_text"
IMAGE_MODEL = "filip_image"
SCORE_MODEL = "filip_score"
SEARCH_MODEL = "filip_search"
MODELS = (TEXT_MODEL, IMAGE_MODEL, SCORE_MODEL, SEARCH_MODEL)
SEARCH_MODES = ("exact", "two_stage")
SEARCH_OUTPUTS = ("IDS", "SCORES", "METADATA", "INFO")
MAX_QUERIES = 64              # queries per search request (engine.search.MAX_QUERIES)
MAX_K = 1000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EMBED_OUTPUTS = ("TOKENS", "LENGTHS", "POOLED")

# The server's per-request limits (engine.serving.ServingLimits) are published as ``limit_*``
# parameters of each model's config; the clients read them and refuse what the server would
# refuse before sending.  These defaults apply only when a server does not publish them.
MAX_TEXT_CHARS = 2_000
MAX_IMAGE_BYTES = 16 * 1024 * 1024
MAX_ITEMS_PER_REQUEST = 256
DEFAULT_LIMITS = {"max_text_chars": MAX_TEXT_CHARS, "max_image_bytes": MAX_IMAGE_BYTES,
                  "max_items_per_request": MAX_ITEMS_PER_REQUEST}


def served_limits(config: dict) -> dict[str, int]:
    """The ``limit_*`` parameters of a served model config, over the defaults."""
    params = config.get("parameters", {})
    out = dict(DEFAULT_LIMITS)
    for k, v in params.items():
        if k.startswith("limit_"):
            out[k[len("limit_"):]] = int(v.get("string_value", "0"))
    return out

# CLIP-style prompt ensemble (a subset of OpenAI's ImageNet templates); overridable per call.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a photo of the large {}.",
    "a photo of the small {}.", "a close-up photo of a {}.", "a bright photo of a {}.", "itap of a {}.",
)

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Any]


def backoff(attempt: int, base: float = 0.05, cap: float = 1.0) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): exponential, capped, jittered x0.5-1.5."""
    return min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)


def retry_pause(err: Exception, attempt: int, max_retries: int, deadline: float | None) -> float | None:
    """Seconds to wait before retrying after failed ``attempt`` (1, 2, ...), or None to give up:
    only overload is retried, at most ``max_retries`` times, never past the call's deadline."""
    from .errors import FilipOverloadedError
    if not isinstance(err, FilipOverloadedError) or attempt > max_retries:
        return None
    pause = backoff(attempt)
    return None if deadline is not None and time.monotonic() + pause >= deadline else pause


def encode_image(item: ImageLike, index: int, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """Whatever the user gave -> encoded image bytes for the server (which decodes and
    preprocesses).  Paths are read, PIL images and uint8 arrays are PNG-encoded (lossless)."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise FilipInvalidInputError(f"image {index}: cannot read {path}: {e.strerror or e}") from e
    elif isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
    elif isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (1, 3, 4)):
            raise FilipInvalidInputError(f"image {index}: an array must be uint8 HxW or HxWx{{1,3,4}}, got {item.dtype} {item.shape}")
        data = _png(_pil().fromarray(item[..., 0] if item.ndim == 3 and item.shape[2] == 1 else item))
    elif _is_pil(item):
        data = _png(item)
    else:
        raise FilipInvalidInputError(f"image {index}: unsupported type {type(item).__name__} "
                                     "(give a path, encoded bytes, a PIL image or a uint8 array)")
    if not data:
        raise FilipInvalidInputError(f"image {index} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise FilipInvalidInputError(f"image {index} has {len(data)} bytes; the limit is {max_bytes}")
    return data


def _pil():
    from PIL import Image
    return Image


def _is_pil(item) -> bool:
    try:
        return isinstance(item, _pil().Image)
    except ImportError:
        return False


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def check_texts(texts: Sequence[str], max_chars: int = MAX_TEXT_CHARS) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise FilipInvalidInputError("texts must be a list of strings")
    if not texts:
        raise FilipInvalidInputError("texts is empty")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise FilipInvalidInputError(f"text {i} is a {type(t).__name__}, expected str")
        if not t.strip():
            raise FilipInvalidInputError(f"text {i} is empty")
        if len(t) > max_chars:
            raise FilipInvalidInputError(f"text {i} has {len(t)} characters; the limit is {max_chars}")
    return list(texts)


def check_images(images: Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike)) or _is_pil(images) or (
            isinstance(images, np.ndarray)) or not isinstance(images, Sequence):
        raise FilipInvalidInputError("images must be a list (of paths, bytes, PIL images or uint8 arrays)")
    if not images:
        raise FilipInvalidInputError("images is empty")
    return list(images)


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    if size < 1 or size > MAX_ITEMS_PER_REQUEST:
        raise FilipInvalidInputError(f"batch_size must be in 1..{MAX_ITEMS_PER_REQUEST}, got {size}")
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def text_inputs(grpc, texts: Sequence[str]) -> list:
    arr = np.array([t.encode("utf-8") for t in texts], dtype=np.object_).reshape(-1, 1)
    inp = grpc.InferInput("TEXT", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return [inp]


def image_inputs(grpc, blobs: Sequence[bytes]) -> list:
    arr = np.array(list(blobs), dtype=np.object_).reshape(-1, 1)
    inp = grpc.InferInput("IMAGE", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr)
    return [inp]


def score_inputs(grpc, images: Embeddings, texts: Embeddings) -> list:
    arrays = {"IMAGE_TOKENS": np.ascontiguousarray(images.tokens, np.float32),
              "IMAGE_LENGTHS": np.ascontiguousarray(images.lengths, np.int32).reshape(-1),
              "TEXT_TOKENS": np.ascontiguousarray(texts.tokens, np.float32),
              "TEXT_LENGTHS": np.ascontiguousarray(texts.lengths, np.int32).reshape(-1)}
    out = []
    for name, a in arrays.items():
        inp = grpc.InferInput(name, list(a.shape), "FP32" if a.dtype == np.float32 else "INT32")
        inp.set_data_from_numpy(a)
        out.append(inp)
    return out


def search_inputs(grpc, texts: Sequence[str], k: int, mode: str, candidates: int | None,
                  allowed_ids: Sequence[str] | None) -> list:
    """Inputs of one filip_search request (validated here first)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise FilipInvalidInputError(f"k must be an integer in 1..{MAX_K}, got {k!r}")
    if mode not in SEARCH_MODES:
        raise FilipInvalidInputError(f"mode must be one of {SEARCH_MODES}, got {mode!r}")
    if candidates is not None and (isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1):
        raise FilipInvalidInputError(f"candidates must be a positive integer, got {candidates!r}")
    arrays = {"TEXT": (np.array([t.encode("utf-8") for t in texts], dtype=np.object_), "BYTES"),
              "K": (np.array([k], np.int32), "INT32"),
              "MODE": (np.array([mode.encode()], dtype=np.object_), "BYTES")}
    if candidates is not None:
        arrays["CANDIDATES"] = (np.array([candidates], np.int32), "INT32")
    if allowed_ids is not None:
        if isinstance(allowed_ids, str) or not allowed_ids or not all(isinstance(i, str) for i in allowed_ids):
            raise FilipInvalidInputError("allowed_ids must be a non-empty list of id strings")
        arrays["ALLOWED_IDS"] = (np.array([i.encode("utf-8") for i in allowed_ids], dtype=np.object_), "BYTES")
    out = []
    for name, (a, dtype) in arrays.items():
        inp = grpc.InferInput(name, list(a.shape), dtype)
        inp.set_data_from_numpy(a)
        out.append(inp)
    return out


def reload_inputs(grpc, name: str) -> list:
    if not isinstance(name, str) or not name:
        raise FilipInvalidInputError(f"gallery name must be a non-empty string, got {name!r}")
    inp = grpc.InferInput("RELOAD", [1], "BYTES")
    inp.set_data_from_numpy(np.array([name.encode("utf-8")], dtype=np.object_))
    return [inp]


def parse_hits(result, what: str = SEARCH_MODEL) -> tuple[list[list[Hit]], dict]:
    import json
    ids, scores, meta = (output(result, n, what) for n in ("IDS", "SCORES", "METADATA"))
    info = parse_info(result, what)
    hits = [[Hit(bytes(i).decode("utf-8"), float(s), json.loads(bytes(m).decode("utf-8")))
             for i, s, m in zip(ids[q], scores[q], meta[q])] for q in range(ids.shape[0])]
    return hits, info


def parse_info(result, what: str = SEARCH_MODEL) -> dict:
    import json
    return json.loads(bytes(output(result, "INFO", what).reshape(-1)[0]).decode())


def image_folder(folder) -> tuple[list[Path], list[str]]:
    """Image files under ``folder`` (recursive, sorted) and their ids (POSIX paths relative to it)."""
    root = Path(folder)
    if not root.is_dir():
        raise FilipInvalidInputError(f"{root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return files, [p.relative_to(root).as_posix() for p in files]


def requested(grpc, names: Sequence[str]) -> list:
    return [grpc.InferRequestedOutput(n) for n in names]


def output(result, name: str, what: str) -> np.ndarray:
    a = result.as_numpy(name)
    if a is None:
        from .errors import FilipServerError
        raise FilipServerError(f"{what}: the server's response has no output '{name}'")
    return a


def parse_embeddings(result, what: str) -> Embeddings:
    return Embeddings(output(result, "TOKENS", what).astype(np.float32, copy=False),
                      output(result, "LENGTHS", what).reshape(-1).astype(np.int32, copy=False),
                      output(result, "POOLED", what).astype(np.float32, copy=False))


def check_embeddings(e: Embeddings, what: str) -> None:
    if not isinstance(e, Embeddings):
        raise FilipInvalidInputError(f"{what} must be an Embeddings value (from embed_images / embed_texts)")
    if e.tokens.ndim != 3 or e.lengths.shape != (e.tokens.shape[0],) or len(e) == 0:
        raise FilipInvalidInputError(f"{what}: inconsistent Embeddings shapes {e.tokens.shape}, {e.lengths.shape}")


def token_dim(score_config: dict) -> int:
    """D from the served filip_score config (the last dim of IMAGE_TOKENS)."""
    return int(next(i for i in score_config["input"] if i["name"] == "IMAGE_TOKENS")["dims"][-1])


def canary_requests(grpc, dim: int) -> dict[str, tuple[list, list[str]]]:
    """One tiny real request per model (inputs, outputs): what a deep health check runs."""
    tokens = np.zeros((1, 2, dim), np.float32)
    tokens[0, :, 0] = 1.0
    emb = Embeddings(tokens, np.array([2], np.int32), np.zeros((1, 1), np.float32))
    return {TEXT_MODEL: (text_inputs(grpc, ["health check"]), ["POOLED"]),
            IMAGE_MODEL: (image_inputs(grpc, [_png(_pil().new("RGB", (8, 8)))]), ["POOLED"]),
            SCORE_MODEL: (score_inputs(grpc, emb, emb), ["S_I"]),
            SEARCH_MODEL: (status_inputs(grpc), ["INFO"])}


def status_inputs(grpc) -> list:
    """A filip_search status request (no TEXT, no RELOAD): answers INFO on the served gallery."""
    inp = grpc.InferInput("K", [1], "INT32")
    inp.set_data_from_numpy(np.array([1], np.int32))
    return [inp]


def build_prompts(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Class-major: all templates of label 0, then of label 1, ..."""
    if isinstance(labels, str) or not labels:
        raise FilipInvalidInputError("labels must be a non-empty list of strings")
    if isinstance(templates, str) or not templates or any("{}" not in t for t in templates):
        raise FilipInvalidInputError("templates must be a non-empty list of strings each containing '{}'")
    return [t.format(label) for label in labels for t in templates]


def aggregate_zero_shot(s_i: np.ndarray, n_labels: int, n_templates: int, mode: str, logit_scale: float) -> np.ndarray:
    """[n_img, C*T] class-major s_I -> [n_img, C]: the paper's mean of similarities over
    templates ("mean"), or the mean over templates of softmax probabilities ("softmax")."""
    s = s_i.reshape(s_i.shape[0], n_labels, n_templates)
    if mode == "mean":
        return s.mean(axis=2)
    if mode == "softmax":
        z = logit_scale * s.astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return (z / z.sum(axis=1, keepdims=True)).mean(axis=2).astype(np.float32)
    raise FilipInvalidInputError(f"mode must be 'mean' or 'softmax', got {mode!r}")
