"""What every API family of ``embfast serve`` shares: the error class, request-body reading and JSON
decoding, field validators and the JSON encoder. Transport only; no FastAPI import at module level."""

from __future__ import annotations

import json

from embfast.text import lone_surrogate, surrogate_reason

DEFAULT_MAX_REQUEST_BYTES = 2_000_000  # 2 MB, as TEI
DEFAULT_MAX_INPUTS = 2048  # OpenAI's limit per request
DRAIN_LIMIT_BYTES = 64 * 2**20  # read (and drop) at most this much of a refused body before answering
ENCODING_FORMATS = ("float", "base64")
_EMBEDDINGS_FIELDS = ("input", "model", "encoding_format", "dimensions", "user", "truncate")
_SEARCH_FIELDS = ("query", "top_k", "model", "truncate", "positive", "negative")
_ENDPOINTS = ("/v1/embeddings", "/v1/search", "/v1/models", "/health", "/info", "/metrics",
              "/rerank", "/predict", "/v1/rerank", "/v2/rerank")

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


def _error_body(exc: ApiError) -> bytes:
    return json.dumps({"error": {"message": exc.message, "type": exc.type, "code": exc.code,
                                 "param": exc.param}}).encode()
