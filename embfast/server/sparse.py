"""Sparse embedding endpoint of ``embfast serve``: TEI's ``POST /embed_sparse``, served by a
:class:`~embfast.SparseEncoder` (SPLADE) through its own :class:`~embfast.DynamicBatcher`. Transport only.

:func:`add_sparse_routes` is called by :func:`embfast.server.create_app`, which hands in its error class and
body reader (this module does not import the server: the two stay one-way).

``POST /embed_sparse`` (TEI): ``{"inputs": str | [str], "truncate": true, "truncation_direction": "right",
"prompt_name": null}`` -> one list per input (also for a single string) of ``{"index": int, "value": float}``,
the vector's non-zero entries, ascending index. ``truncate`` defaults to true here (as embfast's other routes;
TEI's default is false): with ``false`` an input longer than the model takes answers 422.

Errors: 424 when the server has no sparse model (TEI's answer for a model that is not a SPLADE model);
422 for a field that is wrong (missing, wrong type, empty, invalid Unicode, too many inputs, an unknown
prompt_name, an input too long with ``truncate: false``); 429 queue full; 503 shutting down.
"""

from __future__ import annotations

from collections.abc import Callable

from embfast.server.rerank import _kind, _Parser

SPARSE_ENDPOINTS = ("/embed_sparse",)
_FIELDS = ("inputs", "truncate", "truncation_direction", "prompt_name", "model")


def sparse_rows(csr) -> list[list[dict]]:
    """TEI's answer for (n, vocab) CSR rows: per row ``[{"index", "value"}]``, ascending index, zeros dropped."""
    csr.sort_indices()
    out = []
    for r in range(csr.shape[0]):
        a, b = int(csr.indptr[r]), int(csr.indptr[r + 1])
        out.append([{"index": i, "value": v} for i, v in zip(csr.indices[a:b].tolist(), csr.data[a:b].tolist(),
                                                            strict=True) if v != 0.0])
    return out


def add_sparse_routes(route: Callable, *, pick: Callable, error: type, read_json: Callable, dumps: Callable,
                      count: Callable, max_inputs: int, strict: bool = True) -> None:
    """Register ``/embed_sparse`` with ``route(path, method)``.

    Args:
        route: the app's decorator factory (``route(path, "POST")(fn)``).
        pick: ``pick(request, body)`` -> the served sparse encoder for this request
            (:class:`embfast.server.registry.ServedModel`: ``.model`` the :class:`~embfast.SparseEncoder`,
            ``.batcher`` its :class:`~embfast.DynamicBatcher`); it raises the server's 424 when none is served,
            404 for a model name nobody serves.
        error: the server's ApiError class ``(status, message, *, code, param, type_, headers)``.
        read_json: ``await read_json(request)`` -> the decoded body. dumps: JSON encoder to bytes.
        count: ``count(info) -> tokens`` (the server's metrics). max_inputs: most texts per request.
        strict: refuse unknown fields (422); False ignores them (logged once per name).
    """
    from fastapi import Request
    from fastapi.responses import Response

    from embfast.dynamic import BatcherClosedError, OverloadedError
    from embfast.server.common import overloaded_error
    from embfast.tokenization import InputTooLongError

    parse = _Parser(error, max_inputs, strict)

    @route("/embed_sparse", "POST")
    async def embed_sparse(request: Request):
        body = parse.body(await read_json(request), _FIELDS, "/embed_sparse")
        served = pick(request, body)
        sparse, batcher = served.model, served.batcher
        value = body.get("inputs")
        if isinstance(value, str):
            texts = [parse.text(value, "inputs")]
        elif isinstance(value, list):
            texts = parse.texts(body, "inputs")
        else:
            parse.fail(f"inputs is required: a string or a list of strings, got {_kind(value)}", "inputs")
        truncate = parse.option(body, "truncate", (bool,), "true or false", True)
        parse.truncation_direction(body)
        prompt_name = parse.option(body, "prompt_name", (str,), "a string or null")
        parse.option(body, "model", (str,), "a string")
        if prompt_name is not None and prompt_name not in sparse.prompts:
            parse.fail(f"prompt_name {prompt_name!r} is not one of the model's prompts: {sorted(sparse.prompts)}",
                       "prompt_name", "invalid_parameter")
        try:
            rows, info = await batcher.encode_sparse_async(texts, truncate=truncate, prompt_name=prompt_name,
                                                           return_info=True)
        except OverloadedError as exc:
            raise overloaded_error(exc, error) from None
        except InputTooLongError as exc:
            raise error(422, f"{exc} (send \"truncate\": true)", code="input_too_long") from None
        except BatcherClosedError:
            raise error(503, "the server is shutting down", code="shutting_down", type_="server_error") from None
        count(info)
        return Response(dumps(sparse_rows(rows)), media_type="application/json",
                        headers={"x-embfast-truncated-inputs": str(int(info.truncated.sum()))})
