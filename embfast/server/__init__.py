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
