"""FilipClient: the synchronous gRPC client (tritonclient underneath).

    client = FilipClient("localhost:8001")
    img = client.embed_images(["cat.jpg", pil_image, uint8_array, jpeg_bytes])
    txt = client.embed_texts(["a photo of a cat", "a dog"])
    client.score(img, txt)                 # s_I [n_img, n_txt]; direction="t2i" for s_T
    client.classify(img, ["cat", "dog"])   # zero-shot with a prompt ensemble
    client.alignment(img[0], txt[0])       # word-patch map on the patch grid

Long inputs are split into requests of ``batch_size`` items sent with at most
``concurrency`` in flight; results come back in input order.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping, Sequence

import numpy as np
import tritonclient.grpc as grpc

from . import _protocol as P
from .errors import FilipError, FilipInvalidInputError, from_triton
from .types import Embeddings, Health, IndexReport, SearchResults


class FilipClient:
    def __init__(self, url: str = "localhost:8001", *, timeout: float | None = 60.0, concurrency: int = 4,
                 max_retries: int = 8, ssl: bool = False, root_certificates: str | None = None, private_key: str | None = None,
                 certificate_chain: str | None = None, headers: Mapping[str, str] | None = None):
        """``timeout``: default seconds per call (None: no deadline); ``max_retries``: retries of a
        request the server refused as overloaded, with jittered exponential backoff, within the
        call's deadline (invalid input is never retried); ``headers``: gRPC metadata sent with
        every call (e.g. ``{"authorization": "Bearer ..."}``); TLS via ``ssl`` and PEM paths."""
        if concurrency < 1:
            raise FilipInvalidInputError("concurrency must be at least 1")
        self.url, self.timeout, self.concurrency, self.max_retries = url, timeout, concurrency, max_retries
        self.headers = dict(headers or {})
        self._grpc = grpc.InferenceServerClient(url, ssl=ssl, root_certificates=root_certificates,
                                                private_key=private_key, certificate_chain=certificate_chain)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="filip-client")
        self._configs: dict[str, dict] = {}

    # --- plumbing ------------------------------------------------------------------------
    def _call(self, model: str, inputs: list, outputs: Sequence[str], timeout: float | None, what: str):
        budget = self.timeout if timeout is None else timeout
        deadline = None if budget is None else time.monotonic() + budget
        attempt = 0
        while True:
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                return self._grpc.infer(model, inputs, outputs=P.requested(grpc, outputs),
                                        client_timeout=left, headers=self.headers)
            except Exception as e:  # InferenceServerException and gRPC errors
                err = from_triton(e, what)
                attempt += 1
                pause = P.retry_pause(err, attempt, self.max_retries, deadline)
                if pause is None:
                    raise err from e
            time.sleep(pause)

    def _config(self, model: str) -> dict:
        """The served model's config (cached): its max batch size and parameters."""
        if model not in self._configs:
            try:
                self._configs[model] = self._grpc.get_model_config(model, as_json=True, client_timeout=self.timeout,
                                                                   headers=self.headers)["config"]
            except Exception as e:
                raise from_triton(e, f"model config of {model}") from e
        return self._configs[model]

    def _limits(self, model: str) -> P.ServingLimits:
        return P.served_limits(self._config(model))

    def _spans(self, model: str, n: int, batch_size: int) -> list[tuple[int, int]]:
        """Request spans of at most ``batch_size`` items and never more than the server accepts."""
        P.chunks(n, batch_size)  # validates batch_size
        cap = min(int(self._config(model).get("max_batch_size", 0)) or batch_size,
                  self._limits(model).max_items_per_request)
        return P.chunks(n, min(batch_size, cap))

    def _map(self, fn: Callable[[int, int], Embeddings], spans: list[tuple[int, int]], progress: bool, desc: str) -> list:
        if len(spans) == 1 and not progress:   # one request: send it from the caller's thread
            return [fn(*spans[0])]
        bar = _progress(progress, sum(b - a for a, b in spans), desc)
        futures = [self._pool.submit(fn, a, b) for a, b in spans]
        try:
            out = []
            for (a, b), f in zip(spans, futures):
                out.append(f.result())
                bar(b - a)
            return out
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            bar(None)

    # --- public API ----------------------------------------------------------------------
    def embed_texts(self, texts: Sequence[str], *, batch_size: int = 32, timeout: float | None = None,
                    progress: bool = False) -> Embeddings:
        texts = P.check_texts(texts, self._limits(P.TEXT_MODEL).max_text_chars)

        def one(a: int, b: int) -> Embeddings:
            res = self._call(P.TEXT_MODEL, P.text_inputs(grpc, texts[a:b]), P.EMBED_OUTPUTS, timeout, f"texts {a}..{b - 1}")
            return P.parse_embeddings(res, P.TEXT_MODEL)

        return Embeddings.concat(self._map(one, self._spans(P.TEXT_MODEL, len(texts), batch_size), progress, "texts"))

    def embed_images(self, images: Sequence[P.ImageLike], *, batch_size: int = 16, timeout: float | None = None,
                     progress: bool = False) -> Embeddings:
        images = P.check_images(images)
        max_bytes = self._limits(P.IMAGE_MODEL).max_image_bytes
        blobs = [P.encode_image(im, i, max_bytes) for i, im in enumerate(images)]

        def one(a: int, b: int) -> Embeddings:
            res = self._call(P.IMAGE_MODEL, P.image_inputs(grpc, blobs[a:b]), P.EMBED_OUTPUTS, timeout, f"images {a}..{b - 1}")
            return P.parse_embeddings(res, P.IMAGE_MODEL)

        return Embeddings.concat(self._map(one, self._spans(P.IMAGE_MODEL, len(blobs), batch_size), progress, "images"))

    def score(self, images: Embeddings, texts: Embeddings, *, direction: str = "i2t",
              scoring: str | None = None, timeout: float | None = None) -> np.ndarray:
        """[n_img, n_txt]. ``scoring="token"``: late interaction, s_I (``direction="i2t"``:
        rank texts for an image) or s_T (``"t2i"``); ``"global"``: cosine of the pooled
        embeddings. ``None``: the served repository's rule (its checkpoint's)."""
        scoring = P.scoring_of(scoring, self._config(P.SCORE_MODEL))
        inputs, name = P.score_request(grpc, images, texts, direction, scoring)
        res = self._call(P.SCORE_MODEL, inputs, [name], timeout, "score")
        return P.output(res, name, P.SCORE_MODEL)

    def classify(self, images: Embeddings | Sequence[P.ImageLike], labels: Sequence[str], *,
                 templates: Sequence[str] = P.DEFAULT_TEMPLATES, mode: str = "mean", scoring: str | None = None,
                 timeout: float | None = None) -> np.ndarray:
        """Zero-shot scores [n_img, n_labels]. ``scoring="token"`` (FILIP): the mean of s_I over
        the prompt templates (``mode="mean"``), or the mean of per-template softmax
        probabilities ("softmax"). ``"global"`` (CLIP's rule): per class the mean of the
        normalised template embeddings, renormalised, and its cosine with each image
        (``mode="mean"`` only). ``None``: the served repository's rule."""
        scoring = P.scoring_of(scoring, self._config(P.SCORE_MODEL))
        if scoring == "global" and mode != "mean":
            raise FilipInvalidInputError(f"mode {mode!r} applies to token scoring; global zero-shot is CLIP's "
                                         "mean of template embeddings (mode='mean')")
        prompts = P.build_prompts(labels, templates)
        if not isinstance(images, Embeddings):
            images = self.embed_images(images, timeout=timeout)
        texts = self.embed_texts(prompts, timeout=timeout)
        if scoring == "global":
            P.check_embeddings(images, "images")
            classes = P.zero_shot_classes(texts, len(labels), len(templates))
            res = self._call(P.SCORE_MODEL, P.pooled_score_inputs(grpc, images.pooled, classes), ["COSINE"],
                                  timeout, "classify")
            return P.output(res, "COSINE", P.SCORE_MODEL)
        s_i = self.score(images, texts, scoring="token", timeout=timeout)
        scale = self.logit_scale() if mode == "softmax" else 1.0
        return P.aggregate_zero_shot(s_i, len(labels), len(templates), mode, scale)

    def alignment(self, image: Embeddings, text: Embeddings, *, timeout: float | None = None) -> np.ndarray:
        """Word-patch alignment of the first image and first text: for each patch, the index of
        its best text token (0 = SOT), on the patch grid when it is square."""
        P.check_embeddings(image, "image")
        P.check_embeddings(text, "text")
        res = self._call(P.SCORE_MODEL, P.score_inputs(grpc, image[0], text[0]), ["ALIGNMENT"], timeout, "alignment")
        amap = P.output(res, "ALIGNMENT", P.SCORE_MODEL)[0, 0]
        g = math.isqrt(amap.shape[0])
        return amap.reshape(g, g) if g * g == amap.shape[0] else amap

    def search(self, texts: Sequence[str], *, k: int = P.L.DEFAULT_K, mode: str = P.L.DEFAULT_MODE, candidates: int | None = None,
               allowed_ids: Sequence[str] | None = None, scoring: str | None = None,
               timeout: float | None = None) -> SearchResults:
        """Top-``k`` gallery items per text, best first, as :class:`Hit` (id, score, metadata):
        by s_T (``scoring="token"``) or the pooled cosine (``"global"``; None: the server's rule).

        ``mode``: "exact" (every item scored) or "two_stage" (``candidates`` items per query
        from the first stage, default 2000, re-ranked exactly); ``allowed_ids``: only these
        items.  Each text's hits are what it gets searched alone (fewer than ``k`` where the
        gallery or the first stage has fewer).  The result is a list per text; its ``info``
        holds the server's INFO (gallery, mode, timings) of each request it took."""
        texts = P.check_texts(texts, self._limits(P.TEXT_MODEL).max_text_chars)
        out = SearchResults()
        if allowed_ids is not None and len(allowed_ids) == 0:
            out.extend([] for _ in texts)
            return out
        for a, b in P.chunks(len(texts), P.L.MAX_QUERIES):
            res = self._call(P.SEARCH_MODEL, P.search_inputs(grpc, texts[a:b], k, mode, candidates, allowed_ids, scoring),
                             P.SEARCH_OUTPUTS, timeout, f"search texts {a}..{b - 1}")
            hits, info = P.parse_hits(res)
            out.extend(hits)
            out.info.append(info)
        return out

    def gallery_info(self, *, timeout: float | None = None) -> dict:
        """Which gallery filip_search serves: name, count, segments, ... (name None and
        load_error set when none is loaded)."""
        res = self._call(P.SEARCH_MODEL, P.status_inputs(grpc), ["INFO"], timeout, "gallery info")
        return P.parse_info(res)

    def reload_gallery(self, name: str, *, timeout: float | None = None) -> dict:
        """Make filip_search load the gallery ``name`` (a folder under its gallery root),
        verified, without a restart; on any problem the previous gallery stays served and
        this raises with the reason.  Returns the loaded gallery's info."""
        res = self._call(P.SEARCH_MODEL, P.reload_inputs(grpc, name), ["INFO"], timeout, f"reload gallery {name!r}")
        return P.parse_info(res)

    def index_images(self, images: Sequence[P.ImageLike] | str | os.PathLike, gallery: str | os.PathLike, *,
                     ids: Sequence[str] | None = None, metadata: Sequence[Mapping | None] | None = None,
                     token_dtype: str = "float16", batch_size: int = 16, commit_every: int = 256,
                     progress: bool = True, on_server: bool = False, timeout: float | None = None) -> IndexReport:
        """Embed ``images`` (a list, or a folder searched recursively) through the server and
        append them to a gallery (see filip_client.indexing; resumable): the folder ``gallery``
        on this machine, or with ``on_server=True`` the gallery named ``gallery`` under the
        server's gallery root, written there by filip_search (no shared filesystem needed)."""
        from .indexing import ServerGalleryWriter, index_images

        def send(inputs: list) -> dict:
            return P.parse_info(self._call(P.SEARCH_MODEL, inputs, ["INFO"], timeout, f"append to gallery {gallery!r}"))

        server = (lambda item_ids: ServerGalleryWriter(send, grpc, str(gallery), token_dtype, item_ids)) if on_server else None
        return index_images(lambda items: self.embed_images(items, batch_size=batch_size, timeout=timeout),
                            images, gallery, ids=ids, metadata=metadata, token_dtype=token_dtype,
                            commit_every=commit_every, progress=progress, server=server)

    def model_config(self, model: str) -> dict:
        """A served model's config (Triton's JSON form, cached): inputs, outputs, parameters."""
        return self._config(model)

    def default_scoring(self) -> str:
        """The served repository's scoring rule ("token" or "global"), used where a call names none."""
        return P.scoring_of(None, self._config(P.SCORE_MODEL))

    def logit_scale(self) -> float:
        """The model's similarity multiplier (exp of its logit scale), from the served config."""
        return float(self._config(P.SCORE_MODEL)["parameters"]["logit_scale"]["string_value"])

    def health(self, *, deep: bool = False, timeout: float | None = None) -> Health:
        """Server liveness/readiness and each FILIP model's readiness; with ``deep=True`` also
        one tiny real request per model (a crashed Python-backend stub still reports ready)."""
        t = self.timeout if timeout is None else timeout
        try:
            live = self._grpc.is_server_live(headers=self.headers, client_timeout=t)
            ready = self._grpc.is_server_ready(headers=self.headers, client_timeout=t)
            models = {m: self._grpc.is_model_ready(m, headers=self.headers, client_timeout=t) for m in P.MODELS}
        except Exception as e:
            raise from_triton(e, "health") from e
        canaries = None
        if deep:
            canaries = {}
            try:
                dim = P.token_dim(self._config(P.SCORE_MODEL))
            except FilipError as e:
                return Health(live, ready, models, {m: str(e) for m in P.MODELS})
            for model, (inputs, outputs) in P.canary_requests(grpc, dim).items():
                try:
                    self._call(model, inputs, outputs, t, f"canary {model}")
                    canaries[model] = None
                except FilipError as e:
                    canaries[model] = str(e)
        return Health(live, ready, models, canaries)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            self._grpc.close()
        except FilipError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _progress(enabled: bool, total: int, desc: str) -> Callable[[int | None], None]:
    """A tqdm bar when asked for (and installed); ``update(None)`` closes it."""
    if not enabled:
        return lambda n: None
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="item")
    return lambda n: bar.close() if n is None else bar.update(n)
