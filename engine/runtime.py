"""Interchangeable runtimes for one tower: the same ``infer(dict) -> dict`` everywhere.

- :class:`TorchRuntime`: the PyTorch model (the reference), CPU or CUDA.
- :class:`OnnxRuntime`: an exported ``.onnx`` on ONNX Runtime (CPU, or CUDA where present).
- :class:`OpenVinoRuntime`: an ``.onnx`` compiled by OpenVINO for the CPU, at fp32 or bf16
  inference precision (the CPU's reduced-precision engines: :mod:`filip_engine.precision`);
  ``openvino`` is imported when one is created.
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
from .io_spec import TowerSpec, as_triton_input, from_triton_output

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


class OpenVinoRuntime(Runtime):
    """An ONNX model compiled by OpenVINO for the CPU.  ``inference_precision`` is OpenVINO's
    INFERENCE_PRECISION_HINT, always set: "f32" computes in fp32 (OpenVINO's own default on a
    CPU with bf16 units is bf16), "bf16" in bf16 with fp32 accumulation.  One stream with
    ``threads`` threads (latency mode): the Triton instance is the unit of parallelism, and
    OpenVINO's throughput mode would start its own streams beside Triton's instances."""

    def __init__(self, path: str | Path, spec: TowerSpec, *, inference_precision: str = "f32",
                 threads: int | None = None):
        from .precision import INSTALL_HINT, default_threads
        try:
            import openvino as ov
        except ImportError as e:
            raise ExportError(f"OpenVINO is not installed ({e}); it serves {path}: {INSTALL_HINT}") from e
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"model not found: {path}")
        props = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": "LATENCY",
                 "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": int(threads or default_threads())}
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", props)
        except Exception as e:
            raise ExportError(f"OpenVINO cannot compile {path}: {e}") from e
        self.spec = spec
        got_in = [i.get_any_name() for i in self.compiled.inputs]
        got_out = [o.get_any_name() for o in self.compiled.outputs]
        if sorted(got_in) != sorted(spec.input_names) or sorted(got_out) != sorted(spec.output_names):
            raise ExportError(f"{path}: graph I/O {got_in} -> {got_out} does not match the {spec.name} "
                              f"tower's declared {spec.input_names} -> {spec.output_names}")
        self._outputs = {n: self.compiled.output(n) for n in spec.output_names}
        self._request = self.compiled.create_infer_request()
        self.name = f"openvino-{inference_precision}"

    def _infer(self, feeds):
        batch = len(feeds[self.spec.input_names[0]])
        result = self._request.infer({n: np.ascontiguousarray(feeds[n]) for n in self.spec.input_names})
        out = {}
        for t in self.spec.outputs:
            # a copy: the request's output buffers are reused by the next inference
            a = np.array(result[self._outputs[t.name]], dtype=np.float32)
            if a.ndim != len(t.shape):     # a graph transformation may add a unit axis; the size must agree
                a = a.reshape(batch, *a.shape[a.ndim - len(t.shape) + 1:])
            out[t.name] = a
        return out

    def close(self) -> None:
        self._request = None
        self.compiled = None


# TensorRT DataType names -> torch dtype names (looked up by name, so no tensorrt import is needed here)
_TRT_TO_TORCH = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32",
                 "INT64": "int64", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


_TRT_TO_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64,
                 "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


def _torch_cuda():
    """torch, when it is a CUDA build that sees a GPU; else None (the image's torch is a CPU build)."""
    try:
        import torch
    except ImportError:
        return None
    try:
        return torch if torch.cuda.is_available() else None
    except Exception:   # noqa: BLE001
        return None


class CudaRt:
    """The few CUDA runtime calls a TensorRT engine needs (device memory, copies, a stream),
    through ctypes on ``libcudart.so.12`` (in every CUDA 12 container, e.g. Triton's 24.12
    image, and in the ``nvidia-cuda-runtime-cu12`` wheel): TensorRTRuntime without torch."""
    H2D, D2H = 1, 2

    def __init__(self, device: int = 0):
        import ctypes
        import ctypes.util
        self.ct = ctypes
        names = ["libcudart.so.12", "libcudart.so", ctypes.util.find_library("cudart")]
        try:
            import nvidia.cuda_runtime   # the pip wheel's copy, when that is the one installed
            names.insert(0, str(Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib" / "libcudart.so.12"))
        except ImportError:
            pass
        self.lib = None
        for n in filter(None, names):
            try:
                self.lib = ctypes.CDLL(n)
                break
            except OSError:
                continue
        if self.lib is None:
            raise ExportError("neither a CUDA build of torch nor libcudart.so.12 is available; cannot run a TensorRT engine")
        self.lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        self.lib.cudaFree.argtypes = [ctypes.c_void_p]
        self.lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        self.lib.cudaStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        self.lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        self.lib.cudaStreamDestroy.argtypes = [ctypes.c_void_p]
        self.lib.cudaSetDevice.argtypes = [ctypes.c_int]
        self.device = device
        self._check(self.lib.cudaSetDevice(device), "cudaSetDevice")
        stream = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
        self.stream = stream

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise ExportError(f"CUDA runtime: {what} failed with error {code}")

    def malloc(self, nbytes: int) -> int:
        p = self.ct.c_void_p()
        self._check(self.lib.cudaMalloc(self.ct.byref(p), max(int(nbytes), 1)), "cudaMalloc")
        return int(p.value)

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(self.ct.c_void_p(ptr))

    def upload(self, ptr: int, a: np.ndarray) -> None:
        self._check(self.lib.cudaMemcpyAsync(self.ct.c_void_p(ptr), a.ctypes.data, a.nbytes, self.H2D, self.stream),
                    "cudaMemcpyAsync (host to device)")

    def download(self, a: np.ndarray, ptr: int) -> None:
        self._check(self.lib.cudaMemcpyAsync(a.ctypes.data, self.ct.c_void_p(ptr), a.nbytes, self.D2H, self.stream),
                    "cudaMemcpyAsync (device to host)")

    def synchronize(self) -> None:
        self._check(self.lib.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.stream is not None:
            self.lib.cudaStreamDestroy(self.stream)
            self.stream = None


class TensorRTRuntime(Runtime):
    """A serialized TensorRT engine (``.plan``) on one CUDA device, TensorRT 10+ API: named I/O
    tensors, ``set_input_shape``/``set_tensor_address`` and ``execute_async_v3`` on a private
    stream.  Device buffers are torch CUDA tensors when torch is a CUDA build that sees the GPU,
    else raw CUDA runtime allocations (:class:`CudaRt`; the image's torch is a CPU build).
    Inputs are cast to the engine's I/O dtypes (e.g. int64 ids -> int32 if the engine declares
    int32); outputs come back as float32 numpy arrays like the other runtimes."""

    def __init__(self, path: str | Path, spec: TowerSpec, *, device: "int | str | torch.device" = 0,
                 backend: str = "auto"):
        from .gpu import cuda_visible, import_tensorrt
        try:
            trt = import_tensorrt()
        except ImportError as e:
            raise ExportError(f"TensorRT is not installed ({e}); cannot run {path}") from e
        torch = _torch_cuda() if backend in ("auto", "torch") else None
        if backend == "torch" and torch is None:
            raise ExportError("backend='torch' needs a CUDA build of torch that sees a GPU")
        if torch is None and not cuda_visible():
            raise ExportError(f"no CUDA device is visible; cannot run the TensorRT engine {path}")
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"TensorRT plan not found: {path}")
        self.spec = spec
        self._trt = trt
        self._torch = torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        if torch is not None:
            self.device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
            self._cuda = None
            ctx = torch.cuda.device(self.device)
        else:
            import contextlib
            self.device = int(device) if isinstance(device, int) else int(str(device).rpartition(":")[2] or 0)
            self._cuda = CudaRt(self.device)
            ctx = contextlib.nullcontext()
        with ctx:
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise ExportError(f"TensorRT {trt.__version__} cannot deserialize {path}: a plan only loads with the "
                                  "TensorRT version and GPU architecture it was built for (see its .json sidecar)")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device) if torch is not None else None
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        got_in = [n for n in names if is_input[n]]
        got_out = [n for n in names if not is_input[n]]
        if sorted(got_in) != sorted(spec.input_names) or sorted(got_out) != sorted(spec.output_names):
            raise ExportError(f"{path}: engine I/O {got_in} -> {got_out} does not match the {spec.name} "
                              f"tower's declared {spec.input_names} -> {spec.output_names}")
        kinds = {n: self.engine.get_tensor_dtype(n).name for n in names}
        self.np_dtypes = {n: _TRT_TO_NUMPY[k] for n, k in kinds.items()}
        self.dtypes = {n: getattr(torch, _TRT_TO_TORCH[k]) for n, k in kinds.items()} if torch is not None else None
        self.name = f"tensorrt-{trt.__version__}"

    def _infer(self, feeds):
        if self._torch is None:
            return self._infer_cudart(feeds)
        torch = self._torch
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

    def _infer_cudart(self, feeds):
        cuda, owned = self._cuda, []
        try:
            hosts = {}
            for n in self.spec.input_names:
                a = np.ascontiguousarray(feeds[n], dtype=self.np_dtypes[n])
                hosts[n] = a
                ptr = cuda.malloc(a.nbytes)
                owned.append(ptr)
                cuda.upload(ptr, a)
                if not self.context.set_input_shape(n, tuple(a.shape)):
                    raise ExportError(f"TensorRT rejected {self.spec.name}.{n} of shape {tuple(a.shape)} "
                                      "(outside the engine's optimisation profile)")
                self.context.set_tensor_address(n, ptr)
            outputs = {}
            for n in self.spec.output_names:
                shape = tuple(self.context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise ExportError(f"TensorRT could not infer the shape of {self.spec.name}.{n}: {shape}")
                outputs[n] = np.empty(shape, self.np_dtypes[n])
                ptr = cuda.malloc(outputs[n].nbytes)
                owned.append(ptr)
                self.context.set_tensor_address(n, ptr)
            if not self.context.execute_async_v3(cuda.stream.value or 0):
                raise ExportError(f"TensorRT execution of the {self.spec.name} tower failed")
            for n, ptr in zip(self.spec.output_names, owned[len(self.spec.input_names):]):
                cuda.download(outputs[n], ptr)
            cuda.synchronize()
            return {n: o.astype(np.float32, copy=False) for n, o in outputs.items()}
        finally:
            for ptr in owned:
                cuda.free(ptr)

    def close(self) -> None:
        self.context = None
        self.engine = None
        self._runtime = None
        if getattr(self, "_cuda", None) is not None:
            self._cuda.close()
            self._cuda = None


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
        # shaped as the plan model's config declares them (a [batch] tensor as [batch, 1]: io_spec.triton_dims)
        inputs = [pb.Tensor(t.name, as_triton_input(t, feeds[t.name])) for t in self.spec.inputs]
        kwargs = dict(model_name=self.model_name, inputs=inputs, requested_output_names=self.spec.output_names)
        if hasattr(pb, "PreferredMemory"):   # ask for outputs in CPU memory (r23.x+ stubs)
            kwargs["preferred_memory"] = pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0)
        response = pb.InferenceRequest(**kwargs).exec()
        if response.has_error():
            raise ExportError(f"{self.model_name}: {response.error().message()}")
        out = {}
        for spec in self.spec.outputs:
            n = spec.name
            t = pb.get_output_tensor_by_name(response, n)
            if t.is_cpu():
                a = np.asarray(t.as_numpy(), dtype=np.float32)
            else:   # a GPU tensor (an old stub ignored preferred_memory)
                import torch
                a = torch.from_dlpack(t.to_dlpack()).float().cpu().numpy()
            out[n] = from_triton_output(spec, a)
        return out


def open_tower_runtime(version_dir: str | Path, tower: str, spec: TowerSpec, params: Mapping[str, str]) -> Runtime:
    """The runtime a Triton front end (filip_text / filip_image) should use: the TensorRT model
    named by its ``trt_model`` config parameter when the repository was built with TensorRT,
    else the CPU engine its ``precision`` / ``engine`` / ``model_file`` parameters name
    (:func:`filip_engine.precision.open_cpu_runtime`; none: fp32 ONNX Runtime on
    ``<version_dir>/<tower>.onnx``), with ``intra_op_threads`` threads, or with 0 as many as
    :func:`filip_engine.precision.threads_per_instance` gives the engine for the model's
    ``instance_count`` instances."""
    if params.get("trt_model"):
        return TritonModelRuntime(params["trt_model"], spec)
    from .precision import PARAMS, TowerEngine, open_cpu_runtime, threads_per_instance
    record = TowerEngine.from_mapping({k: params[k] for k in PARAMS if params.get(k)})
    threads = threads_per_instance(int(params.get("intra_op_threads", "0") or 0), int(params.get("instance_count", "1") or 1),
                                   record.engine)
    return open_cpu_runtime(version_dir, tower, spec, record, threads=threads)
