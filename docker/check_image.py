"""Build-time checks of the image (the last step of the Dockerfile; runs without a GPU).

Fails the build with one line per problem when: the TensorRT Python bindings do not load or
their version is not the container's libnvinfer (a plan only loads in the TensorRT release
that built it), the ONNX parser is missing, torch is a CUDA build for another CUDA major than
the container's (a CUDA 13 torch needs a host driver >= 580), the serving code needs torch,
CLIP's merges file is missing, or the NVML bindings are missing.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys


def main() -> int:
    problems, notes = [], []
    arch = os.uname().machine
    libs = sorted(glob.glob(f"/usr/lib/{arch}-linux-gnu/libnvinfer.so.*.*.*"))
    try:
        from filip_engine.gpu import import_tensorrt
        trt = import_tensorrt()
        wheel = trt.__version__.split(".post")[0]
        notes.append(f"TensorRT bindings {trt.__version__} ({trt.__name__}) | container {[os.path.basename(x) for x in libs]}")
        if libs and not any(x.split(".so.", 1)[1].startswith(wheel) for x in libs):
            problems.append(f"the TensorRT bindings {wheel} do not match the container's {libs}: set --build-arg TENSORRT_BINDINGS")
        if not hasattr(trt, "OnnxParser"):
            problems.append("the TensorRT bindings have no OnnxParser (libnvonnxparser missing?)")
    except Exception as e:   # noqa: BLE001 - ImportError, or an OSError of a missing system library
        problems.append(f"TensorRT bindings do not load: {type(e).__name__}: {e}")
    try:
        import torch
        cuda = torch.version.cuda
        notes.append(f"torch {torch.__version__} (CUDA {cuda or 'none: CPU build'})")
        if cuda is not None and not cuda.startswith("12."):
            problems.append(f"torch {torch.__version__} is built for CUDA {cuda}; the container is CUDA 12.6: "
                            "use the CPU build (--build-arg TORCH_INDEX/TORCH_VERSION)")
    except ImportError as e:
        problems.append(f"torch does not import ({e}); the exporter needs it")
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; "
                        "import filip_engine.serving, filip_engine.search, filip_engine.adapters, filip_engine.gpu"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        problems.append("the serving code imports torch: " + (r.stderr.strip().splitlines() or ["?"])[-1])
    try:
        from filip_engine.tokenizer import find_clip_merges_file
        notes.append(f"CLIP merges file {find_clip_merges_file()}")
    except Exception as e:   # noqa: BLE001
        problems.append(f"no CLIP merges file: {e}")
    try:
        import pynvml  # noqa: F401
    except ImportError:
        problems.append("nvidia-ml-py (pynvml) is not installed: GPU detection would fall back to nvidia-smi")
    for n in notes:
        print("image check: " + n)
    for p in problems:
        print("image check FAILED: " + p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
