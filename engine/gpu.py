"""Which NVIDIA GPUs this machine has, without torch.

The serving path (ONNX Runtime / TensorRT) and the Docker entrypoint must not depend on
``torch.cuda.is_available()``: the image's torch is a CPU build (docs/GPU.md), and a CUDA
torch whose CUDA is newer than the host driver reports no GPU on a machine that has one.
The driver's own management library answers instead: NVML through ``nvidia-ml-py`` (module
``pynvml``) when installed, else the same library through ctypes (``libnvidia-ml.so.1``
ships with the driver and is mounted into containers by the NVIDIA container toolkit), else
``nvidia-smi``.  Each source is tried in turn; none raises: no driver means no GPU.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    index: int                      # NVML index (PCI bus order)
    name: str
    compute_capability: tuple[int, int]
    uuid: str                       # "GPU-...": what CUDA_VISIBLE_DEVICES accepts whatever the ordering

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"


def _decode(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _via_pynvml() -> list[Gpu] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:      # noqa: BLE001 - pynvml.NVMLError: no driver
        return None
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            out.append(Gpu(i, _decode(pynvml.nvmlDeviceGetName(h)), (int(major), int(minor)),
                           _decode(pynvml.nvmlDeviceGetUUID(h))))
        return out
    except Exception:      # noqa: BLE001
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _via_ctypes() -> list[Gpu] | None:
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    init = getattr(lib, "nvmlInit_v2", None) or getattr(lib, "nvmlInit", None)
    if init is None or init() != 0:
        return None
    try:
        count = ctypes.c_uint(0)
        if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        out = []
        for i in range(count.value):
            h = ctypes.c_void_p()
            if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(i), ctypes.byref(h)) != 0:
                return None
            name, uuid = ctypes.create_string_buffer(96), ctypes.create_string_buffer(96)
            major, minor = ctypes.c_int(0), ctypes.c_int(0)
            if (lib.nvmlDeviceGetName(h, name, ctypes.c_uint(96)) != 0
                    or lib.nvmlDeviceGetUUID(h, uuid, ctypes.c_uint(96)) != 0
                    or lib.nvmlDeviceGetCudaComputeCapability(h, ctypes.byref(major), ctypes.byref(minor)) != 0):
                return None
            out.append(Gpu(i, name.value.decode(), (major.value, minor.value), uuid.value.decode()))
        return out
    finally:
        lib.nvmlShutdown()


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """``nvidia-smi --query-gpu=index,name,compute_cap,uuid --format=csv,noheader`` -> GPUs."""
    out = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            major, minor = parts[2].split(".")
            out.append(Gpu(int(parts[0]), parts[1], (int(major), int(minor)), parts[3]))
        except ValueError:
            continue
    return out


def _via_nvidia_smi() -> list[Gpu] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, "--query-gpu=index,name,compute_cap,uuid", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_nvidia_smi(r.stdout) if r.returncode == 0 else None


def _visible(gpus: list[Gpu]) -> list[Gpu]:
    """Only the GPUs CUDA_VISIBLE_DEVICES leaves visible (indices or UUIDs), in its order."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None or env.strip().lower() == "all":
        return gpus
    chosen = []
    for item in (x.strip() for x in env.split(",")):
        if not item:
            continue
        match = [g for g in gpus if (item.isdigit() and g.index == int(item)) or g.uuid.startswith(item)]
        if not match:
            break            # CUDA stops at the first invalid entry
        chosen.append(match[0])
    return chosen


def list_gpus() -> list[Gpu]:
    """The NVIDIA GPUs visible to this process (empty without a driver)."""
    for source in (_via_pynvml, _via_ctypes, _via_nvidia_smi):
        found = source()
        if found is not None:
            return _visible(found)
    return []


def distinct_architectures(gpus: list[Gpu]) -> list[Gpu]:
    """One GPU per compute capability, the first of each (a plan is built per architecture)."""
    seen, out = set(), []
    for g in gpus:
        if g.compute_capability not in seen:
            seen.add(g.compute_capability)
            out.append(g)
    return out


def cuda_visible() -> bool:
    """Whether an NVIDIA GPU is visible (driver present); says nothing about torch."""
    return bool(list_gpus())


def import_tensorrt():
    """The TensorRT Python module: ``tensorrt`` (the full ``tensorrt-cu12`` install), else
    ``tensorrt_bindings`` (the ``tensorrt-cu12-bindings`` wheel alone, which loads the system's
    libnvinfer: what the image installs, docs/GPU.md).  Raises ImportError when neither loads."""
    try:
        import tensorrt
        return tensorrt
    except ImportError as first:
        try:
            import tensorrt_bindings
            return tensorrt_bindings
        except ImportError:
            raise first from None
