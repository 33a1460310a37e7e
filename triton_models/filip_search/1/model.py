"""Triton Python-backend adapter for filip_search: top-k gallery search by late interaction.

TEXT [n] queries (+ optional K, MODE, CANDIDATES, ALLOWED_IDS) -> IDS, SCORES, METADATA
[n, k'] and INFO; or RELOAD (a gallery name) -> INFO.  Queries are embedded by the text
front end (filip_text) through a BLS call, so tokenisation and the text tower exist once
in the server.  The work is ``engine.search.SearchEndpoint``, unit-tested without a server.
"""
import json
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

INPUTS = ("TEXT", "K", "MODE", "CANDIDATES", "ALLOWED_IDS", "RELOAD")


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        root = params.get("project_root", {}).get("string_value")
        if root and root not in sys.path:
            sys.path.insert(0, root)
        from engine.search import SearchEndpoint
        from engine.serving import triton_context
        version_dir, params = triton_context(args)
        self.text_max_batch = int(params.get("text_max_batch", "64"))
        self.endpoint = SearchEndpoint(version_dir, params, self._embed_texts)

    def _embed_texts(self, texts):
        """BLS to filip_text in batches it accepts -> (TOKENS [n, T, D], LENGTHS [n])."""
        from engine.errors import InvalidInputError
        tokens, lengths = [], []
        for a in range(0, len(texts), self.text_max_batch):
            part = np.array([t.encode("utf-8") for t in texts[a:a + self.text_max_batch]], dtype=object).reshape(-1, 1)
            response = pb_utils.InferenceRequest(model_name="filip_text", requested_output_names=["TOKENS", "LENGTHS"],
                                                 inputs=[pb_utils.Tensor("TEXT", part)]).exec()
            if response.has_error():
                raise InvalidInputError(f"query text rejected by filip_text: {response.error().message()}")
            tokens.append(pb_utils.get_output_tensor_by_name(response, "TOKENS").as_numpy())
            lengths.append(pb_utils.get_output_tensor_by_name(response, "LENGTHS").as_numpy().reshape(-1))
        width = max(t.shape[1] for t in tokens)
        tokens = np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tokens])
        return tokens, np.concatenate(lengths)

    def execute(self, requests):
        from engine.serving import to_triton_responses
        batch = []
        for r in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(r, name) for name in INPUTS}
            batch.append({name: None if t is None else t.as_numpy() for name, t in tensors.items()})
        return to_triton_responses(pb_utils, self.endpoint(batch))
