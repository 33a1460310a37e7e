"""Interchangeable runtimes for one tower: the same ``infer(dict) -> dict`` everywhere.

- :class:`TorchRuntime`: the PyTorch model (the reference), CPU or CUDA.
- :class:`OnnxRuntime`: an exported ``.onnx`` on ONNX Runtime (CPU, or CUDA where present).

Inputs are checked against the tower's :class:`~engine.io_spec.TowerSpec` by default, so a
wrong dtype or shape raises :class:`~engine.errors.InvalidInputError` naming the input
instead of a backend error.  Each runtime is a context manager that releases its resources.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .errors import ExportError
from .io_spec import TowerSpec
from .model import FilipModel


class Runtime:
    spec: TowerSpec
    name: str = "runtime"

    def infer(self, feeds: Mapping[str, np.ndarray], *, check: bool = True) -> dict[str, np.ndarray]:
        if check:
            self.spec.check_inputs(feeds)
        return self._infer(feeds)

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TorchRuntime(Runtime):
    def __init__(self, model: FilipModel, spec: TowerSpec, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.spec = spec
        self.device = torch.device(device)
        self.name = f"torch-{self.device.type}"

    @torch.inference_mode()
    def _infer(self, feeds):
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.spec.input_names]
        fn = self.model.encode_image if self.spec.name == "image" else self.model.encode_text
        outs = fn(*args)
        return {n: o.float().cpu().numpy() for n, o in zip(self.spec.output_names, outs)}

    def close(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class OnnxRuntime(Runtime):
    def __init__(self, path: str | Path, spec: TowerSpec, *, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ExportError(f"ONNX model not found: {path}")
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = intra_op_threads or (os.cpu_count() or 1)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
        except Exception as e:
            raise ExportError(f"ONNX Runtime cannot load {path}: {e}") from e
        self.spec = spec
        self.name = "onnxruntime-" + self.session.get_providers()[0].replace("ExecutionProvider", "").lower()
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if got_in != spec.input_names or got_out != spec.output_names:
            raise ExportError(f"{path}: graph I/O {got_in} -> {got_out} does not match the {spec.name} "
                              f"tower's declared {spec.input_names} -> {spec.output_names}")

    def _infer(self, feeds):
        outs = self.session.run(self.spec.output_names, {n: feeds[n] for n in self.spec.input_names})
        return dict(zip(self.spec.output_names, outs))

    def close(self) -> None:
        self.session = None
