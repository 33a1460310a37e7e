#!/usr/bin/env bash
# Container start: build the TensorRT engines for every GPU architecture visible here whose
# compute capability has no matching plan for this TensorRT version (read from each plan's
# JSON sidecar, see export/trt.py): one build per architecture, on a GPU of that architecture
# (CUDA_VISIBLE_DEVICES=its UUID); plans of the other architectures are kept.  Then replace
# this shell with tritonserver.  GPUs are found through NVML (the driver), not torch.  Settings (environment):
#   FILIP_CHECKPOINT   checkpoint file (default: the only *.pt/*.pth/*.bin/*.safetensors in /ckpt)
#   FILIP_REPO         model repository (default: /ckpt/triton_models, so plans survive restarts)
#   FILIP_PRECISION    fp32 (default) or fp16 (TensorRT 10.x; LayerNorm/softmax stay fp32)
#   FILIP_MAX_BATCH    largest batch of the engines and the dynamic batcher (default 64)
#   FILIP_EXPORT_ARGS  extra flags for export/to_trt.py (e.g. "--vocab /ckpt/bpe.txt.gz")
#   FILIP_TRT_TIMING_CACHE  base name of the TensorRT timing caches (default /ckpt/.filip/trt_timing.cache;
#                      one file per GPU architecture and TensorRT version beside it, e.g.
#                      trt_timing.sm90.trt10.7.0.23.cache)
# Arguments are passed on to tritonserver (e.g. --log-verbose=1).
set -euo pipefail

PROJECT=${FILIP_PROJECT:-/opt/filip}
CKPT_DIR=${FILIP_CKPT_DIR:-/ckpt}
REPO=${FILIP_REPO:-$CKPT_DIR/triton_models}
PRECISION=${FILIP_PRECISION:-fp32}
MAX_BATCH=${FILIP_MAX_BATCH:-64}
export FILIP_TRT_TIMING_CACHE=${FILIP_TRT_TIMING_CACHE:-$CKPT_DIR/.filip/trt_timing.cache}
TRITON=${TRITONSERVER:-/opt/tritonserver/bin/tritonserver}
# CUDA numbers GPUs fastest first by default, NVML by PCI bus: make them agree, so that GPU 0 of
# a build is the GPU whose compute capability names its plan (filip_export.trt)
export CUDA_DEVICE_ORDER=${CUDA_DEVICE_ORDER:-PCI_BUS_ID}

CKPT=${FILIP_CHECKPOINT:-}
if [ -z "$CKPT" ]; then
    mapfile -t found < <(find "$CKPT_DIR" -maxdepth 1 -type f \( -name '*.pt' -o -name '*.pth' -o -name '*.bin' \
                                                             -o -name '*.safetensors' \) 2>/dev/null | sort)
    if [ "${#found[@]}" -ne 1 ]; then
        echo "error: expected exactly one checkpoint (*.pt, *.pth, *.bin, *.safetensors) in $CKPT_DIR, found ${#found[@]}; mount one with -v DIR:$CKPT_DIR or set FILIP_CHECKPOINT" >&2
        exit 2
    fi
    CKPT=${found[0]}
fi
if [ ! -f "$CKPT" ]; then
    echo "error: checkpoint $CKPT not found" >&2
    exit 2
fi

cd "$PROJECT"
set +e
python3 -m filip_export.trt check "$REPO" --precision "$PRECISION" --max-batch "$MAX_BATCH" --checkpoint "$CKPT"
status=$?
set -e
if [ "$status" -eq 0 ] && [ ! -f "$REPO/filip_text/config.pbtxt" ]; then
    status=3
fi
case "$status" in
    0) echo "filip: serving the existing engines in $REPO" ;;
    3) mapfile -t gpus < <(python3 -m filip_export.trt missing "$REPO" --precision "$PRECISION" \
                              --max-batch "$MAX_BATCH" --checkpoint "$CKPT")
       if [ ! -f "$REPO/filip_text/config.pbtxt" ] && [ "${#gpus[@]}" -eq 0 ]; then
           gpus=("")            # no repository yet: build on the default GPU
       fi
       for gpu in "${gpus[@]}"; do
           echo "filip: building TensorRT engines for $CKPT into $REPO on GPU ${gpu:-0} (first start on this GPU architecture / TensorRT)"
           # shellcheck disable=SC2086  # FILIP_EXPORT_ARGS is a list of flags
           CUDA_VISIBLE_DEVICES=${gpu:-${CUDA_VISIBLE_DEVICES:-0}} python3 export/to_trt.py "$CKPT" --out "$REPO" \
               --runtime tensorrt --precision "$PRECISION" --max-batch "$MAX_BATCH" ${FILIP_EXPORT_ARGS:-}
       done ;;
    *) echo "error: no NVIDIA GPU or no TensorRT is usable in the container (start it with --gpus all)" >&2
       exit 2 ;;
esac

exec "$TRITON" --model-repository "$REPO" "$@"
