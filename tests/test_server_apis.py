"""The field's HTTP APIs on ``embfast serve``: TEI's routes, Cohere's embed, OpenAI's extras (input_type,
prompt_name, lenient fields), readiness, and the real client libraries that speak them, over real HTTP on
127.0.0.1 with the real all-MiniLM-L6-v2 (vectors equal to in-process ``encode``; a query finds its sentence)."""

from __future__ import annotations

import gc
import json
import re
import warnings

import httpx
import numpy as np
import pytest
from test_server import SENTENCES, cosine, serve

from embfast.server import create_app

from tests_helpers import copy_model

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _collect_client_sockets():
    """Client libraries (cohere's, huggingface_hub's) keep HTTP clients open until collected: collect them after
    each test, where their ResourceWarning is expected, not in a later test (warnings are errors)."""
    with warnings.catch_warnings():  # what earlier tests left, then what this one leaves
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()

DOCS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "Photosynthesis turns light into sugar.",
        "The recipe needs two eggs and flour.", "Rain is expected over the weekend."]
QUERIES = ["Where did the cat sit?", "What happened to the markets?", "How do plants make food?",
           "What goes into the batter?", "Will it rain on Saturday?"]
LONG = "the history of the old city walls and their many gates " * 40


@pytest.fixture(scope="module")
def url(minilm):
    with serve(create_app(minilm, model_name="all-MiniLM-L6-v2")) as (base, _):
        yield base


def retrieves(query_vecs, doc_vecs) -> None:
    """Each query's best document is its own (same index)."""
    scores = np.asarray(query_vecs, dtype=np.float64) @ np.asarray(doc_vecs, dtype=np.float64).T
    assert list(scores.argmax(axis=1)) == list(range(len(query_vecs)))


def rows_close(got, expected) -> None:
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == np.shape(expected)
    assert min(cosine(a, b) for a, b in zip(got, expected, strict=True)) >= 0.9999


# ---- TEI ---------------------------------------------------------------------------------------------
def test_tei_embed_routes(url, minilm):
    with httpx.Client(base_url=url, timeout=60) as c:
        for path in ("/embed", "/", "/invocations"):
            r = c.post(path, json={"inputs": SENTENCES[:4]})
            assert r.status_code == 200, r.text
            rows_close(r.json(), minilm.encode(SENTENCES[:4]))
        one = c.post("/embed", json={"inputs": "one text"}).json()
        assert len(one) == 1 and len(one[0]) == minilm.dim
        raw = c.post("/embed", json={"inputs": DOCS, "normalize": False}).json()
        np.testing.assert_allclose(raw, minilm.encode(DOCS, normalize_embeddings=False), rtol=1e-4, atol=1e-5)
        assert abs(np.linalg.norm(raw[0]) - 1) > 1e-3  # really not normalized
        cut = np.array(c.post("/embed", json={"inputs": DOCS, "dimensions": 64}).json())
        np.testing.assert_allclose(cut, minilm.encode(DOCS, truncate_dim=64), rtol=1e-4, atol=1e-5)
        left = c.post("/embed", json={"inputs": [LONG], "truncation_direction": "Left"})
        assert left.headers["x-embfast-truncated-inputs"] == "1"
        rows_close(left.json(), minilm.encode([LONG], truncation_side="left"))
        right = c.post("/embed", json={"inputs": [LONG], "truncation_direction": "right"}).json()
        assert cosine(right[0], left.json()[0]) < 0.999  # the two ends of the text differ
        r = c.post("/embed", json={"inputs": [LONG], "truncate": False})
        assert r.status_code == 422 and r.json()["error_type"] == "validation" and "max_seq_length" in r.json()["error"]


def test_similarity_embed_all_tokenize_decode(url, minilm):
    with httpx.Client(base_url=url, timeout=60) as c:
        sims = c.post("/similarity", json={"inputs": {"source_sentence": QUERIES[0], "sentences": DOCS}}).json()
        q, d = minilm.encode([QUERIES[0]]), minilm.encode(DOCS)
        np.testing.assert_allclose(sims, (d @ q[0]), atol=1e-4)
        assert int(np.argmax(sims)) == 0

        tokens = c.post("/embed_all", json={"inputs": DOCS[:2]}).json()
        expected = minilm.encode(DOCS[:2], output_value="token_embeddings")
        for got, exp in zip(tokens, expected, strict=True):
            np.testing.assert_allclose(got, exp, rtol=1e-3, atol=1e-4)

        toks = c.post("/tokenize", json={"inputs": ["Hello world!", "Cats"]}).json()
        enc = minilm.tokenizer.tokenizer.encode("Hello world!")
        assert [t["id"] for t in toks[0]] == enc.ids
        assert toks[0][0] == {"id": enc.ids[0], "text": "[CLS]", "special": True, "start": None, "stop": None}
        assert toks[0][1]["text"] == "hello" and (toks[0][1]["start"], toks[0][1]["stop"]) == (0, 5)
        bare = c.post("/tokenize", json={"inputs": "Hello", "add_special_tokens": False}).json()
        assert [t["special"] for t in bare[0]] == [False]

        texts = c.post("/decode", json={"ids": [t["id"] for t in toks[0]]}).json()
        assert texts == ["hello world!"]
        both = c.post("/decode", json={"ids": [[t["id"] for t in row] for row in toks],
                                       "skip_special_tokens": False}).json()
        assert both == ["[CLS] hello world! [SEP]", "[CLS] cats [SEP]"]


def test_info_and_health(url, minilm):
    with httpx.Client(base_url=url, timeout=60) as c:
        info = c.get("/info").json()
        assert info["model_id"] == "all-MiniLM-L6-v2" and info["model_dtype"] == "float32"
        assert info["model_type"] == {"embedding": {"pooling": "mean"}}
        assert info["max_input_length"] == 256 and info["max_client_batch_size"] == 2048
        assert info["auto_truncate"] is True and info["max_batch_tokens"] > 0
        assert info["dim"] == minilm.dim and info["precision"] == "fp32"  # embfast's own keys stay
        for path in ("/health", "/ping", "/"):
            assert c.get(path).status_code == 200
        assert c.get("/health/live").json() == {"status": "live"}
        assert c.get("/health/ready").json() == {"status": "ready"}


def test_readiness_follows_the_lifespan(tiny):
    app = create_app(tiny)
    from fastapi.testclient import TestClient

    client = TestClient(app)  # no lifespan until entered: the models have not been warmed up
    assert client.get("/health/ready").status_code == 503 and client.get("/health/live").status_code == 200
    with client:
        assert client.get("/health/ready").status_code == 200
    assert client.get("/health/ready").json() == {"status": "shutting down"}


def test_huggingface_hub_inference_client(url, minilm):
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=url)
    docs = np.stack([np.asarray(client.feature_extraction(t)).reshape(-1) for t in DOCS])
    rows_close(docs, minilm.encode(DOCS))
    queries = np.asarray(client.feature_extraction(QUERIES)).reshape(len(QUERIES), -1)
    rows_close(queries, minilm.encode(QUERIES))
    retrieves(queries, docs)
    sims = client.sentence_similarity(QUERIES[2], other_sentences=DOCS)
    assert int(np.argmax(sims)) == 2
    np.testing.assert_allclose(sims, minilm.encode(DOCS) @ minilm.encode(QUERIES[2]), atol=1e-4)


# ---- Cohere --------------------------------------------------------------------------------------------
def test_cohere_clients(url, minilm):
    cohere = pytest.importorskip("cohere")
    v2 = cohere.ClientV2(api_key="unused", base_url=url)
    r = v2.embed(texts=DOCS, model="all-MiniLM-L6-v2", input_type="search_document",
                 embedding_types=["float", "int8", "ubinary"])
    rows_close(r.embeddings.float_, minilm.encode(DOCS))
    q = v2.embed(texts=QUERIES, model="m", input_type="search_query", embedding_types=["float"])
    retrieves(q.embeddings.float_, r.embeddings.float_)
    exp8 = minilm.encode(DOCS, precision="int8").astype(int)
    assert np.abs(np.asarray(r.embeddings.int8) - exp8).max() <= 1  # a level only at a bucket edge
    bits = np.asarray(r.embeddings.ubinary)
    assert bits.shape == (len(DOCS), minilm.dim // 8)
    assert (bits != minilm.encode(DOCS, precision="ubinary")).mean() < 0.05
    assert r.meta.billed_units.input_tokens == int(minilm.count_tokens(DOCS).sum())

    v1 = cohere.Client(api_key="unused", base_url=url)
    r1 = v1.embed(texts=DOCS[:2], model="m", input_type="search_document")
    rows_close(r1.embeddings, minilm.encode(DOCS[:2]))


# ---- OpenAI extras -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prompted(tiny_dir, tmp_path_factory):
    """The tiny model with query / passage prompts (as E5- and BGE-style models ship them)."""
    from embfast import Embedder

    folder = copy_model(tiny_dir, tmp_path_factory.mktemp("prompted") / "tiny-prompts")
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": None}))
    return Embedder(folder, threads=1)


def test_input_type_and_prompt_name_select_prompts(prompted, tiny, url):
    import openai

    with serve(create_app(prompted)) as (base, _), httpx.Client(base_url=base, timeout=60) as c:
        def emb(**extra):
            r = c.post("/v1/embeddings", json={"input": DOCS[:2], **extra})
            assert r.status_code == 200, r.text
            return np.array([d["embedding"] for d in r.json()["data"]])

        query = prompted.encode(DOCS[:2], prompt_name="query")
        passage = prompted.encode(DOCS[:2], prompt_name="passage")
        plain = prompted.encode(DOCS[:2])
        rows_close(emb(input_type="query"), query)
        rows_close(emb(input_type="search_query"), query)
        rows_close(emb(input_type="search_document"), passage)
        rows_close(emb(input_type="passage"), passage)
        rows_close(emb(prompt_name="passage"), passage)
        rows_close(emb(input_type="classification"), plain)  # no such prompt: the text as it is
        rows_close(emb(), plain)
        rows_close(c.post("/embed", json={"inputs": DOCS[:2], "prompt_name": "query"}).json(), query)
        r = c.post("/v1/embeddings", json={"input": "a", "input_type": "questions"})
        assert r.status_code == 422 and "input_type must be one of" in r.json()["error"]["message"]
        r = c.post("/v1/embeddings", json={"input": "a", "prompt_name": "doc"})
        assert r.status_code == 422 and "'passage', 'query'" in r.json()["error"]["message"]
        with openai.OpenAI(base_url=f"{base}/v1", api_key="unused") as client:
            got = client.embeddings.create(input=DOCS[:2], model="m", extra_body={"input_type": "query"})
        rows_close([d.embedding for d in got.data], query)
    with httpx.Client(base_url=url, timeout=60) as c:  # a model without prompts embeds the text as it is
        r = c.post("/v1/embeddings", json={"input": DOCS[:2], "input_type": "query"})
        assert r.status_code == 200
        r = c.post("/v1/embeddings", json={"input": "a", "prompt_name": "query"})
        assert r.status_code == 422 and "none" in r.json()["error"]["message"]


def test_unknown_fields_are_ignored_unless_strict(tiny, caplog):
    body = {"input": ["a", "b"], "metadata": {"user": "x"}, "proxy_server_request": {"url": "/"}, "extra": 1}
    with serve(create_app(tiny)) as (base, _), httpx.Client(base_url=base, timeout=60) as c:
        with caplog.at_level("WARNING", logger="embfast.server"):
            for _ in range(3):
                assert c.post("/v1/embeddings", json=body).status_code == 200
        assert sum("proxy_server_request" in m for m in caplog.messages) <= 1
        assert c.post("/embed", json={"inputs": "a", "parameters": {}}).status_code == 200
    with serve(create_app(tiny, strict_requests=True)) as (base, _), httpx.Client(base_url=base, timeout=60) as c:
        r = c.post("/v1/embeddings", json=body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_field"
        r = c.post("/embed", json={"inputs": "a", "colour": 1})
        assert r.status_code == 422 and "unknown field" in r.json()["error"]


def test_token_ids_get_the_one_line_fix(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        for path, field in (("/v1/embeddings", "input"), ("/embed", "inputs")):
            r = c.post(path, json={field: [[101, 2023, 102]]})
            assert r.status_code == 422
            text = r.text
            assert "check_embedding_ctx_length=False" in text, text


def test_truncation_side_in_the_python_api(minilm):
    from tokenizers import Tokenizer

    from embfast import DynamicBatcher

    tok = minilm.tokenizer
    whole = Tokenizer.from_str(tok.tokenizer.to_str())
    whole.no_truncation()
    ids = whole.encode(LONG, add_special_tokens=False).ids
    assert len(ids) > tok.max_seq_length
    n = tok.max_seq_length
    left = tok.tokenize([LONG], truncation_side="left")
    right = tok.tokenize([LONG])
    assert left.ids[0] == [101] + ids[-(n - 2):] + [102] and left.truncated[0]
    assert right.ids[0] == [101] + ids[:n - 2] + [102]
    with DynamicBatcher(minilm) as b:
        np.testing.assert_allclose(b.encode([LONG], truncation_side="left"),
                                   minilm.encode([LONG], truncation_side="left"), atol=1e-5)
    with pytest.raises(ValueError, match="truncation_side"):
        minilm.encode(["a"], truncation_side="middle")


# ---- bad requests: a clear 4xx in the route's own error shape, never a 5xx -----------------------------
TEI_BAD = [
    ("/embed", {}, "inputs is required"),
    ("/embed", {"inputs": []}, "empty list"),
    ("/embed", {"inputs": ["ok", "caf\ud800e"]}, r"inputs\[1\] has invalid Unicode"),
    ("/embed", {"inputs": "a", "normalize": "yes"}, "normalize must be true or false"),
    ("/embed", {"inputs": "a", "truncation_direction": "middle"}, "truncation_direction"),
    ("/embed", {"inputs": "a", "dimensions": 1000}, "dimensions"),
    ("/embed", {"inputs": "a", "prompt_name": "query"}, "prompt_name"),
    ("/embed", {"inputs": ["a"] * 2049}, "at most 2048"),
    ("/similarity", {"inputs": "a"}, "source_sentence"),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, "empty list"),
    ("/similarity", {"inputs": {"source_sentence": 5, "sentences": ["a"]}}, "source_sentence"),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}, "parameters": 3}, "parameters"),
    ("/tokenize", {"inputs": None}, "got null"),
    ("/decode", {"ids": []}, "ids must be"),
    ("/decode", {"ids": [1, -1]}, r"\[0, 30522\)"),
    ("/decode", {"ids": [1, 10**9]}, "vocabulary"),
    ("/decode", {"ids": [[1], ["a"]]}, r"ids\[1\]"),
    ("/embed_all", {"inputs": [LONG], "truncate": False}, "max_seq_length"),
]
COHERE_BAD = [
    ("/v2/embed", {"model": "m"}, "texts is required"),
    ("/v2/embed", {"texts": ["a"], "input_type": "questions"}, "input_type must be one of"),
    ("/v2/embed", {"texts": ["a"], "input_type": "image"}, "image"),
    ("/v2/embed", {"texts": ["a"], "embedding_types": ["float16"]}, "embedding_types"),
    ("/v2/embed", {"texts": ["a"], "truncate": "MIDDLE"}, "truncate must be"),
    ("/v2/embed", {"texts": [LONG], "truncate": "NONE"}, "max_seq_length"),
    ("/v2/embed", {"texts": ["a\udfff"]}, "invalid Unicode"),
    ("/v2/embed", {"images": ["data:image/png;base64,AAAA"]}, "images is not supported"),
    ("/v2/embed", {"texts": ["a"], "output_dimension": 0}, "output_dimension"),
]


@pytest.mark.parametrize(("path", "body", "match"), TEI_BAD + COHERE_BAD)
def test_bad_requests_get_a_clear_422(url, path, body, match):
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        err = r.json()
        if path.startswith("/v2"):
            assert set(err) == {"message"}
            message = err["message"]
        else:
            assert set(err) == {"error", "error_type"} and err["error_type"] == "validation"
            message = err["error"]
        assert re.search(match, message), message
        assert c.post("/embed", json={"inputs": "still serving"}).status_code == 200


@pytest.mark.parametrize("path", ["/embed", "/", "/embed_all", "/similarity", "/tokenize", "/decode", "/v2/embed",
                                  "/v1/embed", "/embeddings"])
def test_malformed_bodies_never_get_a_5xx(url, path):
    bodies = [b"", b"{", b"[]", b"null", b"\xff\xfe", b'"text"', b'{"inputs": {"a": 1}}', b'{"texts": 5}',
              b'{"inputs": [[1.5]]}', b'{"ids": [[1], 2]}', b"1e999", b'{"inputs": [null]}']
    with httpx.Client(base_url=url, timeout=60) as c:
        for body in bodies:
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)


def test_openapi_documents_every_route_with_fields_it_accepts(tiny):
    from fastapi.testclient import TestClient

    from embfast.server import cohere, common, rerank, schemas, sparse, tei

    accepted = {"/v1/embeddings": common._EMBEDDINGS_FIELDS, "/v1/search": common._SEARCH_FIELDS,
                "/embed": tei._EMBED_FIELDS, "/similarity": tei._SIMILARITY_FIELDS, "/tokenize": tei._TOKENIZE_FIELDS,
                "/decode": tei._DECODE_FIELDS, "/rerank": rerank._TEI_RERANK_FIELDS,
                "/predict": rerank._TEI_PREDICT_FIELDS, "/v2/embed": cohere._FIELDS,
                "/v1/rerank": rerank._COHERE_FIELDS, "/embed_sparse": sparse._FIELDS}
    for path, fields in accepted.items():
        model = schemas.ROUTES[path][0]
        assert set(model.model_fields) <= set(fields), (path, set(model.model_fields) - set(fields))
    with TestClient(create_app(tiny)) as client:
        doc = client.get("/openapi.json").json()
        assert client.get("/docs").status_code == 200
    for path in schemas.ROUTES:
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["properties"], path
    assert "SimilarityInput" in doc["components"]["schemas"]
    assert set(doc["paths"]["/v2/embed"]["post"]["requestBody"]["content"]["application/json"]["schema"]
               ["properties"]) >= {"texts", "input_type", "embedding_types", "truncate"}
