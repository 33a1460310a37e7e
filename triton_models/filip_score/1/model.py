"""Triton Python-backend adapter for filip_score: late-interaction scores between given embeddings.

IMAGE_TOKENS [n_img, P, D], IMAGE_LENGTHS [n_img], TEXT_TOKENS [n_txt, T, D], TEXT_LENGTHS
[n_txt] -> S_I, S_T [n_img, n_txt]; ALIGNMENT [n_img, n_txt, P] only when requested.  The
work is ``engine.serving.ScoreEndpoint``.
"""
import json
import sys

import triton_python_backend_utils as pb_utils

INPUTS = ("IMAGE_TOKENS", "IMAGE_LENGTHS", "TEXT_TOKENS", "TEXT_LENGTHS")


class TritonPythonModel:
    def initialize(self, args):
        root = json.loads(args["model_config"]).get("parameters", {}).get("project_root", {}).get("string_value")
        if root and root not in sys.path:
            sys.path.insert(0, root)
        from engine.serving import ScoreEndpoint, triton_context
        self.endpoint = ScoreEndpoint(*triton_context(args))

    def execute(self, requests):
        from engine.serving import to_triton_responses
        batch = []
        for r in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(r, name) for name in INPUTS}
            batch.append(({name: None if t is None else t.as_numpy() for name, t in tensors.items()},
                          r.requested_output_names()))
        return to_triton_responses(pb_utils, self.endpoint(batch))
