"""Write a complete, servable Triton model repository.

Models (all Python backend; the adapters are the tracked files
``triton_models/<model>/1/model.py``, thin wrappers over ``engine.serving``):

- ``filip_text``  : TEXT (UTF-8 bytes) -> TOKENS, LENGTHS, POOLED; tokenises on the server and
                    runs the text tower (ONNX Runtime).
- ``filip_image`` : IMAGE (encoded JPEG/PNG/WebP/... bytes) or PIXEL_VALUES (preprocessed)
                    -> TOKENS, LENGTHS, POOLED; decodes + preprocesses on the server.
- ``filip_score`` : IMAGE_TOKENS/LENGTHS + TEXT_TOKENS/LENGTHS -> S_I, S_T (+ ALIGNMENT).
- ``filip_search``: TEXT queries (embedded through filip_text) -> top-k IDS, SCORES, METADATA
                    over a pre-computed gallery; RELOAD swaps in a gallery (engine/search.py).

Each call of the client is one request to one of these models.  ``config.pbtxt`` is
generated from the checkpoint's config (dimensions), with dynamic batching, instance
counts and queue delays from :class:`RepoSettings`.  The encoders' ONNX files, the
tokenizer and the manifest are written into the model's version folder, so the server
needs nothing else.
"""
from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from engine.config import FilipConfig
from engine.serving import ServingLimits

ADAPTERS = Path(__file__).resolve().parent.parent / "triton_models"
MODELS = ("filip_text", "filip_image", "filip_score", "filip_search")


@dataclass(frozen=True)
class RepoSettings:
    max_batch: int = 64                  # items per batch the dynamic batcher may form
    queue_delay_us: int = 500            # how long the batcher waits to fill a batch (500 us: see docs/BENCHMARKS.md)
    text_instances: int = 1              # model instances (each its own process and ONNX Runtime session)
    image_instances: int = 1
    score_instances: int = 1
    intra_op_threads: int = 0            # ONNX Runtime threads per instance; 0 = all cores
    # Overload: a request finding this many queued is refused at once (UNAVAILABLE, which the
    # client retries with backoff), and one that waited this long in the queue is dropped.
    max_queue_size: int = 256
    queue_timeout_us: int = 30_000_000
    limits: ServingLimits = ServingLimits()   # per-request limits, enforced by the models
    # filip_search: galleries are folders under gallery_root ("" = <repository>/../galleries,
    # overridden by $FILIP_GALLERY_ROOT); `gallery` is loaded at start when it exists.
    gallery_root: str = ""
    gallery: str = "default"
    gallery_verify: str = "full"             # "full": sizes + SHA-256 at (re)load; "size": sizes only
    first_stage: str = "auto"                # two-stage candidates: auto (flat <= 200k items, else IVF), flat, ivf,
    qdrant_url: str = ""                     # or qdrant (a Qdrant server at qdrant_url, collection = gallery name)


def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]{opt} }}'


def _config(name: str, *, max_batch: int, inputs: list[str], outputs: list[str], instances: int,
            queue_delay_us: int | None, params: dict[str, str], warmup: str | None = None,
            queue: RepoSettings | None = None) -> str:
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch}"]
    policy = ""
    if queue is not None:
        policy = (f" default_queue_policy {{ timeout_action: REJECT default_timeout_microseconds: {queue.queue_timeout_us}"
                  f" allow_timeout_override: true max_queue_size: {queue.max_queue_size} }}")
    if queue_delay_us is not None and max_batch > 0:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us}{policy} }}")
    lines.append("input [\n" + ",\n".join(inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(outputs) + "\n]")
    lines.append(f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]")
    for k, v in params.items():
        lines.append(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}')
    if warmup:
        lines.append(warmup)
    return "\n".join(lines) + "\n"


# Triton's model_warmup runs these at load, before the model reports ready, so the first user
# request does not pay for ONNX Runtime's first-run allocations.  A BYTES input is read from a
# file in the model's warmup/ folder: each element a 4-byte little-endian length + the bytes.
WARMUP_TEXT = b"a photo of a cat"


def _warmup(input_block: str) -> str:
    return f'model_warmup [ {{ name: "warmup" batch_size: 1 inputs {{ {input_block} }} }} ]'



def model_configs(cfg: FilipConfig, s: RepoSettings, logit_scale: float) -> dict[str, str]:
    """config.pbtxt text per model, from the model config and the settings."""
    d, e = cfg.token_dim, cfg.embed_dim
    size, p = cfg.vision.image_size, cfg.vision.num_patches
    root = {"project_root": str(ADAPTERS.parent), **s.limits.to_params()}   # + where model.py finds the engine
    common = {**root, "intra_op_threads": str(s.intra_op_threads), "max_batch": str(s.max_batch)}
    embed_out = lambda t: [_tensor("TOKENS", "TYPE_FP32", [t, d]), _tensor("LENGTHS", "TYPE_INT32", [1]),  # noqa: E731
                           _tensor("POOLED", "TYPE_FP32", [e])]
    return {
        "filip_text": _config("filip_text", max_batch=s.max_batch, instances=s.text_instances,
                              queue_delay_us=s.queue_delay_us, params=common, queue=s,
                              warmup=_warmup('key: "TEXT" value: { data_type: TYPE_STRING dims: [ 1 ] input_data_file: "text" }'),
                              inputs=[_tensor("TEXT", "TYPE_STRING", [1])], outputs=embed_out(-1)),
        "filip_image": _config("filip_image", max_batch=s.max_batch, instances=s.image_instances,
                               queue_delay_us=s.queue_delay_us, params=common, queue=s,
                               warmup=_warmup(f'key: "PIXEL_VALUES" value: {{ data_type: TYPE_FP32 dims: [ 3, {size}, {size} ] zero_data: true }}'),
                               inputs=[_tensor("IMAGE", "TYPE_STRING", [1], optional=True),
                                       _tensor("PIXEL_VALUES", "TYPE_FP32", [3, size, size], optional=True)],
                               outputs=embed_out(p)),
        "filip_score": _config("filip_score", max_batch=0, instances=s.score_instances, queue_delay_us=None,
                               params={**root, "logit_scale": repr(float(logit_scale))},
                               inputs=[_tensor("IMAGE_TOKENS", "TYPE_FP32", [-1, -1, d]),
                                       _tensor("IMAGE_LENGTHS", "TYPE_INT32", [-1]),
                                       _tensor("TEXT_TOKENS", "TYPE_FP32", [-1, -1, d]),
                                       _tensor("TEXT_LENGTHS", "TYPE_INT32", [-1])],
                               outputs=[_tensor("S_I", "TYPE_FP32", [-1, -1]), _tensor("S_T", "TYPE_FP32", [-1, -1]),
                                        _tensor("ALIGNMENT", "TYPE_INT32", [-1, -1, -1])]),
        # One instance: it holds the gallery (memory-mapped) and RELOAD must reach the instance
        # that serves; its exact scan already uses every core (engine/search.py).
        "filip_search": _config("filip_search", max_batch=0, instances=1, queue_delay_us=None,
                                params={**root, "text_max_batch": str(s.max_batch), "gallery_root": s.gallery_root,
                                        "gallery": s.gallery, "gallery_verify": s.gallery_verify,
                                        "first_stage": s.first_stage, "qdrant_url": s.qdrant_url},
                                inputs=[_tensor("TEXT", "TYPE_STRING", [-1], optional=True),
                                        _tensor("K", "TYPE_INT32", [1], optional=True),
                                        _tensor("MODE", "TYPE_STRING", [1], optional=True),
                                        _tensor("CANDIDATES", "TYPE_INT32", [1], optional=True),
                                        _tensor("ALLOWED_IDS", "TYPE_STRING", [-1], optional=True),
                                        _tensor("RELOAD", "TYPE_STRING", [1], optional=True)],
                                outputs=[_tensor("IDS", "TYPE_STRING", [-1, -1]), _tensor("SCORES", "TYPE_FP32", [-1, -1]),
                                         _tensor("METADATA", "TYPE_STRING", [-1, -1]), _tensor("INFO", "TYPE_STRING", [1])]),
    }


# --- TensorRT (GPU): the encoders' plans served as tensorrt_plan models (docs/GPU.md) -----------
TRT_MODELS = {"text": "filip_text_trt", "image": "filip_image_trt"}
_TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}


@dataclass(frozen=True)
class TensorRTPlans:
    """The plans export/trt.py built, per tower ("text"/"image"): ``files`` maps a compute
    capability ("9.0") to a plan file in ``<model>/1``; ``default`` is the plan built here."""
    files: dict
    default: dict


def _trt_tensor(t) -> str:
    """A tensor of an io_spec TowerSpec as a batched tensorrt_plan config entry."""
    dims = [d if isinstance(d, int) else -1 for d in t.shape[1:]]
    if not dims:   # [batch] in the engine: Triton's documented form is dims [1] reshaped to []
        return f'  {{ name: "{t.name}" data_type: {_TRITON_DTYPES[t.dtype]} dims: [ 1 ] reshape: {{ shape: [ ] }} }}'
    return _tensor(t.name, _TRITON_DTYPES[t.dtype], dims)


def tensorrt_config(name: str, spec, s: RepoSettings, files: dict, default: str, instances: int = 1) -> str:
    """config.pbtxt of a tensorrt_plan model: one plan per GPU architecture through
    ``cc_model_filenames``, dynamic batching like the front ends, instances on the GPU."""
    lines = [f'name: "{name}"', 'platform: "tensorrt_plan"', f"max_batch_size: {s.max_batch}",
             f'default_model_filename: "{default}"']
    lines += [f'cc_model_filenames {{ key: "{cc}" value: "{f}" }}' for cc, f in sorted(files.items())]
    lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {s.queue_delay_us} default_queue_policy {{ "
                 f"timeout_action: REJECT default_timeout_microseconds: {s.queue_timeout_us} allow_timeout_override: true "
                 f"max_queue_size: {s.max_queue_size} }} }}")
    lines.append("input [\n" + ",\n".join(_trt_tensor(t) for t in spec.inputs) + "\n]")
    lines.append("output [\n" + ",\n".join(_trt_tensor(t) for t in spec.outputs) + "\n]")
    lines.append(f"instance_group [ {{ count: {instances} kind: KIND_GPU }} ]")
    return "\n".join(lines) + "\n"


def tensorrt_configs(cfg: FilipConfig, s: RepoSettings, plans: TensorRTPlans, configs: dict[str, str]) -> dict[str, str]:
    """The tensorrt_plan models' configs, and the front ends' configs with a ``trt_model``
    parameter naming the model they forward to (the CPU path's configs are not touched)."""
    from engine.io_spec import tower_spec
    out = {}
    for tower, model in TRT_MODELS.items():
        front = f"filip_{tower}"
        out[front] = configs[front] + f'parameters {{ key: "trt_model" value: {{ string_value: "{model}" }} }}\n'
        out[model] = tensorrt_config(model, tower_spec(cfg, tower, s.max_batch), s, plans.files[tower], plans.default[tower])
    return out


def version_dir(out: Path, model: str) -> Path:
    """Where a model's artifacts go: ``out/<model>/1`` (image.onnx in filip_image, text.onnx and
    tokenizer.json in filip_text, the manifest in each)."""
    d = Path(out) / model / "1"
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_repository(out: Path, cfg: FilipConfig, *, logit_scale: float,
                     settings: RepoSettings = RepoSettings(), tensorrt: TensorRTPlans | None = None) -> list[Path]:
    """Write each model's ``config.pbtxt`` and its ``1/model.py`` adapter (copied from this
    project's ``triton_models/`` unless ``out`` is that folder).  The artifacts must already
    be in place (see :func:`version_dir`).  With ``tensorrt``, also the tensorrt_plan models."""
    written = []
    configs = model_configs(cfg, settings, logit_scale)
    if tensorrt is not None:
        configs.update(tensorrt_configs(cfg, settings, tensorrt, configs))
    for name, text in configs.items():
        version = version_dir(out, name)
        (Path(out) / name / "config.pbtxt").write_text(text)
        if name in TRT_MODELS.values():   # platform tensorrt_plan: the plan is the model, no adapter
            written.append(Path(out) / name)
            continue
        if name == "filip_text":
            (Path(out) / name / "warmup").mkdir(exist_ok=True)
            (Path(out) / name / "warmup" / "text").write_bytes(struct.pack("<I", len(WARMUP_TEXT)) + WARMUP_TEXT)
        src = ADAPTERS / name / "1" / "model.py"
        if src.resolve() != (version / "model.py").resolve():
            shutil.copyfile(src, version / "model.py")
        written.append(Path(out) / name)
    return written
