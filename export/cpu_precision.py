"""Reduced-precision CPU engines (bf16, int8) for both towers, gated like TensorRT fp16.

``build_cpu_engines`` turns each tower's exported fp32 ONNX into the engine ``--precision``
asks for, checks it against the PyTorch fp32 model on held-out real-looking inputs
(:mod:`filip_export.calibration`) and returns the :class:`~filip_engine.precision.TowerEngine`
records the repository serves.  A failed gate raises ValidationError naming every failure and
its size; the export then leaves no repository.

- **bf16**: OpenVINO compiles the fp32 ONNX with bf16 inference precision.  Nothing new is
  written; refused on a CPU without bf16 instructions.
- **int8**, two candidates, each gated:

  - ``onnxruntime``: ONNX Runtime's dynamic quantisation of every weight MatMul (int8
    weights per output channel, uint8 activations with a range per batch);
  - ``openvino``: NNCF's static post-training quantisation of the OpenVINO model (activation
    ranges from the calibration split), with and without its SmoothQuant step, the better on
    the validation split kept, saved as OpenVINO IR (``<tower>.int8.xml`` + ``.bin``).

  A layer that costs too much accuracy stays fp32: when the fully quantised tower misses the
  validation target, each weight MatMul is measured alone (only it quantised) and the most
  harmful are kept fp32, as few as the target allows (a doubling, then a bisection, over that
  order).  The static candidate keeps the same layers fp32.  ``auto`` serves the faster of the
  candidates that passed, timed side by side at batch 8.

The gate, as for TensorRT fp16 (:mod:`filip_export.trt`): every token row and pooled
embedding at cosine >= 0.999 and within 5e-2 of PyTorch fp32, and top-10 agreement >= 0.9 of
s_T (images per text query) and of the global cosine.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from filip_engine.compare import CompareResult, compare_outputs
from filip_engine.errors import FilipError
from filip_engine.interaction import late_interaction
from filip_engine.io_spec import Tolerance, tower_spec
from filip_engine.precision import INSTALL_HINT, TowerEngine, check_cpu_supports, open_cpu_runtime
from filip_engine.runtime import OnnxRuntime, OpenVinoRuntime, TorchRuntime
from filip_export.calibration import GateInputs, chunks, run_all
from filip_export.trt import MIN_TOPK_AGREEMENT, RANKING_K, TRT_FP16_TOLERANCE, RankingResult, raise_if_gates_failed, topk_agreement

TOWERS = ("image", "text")
INT8_ENGINES = ("auto", "onnxruntime", "openvino")
# the gate: TensorRT fp16's
GATE_TOLERANCE: Tolerance = TRT_FP16_TOLERANCE
# what the layer search aims for on the validation split: a margin over the gate's 0.999, so
# that the held-out split, seen by nothing before the gate, passes it too
VALIDATION_MIN_COSINE = 0.9995
TIMING_BATCH = 8
TIMING_ROUNDS = 5


@dataclass
class Candidate:
    tower: str
    record: TowerEngine
    path: Path
    runtime: object = None
    result: CompareResult | None = None
    held_out: dict | None = None          # its outputs on the held-out split
    items_per_s: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.record.precision} {self.tower} ({self.record.engine})"


@contextlib.contextmanager
def _quiet():
    """The quantisers log advice (pre-processing, progress bars) at WARNING/INFO; errors still raise."""
    root, nncf_log = logging.getLogger(), logging.getLogger("nncf")
    levels = root.level, nncf_log.level
    root.setLevel(logging.ERROR)
    nncf_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(levels[0])
        nncf_log.setLevel(levels[1])


def weight_matmuls(onnx_path: Path) -> list[str]:
    """Names of the MatMul nodes with a constant (weight) operand: the layers int8 quantises.
    Attention's two activation-by-activation MatMuls and the patch Conv stay fp32."""
    m = onnx.load(str(onnx_path), load_external_data=False)
    consts = {i.name for i in m.graph.initializer} | {n.output[0] for n in m.graph.node if n.op_type == "Constant"}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and any(i in consts for i in n.input)]


def _min_token_cosine(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> float:
    r = compare_outputs(reference, candidate, Tolerance(np.inf, -1.0), "search")
    return min(o.min_cosine for o in r.outputs)


def quantize_dynamic_onnx(src: Path, dst: Path, fp32_nodes: Sequence[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=list(fp32_nodes))


def quantize_static_nncf(src: Path, dst: Path, fp32_nodes: Sequence[str], calibration: dict[str, np.ndarray], *,
                         smooth_quant: bool = True) -> None:
    """NNCF's post-training quantisation of the OpenVINO model read from ``src`` (activation
    ranges from ``calibration``, transformer preset; ``smooth_quant=False`` turns off its
    SmoothQuant step, which moves activation outliers into the weights and costs accuracy
    where there are none), saved as OpenVINO IR (``dst`` .xml + .bin).  ``fp32_nodes`` are
    ONNX node names; they are found in the OpenVINO model by the tensor names their outputs
    carry through the conversion."""
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        raise FilipError(f"NNCF / OpenVINO is not installed ({e}); {INSTALL_HINT}") from e
    model = ov.Core().read_model(str(src))
    proto = onnx.load(str(src), load_external_data=False)
    outputs = {o for n in proto.graph.node if n.name in set(fp32_nodes) for o in n.output}
    ignored = [op.get_friendly_name() for op in model.get_ops()
               if op.get_type_name() == "MatMul" and any(outputs & o.get_names() for o in op.outputs())]
    if len(ignored) != len(fp32_nodes):
        raise FilipError(f"{len(fp32_nodes)} layers are to stay fp32 but {len(ignored)} of them were found in the "
                         f"OpenVINO model of {src.name}")
    items = list(chunks(calibration, TIMING_BATCH))
    # NNCF draws progress bars on the terminal: kept out of the export's report
    with _quiet(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        extra = {} if smooth_quant else {"advanced_parameters": nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1))}
        q = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=sum(len(next(iter(i.values()))) for i in items),
                          ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None, **extra)
    ov.save_model(q, str(dst), compress_to_fp16=False)


def search_fp32_layers(build: Callable[[Sequence[str]], object], nodes: Sequence[str], validate: Callable[[object], float],
                       log=print, what: str = "") -> tuple[list[str], float]:
    """The fewest weight MatMuls to keep fp32 for ``validate`` (min token cosine on the
    validation split) to reach VALIDATION_MIN_COSINE: ``build(fp32_nodes)`` returns a runtime.
    Returns (fp32 nodes, the validation cosine reached)."""
    full = validate(build([]))
    if full >= VALIDATION_MIN_COSINE:
        return [], full
    harm = {}
    for n in nodes:           # only n quantised
        harm[n] = 1.0 - validate(build([m for m in nodes if m != n]))
    order = sorted(nodes, key=lambda n: -harm[n])
    log(f"      {what}: fully quantised reaches min cos {full:.5f} < {VALIDATION_MIN_COSINE} on the validation split; "
        f"most sensitive: " + ", ".join(f"{n} ({harm[n]:.1e})" for n in order[:3]))
    reached = {0: full}
    k = 1
    while k < len(order):                      # doubling ...
        reached[k] = validate(build(order[:k]))
        if reached[k] >= VALIDATION_MIN_COSINE:
            break
        k *= 2
    if k >= len(order):
        k = len(order)
        reached[k] = validate(build(order))    # nothing quantised: the fp32 graph itself
        if reached[k] < VALIDATION_MIN_COSINE:
            return list(order), reached[k]
    lo, hi = k // 2, k                         # ... then bisection: lo fails, hi passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        reached[mid] = validate(build(order[:mid]))
        lo, hi = (mid, hi) if reached[mid] < VALIDATION_MIN_COSINE else (lo, mid)
    return list(order[:hi]), reached[hi]


def _time(runtimes: Sequence, feeds: dict[str, np.ndarray]) -> list[float]:
    """Items per second of each runtime on the same batch, rounds interleaved (median)."""
    batch = next(chunks(feeds, TIMING_BATCH))
    n = len(next(iter(batch.values())))
    for rt in runtimes:
        rt.infer(batch)
    times = [[] for _ in runtimes]
    for _ in range(TIMING_ROUNDS):
        for i, rt in enumerate(runtimes):
            t = time.perf_counter()
            rt.infer(batch)
            times[i].append(time.perf_counter() - t)
    return [n / float(np.median(t)) for t in times]


def build_cpu_engines(model, precision: str, onnx_paths: Mapping[str, Path], data: GateInputs, *,
                      int8_engine: str = "auto", threads: int | None = None, max_batch: int = 64,
                      log=print) -> dict[str, TowerEngine]:
    """Each tower's reduced-precision engine, gated (see the module docstring).  New files go
    beside the fp32 ONNX (``<tower>.int8.onnx`` or ``<tower>.int8.xml/.bin``); a candidate not
    chosen leaves none."""
    if precision not in ("bf16", "int8"):
        raise FilipError(f"build_cpu_engines builds bf16 or int8, not {precision!r}")
    if int8_engine not in INT8_ENGINES:
        raise FilipError(f"--int8-engine must be one of {', '.join(INT8_ENGINES)}, got {int8_engine!r}")
    if precision == "bf16" or int8_engine == "openvino":
        check_cpu_supports(precision)          # also: OpenVINO installed
    cfg = model.config
    specs = {t: tower_spec(cfg, t, max_batch) for t in TOWERS}
    refs = {t: TorchRuntime(model, specs[t]) for t in TOWERS}
    held_ref = {t: run_all(refs[t], data.held_out.tower(t)) for t in TOWERS}
    chosen: dict[str, Candidate] = {}
    results: list[CompareResult] = []
    for tower in TOWERS:
        t0 = time.perf_counter()
        src = Path(onnx_paths[tower])
        if precision == "bf16":
            cands = [Candidate(tower, TowerEngine("bf16", "openvino", src.name, "bf16"), src)]
        else:
            cands = _int8_candidates(tower, src, specs[tower], refs[tower], data, int8_engine, threads, log)
        for c in cands:
            if c.runtime is None:
                c.runtime = open_cpu_runtime(c.path.parent, tower, specs[tower], c.record, threads=threads)
            c.held_out = run_all(c.runtime, data.held_out.tower(tower))
            c.result = compare_outputs(held_ref[tower], c.held_out, GATE_TOLERANCE, f"{c.label} vs PyTorch fp32, held-out")
            log("  " + c.result.summary().replace("\n", "\n  "))
        speeds = _time([c.runtime for c in cands], data.held_out.tower(tower))
        for c, s in zip(cands, speeds):
            c.items_per_s = s
        passed = [c for c in cands if c.result.passed]
        # the fastest that passed; none passed: the closest, and every candidate's failure is reported
        best = max(passed, key=lambda c: c.items_per_s) if passed else max(
            cands, key=lambda c: min(o.min_cosine for o in c.result.outputs))
        for c in cands:
            if c is not best:
                _drop(c)
        results.extend([best.result] if passed else [c.result for c in cands])
        chosen[tower] = best
        log(f"[4/5] {precision} {tower} tower: {best.record.engine}" + (
            f" (batch {TIMING_BATCH}: " + ", ".join(f"{c.record.engine} {c.items_per_s:.1f}/s"
                                                    + ("" if c.result.passed else " failed its gate") for c in cands) + ")"
            if len(cands) > 1 else f" ({best.items_per_s:.1f} items/s at batch {TIMING_BATCH})")
            + f" in {time.perf_counter() - t0:.1f} s")
    rankings = _rankings(chosen, model.config, data, held_ref)
    for r in rankings:
        log("  " + r.line())
    try:
        raise_if_gates_failed(results, rankings, what=f"the {precision} CPU engines")
    finally:
        for c in chosen.values():
            c.runtime.close()
    out = {}
    for tower, c in chosen.items():
        summary = {o.name: {"min_cosine": round(o.min_cosine, 7), "max_abs": float(f"{o.max_abs:.3e}")}
                   for o in c.result.outputs}
        details = dict(c.record.details)
        details["gate"] = {"held_out": summary, **{f"top{r.k}_{r.score}": round(r.mean_overlap, 4) for r in rankings},
                           "tolerance": {"max_abs": GATE_TOLERANCE.max_abs, "min_cosine": GATE_TOLERANCE.min_cosine,
                                         "min_topk_agreement": MIN_TOPK_AGREEMENT, "k": RANKING_K},
                           "inputs": data.source}
        details["export_items_per_s_batch8"] = round(c.items_per_s, 2)
        out[tower] = TowerEngine(c.record.precision, c.record.engine, c.record.model_file, c.record.inference_precision,
                                 details)
    return out


def _drop(c: Candidate) -> None:
    if c.runtime is not None:
        c.runtime.close()
    if c.record.precision == "int8":
        c.path.unlink(missing_ok=True)
        c.path.with_suffix(".bin").unlink(missing_ok=True) if c.path.suffix == ".xml" else None


def _int8_candidates(tower, src: Path, spec, ref, data: GateInputs, int8_engine: str, threads, log) -> list[Candidate]:
    val = data.validation.tower(tower)
    val_ref = run_all(ref, val)
    nodes = weight_matmuls(src)
    cands = []
    dyn_path = src.with_name(f"{tower}.int8.onnx")
    scratch = src.with_name(f".{tower}.int8.search.onnx")

    def build_dynamic(fp32_nodes):
        quantize_dynamic_onnx(src, scratch, fp32_nodes)
        return OnnxRuntime(scratch, spec, providers=["CPUExecutionProvider"], intra_op_threads=threads)

    def validate(rt):
        try:
            return _min_token_cosine(val_ref, run_all(rt, val))
        finally:
            rt.close()

    try:
        fp32_nodes, reached = search_fp32_layers(build_dynamic, nodes, validate, log, what=f"int8 {tower}")
    finally:
        scratch.unlink(missing_ok=True)
    quant = {"weights": "int8, per output channel", "layers": "weight MatMuls", "quantized": len(nodes) - len(fp32_nodes),
             "kept_fp32": fp32_nodes, "validation_min_cosine": round(reached, 6)}
    if int8_engine in ("auto", "onnxruntime"):
        quantize_dynamic_onnx(src, dyn_path, fp32_nodes)
        cands.append(Candidate(tower, TowerEngine("int8", "onnxruntime", dyn_path.name, "f32", {
            "quantization": {"method": "onnxruntime dynamic", "activations": "uint8, range per batch", **quant}}), dyn_path))
    if int8_engine == "openvino" or (int8_engine == "auto" and _openvino_and_nncf()):
        # with and without SmoothQuant; the validation split picks one, the gate then judges it
        static_path = src.with_name(f"{tower}.int8.xml")
        tried = {}
        for sq in (True, False):
            path = src.with_name(f".{tower}.int8.{'sq' if sq else 'nosq'}.xml")
            quantize_static_nncf(src, path, fp32_nodes, data.calibration.tower(tower), smooth_quant=sq)
            tried[sq] = (validate(OpenVinoRuntime(path, spec, threads=threads)), path)
        sq = max(tried, key=lambda k: tried[k][0])
        for k, (_, path) in tried.items():
            if k == sq:
                path.rename(static_path)
                path.with_suffix(".bin").rename(static_path.with_suffix(".bin"))
            else:
                path.unlink()
                path.with_suffix(".bin").unlink()
        log(f"      int8 {tower} (nncf static): validation min cos {tried[True][0]:.5f} with SmoothQuant, "
            f"{tried[False][0]:.5f} without; kept the {'first' if sq else 'second'}")
        cands.append(Candidate(tower, TowerEngine("int8", "openvino", static_path.name, "f32", {
            "quantization": {"method": "nncf static (OpenVINO IR)", "activations": "int8, calibrated ranges",
                             "smooth_quant": sq, "validation_min_cosine_static": round(tried[sq][0], 6),
                             "calibration_items": len(next(iter(data.calibration.tower(tower).values()))), **quant}}),
            static_path))
    log(f"      int8 {tower}: {quant['quantized']} of {len(nodes)} weight MatMuls int8"
        + (f", {len(fp32_nodes)} kept fp32" if fp32_nodes else "") + f" (validation min cos {reached:.5f})")
    return cands


def _openvino_and_nncf() -> bool:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _rankings(chosen: Mapping[str, Candidate], cfg, data: GateInputs, held_ref) -> list[RankingResult]:
    """Top-10 agreement of s_T and of the global cosine (images per text query), held out."""
    txt = data.held_out.tower("text")
    cand = {t: chosen[t].held_out for t in TOWERS}
    il = np.full(len(cand["image"]["tokens"]), cfg.vision.num_patches, np.int64)
    s_ref = late_interaction(held_ref["image"]["tokens"], il, held_ref["text"]["tokens"], txt["lengths"]).s_t
    s_c = late_interaction(cand["image"]["tokens"], il, cand["text"]["tokens"], txt["lengths"]).s_t
    g_ref = held_ref["text"]["pooled"] @ held_ref["image"]["pooled"].T
    g_c = cand["text"]["pooled"] @ cand["image"]["pooled"].T
    return [topk_agreement(s_ref.T, s_c.T), topk_agreement(g_ref, g_c, score="global")]
