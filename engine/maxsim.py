"""FILIP's MaxSim on ONNX Runtime: the one CPU kernel behind pair scoring and gallery search.

For image tokens x_1..x_n1 and text tokens y_1..y_n2 (each item's real tokens only):

    s_I(i, j) = (1/n1) * sum_k max_{r<n2} <x_k, y_r>     image-to-text (best word per patch)
    s_T(i, j) = (1/n2) * sum_r max_{k<n1} <x_k, y_r>     text-to-image (best patch per word)

Two entry points share one graph builder (:func:`_graph`) and one session cache
(:func:`_session`):

- :func:`pair_scores`: both directions for every (image, text) pair of one chunk of padded
  items ([ci, T1, D] x [cj, T2, D] -> two [ci, cj]), with real-token masks; what
  :func:`filip_engine.interaction.late_interaction` runs on numpy inputs.
- :class:`MaxSimKernel`: s_T only, for stored gallery tokens (fp16, or int8 with one fp32
  scale per token; every patch real) against queries given as their real tokens stacked and
  an averaging matrix (:class:`Queries`), so that no padded query token is ever computed;
  what engine/search.py streams a gallery through.

Each graph is Cast -> MatMul -> ReduceMax -> mean.  Stored fp16 (or fp64, or int8) tokens are
cast to fp32 inside the graph, one chunk at a time, so a gallery is never upcast as a whole;
products and sums accumulate in fp32.  Padding is masked with ``Where`` on the similarity
block (never by adding -inf: NaN + -inf is NaN), so whatever padded tokens hold (zeros,
garbage, inf, NaN) cannot reach a maximum or a mean.  Masks come from lengths only.

Why hand-written: no library computes this.  ColBERT-style MaxSim scorers (and vector
databases' multi-vector search) do one direction only, sum instead of averaging, and mask by
token ids or zero vectors; faiss scores single vectors.  FILIP needs both directions, means
over each item's own token count, and masks from lengths (token id 0 is the real BPE token
"!").  Why ONNX Runtime: its MLAS GEMM handles the narrow shape this is ([c*P, D] x [D, L],
L ~ 16 for one caption) better than the BLAS behind torch on CPU, and the cast, the
reductions and the mean run in its thread pool on the cache-resident chunk (the torch path
of engine/interaction.py remains for tensors, e.g. on a GPU; docs/BENCHMARKS.md compares).

Sessions are cached per graph variant (input dtypes, which masks exist, the gallery's static
token count and dimension; at most 36 pair variants); the pair graphs' shapes are all
symbolic, so one session serves every chunk size and padded width.  ONNX Runtime's intra-op
pool uses every core unless told otherwise.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import InvalidInputError

# Element types the graphs accept (numpy dtype name -> ONNX TensorProto name).
_ONNX_TYPES = {"float16": "FLOAT16", "float32": "FLOAT", "float64": "DOUBLE", "int8": "INT8"}


class GraphKey(NamedTuple):
    """One graph variant.  ``y`` None: the gallery form (stacked query tokens QT [D, L] and
    averaging matrix AVG [L, nq], s_T only, every patch real); else the pair form with padded
    text tokens of that dtype (s_I and s_T, masks as flagged)."""
    x: str                        # image token dtype: float16 / float32 / float64 / int8
    y: str | None = None          # text token dtype (pair form), or None (gallery form)
    scaled: bool = False          # int8 tokens with per-token fp32 scales S [c, P, 1]
    mask_x: bool = False          # XV [ci, T1] bool: some patches are padding
    mask_y: bool = False          # YV [cj, T2] bool: some text tokens are padding
    tokens: int | str = "t1"      # patches per image: static for a gallery, else symbolic
    dim: int | str = "d"          # token dimension: likewise


def _graph(k: GraphKey) -> bytes:
    """The ONNX graph of one variant (opset 18), serialised."""
    from onnx import TensorProto as TP
    from onnx import helper

    def node(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    def const(name, dtype, values):  # an initializer, added on first use
        if name not in {t.name for t in inits}:
            inits.append(helper.make_tensor(name, dtype, [len(values)], values))
        return name

    def axes(*a):
        return const("ax" + "".join(map(str, a)), TP.INT64, list(a))

    def neg():
        return const("neg", TP.FLOAT, [float("-inf")])

    def zero():
        return const("zero", TP.FLOAT, [0.0])

    def fp32(name, dtype):          # cast per chunk, inside the graph
        return name if dtype == "float32" else node("Cast", [name], name + "f", to=TP.FLOAT)

    nodes, inits = [], []
    x_type = getattr(TP, _ONNX_TYPES[k.x])
    inputs = [helper.make_tensor_value_info("X", x_type, ["ci", k.tokens, k.dim])]
    xf = fp32("X", k.x)                                                    # [ci, T1, D] fp32
    if k.y is None:                                                        # --- gallery form
        inputs += [helper.make_tensor_value_info("QT", TP.FLOAT, [k.dim, "L"]),
                   helper.make_tensor_value_info("AVG", TP.FLOAT, ["L", "nq"])]
        sim = node("MatMul", [xf, "QT"], "Sim")                            # [c, P, L]
        if k.scaled:
            # <scale * q, y> = scale * <q, y>: scaling the [c, P, L] products is D/L times
            # cheaper than dequantising the [c, P, D] tokens first.
            inputs.append(helper.make_tensor_value_info("S", TP.FLOAT, ["ci", k.tokens, 1]))
            sim = node("Mul", [sim, "S"], "SimS")
        best = node("ReduceMax", [sim, axes(1)], "Best", keepdims=0)      # [c, L]
        node("MatMul", [best, "AVG"], "S_T")                               # [c, nq]
        outputs = [helper.make_tensor_value_info("S_T", TP.FLOAT, ["ci", "nq"])]
    else:                                                                  # --- pair form
        # Y2 [cj*T2, D]: the chunk's text tokens, rows flattened by the caller (free in numpy),
        # and S4 = (0, 0, cj, T2), the block's shape; N1 [ci, 1] / N2 [1, cj] are the lengths,
        # needed only where a mask is.  Feeding these shaped costs nothing and saves graph ops.
        inputs += [helper.make_tensor_value_info("Y2", getattr(TP, _ONNX_TYPES[k.y]), ["cjt2", k.dim]),
                   helper.make_tensor_value_info("S4", TP.INT64, [4])]
        if k.mask_x:
            inputs += [helper.make_tensor_value_info("XV", TP.BOOL, ["ci", k.tokens]),
                       helper.make_tensor_value_info("N1", TP.FLOAT, ["ci", 1])]
        if k.mask_y:
            inputs += [helper.make_tensor_value_info("YV", TP.BOOL, ["cj", "t2"]),
                       helper.make_tensor_value_info("N2", TP.FLOAT, [1, "cj"])]
        yt = node("Transpose", [fp32("Y2", k.y)], "YT")                   # [D, cj*T2] (fused into the GEMM)
        sim = node("Reshape", [node("MatMul", [xf, yt], "Sim3"), "S4"], "Sim")   # [ci, T1, cj, T2]
        # s_I first, so that its masked copy of the block is freed before s_T's is made.
        if k.mask_y:                                                       # padded words never win
            sim_y = node("Where", [node("Unsqueeze", ["YV", axes(0, 1)], "yv4"), sim, neg()], "SimY")
        best_r = node("ReduceMax", [sim_y if k.mask_y else sim, axes(3)], "BestR", keepdims=0)   # [ci, T1, cj]
        if k.mask_x:                                                       # padded patches add nothing
            best_r = node("Where", [node("Unsqueeze", ["XV", axes(2)], "xv3"), best_r, zero()], "BestR0")
            node("Div", [node("ReduceSum", [best_r, axes(1)], "SumR", keepdims=0), "N1"], "S_I")
            sim = node("Where", [node("Unsqueeze", ["XV", axes(2, 3)], "xv4"), sim, neg()], "SimX")
        else:
            node("ReduceMean", [best_r, axes(1)], "S_I", keepdims=0)       # [ci, cj]
        best_k = node("ReduceMax", [sim, axes(1)], "BestK", keepdims=0)    # [ci, cj, T2]
        if k.mask_y:                                                       # padded words add nothing
            best_k = node("Where", [node("Unsqueeze", ["YV", axes(0)], "yv3"), best_k, zero()], "BestK0")
            node("Div", [node("ReduceSum", [best_k, axes(2)], "SumK", keepdims=0), "N2"], "S_T")
        else:
            node("ReduceMean", [best_k, axes(2)], "S_T", keepdims=0)       # [ci, cj]
        outputs = [helper.make_tensor_value_info(n, TP.FLOAT, ["ci", "cj"]) for n in ("S_I", "S_T")]
    graph = helper.make_graph(nodes, "filip_maxsim", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


_SESSIONS: dict[tuple[GraphKey, int], object] = {}
_LOCK = threading.Lock()


def _session(key: GraphKey, threads: int | None = None):
    """The ONNX Runtime session of ``key`` (built once per process and thread count)."""
    threads = threads or (os.cpu_count() or 1)
    with _LOCK:
        sess = _SESSIONS.get((key, threads))
        if sess is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = _SESSIONS[(key, threads)] = ort.InferenceSession(
                _graph(key), sess_options=opts, providers=["CPUExecutionProvider"])
    return sess


def _feedable(a: np.ndarray) -> np.ndarray:
    """``a`` as ONNX Runtime reads it: C-contiguous, native byte order (a no-op for a slice
    of a contiguous gallery)."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))


# --- pair scoring ---------------------------------------------------------------------------------
def pair_scores(x: np.ndarray, x_valid: np.ndarray | None, n1: np.ndarray, y: np.ndarray,
                y_valid: np.ndarray | None, n2: np.ndarray, *, threads: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """s_I and s_T of one chunk -> two fp32 [ci, cj].

    x [ci, T1, D] and y [cj, T2, D]: fp16, fp32 or fp64, padded; x_valid [ci, T1] / y_valid
    [cj, T2] bool real-token masks (None: every token is real); n1 [ci] / n2 [cj] the lengths
    (what the masks count).  Inputs are validated by the caller and never written to."""
    cj, t2, d = y.shape
    key = GraphKey(x.dtype.name, y.dtype.name, mask_x=x_valid is not None, mask_y=y_valid is not None)
    feeds = {"X": _feedable(x), "Y2": _feedable(y).reshape(cj * t2, d), "S4": np.array([0, 0, cj, t2], np.int64)}
    if x_valid is not None:
        feeds["XV"] = np.ascontiguousarray(x_valid, bool)
        feeds["N1"] = np.asarray(n1, np.float32).reshape(-1, 1)
    if y_valid is not None:
        feeds["YV"] = np.ascontiguousarray(y_valid, bool)
        feeds["N2"] = np.asarray(n2, np.float32).reshape(1, -1)
    s_i, s_t = _session(key, threads).run(["S_I", "S_T"], feeds)
    return s_i, s_t


# --- gallery search -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Queries:
    """Queries as the gallery kernel wants them: the real tokens of all queries stacked
    (transposed), and the averaging matrix that turns per-token maxima into each query's s_T."""
    tokens_t: np.ndarray          # [D, L] fp32, L = sum of lengths (only real tokens)
    average: np.ndarray           # [L, nq] fp32, 1/n2 where token l belongs to query q
    mean: np.ndarray              # [nq, D] fp32 mean of each query's real tokens (first stage)
    n: int

    @property
    def dim(self) -> int:
        return self.tokens_t.shape[0]

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, lengths: np.ndarray) -> "Queries":
        t = np.asarray(tokens)
        lengths = np.asarray(lengths).reshape(-1)
        problems = []
        if t.ndim != 3 or 0 in t.shape or t.dtype.kind != "f":
            problems.append(f"query tokens must be a float [nq, T, D] array, got {t.dtype} {list(t.shape)}")
        elif lengths.shape != (t.shape[0],) or lengths.dtype.kind not in "iu":
            problems.append(f"query lengths must be {t.shape[0]} integers, got {lengths.dtype} {list(lengths.shape)}")
        elif lengths.min() < 1 or lengths.max() > t.shape[1]:
            problems.append(f"query lengths must lie in [1, {t.shape[1]}], got {lengths.min()}..{lengths.max()}")
        if problems:
            raise InvalidInputError("; ".join(problems))
        rows = [np.asarray(t[q, :n], np.float32) for q, n in enumerate(lengths)]
        if not all(np.isfinite(r).all() for r in rows):
            raise InvalidInputError("query tokens contain NaN or Inf")
        stacked = np.concatenate(rows)
        owner = np.repeat(np.arange(len(lengths)), lengths)
        avg = np.zeros((len(stacked), len(lengths)), np.float32)
        avg[np.arange(len(stacked)), owner] = 1.0 / lengths[owner]
        mean = np.stack([r.mean(axis=0) for r in rows]).astype(np.float32)
        return cls(np.ascontiguousarray(stacked.T), avg, mean, len(lengths))

    def one(self, i: int) -> "Queries":
        """Query ``i`` alone."""
        mine = self.average[:, i] > 0
        return Queries(np.ascontiguousarray(self.tokens_t[:, mine]), self.average[mine][:, i:i + 1],
                       self.mean[i:i + 1], 1)


class MaxSimKernel:
    """s_T of stored gallery tokens (fp16, or int8 with per-token scales; every patch real)
    for a batch of :class:`Queries`: Cast(X) @ QT -> (x scale) -> max over patches -> @ AVG.

    The token count and dimension are static in the graph (one gallery has one shape); the
    chunk size and the queries are not."""

    def __init__(self, token_dtype: str, tokens: int, dim: int, threads: int | None = None):
        if token_dtype not in ("float16", "int8"):
            raise InvalidInputError(f"gallery tokens must be float16 or int8, got {token_dtype!r}")
        self.int8 = token_dtype == "int8"
        self.session = _session(GraphKey(token_dtype, scaled=self.int8, tokens=int(tokens), dim=int(dim)), threads)

    def __call__(self, tokens: np.ndarray, scales: np.ndarray | None, q: Queries) -> np.ndarray:
        """tokens [c, P, D] as stored (+ scales [c, P] for int8) -> s_T [nq, c]."""
        feeds = {"X": tokens, "QT": q.tokens_t, "AVG": q.average}
        if self.int8:
            feeds["S"] = np.ascontiguousarray(scales)[:, :, None]
        return self.session.run(["S_T"], feeds)[0].T


class TorchMaxSimKernel:
    """:class:`MaxSimKernel` on torch, for a GPU (or the CPU, which the tests use to run the
    same code path): stored tokens (fp16, or int8 with per-token scales) are cast to fp32 on
    the device, one fp32 GEMM against all queries' real tokens (TF32 off: fp32 accumulation
    as on the CPU), max over patches, the per-query mean as a product with the averaging
    matrix.  Same call as :class:`MaxSimKernel`: ``(tokens, scales, q) -> s_T [nq, c]``.

    Residency: with ``resident_bytes`` > 0, chunks called with a ``key`` (the exact scan's
    (segment, start) of a stored chunk) stay on the device, as stored, until that many bytes
    are held; later scans then read the gallery from device memory instead of the host.
    Re-rank gathers (no key) are uploaded per call."""

    def __init__(self, token_dtype: str, tokens: int, dim: int, device: str = "cuda", resident_bytes: int = 0):
        import torch
        if token_dtype not in ("float16", "int8"):
            raise InvalidInputError(f"gallery tokens must be float16 or int8, got {token_dtype!r}")
        self.torch, self.device = torch, torch.device(device)
        self.int8 = token_dtype == "int8"
        self.resident_bytes, self.held_bytes = int(resident_bytes), 0
        self._resident: dict = {}
        self.name = f"torch-{self.device.type}"

    def _upload(self, tokens: np.ndarray, scales: np.ndarray | None, key):
        if key is not None and key in self._resident:
            return self._resident[key]
        t = self.torch
        x = t.from_numpy(np.ascontiguousarray(tokens)).to(self.device)
        s = None if scales is None else t.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)).to(self.device)
        nbytes = tokens.nbytes + (0 if scales is None else scales.size * 4)
        if key is not None and self.held_bytes + nbytes <= self.resident_bytes:
            self._resident[key] = (x, s)
            self.held_bytes += nbytes
        return x, s

    def __call__(self, tokens: np.ndarray, scales: np.ndarray | None, q: Queries, *, key=None) -> np.ndarray:
        t = self.torch
        x, s = self._upload(tokens, scales if self.int8 else None, key)
        qt = t.from_numpy(q.tokens_t).to(self.device)                   # [D, L]
        avg = t.from_numpy(q.average).to(self.device)                    # [L, nq]
        prev = t.backends.cuda.matmul.allow_tf32
        t.backends.cuda.matmul.allow_tf32 = False
        try:
            with t.inference_mode():
                sims = t.matmul(x.float(), qt)                           # [c, P, L]
                if s is not None:
                    sims.mul_(s.reshape(s.shape[0], s.shape[1], 1))
                out = sims.amax(dim=1) @ avg                             # [c, nq]
        finally:
            t.backends.cuda.matmul.allow_tf32 = prev
        return out.T.float().cpu().numpy()

    def release(self) -> None:
        self._resident.clear()
        self.held_bytes = 0
