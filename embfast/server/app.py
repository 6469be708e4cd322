"""The FastAPI app of ``embfast serve``: :func:`create_app` wires the models, their batchers, the guard
(API key, latency, status counts) and every API family's routes."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from pathlib import Path
from types import SimpleNamespace

from embfast.search_corpus import SearchCorpus
from embfast.server.common import (
    _ENDPOINTS,
    DEFAULT_MAX_INPUTS,
    DEFAULT_MAX_REQUEST_BYTES,
    ApiError,
    TokenIdDecoder,
    _decode_json,
    _dumps,
    _read_body,
    error_body,
)
from embfast.server.metrics import Metrics
from embfast.text import InvalidTextError

log = logging.getLogger(__name__)

# The error body each route's clients parse (TEI's and Cohere's routes answer in their API's shape).
TEI_PATHS = frozenset({"/", "/embed", "/embed_all", "/similarity", "/tokenize", "/decode", "/invocations",
                       "/rerank", "/predict", "/embed_sparse"})
COHERE_PATHS = frozenset({"/v1/embed", "/v2/embed"})


def family_of(path: str) -> str:
    """"tei", "cohere" or "openai": the API family whose error shape ``path`` answers in."""
    if path in TEI_PATHS:
        return "tei"
    return "cohere" if path in COHERE_PATHS else "openai"


class _Guard:
    """ASGI middleware: API key check (all but /health), request latency and status counts."""

    def __init__(self, app, *, api_key: str | None, metrics: Metrics, max_request_bytes: int):
        self.app, self.api_key, self.metrics, self.limit = app, api_key, metrics, max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path != "/health" and not self._authorized(scope):
                await self._drain(receive)
                err = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                               code="unauthorized", type_="authentication_error")
                self.metrics.inc("embfast_errors_total", (err.code,))
                body = error_body(err, family_of(path))
                await send_status({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer")]})
                await send_status({"type": "http.response.body", "body": body})
                return
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(endpoint, time.perf_counter() - t0)
            self.metrics.inc("embfast_requests_total", (endpoint, str(status[0])))

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                           self.api_key.encode())
        return False

    async def _drain(self, receive) -> None:
        size = 0
        while size <= self.limit:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            size += len(msg.get("body", b""))
            if not msg.get("more_body"):
                return


def create_app(embedder, *, batcher=None, max_batch_tokens: int = 16384, max_wait_ms: float = 2.0,
               max_queue: int = 1024, dynamic_batching: bool = True, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_inputs: int = DEFAULT_MAX_INPUTS, api_key: str | None = None, corpus=None, corpus_texts=None,
               model_name: str | None = None, reranker=None, strict_requests: bool = False,
               token_ids: str | None = None, sparse=None):
    """Build the FastAPI app serving ``embedder``.

    Args:
        embedder: an :class:`~embfast.Embedder`, or a :class:`~embfast.CrossEncoder` for a server that
            only reranks (its embedding routes then answer 424), or None with ``reranker``.
        batcher: a :class:`~embfast.dynamic.DynamicBatcher` to use (the caller
            closes it); default: the app makes one from the arguments below
            (``app.state.batcher``) and closes it at shutdown, after in-flight
            requests, so such an app serves once.
        max_batch_tokens / max_wait_ms / max_queue: the batcher's (see DynamicBatcher).
        dynamic_batching: False runs each request in ONNX Runtime calls of its own (for comparison).
        max_request_bytes: largest request body, in bytes (default 2 MB); larger: 413.
        max_inputs: most strings per request (default 2048, as OpenAI).
        api_key: when set, every endpoint but /health needs ``Authorization: Bearer <api_key>``.
        corpus: for /v1/search: an .npy file of (n, dim) embeddings (dim at most the model's;
            queries are cut to it), an (n, dim) array, an embfast index file (``embfast.Index``,
            built with this model) or an :class:`embfast.Index`.
        corpus_texts: for vectors: a file with one text per line (or a list of str), one per row.
        model_name: the name answers carry (default: the model folder's name).
        reranker: a :class:`~embfast.CrossEncoder` for /rerank, /predict and /v1/rerank (default None: those
            answer 424). It gets a DynamicBatcher of its own, with the same settings, closed at shutdown.
        sparse: a :class:`~embfast.SparseEncoder` for TEI's /embed_sparse (:mod:`embfast.server.sparse`), or
            as ``embedder`` for a server that only serves it; a batcher of its own, as ``reranker``'s.
        strict_requests: refuse (422) request fields the route does not know; default False ignores them (logged
            once per name), as TEI and vLLM do with what proxies and SDKs add.
        token_ids: what ``input`` given as token ids means on /v1/embeddings and /embed: None (default) answers
            422 saying how to make the client send text; "model": ids of this model's own tokenizer, fed as they
            are (TEI's and vLLM's semantics; validated against the vocabulary and max_seq_length);
            "tiktoken:ENCODING" (e.g. "tiktoken:cl100k_base"): OpenAI-tokenizer ids (langchain-openai's
            default) decoded with tiktoken to their text, then embedded as text.

    Raises:
        ValueError / FileNotFoundError: a bad corpus or argument, before anything serves.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from embfast import __version__, build_info
    from embfast.dynamic import BatcherClosedError, DynamicBatcher, OverloadedError
    from embfast.tokenization import InputTooLongError

    if isinstance(max_request_bytes, bool) or not isinstance(max_request_bytes, int) or max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be an int >= 1, got {max_request_bytes!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string or None")
    from embfast.cross_encoder import CrossEncoder

    if isinstance(embedder, CrossEncoder):  # a server that only reranks
        if reranker is not None:
            raise ValueError("give the cross-encoder once: as the model or as reranker=")
        embedder, reranker = None, embedder
    from embfast.sparse_encoder import SparseEncoder

    if isinstance(embedder, SparseEncoder):  # a server that only serves /embed_sparse
        if sparse is not None:
            raise ValueError("give the sparse encoder once: as the model or as sparse=")
        embedder, sparse = None, embedder
    if embedder is None and reranker is None and sparse is None:
        raise ValueError("nothing to serve: give an Embedder, a CrossEncoder, a SparseEncoder, or several")
    if reranker is not None and not isinstance(reranker, CrossEncoder):
        raise TypeError(f"reranker must be an embfast.CrossEncoder or None, got {type(reranker).__name__}")
    main_model = next(m for m in (embedder, reranker, sparse) if m is not None)
    name = model_name or main_model.manifest.get("name") or Path(main_model.model_dir).name
    dim = embedder.dim if embedder is not None else 0
    if corpus is not None and embedder is None:
        raise ValueError("a search corpus needs an embedding model to embed queries")
    if corpus is None and corpus_texts is not None:
        raise ValueError("corpus_texts needs a corpus (the .npy vectors of those texts)")
    search_corpus = None if corpus is None else SearchCorpus.open(corpus, corpus_texts, embedder)
    token_decoder = None
    if token_ids is not None and token_ids != "model":
        token_decoder = TokenIdDecoder(token_ids)  # ValueError / ImportError before anything serves
    metrics = Metrics()
    own = batcher is None
    if own and embedder is not None:  # its worker thread starts with the first request; closed at shutdown
        batcher = DynamicBatcher(embedder, max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms,
                                 max_queue=max_queue, merge_requests=dynamic_batching)
    elif not own and not isinstance(batcher, DynamicBatcher):
        raise TypeError(f"batcher must be a DynamicBatcher or None, got {type(batcher).__name__}")
    rerank_batcher = None if reranker is None else DynamicBatcher(
        reranker, max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms, max_queue=max_queue,
        merge_requests=dynamic_batching)
    sparse_batcher = None if sparse is None else DynamicBatcher(
        sparse, max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms, max_queue=max_queue,
        merge_requests=dynamic_batching)
    batchers = [b for b in (batcher, rerank_batcher, sparse_batcher) if b is not None]
    owned = [b for b in (batcher if own else None, rerank_batcher, sparse_batcher) if b is not None]

    from contextlib import asynccontextmanager

    state = SimpleNamespace(ready=False, closing=False)

    def warm_up() -> None:
        """One request through each model before /health/ready says ready (the first ONNX Runtime run
        allocates its arenas; a load balancer should not send traffic before that)."""
        if embedder is not None:
            embedder.encode(["warm-up"])
        if reranker is not None:
            reranker.predict([("warm-up", "warm-up")])
        if sparse is not None:
            sparse.encode(["warm-up"])

    @asynccontextmanager
    async def lifespan(app):
        for b in batchers:
            b.add_batch_listener(metrics.on_batch)
        try:
            await asyncio.get_running_loop().run_in_executor(None, warm_up)
            state.ready = True
            yield
        finally:
            state.ready, state.closing = False, True
            for b in batchers:
                b.remove_batch_listener(metrics.on_batch)
            for b in owned:  # uvicorn runs this after the in-flight requests finished; close() drains what is left
                await asyncio.get_running_loop().run_in_executor(None, b.close)

    app = FastAPI(title="embfast", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.rerank_batcher = rerank_batcher
    app.state.sparse_batcher = sparse_batcher
    app.add_middleware(_Guard, api_key=api_key, metrics=metrics, max_request_bytes=max_request_bytes)

    from embfast.server.schemas import ROUTES, request_body

    schema_defs: dict = {}  # nested request schemas, added to the OpenAPI components

    def route(path: str, method: str):
        """Register an endpoint; its ``request`` parameter is typed here because annotations are strings
        (``from __future__ import annotations``) and FastAPI, imported lazily, is not a module global. A POST
        route's body and answer are described in /openapi.json from :mod:`embfast.server.schemas`."""
        def register(fn):
            fn.__annotations__ = {k: Request if k == "request" else v for k, v in fn.__annotations__.items()}
            extra = request_body(path) if method == "POST" else None
            if extra is not None:
                schema_defs.update(extra.pop("x-embfast-defs"))
            answer = ROUTES.get(path, (None, None))[1] if method == "POST" else None
            app.add_api_route(path, fn, methods=[method], openapi_extra=extra, response_model=answer)
            return fn
        return register

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                              description="embfast: OpenAI, TEI and Cohere embedding and reranking APIs")
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in schema_defs.items():
                components.setdefault(name, schema)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi

    def error_response(exc: ApiError, path: str = "") -> Response:
        metrics.inc("embfast_errors_total", (exc.code,))
        return Response(error_body(exc, family_of(path)), status_code=exc.status, media_type="application/json",
                        headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=code, headers=dict(exc.headers or {})), request.url.path)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # a bug: say so, keep serving
        log.exception("embfast serve: internal error on %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal",
                                       type_="server_error"), request.url.path)

    def need_embedder() -> None:
        if embedder is None:
            raise ApiError(424, "this server has no embedding model (it serves a cross-encoder): use /rerank, "
                           "/predict or /v1/rerank", code="model_not_embedder")

    async def run_batched(call, inputs: list, bad_input: tuple, **kw):
        """``await call(inputs, return_info=True, **kw)`` on the batcher, its refusals mapped to HTTP ones."""
        try:
            return await call(inputs, return_info=True, **kw)
        except OverloadedError as exc:
            raise ApiError(429, str(exc), code="overloaded", type_="rate_limit_error",
                           headers={"retry-after": "1"}) from None
        except InputTooLongError as exc:
            raise ApiError(422, f"{exc} (send \"truncate\": true)", code="input_too_long", param="input") from None
        except bad_input as exc:
            raise ApiError(422, str(exc), code="invalid_input", param="input") from None
        except BatcherClosedError:
            raise ApiError(503, "the server is shutting down", code="shutting_down", type_="server_error") from None

    async def run_encode(texts: list[str], **kw):
        # texts were validated already; InvalidTextError is kept so that no text can ever reach a 500
        return await run_batched(batcher.encode_async, texts, (InvalidTextError,), **kw)

    async def run_encode_ids(ids: list, **kw):
        return await run_batched(batcher.encode_ids_async, ids, (TypeError, ValueError), **kw)

    def count(info) -> int:
        tokens = int(info.token_counts.sum())
        metrics.inc("embfast_texts_total", value=len(info.token_counts))
        metrics.inc("embfast_tokens_total", value=tokens)
        metrics.inc("embfast_truncated_texts_total", value=int(info.truncated.sum()))
        return tokens

    async def read_json(request):
        return _decode_json(await _read_body(request, max_request_bytes))

    def info_payload() -> dict:
        """embfast's own /info keys (TEI's are added by the TEI module)."""
        b = batchers[0]
        m = main_model
        model_info = {"dim": dim, "pooling": embedder.config.pooling, "normalize": embedder.config.normalize} \
            if embedder is not None else {"dim": None}
        return {
            "model": name, "model_dir": str(m.model_dir), **model_info, "max_seq_length": m.config.max_seq_length,
            "precision": m.precision, "device": m.device, "provider": m.session.provider, "threads": m.session.threads,
            "reranker": None if reranker is None else {
                "model": reranker.name, "model_dir": str(reranker.model_dir), "num_labels": reranker.num_labels,
                "activation": reranker.config.activation, "max_seq_length": reranker.max_seq_length,
                "precision": reranker.precision},
            "batching": {"dynamic": b.merge_requests, "max_batch_tokens": b.max_batch_tokens,
                         "max_batch_size": b.max_batch_size, "max_wait_ms": b.max_wait_ms, "max_queue": b.max_queue},
            "limits": {"max_request_bytes": max_request_bytes, "max_inputs": max_inputs},
            "auth": api_key is not None,
            "corpus": None if search_corpus is None else search_corpus.info(),
            "version": __version__, "build": build_info()}

    ctx = SimpleNamespace(
        embedder=embedder, reranker=reranker, sparse=sparse, batcher=batcher, rerank_batcher=rerank_batcher,
        batchers=batchers,
        name=name, dim=dim, max_inputs=max_inputs, strict=strict_requests, search_corpus=search_corpus,
        prompts=dict(embedder.config.prompts) if embedder is not None else {}, metrics=metrics, state=state,
        need_embedder=need_embedder, run_encode=run_encode, run_encode_ids=run_encode_ids, count=count,
        read_json=read_json, token_ids=token_ids, token_decoder=token_decoder,
        info_payload=info_payload, version=__version__)

    @route("/metrics", "GET")
    async def prometheus(request: Request):
        return PlainTextResponse(metrics.render(batchers[0].stats()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    from embfast.server.cohere import add_cohere_routes
    from embfast.server.openai import add_openai_routes
    from embfast.server.rerank import add_rerank_routes
    from embfast.server.tei import add_tei_routes

    add_openai_routes(route, ctx)
    add_tei_routes(route, ctx)
    add_cohere_routes(route, ctx)
    add_rerank_routes(route, reranker=reranker, batcher=rerank_batcher, error=ApiError, read_json=read_json,
                      dumps=_dumps, count=count, name=reranker.name if embedder is not None and reranker else name,
                      max_inputs=max_inputs, strict=strict_requests)
    from embfast.server.sparse import add_sparse_routes

    add_sparse_routes(route, sparse=sparse, batcher=sparse_batcher, error=ApiError, read_json=read_json,
                      dumps=_dumps, count=count, max_inputs=max_inputs, strict=strict_requests)
    return app
