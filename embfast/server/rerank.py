"""Reranking endpoints of ``embfast serve``: TEI's ``/rerank`` and ``/predict``, Cohere's and Jina's
``/v1/rerank`` (and Cohere's ``/v2/rerank``), served by a :class:`~embfast.CrossEncoder` through its own
:class:`~embfast.DynamicBatcher`. Transport only: parsing, status codes and answer shapes.

:func:`add_rerank_routes` is called by :func:`embfast.server.create_app`, which hands in its error class
and body reader (so this module does not import the server and the two stay one-way).

Endpoints (all ``POST``, JSON):
- ``/rerank`` (TEI): ``{"query": str, "texts": [str], "raw_scores": false, "return_text": false,
  "truncate": true, "truncation_direction": "right"}`` -> ``[{"index", "score", "text"?}]``, best first.
  Scores are the model's activation (sigmoid unless the model says otherwise), logits with ``raw_scores``.
- ``/predict`` (TEI): ``{"inputs": str | [str, str] | [[str] | [str, str], ...], "raw_scores": false,
  "truncate": true}`` -> per input ``[{"label", "score"}]`` sorted by score (a list of those for a batch).
  One label: the model's activation; several: a softmax over labels (TEI's); ``raw_scores``: logits.
- ``/v1/rerank`` (Cohere v1 / v2, Jina; ``/v2/rerank`` too): ``{"model"?, "query": str, "documents": [str |
  {"text": str}], "top_n"?: int, "return_documents": false}`` -> ``{"id", "model", "results": [{"index",
  "relevance_score", "document"?: {"text"}}], "meta", "usage": {"total_tokens"}}``. ``max_chunks_per_doc``,
  ``max_tokens_per_doc``, ``priority`` and ``rank_fields: ["text"]`` are accepted and have no effect (a pair
  is cut at the model's max_seq_length).

Errors: 424 when the server has no reranker, or its cross-encoder has several labels (``/rerank``,
``/v1/rerank``); 422 for a field that is wrong (missing, wrong type, empty, invalid Unicode, too many texts,
an input too long with ``truncate: false``); 429 queue full; 503 shutting down; never a 5xx for bad input.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import numpy as np

from embfast.server.common import _check_fields
from embfast.text import lone_surrogate, surrogate_reason

RERANK_ENDPOINTS = ("/rerank", "/predict", "/v1/rerank", "/v2/rerank")
_TEI_RERANK_FIELDS = ("query", "texts", "raw_scores", "return_text", "truncate", "truncation_direction", "model")
_TEI_PREDICT_FIELDS = ("inputs", "raw_scores", "truncate", "truncation_direction", "model")
_COHERE_FIELDS = ("model", "query", "documents", "top_n", "return_documents", "rank_fields", "max_chunks_per_doc",
                  "max_tokens_per_doc", "priority", "truncate")


def _kind(v) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}.get(type(v), "object")


class _Parser:
    """Validators that raise the server's ApiError (422 unless said otherwise)."""

    def __init__(self, error: type, max_inputs: int, strict: bool = True):
        self.error, self.max_inputs, self.strict = error, max_inputs, strict

    def fail(self, message: str, param: str | None = None, code: str = "invalid_input", status: int = 422):
        raise self.error(status, message, code=code, param=param)

    def body(self, body, allowed: tuple, route: str = "") -> dict:
        if not isinstance(body, dict):
            self.fail(f"the request body must be a JSON object, got {_kind(body)}", code="invalid_json", status=400)
        unknown = sorted(set(body) - set(allowed))
        if unknown and not self.strict:
            _check_fields(body, allowed, False, route)  # ignored, logged once per name
        elif unknown:
            self.fail(f"unknown field(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(allowed)}",
                      unknown[0], "unknown_field")
        return body

    def text(self, value, param: str) -> str:
        if not isinstance(value, str):
            self.fail(f"{param} must be a string, got {_kind(value)}", param)
        if not value:
            self.fail(f"{param} must be a non-empty string, got ''", param)
        pos = lone_surrogate(value)
        if pos >= 0:
            self.fail(f"{param} has {surrogate_reason(value, pos)}; send valid UTF-8 text", param)
        return value

    def required_text(self, body: dict, field: str) -> str:
        if field not in body:
            self.fail(f"{field} is required: a string", field)
        return self.text(body[field], field)

    def texts(self, body: dict, field: str, *, documents: bool = False) -> list[str]:
        """``body[field]``: a non-empty list of non-empty strings (or ``{"text": str}`` when ``documents``)."""
        if field not in body:
            self.fail(f"{field} is required: a list of strings", field)
        value = body[field]
        if not isinstance(value, list):
            self.fail(f"{field} must be a list of strings, got {_kind(value)}", field)
        if not value:
            self.fail(f"{field} must not be an empty list", field)
        if len(value) > self.max_inputs:
            self.fail(f"{field} must hold at most {self.max_inputs} strings, got {len(value)}", field,
                      "too_many_inputs")
        out = []
        for i, v in enumerate(value):
            if documents and isinstance(v, dict):
                if set(v) != {"text"}:
                    self.fail(f"{field}[{i}] must be a string or {{\"text\": string}}, got an object with "
                              f"{sorted(v)}", field)
                v = v["text"]
            out.append(self.text(v, f"{field}[{i}]"))
        return out

    def option(self, body: dict, field: str, types: tuple, expected: str, default=None):
        value = body.get(field)
        if value is None:
            return default
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            self.fail(f"{field} must be {expected}, got {_kind(value)}", field, "invalid_parameter")
        return value

    def truncation_direction(self, body: dict) -> None:
        direction = self.option(body, "truncation_direction", (str,), "'right'", "right")
        if direction.lower() != "right":
            self.fail(f"truncation_direction must be 'right' (pairs are cut longest-first from the end), got "
                      f"{direction!r}", "truncation_direction", "invalid_parameter")

    def predict_inputs(self, body: dict) -> tuple[list, bool]:
        """TEI's ``inputs``: a str, a pair [str, str], or a batch of [str] / [str, str].

        Returns (items, single): items are ``(text,)`` or ``(text, text)`` tuples (a batch for
        :func:`~embfast.cross_encoder.parse_pairs`, whatever their number).
        """
        if "inputs" not in body:
            self.fail("inputs is required: a string, a pair [string, string] or a list of those", "inputs")
        value = body["inputs"]
        if isinstance(value, str):
            return [(self.text(value, "inputs"),)], True
        if not isinstance(value, list) or not value:
            self.fail(f"inputs must be a string, a pair or a non-empty list of pairs, got "
                      f"{'an empty list' if value == [] else _kind(value)}", "inputs")
        if all(isinstance(v, str) for v in value):
            if len(value) != 2:
                self.fail(f"inputs must be a pair of 2 strings or a list of [string] / [string, string], got a "
                          f"list of {len(value)} strings", "inputs")
            return [(self.text(value[0], "inputs[0]"), self.text(value[1], "inputs[1]"))], True
        if len(value) > self.max_inputs:
            self.fail(f"inputs must hold at most {self.max_inputs} items, got {len(value)}", "inputs",
                      "too_many_inputs")
        items: list = []
        for i, v in enumerate(value):
            if not isinstance(v, list) or len(v) not in (1, 2):
                self.fail(f"inputs[{i}] must be [string] or [string, string], got "
                          f"{_kind(v) if not isinstance(v, list) else f'a list of {len(v)}'}", "inputs")
            items.append(tuple(self.text(t, f"inputs[{i}][{k}]") for k, t in enumerate(v)))
        return items, False


def add_rerank_routes(route: Callable, *, pick: Callable, error: type, read_json: Callable, dumps: Callable,
                      count: Callable, max_inputs: int, strict: bool = True) -> None:
    """Register ``/rerank``, ``/predict``, ``/v1/rerank`` and ``/v2/rerank`` with ``route(path, method)``.

    Args:
        route: the app's decorator factory (``route(path, "POST")(fn)``).
        pick: ``pick(request, body)`` -> the served cross-encoder for this request
            (:class:`embfast.server.registry.ServedModel`: ``.model`` the :class:`~embfast.CrossEncoder`,
            ``.batcher`` its :class:`~embfast.DynamicBatcher`, ``.name`` what answers carry); it raises the
            server's 424 when no cross-encoder is served, 404 for a model name nobody serves.
        error: the server's ApiError class ``(status, message, *, code, param, type_, headers)``.
        read_json: ``await read_json(request)`` -> the decoded body (400 / 413 raised there).
        dumps: JSON encoder to bytes. count: ``count(info) -> tokens`` (updates the server's metrics).
        max_inputs: most texts per request.
        strict: refuse unknown fields (422); False ignores them (logged once per name).
    """
    from fastapi import Request
    from fastapi.responses import Response

    from embfast.dynamic import BatcherClosedError, OverloadedError
    from embfast.server.common import overloaded_error
    from embfast.tokenization import InputTooLongError

    parse = _Parser(error, max_inputs, strict)

    def require(request, body, ranking: bool):
        served = pick(request, body)
        if ranking and served.model.num_labels != 1:
            raise error(424, f"the served cross-encoder {served.name!r} has {served.model.num_labels} labels, not one "
                        "score per pair: it is a classifier, not a reranker; use /predict", code="model_not_reranker")
        return served

    async def score(served, items: list, truncate: bool, *, raw: bool, softmax: bool = False):
        """(n, num_labels) scores and the call's info; batcher errors mapped to HTTP ones."""
        try:
            logits, info = await served.batcher.predict_async(items, activation_fn="identity", truncate=truncate,
                                                       return_info=True)
        except OverloadedError as exc:
            raise overloaded_error(exc, error) from None
        except InputTooLongError as exc:
            raise error(422, f"{exc} (send \"truncate\": true)", code="input_too_long") from None
        except BatcherClosedError:
            raise error(503, "the server is shutting down", code="shutting_down", type_="server_error") from None
        except (TypeError, ValueError) as exc:  # what the fields' checks let through (none expected)
            raise error(422, str(exc), code="invalid_input") from None
        logits = np.asarray(logits, dtype=np.float32).reshape(len(items), -1)
        scores = logits if raw else served.model.postprocess(logits, apply_softmax=softmax)
        return scores, info

    def json_response(obj, tokens: int | None = None, truncated: int | None = None):
        headers = {} if truncated is None else {"x-embfast-truncated-inputs": str(truncated)}
        return Response(dumps(obj), media_type="application/json", headers=headers)

    @route("/rerank", "POST")
    async def tei_rerank(request: Request):
        body = parse.body(await read_json(request), _TEI_RERANK_FIELDS, "/rerank")
        served = require(request, body, ranking=True)
        query = parse.required_text(body, "query")
        texts = parse.texts(body, "texts")
        raw = parse.option(body, "raw_scores", (bool,), "true or false", False)
        return_text = parse.option(body, "return_text", (bool,), "true or false", False)
        truncate = parse.option(body, "truncate", (bool,), "true or false", True)
        parse.truncation_direction(body)
        parse.option(body, "model", (str,), "a string")
        scores, info = await score(served, [(query, t) for t in texts], truncate, raw=raw)
        count(info)
        from embfast.cross_encoder import rank_results

        hits = rank_results(scores[:, 0], texts if return_text else None)
        out = [{"index": h["corpus_id"], "score": h["score"], **({"text": h["text"]} if return_text else {})}
               for h in hits]
        return json_response(out, truncated=int(info.truncated.sum()))

    @route("/predict", "POST")
    async def tei_predict(request: Request):
        body = parse.body(await read_json(request), _TEI_PREDICT_FIELDS, "/predict")
        served = require(request, body, ranking=False)
        reranker = served.model
        items, single = parse.predict_inputs(body)
        raw = parse.option(body, "raw_scores", (bool,), "true or false", False)
        truncate = parse.option(body, "truncate", (bool,), "true or false", True)
        parse.truncation_direction(body)
        parse.option(body, "model", (str,), "a string")
        scores, info = await score(served, items, truncate, raw=raw, softmax=reranker.num_labels > 1)
        count(info)
        labels = reranker.config.labels or [f"LABEL_{i}" for i in range(reranker.num_labels)]
        rows = [sorted(({"label": lab, "score": float(s)} for lab, s in zip(labels, row, strict=True)),
                       key=lambda d: -d["score"]) for row in scores]
        return json_response(rows[0] if single else rows, truncated=int(info.truncated.sum()))

    async def cohere_rerank(request: Request, version: str):
        body = parse.body(await read_json(request), _COHERE_FIELDS, "/v1/rerank")
        served = require(request, body, ranking=True)
        query = parse.required_text(body, "query")
        documents = parse.texts(body, "documents", documents=True)
        top_n = parse.option(body, "top_n", (int,), "an integer >= 1")
        if top_n is not None and top_n < 1:
            parse.fail(f"top_n must be an integer >= 1, got {top_n}", "top_n", "invalid_parameter")
        return_documents = parse.option(body, "return_documents", (bool,), "true or false", False)
        fields = parse.option(body, "rank_fields", (list,), "a list of field names")
        if fields is not None and fields != ["text"]:
            parse.fail(f"rank_fields must be [\"text\"] (documents are texts), got {fields!r}", "rank_fields",
                       "invalid_parameter")
        for field in ("max_chunks_per_doc", "max_tokens_per_doc", "priority"):
            parse.option(body, field, (int,), "an integer")
        parse.option(body, "model", (str,), "a string")
        truncate = parse.option(body, "truncate", (bool,), "true or false", True)
        scores, info = await score(served, [(query, d) for d in documents], truncate, raw=False)
        tokens = count(info)
        from embfast.cross_encoder import rank_results

        hits = rank_results(scores[:, 0], documents if return_documents else None, top_n)
        results = [{"index": h["corpus_id"], "relevance_score": h["score"],
                    **({"document": {"text": h["text"]}} if return_documents else {})} for h in hits]
        return json_response({"id": str(uuid.uuid4()), "model": served.name, "results": results,
                              "meta": {"api_version": {"version": version}, "billed_units": {"search_units": 1}},
                              "usage": {"total_tokens": tokens}}, truncated=int(info.truncated.sum()))

    @route("/v1/rerank", "POST")
    async def v1_rerank(request: Request):
        return await cohere_rerank(request, "1")

    @route("/v2/rerank", "POST")
    async def v2_rerank(request: Request):
        return await cohere_rerank(request, "2")


def load_served_model(model, **kwargs):
    """An :class:`~embfast.Embedder`, :class:`~embfast.CrossEncoder` or :class:`~embfast.SparseEncoder` for
    ``model``, by the folder's kind (what ``embfast serve --model`` calls)."""
    from embfast import CrossEncoder, Embedder, SparseEncoder
    from embfast.export import ModelKindError

    try:
        return Embedder(model, **kwargs)
    except ModelKindError:
        try:
            return CrossEncoder(model, **kwargs)
        except ModelKindError:
            return SparseEncoder(model, **kwargs)
