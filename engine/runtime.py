"""Interchangeable runtimes for one tower: the same ``infer(dict) -> dict`` everywhere.

- :class:`TorchRuntime`: the PyTorch model (the reference), CPU or CUDA.
- :class:`OnnxRuntime`: an exported ``.onnx`` on ONNX Runtime (CPU, or CUDA where present).
- :class:`TensorRTRuntime`: a TensorRT plan (TensorRT 10+ API), CUDA only; ``tensorrt`` is
  imported when one is created, so importing this module never needs it.
- :class:`TritonModelRuntime`: another model of the same Triton server, called from a Python
  backend model (BLS), e.g. a front end forwarding to ``filip_text_trt``.

Inputs are checked against the tower's :class:`~filip_engine.io_spec.TowerSpec` by default, so a
wrong dtype or shape raises :class:`~filip_engine.errors.InvalidInputError` naming the input
instead of a backend error.  Each runtime is a context manager that releases its resources.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from typing import TYPE_CHECKING

import numpy as np

from .errors import ExportError
from .io_spec import TowerSpec

if TYPE_CHECKING:     # torch is imported only by the runtimes that use it (a served ONNX Runtime model never does)
    import torch

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
    def __init__(self, model: "FilipModel", spec: TowerSpec, device: "str | torch.device" = "cpu"):
        import torch

        if device == "auto":   # CUDA when present (the validation references stay on the CPU default)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.eval().to(device)
        self.spec = spec
        self.device = torch.device(device)
        self.name = f"torch-{self.device.type}"

    def _infer(self, feeds):
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.spec.input_names]
        fn = self.model.encode_image if self.spec.name == "image" else self.model.encode_text
        with torch.inference_mode():
            outs = fn(*args)
        return {n: o.float().cpu().numpy() for n, o in zip(self.spec.output_names, outs)}

    def close(self) -> None:
        if self.device.type == "cuda":
            import torch
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


# TensorRT DataType names -> torch dtype names (looked up by name, so no tensorrt import is needed here)
_TRT_TO_TORCH = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32",
                 "INT64": "int64", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


class TensorRTRuntime(Runtime):
    """A serialized TensorRT engine (``.plan``) on one CUDA device, TensorRT 10+ API: named I/O
    tensors, ``set_input_shape``/``set_tensor_address`` and ``execute_async_v3`` on a private
    stream, with torch CUDA tensors as the device buffers.  Inputs are cast to the engine's
    I/O dtypes (e.g. int64 ids -> int32 if the engine declares int32); outputs come back as
    float32 numpy arrays like the other runtimes."""

    def __init__(self, path: str | Path, spec: TowerSpec, *, device: "int | str | torch.device" = 0):
        import torch

        try:
            import tensorrt as trt
        except ImportError as e:
            raise ExportError(f"TensorRT is not installed ({e}); cannot run {path}") from e
        if not torch.cuda.is_available():
            raise ExportError(f"no CUDA device is visible; cannot run the TensorRT engine {path}")
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"TensorRT plan not found: {path}")
        self.device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        self.spec = spec
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise ExportError(f"TensorRT {trt.__version__} cannot deserialize {path}: a plan only loads with the "
                                  "TensorRT version and GPU architecture it was built for (see its .json sidecar)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        got_in = [n for n in names if is_input[n]]
        got_out = [n for n in names if not is_input[n]]
        if sorted(got_in) != sorted(spec.input_names) or sorted(got_out) != sorted(spec.output_names):
            raise ExportError(f"{path}: engine I/O {got_in} -> {got_out} does not match the {spec.name} "
                              f"tower's declared {spec.input_names} -> {spec.output_names}")
        self.dtypes = {n: getattr(torch, _TRT_TO_TORCH[self.engine.get_tensor_dtype(n).name]) for n in names}
        self.name = f"tensorrt-{trt.__version__}"

    def _infer(self, feeds):
        import torch

        with torch.cuda.device(self.device), torch.inference_mode():
            inputs = {}
            for n in self.spec.input_names:
                t = torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device, self.dtypes[n], non_blocking=False)
                inputs[n] = t.contiguous()
                if not self.context.set_input_shape(n, tuple(t.shape)):
                    raise ExportError(f"TensorRT rejected {self.spec.name}.{n} of shape {tuple(t.shape)} "
                                      "(outside the engine's optimisation profile)")
                self.context.set_tensor_address(n, inputs[n].data_ptr())
            outputs = {}
            for n in self.spec.output_names:
                shape = tuple(self.context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise ExportError(f"TensorRT could not infer the shape of {self.spec.name}.{n}: {shape}")
                outputs[n] = torch.empty(shape, dtype=self.dtypes[n], device=self.device)
                self.context.set_tensor_address(n, outputs[n].data_ptr())
            # the uploads ran on torch's current stream; the engine runs on its own stream after them
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise ExportError(f"TensorRT execution of the {self.spec.name} tower failed")
            self.stream.synchronize()
            return {n: o.float().cpu().numpy() for n, o in outputs.items()}

    def close(self) -> None:
        self.context = None
        self.engine = None
        self._runtime = None


class TritonModelRuntime(Runtime):
    """Run the tower through another model of the same Triton server (Python-backend BLS),
    e.g. the ``filip_text`` front end forwarding token ids to the ``filip_text_trt``
    tensorrt_plan model.  Only usable inside a Python-backend model; ``pb_utils`` is
    ``triton_python_backend_utils`` (passed in, or imported lazily)."""

    def __init__(self, model_name: str, spec: TowerSpec, pb_utils=None):
        if pb_utils is None:
            import triton_python_backend_utils as pb_utils  # noqa: only exists inside the stub
        self.pb, self.model_name, self.spec = pb_utils, model_name, spec
        self.name = f"triton:{model_name}"

    def _infer(self, feeds):
        pb = self.pb
        inputs = [pb.Tensor(n, np.ascontiguousarray(feeds[n])) for n in self.spec.input_names]
        kwargs = dict(model_name=self.model_name, inputs=inputs, requested_output_names=self.spec.output_names)
        if hasattr(pb, "PreferredMemory"):   # ask for outputs in CPU memory (r23.x+ stubs)
            kwargs["preferred_memory"] = pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0)
        response = pb.InferenceRequest(**kwargs).exec()
        if response.has_error():
            raise ExportError(f"{self.model_name}: {response.error().message()}")
        out = {}
        for n in self.spec.output_names:
            t = pb.get_output_tensor_by_name(response, n)
            if t.is_cpu():
                out[n] = np.asarray(t.as_numpy(), dtype=np.float32)
            else:   # a GPU tensor (an old stub ignored preferred_memory)
                import torch
                out[n] = torch.from_dlpack(t.to_dlpack()).float().cpu().numpy()
        return out


def open_tower_runtime(version_dir: str | Path, tower: str, spec: TowerSpec, params: Mapping[str, str]) -> Runtime:
    """The runtime a Triton front end (filip_text / filip_image) should use: the TensorRT model
    named by its ``trt_model`` config parameter when the repository was built with TensorRT,
    else ONNX Runtime on ``<version_dir>/<tower>.onnx``."""
    if params.get("trt_model"):
        return TritonModelRuntime(params["trt_model"], spec)
    return OnnxRuntime(Path(version_dir) / f"{tower}.onnx", spec,
                       intra_op_threads=int(params.get("intra_op_threads", "0") or 0) or None)
