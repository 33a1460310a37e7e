"""Triton Python-backend adapter: late-interaction scores between given embeddings.

IMAGE_TOKENS [n_img, P, D], IMAGE_LENGTHS [n_img], TEXT_TOKENS [n_txt, T, D],
TEXT_LENGTHS [n_txt] -> S_I, S_T [n_img, n_txt]; ALIGNMENT [n_img, n_txt, P] (each
patch's best text token) only when the client requests it.
"""
import json
import sys

import triton_python_backend_utils as pb_utils

NAMES = ("IMAGE_TOKENS", "IMAGE_LENGTHS", "TEXT_TOKENS", "TEXT_LENGTHS")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        root = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}.get("project_root")
        if root and root not in sys.path:
            sys.path.insert(0, root)
        from engine.serving import ServingLimits
        self.limits = ServingLimits()

    def execute(self, requests):
        from engine.serving import score_request, to_triton_responses

        results = []
        for r in requests:
            inputs = {}
            for name in NAMES:
                t = pb_utils.get_input_tensor_by_name(r, name)
                inputs[name] = None if t is None else t.as_numpy()
            wanted = r.requested_output_names()
            res = score_request(inputs, want_alignment="ALIGNMENT" in wanted, limits=self.limits)
            if isinstance(res, dict) and wanted:
                res = {k: v for k, v in res.items() if k in wanted}
            results.append(res)
        return to_triton_responses(pb_utils, results)
