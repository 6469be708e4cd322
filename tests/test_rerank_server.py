"""Reranking through the DynamicBatcher and over real HTTP on 127.0.0.1: TEI's /rerank and /predict, Cohere's
and Jina's /v1/rerank (with the cohere client), 424 for a route whose model is not served, 422 for bad input,
never a 5xx. Nothing asserts on timing."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from models_fixtures import build_ce_bert
from test_server import serve

from embfast import CrossEncoder, DynamicBatcher, InputTooLongError
from embfast.server import create_app
from embfast.server_rerank import load_served_model

QUERY = "What do cats sit on?"
DOCS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "東京は日本の首都です。", "🙂 emoji",
        "word " * 200, "A feline rested on the rug.", "x"]
PAIRS = [(q, d) for q in (QUERY, "password reset", "x") for d in DOCS]


@pytest.fixture(scope="module")
def ce1(tmp_path_factory):
    return CrossEncoder(build_ce_bert(tmp_path_factory.mktemp("ce") / "bert-1"), threads=1)


@pytest.fixture(scope="module")
def ce3(tmp_path_factory):
    return CrossEncoder(build_ce_bert(tmp_path_factory.mktemp("ce") / "bert-3", num_labels=3, seed=1), threads=1)


# ---- the batcher -----------------------------------------------------------------------------------------
def test_batcher_predicts_for_many_callers(ce1):
    ref = ce1.predict(PAIRS)
    rng = np.random.default_rng(0)
    jobs = [rng.choice(len(PAIRS), size=int(rng.integers(1, 6)), replace=False) for _ in range(64)]
    with DynamicBatcher(ce1, max_wait_ms=1) as b:
        def client(k):
            return max(float(np.abs(b.predict([PAIRS[r] for r in rows]) - ref[rows]).max()) for rows in jobs[k::16])

        with ThreadPoolExecutor(16) as pool:
            assert max(pool.map(client, range(16))) <= 1e-5

        async def many():
            return await asyncio.gather(*(b.predict_async([PAIRS[r] for r in rows]) for rows in jobs[:20]))

        for rows, got in zip(jobs[:20], asyncio.run(many()), strict=True):
            np.testing.assert_allclose(got, ref[rows], atol=1e-5)
        assert b.predict(PAIRS[0]) == pytest.approx(float(ref[0]), abs=1e-5)  # one pair: a float
        assert b.predict([]).shape == (0,)
        scores, info = b.predict(PAIRS, return_info=True, activation_fn="identity")
        np.testing.assert_allclose(scores, ce1.predict(PAIRS, activation_fn="identity"), atol=1e-4)
        assert info.truncated.sum() == 3 and b.stats()["failed"] == 0
        with pytest.raises(InputTooLongError):  # fails its own caller only
            b.predict(PAIRS, truncate=False)
        np.testing.assert_allclose(b.predict(PAIRS[:3]), ref[:3], atol=1e-5)
        with pytest.raises(TypeError, match="predict / predict_async"):
            b.encode("a text")
        with pytest.raises(ValueError, match="exactly 2 texts"):
            b.predict(["a", "b", "c"])
        with pytest.raises(ValueError, match="activation_fn"):
            b.predict(PAIRS[:1], activation_fn="nope")


def test_an_embedder_batcher_refuses_predict(tiny):
    with DynamicBatcher(tiny) as b, pytest.raises(TypeError, match="encode / encode_async"):
        b.predict([("a", "b")])


def test_3_label_batcher_gives_rows(ce3):
    with DynamicBatcher(ce3) as b:
        np.testing.assert_allclose(b.predict(PAIRS, apply_softmax=True), ce3.predict(PAIRS, apply_softmax=True),
                                   atol=1e-5)
        assert b.predict(PAIRS[0]).shape == (3,)


# ---- HTTP ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rerank_server(ce1):
    with serve(create_app(ce1, model_name="ce", strict_requests=True)) as (url, _):
        yield url


def message(r) -> str:
    """The refusal's text: TEI's routes answer {"error": str, "error_type"}, the others OpenAI's shape."""
    err = r.json()["error"]
    return err if isinstance(err, str) else err["message"]


def test_tei_rerank_and_predict(rerank_server, ce1):
    with httpx.Client(base_url=rerank_server, timeout=60) as c:
        r = c.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True})
        assert r.status_code == 200, r.text
        expected = ce1.rank(QUERY, DOCS, return_documents=True)
        got = r.json()
        assert [h["index"] for h in got] == [h["corpus_id"] for h in expected]
        np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in expected], atol=1e-5)
        assert [h["text"] for h in got] == [h["text"] for h in expected]
        assert r.headers["x-embfast-truncated-inputs"] == "1"
        raw = c.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
        logits = ce1.predict([(QUERY, d) for d in DOCS], activation_fn="identity")
        np.testing.assert_allclose([h["score"] for h in raw], logits[[h["index"] for h in raw]], atol=1e-4)
        assert "text" not in raw[0]

        one = c.post("/predict", json={"inputs": list(PAIRS[0])}).json()  # a pair: one list of labels
        assert one == [{"label": "LABEL_0", "score": pytest.approx(ce1.predict(PAIRS[0]), abs=1e-5)}]
        single = c.post("/predict", json={"inputs": "a text alone"}).json()
        assert single[0]["score"] == pytest.approx(ce1.predict("a text alone"), abs=1e-5)
        batch = c.post("/predict", json={"inputs": [list(PAIRS[1]), ["a text alone"]]}).json()
        assert [row[0]["score"] for row in batch] == pytest.approx(
            [ce1.predict(PAIRS[1]), ce1.predict("a text alone")], abs=1e-5)


def test_cohere_and_jina_rerank(rerank_server, ce1):
    cohere = pytest.importorskip("cohere")
    expected = ce1.rank(QUERY, DOCS)
    with httpx.Client(timeout=60) as http:  # the clients' own httpx clients are never closed
        client = cohere.Client(base_url=rerank_server, api_key="unused", httpx_client=http)
        r = client.rerank(model="ce", query=QUERY, documents=DOCS, top_n=3, return_documents=True)
        v2 = cohere.ClientV2(base_url=rerank_server, api_key="unused", httpx_client=http).rerank(
            model="ce", query=QUERY, documents=DOCS)
    assert [x.index for x in r.results] == [h["corpus_id"] for h in expected[:3]]
    assert [x.relevance_score for x in r.results] == pytest.approx([h["score"] for h in expected[:3]], abs=1e-5)
    assert [x.document.text for x in r.results] == [DOCS[h["corpus_id"]] for h in expected[:3]]
    assert [x.index for x in v2.results] == [h["corpus_id"] for h in expected]
    with httpx.Client(base_url=rerank_server, timeout=60) as c:  # Jina's body: documents as objects
        body = c.post("/v1/rerank", json={"model": "ce", "query": QUERY, "documents": [{"text": d} for d in DOCS],
                                          "top_n": 2, "return_documents": True}).json()
        assert [x["index"] for x in body["results"]] == [h["corpus_id"] for h in expected[:2]]
        assert body["results"][0]["document"] == {"text": DOCS[expected[0]["corpus_id"]]}
        assert body["model"] == "ce" and body["usage"]["total_tokens"] > 0


def test_3_label_model_predicts_but_does_not_rank(ce3):
    with serve(create_app(ce3)) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        rows = c.post("/predict", json={"inputs": [list(p) for p in PAIRS[:4]]}).json()
        probs = ce3.predict(PAIRS[:4], apply_softmax=True)
        for row, p in zip(rows, probs, strict=True):
            assert [d["score"] for d in row] == sorted((d["score"] for d in row), reverse=True)
            assert {d["label"]: d["score"] for d in row} == pytest.approx(
                {f"LABEL_{i}": float(p[i]) for i in range(3)}, abs=1e-5)
        for path, body in (("/rerank", {"query": "q", "texts": ["a"]}),
                           ("/v1/rerank", {"query": "q", "documents": ["a"]})):
            r = c.post(path, json=body)
            assert r.status_code == 424 and "labels" in message(r)


def test_routes_of_a_model_not_served_answer_424(rerank_server, tiny):
    with httpx.Client(base_url=rerank_server, timeout=60) as c:
        for path, body in (("/v1/embeddings", {"input": "a"}), ("/v1/search", {"query": "a"})):
            r = c.post(path, json=body)
            assert r.status_code == 424 and r.json()["error"]["code"] == "model_not_embedder"
    with serve(create_app(tiny)) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        for path, body in (("/rerank", {"query": "q", "texts": ["a"]}), ("/predict", {"inputs": "a"}),
                           ("/v1/rerank", {"query": "q", "documents": ["a"]})):
            r = c.post(path, json=body)
            assert r.status_code == 424 and "no reranker" in message(r), (path, r.text)
            if path != "/v1/rerank":  # TEI's routes answer in TEI's error shape
                assert r.json()["error_type"] == "backend"


def test_embedder_and_reranker_together(tiny, ce1):
    with serve(create_app(tiny, reranker=ce1)) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        assert c.post("/v1/embeddings", json={"input": ["a", "b"]}).status_code == 200
        assert c.post("/rerank", json={"query": QUERY, "texts": DOCS}).status_code == 200
        info = c.get("/info").json()
        assert info["dim"] == tiny.dim and info["reranker"]["num_labels"] == 1
        assert "embfast_batch_texts_count" in c.get("/metrics").text
    with pytest.raises(TypeError, match="reranker"):
        create_app(tiny, reranker=tiny)
    with pytest.raises(ValueError, match="search corpus"):
        create_app(ce1, corpus=np.zeros((2, 4), np.float32))


BAD_REQUESTS = [
    ("/rerank", {"texts": ["a"]}, "query is required"),
    ("/rerank", {"query": "", "texts": ["a"]}, "non-empty"),
    ("/rerank", {"query": "q", "texts": []}, "empty list"),
    ("/rerank", {"query": "q", "texts": "a"}, "list of strings"),
    ("/rerank", {"query": "q", "texts": ["a", 3]}, r"texts\[1\] must be a string"),
    ("/rerank", {"query": "q", "texts": ["a", ""]}, r"texts\[1\] must be a non-empty"),
    ("/rerank", {"query": "q", "texts": ["ok", "caf\ud800e"]}, r"texts\[1\] has invalid Unicode"),
    ("/rerank", {"query": "q\udfff", "texts": ["a"]}, "query has invalid Unicode"),
    ("/rerank", {"query": "q", "texts": ["a"] * 2049}, "at most 2048"),
    ("/rerank", {"query": "q", "texts": ["a"], "colour": 1}, "unknown field"),
    ("/rerank", {"query": "q", "texts": ["word " * 300], "truncate": False}, "max_seq_length"),
    ("/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "left"}, "truncation_direction"),
    ("/rerank", {"query": "q", "texts": ["a"], "raw_scores": "yes"}, "raw_scores must be true or false"),
    ("/predict", {}, "inputs is required"),
    ("/predict", {"inputs": ["a", "b", "c"]}, "pair of 2 strings"),
    ("/predict", {"inputs": [["a", "b", "c"]]}, r"inputs\[0\] must be"),
    ("/predict", {"inputs": [["a"], 5]}, r"inputs\[1\] must be"),
    ("/predict", {"inputs": []}, "empty list"),
    ("/predict", {"inputs": [["a", "\ud800"]]}, "invalid Unicode"),
    ("/v1/rerank", {"query": "q"}, "documents is required"),
    ("/v1/rerank", {"query": "q", "documents": [{"title": "a"}]}, "text"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "rank_fields": ["title"]}, "rank_fields"),
    ("/v1/rerank", {"query": 5, "documents": ["a"]}, "query must be a string"),
]


@pytest.mark.parametrize(("path", "body", "match"), BAD_REQUESTS)
def test_bad_requests_get_422(rerank_server, path, body, match):
    with httpx.Client(base_url=rerank_server, timeout=60) as c:
        r = c.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert pytest.importorskip("re").search(match, message(r)), r.json()


def test_malformed_bodies_never_get_a_5xx(rerank_server):
    with httpx.Client(base_url=rerank_server, timeout=60) as c:
        for path in ("/rerank", "/predict", "/v1/rerank"):
            for raw in (b"", b"{", b"[1, 2]", b'"a"', b"\xff\xfe", b"null", b'{"query": null, "texts": null}'):
                r = c.post(path, content=raw, headers={"content-type": "application/json"})
                assert 400 <= r.status_code < 500, (path, raw, r.status_code, r.text)


def test_serve_loads_a_cross_encoder_by_its_kind(ce1, tiny):
    assert isinstance(load_served_model(ce1.model_dir, threads=1), CrossEncoder)
    assert not isinstance(load_served_model(tiny.model_dir, threads=1), CrossEncoder)
