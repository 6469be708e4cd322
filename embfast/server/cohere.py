"""Cohere's embed API on ``embfast serve`` (``POST /v2/embed``, and ``/v1/embed`` for the v1 client), so the
``cohere`` SDK works unchanged (``cohere.ClientV2(base_url=...).embed(...)``). Reranking (``/v1/rerank``,
``/v2/rerank``) lives in :mod:`embfast.server.rerank`. Transport only; errors are Cohere's ``{"message"}``.

Request: ``{"model"?: str, "texts": [str], "input_type"?: "search_query" | "search_document" | "classification" |
"clustering" (selects the model's prompt of that kind, if it has one; "image" is refused), "embedding_types"?:
["float" | "int8" | "uint8" | "binary" | "ubinary"] (default ["float"]), "truncate"?: "END" (default: cut the
end of a long text) | "START" (cut its start) | "NONE" (422 for an over-long text), "output_dimension"?: int
(Matryoshka: the first values, re-normalized)}``. ``images`` and ``inputs`` (image content) answer 422: the model
reads text.

Answer: ``{"id", "embeddings": {type: [[...]]}, "texts", "meta": {"api_version": {"version"}, "billed_units":
{"input_tokens"}}, "response_type": "embeddings_by_type"}``; v1 without ``embedding_types`` answers
``"embeddings_floats"`` with a bare list of float vectors, as Cohere's v1 does. ``int8`` / ``uint8`` are
sentence-transformers' scalar quantization with ranges from the request's own vectors, exactly what
``Embedder.encode(texts, precision="int8")`` gives for the same texts; ``binary`` / ``ubinary`` are packed sign
bits (8 dimensions per value), batch-independent.
"""

from __future__ import annotations

import uuid

import numpy as np

from embfast.quantization import quantize_embeddings
from embfast.server.common import ApiError, _check_fields, _dumps, _json_type, _optional, _text_input, resolve_prompt

_FIELDS = ("model", "texts", "input_type", "embedding_types", "truncate", "output_dimension", "max_tokens",
           "images", "inputs", "priority")
EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary")
_TRUNCATE = {"END": "right", "START": "left", "NONE": None}


def add_cohere_routes(route, ctx) -> None:
    """Register ``/v2/embed`` and ``/v1/embed`` with ``route(path, method)`` on the app context ``ctx``
    (see :func:`embfast.server.app.create_app`)."""
    from fastapi import Request
    from fastapi.responses import Response

    async def embed(request, body, version: str):
        path = f"/{version}/embed"
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}", code="invalid_json")
        _check_fields(body, _FIELDS, ctx.strict, path)
        m = ctx.need_embedder(request, body)
        for field in ("images", "inputs"):
            if body.get(field):
                raise ApiError(422, f"{field} is not supported: this server embeds text; send \"texts\"",
                               code="invalid_input", param=field)
        texts, _ = _text_input(body, "texts", ctx.max_inputs)
        _optional(body, "model", (str,), "a string")
        input_type = body.get("input_type")
        if isinstance(input_type, str) and input_type.lower() == "image":
            raise ApiError(422, "input_type 'image' is not supported: this server embeds text", code="invalid_input",
                           param="input_type")
        prompt = resolve_prompt(m.prompts, input_type=input_type)
        types = body.get("embedding_types")
        if types is not None and (not isinstance(types, list) or not types
                                  or not all(isinstance(t, str) and t in EMBEDDING_TYPES for t in types)):
            raise ApiError(422, f"embedding_types must be a non-empty list of {', '.join(EMBEDDING_TYPES)}, got "
                           f"{str(types)[:60]}", code="invalid_parameter", param="embedding_types")
        truncate = _optional(body, "truncate", (str,), "'NONE', 'START' or 'END'", "END")
        if truncate.upper() not in _TRUNCATE:
            raise ApiError(422, f"truncate must be 'NONE', 'START' or 'END', got {truncate!r}",
                           code="invalid_parameter", param="truncate")
        side = _TRUNCATE[truncate.upper()]
        dims = _optional(body, "output_dimension", (int,), f"an integer in [1, {m.dim}]")
        if dims is not None and not 1 <= dims <= m.dim:
            raise ApiError(422, f"output_dimension must be an integer in [1, {m.dim}], got {dims}",
                           code="invalid_parameter", param="output_dimension")
        max_tokens = _optional(body, "max_tokens", (int,), "an integer >= 1")
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(422, f"max_tokens must be an integer >= 1, got {max_tokens}", code="invalid_parameter",
                           param="max_tokens")
        emb, info = await ctx.run_encode(texts, served=m, truncate=side is not None, truncation_side=side or "right",
                                         truncate_dim=dims, normalize_embeddings=True if dims else None,
                                         prompt_name=prompt)
        tokens = ctx.count(info)
        meta = {"api_version": {"version": version[1:]}, "billed_units": {"input_tokens": tokens}}
        if version == "v1" and types is None:
            out = {"id": str(uuid.uuid4()), "embeddings": np.asarray(emb, dtype=np.float32).tolist(), "texts": texts,
                   "meta": meta, "response_type": "embeddings_floats"}
        else:
            by_type = {t: quantize_embeddings(emb, "float32" if t == "float" else t).tolist()
                       for t in (types or ["float"])}
            out = {"id": str(uuid.uuid4()), "embeddings": by_type, "texts": texts, "meta": meta,
                   "response_type": "embeddings_by_type"}
        return Response(_dumps(out), media_type="application/json",
                        headers={"x-embfast-truncated-inputs": str(int(info.truncated.sum()))})

    @route("/v2/embed", "POST")
    async def embed_v2(request: Request):
        return await embed(request, await ctx.read_json(request), "v2")

    @route("/v1/embed", "POST")
    async def embed_v1(request: Request):
        return await embed(request, await ctx.read_json(request), "v1")
