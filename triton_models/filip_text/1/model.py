"""Triton Python-backend adapter for filip_text: TEXT (UTF-8 bytes) -> TOKENS, LENGTHS, POOLED.

Thin by design: the work is ``engine.serving.TextEndpoint`` (tokenizer + ONNX Runtime, built
once in ``initialize``), unit-tested without a server.  One response per request; a bad
request gets its own INVALID_ARG error.
"""
import json
import sys

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        root = json.loads(args["model_config"]).get("parameters", {}).get("project_root", {}).get("string_value")
        if root and root not in sys.path:  # the engine package, wherever the repository was written from
            sys.path.insert(0, root)
        from engine.serving import TextEndpoint, triton_context
        self.endpoint = TextEndpoint(*triton_context(args))

    def execute(self, requests):
        from engine.serving import to_triton_responses
        texts = [pb_utils.get_input_tensor_by_name(r, "TEXT").as_numpy() for r in requests]
        return to_triton_responses(pb_utils, self.endpoint(texts))
