"""``embfast serve``: one embedding server that speaks the field's HTTP APIs (FastAPI + uvicorn), transport only.

Requests go transport -> :class:`~embfast.dynamic.DynamicBatcher` (one queue per model, token-budget batches,
one ONNX Runtime worker) -> the model. Why FastAPI + uvicorn: the stack the ``server`` extra names, well kept,
and ASGI lets every request wait on the batcher without a thread of its own.

One module per API family, so a client written for another engine works unchanged:
- :mod:`embfast.server.openai`: OpenAI's ``/v1/embeddings`` (and ``/embeddings``), ``/v1/models``, and
  embfast's ``/v1/search`` (cosine top-k over a loaded corpus, or recommendations by example).
- :mod:`embfast.server.tei`: text-embeddings-inference's ``/embed``, ``/``, ``/embed_all``, ``/similarity``,
  ``/tokenize``, ``/decode``, ``/info``, ``/health``, ``/ping``, and ``/health/live`` / ``/health/ready``.
- :mod:`embfast.server.cohere`: Cohere's ``/v2/embed`` and ``/v1/embed``.
- :mod:`embfast.server.rerank`: TEI's ``/rerank`` and ``/predict``, Cohere's / Jina's ``/v1/rerank`` and
  ``/v2/rerank`` with a cross-encoder (``reranker=``, or a CrossEncoder as the model).
- :mod:`embfast.server.common` (errors, body reading, field checks), :mod:`embfast.server.metrics`
  (Prometheus), :mod:`embfast.server.app` (:func:`create_app`), :mod:`embfast.server.cli` (``embfast serve``).

Across APIs: unknown request fields are ignored and logged once per name (``strict_requests`` /
``--strict-requests``: 422); ``input_type`` (query / document / passage / search_query / search_document /
classification / clustering) and ``prompt_name`` select the model's prompt; a long text is cut at the end (or
the start: ``truncation_direction: "left"``, Cohere's ``truncate: "START"``) and counted in the
``x-embfast-truncated-inputs`` header, or refused with ``truncate: false`` / ``"NONE"``. A route whose model is
not served answers 424.

Errors come in the shape each family's clients parse: OpenAI's ``{"error": {"message", "type", "code",
"param"}}``, TEI's ``{"error", "error_type"}`` on TEI's routes, Cohere's ``{"message"}`` on ``/v*/embed``.
Statuses: 400 malformed JSON, 401 missing or wrong API key (``Authorization: Bearer``; ``/health`` stays open),
404 / 405, 408 request body stalled (nothing for ``body_timeout_s``; the connection is closed), 413 body over
``max_request_bytes`` or one request over a whole ``max_queue_texts`` / ``max_queue_tokens`` budget, 422 a field
that is wrong, 424 model kind not served, 429 queue full in requests, texts or tokens (``Retry-After``: whole
seconds estimated from the backlog and the recent throughput), 503 shutting down. Never a 5xx for a bad request.
"""

from __future__ import annotations

from embfast.search_corpus import SearchCorpus, load_corpus, load_corpus_texts
from embfast.server.app import create_app
from embfast.server.cli import cmd_serve, register_cli
from embfast.server.common import (
    DEFAULT_MAX_INPUTS,
    DEFAULT_MAX_REQUEST_BYTES,
    ApiError,
    parse_embeddings_request,
)
from embfast.server.metrics import Metrics

__all__ = ["DEFAULT_MAX_INPUTS", "DEFAULT_MAX_REQUEST_BYTES", "ApiError", "Metrics", "SearchCorpus", "cmd_serve",
           "create_app", "load_corpus", "load_corpus_texts", "parse_embeddings_request", "register_cli"]
