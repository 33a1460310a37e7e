"""Triton Python-backend adapter: IMAGE (encoded bytes) or PIXEL_VALUES -> TOKENS, LENGTHS, POOLED.

Thin: ``initialize`` builds the transform and the ONNX Runtime session once; ``execute``
hands the dynamic batch to ``engine.serving.embed_image_requests`` (decode + preprocess on
the server) and returns exactly one response per request.
"""
import json
import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        root = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}.get("project_root")
        if root and root not in sys.path:
            sys.path.insert(0, root)
        from engine.artifacts import read_manifest
        from engine.io_spec import tower_spec
        from engine.preprocess import ImageTransform
        from engine.runtime import OnnxRuntime
        from engine.serving import ServingLimits, engine_params

        params = engine_params(config)
        here = Path(args["model_repository"]) / args["model_version"]
        cfg, _ = read_manifest(here)
        self.max_batch = int(params["max_batch"])
        self.limits = ServingLimits()
        self.transform = ImageTransform(cfg.vision.image_size, max_pixels=self.limits.max_image_pixels,
                                        max_bytes=self.limits.max_image_bytes)
        self.runtime = OnnxRuntime(here / "image.onnx", tower_spec(cfg, "image"),
                                   intra_op_threads=int(params["intra_op_threads"]) or None)

    def execute(self, requests):
        from engine.serving import embed_image_requests, to_triton_responses

        inputs = []
        for r in requests:
            item = {}
            for name in ("IMAGE", "PIXEL_VALUES"):
                t = pb_utils.get_input_tensor_by_name(r, name)
                item[name] = None if t is None else t.as_numpy()
            inputs.append(item)
        return to_triton_responses(pb_utils, embed_image_requests(self.transform, self.runtime, inputs, self.limits, self.max_batch))
