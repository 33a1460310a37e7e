"""Write a complete, servable Triton model repository.

Models (all Python backend, declared in :mod:`filip_contract.models`; each ``model.py`` imports
its class from :mod:`filip_engine.adapters`, thin wrappers over ``filip_engine.serving``):

- ``filip_text``  : TEXT (UTF-8 bytes) -> TOKENS, LENGTHS, POOLED; tokenises on the server and
                    runs the text tower (ONNX Runtime, or the CPU engine ``--precision`` chose).
- ``filip_image`` : IMAGE (encoded JPEG/PNG/WebP/... bytes) or PIXEL_VALUES (preprocessed)
                    -> TOKENS, LENGTHS, POOLED; decodes + preprocesses on the server.
- ``filip_score`` : IMAGE_TOKENS/LENGTHS + TEXT_TOKENS/LENGTHS -> S_I, S_T (+ ALIGNMENT).
- ``filip_search``: TEXT queries (embedded through filip_text) -> top-k IDS, SCORES, METADATA
                    over a pre-computed gallery; RELOAD swaps in a gallery (engine/search.py).

Each call of the client is one request to one of these models.  ``config.pbtxt`` is built
as a ``model_config_pb2.ModelConfig`` from the contract's declarations and the checkpoint's
sizes, with dynamic batching, instance counts and queue delays from :class:`RepoSettings`,
and printed with protobuf's text format.  The encoders' ONNX files, the
tokenizer and the manifest are written into the model's version folder, so the server
needs nothing else.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from filip_contract import models as M
from filip_contract.limits import ServingLimits
from filip_contract.scoring import DEFAULT_PARAM as SCORING_PARAM, check_scoring
from filip_engine.config import FilipConfig
from filip_engine.io_spec import TensorSpec, TowerSpec, tower_spec, triton_dims

MODELS = tuple(M.MODELS)


@dataclass(frozen=True)
class RepoSettings:
    max_batch: int = 64                  # items per batch the dynamic batcher may form
    queue_delay_us: int = 500            # how long the batcher waits to fill a batch (500 us: see docs/BENCHMARKS.md)
    text_instances: int = 1              # model instances (each its own process and ONNX Runtime session)
    image_instances: int = 1
    score_instances: int = 1
    intra_op_threads: int = 0            # encoder threads per instance; 0: precision.threads_per_instance
    # Overload.  By default the encoders' queues have no policy: the callers' deadlines bound
    # the work (Triton drops a queued request whose gRPC call was cancelled or timed out,
    # without running it).  max_queue_size > 0 adds Triton's queue policy: a request finding
    # that many queued is refused at once (UNAVAILABLE, which the client retries with backoff)
    # and one queued for queue_timeout_us is dropped; but any queue policy turns off the
    # batcher's prefetching, and Triton 2.51's batcher then misses the wake-up of an instance
    # that turned idle and sleeps its 500 ms default (docs/ARCHITECTURE.md, "Overload").
    max_queue_size: int = 0
    queue_timeout_us: int = 30_000_000
    limits: ServingLimits = ServingLimits()   # per-request limits, enforced by the models
    # filip_search: galleries are folders under gallery_root ("" = <repository>/../galleries,
    # overridden by $FILIP_GALLERY_ROOT); `gallery` is loaded at start when it exists.
    gallery_root: str = ""
    gallery: str = "default"
    gallery_verify: str = "full"             # "full": sizes + SHA-256 at (re)load; "size": sizes only
    first_stage: str = "auto"                # two-stage candidates: auto (flat <= 200k items, else IVF), flat, ivf,
    qdrant_url: str = ""                     # or qdrant (a Qdrant server at qdrant_url, collection = gallery name)


# KServe datatypes (the contract) and numpy dtype names (io_spec) -> Triton config types
_KSERVE_TYPES = {"FP32": mc.TYPE_FP32, "FP16": mc.TYPE_FP16, "INT32": mc.TYPE_INT32, "INT64": mc.TYPE_INT64,
                 "BYTES": mc.TYPE_STRING}
_NUMPY_TYPES = {"float32": mc.TYPE_FP32, "float16": mc.TYPE_FP16, "int64": mc.TYPE_INT64, "int32": mc.TYPE_INT32}


def config_text(config: mc.ModelConfig) -> str:
    """A config as ``config.pbtxt`` text (protobuf text format: quoting and escaping by protobuf)."""
    return text_format.MessageToString(config)


def parse_config(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def _served_model(model: M.Model, sizes: dict[str, int], *, max_batch: int, instances: int,
                  params: dict[str, str]) -> mc.ModelConfig:
    """A Python-backend model's config from its declaration in the contract."""
    c = mc.ModelConfig(name=model.name, backend="python", max_batch_size=max_batch if model.batched else 0)
    for t in model.inputs:
        c.input.add(name=t.name, data_type=_KSERVE_TYPES[t.datatype], dims=t.resolve(sizes), optional=t.optional)
    for t in model.outputs:
        c.output.add(name=t.name, data_type=_KSERVE_TYPES[t.datatype], dims=t.resolve(sizes))
    c.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    for k, v in params.items():
        c.parameters[k].string_value = str(v)
    return c


def _dynamic_batching(c: mc.ModelConfig, s: RepoSettings) -> None:
    """Dynamic batching with the settings' delay; with ``max_queue_size`` also the bounded
    queue (refuse when full, drop after the timeout)."""
    c.dynamic_batching.max_queue_delay_microseconds = s.queue_delay_us
    if s.max_queue_size <= 0:
        return
    policy = c.dynamic_batching.default_queue_policy
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = s.queue_timeout_us
    policy.allow_timeout_override = True
    policy.max_queue_size = s.max_queue_size


# Triton's model_warmup runs these at load, before the model reports ready, so the first user
# request does not pay for ONNX Runtime's first-run allocations.  A BYTES input is read from a
# file in the model's warmup/ folder: each element a 4-byte little-endian length + the bytes.
WARMUP_TEXT = b"a photo of a cat"
WARMUP_FILE = "text"


def _warmup(c: mc.ModelConfig, tensor: M.Tensor, sizes: dict[str, int]) -> None:
    w = c.model_warmup.add(name="warmup", batch_size=1)
    inp = w.inputs[tensor.name]
    inp.data_type = _KSERVE_TYPES[tensor.datatype]
    inp.dims.extend(tensor.resolve(sizes))
    if tensor.datatype == "BYTES":
        inp.input_data_file = WARMUP_FILE
    else:
        inp.zero_data = True


def model_configs(cfg: FilipConfig, s: RepoSettings, logit_scale: float,
                  default_scoring: str = "token", engines: dict | None = None) -> dict[str, mc.ModelConfig]:
    """Each served model's config, from the contract's declarations, the checkpoint's sizes,
    temperature and scoring rule, and the settings.  ``engines`` ("image"/"text" ->
    :class:`filip_engine.precision.TowerEngine`; default fp32 ONNX Runtime) become the
    encoders' ``precision`` / ``engine`` / ``model_file`` / ``inference_precision`` parameters."""
    from filip_engine.precision import TowerEngine
    engines = engines or {}
    scoring = {SCORING_PARAM: check_scoring(default_scoring)}
    sizes = {"D": cfg.token_dim, "E": cfg.embed_dim, "S": cfg.vision.image_size, "P": cfg.vision.num_patches}
    limits = s.limits.to_params()
    encoder = {**limits, "intra_op_threads": s.intra_op_threads, "max_batch": s.max_batch}
    text = _served_model(M.TEXT, sizes, max_batch=s.max_batch, instances=s.text_instances,
                         params={**encoder, **engines.get("text", TowerEngine()).to_params("text")})
    image = _served_model(M.IMAGE, sizes, max_batch=s.max_batch, instances=s.image_instances,
                          params={**encoder, **engines.get("image", TowerEngine()).to_params("image")})
    for c in (text, image):
        _dynamic_batching(c, s)
    _warmup(text, M.TEXT.input("TEXT"), sizes)
    _warmup(image, M.IMAGE.input("PIXEL_VALUES"), sizes)
    score = _served_model(M.SCORE, sizes, max_batch=0, instances=s.score_instances,
                          params={**limits, **scoring, "logit_scale": repr(float(logit_scale))})
    # One instance: it holds the gallery and RELOAD must reach the instance that serves; its
    # exact scan already uses every core (filip_engine.search).
    search = _served_model(M.SEARCH, sizes, max_batch=0, instances=1,
                           params={**limits, **scoring, "text_max_batch": s.max_batch, "gallery_root": s.gallery_root,
                                   "gallery": s.gallery, "gallery_verify": s.gallery_verify,
                                   "first_stage": s.first_stage, "qdrant_url": s.qdrant_url})
    return {c.name: c for c in (text, image, score, search)}


def adapter_source(model: M.Model) -> str:
    """The ``model.py`` of a served model: one import of its class from the installed engine."""
    return (f'"""{model.name}: {model.doc}.\n\nThe Triton Python-backend model is '
            f'filip_engine.adapters.{model.adapter}."""\n'
            f"from filip_engine.adapters import {model.adapter} as TritonPythonModel  # noqa: F401\n")


# --- TensorRT (GPU): the encoders' plans served as tensorrt_plan models (docs/GPU.md) -----------
TRT_MODELS = {"text": "filip_text_trt", "image": "filip_image_trt"}


@dataclass(frozen=True)
class TensorRTPlans:
    """The plans export/trt.py built, per tower ("text"/"image"): ``files`` maps a compute
    capability ("9.0") to a plan file in ``<model>/1``; ``default`` is the plan built here."""
    files: dict
    default: dict


def _trt_tensor(io, t: TensorSpec) -> None:
    """A tensor of an io_spec TowerSpec as a batched tensorrt_plan config entry
    (:func:`filip_engine.io_spec.triton_dims`: a [batch]-only tensor is dims [1] reshaped to [],
    sent by the front ends as [batch, 1] through :func:`filip_engine.io_spec.as_triton_input`)."""
    dims, reshape = triton_dims(t)
    entry = io.add(name=t.name, data_type=_NUMPY_TYPES[t.dtype])
    entry.dims.extend(dims)
    if reshape is not None:
        entry.reshape.shape.extend(reshape)
        entry.reshape.SetInParent()


# Warm-up of a tensorrt_plan model (Triton runs it at load, before the model is ready, so the
# first request does not pay for the engine's first execution).  The plan models warm up
# themselves; the front ends forwarding to them have no warm-up (a warm-up that BLS-calls
# another model during load is answered "Server not ready" and fails the load).  Text: one row
# of TRT_WARMUP_SEQ zero ids (id 0 is a real BPE token) with lengths = TRT_WARMUP_LENGTH (>= 2:
# SOT..EOT; a zero length would index before the first token).
TRT_WARMUP_SEQ = 16
TRT_WARMUP_LENGTH = 2


def _fixed_dims(t: TensorSpec, seq: int) -> list[int]:
    dims, _ = triton_dims(t)
    return [seq if d == -1 else d for d in dims]


def warmup_files(spec: TowerSpec, context_length: int) -> dict[str, bytes]:
    """Raw little-endian contents of the plan model's warm-up inputs that are not zeros, by
    file name in ``<model>/warmup/`` (row-major, one batch row)."""
    out = {}
    for t in spec.inputs:
        if t.name == "lengths":
            n = int(np.prod(_fixed_dims(t, min(TRT_WARMUP_SEQ, context_length))))
            out[f"{t.name}.bin"] = np.full(n, TRT_WARMUP_LENGTH, np.dtype(t.dtype).newbyteorder("<")).tobytes()
    return out


def _trt_warmup(c: mc.ModelConfig, spec: TowerSpec, context_length: int) -> None:
    seq = min(TRT_WARMUP_SEQ, context_length)
    files = warmup_files(spec, context_length)
    w = c.model_warmup.add(name="warmup", batch_size=1)
    for t in spec.inputs:
        inp = w.inputs[t.name]
        inp.data_type = _NUMPY_TYPES[t.dtype]
        inp.dims.extend(_fixed_dims(t, seq))
        if f"{t.name}.bin" in files:
            inp.input_data_file = f"{t.name}.bin"
        else:
            inp.zero_data = True


def tensorrt_config(name: str, spec: TowerSpec, s: RepoSettings, files: dict, default: str,
                    instances: int = 1, context_length: int = 77) -> mc.ModelConfig:
    """Config of a tensorrt_plan model: one plan per GPU architecture through
    ``cc_model_filenames``, dynamic batching like the front ends, instances on the GPU."""
    c = mc.ModelConfig(name=name, platform="tensorrt_plan", max_batch_size=s.max_batch, default_model_filename=default)
    for cc, f in sorted(files.items()):
        c.cc_model_filenames[cc] = f
    _dynamic_batching(c, s)
    for t in spec.inputs:
        _trt_tensor(c.input, t)
    for t in spec.outputs:
        _trt_tensor(c.output, t)
    c.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_GPU)
    _trt_warmup(c, spec, context_length)
    return c


def tensorrt_configs(cfg: FilipConfig, s: RepoSettings, plans: TensorRTPlans,
                     configs: dict[str, mc.ModelConfig]) -> dict[str, mc.ModelConfig]:
    """The tensorrt_plan models' configs, and copies of the front ends' configs with a
    ``trt_model`` parameter naming the model they forward to and no warm-up of their own
    (the plan models warm up; ``configs`` is not touched)."""
    out = {}
    for tower, model in TRT_MODELS.items():
        front = mc.ModelConfig()
        front.CopyFrom(configs[f"filip_{tower}"])
        front.parameters["trt_model"].string_value = model
        del front.model_warmup[:]
        out[front.name] = front
        out[model] = tensorrt_config(model, tower_spec(cfg, tower, s.max_batch), s, plans.files[tower], plans.default[tower],
                                     context_length=cfg.text.context_length)
    return out


def version_dir(out: Path, model: str) -> Path:
    """Where a model's artifacts go: ``out/<model>/1`` (image.onnx in filip_image, text.onnx and
    tokenizer.json in filip_text, the manifest in each)."""
    d = Path(out) / model / "1"
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_repository(out: Path, cfg: FilipConfig, *, logit_scale: float, default_scoring: str = "token",
                     settings: RepoSettings = RepoSettings(), tensorrt: TensorRTPlans | None = None,
                     engines: dict | None = None) -> list[Path]:
    """Write each model's ``config.pbtxt`` and its ``1/model.py`` (:func:`adapter_source`).  The
    artifacts must already be in place (see :func:`version_dir`).  With ``tensorrt``, also the
    tensorrt_plan models.  Nothing written names a path of this machine."""
    written = []
    configs = model_configs(cfg, settings, logit_scale, default_scoring, engines)
    if tensorrt is not None:
        configs.update(tensorrt_configs(cfg, settings, tensorrt, configs))
    for name, config in configs.items():
        version = version_dir(out, name)
        (Path(out) / name / "config.pbtxt").write_text(config_text(config))
        written.append(Path(out) / name)
        if name in TRT_MODELS.values():   # platform tensorrt_plan: the plan is the model, no adapter
            tower = next(t for t, m in TRT_MODELS.items() if m == name)
            files = warmup_files(tower_spec(cfg, tower, settings.max_batch), cfg.text.context_length)
            if files:
                warm = Path(out) / name / "warmup"
                warm.mkdir(exist_ok=True)
                for f, data in files.items():
                    (warm / f).write_bytes(data)
            continue
        if any(i.input_data_file for w in config.model_warmup for i in w.inputs.values()):
            warm = Path(out) / name / "warmup"
            warm.mkdir(exist_ok=True)
            (warm / WARMUP_FILE).write_bytes(struct.pack("<I", len(WARMUP_TEXT)) + WARMUP_TEXT)
        (version / "model.py").write_text(adapter_source(M.MODELS[name]))
    return written
