"""Checkpoint -> ONNX -> (TensorRT) -> Triton model repository."""
