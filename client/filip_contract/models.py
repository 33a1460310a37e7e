"""The four served models' inputs and outputs, declared once.

Every name, KServe datatype and shape the server accepts or returns is written here and
nowhere else: ``filip_export.triton_repo`` builds each ``config.pbtxt`` from these
declarations, the Python-backend models read their requests by them, and the client builds
its requests and checks its responses with them.

Shapes are per request.  For a *batched* model (Triton ``max_batch_size > 0``) the first
axis is the batch and ``dims`` lists the axes after it, as ``config.pbtxt`` does; for an
unbatched one ``dims`` is the whole shape.  An axis is an int (``-1``: any size) or one of
the symbols below, which a served repository fixes from its checkpoint:

    D  token dimension          E  pooled (global) embedding dimension
    S  image side in pixels     P  patches per image (image tokens, CLS excluded)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

SYMBOLS = ("D", "E", "S", "P")

# KServe v2 datatype -> numpy dtype (BYTES elements are bytes objects in an object array)
NUMPY_DTYPES: Mapping[str, type] = {"FP32": np.float32, "FP16": np.float16, "INT32": np.int32,
                                    "INT64": np.int64, "BYTES": np.object_}


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str                       # KServe v2 datatype: FP32, INT32, BYTES
    dims: tuple[int | str, ...]         # after the batch axis for batched models; -1 = any size
    optional: bool = False
    doc: str = ""

    @property
    def numpy_dtype(self) -> type:
        return NUMPY_DTYPES[self.datatype]

    def resolve(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """``dims`` with every symbol replaced by its size from ``sizes``."""
        try:
            return tuple(d if isinstance(d, int) else int(sizes[d]) for d in self.dims)
        except KeyError as e:
            raise KeyError(f"{self.name}: size of {e.args[0]!r} not given (known symbols: {SYMBOLS})") from None


@dataclass(frozen=True)
class Model:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    batched: bool                       # dynamic batching; the first axis of every tensor is the batch
    adapter: str                        # the Python-backend model class in filip_engine.adapters
    doc: str = ""

    def input(self, name: str) -> Tensor:
        return _find(self.inputs, name, self.name, "input")

    def output(self, name: str) -> Tensor:
        return _find(self.outputs, name, self.name, "output")

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


def _find(tensors: tuple[Tensor, ...], name: str, model: str, kind: str) -> Tensor:
    for t in tensors:
        if t.name == name:
            return t
    raise KeyError(f"{model} has no {kind} {name!r}; its {kind}s are {[t.name for t in tensors]}")


def _embeddings(token_axis: int | str) -> tuple[Tensor, ...]:
    return (Tensor("TOKENS", "FP32", (token_axis, "D"), doc="per-token embeddings, L2-normalised, zero past LENGTHS"),
            Tensor("LENGTHS", "INT32", (1,), doc="real tokens per item"),
            Tensor("POOLED", "FP32", ("E",), doc="global embedding, L2-normalised"))


TEXT = Model(
    "filip_text", batched=True, adapter="TextModel",
    inputs=(Tensor("TEXT", "BYTES", (1,), doc="UTF-8 text, tokenised on the server"),),
    # T = the longest text of the request (SOT and EOT included)
    outputs=_embeddings(-1),
    doc="texts -> token and pooled embeddings",
)

IMAGE = Model(
    "filip_image", batched=True, adapter="ImageModel",
    inputs=(Tensor("IMAGE", "BYTES", (1,), optional=True, doc="an encoded image (JPEG, PNG, WebP, GIF, BMP, TIFF)"),
            Tensor("PIXEL_VALUES", "FP32", (3, "S", "S"), optional=True, doc="already preprocessed pixels")),
    outputs=_embeddings("P"),
    doc="images (exactly one of IMAGE or PIXEL_VALUES per request) -> token and pooled embeddings",
)

SCORE = Model(
    "filip_score", batched=False, adapter="ScoreModel",
    # token scoring takes the four token inputs; global scoring the two pooled ones
    inputs=(Tensor("IMAGE_TOKENS", "FP32", (-1, -1, "D"), optional=True),
            Tensor("IMAGE_LENGTHS", "INT32", (-1,), optional=True),
            Tensor("TEXT_TOKENS", "FP32", (-1, -1, "D"), optional=True),
            Tensor("TEXT_LENGTHS", "INT32", (-1,), optional=True),
            Tensor("IMAGE_POOLED", "FP32", (-1, "E"), optional=True, doc="images' POOLED (global scoring)"),
            Tensor("TEXT_POOLED", "FP32", (-1, "E"), optional=True, doc="texts' POOLED (global scoring)")),
    outputs=(Tensor("S_I", "FP32", (-1, -1), doc="image-to-text late interaction [n_img, n_txt]"),
             Tensor("S_T", "FP32", (-1, -1), doc="text-to-image late interaction [n_img, n_txt]"),
             Tensor("ALIGNMENT", "INT32", (-1, -1, -1), doc="each patch's best text token [n_img, n_txt, P]; "
                                                            "computed only when requested"),
             Tensor("COSINE", "FP32", (-1, -1), doc="cosine of the pooled embeddings [n_img, n_txt] "
                                                    "(global scoring)")),
    # only the requested outputs are computed: S_I, S_T, ALIGNMENT from the token inputs,
    # COSINE from the pooled ones
    doc="scores between given embeddings: late interaction (token) or pooled cosine (global)",
)

SEARCH = Model(
    "filip_search", batched=False, adapter="SearchModel",
    inputs=(Tensor("TEXT", "BYTES", (-1,), optional=True, doc="queries (UTF-8)"),
            Tensor("K", "INT32", (1,), optional=True, doc="hits per query"),
            Tensor("MODE", "BYTES", (1,), optional=True, doc="exact or two_stage"),
            Tensor("SCORING", "BYTES", (1,), optional=True, doc="token (s_T) or global (pooled cosine); "
                                                                   "default: the repository's"),
            Tensor("CANDIDATES", "INT32", (1,), optional=True, doc="two-stage candidates per query"),
            Tensor("ALLOWED_IDS", "BYTES", (-1,), optional=True, doc="search only these items"),
            Tensor("RELOAD", "BYTES", (1,), optional=True, doc="a gallery name to load instead of searching"),
            # appending to a gallery on the server's filesystem (indexing without shared storage)
            Tensor("APPEND", "BYTES", (1,), optional=True, doc="a gallery name to append to (created if missing)"),
            Tensor("ITEM_IDS", "BYTES", (-1,), optional=True, doc="ids of the items to append; alone: which are present"),
            Tensor("TOKENS", "FP32", (-1, "P", "D"), optional=True, doc="the items' image TOKENS"),
            Tensor("POOLED", "FP32", (-1, "E"), optional=True, doc="the items' image POOLED"),
            Tensor("ITEM_METADATA", "BYTES", (-1,), optional=True, doc="a JSON object per item"),
            Tensor("TOKEN_DTYPE", "BYTES", (1,), optional=True, doc="float16 (default) or int8, for a new gallery")),
    outputs=(Tensor("IDS", "BYTES", (-1, -1), doc="per query, best first; padding past COUNTS is the id \"\""),
             Tensor("SCORES", "FP32", (-1, -1), doc="s_T (token) or cosine (global), best first; "
                                                   "padding past COUNTS is -inf"),
             Tensor("METADATA", "BYTES", (-1, -1), doc="JSON per hit; padding past COUNTS is {}"),
             Tensor("COUNTS", "INT32", (-1,), doc="hits per query (each query's own, as if it were sent alone)"),
             Tensor("INFO", "BYTES", (1,), doc="JSON: gallery, mode, timings; or the reload / append / status answer")),
    doc="top-k gallery search by late interaction or pooled cosine (TEXT), a gallery reload (RELOAD), an append to a gallery "
        "(APPEND), or a status request (none of them)",
)

MODELS: Mapping[str, Model] = {m.name: m for m in (TEXT, IMAGE, SCORE, SEARCH)}
EMBED_OUTPUTS = TEXT.output_names       # the same three for both encoders
