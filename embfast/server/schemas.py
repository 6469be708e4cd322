"""Request and response bodies of every route, as pydantic classes, for ``/docs`` and ``/openapi.json``.

The routes check their bodies by hand (:mod:`embfast.server.common`): the messages name the field and the
fix, unknown fields are ignored or refused by option, and each API family answers in its own error shape,
which pydantic's generic 422 would not. These classes describe the same contract to OpenAPI tooling and client
generators; ``tests/test_server_apis.py`` checks that each documented field is one the route accepts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Texts = str | list[str]
TokenIds = list[int] | list[list[int]]
Direction = Literal["right", "left", "Right", "Left"]
InputType = Literal["query", "document", "passage", "search_query", "search_document", "classification",
                    "clustering"]


# ---- OpenAI ---------------------------------------------------------------------------------------------
class EmbeddingsRequest(BaseModel):
    """POST /v1/embeddings (and /embeddings)."""

    input: Texts | TokenIds = Field(description="text(s); token ids only with --token-ids")
    model: str | None = Field(None, description="any name; the answer names the served model")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Matryoshka: the first values, re-normalized")
    user: str | None = None
    truncate: bool = Field(True, description="cut an over-long text (counted in x-embfast-truncated-inputs)")
    truncation_direction: Direction = "right"
    input_type: InputType | None = Field(None, description="selects the model's prompt of that kind, if any")
    prompt_name: str | None = Field(None, description="one of the model's prompts")


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class SearchRequest(BaseModel):
    """POST /v1/search: a query, or ids to recommend by example."""

    query: Texts | None = None
    positive: list[int | str] | None = None
    negative: list[int | str] | None = None
    top_k: int = Field(10, ge=1, le=10000)
    model: str | None = None
    truncate: bool = True


# ---- TEI ------------------------------------------------------------------------------------------------
class EmbedRequest(BaseModel):
    """POST /embed, /, /invocations and /embed_all (TEI)."""

    inputs: Texts | TokenIds
    normalize: bool = True
    truncate: bool = True
    truncation_direction: Direction = "right"
    prompt_name: str | None = None
    dimensions: int | None = Field(None, ge=1)


class EmbedSparseRequest(BaseModel):
    """POST /embed_sparse (TEI): a SPLADE model's non-zero entries per input."""

    inputs: Texts
    truncate: bool = True
    truncation_direction: Literal["right", "Right"] = "right"
    prompt_name: str | None = None


class SparseValue(BaseModel):
    index: int
    value: float


class SimilarityInput(BaseModel):
    source_sentence: str
    sentences: list[str]


class SimilarityParameters(BaseModel):
    truncate: bool = True
    truncation_direction: Direction = "right"
    prompt_name: str | None = None


class SimilarityRequest(BaseModel):
    """POST /similarity (TEI; also huggingface_hub's sentence_similarity on POST /)."""

    inputs: SimilarityInput
    parameters: SimilarityParameters | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize (TEI)."""

    inputs: Texts
    add_special_tokens: bool = True
    prompt_name: str | None = None


class SimpleToken(BaseModel):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class DecodeRequest(BaseModel):
    """POST /decode (TEI)."""

    ids: TokenIds
    skip_special_tokens: bool = True


class RerankRequest(BaseModel):
    """POST /rerank (TEI)."""

    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool = True
    truncation_direction: Literal["right", "Right"] = "right"


class Rank(BaseModel):
    index: int
    score: float
    text: str | None = None


class PredictRequest(BaseModel):
    """POST /predict (TEI): a text, a pair, or a batch of texts and pairs."""

    inputs: str | list[str] | list[list[str]]
    raw_scores: bool = False
    truncate: bool = True


class Prediction(BaseModel):
    label: str
    score: float


class TeiError(BaseModel):
    error: str
    error_type: str


# ---- Cohere ---------------------------------------------------------------------------------------------
class CohereEmbedRequest(BaseModel):
    """POST /v2/embed (and /v1/embed)."""

    texts: list[str]
    model: str | None = None
    input_type: InputType | None = None
    embedding_types: list[Literal["float", "int8", "uint8", "binary", "ubinary"]] | None = None
    truncate: Literal["NONE", "START", "END"] = "END"
    output_dimension: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)


class CohereEmbedResponse(BaseModel):
    id: str
    embeddings: dict[str, list[list[float]]] | list[list[float]]
    texts: list[str]
    meta: dict
    response_type: Literal["embeddings_by_type", "embeddings_floats"]


class CohereRerankRequest(BaseModel):
    """POST /v1/rerank and /v2/rerank (Cohere, Jina)."""

    query: str
    documents: list[str | dict[str, str]]
    model: str | None = None
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False


#: route -> (request body class or None, response class or None), for the OpenAPI document.
ROUTES: dict[str, tuple[type[BaseModel] | None, object]] = {
    "/v1/embeddings": (EmbeddingsRequest, EmbeddingsResponse),
    "/embeddings": (EmbeddingsRequest, EmbeddingsResponse),
    "/v1/search": (SearchRequest, None),
    "/embed": (EmbedRequest, list[list[float]]),
    "/": (EmbedRequest, list[list[float]]),
    "/invocations": (EmbedRequest, list[list[float]]),
    "/embed_all": (EmbedRequest, list[list[list[float]]]),
    "/embed_sparse": (EmbedSparseRequest, list[list[SparseValue]]),
    "/similarity": (SimilarityRequest, list[float]),
    "/tokenize": (TokenizeRequest, list[list[SimpleToken]]),
    "/decode": (DecodeRequest, list[str]),
    "/rerank": (RerankRequest, list[Rank]),
    "/predict": (PredictRequest, list[Prediction] | list[list[Prediction]]),
    "/v1/embed": (CohereEmbedRequest, CohereEmbedResponse),
    "/v2/embed": (CohereEmbedRequest, CohereEmbedResponse),
    "/v1/rerank": (CohereRerankRequest, None),
    "/v2/rerank": (CohereRerankRequest, None),
}


def request_body(path: str) -> dict | None:
    """``openapi_extra`` for ``path``'s POST: its request body schema (inline, ``$defs`` resolved in place)."""
    model = ROUTES.get(path, (None, None))[0]
    if model is None:
        return None
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "x-embfast-defs": defs}
