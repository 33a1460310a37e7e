# Production image: NVIDIA Triton Inference Server + this project, TensorRT engines built on
# first start for the GPU it runs on (docs/GPU.md).
#
#   docker build -t filip .
#   docker run --gpus all --shm-size 1g -p 8000-8002:8000-8002 -v ckpt:/ckpt filip
#
# Base: Triton 24.12 (server 2.53.0): Ubuntu 24.04 / Python 3.12, CUDA 12.6.3, TensorRT 10.7.0.23.
# The TensorRT Python wheel that builds the plans is pinned to the same TensorRT release
# (a plan only loads in the TensorRT version that built it); the build step below checks it.
FROM nvcr.io/nvidia/tritonserver:24.12-py3

ARG TENSORRT_WHEEL=tensorrt-cu12==10.7.0
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    FILIP_PROJECT=/opt/filip \
    FILIP_CKPT_DIR=/ckpt

RUN command -v curl >/dev/null || (apt-get update && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*)

WORKDIR /opt/filip
# The project's own pinned dependencies first (a layer that survives source edits) ...
COPY pyproject.toml README.md ./
COPY client/pyproject.toml client/README.md client/
COPY client/filip_client/__init__.py client/filip_client/__init__.py
COPY client/filip_contract/__init__.py client/filip_contract/__init__.py
COPY engine/__init__.py engine/__init__.py
COPY export/__init__.py export/__init__.py
RUN python3 -m pip install ./client . "numpy<2" "${TENSORRT_WHEEL}" \
    && python3 -m pip uninstall -y filip-engine filip-client
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
    && python3 -c "import glob, sys, tensorrt; \
libs = sorted(glob.glob('/usr/lib/*/libnvinfer.so.*.*.*')); \
wheel = tensorrt.__version__.split('.post')[0]; \
print('TensorRT wheel', tensorrt.__version__, '| container', libs); \
sys.exit(0 if not libs or any(l.split('.so.', 1)[1].startswith(wheel) for l in libs) else \
'the TensorRT wheel ' + wheel + ' does not match the container TensorRT ' + str(libs) + ': set --build-arg TENSORRT_WHEEL')"

VOLUME ["/ckpt"]
EXPOSE 8000 8001 8002
# Building engines on first start takes minutes: allow for it before the checks count.
HEALTHCHECK --interval=30s --timeout=10s --start-period=900s --retries=3 CMD ["/opt/filip/docker/healthcheck.sh"]
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "/opt/filip/docker/entrypoint.sh"]
