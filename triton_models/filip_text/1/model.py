"""Triton Python-backend adapter: TEXT (UTF-8 bytes) -> TOKENS, LENGTHS, POOLED.

Thin: ``initialize`` builds the tokenizer and the ONNX Runtime session once; ``execute``
hands the dynamic batch to ``engine.serving.embed_text_requests`` and returns exactly one
response per request (a bad request gets its own INVALID_ARG error).
"""
import json
import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        root = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}.get("project_root")
        if root and root not in sys.path:  # the engine package, wherever the repository was written from
            sys.path.insert(0, root)
        from engine.artifacts import read_manifest
        from engine.io_spec import tower_spec
        from engine.runtime import OnnxRuntime
        from engine.serving import ServingLimits, engine_params
        from engine.tokenizer import ClipTokenizer

        params = engine_params(config)
        here = Path(args["model_repository"]) / args["model_version"]
        cfg, _ = read_manifest(here)
        self.max_batch = int(params["max_batch"])
        self.limits = ServingLimits()
        self.tokenizer = ClipTokenizer.from_file(here / "tokenizer.json", vocab_size=cfg.text.vocab_size,
                                                 context_length=cfg.text.context_length)
        self.runtime = OnnxRuntime(here / "text.onnx", tower_spec(cfg, "text"),
                                   intra_op_threads=int(params["intra_op_threads"]) or None)

    def execute(self, requests):
        from engine.serving import embed_text_requests, to_triton_responses

        raw = [pb_utils.get_input_tensor_by_name(r, "TEXT").as_numpy() for r in requests]
        return to_triton_responses(pb_utils, embed_text_requests(self.tokenizer, self.runtime, raw, self.limits, self.max_batch))
