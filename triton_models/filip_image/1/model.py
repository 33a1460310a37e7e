"""Triton Python-backend adapter for filip_image: IMAGE (encoded bytes) or PIXEL_VALUES ->
TOKENS, LENGTHS, POOLED.

Thin by design: the work is ``engine.serving.ImageEndpoint`` (decode + preprocess + ONNX
Runtime), unit-tested without a server.  One response per request.
"""
import json
import sys

import triton_python_backend_utils as pb_utils

INPUTS = ("IMAGE", "PIXEL_VALUES")   # both optional: a request gives exactly one


class TritonPythonModel:
    def initialize(self, args):
        root = json.loads(args["model_config"]).get("parameters", {}).get("project_root", {}).get("string_value")
        if root and root not in sys.path:
            sys.path.insert(0, root)
        from engine.serving import ImageEndpoint, triton_context
        self.endpoint = ImageEndpoint(*triton_context(args))

    def execute(self, requests):
        from engine.serving import to_triton_responses
        batch = []
        for r in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(r, name) for name in INPUTS}
            batch.append({name: None if t is None else t.as_numpy() for name, t in tensors.items()})
        return to_triton_responses(pb_utils, self.endpoint(batch))
