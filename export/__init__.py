"""Checkpoint -> ONNX -> (TensorRT) -> Triton model repository (installed as ``filip_export``)."""
