"""The Python-backend models Triton runs, one class per served model.

A repository's ``<model>/1/model.py`` is a single import of its class from here (written by
``filip_export.triton_repo``), so the stubs run the project installed in the environment
that runs ``tritonserver`` and a repository holds no path of the machine that wrote it.

Each class is thin: ``initialize`` builds its endpoint (``filip_engine.serving`` /
``filip_engine.search``) once from the config; ``execute`` reads every request's inputs by
the served contract (:mod:`filip_contract.models`), hands the batch to the endpoint, and
returns exactly one response per request: outputs, or an error whose Triton code says whose
fault it is (:mod:`filip_contract.errors`).  ``triton_python_backend_utils`` exists only
inside the stub and is imported there.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from filip_contract import models as M
from filip_contract.errors import TRITON_CODES, Fault, FilipOverloadedError, FilipServerError, fault_of, is_overload_message

from .errors import InvalidInputError
from .serving import Result, triton_context


def read_inputs(pb_utils, request, model: M.Model) -> dict[str, np.ndarray | None]:
    """Every declared input of ``model`` in ``request`` as numpy (None where an optional one is absent)."""
    out = {}
    for spec in model.inputs:
        t = pb_utils.get_input_tensor_by_name(request, spec.name)
        out[spec.name] = None if t is None else t.as_numpy()
    return out


def to_triton_responses(pb_utils, model: M.Model, results: Sequence[Result]) -> list:
    """One InferenceResponse per request: its outputs (each one the contract declares), or its
    error with the Triton code of the error's fault."""
    declared = set(model.output_names)
    responses = []
    for res in results:
        if isinstance(res, Exception):
            code = getattr(pb_utils.TritonError, TRITON_CODES[fault_of(res)])
            responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(res), code)))
            continue
        unknown = set(res) - declared
        if unknown:
            raise RuntimeError(f"{model.name} produced outputs {sorted(unknown)} that the contract does not declare")
        responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in res.items()]))
    return responses


def bls_error(pb_utils, error, what: str) -> Exception:
    """The error a BLS call to another served model answered with, as ours.  Triton hands such
    errors over as INTERNAL whatever code the other model answered with, so the caller's input
    is validated before the call (search checks its query texts itself) and overload is told by
    Triton's wording of a queue refusal."""
    message = f"{what}: {error.message()}"
    code = error.code() if hasattr(error, "code") else None
    if code == getattr(pb_utils.TritonError, TRITON_CODES[Fault.CALLER], object()):
        return InvalidInputError(message)
    if code == getattr(pb_utils.TritonError, TRITON_CODES[Fault.OVERLOAD], object()) or is_overload_message(message):
        return FilipOverloadedError(message)
    return FilipServerError(message)


class _Model:
    model: M.Model

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils   # only inside the Python-backend stub
        self.pb = pb_utils
        self.endpoint = self.build(*triton_context(args))

    def build(self, version_dir, params):
        raise NotImplementedError

    def request(self, r):
        return read_inputs(self.pb, r, self.model)

    def execute(self, requests):
        return to_triton_responses(self.pb, self.model, self.endpoint([self.request(r) for r in requests]))


class TextModel(_Model):
    """filip_text: TEXT -> TOKENS, LENGTHS, POOLED (tokeniser + text tower)."""
    model = M.TEXT

    def build(self, version_dir, params):
        from .serving import TextEndpoint
        return TextEndpoint(version_dir, params)

    def request(self, r):
        return read_inputs(self.pb, r, self.model)["TEXT"]


class ImageModel(_Model):
    """filip_image: IMAGE (encoded bytes) or PIXEL_VALUES -> TOKENS, LENGTHS, POOLED."""
    model = M.IMAGE

    def build(self, version_dir, params):
        from .serving import ImageEndpoint
        return ImageEndpoint(version_dir, params)


class ScoreModel(_Model):
    """filip_score: token embeddings -> S_I, S_T (+ ALIGNMENT when requested)."""
    model = M.SCORE

    def build(self, version_dir, params):
        from .serving import ScoreEndpoint
        return ScoreEndpoint(version_dir, params)

    def request(self, r):
        return read_inputs(self.pb, r, self.model), r.requested_output_names()


class SearchModel(_Model):
    """filip_search: queries embedded through filip_text (a BLS call, so tokenisation and the
    text tower exist once in the server), then searched in the gallery this instance holds."""
    model = M.SEARCH

    def build(self, version_dir, params):
        from .search import SearchEndpoint
        self.text_max_batch = int(params.get("text_max_batch", "64"))
        return SearchEndpoint(version_dir, params, self._embed_texts)

    def _embed_texts(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """BLS to filip_text in batches it accepts -> (TOKENS [n, T, D], LENGTHS [n], POOLED [n, E])."""
        pb = self.pb
        tokens, lengths, pooled = [], [], []
        for a in range(0, len(texts), self.text_max_batch):
            part = np.array([t.encode("utf-8") for t in texts[a:a + self.text_max_batch]], dtype=object).reshape(-1, 1)
            response = pb.InferenceRequest(model_name=M.TEXT.name, requested_output_names=["TOKENS", "LENGTHS", "POOLED"],
                                           inputs=[pb.Tensor(M.TEXT.inputs[0].name, part)]).exec()
            if response.has_error():
                raise bls_error(pb, response.error(), f"query texts {a}..{a + len(part) - 1} refused by {M.TEXT.name}")
            tokens.append(pb.get_output_tensor_by_name(response, "TOKENS").as_numpy())
            lengths.append(pb.get_output_tensor_by_name(response, "LENGTHS").as_numpy().reshape(-1))
            pooled.append(pb.get_output_tensor_by_name(response, "POOLED").as_numpy())
        width = max(t.shape[1] for t in tokens)
        tokens = np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tokens])
        return tokens, np.concatenate(lengths), np.concatenate(pooled)


ADAPTERS = {m.name: globals()[m.adapter] for m in M.MODELS.values()}
