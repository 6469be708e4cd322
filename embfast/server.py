"""``embfast serve``: an OpenAI-compatible embedding server (FastAPI + uvicorn), transport only.

Requests go transport -> :class:`~embfast.dynamic.DynamicBatcher` (one queue,
token-budget batches, one ONNX Runtime worker) -> the Embedder. Why FastAPI +
uvicorn: the stack the ``server`` extra already names, well kept, and ASGI lets
every request wait on the batcher without a thread of its own.

Endpoints:
- ``POST /v1/embeddings``: OpenAI's embeddings API. ``input`` a string or a list
  of strings (at most ``max_inputs``, default 2048, none empty), ``model``
  (any string; the answer names the served model), ``encoding_format``
  ``float`` (default) | ``base64`` (little-endian float32 bytes),
  ``dimensions`` (Matryoshka: the first ``dimensions`` values, re-normalized),
  ``user`` (ignored), and embfast's ``truncate`` (default true: texts longer
  than the model takes are cut, counted in ``usage`` and the
  ``x-embfast-truncated-inputs`` header; false: 422 instead).
  ``usage.prompt_tokens`` = ``total_tokens`` = tokens fed to the model.
- ``POST /v1/search``: ``{"query": str | [str], "top_k": 10}`` -> cosine top-k
  (``{"id", "score", "text"?, "metadata"?}`` per hit) over a corpus loaded at
  start-up: an .npy file of (n, dim) embeddings (dim at most the model's:
  queries are cut to it), with texts (one per line) when a texts file is
  given, or an embfast index file (:class:`embfast.Index`, built with this model).
- ``GET /health``, ``GET /info``, ``GET /metrics`` (Prometheus text format),
  ``GET /v1/models``.
- Reranking with a cross-encoder (``reranker=``, or a CrossEncoder as the model): TEI's
  ``POST /rerank`` and ``POST /predict``, Cohere's / Jina's ``POST /v1/rerank`` (and ``/v2/rerank``);
  see :mod:`embfast.server_rerank`. A route whose model is not served answers 424.

Errors are JSON ``{"error": {"message", "type", "code", "param"}}`` as OpenAI's:
400 malformed JSON, 401 missing or wrong API key (``Authorization: Bearer``;
``/health`` stays open), 404 / 405, 413 body over ``max_request_bytes``, 422 a
field that is wrong, 429 queue full (``Retry-After``), 503 shutting down.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from embfast.search_corpus import SearchCorpus, load_corpus, load_corpus_texts  # noqa: F401 - re-exported
from embfast.text import InvalidTextError, lone_surrogate, surrogate_reason

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 2_000_000  # 2 MB, as TEI
DEFAULT_MAX_INPUTS = 2048  # OpenAI's limit per request
DRAIN_LIMIT_BYTES = 64 * 2**20  # read (and drop) at most this much of a refused body before answering
ENCODING_FORMATS = ("float", "base64")
_EMBEDDINGS_FIELDS = ("input", "model", "encoding_format", "dimensions", "user", "truncate")
_SEARCH_FIELDS = ("query", "top_k", "model", "truncate", "positive", "negative")
_ENDPOINTS = ("/v1/embeddings", "/v1/search", "/v1/models", "/health", "/info", "/metrics",
              "/rerank", "/predict", "/v1/rerank", "/v2/rerank", "/embed_sparse")

try:  # faster JSON for large float responses; the standard library otherwise
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None


class ApiError(Exception):
    """A request the server refuses: HTTP status, message, OpenAI error type, code (= metrics kind), param."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_
        self.headers = headers or {}


# ---- metrics -------------------------------------------------------------------------------------
def _labels(names: tuple, values: tuple) -> str:
    return ",".join(f'{n}="{v}"' for n, v in zip(names, values, strict=True))


class _Histogram:
    """A Prometheus histogram with fixed buckets and optional labels (thread-safe)."""

    def __init__(self, name: str, help_: str, buckets: tuple, label_names: tuple = ()):
        self.name, self.help, self.buckets, self.label_names = name, help_, buckets, label_names
        self._series: dict[tuple, list] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, labels: tuple = ()) -> None:
        with self._lock:
            s = self._series.setdefault(labels, [[0] * len(self.buckets), 0.0, 0])
            for i, b in enumerate(self.buckets):
                if value <= b:
                    s[0][i] += 1
            s[1] += value
            s[2] += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            for labels, (counts, total, n) in sorted(self._series.items()):
                lab = _labels(self.label_names, labels)
                sep = "," if lab else ""
                for b, c in zip(self.buckets, counts, strict=True):
                    out.append(f'{self.name}_bucket{{{lab}{sep}le="{b:g}"}} {c}')
                out.append(f'{self.name}_bucket{{{lab}{sep}le="+Inf"}} {n}')
                out.append(f"{self.name}_sum{{{lab}}} {total:.6g}" if lab else f"{self.name}_sum {total:.6g}")
                out.append(f"{self.name}_count{{{lab}}} {n}" if lab else f"{self.name}_count {n}")
        return out


class Metrics:
    """The server's counters and histograms, rendered in Prometheus text format (version 0.0.4)."""

    def __init__(self):
        pow2 = tuple(2**i for i in range(11))
        self.request_seconds = _Histogram(
            "embfast_request_duration_seconds", "HTTP request latency in seconds, by endpoint",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), ("endpoint",))
        self.batch_texts = _Histogram("embfast_batch_texts", "texts per ONNX Runtime batch", pow2)
        self.batch_requests = _Histogram("embfast_batch_requests", "requests merged into one batch", pow2)
        self.batch_tokens = _Histogram("embfast_batch_tokens", "padded tokens per batch (rows x longest row)",
                                       tuple(2**i for i in range(4, 17)))
        self.batch_seconds = _Histogram("embfast_batch_duration_seconds", "pad + ONNX Runtime + pooling time",
                                        (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self._counters: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, name: str, labels: tuple = (), value: float = 1) -> None:
        with self._lock:
            self._counters[(name, labels)] = self._counters.get((name, labels), 0) + value

    def on_batch(self, s) -> None:
        """Batch listener (runs on the batcher's worker thread)."""
        self.batch_texts.observe(s.texts)
        self.batch_requests.observe(s.requests)
        self.batch_tokens.observe(s.padded_tokens)
        self.batch_seconds.observe(s.seconds)
        self.inc("embfast_batch_real_tokens_total", value=s.tokens)
        self.inc("embfast_batch_padded_tokens_total", value=s.padded_tokens)

    _COUNTER_META = {
        "embfast_requests_total": ("HTTP requests by endpoint and status code", ("endpoint", "code")),
        "embfast_errors_total": ("refused or failed requests by kind", ("kind",)),
        "embfast_texts_total": ("texts embedded", ()),
        "embfast_tokens_total": ("tokens fed to the model for embedded texts", ()),
        "embfast_truncated_texts_total": ("texts cut at max_seq_length", ()),
        "embfast_batch_real_tokens_total": ("real tokens run (no padding)", ()),
        "embfast_batch_padded_tokens_total": ("tokens run, padding included", ()),
    }

    def render(self, batcher_stats: dict | None) -> str:
        lines: list[str] = []
        st = batcher_stats or {}
        for name, key, help_ in (("embfast_queue_texts", "queued_texts", "texts waiting for a batch"),
                                 ("embfast_queue_tokens", "queued_tokens", "tokens of the texts waiting"),
                                 ("embfast_queue_requests", "queued_requests", "requests with texts waiting"),
                                 ("embfast_inflight_requests", "in_flight_requests",
                                  "requests admitted and not finished")):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {st.get(key, 0)}"]
        lines += ["# HELP embfast_rejected_total requests refused because the queue was full",
                  "# TYPE embfast_rejected_total counter", f"embfast_rejected_total {st.get('rejected', 0)}"]
        with self._lock:
            counters = dict(self._counters)
        for name, (help_, label_names) in self._COUNTER_META.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
            series = {lab: v for (n, lab), v in counters.items() if n == name}
            if not series and not label_names:
                series = {(): 0}
            for lab, v in sorted(series.items()):
                lines.append(f"{name}{{{_labels(label_names, lab)}}} {v:g}" if label_names else f"{name} {v:g}")
        for h in (self.request_seconds, self.batch_texts, self.batch_requests, self.batch_tokens,
                  self.batch_seconds):
            lines += h.render()
        return "\n".join(lines) + "\n"


# ---- request parsing --------------------------------------------------------------------------------
def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _check_fields(body: dict, allowed: tuple) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(422, f"unknown field(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(allowed)}",
                       code="unknown_field", param=unknown[0])


def _check_unicode(texts: list[str], field: str, *, single: bool) -> None:
    """422 naming ``field[i]`` for a lone surrogate (JSON ``"\\ud800"`` decodes to one; no tokenizer takes it)."""
    for i, t in enumerate(texts):
        pos = lone_surrogate(t)
        if pos >= 0:
            name = field if single else f"{field}[{i}]"
            raise ApiError(422, f"{name} has {surrogate_reason(t, pos)}; send valid UTF-16 pairs or UTF-8 text",
                           code="invalid_input", param=name)


def _text_input(body: dict, field: str, max_inputs: int) -> tuple[list[str], bool]:
    """``body[field]`` as a non-empty list of non-empty strings (and whether it was one string)."""
    if field not in body:
        raise ApiError(422, f"{field} is required: a string or a list of strings", code="invalid_input", param=field)
    value = body[field]
    if isinstance(value, str):
        if not value:
            raise ApiError(422, f"{field} must be a non-empty string, got ''", code="invalid_input", param=field)
        _check_unicode([value], field, single=True)
        return [value], True
    if not isinstance(value, list):
        raise ApiError(422, f"{field} must be a string or a list of strings, got {_json_type(value)}",
                       code="invalid_input", param=field)
    if not value:
        raise ApiError(422, f"{field} must not be an empty list", code="invalid_input", param=field)
    if len(value) > max_inputs:
        raise ApiError(422, f"{field} must hold at most {max_inputs} strings, got {len(value)}",
                       code="too_many_inputs", param=field)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value) or (
            isinstance(value[0], list) and value[0] and isinstance(value[0][0], int)):
        raise ApiError(422, f"{field} must be a string or a list of strings, got token ids; token-id input is not "
                       "supported (ids from another tokenizer would be meaningless to this model)",
                       code="invalid_input", param=field)
    for i, v in enumerate(value):
        if not isinstance(v, str):
            hint = "; nested lists are not accepted" if isinstance(v, list) else ""
            raise ApiError(422, f"{field}[{i}] must be a string, got {_json_type(v)}{hint}",
                           code="invalid_input", param=field)
        if not v:
            raise ApiError(422, f"{field}[{i}] must be a non-empty string, got ''", code="invalid_input", param=field)
    _check_unicode(value, field, single=False)
    return value, False


def _example_ids(body: dict, field: str) -> list:
    """``body[field]``: a list of ids (ints or non-empty strings) for recommendation by example."""
    value = body.get(field)
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > DEFAULT_MAX_INPUTS or not all(
            (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v) for v in value):
        raise ApiError(422, f"{field} must be a list of ids (integers or non-empty strings), at most "
                       f"{DEFAULT_MAX_INPUTS}", code="invalid_input", param=field)
    _check_unicode([v for v in value if isinstance(v, str)], field, single=False)
    return value


def _optional(body: dict, field: str, types: tuple, expected: str, default=None):
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ApiError(422, f"{field} must be {expected}, got {_json_type(value)} {json.dumps(value)[:40]}",
                       code="invalid_parameter", param=field)
    return value


def parse_embeddings_request(body, *, dim: int, max_inputs: int = DEFAULT_MAX_INPUTS) -> dict:
    """Validate an /v1/embeddings body (already JSON-decoded). Raises :class:`ApiError` (422) saying what is wrong.

    Returns:
        dict(texts, encoding_format, dimensions (None or int in [1, dim]), truncate).
    """
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}", code="invalid_json")
    _check_fields(body, _EMBEDDINGS_FIELDS)
    texts, _ = _text_input(body, "input", max_inputs)
    _optional(body, "model", (str,), "a string")
    _optional(body, "user", (str,), "a string")
    fmt = _optional(body, "encoding_format", (str,), "'float' or 'base64'", "float")
    if fmt not in ENCODING_FORMATS:
        raise ApiError(422, f"encoding_format must be 'float' or 'base64', got {fmt!r}",
                       code="invalid_parameter", param="encoding_format")
    dims = _optional(body, "dimensions", (int,), f"an integer in [1, {dim}]")
    if dims is not None and not 1 <= dims <= dim:
        raise ApiError(422, f"dimensions must be an integer in [1, {dim}], got {dims}",
                       code="invalid_parameter", param="dimensions")
    truncate = _optional(body, "truncate", (bool,), "true or false", True)
    return {"texts": texts, "encoding_format": fmt, "dimensions": dims, "truncate": truncate}


async def _read_body(request, limit: int) -> bytes:
    """The request body, or 413 past ``limit`` bytes (by Content-Length, or counted while streaming).

    A refused body is still read and dropped, up to DRAIN_LIMIT_BYTES, so the
    client sees the 413 instead of a reset connection.
    """
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else 0
    too_big = size > limit
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            too_big = True
        if not too_big:
            chunks.append(chunk)
        elif received > DRAIN_LIMIT_BYTES:
            break
    if too_big:
        raise ApiError(413, f"the request body must be at most {limit} bytes, got {max(size, received)}",
                       code="payload_too_large")
    return b"".join(chunks)


def _decode_json(raw: bytes):
    if not raw.strip():
        raise ApiError(400, "the request body must be a JSON object, got an empty body", code="invalid_json")
    try:
        text = raw.decode("utf-8-sig")  # JSON is UTF-8 (RFC 8259); a leading BOM is tolerated
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body must be UTF-8 JSON: {exc}", code="invalid_json") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body must be valid JSON: {exc}", code="invalid_json") from None


def _dumps(obj) -> bytes:
    if _orjson is not None:
        return _orjson.dumps(obj, option=_orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(obj, separators=(",", ":"), default=lambda a: a.tolist()).encode()


# ---- the app --------------------------------------------------------------------------------------------
def _error_body(exc: ApiError) -> bytes:
    return json.dumps({"error": {"message": exc.message, "type": exc.type, "code": exc.code,
                                 "param": exc.param}}).encode()


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
                body = _error_body(err)
                await send_status({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer")]})
                await send_status({"type": "http.response.body", "body": body})
                return
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request_seconds.observe(time.perf_counter() - t0, (endpoint,))
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
               model_name: str | None = None, reranker=None, sparse=None):
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
        sparse: a :class:`~embfast.SparseEncoder` for TEI's /embed_sparse (:mod:`embfast.server_sparse`), or
            as ``embedder`` for a server that only serves it; a batcher of its own, as ``reranker``'s.

    Raises:
        ValueError / FileNotFoundError: a bad corpus or argument, before anything serves.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse, Response
    from starlette.concurrency import run_in_threadpool
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
        raise ValueError("nothing to serve: give an Embedder, a CrossEncoder, or both (reranker=)")
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

    @asynccontextmanager
    async def lifespan(app):
        for b in batchers:
            b.add_batch_listener(metrics.on_batch)
        try:
            yield
        finally:
            for b in batchers:
                b.remove_batch_listener(metrics.on_batch)
            for b in owned:  # uvicorn runs this after the in-flight requests finished; close() drains what is left
                await asyncio.get_running_loop().run_in_executor(None, b.close)

    app = FastAPI(title="embfast", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.state.rerank_batcher = rerank_batcher
    app.add_middleware(_Guard, api_key=api_key, metrics=metrics, max_request_bytes=max_request_bytes)

    def route(path: str, method: str):
        """Register an endpoint; its ``request`` parameter is typed here because annotations are strings
        (``from __future__ import annotations``) and FastAPI, imported lazily, is not a module global."""
        def register(fn):
            fn.__annotations__ = {k: Request if k == "request" else v for k, v in fn.__annotations__.items()}
            app.add_api_route(path, fn, methods=[method])
            return fn
        return register

    def error_response(exc: ApiError) -> Response:
        metrics.inc("embfast_errors_total", (exc.code,))
        return Response(_error_body(exc), status_code=exc.status, media_type="application/json",
                        headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=code, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # a bug: say so, keep serving
        log.exception("embfast serve: internal error on %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal",
                                       type_="server_error"))

    def need_embedder() -> None:
        if embedder is None:
            raise ApiError(424, "this server has no embedding model (it serves a cross-encoder): use /rerank, "
                           "/predict or /v1/rerank", code="model_not_embedder")

    async def run_encode(request: Request, texts: list[str], **kw):
        try:
            return await batcher.encode_async(texts, return_info=True, **kw)
        except OverloadedError as exc:
            raise ApiError(429, str(exc), code="overloaded", type_="rate_limit_error",
                           headers={"retry-after": "1"}) from None
        except InputTooLongError as exc:
            raise ApiError(422, f"{exc} (send \"truncate\": true)", code="input_too_long", param="input") from None
        except InvalidTextError as exc:  # validated above already; kept so that no text can ever reach a 500
            raise ApiError(422, str(exc), code="invalid_input", param="input") from None
        except BatcherClosedError:
            raise ApiError(503, "the server is shutting down", code="shutting_down", type_="server_error") from None

    def count(info) -> int:
        tokens = int(info.token_counts.sum())
        metrics.inc("embfast_texts_total", value=len(info.token_counts))
        metrics.inc("embfast_tokens_total", value=tokens)
        metrics.inc("embfast_truncated_texts_total", value=int(info.truncated.sum()))
        return tokens

    @route("/v1/embeddings", "POST")
    async def embeddings(request: Request):
        body = _decode_json(await _read_body(request, max_request_bytes))
        need_embedder()
        p = parse_embeddings_request(body, dim=dim, max_inputs=max_inputs)
        dims = p["dimensions"]
        emb, info = await run_encode(request, p["texts"], truncate=p["truncate"], truncate_dim=dims,
                                     normalize_embeddings=True if dims else None)
        tokens = count(info)
        if p["encoding_format"] == "base64":
            rows = [base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii") for v in emb]
        else:
            rows = list(emb) if _orjson is not None else emb.tolist()
        data = [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)]
        out = {"object": "list", "data": data, "model": name,
               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        payload = _dumps(out) if emb.size <= 65536 else await run_in_threadpool(_dumps, out)
        return Response(payload, media_type="application/json",
                        headers={"x-embfast-truncated-inputs": str(int(info.truncated.sum()))})

    @route("/v1/search", "POST")
    async def search(request: Request):
        body = _decode_json(await _read_body(request, max_request_bytes))
        need_embedder()
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}",
                           code="invalid_json")
        _check_fields(body, _SEARCH_FIELDS)
        top_k = _optional(body, "top_k", (int,), "an integer in [1, 10000]", 10)
        if not 1 <= top_k <= 10000:
            raise ApiError(422, f"top_k must be an integer in [1, 10000], got {top_k}", code="invalid_parameter",
                           param="top_k")
        if "positive" in body or "negative" in body:
            return await recommend(body, top_k)
        queries, _ = _text_input(body, "query", max_inputs)
        truncate = _optional(body, "truncate", (bool,), "true or false", True)
        _optional(body, "model", (str,), "a string")
        if search_corpus is None:
            raise ApiError(404, "no corpus is loaded: start the server with --corpus FILE (.npy or an embfast "
                           "index)", code="no_corpus")
        cdim = search_corpus.dim
        q, info = await run_encode(request, queries, truncate=truncate, normalize_embeddings=True,
                                   truncate_dim=cdim if cdim < dim else None)
        hits = await run_in_threadpool(search_corpus.search, q, top_k)
        tokens = count(info)
        data = [{"object": "search_result", "index": i, "hits": row} for i, row in enumerate(hits)]
        return Response(_dumps({"object": "list", "data": data, "model": name,
                                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
                        media_type="application/json")

    async def recommend(body: dict, top_k: int):
        """/v1/search by example: {"positive": [ids], "negative": [ids], "top_k"} (no "query")."""
        if "query" in body:
            raise ApiError(422, "give either query or positive/negative ids, not both", code="invalid_input",
                           param="query")
        ids = {f: _example_ids(body, f) for f in ("positive", "negative")}
        if not ids["positive"]:
            raise ApiError(422, "positive must be a non-empty list of ids", code="invalid_input", param="positive")
        if search_corpus is None:
            raise ApiError(404, "no corpus is loaded: start the server with --corpus FILE (.npy or an embfast "
                           "index)", code="no_corpus")
        try:
            hits = await run_in_threadpool(search_corpus.recommend, ids["positive"], ids["negative"], top_k)
        except KeyError as exc:
            field = "negative" if str(exc.args[0]).startswith("negative") else "positive"
            raise ApiError(422, str(exc.args[0]), code="unknown_id", param=field) from None
        return Response(_dumps({"object": "list", "model": name, "usage": {"prompt_tokens": 0, "total_tokens": 0},
                                "data": [{"object": "search_result", "index": 0, "hits": hits}]}),
                        media_type="application/json")

    @route("/health", "GET")
    async def health(request: Request):
        if any(b.closed for b in batchers):
            return Response(_dumps({"status": "shutting down"}), status_code=503, media_type="application/json")
        return Response(_dumps({"status": "ok"}), media_type="application/json")

    @route("/info", "GET")
    async def info(request: Request):
        b = batchers[0]
        m = main_model
        model_info = {"dim": dim, "pooling": embedder.config.pooling, "normalize": embedder.config.normalize} \
            if embedder is not None else {"dim": None}
        return Response(_dumps({
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
            "version": __version__, "build": build_info()}), media_type="application/json")

    @route("/v1/models", "GET")
    async def models():
        return Response(_dumps({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                            "owned_by": "embfast"}]}),
                        media_type="application/json")

    @route("/metrics", "GET")
    async def prometheus(request: Request):
        return PlainTextResponse(metrics.render(batchers[0].stats()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    from embfast.server_rerank import add_rerank_routes

    async def read_json(request):
        return _decode_json(await _read_body(request, max_request_bytes))

    add_rerank_routes(route, reranker=reranker, batcher=rerank_batcher, error=ApiError, read_json=read_json,
                      dumps=_dumps, count=count, name=reranker.name if embedder is not None and reranker else name,
                      max_inputs=max_inputs)
    from embfast.server_sparse import add_sparse_routes

    add_sparse_routes(route, sparse=sparse, batcher=sparse_batcher, error=ApiError, read_json=read_json,
                      dumps=_dumps, count=count, max_inputs=max_inputs)
    return app


# ---- CLI ---------------------------------------------------------------------------------------------------
def _env(name: str, default=None):
    return os.environ.get(f"EMBFAST_{name}", default)


def _env_flag(name: str, default: bool) -> bool:
    value = _env(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def register_cli(subparsers) -> None:
    """Add ``embfast serve`` (flags mirror EMBFAST_* environment variables)."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible embedding server (FastAPI + uvicorn)",
                              description="Serve /v1/embeddings, /v1/search, /health, /info, /metrics. Every "
                                          "flag has an EMBFAST_* environment variable (--max-wait-ms = "
                                          "EMBFAST_MAX_WAIT_MS).")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=_env("PORT", 8080), help="port (default 8080)")
    p.add_argument("--model", default=_env("MODEL"), help="model folder (default: bundled all-MiniLM-L6-v2); "
                   "a cross-encoder folder serves only the reranking routes")
    p.add_argument("--reranker", default=_env("RERANKER"),
                   help="a cross-encoder folder for /rerank, /predict and /v1/rerank, next to --model")
    p.add_argument("--sparse", default=_env("SPARSE"), help="a sparse encoder (SPLADE) folder for /embed_sparse")
    p.add_argument("--device", default=_env("DEVICE", "cpu"), choices=["cpu", "cuda", "auto"])
    p.add_argument("--precision", default=_env("PRECISION", "fp32"), choices=["fp32", "int8", "fp16", "auto"])
    p.add_argument("--threads", type=int, default=_env("THREADS"), help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--max-batch-tokens", type=int, default=_env("MAX_BATCH_TOKENS", 16384),
                   help="padded tokens per ONNX Runtime batch (default 16384)")
    p.add_argument("--max-wait-ms", type=float, default=_env("MAX_WAIT_MS", 2.0),
                   help="an idle worker waits this long for more texts to merge (default 2 ms)")
    p.add_argument("--max-queue", type=int, default=_env("MAX_QUEUE", 1024),
                   help="requests waiting or running before 429 (default 1024)")
    p.add_argument("--max-client-batch-size", type=int, default=_env("MAX_CLIENT_BATCH_SIZE", DEFAULT_MAX_INPUTS),
                   help=f"most texts (or documents to rerank) per request, as TEI (default {DEFAULT_MAX_INPUTS}); "
                        "more: 422")
    p.add_argument("--max-request-bytes", type=int, default=_env("MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES),
                   help="largest request body in bytes (default 2000000)")
    p.add_argument("--api-key", default=_env("API_KEY"), help="require 'Authorization: Bearer KEY' (default: none)")
    p.add_argument("--corpus", default=_env("CORPUS"),
                   help="for /v1/search: an .npy file of (n, dim) embeddings, or an embfast index file")
    p.add_argument("--corpus-texts", default=_env("CORPUS_TEXTS"), help="the .npy corpus's texts, one per line")
    p.add_argument("--dynamic-batching", action=argparse.BooleanOptionalAction,
                   default=_env_flag("DYNAMIC_BATCHING", True),
                   help="merge concurrent requests into batches (default on; off = one request per ORT call)")
    p.add_argument("--shutdown-timeout-s", type=float, default=_env("SHUTDOWN_TIMEOUT_S", 30.0),
                   help="on SIGINT/SIGTERM, wait this long for in-flight requests (default 30 s)")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"),
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=_env_flag("ACCESS_LOG", False),
                   help="log every request (default off)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    """Load the model, build the app, run uvicorn until SIGINT/SIGTERM (in-flight requests finish)."""
    # A server tokenizes many small inputs at once: the tokenizers' own thread pool and ORT's spinning
    # threads would only fight the worker for the cores (set either variable to override).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("EMBFAST_ORT_SPIN", "0")
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(f"embfast serve needs the server extra: pip install 'embfast[server]' ({exc})") from exc
    from embfast import CrossEncoder, SparseEncoder
    from embfast.server_rerank import load_served_model

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    t0 = time.perf_counter()
    model_args = {"device": args.device, "precision": args.precision, "threads": args.threads}
    embedder = load_served_model(args.model, **model_args)
    reranker = CrossEncoder(args.reranker, **model_args) if args.reranker else None
    sparse = SparseEncoder(args.sparse, **model_args) if args.sparse else None
    app = create_app(embedder, reranker=reranker, sparse=sparse, max_batch_tokens=args.max_batch_tokens,
                     max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, dynamic_batching=args.dynamic_batching,
                     max_request_bytes=args.max_request_bytes, api_key=args.api_key or None,
                     corpus=args.corpus, corpus_texts=args.corpus_texts, max_inputs=args.max_client_batch_size)
    route = "/rerank" if isinstance(embedder, CrossEncoder) else "/v1/embeddings"
    print(f"embfast serve: {embedder}{f' + {reranker}' if reranker else ''} ready in "
          f"{time.perf_counter() - t0:.1f} s; http://{args.host}:{args.port}{route}", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"embfast serve: warning: listening on {args.host} without --api-key", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
                timeout_graceful_shutdown=args.shutdown_timeout_s)
    return 0
