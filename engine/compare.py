"""The one comparison helper used by every numerics check (PyTorch vs ONNX Runtime vs
TensorRT vs served).

Per output it reports the max and mean absolute error and the per-row cosine similarity
(a row is one vector along the last axis: one token, or one pooled embedding).  Rows whose
reference is all zero (text padding) are excluded from the cosine and must match within
``max_abs`` like every other element.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .errors import ValidationError
from .io_spec import Tolerance


@dataclass(frozen=True)
class OutputComparison:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    min_cosine: float
    mean_cosine: float
    tolerance: Tolerance
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    def line(self) -> str:
        status = "ok  " if self.passed else "FAIL"
        return (f"{status} {self.name:<8} {str(list(self.shape)):<16} max|d|={self.max_abs:.3e} "
                f"mean|d|={self.mean_abs:.3e} min cos={self.min_cosine:.7f} mean cos={self.mean_cosine:.7f} "
                f"(gate: |d|<={self.tolerance.max_abs:g}, cos>={self.tolerance.min_cosine})"
                + ("" if self.passed else "  <- " + "; ".join(self.failures)))


@dataclass
class CompareResult:
    label: str
    outputs: list[OutputComparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def summary(self) -> str:
        return "\n".join([self.label] + ["  " + o.line() for o in self.outputs])

    def raise_if_failed(self) -> "CompareResult":
        if not self.passed:
            bad = [f"{o.name}: {'; '.join(o.failures)}" for o in self.outputs if not o.passed]
            raise ValidationError(f"{self.label}: numerics gate failed: " + " | ".join(bad))
        return self


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                    tolerances: Tolerance | Mapping[str, Tolerance], label: str = "comparison") -> CompareResult:
    """Compare every output of ``reference`` with ``candidate`` under explicit tolerances.

    Collects every failure (missing output, shape mismatch, non-finite values, gates)
    rather than stopping at the first.
    """
    result = CompareResult(label)
    for name, ref in reference.items():
        tol = tolerances if isinstance(tolerances, Tolerance) else tolerances[name]
        ref = np.asarray(ref, dtype=np.float64)
        if name not in candidate:
            result.outputs.append(OutputComparison(name, ref.shape, np.inf, np.inf, -1.0, -1.0, tol, ("missing from candidate",)))
            continue
        cand = np.asarray(candidate[name], dtype=np.float64)
        if cand.shape != ref.shape:
            result.outputs.append(OutputComparison(name, ref.shape, np.inf, np.inf, -1.0, -1.0, tol,
                                                   (f"shape {cand.shape} != reference {ref.shape}",)))
            continue
        failures = []
        if not np.isfinite(cand).all():
            failures.append(f"{int((~np.isfinite(cand)).sum())} non-finite values")
        diff = np.abs(cand - ref)
        max_abs = float(diff.max()) if diff.size else 0.0
        mean_abs = float(diff.mean()) if diff.size else 0.0
        min_cos, mean_cos = _row_cosines(ref, cand)
        if not max_abs <= tol.max_abs:
            failures.append(f"max abs error {max_abs:.3e} > {tol.max_abs:g}")
        if not min_cos >= tol.min_cosine:
            failures.append(f"min cosine {min_cos:.7f} < {tol.min_cosine}")
        result.outputs.append(OutputComparison(name, ref.shape, max_abs, mean_abs, min_cos, mean_cos, tol, tuple(failures)))
    return result


def _row_cosines(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float]:
    d = ref.shape[-1] if ref.ndim else 1
    r = ref.reshape(-1, d)
    c = cand.reshape(-1, d)
    rn = np.linalg.norm(r, axis=1)
    keep = rn > 0
    if not keep.any():
        return 1.0, 1.0
    cn = np.linalg.norm(c[keep], axis=1)
    cos = (r[keep] * c[keep]).sum(1) / (rn[keep] * np.maximum(cn, 1e-300))
    cos = np.where(np.isfinite(cos), cos, -1.0)
    return float(cos.min()), float(cos.mean())
