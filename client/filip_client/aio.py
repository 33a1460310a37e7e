"""AsyncFilipClient: the asyncio twin of :class:`filip_client.FilipClient` (same methods and
keyword-only arguments, awaitable), on ``tritonclient.grpc.aio``."""
from __future__ import annotations

import asyncio
import math
import time
from typing import Awaitable, Callable, Mapping, Sequence

import numpy as np
import tritonclient.grpc as grpc
import tritonclient.grpc.aio as grpc_aio

from . import _protocol as P
from .errors import FilipError, FilipInvalidInputError, from_triton
from .sync import _progress
from .types import Embeddings, Health, IndexReport, SearchResults


class AsyncFilipClient:
    def __init__(self, url: str = "localhost:8001", *, timeout: float | None = 60.0, concurrency: int = 4,
                 max_retries: int = 8, ssl: bool = False, root_certificates: str | None = None, private_key: str | None = None,
                 certificate_chain: str | None = None, headers: Mapping[str, str] | None = None):
        if concurrency < 1:
            raise FilipInvalidInputError("concurrency must be at least 1")
        self.url, self.timeout, self.concurrency, self.max_retries = url, timeout, concurrency, max_retries
        self.headers = dict(headers or {})
        self._grpc = grpc_aio.InferenceServerClient(url, ssl=ssl, root_certificates=root_certificates,
                                                    private_key=private_key, certificate_chain=certificate_chain)
        self._sem: asyncio.Semaphore | None = None
        self._configs: dict[str, dict] = {}

    async def _call(self, model: str, inputs: list, outputs: Sequence[str], timeout: float | None, what: str):
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        budget = self.timeout if timeout is None else timeout
        deadline = None if budget is None else time.monotonic() + budget
        attempt = 0
        while True:
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            async with self._sem:
                try:
                    return await self._grpc.infer(model, inputs, outputs=P.requested(grpc, outputs),
                                                  client_timeout=left, headers=self.headers)
                except Exception as e:
                    err = from_triton(e, what)
                    attempt += 1
                    pause = P.retry_pause(err, attempt, self.max_retries, deadline)
                    if pause is None:
                        raise err from e
            await asyncio.sleep(pause)

    async def _config(self, model: str) -> dict:
        if model not in self._configs:
            try:
                cfg = await self._grpc.get_model_config(model, as_json=True, client_timeout=self.timeout, headers=self.headers)
            except Exception as e:
                raise from_triton(e, f"model config of {model}") from e
            self._configs[model] = cfg["config"]
        return self._configs[model]

    async def _spans(self, model: str, n: int, batch_size: int) -> list[tuple[int, int]]:
        P.chunks(n, batch_size)
        cfg = await self._config(model)
        cap = min(int(cfg.get("max_batch_size", 0)) or batch_size, P.served_limits(cfg).max_items_per_request)
        return P.chunks(n, min(batch_size, cap))

    async def _map(self, fn: Callable[[int, int], Awaitable[Embeddings]], spans, progress: bool, desc: str) -> list:
        bar = _progress(progress, sum(b - a for a, b in spans), desc)

        async def tracked(a, b):
            r = await fn(a, b)
            bar(b - a)
            return r

        try:
            return list(await asyncio.gather(*(tracked(a, b) for a, b in spans)))
        finally:
            bar(None)

    async def embed_texts(self, texts: Sequence[str], *, batch_size: int = 32, timeout: float | None = None,
                          progress: bool = False) -> Embeddings:
        texts = P.check_texts(texts, P.served_limits(await self._config(P.TEXT_MODEL)).max_text_chars)

        async def one(a: int, b: int) -> Embeddings:
            res = await self._call(P.TEXT_MODEL, P.text_inputs(grpc, texts[a:b]), P.EMBED_OUTPUTS, timeout, f"texts {a}..{b - 1}")
            return P.parse_embeddings(res, P.TEXT_MODEL)

        return Embeddings.concat(await self._map(one, await self._spans(P.TEXT_MODEL, len(texts), batch_size), progress, "texts"))

    async def embed_images(self, images: Sequence[P.ImageLike], *, batch_size: int = 16, timeout: float | None = None,
                           progress: bool = False) -> Embeddings:
        images = P.check_images(images)
        max_bytes = P.served_limits(await self._config(P.IMAGE_MODEL)).max_image_bytes
        blobs = [P.encode_image(im, i, max_bytes) for i, im in enumerate(images)]

        async def one(a: int, b: int) -> Embeddings:
            res = await self._call(P.IMAGE_MODEL, P.image_inputs(grpc, blobs[a:b]), P.EMBED_OUTPUTS, timeout, f"images {a}..{b - 1}")
            return P.parse_embeddings(res, P.IMAGE_MODEL)

        return Embeddings.concat(await self._map(one, await self._spans(P.IMAGE_MODEL, len(blobs), batch_size), progress, "images"))

    async def score(self, images: Embeddings, texts: Embeddings, *, direction: str = "i2t",
                    scoring: str | None = None, timeout: float | None = None) -> np.ndarray:
        """[n_img, n_txt]. ``scoring="token"``: late interaction, s_I (``direction="i2t"``:
        rank texts for an image) or s_T (``"t2i"``); ``"global"``: cosine of the pooled
        embeddings. ``None``: the served repository's rule (its checkpoint's)."""
        scoring = P.scoring_of(scoring, await self._config(P.SCORE_MODEL))
        inputs, name = P.score_request(grpc, images, texts, direction, scoring)
        res = await self._call(P.SCORE_MODEL, inputs, [name], timeout, "score")
        return P.output(res, name, P.SCORE_MODEL)

    async def classify(self, images: Embeddings | Sequence[P.ImageLike], labels: Sequence[str], *,
                       templates: Sequence[str] = P.DEFAULT_TEMPLATES, mode: str = "mean", scoring: str | None = None,
                       timeout: float | None = None) -> np.ndarray:
        """Zero-shot scores [n_img, n_labels]. ``scoring="token"`` (FILIP): the mean of s_I over
        the prompt templates (``mode="mean"``), or the mean of per-template softmax
        probabilities ("softmax"). ``"global"`` (CLIP's rule): per class the mean of the
        normalised template embeddings, renormalised, and its cosine with each image
        (``mode="mean"`` only). ``None``: the served repository's rule."""
        scoring = P.scoring_of(scoring, await self._config(P.SCORE_MODEL))
        if scoring == "global" and mode != "mean":
            raise FilipInvalidInputError(f"mode {mode!r} applies to token scoring; global zero-shot is CLIP's "
                                         "mean of template embeddings (mode='mean')")
        prompts = P.build_prompts(labels, templates)
        if not isinstance(images, Embeddings):
            images = await self.embed_images(images, timeout=timeout)
        texts = await self.embed_texts(prompts, timeout=timeout)
        if scoring == "global":
            P.check_embeddings(images, "images")
            classes = P.zero_shot_classes(texts, len(labels), len(templates))
            res = await self._call(P.SCORE_MODEL, P.pooled_score_inputs(grpc, images.pooled, classes), ["COSINE"],
                                  timeout, "classify")
            return P.output(res, "COSINE", P.SCORE_MODEL)
        s_i = await self.score(images, texts, scoring="token", timeout=timeout)
        scale = await self.logit_scale() if mode == "softmax" else 1.0
        return P.aggregate_zero_shot(s_i, len(labels), len(templates), mode, scale)

    async def alignment(self, image: Embeddings, text: Embeddings, *, timeout: float | None = None) -> np.ndarray:
        P.check_embeddings(image, "image")
        P.check_embeddings(text, "text")
        res = await self._call(P.SCORE_MODEL, P.score_inputs(grpc, image[0], text[0]), ["ALIGNMENT"], timeout, "alignment")
        amap = P.output(res, "ALIGNMENT", P.SCORE_MODEL)[0, 0]
        g = math.isqrt(amap.shape[0])
        return amap.reshape(g, g) if g * g == amap.shape[0] else amap

    async def search(self, texts: Sequence[str], *, k: int = P.L.DEFAULT_K, mode: str = P.L.DEFAULT_MODE, candidates: int | None = None,
                     allowed_ids: Sequence[str] | None = None, scoring: str | None = None,
                     timeout: float | None = None) -> SearchResults:
        texts = P.check_texts(texts, P.served_limits(await self._config(P.TEXT_MODEL)).max_text_chars)
        out = SearchResults()
        if allowed_ids is not None and len(allowed_ids) == 0:
            out.extend([] for _ in texts)
            return out
        for a, b in P.chunks(len(texts), P.L.MAX_QUERIES):
            res = await self._call(P.SEARCH_MODEL, P.search_inputs(grpc, texts[a:b], k, mode, candidates, allowed_ids, scoring),
                                   P.SEARCH_OUTPUTS, timeout, f"search texts {a}..{b - 1}")
            hits, info = P.parse_hits(res)
            out.extend(hits)
            out.info.append(info)
        return out

    async def gallery_info(self, *, timeout: float | None = None) -> dict:
        """Which gallery filip_search serves: name, count, segments, ... (name None and
        load_error set when none is loaded)."""
        res = await self._call(P.SEARCH_MODEL, P.status_inputs(grpc), ["INFO"], timeout, "gallery info")
        return P.parse_info(res)

    async def reload_gallery(self, name: str, *, timeout: float | None = None) -> dict:
        res = await self._call(P.SEARCH_MODEL, P.reload_inputs(grpc, name), ["INFO"], timeout, f"reload gallery {name!r}")
        return P.parse_info(res)

    async def index_images(self, images, gallery, *, ids=None, metadata=None, token_dtype: str = "float16",
                           batch_size: int = 16, commit_every: int = 256, progress: bool = True,
                           on_server: bool = False, timeout: float | None = None) -> IndexReport:
        """As FilipClient.index_images: the file writing runs in a worker thread, the requests
        on this event loop."""
        from .indexing import ServerGalleryWriter, index_images
        loop = asyncio.get_running_loop()

        def embed(items):
            coro = self.embed_images(items, batch_size=batch_size, timeout=timeout)
            return asyncio.run_coroutine_threadsafe(coro, loop).result()

        def send(inputs: list) -> dict:
            coro = self._call(P.SEARCH_MODEL, inputs, ["INFO"], timeout, f"append to gallery {gallery!r}")
            return P.parse_info(asyncio.run_coroutine_threadsafe(coro, loop).result())

        server = (lambda item_ids: ServerGalleryWriter(send, grpc, str(gallery), token_dtype, item_ids)) if on_server else None
        return await loop.run_in_executor(None, lambda: index_images(
            embed, images, gallery, ids=ids, metadata=metadata, token_dtype=token_dtype,
            commit_every=commit_every, progress=progress, server=server))

    async def model_config(self, model: str) -> dict:
        """A served model's config (Triton's JSON form, cached): inputs, outputs, parameters."""
        return await self._config(model)

    async def default_scoring(self) -> str:
        """The served repository's scoring rule ("token" or "global"), used where a call names none."""
        return P.scoring_of(None, await self._config(P.SCORE_MODEL))

    async def logit_scale(self) -> float:
        return float((await self._config(P.SCORE_MODEL))["parameters"]["logit_scale"]["string_value"])

    async def health(self, *, deep: bool = False, timeout: float | None = None) -> Health:
        t = self.timeout if timeout is None else timeout
        try:
            live = await self._grpc.is_server_live(headers=self.headers, client_timeout=t)
            ready = await self._grpc.is_server_ready(headers=self.headers, client_timeout=t)
            models = {m: await self._grpc.is_model_ready(m, headers=self.headers, client_timeout=t) for m in P.MODELS}
        except Exception as e:
            raise from_triton(e, "health") from e
        canaries = None
        if deep:
            canaries = {}
            try:
                dim = P.token_dim(await self._config(P.SCORE_MODEL))
            except FilipError as e:
                return Health(live, ready, models, {m: str(e) for m in P.MODELS})
            for model, (inputs, outputs) in P.canary_requests(grpc, dim).items():
                try:
                    await self._call(model, inputs, outputs, t, f"canary {model}")
                    canaries[model] = None
                except FilipError as e:
                    canaries[model] = str(e)
        return Health(live, ready, models, canaries)

    async def close(self) -> None:
        await self._grpc.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
