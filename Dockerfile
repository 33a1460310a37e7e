# Production image: NVIDIA Triton Inference Server + this project, TensorRT engines built on
# first start for the GPUs it runs on (docs/GPU.md).
#
#   docker build -t filip .
#   docker run --gpus all --shm-size 1g -p 8000-8002:8000-8002 -v ckpt:/ckpt filip
#
# Base: Triton 24.12 (server 2.53.0): Ubuntu 24.04 / Python 3.12, CUDA 12.6.3, TensorRT 10.7.0.23.
# What the image adds (estimate in docs/GPU.md): the project and its pinned dependencies,
# torch as the CPU build (the exporter and the PyTorch reference run on the CPU; the serving
# path is ONNX Runtime / TensorRT and never needs torch; a PyPI torch would be a CUDA 13 build
# needing a host driver >= 580 and several GB), the TensorRT Python bindings only (1.2 MB:
# they load the container's own libnvinfer / libnvonnxparser / libnvinfer_plugin, so there is
# one TensorRT in the image and it is the one Triton serves with; a plan only loads in the
# TensorRT release that built it, and the build checks the versions agree), NVML bindings
# (GPU detection without torch) and CLIP's BPE merges file (open_clip_torch without deps).
FROM nvcr.io/nvidia/tritonserver:24.12-py3

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0+cpu
ARG TENSORRT_BINDINGS=tensorrt-cu12-bindings==10.7.0
# Only when the base image lacks libnvonnxparser (checked below): the Debian package of the
# same TensorRT release from the CUDA apt repository the NVIDIA images configure.
ARG TENSORRT_DEB_VERSION=10.7.0.23-1+cuda12.6
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    FILIP_PROJECT=/opt/filip \
    FILIP_CKPT_DIR=/ckpt

RUN command -v curl >/dev/null || (apt-get update && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*)

# TensorRT: the bindings wheel without its 2-3 GB libs dependency, against the system libraries.
RUN set -eu; \
    lib=/usr/lib/$(uname -m)-linux-gnu; \
    if ! ls $lib/libnvonnxparser.so.10* >/dev/null 2>&1; then \
        echo "base image has no libnvonnxparser: installing libnvonnxparsers10=${TENSORRT_DEB_VERSION}"; \
        apt-get update && apt-get install -y --no-install-recommends "libnvonnxparsers10=${TENSORRT_DEB_VERSION}" \
        && rm -rf /var/lib/apt/lists/*; \
    fi; \
    ls $lib/libnvinfer.so.10* $lib/libnvonnxparser.so.10* $lib/libnvinfer_plugin.so.10*; \
    python3 -m pip install --no-deps "${TENSORRT_BINDINGS}"

WORKDIR /opt/filip
# torch first, from the CPU index (the project's pin torch==2.13.0 is then satisfied) ...
RUN python3 -m pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
# ... then the project's own pinned dependencies (a layer that survives source edits) ...
COPY pyproject.toml README.md ./
COPY client/pyproject.toml client/README.md client/
COPY docker/stub_packages.py docker/
RUN python3 docker/stub_packages.py . \
    && python3 -m pip install ./client ".[gpu]" "numpy<2" \
    && python3 -m pip install --no-deps open_clip_torch==3.3.0 \
    && python3 -m pip uninstall -y filip-engine filip-client \
    && rm -rf engine export client/filip_*
# ... then the sources, installed as the two distributions (filip_client + filip_contract,
# filip_engine + filip_export).  Each model.py of a repository imports the installed
# filip_engine.adapters; export/to_trt.py and the GPU check run from here.
COPY client client
COPY engine engine
COPY export export
COPY triton_models triton_models
COPY docker docker
COPY tools tools
RUN python3 -m pip install --no-deps ./client . \
    && chmod +x docker/entrypoint.sh docker/healthcheck.sh \
    && python3 docker/check_image.py

VOLUME ["/ckpt"]
EXPOSE 8000 8001 8002
# Building engines on first start takes minutes: allow for it before the checks count.  The
# check is the deep one: one tiny request per model, so a dead Python stub is noticed.
HEALTHCHECK --interval=30s --timeout=20s --start-period=900s --retries=3 CMD ["/opt/filip/docker/healthcheck.sh"]
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "/opt/filip/docker/entrypoint.sh"]
