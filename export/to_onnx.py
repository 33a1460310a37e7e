"""Export each FILIP tower to ONNX and validate it against PyTorch on ONNX Runtime.

Names, dtypes and dynamic axes come from :mod:`filip_engine.io_spec`; every numerics check goes
through :func:`filip_engine.compare.compare_outputs`.  The exporter is torch's ``torch.export``
based one (opset 18+, so LayerNormalization stays a single op), with a dynamic batch and,
for the text tower, a dynamic sequence length.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from filip_engine.compare import CompareResult, compare_outputs
from filip_engine.config import FilipConfig
from filip_engine.errors import ExportError
from filip_engine.io_spec import FP32_TOLERANCE, Dim, Tolerance, TowerSpec, tower_spec
from filip_engine.model import FilipModel, ImageTower, TextTower
from filip_engine.runtime import OnnxRuntime, TorchRuntime

# torch 2.13's exporter implements opset 18 and newer (LayerNormalization, one op since 17,
# stays one op); asking it for 17 makes it try, and fail, to down-convert.
DEFAULT_OPSET = 18
MIN_OPSET = 18
_EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf's 2 GB limit, with margin


def example_inputs(cfg: FilipConfig, spec: TowerSpec, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs of the declared shapes: normalised-pixel-like images, or token rows
    [SOT, random ids..., EOT] with random lengths (the longest row filling ``seq``)."""
    rng = np.random.default_rng(seed)
    if spec.name == "image":
        s = cfg.vision.image_size
        return {"pixel_values": rng.standard_normal((batch, 3, s, s)).astype(np.float32)}
    vocab = cfg.text.vocab_size
    sot, eot = vocab - 2, vocab - 1   # CLIP and DeCLIP both keep SOT/EOT as the last two ids
    lengths = rng.integers(2, seq + 1, size=batch)
    lengths[0] = seq
    ids = np.zeros((batch, seq), dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1] = sot, eot
        ids[i, 1:n - 1] = rng.integers(0, vocab - 2, size=n - 2)
    return {"input_ids": ids, "lengths": lengths.astype(np.int64)}


def export_tower(model: FilipModel, tower: str, path: str | Path, *, opset: int = DEFAULT_OPSET,
                 max_batch: int = 1024) -> Path:
    """Export one tower to ``path``; returns the path.  Raises ExportError with the cause."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is not supported: torch's exporter writes opset {MIN_OPSET} or newer")
    cfg = model.config
    spec = tower_spec(cfg, tower, max_batch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = (ImageTower if tower == "image" else TextTower)(model.eval())
    example = example_inputs(cfg, spec, batch=2, seq=min(cfg.text.context_length, 7), seed=0)
    args = tuple(torch.from_numpy(example[n]) for n in spec.input_names)
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = {
        t.name: {ax: dims.setdefault(d.name, torch.export.Dim(d.name, min=d.min, max=d.max))
                 for ax, d in enumerate(t.shape) if isinstance(d, Dim)}
        for t in spec.inputs
    }
    n_bytes = sum(p.numel() * 4 for p in module.parameters())
    log = io.StringIO()
    try:
        # The exporter narrates its progress on stdout; keep it for the error message only.
        with contextlib.redirect_stdout(log), warnings.catch_warnings(), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=spec.input_names,
                              output_names=spec.output_names, opset_version=opset, dynamo=True,
                              dynamic_shapes=dynamic_shapes, external_data=n_bytes > _EXTERNAL_DATA_BYTES)
        proto = onnx.load(str(path), load_external_data=False)
        written = {o.domain: o.version for o in proto.opset_import}.get("", 0)
        if written < MIN_OPSET:
            raise ExportError(f"the exporter wrote opset {written}, expected >= {MIN_OPSET}")
        _stamp_metadata(proto, cfg, tower, written)
        onnx.save(proto, str(path))
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise ExportError(f"exporting the {tower} tower to {path} failed: {type(e).__name__}: {e}\n{log.getvalue()[-2000:]}") from e
    return path


@contextlib.contextmanager
def _quiet_torch_logs():
    """The exporter logs notes (e.g. torchvision ops it skips) at WARNING; errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _stamp_metadata(proto: onnx.ModelProto, cfg: FilipConfig, tower: str, opset: int) -> None:
    """The artifact carries its configuration: the model config, tower and versions."""
    meta = {
        "filip.tower": tower,
        "filip.config": json.dumps(cfg.to_dict(), sort_keys=True),
        "filip.opset": str(opset),
        "filip.torch_version": torch.__version__,
        "filip.onnx_version": onnx.__version__,
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)


def validate_tower(model: FilipModel, onnx_path: str | Path, tower: str, *,
                   batch_sizes=(1, 2, 5), seq_lens: tuple[int, ...] | None = None,
                   tolerance: Tolerance = FP32_TOLERANCE, seed: int = 0,
                   intra_op_threads: int | None = None) -> list[CompareResult]:
    """Run PyTorch and ONNX Runtime on the same random inputs at several batch sizes (and
    text lengths); returns one CompareResult per case.  Does not raise on a failed gate:
    call ``raise_if_failed()`` on each result (the CLI prints all of them first)."""
    cfg = model.config
    spec = tower_spec(cfg, tower)
    ctx = cfg.text.context_length
    if seq_lens is None:
        seq_lens = tuple(sorted({2, min(16, ctx), ctx})) if tower == "text" else (0,)
    results = []
    with TorchRuntime(model, spec) as ref, OnnxRuntime(onnx_path, spec, providers=["CPUExecutionProvider"],
                                                       intra_op_threads=intra_op_threads) as cand:
        for b in batch_sizes:
            for s in seq_lens:
                feeds = example_inputs(cfg, spec, b, s, seed + 1000 * b + s)
                label = f"{tower} batch={b}" + (f" seq={s}" if tower == "text" else "")
                results.append(compare_outputs(ref.infer(feeds), cand.infer(feeds), tolerance, label))
    return results
