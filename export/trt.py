"""TensorRT stage: validated ONNX -> TensorRT plan per tower, checked against PyTorch.

Everything that decides something is a pure function, unit-tested without TensorRT
(tests/test_trt.py): the optimisation profile (:func:`optimisation_profile`), the builder
flags (:func:`build_flags`), plan/sidecar naming (:func:`plan_filename`), the sidecar
content (:func:`sidecar_content`), whether the plans in a repository still fit this GPU and
TensorRT (:func:`plan_matches`, :func:`repository_plans_status`, used by the Docker
entrypoint) and the numerics gates (:func:`topk_agreement`, :func:`gate_failures`).  Only
:func:`build_engine`, :func:`validate_engines` and :func:`detect_environment` touch
TensorRT/CUDA, and ``tensorrt`` is imported lazily inside them.

TensorRT versions: the 10.x API is the target (named I/O tensors, ``set_input_shape``,
``execute_async_v3``).  TensorRT 11 removed weak typing: ``BuilderFlag.FP16`` and the
precision-constraint flags are gone and the precision of every tensor comes from the ONNX
graph.  fp32 engines build the same way on 10.x and 11.x; ``--precision fp16`` on 11.x is
refused with a clear message, because it needs an fp16-typed ONNX graph (with
LayerNormalization/Softmax kept in fp32) that this exporter does not write.

Command line (used by docker/entrypoint.sh)::

    python -m filip_export.trt check REPO [--precision P] [--max-batch N] [--checkpoint F]
    python -m filip_export.trt missing REPO [...]

``check`` exits 0 when every tower's plan in REPO matches the compute capability of every
visible GPU architecture and this TensorRT version (per its JSON sidecar), 3 when engines must
be (re)built, 2 when no NVIDIA GPU (NVML / nvidia-smi, not torch) or no TensorRT is
available.  ``missing`` prints the UUID of one GPU per architecture that lacks its plans.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from filip_engine.compare import CompareResult, compare_outputs
from filip_engine.errors import ExportError, ValidationError
from filip_engine.io_spec import Tolerance, TowerSpec, tower_spec
from filip_export.triton_repo import TRT_MODELS  # Triton model per tower

# --- gates ----------------------------------------------------------------------------------
# Per-token cosine is the gate that matters; max_abs is generous because tokens are unit
# vectors (cosine 0.999 allows an element error of a few 1e-2).
TRT_FP32_TOLERANCE = Tolerance(max_abs=5e-3, min_cosine=0.9999)
TRT_FP16_TOLERANCE = Tolerance(max_abs=5e-2, min_cosine=0.999)
RANKING_K = 10                 # fp16: top-10 images per text query by s_T must agree ...
MIN_TOPK_AGREEMENT = 0.9       # ... on average over the queries (|top10_ref & top10_trt| / 10)

# --- profiles -------------------------------------------------------------------------------
# TensorRT tunes kernels for the "opt" shape and accepts anything in [min, max].  Triton's
# dynamic batcher (queue delay 500 us) forms batches of a few to ~16 requests under load, and
# the Python front ends send whole requests (the client's default batch is 16 images / 32
# texts) in chunks of at most max_batch: 16 sits in the middle of what the engine really sees
# and is large enough to fill the GPU's tensor cores for a B/32 tower (16 x 50 tokens).
OPT_BATCH = 16
# A typical caption ("a photo of a dog playing in the snow") is 10-14 BPE tokens + SOT/EOT;
# the front end pads each request to its longest text, so ~16 is the common width.
OPT_SEQ = 16

SIDECAR_SUFFIX = ".json"
SIDECAR_VERSION = 1
# Layers kept in fp32 inside an fp16 engine (TensorRT 10.x, weak typing): LayerNormalization
# (INormalizationLayer, one op since opset 17), the attention softmax, and reductions (the
# per-token L2 norm, any decomposed mean/variance).
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")
DEFAULT_TIMING_CACHE = Path(os.environ.get("FILIP_TRT_TIMING_CACHE",
                                           Path.home() / ".cache" / "filip" / "trt_timing.cache"))


@dataclass(frozen=True)
class InputProfile:
    """min/opt/max shapes of one engine input."""
    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def optimisation_profile(spec: TowerSpec, max_batch: int, *, opt_batch: int = OPT_BATCH,
                         opt_seq: int = OPT_SEQ) -> tuple[InputProfile, ...]:
    """One TensorRT optimisation profile for ``spec``'s inputs.

    batch: 1 .. max_batch, opt min(max_batch, opt_batch).  seq (text): the spec's own range,
    2 .. context_length (every row holds at least SOT and EOT, and the ONNX graph was exported
    with that range), opt ``opt_seq`` clamped into it.  Fixed dims stay fixed.
    """
    if max_batch < 1:
        raise ExportError(f"max_batch must be at least 1, got {max_batch}")
    out = []
    for t in spec.inputs:
        lo, mid, hi = [], [], []
        for d in t.shape:
            if isinstance(d, int):
                lo.append(d), mid.append(d), hi.append(d)
            elif d.name == "batch":
                lo.append(1), mid.append(min(max_batch, opt_batch)), hi.append(max_batch)
            else:
                lo.append(d.min), mid.append(min(max(opt_seq, d.min), d.max)), hi.append(d.max)
        out.append(InputProfile(t.name, tuple(lo), tuple(mid), tuple(hi)))
    return tuple(out)


# --- builder flags --------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildFlags:
    precision: str                         # "fp32" | "fp16"
    fp16: bool                             # BuilderFlag.FP16 (TensorRT 10.x only)
    tf32: bool                             # leave BuilderFlag.TF32 on (off for fp32: fp32 means fp32)
    obey_precision_constraints: bool       # BuilderFlag.OBEY_PRECISION_CONSTRAINTS (10.x only): a pin is a hard rule
    prefer_precision_constraints: bool     # BuilderFlag.PREFER_PRECISION_CONSTRAINTS (10.x only): a pin wins unless
                                           # no tactic implements it (then TensorRT warns and builds anyway)
    fp32_layer_types: tuple[str, ...]      # trt.LayerType names pinned to fp32
    strongly_typed: bool                   # TensorRT 11+: precision comes from the graph


def trt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise ExportError(f"cannot read the TensorRT version {version!r}") from None


def build_flags(precision: str, trt_version: str, constraints: str = "prefer") -> BuildFlags:
    """What the builder must be told for ``precision`` on TensorRT ``trt_version``.

    fp16 on 10.x: FP16 kernels allowed, LayerNorm/softmax/reductions pinned to fp32 with
    ``constraints`` "prefer" (the default: PREFER_PRECISION_CONSTRAINTS; TensorRT honours a
    pin unless no tactic implements it, so a pin can never fail the build) or "obey"
    (OBEY_PRECISION_CONSTRAINTS: a pin no tactic implements fails the build; what
    tools/gpu_check.py --stage image tries, to decide whether "obey" is viable).  The fp16
    numerics gates decide either way.  fp32: TF32 disabled, so the engine is comparable with
    PyTorch at cos >= 0.9999.  TensorRT < 10 is refused (the runtime uses the 10.x API); fp16
    on 11+ is refused (weak typing was removed).
    """
    major = trt_major(trt_version)
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"precision must be fp32 or fp16, got {precision!r}")
    if constraints not in ("prefer", "obey"):
        raise ExportError(f"precision constraints must be prefer or obey, got {constraints!r}")
    if major < 10:
        raise ExportError(f"TensorRT {trt_version} is too old: this project needs TensorRT 10 or newer "
                          "(named I/O tensors, execute_async_v3)")
    if precision == "fp32":
        return BuildFlags("fp32", fp16=False, tf32=False, obey_precision_constraints=False,
                          prefer_precision_constraints=False, fp32_layer_types=(), strongly_typed=major >= 11)
    if major >= 11:
        raise ExportError(f"--precision fp16 is not supported with TensorRT {trt_version}: TensorRT 11 removed "
                          "BuilderFlag.FP16 and precision constraints, and this exporter writes an fp32 ONNX graph; "
                          "use --precision fp32, or TensorRT 10.x for fp16")
    return BuildFlags("fp16", fp16=True, tf32=False, obey_precision_constraints=constraints == "obey",
                      prefer_precision_constraints=constraints == "prefer",
                      fp32_layer_types=FP32_LAYER_TYPES, strongly_typed=False)


def timing_cache_path(base: str | Path, compute_capability: Sequence[int], trt_version: str) -> Path:
    """The timing cache of one GPU architecture and one TensorRT version, beside ``base``:
    ``trt_timing.cache`` -> ``trt_timing.sm90.trt10.7.0.23.cache``.  A cache is only reused by
    the architecture and TensorRT release that wrote it (TensorRT's ``ignore_mismatch=True``
    would *use* a mismatched cache, so it is never set)."""
    base = Path(base)
    suffix = base.suffix or ".cache"
    return base.with_name(f"{base.stem}.sm{int(compute_capability[0])}{int(compute_capability[1])}"
                          f".trt{trt_version}{suffix}")


# --- naming, sidecar, matching ------------------------------------------------------------
def cc_key(cc: Sequence[int]) -> str:
    """Triton's ``cc_model_filenames`` key for a compute capability: (9, 0) -> "9.0"."""
    return f"{int(cc[0])}.{int(cc[1])}"


def plan_filename(cc: Sequence[int]) -> str:
    """Plan file for a compute capability: (9, 0) -> "model.sm90.plan"."""
    return f"model.sm{int(cc[0])}{int(cc[1])}.plan"


def sidecar_path(plan: str | Path) -> Path:
    plan = Path(plan)
    return plan.with_name(plan.name + SIDECAR_SUFFIX)


def checkpoint_fingerprint(path: str | Path) -> dict:
    """Cheap identity of a checkpoint file (name, size, mtime): enough to notice a new one."""
    st = Path(path).stat()
    return {"name": Path(path).name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def sidecar_content(*, tower: str, precision: str, trt_version: str, gpu_name: str,
                    compute_capability: Sequence[int], profiles: Sequence[InputProfile], flags: BuildFlags,
                    max_batch: int, onnx_sha256: str = "", checkpoint: Mapping | None = None,
                    build_seconds: float | None = None) -> dict:
    """What the JSON beside each plan records (and what :func:`plan_matches` reads back)."""
    return {
        "sidecar_version": SIDECAR_VERSION,
        "tower": tower,
        "plan": plan_filename(compute_capability),
        "precision": precision,
        "tensorrt_version": str(trt_version),
        "gpu_name": gpu_name,
        "compute_capability": cc_key(compute_capability),
        "max_batch": int(max_batch),
        "profiles": [{"input": p.name, "min": list(p.min), "opt": list(p.opt), "max": list(p.max)} for p in profiles],
        "builder_flags": asdict(flags) | {"fp32_layer_types": list(flags.fp32_layer_types)},
        "onnx_sha256": onnx_sha256,
        "checkpoint": dict(checkpoint) if checkpoint else None,
        "build_seconds": build_seconds,
    }


def plan_matches(sidecar: Mapping, *, trt_version: str, compute_capability: Sequence[int],
                 precision: str | None = None, max_batch: int | None = None,
                 checkpoint: Mapping | None = None) -> tuple[bool, str]:
    """Whether a plan described by ``sidecar`` can be served here: same TensorRT version
    (plans are not portable across versions), same compute capability, and, when given, the
    requested precision, max batch and checkpoint.  Returns (ok, reason)."""
    if sidecar.get("sidecar_version") != SIDECAR_VERSION:
        return False, f"sidecar version {sidecar.get('sidecar_version')!r}, expected {SIDECAR_VERSION}"
    checks = [("TensorRT version", sidecar.get("tensorrt_version"), str(trt_version)),
              ("compute capability", sidecar.get("compute_capability"), cc_key(compute_capability))]
    if precision is not None:
        checks.append(("precision", sidecar.get("precision"), precision))
    if max_batch is not None:
        checks.append(("max batch", sidecar.get("max_batch"), int(max_batch)))
    if checkpoint is not None:
        checks.append(("checkpoint", sidecar.get("checkpoint"), dict(checkpoint)))
    for what, have, want in checks:
        if have != want:
            return False, f"{what} is {have!r} in the plan, {want!r} here"
    return True, "matches"


def repository_plans_status(repo: str | Path, *, trt_version: str, compute_capability: Sequence[int],
                            precision: str | None = None, max_batch: int | None = None,
                            checkpoint: Mapping | None = None) -> tuple[bool, str]:
    """Whether every tower's TensorRT model in ``repo`` has a plan for this GPU and TensorRT
    (the Docker entrypoint builds when not).  Returns (ok, reason)."""
    repo = Path(repo)
    for tower, model in TRT_MODELS.items():
        plan = repo / model / "1" / plan_filename(compute_capability)
        side = sidecar_path(plan)
        if not plan.is_file() or not side.is_file():
            return False, f"{plan} or its sidecar is missing"
        if not (repo / model / "config.pbtxt").is_file():
            return False, f"{repo / model / 'config.pbtxt'} is missing"
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError) as e:
            return False, f"{side} is unreadable: {e}"
        ok, why = plan_matches(meta, trt_version=trt_version, compute_capability=compute_capability,
                               precision=precision, max_batch=max_batch, checkpoint=checkpoint)
        if not ok:
            return False, f"{plan.relative_to(repo)}: {why}"
    return True, f"plans for sm{compute_capability[0]}{compute_capability[1]} / TensorRT {trt_version} are in place"


def plans_in(version_dir: str | Path) -> dict[str, str]:
    """{compute capability key: plan file} for every plan with a readable sidecar in a
    version folder (a repository on a shared volume may hold plans of several GPUs)."""
    found = {}
    for side in sorted(Path(version_dir).glob("model.sm*.plan" + SIDECAR_SUFFIX)):
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        plan = side.with_name(side.name[: -len(SIDECAR_SUFFIX)])
        if plan.is_file() and meta.get("compute_capability"):
            found[meta["compute_capability"]] = plan.name
    return found


# --- gates ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankingResult:
    """Top-k agreement of a ranking (images per text query, by ``score``: "s_T" or "global")
    between PyTorch and a reduced-precision engine."""
    k: int
    n_queries: int
    n_items: int
    mean_overlap: float
    min_overlap: float
    threshold: float
    score: str = "s_T"

    @property
    def passed(self) -> bool:
        return self.mean_overlap >= self.threshold

    def line(self) -> str:
        return (f"{'ok  ' if self.passed else 'FAIL'} {self.score} top-{self.k} agreement over {self.n_queries} text "
                f"queries x {self.n_items} images: mean {self.mean_overlap:.3f}, min {self.min_overlap:.3f} "
                f"(gate: mean >= {self.threshold})")


def topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = RANKING_K,
                   threshold: float = MIN_TOPK_AGREEMENT, score: str = "s_T") -> RankingResult:
    """Rows are queries, columns items: per query, the fraction of the reference's top-k items
    that are also in the candidate's top-k; averaged over queries."""
    ref, cand = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if ref.shape != cand.shape or ref.ndim != 2:
        raise ValueError(f"score matrices must have the same 2-D shape, got {ref.shape} and {cand.shape}")
    k = min(k, ref.shape[1])
    top_r = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    top_c = np.argsort(-cand, axis=1, kind="stable")[:, :k]
    overlaps = np.array([len(set(a) & set(b)) / k for a, b in zip(top_r, top_c)]) if ref.shape[0] else np.ones(1)
    return RankingResult(k, ref.shape[0], ref.shape[1], float(overlaps.mean()), float(overlaps.min()), threshold, score)


def engine_tolerance(precision: str) -> Tolerance:
    return TRT_FP16_TOLERANCE if precision == "fp16" else TRT_FP32_TOLERANCE


def gate_failures(results: Sequence[CompareResult],
                  ranking: "RankingResult | Sequence[RankingResult] | None" = None) -> list[str]:
    """Every failed gate, one line each (empty: all passed)."""
    bad = [f"{r.label}: " + "; ".join(f"{o.name}: {', '.join(o.failures)}" for o in r.outputs if not o.passed)
           for r in results if not r.passed]
    rankings = [] if ranking is None else [ranking] if isinstance(ranking, RankingResult) else list(ranking)
    bad += [f"{r.score} top-{r.k} agreement {r.mean_overlap:.3f} < {r.threshold}" for r in rankings if not r.passed]
    return bad


def raise_if_gates_failed(results: Sequence[CompareResult],
                          ranking: "RankingResult | Sequence[RankingResult] | None" = None,
                          what: str = "TensorRT engine") -> None:
    bad = gate_failures(results, ranking)
    if bad:
        raise ValidationError(f"{what} failed numerics gates vs PyTorch: " + " | ".join(bad))


# --- TensorRT (lazy) ----------------------------------------------------------------------
def import_tensorrt():
    from filip_engine.gpu import import_tensorrt as _import
    try:
        return _import()
    except ImportError as e:
        raise ExportError(f"the tensorrt Python package is not installed ({e}); pip install tensorrt-cu12 "
                          "(or tensorrt-cu12-bindings against a system TensorRT, as in the image)") from e


def detect_environment() -> dict:
    """TensorRT version, GPU name and compute capability of the first visible NVIDIA GPU, from
    the driver (NVML / nvidia-smi: :mod:`filip_engine.gpu`), not from torch (raises ExportError).
    NVML numbers GPUs by PCI bus; TensorRT builds on CUDA's device 0, so the entrypoint sets
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and builds with one GPU visible."""
    from filip_engine.gpu import list_gpus
    trt = import_tensorrt()
    gpus = list_gpus()
    if not gpus:
        raise ExportError("no NVIDIA GPU is visible (NVML / nvidia-smi find none; start the container with --gpus all)")
    g = gpus[0]
    return {"tensorrt_version": trt.__version__, "gpu_name": g.name, "compute_capability": tuple(g.compute_capability),
            "gpus": [{"uuid": x.uuid, "name": x.name, "compute_capability": cc_key(x.compute_capability)} for x in gpus]}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pin_fp32(trt, network, type_names: Sequence[str]) -> int:
    """Pin the layers of the named types (and their float outputs) to fp32; returns how many."""
    wanted = {getattr(trt.LayerType, n) for n in type_names if hasattr(trt.LayerType, n)}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in wanted:
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in (trt.float32, trt.float16):
                layer.set_output_type(j, trt.float32)
        if layer.type == trt.LayerType.NORMALIZATION and hasattr(trt, "INormalizationLayer"):
            try:   # the Python API returns ILayer; the subclass carries compute_precision
                layer.__class__ = trt.INormalizationLayer
                layer.compute_precision = trt.float32
            except (AttributeError, TypeError):
                pass
        pinned += 1
    return pinned


def build_engine(onnx_path: str | Path, plan_path: str | Path, spec: TowerSpec, *, precision: str,
                 max_batch: int, timing_cache: str | Path | None = DEFAULT_TIMING_CACHE,
                 checkpoint: Mapping | None = None, log=print, constraints: str = "prefer") -> dict:
    """Parse ``onnx_path``, build a plan for this GPU into ``plan_path`` and write its sidecar.
    ``timing_cache`` is the base name of the per-architecture, per-TensorRT-version caches
    (:func:`timing_cache_path`).  Returns the sidecar content.  Raises ExportError with the
    parser's/builder's messages."""
    trt = import_tensorrt()
    env = detect_environment()
    flags = build_flags(precision, trt.__version__, constraints)
    profiles = optimisation_profile(spec, max_batch)
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)   # explicit batch is the only mode in 10.x; strongly typed by default in 11.x
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
    got_in = [network.get_input(i).name for i in range(network.num_inputs)]
    if got_in != spec.input_names:
        raise ExportError(f"{onnx_path}: TensorRT sees inputs {got_in}, expected {spec.input_names}")
    config = builder.create_builder_config()
    if not flags.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    pinned = 0
    if flags.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if flags.obey_precision_constraints:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    if flags.prefer_precision_constraints:
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    if flags.fp32_layer_types:
        pinned = _pin_fp32(trt, network, flags.fp32_layer_types)
    profile = builder.create_optimization_profile()
    for p in profiles:
        profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    cache_path = timing_cache_path(timing_cache, env["compute_capability"], trt.__version__) if timing_cache else None
    cache_bytes = b""
    if cache_path is not None and cache_path.is_file():
        cache_bytes = cache_path.read_bytes()
    try:
        cache = config.create_timing_cache(cache_bytes)
        loaded = config.set_timing_cache(cache, ignore_mismatch=False)
    except Exception as e:       # noqa: BLE001 - a corrupt cache file: start afresh
        log(f"      (timing cache {cache_path} unreadable: {e}; starting an empty one)")
        loaded = False
    if not loaded:               # written by another GPU or TensorRT (should not happen: the name says which)
        if cache_bytes:
            log(f"      (timing cache {cache_path} does not match this GPU / TensorRT; starting an empty one)")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} "
                          f"({precision}, max batch {max_batch}); see the TensorRT messages above")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        except OSError as e:
            log(f"      (timing cache not saved to {cache_path}: {e})")
    meta = sidecar_content(tower=spec.name, precision=precision, trt_version=trt.__version__,
                           gpu_name=env["gpu_name"], compute_capability=env["compute_capability"],
                           profiles=profiles, flags=flags, max_batch=max_batch, onnx_sha256=_sha256(onnx_path),
                           checkpoint=checkpoint, build_seconds=round(time.perf_counter() - t0, 1))
    sidecar_path(plan_path).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if pinned:
        log(f"      {pinned} normalization/softmax/reduce layers kept in fp32")
    return meta


def validate_engines(model, plans: Mapping[str, str | Path], *, precision: str, max_batch: int,
                     batch_sizes: Sequence[int] = (1, 2, 5), seed: int = 0,
                     n_images: int = 64, n_queries: int = 16) -> tuple[list[CompareResult], RankingResult | None]:
    """Each tower's plan vs the PyTorch model (fp32, CPU: the exact reference) on random
    inputs, through :func:`filip_engine.compare.compare_outputs`; for fp16 also the s_T top-10
    ranking of ``n_images`` random images for ``n_queries`` random text queries.  Does not
    raise: pass the results to :func:`raise_if_gates_failed`."""
    from filip_engine.interaction import late_interaction
    from filip_engine.runtime import TensorRTRuntime, TorchRuntime
    from filip_export.to_onnx import example_inputs

    cfg = model.config
    tol = engine_tolerance(precision)
    results: list[CompareResult] = []
    runtimes = {}
    try:
        for tower, plan in plans.items():
            spec = tower_spec(cfg, tower, max_batch)
            ref, cand = TorchRuntime(model, spec), TensorRTRuntime(plan, spec)
            runtimes[tower] = (ref, cand)
            ctx = cfg.text.context_length
            seqs = tuple(sorted({2, min(16, ctx), ctx})) if tower == "text" else (0,)
            for b in sorted({min(b, max_batch) for b in (*batch_sizes, max_batch)}):
                for s in seqs:
                    feeds = example_inputs(cfg, spec, b, s, seed + 1000 * b + s)
                    label = f"TensorRT {precision} {tower} batch={b}" + (f" seq={s}" if tower == "text" else "")
                    results.append(compare_outputs(ref.infer(feeds), cand.infer(feeds), tol, label))
        ranking = None
        if precision == "fp16" and {"image", "text"} <= set(runtimes):
            def run(tower, feeds, which):
                rt = runtimes[tower][which]
                n = len(next(iter(feeds.values())))
                parts = [rt.infer({k: v[i:i + max_batch] for k, v in feeds.items()})["tokens"] for i in range(0, n, max_batch)]
                return np.concatenate(parts)
            img = example_inputs(cfg, tower_spec(cfg, "image", max_batch), n_images, 0, seed + 7)
            txt = example_inputs(cfg, tower_spec(cfg, "text", max_batch), n_queries,
                                  min(OPT_SEQ, cfg.text.context_length), seed + 8)
            il = np.full(n_images, cfg.vision.num_patches, np.int64)
            s_ref = late_interaction(run("image", img, 0), il, run("text", txt, 0), txt["lengths"]).s_t
            s_trt = late_interaction(run("image", img, 1), il, run("text", txt, 1), txt["lengths"]).s_t
            ranking = topk_agreement(s_ref.T, s_trt.T)      # rows: text queries, columns: images
    finally:
        for _, cand in runtimes.values():
            cand.close()
    return results, ranking


# --- command line (the Docker entrypoint) ---------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m filip_export.trt", description="TensorRT plan checks")
    sub = p.add_subparsers(dest="cmd", required=True)
    chk = sub.add_parser("check", help="exit 0 when REPO's plans fit this GPU and TensorRT, 3 when they must be built")
    chk.add_argument("repo", type=Path)
    chk.add_argument("--precision", choices=["fp32", "fp16"], default=None)
    chk.add_argument("--max-batch", type=int, default=None)
    chk.add_argument("--checkpoint", type=Path, default=None, help="rebuild when this file differs from the one built")
    env = sub.add_parser("env", help="print TensorRT version, GPU name and compute capability as JSON")
    env.add_argument("--quiet", action="store_true")
    miss = sub.add_parser("missing", help="print the UUID of one GPU per architecture that has no matching plan in REPO "
                                          "(the entrypoint builds on each with CUDA_VISIBLE_DEVICES=UUID)")
    for a in (miss,):
        a.add_argument("repo", type=Path)
        a.add_argument("--precision", choices=["fp32", "fp16"], default=None)
        a.add_argument("--max-batch", type=int, default=None)
        a.add_argument("--checkpoint", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        found = detect_environment()
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "env":
        print(json.dumps({**found, "compute_capability": cc_key(found["compute_capability"])}))
        return 0
    fp = checkpoint_fingerprint(args.checkpoint) if args.checkpoint and args.checkpoint.is_file() else None
    missing = []
    for g in _architectures(found):     # every architecture visible here, not only GPU 0's
        ok, why = repository_plans_status(args.repo, trt_version=found["tensorrt_version"],
                                          compute_capability=g[1], precision=args.precision,
                                          max_batch=args.max_batch, checkpoint=fp)
        if args.cmd == "check":
            print(("ok: " if ok else "build needed: ") + why)
        if not ok:
            missing.append(g[0])
    if args.cmd == "missing":
        print("\n".join(missing))
        return 0
    return 3 if missing else 0


def _architectures(found: Mapping) -> list[tuple[str, tuple[int, int]]]:
    """(uuid, compute capability) of the first GPU of each architecture in ``found["gpus"]``."""
    seen, out = set(), []
    for g in found.get("gpus") or [{"uuid": "", "compute_capability": cc_key(found["compute_capability"])}]:
        cc = tuple(int(x) for x in g["compute_capability"].split("."))
        if cc not in seen:
            seen.add(cc)
            out.append((g["uuid"], cc))
    return out


if __name__ == "__main__":
    sys.exit(main())
