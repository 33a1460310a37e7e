"""Each tower's I/O, declared once.

The ONNX input/output names and dynamic axes, the runtimes' input checks, the numerics
tolerances and (in later stages) TensorRT profiles and Triton ``config.pbtxt`` are all
derived from these declarations.  A dimension is an int (fixed) or a ``Dim`` (dynamic,
with its allowed range).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from .config import FilipConfig
from .errors import InvalidInputError


@dataclass(frozen=True)
class Dim:
    name: str
    min: int
    max: int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                          # numpy dtype name: "float32", "int64"
    shape: tuple[int | Dim, ...]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d.name for i, d in enumerate(self.shape) if isinstance(d, Dim)}


@dataclass(frozen=True)
class Tolerance:
    """A numerics gate: every compared row must reach ``min_cosine`` and every element
    must be within ``max_abs`` of the reference."""
    max_abs: float
    min_cosine: float


# fp32 gates of the ONNX export: per-token cosine and max abs error.
FP32_TOLERANCE = Tolerance(max_abs=1e-4, min_cosine=0.99999)


@dataclass(frozen=True)
class TowerSpec:
    name: str                           # "image" | "text"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # value-level checks beyond dtype/shape (e.g. lengths within [2, seq]); raises InvalidInputError
    value_check: Callable[[Mapping[str, np.ndarray]], None] | None = None

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs if t.dynamic_axes()}

    def check_inputs(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Names, dtypes, ranks, fixed sizes, dynamic ranges and shared dims; then values."""
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise InvalidInputError(f"{self.name} tower expects inputs {self.input_names}; missing {missing}, unexpected {extra}")
        bound: dict[str, int] = {}
        for spec in self.inputs:
            a = feeds[spec.name]
            if not isinstance(a, np.ndarray):
                raise InvalidInputError(f"{self.name}.{spec.name}: expected a numpy array, got {type(a).__name__}")
            if a.dtype != np.dtype(spec.dtype):
                raise InvalidInputError(f"{self.name}.{spec.name}: dtype {a.dtype}, expected {spec.dtype}")
            if a.ndim != len(spec.shape):
                raise InvalidInputError(f"{self.name}.{spec.name}: shape {a.shape} has {a.ndim} dims, expected {len(spec.shape)} {_fmt(spec.shape)}")
            for axis, (size, dim) in enumerate(zip(a.shape, spec.shape)):
                if isinstance(dim, int):
                    if size != dim:
                        raise InvalidInputError(f"{self.name}.{spec.name}: shape {a.shape}, expected {_fmt(spec.shape)} (axis {axis} must be {dim})")
                    continue
                if not dim.min <= size <= dim.max:
                    raise InvalidInputError(f"{self.name}.{spec.name}: axis {axis} ({dim.name}) is {size}, allowed {dim.min}..{dim.max}")
                if bound.setdefault(dim.name, size) != size:
                    raise InvalidInputError(f"{self.name}: '{dim.name}' is {bound[dim.name]} in one input and {size} in {spec.name}")
        if self.value_check is not None:
            self.value_check(feeds)


def _fmt(shape) -> str:
    return "[" + ", ".join(d.name if isinstance(d, Dim) else str(d) for d in shape) + "]"


def image_spec(cfg: FilipConfig, max_batch: int = 1024) -> TowerSpec:
    b = Dim("batch", 1, max_batch)
    s = cfg.vision.image_size
    return TowerSpec(
        name="image",
        inputs=(TensorSpec("pixel_values", "float32", (b, 3, s, s)),),
        outputs=(TensorSpec("tokens", "float32", (b, cfg.vision.num_patches, cfg.token_dim)),
                 TensorSpec("pooled", "float32", (b, cfg.embed_dim))),
    )


def text_spec(cfg: FilipConfig, max_batch: int = 1024) -> TowerSpec:
    b = Dim("batch", 1, max_batch)
    seq = Dim("seq", 2, cfg.text.context_length)
    vocab = cfg.text.vocab_size

    def check(feeds: Mapping[str, np.ndarray]) -> None:
        ids, lengths = feeds["input_ids"], feeds["lengths"]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise InvalidInputError(f"text.input_ids: ids must lie in [0, {vocab}), got [{ids.min()}, {ids.max()}]")
        if lengths.size and (lengths.min() < 2 or lengths.max() > ids.shape[1]):
            raise InvalidInputError(f"text.lengths: every length must lie in [2, {ids.shape[1]}] (SOT..EOT within the sequence), got [{lengths.min()}, {lengths.max()}]")

    return TowerSpec(
        name="text",
        inputs=(TensorSpec("input_ids", "int64", (b, seq)),
                TensorSpec("lengths", "int64", (b,))),
        outputs=(TensorSpec("tokens", "float32", (b, seq, cfg.token_dim)),
                 TensorSpec("pooled", "float32", (b, cfg.embed_dim))),
        value_check=check,
    )


def tower_spec(cfg: FilipConfig, tower: str, max_batch: int = 1024) -> TowerSpec:
    if tower == "image":
        return image_spec(cfg, max_batch)
    if tower == "text":
        return text_spec(cfg, max_batch)
    raise ValueError(f"unknown tower {tower!r}")


# --- Triton's view of a tower tensor -------------------------------------------------------------
# A tensorrt_plan model declares each tensor without its batch axis.  A tensor that is only
# [batch] in the engine (the text tower's ``lengths``) has no dims left: Triton's documented
# form is ``dims: [1]`` with ``reshape: { shape: [] }``, and Triton then expects requests to
# send it as [batch, 1] (the declared dims), reshaping it to [batch] for the engine.  The config
# generator (filip_export.triton_repo) and the BLS caller (filip_engine.runtime.TritonModelRuntime)
# both use these two functions, so what is sent is what is declared.
def triton_dims(t: TensorSpec) -> tuple[list[int], list[int] | None]:
    """(dims, reshape) of ``t`` in a batched Triton config: dims without the batch axis, -1
    for a dynamic one; reshape is ``[]`` for a [batch]-only tensor (dims [1]) and None otherwise."""
    dims = [d if isinstance(d, int) else -1 for d in t.shape[1:]]
    if dims:
        return dims, None
    return [1], []


def as_triton_input(t: TensorSpec, a: np.ndarray) -> np.ndarray:
    """``a`` (shaped as the tower takes it, [batch, ...]) shaped as the Triton config declares
    it: [batch] -> [batch, 1] where :func:`triton_dims` declares dims [1] reshaped to []."""
    a = np.ascontiguousarray(a)
    _, reshape = triton_dims(t)
    if reshape is not None and a.ndim == 1:
        return a.reshape(-1, 1)
    return a


def from_triton_output(t: TensorSpec, a: np.ndarray) -> np.ndarray:
    """The inverse of :func:`as_triton_input` for an output (a [batch, 1] answer of a
    [batch]-only tensor back to [batch])."""
    _, reshape = triton_dims(t)
    if reshape is not None and a.ndim == 2 and a.shape[1] == 1:
        return a.reshape(-1)
    return a
