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
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_INPUTS,
    DEFAULT_MAX_REQUEST_BYTES,
    ApiError,
    TokenIdDecoder,
    _decode_json,
    _dumps,
    _read_body,
    error_body,
    overloaded_error,
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


def _sum_stats(stats: list[dict]) -> dict:
    """The batchers' stats added up (numbers summed, ``closed`` if any is): the server's queue gauges."""
    out: dict = {}
    for st in stats:
        for k, v in st.items():
            out[k] = (out.get(k, False) or v) if isinstance(v, bool) else out.get(k, 0) + v
    return out


class _DisconnectWatch:
    """An ASGI ``receive`` for the app that also listens for ``http.disconnect`` once the body is read: when the
    app has taken the last chunk, one task awaits the server's next message (the one call to the server's
    ``receive`` after the body, shared with the app should it ask too, so no message is taken twice) and calls
    ``on_gone`` when the client has gone before the answer was handed over."""

    def __init__(self, receive, on_gone):
        self._receive = receive
        self._on_gone = on_gone
        self.listener: asyncio.Future | None = None  # the server's next message after the body
        self.responded = False  # the whole answer was handed to the server (then a disconnect is the normal end)

    async def receive(self):
        if self.listener is not None:
            return await asyncio.shield(self.listener)
        msg = await self._receive()
        if msg["type"] != "http.request" or not msg.get("more_body", False):
            self.listener = asyncio.ensure_future(self._receive())
            self.listener.add_done_callback(self._heard)
        return msg

    def _heard(self, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None or self.responded:
            return
        if fut.result()["type"] == "http.disconnect":
            self._on_gone()
        else:  # not expected after a whole body: listen on
            self.listener = asyncio.ensure_future(self._receive())
            self.listener.add_done_callback(self._heard)

    def close(self) -> None:
        if self.listener is not None:
            self.listener.remove_done_callback(self._heard)
            self.listener.cancel()


class _DirectRoutes:
    """ASGI middleware: every POST route (the ones that carry the load: each API family's embed, rerank and search
    routes) called straight from its endpoint function, past FastAPI's router and its own middleware stack; every
    other request goes on to the FastAPI app.

    The endpoint, its errors (the app's exception handlers, looked up by class as Starlette does) and its answer
    are the same as through FastAPI (``test_direct_routes_answer_as_fastapi_routing_does``), which stays the
    source of /openapi.json and /docs. What is skipped is per-request machinery these routes do not use: route
    matching over every route, dependency solving, the exception, telemetry and body-limit middlewares, an exit
    stack. Alone, it took the event loop from 408 to 341 us per request on one short text (ad hoc, per-thread CPU
    from /proc under wrk; benchmarks/README.md, issue 19, has the measured total of this and the guard's changes)."""

    def __init__(self, app, *, routes: dict, handlers: dict):
        from starlette.requests import Request

        self.app, self.routes, self.handlers, self.request = app, routes, handlers, Request

    async def __call__(self, scope, receive, send):
        fn = self.routes.get((scope["method"], scope["path"])) if scope["type"] == "http" else None
        if fn is None:
            return await self.app(scope, receive, send)
        request = self.request(scope, receive, send)
        try:
            response = await fn(request)
        except Exception as exc:
            # the handler of the nearest class, as Starlette picks it (the app registers one for Exception)
            handler = next(h for h in map(self.handlers.get, type(exc).__mro__) if h is not None)
            response = await handler(request, exc)
        await response(scope, receive, send)


class _Guard:
    """ASGI middleware: API key check (all but /health), request latency and status counts."""

    def __init__(self, app, *, api_key: str | None, metrics: Metrics, max_request_bytes: int,
                 body_timeout_s: float | None = None):
        self.app, self.api_key, self.metrics, self.limit = app, api_key, metrics, max_request_bytes
        self.body_timeout_s = body_timeout_s

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
            if scope.get("method") in ("POST", "PUT"):
                await self._run_watched(scope, receive, send_status, status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(endpoint, time.perf_counter() - t0)
            self.metrics.inc("embfast_requests_total", (endpoint, str(status[0])))

    async def _run_watched(self, scope, receive, send, status: list) -> None:
        """Run the app; once it has read the whole body, listen for the client going away, and if it goes
        before the answer is sent, cancel the app: its queued texts leave the batcher's queue instead
        of being computed for nobody (status 499 in the metrics). vLLM's ``with_cancellation`` does the same;
        Starlette itself does not cancel a handler whose client left.

        The app runs in this task, and one listener task per request cancels it (before: the app in a task of
        its own, a listener and an ``asyncio.wait`` on both, part of issue 19's per-request cost)."""
        me = asyncio.current_task()
        left = []  # set when the listener cancelled this task because the client went away

        def on_gone() -> None:
            left.append(True)
            me.cancel()

        watch = _DisconnectWatch(receive, on_gone)

        async def send_tracked(message):
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                watch.responded = True  # before the send: the server reports http.disconnect once it completes
            await send(message)

        try:
            await self.app(scope, watch.receive, send_tracked)
        except asyncio.CancelledError:
            if not left:
                raise  # the server is being stopped
            if getattr(me, "uncancel", None) is not None:  # Python 3.11+: this cancellation is handled here
                me.uncancel()
            status[0] = 499  # nginx's code for "client closed request"
            self.metrics.inc("embfast_errors_total", ("client_disconnected",))
        finally:
            watch.close()

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
            try:
                msg = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                return  # a stalled body: answer now
            if msg["type"] != "http.request":
                return
            size += len(msg.get("body", b""))
            if not msg.get("more_body"):
                return


def create_app(embedder=None, *, batcher=None, max_batch_tokens: int = 16384, max_wait_ms: float = 2.0,
               max_queue: int = 1024, max_queue_texts: int | None = None, max_queue_tokens: int | None = None,
               body_timeout_s: float | None = DEFAULT_BODY_TIMEOUT_S, dynamic_batching: bool = True,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_inputs: int = DEFAULT_MAX_INPUTS, api_key: str | None = None, corpus=None, corpus_texts=None,
               model_name: str | None = None, reranker=None, strict_requests: bool = False,
               token_ids: str | None = None, sparse=None, models: list | None = None,
               call_cost_tokens: float | str | None = None, workers: int = 1, queue_policy: str = "deadline",
               lookahead_texts: int | None = None, share_tokens: int = 128):
    """Build the FastAPI app serving ``embedder`` (and any other models).

    Every POST whose client goes away before its answer is sent is cancelled: its queued texts leave the batcher
    uncomputed (code 499 in ``embfast_requests_total``, ``embfast_cancelled_total``).

    Args:
        embedder: an :class:`~embfast.Embedder`, or a :class:`~embfast.CrossEncoder` for a server that
            only reranks (its embedding routes then answer 424), or None with ``reranker`` / ``sparse`` / ``models``.
        batcher: a :class:`~embfast.dynamic.DynamicBatcher` for ``embedder`` (the caller
            closes it); default: the app makes one from the arguments below
            (``app.state.batcher``) and closes it at shutdown, after in-flight
            requests, so such an app serves once.
        max_batch_tokens / max_wait_ms / max_queue / max_queue_texts / max_queue_tokens / call_cost_tokens /
            queue_policy / lookahead_texts / share_tokens: the batcher's (see DynamicBatcher), for every model:
            the queue is counted in requests, texts and tokens; over any of them a request gets 429 with
            ``retry-after`` (whole seconds, estimated from the backlog and the recent throughput); one request over
            a whole texts or tokens budget gets 413 (it could never fit).
        body_timeout_s: a request body that sends nothing for this many seconds (per chunk, not in total;
            default 30) is answered 408 ``body_timeout`` and its connection closed, so a stalled upload holds
            nothing; None waits forever.
        dynamic_batching: False runs each request in ONNX Runtime calls of its own (for comparison).
        max_request_bytes: largest request body, in bytes (default 2 MB); larger: 413.
        max_inputs: most strings per request (default 2048, as OpenAI).
        api_key: when set, every endpoint but /health needs ``Authorization: Bearer <api_key>``.
        corpus: for /v1/search: an .npy file of (n, dim) embeddings (dim at most the model's;
            queries are cut to it), an (n, dim) array, an embfast index file (``embfast.Index``,
            built with this model) or an :class:`embfast.Index`. Searched with the first embedder.
        corpus_texts: for vectors: a file with one text per line (or a list of str), one per row.
        model_name: the name answers carry for the first model (default: its folder's name); a str, or a list
            of aliases (the first is what answers carry).
        reranker: a :class:`~embfast.CrossEncoder` for /rerank, /predict and /v1/rerank (default None: those
            answer 424). It gets a DynamicBatcher of its own, with the same settings, closed at shutdown.
        sparse: a :class:`~embfast.SparseEncoder` for TEI's /embed_sparse (:mod:`embfast.server.sparse`), or
            as ``embedder`` for a server that only serves it; a batcher of its own, as ``reranker``'s.
        models: more models to serve, each a model or a ``(model, names)`` pair (``names`` a str or a list of
            aliases), after the ones above; any kind, several of a kind (``embfast serve --model A --model B``).
            Requests choose one by name (:mod:`embfast.server.registry`); the first of a kind is the default. With
            more than one model, every model's ONNX Runtime calls share one :class:`~embfast.dynamic.RunLock`:
            one model runs at a time with all its threads, so the models' thread pools never oversubscribe the
            cores.
        workers: worker threads per model's batcher (default 1; ``embfast serve`` defaults to 2 on a multi-core
            CPU, see its ``--workers auto``; see DynamicBatcher): under load up to N ONNX Runtime calls at once,
            each on the model's threads / N; a call that would run alone gets all of them. With several models,
            the shared RunLock has N slots, and a model's second and later workers run only while the other
            models are idle or its own queue is long (see DynamicBatcher's ``run_lock``).
        strict_requests: refuse (422) request fields the route does not know; default False ignores them (logged
            once per name), as TEI and vLLM do with what proxies and SDKs add.
        token_ids: what ``input`` given as token ids means on /v1/embeddings and /embed: None (default) answers
            422 saying how to make the client send text; "model": ids of this model's own tokenizer, fed as they
            are (TEI's and vLLM's semantics; validated against the vocabulary and max_seq_length);
            "tiktoken:ENCODING" (e.g. "tiktoken:cl100k_base"): OpenAI-tokenizer ids (langchain-openai's
            default) decoded with tiktoken to their text, then embedded as text.

    Raises:
        ValueError / FileNotFoundError: a bad corpus or argument (two models under one name), before anything
        serves. TypeError: a model that is not an embfast model.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from embfast import __version__, build_info
    from embfast.dynamic import BatcherClosedError, DynamicBatcher, OverloadedError, RunLock
    from embfast.server.registry import ModelRegistry, ServedModel, model_kind_of
    from embfast.tokenization import InputTooLongError

    if isinstance(max_request_bytes, bool) or not isinstance(max_request_bytes, int) or max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be an int >= 1, got {max_request_bytes!r}")
    if body_timeout_s is not None and (isinstance(body_timeout_s, bool) or not isinstance(body_timeout_s, (int, float))
                                       or not 0 < body_timeout_s <= 3600):
        raise ValueError(f"body_timeout_s must be a number of seconds in (0, 3600] or None, got {body_timeout_s!r}")
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
    if reranker is not None and not isinstance(reranker, CrossEncoder):
        raise TypeError(f"reranker must be an embfast.CrossEncoder or None, got {type(reranker).__name__}")
    given: list[tuple[object, object]] = [(m, None) for m in (embedder, reranker, sparse) if m is not None]
    for item in models or []:
        given.append(item if isinstance(item, tuple) and len(item) == 2 else (item, None))
    if not given:
        raise ValueError("nothing to serve: give an Embedder, a CrossEncoder, a SparseEncoder, or several")
    if given[0][1] is None and model_name is not None:
        given[0] = (given[0][0], model_name)
    kinds = [model_kind_of(m) for m, _ in given]
    if batcher is not None and not isinstance(batcher, DynamicBatcher):
        raise TypeError(f"batcher must be a DynamicBatcher or None, got {type(batcher).__name__}")
    if batcher is not None and (embedder is None or batcher.embedder is not embedder):
        raise ValueError("batcher= must be a DynamicBatcher of the embedder given as the first argument")
    run_lock = RunLock(slots=workers) if len(given) > 1 else None
    entries = []
    for (model, names), kind in zip(given, kinds, strict=True):
        if names is None:
            names = [model.manifest.get("name") or Path(model.model_dir).name]
        elif isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        names = tuple(names)
        if batcher is not None and model is embedder:
            entries.append(ServedModel(names, kind, model, batcher, owned=False))
            continue
        # its worker thread starts with the first request; closed at shutdown
        b = DynamicBatcher(model, max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms, max_queue=max_queue,
                           max_queue_texts=max_queue_texts, max_queue_tokens=max_queue_tokens,
                           merge_requests=dynamic_batching, run_lock=run_lock,
                           call_cost_tokens=call_cost_tokens, workers=workers, queue_policy=queue_policy,
                           lookahead_texts=lookahead_texts, share_tokens=share_tokens)
        entries.append(ServedModel(names, kind, model, b, owned=True,
                                   rss_load_bytes=getattr(model, "load_rss_bytes", None)))
    registry = ModelRegistry(entries)
    main = registry.entries[0]
    default_embedder = registry.default("embedder")
    embedder = None if default_embedder is None else default_embedder.model
    batcher = None if default_embedder is None else default_embedder.batcher
    default_reranker = registry.default("cross-encoder")
    reranker = None if default_reranker is None else default_reranker.model
    rerank_batcher = None if default_reranker is None else default_reranker.batcher
    default_sparse = registry.default("sparse-encoder")
    sparse = None if default_sparse is None else default_sparse.model
    sparse_batcher = None if default_sparse is None else default_sparse.batcher
    main_model = main.model
    name = main.name
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
    batchers = [e.batcher for e in registry]
    owned = [e.batcher for e in registry if e.owned]

    from contextlib import asynccontextmanager

    state = SimpleNamespace(ready=False, closing=False)

    def warm_up() -> None:
        """One request through each model before /health/ready says ready (the first ONNX Runtime run
        allocates its arenas; a load balancer should not send traffic before that)."""
        for e in registry:
            if e.kind == "embedder":
                e.model.encode(["warm-up"])
            elif e.kind == "cross-encoder":
                e.model.predict([("warm-up", "warm-up")])
            else:
                e.model.encode(["warm-up"])

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

    class ServerApp(FastAPI):
        """FastAPI with the guard and the direct routes in front of its own middleware stack: an HTTP request
        enters the guard (API key, metrics, cancellation), then the direct routes (the load-carrying POST routes,
        see :class:`_DirectRoutes`), then FastAPI for everything else."""

        front = None  # set right below

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                await self.front(scope, receive, send)
            else:
                await super().__call__(scope, receive, send)

        async def behind(self, scope, receive, send):
            await super().__call__(scope, receive, send)

    app = ServerApp(title="embfast", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.rerank_batcher = rerank_batcher
    app.state.sparse_batcher = sparse_batcher
    app.state.registry = registry
    direct: dict = {}  # (method, path) -> endpoint: the routes _DirectRoutes calls past FastAPI's router
    app.front = _Guard(_DirectRoutes(app.behind, routes=direct, handlers=app.exception_handlers), api_key=api_key,
                       metrics=metrics, max_request_bytes=max_request_bytes, body_timeout_s=body_timeout_s)

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
            if method == "POST":
                direct[(method, path)] = fn
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

    def requested_model(request, body) -> str | None:
        """The model a request names: the body's ``model`` (OpenAI, Cohere, TEI rerank), else ``?model=``."""
        if isinstance(body, dict) and body.get("model") is not None:
            return body["model"]
        return request.query_params.get("model") if request is not None else None

    def pick(kind: str, request=None, body=None) -> ServedModel:
        """The served model of ``kind`` for this request (see :meth:`ModelRegistry.pick`)."""
        return registry.pick(kind, requested_model(request, body))

    def pick_any(request=None, body=None) -> ServedModel:
        """The model a kind-neutral route (/tokenize, /decode, /info) uses: the one named, else the first."""
        requested = requested_model(request, body)
        if requested is None:
            return main
        found = registry.find(requested) if isinstance(requested, str) else None
        if found is not None:
            return found
        if len(registry) == 1:
            return main
        raise ApiError(404, f"model {requested!r} is not served here; served: {', '.join(registry.names())}",
                       code="model_not_found", param="model")

    def need_embedder(request=None, body=None) -> ServedModel:
        return pick("embedder", request, body)

    async def run_batched(call, inputs: list, bad_input: tuple, **kw):
        """``await call(inputs, return_info=True, **kw)`` on the batcher, its refusals mapped to HTTP ones."""
        try:
            return await call(inputs, return_info=True, **kw)
        except OverloadedError as exc:
            raise overloaded_error(exc) from None
        except InputTooLongError as exc:
            raise ApiError(422, f"{exc} (send \"truncate\": true)", code="input_too_long", param="input") from None
        except bad_input as exc:
            raise ApiError(422, str(exc), code="invalid_input", param="input") from None
        except BatcherClosedError:
            raise ApiError(503, "the server is shutting down", code="shutting_down", type_="server_error") from None

    async def run_encode(texts: list[str], *, served: ServedModel | None = None, **kw):
        # texts were validated already; InvalidTextError is kept so that no text can ever reach a 500
        b = batcher if served is None else served.batcher
        return await run_batched(b.encode_async, texts, (InvalidTextError,), **kw)

    async def run_encode_ids(ids: list, *, served: ServedModel | None = None, **kw):
        b = batcher if served is None else served.batcher
        return await run_batched(b.encode_ids_async, ids, (TypeError, ValueError), **kw)

    def count(info) -> int:
        tokens = int(info.token_counts.sum())
        metrics.inc("embfast_texts_total", value=len(info.token_counts))
        metrics.inc("embfast_tokens_total", value=tokens)
        metrics.inc("embfast_truncated_texts_total", value=int(info.truncated.sum()))
        return tokens

    async def read_json(request):
        return _decode_json(await _read_body(request, max_request_bytes, body_timeout_s))

    def info_payload() -> dict:
        """embfast's own /info keys (TEI's are added by the TEI module)."""
        b = batchers[0]
        m = main_model
        model_info = {"dim": dim, "pooling": embedder.config.pooling, "normalize": embedder.config.normalize} \
            if embedder is not None else {"dim": None}
        return {
            "model": name, "model_dir": str(m.model_dir), **model_info, "max_seq_length": m.config.max_seq_length,
            "precision": m.precision, "device": m.device, "provider": m.session.provider, "threads": m.session.threads,
            "workers": b.workers,
            "reranker": None if reranker is None else {
                "model": reranker.name, "model_dir": str(reranker.model_dir), "num_labels": reranker.num_labels,
                "activation": reranker.config.activation, "max_seq_length": reranker.max_seq_length,
                "precision": reranker.precision},
            "batching": {"dynamic": b.merge_requests, "max_batch_tokens": b.max_batch_tokens,
                         "max_batch_size": b.max_batch_size, "max_wait_ms": b.max_wait_ms, "max_queue": b.max_queue,
                         "max_queue_texts": b.max_queue_texts, "max_queue_tokens": b.max_queue_tokens,
                         "queue_policy": b.queue_policy, "lookahead_texts": b.lookahead_texts,
                         "share_tokens": b.share_tokens},
            "limits": {"max_request_bytes": max_request_bytes, "max_inputs": max_inputs,
                       "body_timeout_s": body_timeout_s},
            "auth": api_key is not None,
            "corpus": None if search_corpus is None else search_corpus.info(),
            "models": [e.describe() for e in registry],
            "version": __version__, "build": build_info()}

    ctx = SimpleNamespace(
        embedder=embedder, reranker=reranker, sparse=sparse, batcher=batcher, rerank_batcher=rerank_batcher,
        batchers=batchers,
        name=name, dim=dim, max_inputs=max_inputs, strict=strict_requests, search_corpus=search_corpus,
        prompts=dict(embedder.config.prompts) if embedder is not None else {}, metrics=metrics, state=state,
        registry=registry, pick=pick, pick_any=pick_any,
        need_embedder=need_embedder, run_encode=run_encode, run_encode_ids=run_encode_ids, count=count,
        read_json=read_json, token_ids=token_ids, token_decoder=token_decoder,
        info_payload=info_payload, version=__version__)

    @route("/metrics", "GET")
    async def prometheus(request: Request):
        return PlainTextResponse(metrics.render(_sum_stats([b.stats() for b in batchers])),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    from embfast.server.cohere import add_cohere_routes
    from embfast.server.openai import add_openai_routes
    from embfast.server.rerank import add_rerank_routes
    from embfast.server.tei import add_tei_routes

    add_openai_routes(route, ctx)
    add_tei_routes(route, ctx)
    add_cohere_routes(route, ctx)
    add_rerank_routes(route, pick=lambda request, body: pick("cross-encoder", request, body), error=ApiError,
                      read_json=read_json, dumps=_dumps, count=count, max_inputs=max_inputs, strict=strict_requests)
    from embfast.server.sparse import add_sparse_routes

    add_sparse_routes(route, pick=lambda request, body: pick("sparse-encoder", request, body), error=ApiError,
                      read_json=read_json, dumps=_dumps, count=count, max_inputs=max_inputs, strict=strict_requests)
    return app
