"""Real client libraries of other engines and APIs against ``embfast serve`` on 127.0.0.1, unchanged: each gets
vectors equal to in-process ``encode`` (cosine >= 0.9999) and a query finds its sentence. The README's table of
clients comes from this file. Installed by the ``clients`` extra (part of ``dev``); a missing one is skipped
here, and CI installs them all (``EMBFAST_REQUIRE_CLIENTS=1`` turns a skip into a failure)."""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_server import serve
from test_server_apis import DOCS, QUERIES, retrieves, rows_close

from embfast.server import create_app

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::ResourceWarning")]


@pytest.fixture(autouse=True)
def _collect_client_sockets():
    """Several of these libraries never close the HTTP clients they create (chromadb's embedding functions,
    llama-index's and langchain's OpenAI wrappers): collect them here, where their ResourceWarning is expected,
    instead of letting a later test's garbage collection turn it into an error."""
    with warnings.catch_warnings():  # what earlier tests left, then what this one leaves
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def need(module: str):
    """Import a client library, or skip (fail under EMBFAST_REQUIRE_CLIENTS=1)."""
    if os.environ.get("EMBFAST_REQUIRE_CLIENTS") == "1":
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module)


def tiktoken_cache() -> Path:
    """The cl100k_base file llama-index-core ships (tiktoken reads it offline through TIKTOKEN_CACHE_DIR)."""
    core = need("llama_index.core")
    folder = Path(core.__file__).parent / "_static" / "tiktoken_cache"
    assert any(folder.iterdir()), f"no tiktoken files in {folder}"
    return folder


@pytest.fixture(scope="module")
def url(minilm):
    with serve(create_app(minilm, model_name="all-MiniLM-L6-v2")) as (base, _):
        yield base


@pytest.fixture(scope="module")
def expected(minilm):
    return minilm.encode(DOCS), minilm.encode(QUERIES)


def check(docs, queries, expected) -> None:
    rows_close(docs, expected[0])
    rows_close(queries, expected[1])
    retrieves(queries, docs)


def test_openai(url, expected):
    openai = need("openai")
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused") as client:
        docs = [d.embedding for d in client.embeddings.create(input=DOCS, model="m").data]
        queries = [d.embedding for d in client.embeddings.create(input=QUERIES, model="m").data]
    check(docs, queries, expected)


def test_langchain_openai_recommended_settings(url, expected):
    lc = need("langchain_openai")
    emb = lc.OpenAIEmbeddings(model="text-embedding-3-small", base_url=f"{url}/v1", api_key="unused",
                              check_embedding_ctx_length=False)
    check(emb.embed_documents(DOCS), [emb.embed_query(q) for q in QUERIES], expected)


def test_langchain_openai_defaults_with_token_ids(minilm, expected, monkeypatch):
    """langchain-openai's defaults send tiktoken ids: 422 with the fix by default, exact with --token-ids."""
    lc = need("langchain_openai")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))
    with serve(create_app(minilm)) as (base, _):
        emb = lc.OpenAIEmbeddings(model="text-embedding-3-small", base_url=f"{base}/v1", api_key="unused",
                                  max_retries=0)
        with pytest.raises(Exception, match="check_embedding_ctx_length=False"):
            emb.embed_documents(DOCS)
    with serve(create_app(minilm, token_ids="tiktoken:cl100k_base")) as (base, _):
        emb = lc.OpenAIEmbeddings(model="text-embedding-3-small", base_url=f"{base}/v1", api_key="unused")
        check(emb.embed_documents(DOCS), [emb.embed_query(q) for q in QUERIES], expected)


def test_token_ids_of_the_model(minilm, expected):
    with serve(create_app(minilm, token_ids="model")) as (base, _), httpx.Client(base_url=base, timeout=60) as c:
        ids = [e.ids for e in minilm.tokenizer.tokenizer.encode_batch(DOCS)]
        r = c.post("/v1/embeddings", json={"input": ids})
        assert r.status_code == 200, r.text
        rows_close([d["embedding"] for d in r.json()["data"]], expected[0])
        rows_close(c.post("/embed", json={"inputs": ids[0]}).json(), expected[0][:1])
        r = c.post("/v1/embeddings", json={"input": [[101, 30522, 102]]})
        assert r.status_code == 422 and "[0, 30522)" in r.json()["error"]["message"]
        r = c.post("/v1/embeddings", json={"input": [[101] * 300], "truncate": False})
        assert r.status_code == 422 and "max_seq_length=256" in r.json()["error"]["message"]
        assert c.post("/v1/embeddings", json={"input": DOCS}).status_code == 200  # text still works


def test_llama_index_tei_and_openai_like(url, expected):
    tei = need("llama_index.embeddings.text_embeddings_inference")
    like = need("llama_index.embeddings.openai_like")
    e = tei.TextEmbeddingsInference(model_name="all-MiniLM-L6-v2", base_url=url, timeout=60, embed_batch_size=4)
    check(e.get_text_embedding_batch(DOCS), [e.get_query_embedding(q) for q in QUERIES], expected)
    o = like.OpenAILikeEmbedding(model_name="all-MiniLM-L6-v2", api_base=f"{url}/v1", api_key="unused")
    check(o.get_text_embedding_batch(DOCS), [o.get_query_embedding(q) for q in QUERIES], expected)


def test_chromadb_embedding_functions(url, expected):
    need("chromadb")
    from chromadb.utils import embedding_functions as ef

    tei = ef.HuggingFaceEmbeddingServer(url=f"{url}/embed")
    try:
        check(tei(DOCS), tei(QUERIES), expected)
    finally:
        tei._session.close()  # the function never closes its httpx.Client (a ResourceWarning at exit otherwise)
    oa = ef.OpenAIEmbeddingFunction(api_key="unused", api_base=f"{url}/v1", model_name="text-embedding-3-small")
    check(oa(DOCS), oa(QUERIES), expected)


def test_huggingface_hub(url, expected):
    hub = need("huggingface_hub")
    client = hub.InferenceClient(model=url)
    docs = np.asarray(client.feature_extraction(DOCS)).reshape(len(DOCS), -1)
    queries = np.asarray(client.feature_extraction(QUERIES)).reshape(len(QUERIES), -1)
    check(docs, queries, expected)


def test_haystack(url, expected):
    need("haystack")
    from haystack import Document
    from haystack.components.embedders import OpenAIDocumentEmbedder, OpenAITextEmbedder
    from haystack.utils import Secret

    key = Secret.from_token("unused")
    docs = OpenAIDocumentEmbedder(api_key=key, api_base_url=f"{url}/v1", model="m", progress_bar=False).run(
        documents=[Document(content=d) for d in DOCS])["documents"]
    text = OpenAITextEmbedder(api_key=key, api_base_url=f"{url}/v1", model="m")
    check([d.embedding for d in docs], [text.run(text=q)["embedding"] for q in QUERIES], expected)


def test_cohere(url, expected):
    cohere = need("cohere")
    client = cohere.ClientV2(api_key="unused", base_url=url)
    docs = client.embed(texts=DOCS, model="m", input_type="search_document", embedding_types=["float"])
    queries = client.embed(texts=QUERIES, model="m", input_type="search_query", embedding_types=["float"])
    check(docs.embeddings.float_, queries.embeddings.float_, expected)
