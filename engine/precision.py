"""Which engine runs a tower on the CPU, at which precision: the record an export writes
into the tower's manifest and its Triton config, and the one place that opens it.

- ``fp32``: the exported ``<tower>.onnx`` on ONNX Runtime (exact: gated at cos >= 0.99999).
- ``bf16``: the same ``<tower>.onnx`` compiled by OpenVINO with bf16 inference precision
  (AVX512_BF16 / AMX matrix units); refused on a CPU that OpenVINO says lacks BF16.
- ``int8``: ONNX Runtime dynamic quantisation (``<tower>.int8.onnx``: int8 weights per output
  channel, uint8 activations with a range per batch) or NNCF's static quantisation run by
  OpenVINO (``<tower>.int8.xml`` + ``.bin``, calibrated activation ranges), whichever passed
  its gate and ran faster at export (``filip_export.cpu_precision``).  Layers the gate showed
  too sensitive stay fp32.

A reduced-precision tower is gated like a TensorRT fp16 engine: per-token cosine >= 0.999
against PyTorch fp32 and top-10 ranking agreement >= 0.9 on held-out inputs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .errors import ExportError, FilipError

CPU_PRECISIONS = ("fp32", "bf16", "int8")
ENGINES = ("onnxruntime", "openvino")
# Triton config parameters of filip_text / filip_image that carry the record (the model
# metadata a client reads with model_config())
PARAMS = ("precision", "engine", "model_file", "inference_precision")
INSTALL_HINT = "pip install 'filip-engine[cpu]' (OpenVINO and NNCF)"


@dataclass(frozen=True)
class TowerEngine:
    """How one tower is served on the CPU.  ``details`` (quantisation scope, gate figures,
    export-time speed) goes into the manifest only."""
    precision: str = "fp32"
    engine: str = "onnxruntime"
    model_file: str = ""                  # in the tower's version folder; "" = <tower>.onnx
    inference_precision: str = "f32"      # OpenVINO's INFERENCE_PRECISION_HINT ("f32" | "bf16")
    details: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.precision not in CPU_PRECISIONS:
            raise FilipError(f"unknown CPU precision {self.precision!r}; expected one of {', '.join(CPU_PRECISIONS)}")
        if self.engine not in ENGINES:
            raise FilipError(f"unknown CPU engine {self.engine!r}; expected one of {', '.join(ENGINES)}")
        if self.inference_precision not in ("f32", "bf16"):
            raise FilipError(f"unknown inference precision {self.inference_precision!r}; expected f32 or bf16")

    def file_for(self, tower: str) -> str:
        return self.model_file or f"{tower}.onnx"

    def to_params(self, tower: str) -> dict[str, str]:
        return {"precision": self.precision, "engine": self.engine, "model_file": self.file_for(tower),
                "inference_precision": self.inference_precision}

    def to_dict(self, tower: str) -> dict:
        return {**self.to_params(tower), **({"details": self.details} if self.details else {})}

    @classmethod
    def from_mapping(cls, d: Mapping | None) -> "TowerEngine":
        """From a manifest's ``engine`` entry or a config's parameters (absent: fp32 ONNX Runtime,
        what every repository written before reduced precision existed serves)."""
        d = d or {}
        return cls(precision=d.get("precision") or "fp32", engine=d.get("engine") or "onnxruntime",
                   model_file=d.get("model_file") or "", inference_precision=d.get("inference_precision") or "f32",
                   details=dict(d.get("details") or {}))


def openvino_capabilities() -> tuple[str, ...]:
    """OpenVINO's own report of this CPU's optimisation capabilities (e.g. BF16, INT8); raises
    FilipError when OpenVINO is not installed."""
    try:
        import openvino as ov
    except ImportError as e:
        raise FilipError(f"OpenVINO is not installed ({e}); {INSTALL_HINT}") from e
    return tuple(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def check_cpu_supports(precision: str) -> None:
    """Refuse, in one sentence, a precision this CPU cannot run fast: bf16 needs the bf16
    instructions (AVX512_BF16 or AMX-BF16), as OpenVINO reports them.  int8 runs everywhere
    (ONNX Runtime's integer kernels; VNNI makes them fast)."""
    if precision == "bf16" and "BF16" not in openvino_capabilities():
        raise FilipError("--precision bf16 needs a CPU with bf16 instructions (AVX512_BF16 or AMX), and OpenVINO "
                         f"reports none on this one ({cpu_model()}); use --precision int8 or fp32")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def open_cpu_runtime(version_dir: str | Path, tower: str, spec, record: TowerEngine, *, threads: int | None = None):
    """The runtime serving ``tower`` from its version folder as ``record`` says.  A
    reduced-precision ONNX Runtime model runs on the CPU provider, as it was gated (fp32 keeps
    ONNX Runtime's default providers)."""
    from .runtime import OnnxRuntime, OpenVinoRuntime
    path = Path(version_dir) / record.file_for(tower)
    if not path.is_file():
        raise ExportError(f"{path} not found: the repository's {tower} engine ({record.precision}, {record.engine}) "
                          "names a file that is not there; re-export the repository")
    if record.engine == "openvino":
        return OpenVinoRuntime(path, spec, inference_precision=record.inference_precision, threads=threads)
    providers = None if record.precision == "fp32" else ["CPUExecutionProvider"]
    return OnnxRuntime(path, spec, providers=providers, intra_op_threads=threads)


def threads_per_instance(threads: int, instances: int, engine: str = "onnxruntime") -> int:
    """Encoder threads of one served instance: ``threads`` when set; else for ONNX Runtime the
    usable cores divided among the instances (at least one each: its thread pool spins while
    it waits, so instances that oversubscribe the cores slow each other down), for OpenVINO
    every usable core (its threads sleep when idle, and an instance that decodes images while
    another computes keeps the cores busy).  docs/BENCHMARKS.md, "Served instances x encoder
    threads", has the measurements."""
    if threads > 0:
        return threads
    if engine == "openvino":
        return default_threads()
    return max(1, default_threads() // max(1, instances))


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
