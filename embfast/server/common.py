"""What every API family of ``embfast serve`` shares: the error class, request-body reading and JSON
decoding, field validators and the JSON encoder. Transport only; no FastAPI import at module level."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import weakref

from embfast.text import lone_surrogate, surrogate_reason

DEFAULT_MAX_REQUEST_BYTES = 2_000_000  # 2 MB, as TEI
DEFAULT_MAX_INPUTS = 2048  # OpenAI's limit per request
DEFAULT_BODY_TIMEOUT_S = 30.0  # a request body that sends nothing for this long is answered 408
DRAIN_LIMIT_BYTES = 64 * 2**20  # read (and drop) at most this much of a refused body before answering
ENCODING_FORMATS = ("float", "base64")
_EMBEDDINGS_FIELDS = ("input", "model", "encoding_format", "dimensions", "user", "truncate", "input_type",
                      "prompt_name", "truncation_direction")
_SEARCH_FIELDS = ("query", "top_k", "model", "truncate", "positive", "negative")
_ENDPOINTS = ("/v1/embeddings", "/embeddings", "/v1/search", "/v1/models", "/health", "/health/live",
              "/health/ready", "/ping", "/info", "/metrics", "/", "/embed", "/embed_all", "/similarity", "/tokenize",
              "/decode", "/invocations", "/v1/embed", "/v2/embed", "/rerank", "/predict", "/v1/rerank", "/v2/rerank",
              "/embed_sparse")
# input_type (Cohere's, NVIDIA's and Voyage's word for asymmetric models) -> the prompt names it selects, first
# found wins; a model with none of them embeds the text as it is.
INPUT_TYPES = {
    "query": ("query", "search_query"), "search_query": ("search_query", "query"),
    "document": ("document", "passage", "corpus", "search_document"),
    "passage": ("passage", "document", "corpus", "search_document"),
    "search_document": ("search_document", "document", "passage", "corpus"),
    "classification": ("classification",), "clustering": ("clustering",),
}
TOKEN_ID_HINT = ("this server takes text, not token ids: ids from another tokenizer (OpenAI's tiktoken) mean "
                 "nothing to this model. langchain-openai sends them by default: use "
                 "OpenAIEmbeddings(..., check_embedding_ctx_length=False), which sends the text")
_log = logging.getLogger("embfast.server")
_ignored_lock = threading.Lock()
_ignored_logged: set = set()

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


def _check_fields(body: dict, allowed: tuple, strict: bool = True, route: str = "") -> None:
    """Unknown fields: 422 when ``strict``; otherwise ignored (as TEI and vLLM do with what proxies add, such
    as LiteLLM's ``proxy_server_request`` or ``metadata``) and logged once per route and name."""
    unknown = sorted(set(body) - set(allowed))
    if unknown and not strict:
        with _ignored_lock:
            new = [u for u in unknown if (route, u) not in _ignored_logged]
            _ignored_logged.update((route, u) for u in new)
        if new:
            _log.warning("embfast serve: %s: ignoring unknown field(s) %s (logged once; --strict-requests "
                         "refuses them)", route or "request", ", ".join(map(repr, new)))
        return
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
        raise ApiError(422, f"{field} must be a string or a list of strings, got token ids; {TOKEN_ID_HINT}",
                       code="token_ids_not_accepted", param=field)
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


def token_id_input(value) -> list[list[int]] | None:
    """``value`` as lists of token ids when it is ids (OpenAI's ``[int]`` or ``[[int]]``), else None."""
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [value]
    if all(isinstance(r, list) and r and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
           for r in value):
        return value
    return None


class TokenIdDecoder:
    """Token ids -> text for ``--token-ids tiktoken:ENCODING``: what OpenAI's tokenizer sends (langchain-openai's
    default) decoded back to the text it came from, then embedded as text by this model.

    tiktoken reads its encoding file from ``TIKTOKEN_CACHE_DIR`` when set (offline; llama-index-core ships
    cl100k_base in ``llama_index/core/_static/tiktoken_cache``), else downloads it once.
    """

    def __init__(self, spec: str):
        name = spec.split(":", 1)[1] if ":" in spec else ""
        if not spec.startswith("tiktoken:") or not name:
            raise ValueError(f"token_ids must be None, 'model' or 'tiktoken:ENCODING' (e.g. tiktoken:cl100k_base), "
                             f"got {spec!r}")
        try:
            import tiktoken
        except ImportError as exc:
            raise ImportError(f"--token-ids {spec} needs tiktoken: pip install tiktoken ({exc})") from exc
        try:
            self.encoding = tiktoken.get_encoding(name)
        except Exception as exc:  # unknown name, or no network and no cached file
            raise ValueError(f"tiktoken encoding {name!r} could not be loaded ({type(exc).__name__}: {exc}); set "
                             "TIKTOKEN_CACHE_DIR to a folder holding its file to run offline") from exc
        self.name = name

    def decode(self, rows: list[list[int]], field: str) -> list[str]:
        n = self.encoding.n_vocab
        texts = []
        for i, row in enumerate(rows):
            bad = [v for v in row if not 0 <= v < n]
            if bad:
                raise ApiError(422, f"{field}[{i}] holds token id {bad[0]}, outside {self.name}'s vocabulary "
                               f"[0, {n})", code="invalid_input", param=field)
            text = self.encoding.decode(row, errors="replace")
            if not text:
                raise ApiError(422, f"{field}[{i}] decodes to an empty text", code="invalid_input", param=field)
            texts.append(text)
        return texts


def resolve_prompt(prompts: dict, *, input_type=None, prompt_name=None, type_field: str = "input_type") -> str | None:
    """The prompt name to embed with, from a request's ``prompt_name`` (TEI's) or ``input_type`` (Cohere's).

    Args:
        prompts: the model's named prompts (``config_sentence_transformers.json``; may be empty).
        input_type: one of :data:`INPUT_TYPES` (any case) or None. It selects the first of its prompt names the
            model has; a model with none of them (or no prompts at all) embeds the text as it is, since clients
            such as Cohere's and NVIDIA's always send one.
        prompt_name: a name of ``prompts``; wins over ``input_type``.

    Returns:
        A prompt name, or None (the model's default prompt, if it names one).

    Raises:
        ApiError 422: an ``input_type`` outside the vocabulary, or a ``prompt_name`` the model does not have
        (naming the ones it has).
    """
    if prompt_name is not None:
        if not isinstance(prompt_name, str):
            raise ApiError(422, f"prompt_name must be a string, got {_json_type(prompt_name)}",
                           code="invalid_parameter", param="prompt_name")
        if prompt_name not in prompts:
            has = ", ".join(map(repr, sorted(prompts))) if prompts else "none (send no prompt_name)"
            raise ApiError(422, f"prompt_name {prompt_name!r} is not one of this model's prompts: {has}",
                           code="unknown_prompt", param="prompt_name")
        return prompt_name
    if input_type is None:
        return None
    if not isinstance(input_type, str) or input_type.lower() not in INPUT_TYPES:
        raise ApiError(422, f"{type_field} must be one of {', '.join(INPUT_TYPES)}, got "
                       f"{json.dumps(input_type)[:40]}", code="invalid_parameter", param=type_field)
    return next((n for n in INPUT_TYPES[input_type.lower()] if n in prompts), None)


def truncation_side(value, field: str = "truncation_direction") -> str:
    """TEI's ``truncation_direction`` ("right" / "left", any case; default right) as a tokenizer side."""
    if value is None:
        return "right"
    if not isinstance(value, str) or value.lower() not in ("left", "right"):
        raise ApiError(422, f"{field} must be 'left' or 'right', got {json.dumps(value)[:40]}",
                       code="invalid_parameter", param=field)
    return value.lower()


def parse_embeddings_request(body, *, dim: int, max_inputs: int = DEFAULT_MAX_INPUTS, prompts: dict | None = None,
                             strict: bool = True, token_ids: bool = False) -> dict:
    """Validate an /v1/embeddings body (already JSON-decoded). Raises :class:`ApiError` (422) saying what is wrong.

    ``input_type`` / ``prompt_name`` select one of ``prompts`` (see :func:`resolve_prompt`); ``strict`` False
    ignores unknown fields instead of refusing them; ``token_ids`` True accepts ``input`` as token ids.

    Returns:
        dict(texts (None for token ids), token_ids (lists of ints, or None), encoding_format, dimensions (None or
        int in [1, dim]), truncate, prompt_name, truncation_side).
    """
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}", code="invalid_json")
    _check_fields(body, _EMBEDDINGS_FIELDS, strict, "/v1/embeddings")
    ids = token_id_input(body.get("input")) if token_ids else None
    texts = None
    if ids is not None and len(ids) > max_inputs:
        raise ApiError(422, f"input must hold at most {max_inputs} inputs, got {len(ids)}", code="too_many_inputs",
                       param="input")
    if ids is None:
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
    prompt = resolve_prompt(prompts or {}, input_type=body.get("input_type"), prompt_name=body.get("prompt_name"))
    return {"texts": texts, "token_ids": ids, "encoding_format": fmt, "dimensions": dims, "truncate": truncate,
            "prompt_name": prompt,
            "truncation_side": truncation_side(body.get("truncation_direction"))}


def body_timeout_error(seconds: float, received: int) -> ApiError:
    """408 for a request body that stalled (nothing received for ``seconds``); the connection is closed."""
    return ApiError(408, f"the request body stalled: nothing arrived for {seconds:g} s after {received} bytes "
                    "(the server's --body-timeout-s); send the whole body without pausing", code="body_timeout",
                    headers={"connection": "close"})


def overloaded_error(exc, error=ApiError) -> Exception:
    """A batcher's :class:`~embfast.dynamic.OverloadedError` as the HTTP refusal: 429 with ``retry-after`` (the
    batcher's estimate, whole seconds >= 1), or 413 for a :class:`~embfast.dynamic.RequestTooLargeError` (one
    request over a whole queue budget: retrying cannot help). ``error`` is the route's ApiError class."""
    from embfast.dynamic import RequestTooLargeError

    if isinstance(exc, RequestTooLargeError):
        return error(413, str(exc), code="request_too_large")
    return error(429, str(exc), code="overloaded", type_="rate_limit_error",
                 headers={"retry-after": str(getattr(exc, "retry_after_s", 1))})


class _IdleReads:
    """Idle timeouts for request-body reads without a timer per read (issue 19: ``wait_for`` made a task and a
    timer per chunk, and ``asyncio.timeout`` still a timer, whose cancelled handle stays in the loop's heap for the
    whole timeout; in an ad-hoc A/B under wrk, 7 alternating runs, the event loop's median CPU per request was
    401 us with this against 432 us with ``asyncio.timeout``, lower in 5 of 7 pairs). A read
    registers its task and deadline (a dict entry); one checker task per event loop wakes every quarter of the
    shortest timeout (at most every second) and cancels the reads past their deadline, which then answer 408.
    So a stalled body is answered within 1.25x the timeout (or the timeout + 1 s)."""

    def __init__(self):
        self.deadlines: dict = {}  # task -> monotonic deadline
        self.expired: set = set()
        self.interval = 1.0
        self.checker: asyncio.Task | None = None

    def watch(self, task, timeout_s: float) -> None:
        self.deadlines[task] = time.monotonic() + timeout_s
        if timeout_s / 4 < self.interval:
            self.interval = timeout_s / 4
        if self.checker is None or self.checker.done():
            self.checker = asyncio.ensure_future(self._check())

    def unwatch(self, task) -> bool:
        """Stop watching ``task``; True if its read was cancelled for being idle too long."""
        self.deadlines.pop(task, None)
        if task in self.expired:
            self.expired.discard(task)
            return True
        return False

    async def _check(self) -> None:
        while self.deadlines:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            for task, deadline in list(self.deadlines.items()):
                if deadline <= now:
                    del self.deadlines[task]
                    self.expired.add(task)
                    task.cancel()


_idle_reads: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> _IdleReads


async def _read_body(request, limit: int, idle_timeout_s: float | None = None) -> bytes:
    """The request body, or 413 past ``limit`` bytes (by Content-Length, or counted while streaming).

    A refused body is still read and dropped, up to DRAIN_LIMIT_BYTES, so the
    client sees the 413 instead of a reset connection. ``idle_timeout_s``: when
    no bytes arrive for this many seconds (per chunk, not in total), 408
    ``body_timeout`` with ``connection: close`` (None = wait forever), so a
    client that stops sending cannot hold the request open.
    """
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else 0
    too_big = size > limit
    chunks, received = [], 0
    stream = request.stream()
    reads = task = None
    if idle_timeout_s is not None:
        loop = asyncio.get_running_loop()
        reads = _idle_reads.get(loop)
        if reads is None:
            reads = _idle_reads[loop] = _IdleReads()
        task = asyncio.current_task()
    while True:
        try:
            if reads is not None:
                reads.watch(task, idle_timeout_s)
            try:
                chunk = await stream.__anext__()
            finally:
                timed_out = reads is not None and reads.unwatch(task)
        except StopAsyncIteration:
            break
        except asyncio.CancelledError:
            if not timed_out:
                raise
            if getattr(task, "uncancel", None) is not None:  # Python 3.11+: this cancellation is handled here
                task.uncancel()
            raise body_timeout_error(idle_timeout_s, received) from None
        except Exception as exc:
            if type(exc).__name__ != "ClientDisconnect":  # starlette's; nobody is left to answer
                raise
            raise ApiError(499, f"the client closed the connection after {received} bytes of the body",
                           code="client_disconnected") from None
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


_TEI_ERROR_TYPES = {413: "validation", 422: "validation", 424: "backend", 429: "overloaded", 503: "unhealthy",
                    400: "validation", 408: "validation", 401: "unauthorized", 404: "not_found", 405: "validation"}


def error_body(exc: ApiError, family: str = "openai") -> bytes:
    """The refusal in the shape the route's clients parse: TEI ``{"error", "error_type"}``, Cohere
    ``{"message"}``, else OpenAI's ``{"error": {"message", "type", "code", "param"}}``."""
    if family == "tei":
        return json.dumps({"error": exc.message, "error_type": _TEI_ERROR_TYPES.get(exc.status, "backend")}).encode()
    if family == "cohere":
        return json.dumps({"message": exc.message}).encode()
    return _error_body(exc)


def _error_body(exc: ApiError) -> bytes:
    return json.dumps({"error": {"message": exc.message, "type": exc.type, "code": exc.code,
                                 "param": exc.param}}).encode()
