"""The OpenAI-compatible HTTP gateway: an ASGI app (FastAPI) in front of the served FILIP models,
talking to Triton through :class:`filip_client.AsyncFilipClient` (gRPC).  No torch, no engine.

    from filip_gateway.app import GatewaySettings, create_app
    app = create_app(GatewaySettings(triton="localhost:8001", api_keys=("sk-1",)))

Endpoints and fields: README.md, "HTTP gateway".
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from filip_client import AsyncFilipClient, Embeddings
from filip_client import _protocol as P
from filip_client.errors import FilipError, FilipInvalidInputError
from filip_contract.limits import ServingLimits
from filip_contract.prompts import DEFAULT_TEMPLATES

from . import explain as X
from .errors import GatewayError, bad_request, from_filip, too_large

log = logging.getLogger("filip_gateway")
_DATA_URI = re.compile(r"^data:(?P<mime>[A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+)?(?P<params>(?:;[^,;]*)*),(?P<data>.*)$", re.DOTALL)
_LOOKS_LIKE_DATA_URI = re.compile(r"^data:[A-Za-z0-9.+-]+/[A-Za-z0-9.+-]+[;,]")
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/=\s_-]*$")


@dataclass(frozen=True)
class GatewaySettings:
    triton: str = "localhost:8001"
    api_keys: tuple[str, ...] = ()          # empty: no authentication
    cors: tuple[str, ...] = ()
    model_name: str = "filip"
    max_body_bytes: int = 64 * 1024 * 1024  # cap; the served limits may make it smaller
    image_roots: tuple[str, ...] = ()       # empty: any path a gallery records may be read
    timeout: float = 60.0
    concurrency: int = 32                   # gRPC calls in flight from the gateway
    client_kwargs: dict = field(default_factory=dict)   # extra AsyncFilipClient arguments (ssl, headers, ...)


# --- request bodies -------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FilipExtension(_Strict):
    tokens: StrictBool = False


class EmbeddingsRequest(_Strict):
    input: Union[StrictStr, list[StrictStr]]
    model: Optional[StrictStr] = None
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[StrictStr] = None
    dimensions: Optional[StrictInt] = None
    filip: Optional[FilipExtension] = None


class ScoreRequest(_Strict):
    images: list[StrictStr]
    texts: list[StrictStr]
    direction: Literal["i2t", "t2i"] = "i2t"
    scoring: Optional[Literal["token", "global"]] = None
    model: Optional[StrictStr] = None


class ClassifyRequest(_Strict):
    images: list[StrictStr]
    labels: list[StrictStr]
    templates: Optional[list[StrictStr]] = None
    mode: Literal["mean", "softmax"] = "mean"
    scoring: Optional[Literal["token", "global"]] = None
    model: Optional[StrictStr] = None


class SearchRequest(_Strict):
    query: Union[StrictStr, list[StrictStr]]
    k: StrictInt = 10
    mode: Literal["exact", "two_stage"] = "exact"
    candidates: Optional[StrictInt] = None
    allowed_ids: Optional[list[StrictStr]] = None
    scoring: Optional[Literal["token", "global"]] = None
    explain: StrictBool = False
    model: Optional[StrictStr] = None


class ExplainRequest(_Strict):
    text: StrictStr
    image: Optional[StrictStr] = None
    item_id: Optional[StrictStr] = None
    render: StrictBool = False
    render_size: Optional[StrictInt] = None
    model: Optional[StrictStr] = None


MAX_EXPLAINED_HITS = 64


# --- the gateway's state --------------------------------------------------------------------------
class Gateway:
    """What one app holds: the gRPC client, the served limits and sizes, caches, metrics."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.client: AsyncFilipClient | None = None
        self.limits = ServingLimits()
        self.image_side: int | None = None
        self.default_scoring: str | None = None
        self.paths: OrderedDict[str, str] = OrderedDict()      # gallery item id -> recorded path
        self.word_counts: OrderedDict[str, int] = OrderedDict()  # word -> BPE tokens
        self.registry = CollectorRegistry()
        self.requests = Counter("filip_gateway_requests_total", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("filip_gateway_request_seconds", "request latency by endpoint", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                                 registry=self.registry)
        self.errors = Counter("filip_gateway_errors_total", "error responses by endpoint, status and error code",
                              ["endpoint", "status", "code"], registry=self.registry)
        self.items = Counter("filip_gateway_items_total", "embedded items by kind", ["kind"], registry=self.registry)

    async def start(self) -> None:
        s = self.settings
        self.client = AsyncFilipClient(s.triton, timeout=s.timeout, concurrency=s.concurrency, **s.client_kwargs)
        try:
            await self.load_config()
        except FilipError as e:          # the server may come up later; configs are read again on use
            log.warning("cannot read the served configs yet: %s", e)

    async def load_config(self) -> None:
        c = self.client
        cfg = await c.model_config(P.IMAGE_MODEL)
        self.limits = P.served_limits(cfg)
        for inp in cfg.get("input", []):
            if inp.get("name") == "PIXEL_VALUES":
                self.image_side = int(inp["dims"][-1])
        self.default_scoring = await c.default_scoring()

    async def side(self) -> int:
        if self.image_side is None:
            await self.load_config()
        if self.image_side is None:
            raise GatewayError(503, "filip_image publishes no PIXEL_VALUES input: the image side is unknown",
                               code="server_error")
        return self.image_side

    @property
    def max_body(self) -> int:
        b64_image = (self.limits.max_image_bytes + 2) // 3 * 4
        return min(self.settings.max_body_bytes, self.limits.max_items_per_request * b64_image + 64 * 1024)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()

    def remember(self, item_id: str, metadata: dict) -> None:
        path = metadata.get("path") if isinstance(metadata, dict) else None
        if isinstance(path, str):
            self.paths[item_id] = path
            self.paths.move_to_end(item_id)
            while len(self.paths) > 100_000:
                self.paths.popitem(last=False)


# --- input decoding ---------------------------------------------------------------------------------
def _b64decode(data: str, param: str, max_bytes: int) -> bytes:
    data = data.strip()
    if len(data) // 4 * 3 > max_bytes + 3:
        raise too_large(f"{param}: the image has about {len(data) // 4 * 3} bytes; the limit is {max_bytes}", param)
    if not _B64_CHARS.match(data):
        raise bad_request(f"{param}: not valid base64", param, "invalid_base64")
    compact = "".join(data.split())
    try:
        if "-" in compact or "_" in compact:
            raw = base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        else:
            raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: not valid base64", param, "invalid_base64") from None
    if not raw:
        raise bad_request(f"{param}: the image is empty (0 bytes)", param, "invalid_image")
    if len(raw) > max_bytes:
        raise too_large(f"{param}: the image has {len(raw)} bytes; the limit is {max_bytes}", param)
    return raw


def is_data_uri(s: str) -> bool:
    return bool(_LOOKS_LIKE_DATA_URI.match(s))


def decode_data_uri(s: str, param: str, max_bytes: int) -> bytes:
    m = _DATA_URI.match(s)
    if not m:
        raise bad_request(f"{param}: a malformed data URI", param, "invalid_data_uri")
    mime = (m.group("mime") or "").lower()
    if not mime.startswith("image/"):
        raise bad_request(f"{param}: a data URI of type {mime or 'text/plain'!r}; only image/* data URIs are accepted",
                          param, "invalid_data_uri")
    if "base64" not in [p.strip().lower() for p in m.group("params").split(";")]:
        raise bad_request(f"{param}: an image data URI must be base64-encoded (data:{mime};base64,...)", param,
                          "invalid_data_uri")
    return _b64decode(m.group("data"), param, max_bytes)


def decode_image(s: str, param: str, max_bytes: int) -> bytes:
    """An image given as a data URI or as bare base64."""
    return decode_data_uri(s, param, max_bytes) if s.startswith("data:") else _b64decode(s, param, max_bytes)


def _validated(cls, data: Any):
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()) if not str(x).startswith(("str", "list[", "function")))
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        raise bad_request(f"{loc or 'body'}: {msg}", loc or None, "invalid_type" if err.get("type") != "extra_forbidden"
                          else "unknown_parameter") from None


async def _body(request: Request, cls):
    raw = await request.body()
    try:
        import json
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the body is not valid JSON", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object", None, "invalid_json")
    return _validated(cls, data)


def _vector(a: np.ndarray, fmt: str):
    a = np.ascontiguousarray(a, dtype="<f4")
    return base64.b64encode(a.tobytes()).decode("ascii") if fmt == "base64" else a.tolist()


def _check_count(n: int, limits: ServingLimits, param: str) -> None:
    if n == 0:
        raise bad_request(f"{param} is empty", param, "empty_input")
    if n > limits.max_items_per_request:
        raise bad_request(f"{param} has {n} items; the limit is {limits.max_items_per_request} per request", param,
                          "too_many_items")


def _check_text(t: str, i: int | None, limits: ServingLimits, param: str) -> None:
    where = param if i is None else f"{param}[{i}]"
    if not t.strip():
        raise bad_request(f"{where} is an empty text", where, "empty_input")
    if len(t) > limits.max_text_chars:
        raise bad_request(f"{where} has {len(t)} characters; the limit is {limits.max_text_chars}", where,
                          "text_too_long")


# --- the app ---------------------------------------------------------------------------------------
def create_app(settings: GatewaySettings) -> FastAPI:
    gw = Gateway(settings)

    @asynccontextmanager
    async def lifespan(app):
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(title="FILIP gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw

    def error_response(e: GatewayError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, e: GatewayError):
        request.state.error_code = e.code
        return error_response(e)

    @app.exception_handler(FilipError)
    async def _filip_error(request: Request, e: FilipError):
        g = from_filip(e)
        request.state.error_code = g.code
        return error_response(g)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))
        g = bad_request(f"{loc or 'request'}: {err.get('msg', 'invalid')}", loc or None, "invalid_type")
        request.state.error_code = g.code
        return error_response(g)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        g = GatewayError(e.status_code, str(e.detail), code=code)
        request.state.error_code = g.code
        return error_response(g)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        """The last line: a bug is logged with its traceback and answered with a 500 naming a
        request id; nothing of the exception reaches the caller."""
        if isinstance(e, ClientDisconnect):   # the body limit refused it (413 sent), or the caller left
            return Response(status_code=499)
        rid = uuid.uuid4().hex[:12]
        log.error("internal error in %s %s (request %s)", request.method, request.url.path, rid, exc_info=e)
        request.state.error_code = "internal_error"
        return error_response(GatewayError(500, f"internal error (request {rid}); see the gateway's log",
                                           code="internal_error"))

    async def refuse(scope, receive, send, e: GatewayError) -> None:
        scope.setdefault("state", {})["error_code"] = e.code
        await error_response(e)(scope, receive, send)

    def checks(inner):
        """Authentication and the declared body size, before anything reads the body (inside
        CORS, so that a 401 or 413 carries its headers)."""
        async def app_(scope, receive, send):
            if scope["type"] != "http":
                return await inner(scope, receive, send)
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
            if settings.api_keys and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS":
                try:
                    _authenticate(headers.get("authorization", ""), settings.api_keys)
                except GatewayError as e:
                    return await refuse(scope, receive, send, e)
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > gw.max_body:
                return await refuse(scope, receive, send, too_large(
                    f"the request body has {int(length)} bytes; the limit is {gw.max_body}"))
            return await inner(scope, receive, send)
        return app_

    class _Checks:                          # as a Starlette middleware class
        def __init__(self, app):
            self.run = checks(app)

        async def __call__(self, scope, receive, send):
            await self.run(scope, receive, send)

    app.add_middleware(_Checks)
    if settings.cors:                      # outside the checks: a 401 or 413 carries the CORS headers too
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])

    # Outermost (plain ASGI, around Starlette's own error middleware): metrics for every
    # response, and the body limit while reading (a body without Content-Length): past the
    # limit the 413 is sent from here, the app reads a disconnect and what it sends is dropped.
    inner_stack = app.build_middleware_stack

    def build():
        stack = inner_stack()

        async def outer(scope, receive, send):
            if scope["type"] != "http":
                return await stack(scope, receive, send)
            t0 = time.perf_counter()
            seen, status = 0, [500]

            async def counted():
                nonlocal seen
                if scope.get("filip.refused"):
                    return {"type": "http.disconnect"}
                msg = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > gw.max_body:
                        scope["filip.refused"] = True
                        status[0] = 413
                        await refuse(scope, receive, send, too_large(
                            f"the request body has more than {gw.max_body} bytes; the limit is {gw.max_body}"))
                        return {"type": "http.disconnect"}
                return msg

            async def watched(msg):
                if scope.get("filip.refused"):
                    return
                if msg["type"] == "http.response.start":
                    status[0] = msg["status"]
                await send(msg)

            try:
                await stack(scope, counted, watched)
            except ClientDisconnect:
                if not scope.get("filip.refused"):
                    status[0] = 499
            except Exception:
                pass                   # logged and answered by _bug (Starlette re-raises it afterwards)
            finally:
                endpoint = _endpoint(app, scope)
                gw.requests.labels(endpoint, scope["method"], str(status[0])).inc()
                gw.latency.labels(endpoint).observe(time.perf_counter() - t0)
                if status[0] >= 400:
                    code = scope.get("state", {}).get("error_code") or ("payload_too_large" if status[0] == 413 else "http_error")
                    gw.errors.labels(endpoint, str(status[0]), code).inc()

        return outer

    app.build_middleware_stack = build

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise GatewayError(404, f"the model {name!r} does not exist; this gateway serves {settings.model_name!r}",
                               code="model_not_found", param="model")

    # --- open endpoints ---------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("filip_gateway").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/health")
    async def health():
        try:
            h = await gw.client.health(deep=True, timeout=10)
        except FilipError as e:
            return JSONResponse({"ok": False, "error": str(e)}, status_code=503)
        body = {"ok": h.ok, "live": h.live, "ready": h.ready, "models": h.models, "canaries": h.canaries,
                "triton": settings.triton}
        return JSONResponse(body, status_code=200 if h.ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(gw.registry), media_type=CONTENT_TYPE_LATEST)

    # --- OpenAI ------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "filip"}]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req = await _body(request, EmbeddingsRequest)
        check_model(req.model)
        items = [req.input] if isinstance(req.input, str) else req.input
        lim = gw.limits
        _check_count(len(items), lim, "input")
        texts, images = [], []          # (position, value)
        for i, s in enumerate(items):
            param = "input" if isinstance(req.input, str) else f"input[{i}]"
            if is_data_uri(s):
                images.append((i, decode_data_uri(s, param, lim.max_image_bytes)))
            else:
                _check_text(s, None if isinstance(req.input, str) else i, lim, "input")
                texts.append((i, s))
        t_emb, i_emb = await asyncio.gather(
            gw.client.embed_texts([t for _, t in texts]) if texts else _none(),
            gw.client.embed_images([b for _, b in images]) if images else _none())
        if req.dimensions is not None:
            dim = (t_emb or i_emb).pooled.shape[1]
            if req.dimensions != dim:
                raise bad_request(f"dimensions: this model's embeddings have {dim} dimensions", "dimensions",
                                  "invalid_value")
        gw.items.labels("text").inc(len(texts))
        gw.items.labels("image").inc(len(images))
        out: list[dict | None] = [None] * len(items)
        want_tokens = bool(req.filip and req.filip.tokens)
        for emb, group in ((t_emb, texts), (i_emb, images)):
            for j, (pos, _) in enumerate(group):
                d = {"object": "embedding", "index": pos, "embedding": _vector(emb.pooled[j], req.encoding_format)}
                if want_tokens:
                    n = int(emb.lengths[j])
                    d["filip"] = {"kind": "text" if emb is t_emb else "image", "length": n,
                                  "shape": [n, int(emb.tokens.shape[2])],
                                  "tokens": _vector(emb.tokens[j, :n], req.encoding_format)}
                out[pos] = d
        prompt_tokens = int(t_emb.lengths.sum()) if t_emb is not None else 0
        return {"object": "list", "data": out, "model": settings.model_name,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}

    # --- FILIP's own -------------------------------------------------------------------------------
    def decode_images(values: list[str], param: str) -> list[bytes]:
        _check_count(len(values), gw.limits, param)
        return [decode_image(v, f"{param}[{i}]", gw.limits.max_image_bytes) for i, v in enumerate(values)]

    def check_texts(values: list[str], param: str) -> None:
        _check_count(len(values), gw.limits, param)
        for i, t in enumerate(values):
            _check_text(t, i, gw.limits, param)

    @app.post("/v1/score")
    async def score(request: Request):
        req = await _body(request, ScoreRequest)
        check_model(req.model)
        blobs = decode_images(req.images, "images")
        check_texts(req.texts, "texts")
        img, txt = await asyncio.gather(gw.client.embed_images(blobs), gw.client.embed_texts(req.texts))
        scoring = req.scoring or await gw.client.default_scoring()
        s = await gw.client.score(img, txt, direction=req.direction, scoring=scoring)
        return {"object": "score", "model": settings.model_name, "scoring": scoring,
                "direction": req.direction if scoring == "token" else None, "scores": s.tolist()}

    @app.post("/v1/classify")
    async def classify(request: Request):
        req = await _body(request, ClassifyRequest)
        check_model(req.model)
        blobs = decode_images(req.images, "images")
        check_texts(req.labels, "labels")
        templates = tuple(req.templates) if req.templates is not None else DEFAULT_TEMPLATES
        if not templates or any("{}" not in t for t in templates):
            raise bad_request("templates: each template must hold one '{}' for the label", "templates")
        scoring = req.scoring or await gw.client.default_scoring()
        s = await gw.client.classify(blobs, req.labels, templates=templates, mode=req.mode, scoring=scoring)
        return {"object": "classification", "model": settings.model_name, "scoring": scoring, "mode": req.mode,
                "labels": req.labels, "scores": s.tolist(),
                "predictions": [req.labels[int(i)] for i in np.argmax(s, axis=1)]}

    @app.post("/v1/search")
    async def search(request: Request):
        req = await _body(request, SearchRequest)
        check_model(req.model)
        queries = [req.query] if isinstance(req.query, str) else req.query
        check_texts(queries, "query")
        res = await gw.client.search(queries, k=req.k, mode=req.mode, candidates=req.candidates,
                                     allowed_ids=req.allowed_ids, scoring=req.scoring)
        results = []
        for hits in res:
            row = []
            for h in hits:
                gw.remember(h.id, h.metadata)
                row.append({"id": h.id, "score": h.score, "metadata": h.metadata})
            results.append(row)
        if req.explain:
            n = sum(len(r) for r in results)
            if n > MAX_EXPLAINED_HITS:
                raise bad_request(f"explain: {n} hits to explain; at most {MAX_EXPLAINED_HITS} per request "
                                  "(fewer queries or a smaller k)", "explain")
            await asyncio.gather(*(_explain_hits(gw, q, row) for q, row in zip(queries, results)))
        scoring = (res.info[0].get("scoring") if res.info else None) or req.scoring or gw.default_scoring
        return {"object": "search", "model": settings.model_name, "scoring": scoring,
                "results": results if isinstance(req.query, list) else results[0] if results else [],
                "info": res.info}

    @app.post("/v1/explain")
    async def explain(request: Request):
        req = await _body(request, ExplainRequest)
        check_model(req.model)
        _check_text(req.text, None, gw.limits, "text")
        if (req.image is None) == (req.item_id is None):
            raise bad_request("give exactly one of image (a data URI or base64) and item_id (a gallery item)", "image")
        if req.render_size is not None and not 8 <= req.render_size <= 1024:
            raise bad_request("render_size must be in 8..1024", "render_size")
        if req.image is not None:
            blob = decode_image(req.image, "image", gw.limits.max_image_bytes)
        else:
            blob = await _read_item(gw, req.item_id)
        img, txt = await _embed_pair(gw, blob, req.text)
        labels = await _labels(gw, req.text, int(txt.lengths[0]))
        s_t_served, alignment = await asyncio.gather(
            gw.client.score(img, txt, scoring="token", direction="t2i"), gw.client.alignment(img, txt))
        body = _explanation(img, txt, labels)
        body.update({"object": "explanation", "model": settings.model_name, "text": req.text,
                     "item_id": req.item_id, "s_t_served": float(s_t_served[0, 0]),
                     "patch_alignment": np.asarray(alignment).reshape(body["grid"]).tolist()})
        side = await gw.side()
        body["image_size"] = side
        if req.render:
            try:
                view = X.model_view(blob, req.render_size or side)
            except Exception as e:           # the server embedded it, Pillow here cannot draw it
                raise bad_request(f"image: cannot render this image here: {type(e).__name__}", "image",
                                  "invalid_image") from None
            for t in body["tokens"]:
                t["overlay_png"] = X.overlay_png(view, np.asarray(t["heatmap"]))
        return body

    @app.get("/v1/gallery/image")
    async def gallery_image(request: Request, id: str, size: int = 224):
        if not 8 <= size <= 1024:
            raise bad_request("size must be in 8..1024", "size")
        blob = await _read_item(gw, id)
        try:
            view = X.model_view(blob, size)
        except Exception as e:
            raise GatewayError(404, f"the image of item {id!r} cannot be decoded here: {type(e).__name__}",
                               code="image_unavailable", param="id") from None
        import io
        buf = io.BytesIO()
        view.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    return app


def _endpoint(app: FastAPI, scope) -> str:
    """The route's path template for the metrics' labels (one label per endpoint, not per URL),
    also for a request refused before routing (401, 413)."""
    route = scope.get("route")
    if getattr(route, "path", None):
        return route.path
    for r in app.routes:
        if getattr(r, "path", None) and r.matches(scope)[0] == Match.FULL:
            return r.path
    return "unmatched"


async def _none():
    return None


def _authenticate(auth: str, keys: tuple[str, ...]) -> None:
    scheme, _, token = auth.partition(" ")
    token = token.strip()
    ok = scheme.lower() == "bearer" and token and any(hmac.compare_digest(token.encode(), k.encode()) for k in keys)
    if not ok:
        msg = ("no API key given: send 'Authorization: Bearer KEY'" if not auth else
               "incorrect API key provided")
        raise GatewayError(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _embed_pair(gw: Gateway, blob: bytes, text: str) -> tuple[Embeddings, Embeddings]:
    return tuple(await asyncio.gather(gw.client.embed_images([blob]), gw.client.embed_texts([text])))


async def _labels(gw: Gateway, text: str, n: int) -> tuple[int, list[str], list[int] | None]:
    """(served length n, words, BPE tokens per word or None): see filip_gateway.explain."""
    words = X.words_of(text)[:75]
    if len(words) == n - 2:
        return n, words, [1] * len(words)
    todo = [w for w in dict.fromkeys(words) if w not in gw.word_counts]
    if todo:
        emb = await gw.client.embed_texts(todo)
        for w, length in zip(todo, emb.lengths):
            gw.word_counts[w] = int(length) - 2
            while len(gw.word_counts) > 50_000:
                gw.word_counts.popitem(last=False)
    counts = [gw.word_counts[w] for w in words]
    return n, words, counts if sum(counts) >= n - 2 else None


def _explanation(img: Embeddings, txt: Embeddings, labels, *, heatmaps: bool = True) -> dict:
    n, words, counts = labels
    x = img.tokens[0, :int(img.lengths[0])]
    y = txt.tokens[0, :int(txt.lengths[0])]
    e = X.explain_pair(x, y)
    tokens, out_words, exact = X.label_tokens(y.shape[0], words, counts)
    for t in tokens:
        r = t["index"]
        t["contribution"] = float(e["contributions"][r])
        t["best_patch"] = int(e["best_patch"][r])
        t["best_patch_rc"] = [int(v) for v in e["best_rc"][r]]
        if heatmaps:
            t["heatmap"] = X.heatmap_grid(e["sim"], r, e["grid"]).tolist()
    for w in out_words:
        w["contribution"] = float(sum(e["contributions"][i] for i in w["tokens"]))
    return {"s_t": e["s_t"], "grid": list(e["grid"]), "n_text_tokens": int(y.shape[0]), "labels_exact": exact,
            "tokens": tokens, "words": out_words}


def _allowed_path(gw: Gateway, path: str) -> bool:
    if not gw.settings.image_roots:
        return True
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep)
               for r in (os.path.realpath(x) for x in gw.settings.image_roots))


async def _read_item(gw: Gateway, item_id: str) -> bytes:
    """The bytes of a gallery item's image, from the path its metadata records."""
    path = gw.paths.get(item_id)
    if path is None:
        res = await gw.client.search(["a photo"], k=1, allowed_ids=[item_id])
        if not res[0]:
            raise GatewayError(404, f"the gallery has no item {item_id!r}", code="item_not_found", param="item_id")
        gw.remember(item_id, res[0][0].metadata)
        path = gw.paths.get(item_id)
        if path is None:
            raise GatewayError(404, f"item {item_id!r} records no path: the gateway cannot show or explain its image",
                               code="image_unavailable", param="item_id")
    if not _allowed_path(gw, path):
        raise GatewayError(404, f"the image of item {item_id!r} lies outside the gateway's image roots",
                           code="image_unavailable", param="item_id")
    try:
        data = await asyncio.to_thread(Path(path).read_bytes)
    except OSError as e:
        raise GatewayError(404, f"the gateway cannot read the image of item {item_id!r}: {e.strerror or type(e).__name__}",
                           code="image_unavailable", param="item_id") from None
    if len(data) > gw.limits.max_image_bytes:
        raise too_large(f"the image of item {item_id!r} has {len(data)} bytes; the limit is {gw.limits.max_image_bytes}",
                        "item_id")
    return data


async def _explain_hits(gw: Gateway, query: str, row: list[dict]) -> None:
    """Per-word contributions and heatmaps for each hit whose image the gateway can read;
    a hit it cannot read gets ``explain: null`` and ``image_error`` (why)."""
    if not row:
        return
    blobs: list[tuple[dict, bytes]] = []
    for hit in row:
        try:
            blobs.append((hit, await _read_item(gw, hit["id"])))
        except GatewayError as e:
            hit["explain"], hit["image_error"] = None, e.message
    if not blobs:
        return
    txt = await gw.client.embed_texts([query])
    labels = await _labels(gw, query, int(txt.lengths[0]))
    try:
        embs = [await gw.client.embed_images([b for _, b in blobs])]
        pairs = [(hit, embs[0][j]) for j, (hit, _) in enumerate(blobs)]
    except FilipInvalidInputError:          # one unreadable image: embed them one by one
        pairs = []
        for hit, b in blobs:
            try:
                pairs.append((hit, await gw.client.embed_images([b])))
            except FilipInvalidInputError as e:
                hit["explain"], hit["image_error"] = None, f"the server cannot decode this item's image: {e}"
    for hit, emb in pairs:
        hit["explain"] = _explanation(emb, txt, labels)
