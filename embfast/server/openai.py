"""OpenAI's embeddings API on ``embfast serve`` (``/v1/embeddings``, ``/embeddings``, ``/v1/models``) and
embfast's OpenAI-shaped ``/v1/search`` (top-k over a loaded corpus, or recommendations by example). Transport only.

``/v1/embeddings``: ``input`` a string or a list of strings (at most ``max_client_batch_size``, none empty;
token ids get a 422 that says how to make the client send text), ``model`` (any string), ``encoding_format``
``float`` | ``base64``, ``dimensions`` (Matryoshka: the first values, re-normalized), ``user`` (ignored), and
what other engines take as well: ``input_type`` (query / document / passage / search_query / search_document /
classification / clustering: selects the model's prompt of that name, if it has one), ``prompt_name``,
``truncate`` (default true; false: 422 for an over-long text) and ``truncation_direction`` (right / left).
"""

from __future__ import annotations

import base64

import numpy as np

from embfast.server.common import (
    _SEARCH_FIELDS,
    ApiError,
    _check_fields,
    _dumps,
    _example_ids,
    _json_type,
    _optional,
    _orjson,
    _text_input,
    parse_embeddings_request,
)


def add_openai_routes(route, ctx) -> None:
    """Register the OpenAI-family routes with ``route(path, method)`` on the app context ``ctx``
    (see :func:`embfast.server.app.create_app`)."""
    from fastapi import Request
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool

    @route("/v1/embeddings", "POST")
    @route("/embeddings", "POST")
    async def embeddings(request: Request):
        body = await ctx.read_json(request)
        m = ctx.need_embedder(request, body)
        p = parse_embeddings_request(body, dim=m.dim, max_inputs=ctx.max_inputs, prompts=m.prompts,
                                     strict=ctx.strict, token_ids=ctx.token_ids is not None)
        dims = p["dimensions"]
        opts = {"truncate": p["truncate"], "truncate_dim": dims, "normalize_embeddings": True if dims else None}
        texts = p["texts"]
        if p["token_ids"] is not None and ctx.token_ids == "model":
            emb, info = await ctx.run_encode_ids(p["token_ids"], served=m, **opts)
        else:
            if p["token_ids"] is not None:  # tiktoken ids: decoded to the text they came from
                texts = ctx.token_decoder.decode(p["token_ids"], "input")
            emb, info = await ctx.run_encode(texts, served=m, prompt_name=p["prompt_name"],
                                             truncation_side=p["truncation_side"], **opts)
        tokens = ctx.count(info)
        if p["encoding_format"] == "base64":
            rows = [base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii") for v in emb]
        else:
            rows = list(emb) if _orjson is not None else emb.tolist()
        data = [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)]
        out = {"object": "list", "data": data, "model": m.name,
               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        payload = _dumps(out) if emb.size <= 65536 else await run_in_threadpool(_dumps, out)
        return Response(payload, media_type="application/json",
                        headers={"x-embfast-truncated-inputs": str(int(info.truncated.sum()))})

    @route("/v1/search", "POST")
    async def search(request: Request):
        body = await ctx.read_json(request)
        m = ctx.need_embedder(request, body)
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}",
                           code="invalid_json")
        _check_fields(body, _SEARCH_FIELDS, ctx.strict, "/v1/search")
        top_k = _optional(body, "top_k", (int,), "an integer in [1, 10000]", 10)
        if not 1 <= top_k <= 10000:
            raise ApiError(422, f"top_k must be an integer in [1, 10000], got {top_k}", code="invalid_parameter",
                           param="top_k")
        if "positive" in body or "negative" in body:
            return await recommend(body, top_k, m.name)
        queries, _ = _text_input(body, "query", ctx.max_inputs)
        truncate = _optional(body, "truncate", (bool,), "true or false", True)
        _optional(body, "model", (str,), "a string")
        if ctx.search_corpus is None:
            raise ApiError(404, "no corpus is loaded: start the server with --corpus FILE (.npy or an embfast "
                           "index)", code="no_corpus")
        if m.model is not ctx.embedder:
            raise ApiError(422, f"the corpus was embedded with {ctx.registry.default('embedder').name!r}, the first "
                           f"embedder; model {m.name!r} "
                           "cannot search it", code="invalid_parameter", param="model")
        cdim = ctx.search_corpus.dim
        q, info = await ctx.run_encode(queries, truncate=truncate, normalize_embeddings=True,
                                   truncate_dim=cdim if cdim < ctx.dim else None)
        hits = await run_in_threadpool(ctx.search_corpus.search, q, top_k)
        tokens = ctx.count(info)
        data = [{"object": "search_result", "index": i, "hits": row} for i, row in enumerate(hits)]
        return Response(_dumps({"object": "list", "data": data, "model": m.name,
                                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
                        media_type="application/json")

    async def recommend(body: dict, top_k: int, model_name: str):
        """/v1/search by example: {"positive": [ids], "negative": [ids], "top_k"} (no "query")."""
        if "query" in body:
            raise ApiError(422, "give either query or positive/negative ids, not both", code="invalid_input",
                           param="query")
        ids = {f: _example_ids(body, f) for f in ("positive", "negative")}
        if not ids["positive"]:
            raise ApiError(422, "positive must be a non-empty list of ids", code="invalid_input", param="positive")
        if ctx.search_corpus is None:
            raise ApiError(404, "no corpus is loaded: start the server with --corpus FILE (.npy or an embfast "
                           "index)", code="no_corpus")
        try:
            hits = await run_in_threadpool(ctx.search_corpus.recommend, ids["positive"], ids["negative"], top_k)
        except KeyError as exc:
            field = "negative" if str(exc.args[0]).startswith("negative") else "positive"
            raise ApiError(422, str(exc.args[0]), code="unknown_id", param=field) from None
        return Response(_dumps({"object": "list", "model": model_name, "usage": {"prompt_tokens": 0, "total_tokens": 0},
                                "data": [{"object": "search_result", "index": 0, "hits": hits}]}),
                        media_type="application/json")

    @route("/v1/models", "GET")
    async def models(request: Request):
        """Every served name (aliases too, each as its own id, as vLLM lists them; ``root`` is the model's first
        name), with its kind, dimension, max length, precision, threads and memory."""
        data = []
        for e in ctx.registry:
            d = e.describe()
            for n in e.names:
                data.append({"id": n, "object": "model", "created": 0, "owned_by": "embfast", "root": e.name,
                             **{k: v for k, v in d.items() if k not in ("id", "aliases")}})
        return Response(_dumps({"object": "list", "data": data}), media_type="application/json")

