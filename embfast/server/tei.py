"""text-embeddings-inference's (TEI's) HTTP API on ``embfast serve``, so TEI clients work unchanged
(llama-index ``TextEmbeddingsInference``, chromadb ``HuggingFaceEmbeddingServer``, ``huggingface_hub.InferenceClient``).
Transport only: request and answer shapes follow TEI's router (``router/src/http/types.rs``).

Routes (POST unless said; errors are TEI's ``{"error", "error_type"}``):
- ``/embed``, ``/`` and ``/invocations`` (SageMaker's): ``{"inputs": str | [str], "normalize": true, "truncate":
  true, "truncation_direction": "right" | "left", "prompt_name": null, "dimensions": null}`` -> ``[[float]]``.
  ``/`` also takes ``huggingface_hub``'s sentence-similarity body (``{"inputs": {"source_sentence", "sentences"}}``)
  and answers as ``/similarity``. ``truncate`` defaults to true (embfast's default; TEI's ``--auto-truncate``):
  an over-long text is cut and counted in the ``x-embfast-truncated-inputs`` header; false answers 422.
- ``/embed_all``: the same body -> one ``[[float]]`` (tokens x hidden, special tokens included) per input.
- ``/similarity``: ``{"inputs": {"source_sentence": str, "sentences": [str]}, "parameters": {"truncate",
  "truncation_direction", "prompt_name"}}`` -> ``[float]``, the cosine of each sentence to the source.
- ``/tokenize``: ``{"inputs": str | [str], "add_special_tokens": true, "prompt_name": null}`` -> per input a list
  of ``{"id", "text", "special", "start", "stop"}`` (character offsets into the prompt + text; null for special
  tokens), cut at the model's max length as the model would see them.
- ``/decode``: ``{"ids": [int] | [[int]], "skip_special_tokens": true}`` -> ``[str]``.
- ``GET /info``: TEI's keys (``model_id``, ``model_dtype``, ``model_type``, ``max_input_length``,
  ``max_client_batch_size``, ...) beside embfast's own. ``GET /health``, ``/ping``, ``/`` (200, or 503 shutting
  down), ``/health/live`` (the process answers), ``/health/ready`` (200 once every model answered its warm-up
  request; 503 while loading or shutting down).
"""

from __future__ import annotations

import contextlib
import json

import numpy as np

from embfast.server.common import (
    TOKEN_ID_HINT,
    ApiError,
    _check_fields,
    _dumps,
    _json_type,
    _optional,
    _orjson,
    _text_input,
    resolve_prompt,
    token_id_input,
    truncation_side,
)

_EMBED_FIELDS = ("inputs", "normalize", "truncate", "truncation_direction", "prompt_name", "dimensions", "model")
_SIMILARITY_FIELDS = ("inputs", "parameters", "model")
_SIMILARITY_PARAMETERS = ("truncate", "truncation_direction", "prompt_name")
_TOKENIZE_FIELDS = ("inputs", "add_special_tokens", "prompt_name", "model")
_DECODE_FIELDS = ("ids", "skip_special_tokens", "model")
_DTYPES = {"fp32": "float32", "int8": "int8", "fp16": "float16"}


def _inputs(body: dict, max_inputs: int) -> tuple[list[str], bool]:
    """``inputs``: a string or a list of strings; token ids get TEI-clients' one-line fix in the 422."""
    value = body.get("inputs")
    if isinstance(value, list) and value and (isinstance(value[0], int) or (
            isinstance(value[0], list) and value[0] and isinstance(value[0][0], int))):
        raise ApiError(422, f"inputs must be a string or a list of strings, got token ids; {TOKEN_ID_HINT}",
                       code="token_ids_not_accepted", param="inputs")
    return _text_input(body, "inputs", max_inputs)


def _body(body, allowed: tuple, ctx, route: str) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}", code="invalid_json")
    _check_fields(body, allowed, ctx.strict, route)
    return body


def add_tei_routes(route, ctx) -> None:
    """Register TEI's routes with ``route(path, method)`` on the app context ``ctx``
    (see :func:`embfast.server.app.create_app`)."""
    from fastapi import Request
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool

    def json_response(obj, truncated: int | None = None, status: int = 200):
        headers = {} if truncated is None else {"x-embfast-truncated-inputs": str(truncated)}
        return Response(_dumps(obj), status_code=status, media_type="application/json", headers=headers)

    async def embed_body(request, body: dict, route_name: str):
        _body(body, _EMBED_FIELDS, ctx, route_name)
        m = ctx.need_embedder(request, body)
        ids = token_id_input(body.get("inputs")) if ctx.token_ids is not None else None
        if ids is not None and len(ids) > ctx.max_inputs:
            raise ApiError(422, f"inputs must hold at most {ctx.max_inputs} inputs, got {len(ids)}",
                           code="too_many_inputs", param="inputs")
        texts = _inputs(body, ctx.max_inputs)[0] if ids is None else None
        normalize = _optional(body, "normalize", (bool,), "true or false", True)
        truncate = _optional(body, "truncate", (bool,), "true or false", True)
        dims = _optional(body, "dimensions", (int,), f"an integer in [1, {m.dim}]")
        if dims is not None and not 1 <= dims <= m.dim:
            raise ApiError(422, f"dimensions must be an integer in [1, {m.dim}], got {dims}",
                           code="invalid_parameter", param="dimensions")
        prompt = resolve_prompt(m.prompts, prompt_name=body.get("prompt_name"))
        side = truncation_side(body.get("truncation_direction"))
        opts = {"truncate": truncate, "truncate_dim": dims, "normalize_embeddings": normalize}
        if ids is not None and ctx.token_ids == "model":
            emb, info = await ctx.run_encode_ids(ids, served=m, **opts)
        else:
            if ids is not None:
                texts = ctx.token_decoder.decode(ids, "inputs")
            emb, info = await ctx.run_encode(texts, served=m, prompt_name=prompt, truncation_side=side, **opts)
        ctx.count(info)
        rows = list(emb) if _orjson is not None else emb.tolist()
        payload = _dumps(rows) if emb.size <= 65536 else await run_in_threadpool(_dumps, rows)
        return Response(payload, media_type="application/json",
                        headers={"x-embfast-truncated-inputs": str(int(info.truncated.sum()))})

    async def similarity_body(request, body: dict, route_name: str):
        _body(body, _SIMILARITY_FIELDS, ctx, route_name)
        m = ctx.need_embedder(request, body)
        inputs = body.get("inputs")
        if not isinstance(inputs, dict):
            raise ApiError(422, f"inputs must be an object {{\"source_sentence\": str, \"sentences\": [str]}}, got "
                           f"{_json_type(inputs)}", code="invalid_input", param="inputs")
        _check_fields(inputs, ("source_sentence", "sentences"), ctx.strict, route_name)
        source, _ = _text_input({"inputs.source_sentence": inputs.get("source_sentence")}, "inputs.source_sentence", 1)
        if not isinstance(source, list) or not isinstance(inputs.get("source_sentence"), str):
            raise ApiError(422, "inputs.source_sentence must be a string", code="invalid_input",
                           param="inputs.source_sentence")
        sentences, _ = _text_input({"inputs.sentences": inputs.get("sentences")}, "inputs.sentences", ctx.max_inputs)
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise ApiError(422, f"parameters must be an object, got {_json_type(params)}", code="invalid_parameter",
                           param="parameters")
        _check_fields(params, _SIMILARITY_PARAMETERS, ctx.strict, route_name)
        truncate = _optional(params, "truncate", (bool,), "true or false", True)
        prompt = resolve_prompt(m.prompts, prompt_name=params.get("prompt_name"))
        side = truncation_side(params.get("truncation_direction"), "parameters.truncation_direction")
        emb, info = await ctx.run_encode(source + sentences, served=m, truncate=truncate, normalize_embeddings=True,
                                         prompt_name=prompt, truncation_side=side)
        ctx.count(info)
        scores = (emb[1:].astype(np.float64) @ emb[0].astype(np.float64)).astype(np.float32)
        return json_response(scores.tolist(), truncated=int(info.truncated.sum()))

    @route("/embed", "POST")
    async def embed(request: Request):
        return await embed_body(request, await ctx.read_json(request), "/embed")

    @route("/", "POST")
    @route("/invocations", "POST")
    async def root(request: Request):
        body = await ctx.read_json(request)
        path = request.url.path
        if isinstance(body, dict) and isinstance(body.get("inputs"), dict):  # huggingface_hub's sentence_similarity
            return await similarity_body(request, body, path)
        return await embed_body(request, body, path)

    @route("/similarity", "POST")
    async def similarity(request: Request):
        return await similarity_body(request, await ctx.read_json(request), "/similarity")

    @route("/embed_all", "POST")
    async def embed_all(request: Request):
        body = _body(await ctx.read_json(request), _EMBED_FIELDS, ctx, "/embed_all")
        m = ctx.need_embedder(request, body)
        texts, _ = _inputs(body, ctx.max_inputs)
        truncate = _optional(body, "truncate", (bool,), "true or false", True)
        prompt = resolve_prompt(m.prompts, prompt_name=body.get("prompt_name"))
        side = truncation_side(body.get("truncation_direction"))

        def run():  # token vectors are not pooled, so they do not go through the batcher (but take its run lock)
            with m.batcher.run_lock or contextlib.nullcontext():
                return m.model.encode(texts, output_value="token_embeddings", truncate=truncate, prompt_name=prompt,
                                      truncation_side=side, return_info=True)

        try:
            tokens, info = await run_in_threadpool(run)
        except ValueError as exc:  # InputTooLongError with truncate false
            raise ApiError(422, f"{exc} (send \"truncate\": true)", code="input_too_long", param="inputs") from None
        ctx.count(info)
        return json_response([t.tolist() for t in tokens], truncated=int(info.truncated.sum()))

    @route("/tokenize", "POST")
    async def tokenize(request: Request):
        body = _body(await ctx.read_json(request), _TOKENIZE_FIELDS, ctx, "/tokenize")
        served = ctx.pick_any(request, body)
        model = served.model
        texts, _ = _inputs(body, ctx.max_inputs)
        special = _optional(body, "add_special_tokens", (bool,), "true or false", True)
        prompts = served.prompts if served.kind == "embedder" else {}
        prompt_name = resolve_prompt(prompts, prompt_name=body.get("prompt_name"))
        prefix = prompts.get(prompt_name, "") if prompt_name else ""
        texts = [prefix + t for t in texts]
        tok = model.tokenizer
        encodings = tok.tokenizer.encode_batch(texts, add_special_tokens=special)
        out = []
        for e in encodings:
            row = []
            for tid, piece, (start, stop) in zip(e.ids, e.tokens, e.offsets, strict=True):
                is_special = tid in tok.special_ids
                row.append({"id": tid, "text": piece, "special": is_special,
                            "start": None if is_special else start, "stop": None if is_special else stop})
            out.append(row)
        return json_response(out)

    @route("/decode", "POST")
    async def decode(request: Request):
        body = _body(await ctx.read_json(request), _DECODE_FIELDS, ctx, "/decode")
        model = ctx.pick_any(request, body).model
        ids = body.get("ids")
        vocab = model.tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
        batch = ids if isinstance(ids, list) and ids and isinstance(ids[0], list) else [ids]
        if not isinstance(ids, list) or not ids or not all(isinstance(r, list) and r for r in batch):
            raise ApiError(422, "ids must be a non-empty list of token ids or a list of such lists",
                           code="invalid_input", param="ids")
        if len(batch) > ctx.max_inputs:
            raise ApiError(422, f"ids must hold at most {ctx.max_inputs} lists, got {len(batch)}",
                           code="too_many_inputs", param="ids")
        for i, row in enumerate(batch):
            bad = [v for v in row if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab]
            if bad:
                raise ApiError(422, f"ids[{i}] holds {json.dumps(bad[0])[:40]}: token ids must be integers in "
                               f"[0, {vocab}) (this model's vocabulary)", code="invalid_input", param="ids")
        skip = _optional(body, "skip_special_tokens", (bool,), "true or false", True)
        return json_response(model.tokenizer.tokenizer.decode_batch(batch, skip_special_tokens=skip))


    # ---- info and health -----------------------------------------------------------------------------
    @route("/info", "GET")
    async def info(request: Request):
        ours = ctx.info_payload()
        # TEI's keys describe one model: the one ?model= names, else the first embedder (else the first model)
        if request.query_params.get("model") is not None:
            served = ctx.pick_any(request)
        else:
            served = ctx.registry.default("embedder") or ctx.registry.entries[0]
        m = served.model
        if served.kind == "embedder":
            model_type = {"embedding": {"pooling": m.config.pooling}}
        elif served.kind == "sparse-encoder":
            model_type = {"embedding": {"pooling": "splade"}}  # TEI's name for a SPLADE model
        else:
            labels = {str(i): n for i, n in enumerate(m.config.labels)}
            model_type = {"reranker" if m.num_labels == 1 else "classifier": {"id2label": labels}}
        b = served.batcher
        tei = {"model_id": served.name, "model_sha": None, "model_dtype": _DTYPES.get(m.precision, m.precision),
               "model_type": model_type, "max_concurrent_requests": b.max_queue,
               "max_input_length": m.config.max_seq_length, "max_batch_tokens": b.max_batch_tokens,
               "max_batch_requests": b.max_batch_size, "max_client_batch_size": ctx.max_inputs,
               "auto_truncate": True, "tokenization_workers": b.tokenizer_threads, "version": ctx.version,
               "sha": None, "docker_label": None, "prompts": served.prompts or None}
        return json_response({**tei, **ours})

    def healthy() -> bool:
        return not ctx.state.closing and not any(b.closed for b in ctx.batchers)

    async def health_answer():
        if not healthy():
            return json_response({"status": "shutting down", "error": "unhealthy", "error_type": "unhealthy"},
                                 status=503)
        return json_response({"status": "ok"})

    @route("/health", "GET")
    async def health(request: Request):
        return await health_answer()

    @route("/ping", "GET")
    async def ping(request: Request):
        return await health_answer()

    @route("/", "GET")
    async def root_health(request: Request):
        return await health_answer()

    @route("/health/live", "GET")
    async def live(request: Request):
        return json_response({"status": "live"})

    @route("/health/ready", "GET")
    async def ready(request: Request):
        if not healthy():
            return json_response({"status": "shutting down"}, status=503)
        if not ctx.state.ready:
            return json_response({"status": "loading"}, status=503)
        return json_response({"status": "ready"})
