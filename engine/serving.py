"""Server-side batch handlers: what the Triton Python-backend models (:mod:`filip_engine.adapters`) call.

Triton's dynamic batcher hands a Python model several requests at once.  These functions
take the requests' decoded inputs, validate each request on its own, run every valid item
through the tower in one stacked batch, and split the outputs back per request.  A bad
request yields its error (an :class:`~filip_engine.errors.InvalidInputError` for bad input) in
its slot and never disturbs the others.  They are plain functions so they are unit-tested without a server.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from filip_contract.limits import ServingLimits
from filip_contract.scoring import cosine

from .artifacts import image_transform_of, read_manifest
from .errors import FilipError, InvalidInputError, TextInputError
from .interaction import alignment_map, late_interaction
from .io_spec import tower_spec
from .runtime import Runtime, open_tower_runtime
from .tokenizer import ClipTokenizer

Result = dict[str, np.ndarray] | FilipError


def _split_run(runtime: Runtime, feeds: dict[str, np.ndarray], counts: list[int], max_batch: int) -> list[dict[str, np.ndarray]]:
    """Run ``feeds`` (stacked along axis 0) through ``runtime`` in chunks of at most
    ``max_batch`` rows, then split the outputs into ``counts`` consecutive groups."""
    total = sum(counts)
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(0, total, max_batch):
        part = runtime.infer({k: v[i:i + max_batch] for k, v in feeds.items()})
        for k, v in part.items():
            outs.setdefault(k, []).append(v)
    merged = {k: np.concatenate(v) for k, v in outs.items()}
    bounds = np.cumsum([0] + counts)
    return [{k: v[a:b] for k, v in merged.items()} for a, b in zip(bounds[:-1], bounds[1:])]


# --- text --------------------------------------------------------------------------------
def utf8(item, label: str, error: type[InvalidInputError] = InvalidInputError) -> str:
    """One element of a BYTES tensor as a string; ``label`` names it in the error."""
    if isinstance(item, (bytes, bytearray, np.bytes_)):
        try:
            item = bytes(item).decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{label} is not valid UTF-8 ({e.reason} at byte {e.start})") from e
    if not isinstance(item, str):
        raise error(f"{label} is a {type(item).__name__}, expected UTF-8 bytes")
    return item


def decode_texts(raw: np.ndarray, limits: ServingLimits) -> list[str]:
    """A request's TEXT tensor (object array of bytes, shape [n] or [n, 1]) -> validated strings."""
    items = list(np.asarray(raw, dtype=object).reshape(-1))
    if not items:
        raise TextInputError("the request has no texts")
    if len(items) > limits.max_items_per_request:
        raise TextInputError(f"{len(items)} texts in one request; the limit is {limits.max_items_per_request}")
    texts = []
    for i, item in enumerate(items):
        item = utf8(item, f"text {i}", TextInputError)
        if not item.strip():
            raise TextInputError(f"text {i} is empty")
        if len(item) > limits.max_text_chars:
            raise TextInputError(f"text {i} has {len(item)} characters; the limit is {limits.max_text_chars}")
        texts.append(item)
    return texts


def embed_text_requests(tokenizer: ClipTokenizer, runtime: Runtime, requests: Sequence[np.ndarray],
                        limits: ServingLimits = ServingLimits(), max_batch: int = 64) -> list[Result]:
    """Each request -> {"TOKENS" [n, T_req, D], "LENGTHS" [n, 1] int32, "POOLED" [n, E]} or its error."""
    results: list[Result | None] = [None] * len(requests)
    ok: list[tuple[int, np.ndarray, np.ndarray]] = []
    for r, raw in enumerate(requests):
        try:
            batch = tokenizer(decode_texts(raw, limits), pad_to="longest")
            ok.append((r, batch.ids, batch.lengths))
        except FilipError as e:
            results[r] = e
    if ok:
        width = max(ids.shape[1] for _, ids, _ in ok)
        ids = np.concatenate([np.pad(i, ((0, 0), (0, width - i.shape[1]))) for _, i, _ in ok])
        lengths = np.concatenate([n for _, _, n in ok]).astype(np.int64)
        parts = _split_run(runtime, {"input_ids": ids, "lengths": lengths}, [len(n) for _, _, n in ok], max_batch)
        for (r, own_ids, own_len), out in zip(ok, parts):
            t = own_ids.shape[1]   # each request keeps its own padding width
            results[r] = {"TOKENS": np.ascontiguousarray(out["tokens"][:, :t]),
                          "LENGTHS": own_len.astype(np.int32).reshape(-1, 1),
                          "POOLED": out["pooled"]}
    return results  # type: ignore[return-value]


# --- images ------------------------------------------------------------------------------
def decode_images(raw: np.ndarray, transform: ImageTransform, limits: ServingLimits) -> np.ndarray:
    """A request's IMAGE tensor (object array of encoded bytes) -> pixels [n, 3, S, S]."""
    items = list(np.asarray(raw, dtype=object).reshape(-1))
    if not items:
        raise InvalidInputError("the request has no images")
    if len(items) > limits.max_items_per_request:
        raise InvalidInputError(f"{len(items)} images in one request; the limit is {limits.max_items_per_request}")
    for i, item in enumerate(items):
        if not isinstance(item, (bytes, bytearray, np.bytes_)):
            raise InvalidInputError(f"image {i} is a {type(item).__name__}, expected encoded image bytes")
    return transform.batch([bytes(b) for b in items])


def check_pixels(raw: np.ndarray, image_size: int) -> np.ndarray:
    a = np.asarray(raw)
    if a.dtype != np.float32:
        raise InvalidInputError(f"PIXEL_VALUES has dtype {a.dtype}, expected float32")
    if a.ndim != 4 or a.shape[1:] != (3, image_size, image_size) or a.shape[0] == 0:
        raise InvalidInputError(f"PIXEL_VALUES has shape {list(a.shape)}, expected [n, 3, {image_size}, {image_size}]")
    if not np.isfinite(a).all():
        raise InvalidInputError("PIXEL_VALUES contains NaN or Inf")
    return a


def embed_image_requests(transform: ImageTransform, runtime: Runtime, requests: Sequence[dict[str, np.ndarray]],
                         limits: ServingLimits = ServingLimits(), max_batch: int = 32) -> list[Result]:
    """Each request gives exactly one of IMAGE (encoded bytes) or PIXEL_VALUES (preprocessed)
    -> {"TOKENS" [n, P, D], "LENGTHS" [n, 1] int32, "POOLED" [n, E]} or its error."""
    results: list[Result | None] = [None] * len(requests)
    ok: list[tuple[int, np.ndarray]] = []
    for r, inputs in enumerate(requests):
        try:
            given = [k for k in ("IMAGE", "PIXEL_VALUES") if inputs.get(k) is not None]
            if len(given) != 1:
                raise InvalidInputError(f"give exactly one of IMAGE (encoded bytes) or PIXEL_VALUES, got {given or 'neither'}")
            if given[0] == "IMAGE":
                ok.append((r, decode_images(inputs["IMAGE"], transform, limits)))
            else:
                ok.append((r, check_pixels(inputs["PIXEL_VALUES"], transform.image_size)))
        except FilipError as e:
            results[r] = e
    if ok:
        pixels = np.concatenate([p for _, p in ok])
        parts = _split_run(runtime, {"pixel_values": pixels}, [len(p) for _, p in ok], max_batch)
        for (r, _), out in zip(ok, parts):
            n, p = out["tokens"].shape[:2]
            results[r] = {"TOKENS": out["tokens"], "LENGTHS": np.full((n, 1), p, np.int32), "POOLED": out["pooled"]}
    return results  # type: ignore[return-value]


# --- scoring -----------------------------------------------------------------------------
def _tokens_and_lengths(tokens: np.ndarray, lengths: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    if tokens.dtype not in (np.float32, np.float16):
        raise InvalidInputError(f"{what}_TOKENS has dtype {tokens.dtype}, expected float32 or float16")
    if tokens.ndim != 3 or 0 in tokens.shape:
        raise InvalidInputError(f"{what}_TOKENS has shape {list(tokens.shape)}, expected [n, T, D] with n, T, D > 0")
    if lengths.dtype.kind not in "iu":
        raise InvalidInputError(f"{what}_LENGTHS has dtype {lengths.dtype}, expected int32")
    lengths = lengths.reshape(-1)
    if lengths.shape[0] != tokens.shape[0]:
        raise InvalidInputError(f"{what}_LENGTHS has {lengths.shape[0]} entries for {tokens.shape[0]} rows of {what}_TOKENS")
    if not np.isfinite(tokens).all():
        raise InvalidInputError(f"{what}_TOKENS contains NaN or Inf")
    return tokens, lengths


_TOKEN_INPUTS = ("IMAGE_TOKENS", "IMAGE_LENGTHS", "TEXT_TOKENS", "TEXT_LENGTHS")
_POOLED_INPUTS = ("IMAGE_POOLED", "TEXT_POOLED")


def score_request(inputs: dict[str, np.ndarray], *, wanted: Sequence[str] = (),
                  limits: ServingLimits = ServingLimits(), device: str = "cpu") -> Result:
    """Scores of one filip_score request, only the ``wanted`` outputs (all that its inputs
    allow when none is named): token scoring, IMAGE_TOKENS/IMAGE_LENGTHS and
    TEXT_TOKENS/TEXT_LENGTHS -> S_I, S_T [n_img, n_txt] (+ ALIGNMENT [n_img, n_txt, P] int32:
    each patch's best text token); global scoring, IMAGE_POOLED and TEXT_POOLED -> COSINE."""
    try:
        wanted = set(wanted)
        if not wanted:
            wanted = ({"S_I", "S_T"} if any(inputs.get(k) is not None for k in _TOKEN_INPUTS) else set()) | \
                     ({"COSINE"} if any(inputs.get(k) is not None for k in _POOLED_INPUTS) else set())
            if not wanted:
                raise InvalidInputError(f"no inputs: give {list(_TOKEN_INPUTS)} (token scoring) "
                                        f"or {list(_POOLED_INPUTS)} (global scoring)")
        out: dict[str, np.ndarray] = {}
        if wanted & {"S_I", "S_T", "ALIGNMENT"}:
            out.update(_token_scores(inputs, "ALIGNMENT" in wanted, limits, device))
        if "COSINE" in wanted:
            out["COSINE"] = _pooled_scores(inputs, limits)
        return {k: v for k, v in out.items() if k in wanted}
    except FilipError as e:
        return e


def _token_scores(inputs, want_alignment: bool, limits: ServingLimits, device: str) -> dict[str, np.ndarray]:
    missing = [k for k in _TOKEN_INPUTS if inputs.get(k) is None]
    if missing:
        raise InvalidInputError(f"token scoring (S_I, S_T, ALIGNMENT) needs {list(_TOKEN_INPUTS)}; missing {missing}")
    it, il = _tokens_and_lengths(inputs["IMAGE_TOKENS"], inputs["IMAGE_LENGTHS"], "IMAGE")
    tt, tl = _tokens_and_lengths(inputs["TEXT_TOKENS"], inputs["TEXT_LENGTHS"], "TEXT")
    if it.shape[0] * tt.shape[0] > limits.max_score_items:
        raise InvalidInputError(f"{it.shape[0]} x {tt.shape[0]} pairs exceed the limit of {limits.max_score_items} per request")
    if device != "cpu":    # late_interaction runs where the image tokens are (fp32 GEMM, TF32 off by default)
        import torch
        s = late_interaction(torch.from_numpy(it).to(device), il, torch.from_numpy(tt).to(device), tl)
    else:
        s = late_interaction(it, il, tt, tl)
    out = {"S_I": s.s_i, "S_T": s.s_t}
    if want_alignment:
        amap = np.zeros((it.shape[0], tt.shape[0], it.shape[1]), np.int32)
        for i in range(it.shape[0]):
            for j in range(tt.shape[0]):
                amap[i, j, :il[i]] = alignment_map(it[i], int(il[i]), tt[j], int(tl[j]))
        out["ALIGNMENT"] = amap
    return out


def _pooled_scores(inputs, limits: ServingLimits) -> np.ndarray:
    missing = [k for k in _POOLED_INPUTS if inputs.get(k) is None]
    if missing:
        raise InvalidInputError(f"global scoring (COSINE) needs {list(_POOLED_INPUTS)}; missing {missing}")
    ip, tp = (np.asarray(inputs[k]) for k in _POOLED_INPUTS)
    problems = [f"{k} must be a float [n, E] array with n >= 1, got {a.dtype} {list(a.shape)}"
                for k, a in zip(_POOLED_INPUTS, (ip, tp)) if a.ndim != 2 or a.shape[0] < 1 or a.dtype.kind != "f"]
    if not problems and ip.shape[1] != tp.shape[1]:
        problems.append(f"IMAGE_POOLED has dimension {ip.shape[1]}, TEXT_POOLED {tp.shape[1]}")
    if not problems and not (np.isfinite(ip).all() and np.isfinite(tp).all()):
        problems.append("pooled embeddings contain NaN or Inf")
    if problems:
        raise InvalidInputError("; ".join(problems))
    if ip.shape[0] * tp.shape[0] > limits.max_score_items:
        raise InvalidInputError(f"{ip.shape[0]} x {tp.shape[0]} pairs exceed the limit of {limits.max_score_items} per request")
    return cosine(ip, tp)


# --- Triton glue ---------------------------------------------------------------------------
def triton_context(args: dict) -> tuple[Path, dict[str, str]]:
    """From the ``args`` Triton passes to ``initialize``: the model's version folder (where its
    artifacts are) and the config's string parameters."""
    config = json.loads(args["model_config"])
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    # how many instances share the machine's cores (their encoder threads are divided among them)
    params.setdefault("instance_count", str(sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1))
    return Path(args["model_repository"]) / str(args["model_version"]), params


class TextEndpoint:
    """filip_text: tokenizer + text tower (ONNX Runtime, or TensorRT via ``trt_model``), built once."""

    def __init__(self, version_dir: Path, params: dict[str, str]):
        cfg, _ = read_manifest(version_dir)
        self.max_batch, self.limits = int(params.get("max_batch", "64")), ServingLimits.from_params(params)
        self.tokenizer = ClipTokenizer.from_file(version_dir / "tokenizer.json", vocab_size=cfg.text.vocab_size,
                                                 context_length=cfg.text.context_length)
        # ONNX Runtime on text.onnx, or the filip_text_trt TensorRT model when the repository has one
        self.runtime = open_tower_runtime(version_dir, "text", tower_spec(cfg, "text"), params)

    def __call__(self, texts: Sequence[np.ndarray]) -> list[Result]:
        return embed_text_requests(self.tokenizer, self.runtime, texts, self.limits, self.max_batch)


class ImageEndpoint:
    """filip_image: decoder/transform + image tower on ONNX Runtime."""

    def __init__(self, version_dir: Path, params: dict[str, str]):
        cfg, manifest = read_manifest(version_dir)
        self.max_batch, self.limits = int(params.get("max_batch", "64")), ServingLimits.from_params(params)
        # the checkpoint's own preprocessing recipe, recorded at export
        self.transform = image_transform_of(manifest, cfg, max_pixels=self.limits.max_image_pixels,
                                            max_bytes=self.limits.max_image_bytes)
        self.runtime = open_tower_runtime(version_dir, "image", tower_spec(cfg, "image"), params)

    def __call__(self, requests: Sequence[dict[str, np.ndarray | None]]) -> list[Result]:
        return embed_image_requests(self.transform, self.runtime, requests, self.limits, self.max_batch)


def _cuda_visible() -> bool:
    """Whether the scorer can run on CUDA: a GPU the driver reports (NVML, no torch needed) and
    a CUDA build of torch that sees it.  torch is imported only where an NVIDIA driver is
    present; the image's CPU torch (docs/GPU.md) answers False, and the scorer stays on the CPU."""
    if not Path("/dev/nvidiactl").exists():
        return False
    from .gpu import cuda_visible
    if not cuda_visible():
        return False
    try:
        import torch
        return torch.version.cuda is not None and torch.cuda.is_available()
    except Exception:    # noqa: BLE001 - an unusable torch: the scorer runs on the CPU
        return False


class ScoreEndpoint:
    """filip_score: late interaction between given embeddings (ALIGNMENT only when requested)."""

    def __init__(self, version_dir: Path | None = None, params: dict[str, str] | None = None):
        self.limits = ServingLimits.from_params(params or {})
        # "auto": the GPU when torch sees one (docs/GPU.md), else the CPU; torch is imported
        # only where an NVIDIA driver is present, so a CPU server's scorer never loads it
        wanted = (params or {}).get("device", "auto")
        if wanted == "auto":
            wanted = "cuda" if _cuda_visible() else "cpu"
        self.device = wanted

    def __call__(self, requests: Sequence[tuple[dict[str, np.ndarray | None], Sequence[str]]]) -> list[Result]:
        results: list[Result] = []
        for inputs, wanted in requests:
            results.append(score_request(inputs, wanted=wanted, limits=self.limits, device=self.device))
        return results
