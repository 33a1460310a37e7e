"""What the sync and async clients share: input encoding, request building, output parsing
and the zero-shot aggregation, all from the served contract (:mod:`filip_contract`): model
and tensor names, datatypes, limits and search bounds.  No I/O happens here."""
from __future__ import annotations

import io
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from filip_contract import limits as L
from filip_contract import models as M
from filip_contract import scoring as S
from filip_contract.limits import ServingLimits
from filip_contract.images import UNSTORED_MODES
from filip_contract.prompts import DEFAULT_TEMPLATES

from .errors import FilipInvalidInputError, FilipServerError
from .types import Embeddings, Hit

TEXT_MODEL, IMAGE_MODEL, SCORE_MODEL, SEARCH_MODEL = (M.TEXT.name, M.IMAGE.name, M.SCORE.name, M.SEARCH.name)
MODELS = tuple(M.MODELS)
EMBED_OUTPUTS = M.EMBED_OUTPUTS
SEARCH_OUTPUTS = M.SEARCH.output_names
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
__all__ = ["DEFAULT_TEMPLATES"]


def served_limits(config: dict) -> ServingLimits:
    """The limits a served model config publishes (``limit_*`` parameters); those it does not
    publish keep the contract's defaults."""
    return ServingLimits.from_params({k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()})

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


def encode_image(item: ImageLike, index: int, max_bytes: int = ServingLimits.max_image_bytes) -> bytes:
    """Whatever the user gave -> encoded image bytes for the server (which decodes and
    preprocesses).  Paths and bytes are sent as they are; uint8 arrays as PNG; PIL images
    losslessly in their own mode with their EXIF orientation (:func:`_encode_pil`), so the
    server computes from them exactly what the engine computes in-process."""
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
        data = _encode_pil(item, index)
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


# Lossless containers per pixel mode: PNG where it keeps the mode, else TIFF.  A mode neither
# keeps is sent as what the server would make of it first (filip_contract.images).
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"})
_TIFF_MODES = frozenset({"PA", "RGBX", "CMYK", "YCbCr", "LAB", "I", "I;16L", "F"})
_ORIENTATION = 0x0112          # the EXIF / TIFF Orientation tag


def _encode_pil(img, index: int) -> bytes:
    """A PIL image, losslessly, with its EXIF orientation (the server applies it, as the engine
    does in-process); no other metadata leaves the machine."""
    try:
        orientation = img.getexif().get(_ORIENTATION)
    except Exception:                  # unreadable EXIF: no orientation, as the engine reads it
        orientation = None
    orientation = orientation if isinstance(orientation, int) and orientation != 1 else None
    buf = io.BytesIO()
    try:
        if img.mode in UNSTORED_MODES:
            img = img.convert(UNSTORED_MODES[img.mode])
        elif img.mode not in _PNG_MODES | _TIFF_MODES:
            img = img.convert("RGB")
        if img.mode in _PNG_MODES:
            exif = _pil().Exif()
            if orientation:
                exif[_ORIENTATION] = orientation
            img.save(buf, format="PNG", exif=exif)
        else:
            img.save(buf, format="TIFF", tiffinfo={_ORIENTATION: orientation} if orientation else {})
    except (OSError, ValueError) as e:
        raise FilipInvalidInputError(f"image {index}: cannot encode this PIL image (mode {img.mode}, "
                                     f"{img.width}x{img.height}): {e}") from e
    return buf.getvalue()


def check_texts(texts: Sequence[str], max_chars: int = ServingLimits.max_text_chars) -> list[str]:
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


def chunks(n: int, size: int, cap: int = ServingLimits.max_items_per_request) -> list[tuple[int, int]]:
    if size < 1 or size > cap:
        raise FilipInvalidInputError(f"batch_size must be in 1..{cap}, got {size}")
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def make_inputs(grpc, model: M.Model, arrays: Mapping[str, np.ndarray]) -> list:
    """InferInputs of ``model`` from named arrays, each cast to its declared datatype."""
    out = []
    for name, a in arrays.items():
        spec = model.input(name)
        a = np.ascontiguousarray(a, dtype=spec.numpy_dtype)
        inp = grpc.InferInput(name, list(a.shape), spec.datatype)
        inp.set_data_from_numpy(a)
        out.append(inp)
    return out


def _utf8(texts: Sequence[str]) -> np.ndarray:
    return np.array([t.encode("utf-8") for t in texts], dtype=np.object_)


def text_inputs(grpc, texts: Sequence[str]) -> list:
    return make_inputs(grpc, M.TEXT, {"TEXT": _utf8(texts).reshape(-1, 1)})


def image_inputs(grpc, blobs: Sequence[bytes]) -> list:
    return make_inputs(grpc, M.IMAGE, {"IMAGE": np.array(list(blobs), dtype=np.object_).reshape(-1, 1)})


def score_inputs(grpc, images: Embeddings, texts: Embeddings) -> list:
    return make_inputs(grpc, M.SCORE, {"IMAGE_TOKENS": images.tokens, "IMAGE_LENGTHS": np.reshape(images.lengths, -1),
                                       "TEXT_TOKENS": texts.tokens, "TEXT_LENGTHS": np.reshape(texts.lengths, -1)})


def pooled_score_inputs(grpc, image_pooled: np.ndarray, text_pooled: np.ndarray) -> list:
    return make_inputs(grpc, M.SCORE, {"IMAGE_POOLED": image_pooled, "TEXT_POOLED": text_pooled})


def scoring_of(scoring: str | None, score_config: Mapping) -> str:
    """``scoring``, or the served repository's default (filip_score's ``default_scoring``
    parameter; "token" where a repository publishes none), checked."""
    if scoring is None:
        scoring = score_config.get("parameters", {}).get(S.DEFAULT_PARAM, {}).get("string_value") or "token"
    return S.check_scoring(scoring, FilipInvalidInputError)


def score_request(grpc, images: Embeddings, texts: Embeddings, direction: str, scoring: str) -> tuple[list, str]:
    """(inputs, the output to ask for) of one filip_score request."""
    if direction not in ("i2t", "t2i"):
        raise FilipInvalidInputError(f"direction must be 'i2t' or 't2i', got {direction!r}")
    check_embeddings(images, "images")
    check_embeddings(texts, "texts")
    if scoring == "global":
        return pooled_score_inputs(grpc, images.pooled, texts.pooled), "COSINE"
    return score_inputs(grpc, images, texts), ("S_I" if direction == "i2t" else "S_T")


def zero_shot_classes(prompts: Embeddings, n_labels: int, n_templates: int) -> np.ndarray:
    """CLIP's classifier [n_labels, E] from the class-major prompts' pooled embeddings."""
    return S.class_embeddings(prompts.pooled, n_labels, n_templates)


def _positive(value, what: str, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
        raise FilipInvalidInputError(f"{what} must be an integer in 1..{hi}, got {value!r}")


def search_inputs(grpc, texts: Sequence[str], k: int, mode: str, candidates: int | None,
                  allowed_ids: Sequence[str] | None, scoring: str | None = None) -> list:
    """Inputs of one filip_search request (validated here first, against the contract's bounds);
    ``scoring`` None: the server's default."""
    _positive(k, "k", L.MAX_K)
    if mode not in L.SEARCH_MODES:
        raise FilipInvalidInputError(f"mode must be one of {L.SEARCH_MODES}, got {mode!r}")
    if scoring is not None:
        S.check_scoring(scoring, FilipInvalidInputError)
    if candidates is not None:
        _positive(candidates, "candidates", L.MAX_CANDIDATES)
    arrays = {"TEXT": _utf8(texts), "K": np.array([k]), "MODE": _utf8([mode])}
    if candidates is not None:
        arrays["CANDIDATES"] = np.array([candidates])
    if scoring is not None:
        arrays["SCORING"] = _utf8([scoring])
    if allowed_ids is not None:
        if isinstance(allowed_ids, str) or not allowed_ids or not all(isinstance(i, str) for i in allowed_ids):
            raise FilipInvalidInputError("allowed_ids must be a non-empty list of id strings")
        arrays["ALLOWED_IDS"] = _utf8(allowed_ids)
    return make_inputs(grpc, M.SEARCH, arrays)


def reload_inputs(grpc, name: str) -> list:
    if not isinstance(name, str) or not name:
        raise FilipInvalidInputError(f"gallery name must be a non-empty string, got {name!r}")
    return make_inputs(grpc, M.SEARCH, {"RELOAD": _utf8([name])})


def append_inputs(grpc, name: str, ids: Sequence[str], token_dtype: str, tokens: np.ndarray | None = None,
                  pooled: np.ndarray | None = None, metadata: Sequence[Mapping | None] | None = None) -> list:
    """A filip_search APPEND request: with ``tokens`` (and ``pooled``, ``metadata``) it appends
    one segment to the server's gallery ``name``; without, it asks which of ``ids`` it holds."""
    if not isinstance(name, str) or not name:
        raise FilipInvalidInputError(f"gallery name must be a non-empty string, got {name!r}")
    arrays = {"APPEND": _utf8([name]), "ITEM_IDS": _utf8(ids), "TOKEN_DTYPE": _utf8([token_dtype])}
    if tokens is not None:
        arrays["TOKENS"], arrays["POOLED"] = tokens, pooled
        arrays["ITEM_METADATA"] = _utf8([json.dumps(dict(m or {}), ensure_ascii=False, allow_nan=False)
                                         for m in (metadata if metadata is not None else [None] * len(ids))])
    return make_inputs(grpc, M.SEARCH, arrays)


def parse_hits(result, what: str = SEARCH_MODEL) -> tuple[list[list[Hit]], dict]:
    """Each query's own hits (the padding past its COUNTS cut off) and the request's INFO."""
    ids, scores, meta, counts = (output(result, n, what) for n in ("IDS", "SCORES", "METADATA", "COUNTS"))
    info = parse_info(result, what)
    hits = [[Hit(bytes(i).decode("utf-8"), float(s), json.loads(bytes(m).decode("utf-8")))
             for i, s, m in zip(ids[q, :n], scores[q, :n], meta[q, :n])] for q, n in enumerate(counts.reshape(-1))]
    return hits, info


def parse_info(result, what: str = SEARCH_MODEL) -> dict:
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
    name = M.SCORE.inputs[0].name
    return int(next(i for i in score_config["input"] if i["name"] == name)["dims"][-1])


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
    return make_inputs(grpc, M.SEARCH, {"K": np.array([1])})


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
