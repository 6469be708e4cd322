"""Sparse encoders in the rest of embfast: the DynamicBatcher (encode_sparse), TEI's /embed_sparse over real
HTTP (424 for a server without a sparse model, 422 for bad input), Index with sparse rows (save / load /
checksums, sparse and hybrid search), the fusions, BM25 (bm25s) and `eval retrieval --sparse / --hybrid` on a
small BEIR folder made here. Nothing asserts on timing."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import scipy.sparse as sp
from models_fixtures import require_splade_tiny
from test_server import serve

from embfast import DynamicBatcher, Index, SparseEncoder
from embfast.hybrid import fuse_scores, normalize_scores, rrf_scores
from embfast.index import IndexCorruptError, ModelMismatchError
from embfast.server import create_app

DOCS = ["Paris is the capital and largest city of France.", "The mitochondria is the powerhouse of the cell.",
        "BRCA1 mutations raise the risk of breast and ovarian cancer.", "Stock markets fell sharply on Monday.",
        "A cat sat on the mat and purred.", "Photosynthesis turns light into chemical energy in plants.",
        "東京は日本の首都です。", ""]
QUERIES = ["capital of france", "brca1 cancer risk", "how do plants make energy", "cat on a mat"]


@pytest.fixture(scope="module")
def splade():
    return SparseEncoder(require_splade_tiny(), threads=1)


def same(a, b) -> bool:
    """Equal sparse rows up to float noise."""
    return a.shape == b.shape and (a.nnz + b.nnz == 0 or float(abs(a - b).max()) <= 1e-5)


# ---- batcher -------------------------------------------------------------------------------------------------
def test_batcher_encodes_sparse_for_many_callers(splade, tiny):
    ref = splade.encode(DOCS + QUERIES)
    texts = DOCS + QUERIES
    with DynamicBatcher(splade, max_wait_ms=1) as b:
        assert b.kind == "sparse-encoder"

        def client(k):
            rows = [(k + j) % len(texts) for j in range(3)]
            return same(b.encode_sparse([texts[r] for r in rows]), ref[rows])

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(client, range(24)))

        async def many():
            return await asyncio.gather(*(b.encode_sparse_async([t]) for t in texts))

        for i, got in enumerate(asyncio.run(many())):
            assert same(got, ref[[i]])
        assert b.encode_sparse([]).shape == (0, splade.vocab_size)
        k3, info = b.encode_sparse(texts, max_active_dims=3, return_info=True)
        assert same(k3, splade.encode(texts, max_active_dims=3)) and len(info.token_counts) == len(texts)
        with pytest.raises(TypeError, match="encode_sparse"):
            b.encode(["a"])
        with pytest.raises(TypeError):
            b.encode_sparse([3])
    with DynamicBatcher(tiny) as b, pytest.raises(TypeError, match="SparseEncoder"):
        b.encode_sparse(["a"])


# ---- server ----------------------------------------------------------------------------------------------------
def test_embed_sparse_over_http(splade, tiny):
    ref = splade.encode(QUERIES)
    app = create_app(tiny, sparse=splade, model_name="tiny", strict_requests=True)
    with serve(app) as (url, _), httpx.Client(base_url=url) as c:
        r = c.post("/embed_sparse", json={"inputs": QUERIES})
        assert r.status_code == 200, r.text
        rows = r.json()
        assert len(rows) == len(QUERIES)
        for i, row in enumerate(rows):
            idx = [e["index"] for e in row]
            assert idx == sorted(idx) and idx == ref[[i]].indices.tolist()
            np.testing.assert_allclose([e["value"] for e in row], ref[[i]].data, atol=1e-5)
        one = c.post("/embed_sparse", json={"inputs": QUERIES[0], "truncate": True, "prompt_name": None}).json()
        assert one == rows[:1]
        assert c.post("/v1/embeddings", json={"input": "still serves dense"}).status_code == 200
        for body, field in [({}, "inputs"), ({"inputs": []}, "inputs"), ({"inputs": 3}, "inputs"),
                            ({"inputs": [""]}, "inputs[0]"), ({"inputs": ["a"], "truncate": "yes"}, "truncate"),
                            ({"inputs": ["a"], "prompt_name": "nope"}, "prompt_name"),
                            ({"inputs": ["a"], "truncation_direction": "left"}, "truncation_direction"),
                            ({"inputs": ["a"], "extra": 1}, "extra"), ({"inputs": ["x\ud800"]}, "inputs[0]")]:
            r = c.post("/embed_sparse", content=json.dumps(body))
            err = r.json()  # TEI's error shape: {"error", "error_type"}
            assert r.status_code == 422 and err["error_type"] == "validation", (body, r.text)
            assert field.split("[")[0] in err["error"], (body, r.text)
        r = c.post("/embed_sparse", json={"inputs": ["word " * 600], "truncate": False})
        assert r.status_code == 422 and "max_seq_length" in r.json()["error"]
    with serve(create_app(tiny)) as (url, _), httpx.Client(base_url=url) as c:
        r = c.post("/embed_sparse", json={"inputs": "a"})
        assert r.status_code == 424 and r.json()["error_type"] == "backend" and "no sparse" in r.json()["error"]
    with serve(create_app(splade)) as (url, _), httpx.Client(base_url=url) as c:  # a sparse-only server
        assert c.post("/embed_sparse", json={"inputs": "a"}).status_code == 200
        assert c.post("/v1/embeddings", json={"input": "a"}).status_code == 424


# ---- index -----------------------------------------------------------------------------------------------------
def test_index_sparse_and_hybrid_search(splade, tiny, tmp_path):
    index = Index(tiny, sparse_encoder=splade)
    index.add(DOCS[:5], metadata=[{"i": i} for i in range(5)])
    index.add(DOCS[5:])
    hits = index.search(QUERIES, top_k=3, mode="sparse")
    assert [h[0]["id"] for h in hits] == [0, 2, 5, 4]  # a trained SPLADE model finds the exact terms
    from embfast import sparse_search

    ref = sparse_search(splade.encode_query(QUERIES), splade.encode_document(DOCS), top_k=3)
    assert [[h["id"] for h in row] for row in hits] == [[h["corpus_id"] for h in row] for row in ref]
    np.testing.assert_allclose([h["score"] for h in hits[0]], [h["score"] for h in ref[0]], atol=1e-5)
    hyb = index.search(QUERIES, top_k=len(DOCS), mode="hybrid")
    dense = index.search(QUERIES, top_k=len(DOCS))
    for q in range(len(QUERIES)):
        d = np.array([next(h["score"] for h in dense[q] if h["id"] == i) for i in range(len(DOCS))])
        by_id = {h["id"]: h for h in hyb[q]}
        np.testing.assert_allclose([by_id[i]["dense_score"] for i in range(len(DOCS))], d, atol=1e-5)
        fused = fuse_scores(d[None], np.array([by_id[i]["sparse_score"] for i in range(len(DOCS))])[None])[0]
        np.testing.assert_allclose([by_id[i]["score"] for i in range(len(DOCS))], fused, atol=1e-4)
        assert [h["score"] for h in hyb[q]] == sorted((h["score"] for h in hyb[q]), reverse=True)
    rrf = index.search(QUERIES[:1], top_k=2, mode="hybrid", fusion="rrf")
    assert len(rrf[0]) == 2 and rrf[0][0]["score"] <= 2 / 61
    path = index.save(tmp_path / "h.embf")
    back = Index.load(path, tiny, sparse_encoder=splade)
    assert back.search(QUERIES, top_k=3, mode="hybrid") == index.search(QUERIES, top_k=3, mode="hybrid")
    back.add(["Paris hosts the Louvre museum."])
    assert back.search("louvre paris", top_k=1, mode="sparse")[0][0]["id"] == len(DOCS)
    with pytest.raises(ValueError, match="sparse rows"):
        Index(tiny).search("a", mode="hybrid")
    with pytest.raises(ValueError, match="mode"):
        index.search("a", mode="lexical")
    with pytest.raises(TypeError, match="text queries"):
        index.search(np.zeros((1, tiny.dim)), mode="sparse")
    with pytest.raises(ValueError, match="texts"):
        index.add(np.ones((1, tiny.dim)))  # vectors without texts or sparse rows
    raw = bytearray(path.read_bytes())  # damage the sparse data: its checksum catches it
    loaded = Index.load(path, verify=False)
    off = json.loads(_manifest_bytes(path))["sections"]["sparse.data"]["offset"]
    raw[off] ^= 0xFF
    bad = tmp_path / "bad.embf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(IndexCorruptError, match="sparse.data"):
        Index.load(bad)
    assert loaded._sparse is not None and len(loaded._sparse) == len(DOCS)


def test_sparse_only_index(splade, tmp_path):
    index = Index(sparse_encoder=splade)
    index.add(DOCS, ids=[f"d{i}" for i in range(len(DOCS))])
    hits = index.search(QUERIES, top_k=2)  # a sparse-only index searches its sparse rows
    from embfast import sparse_search

    ref = sparse_search(splade.encode_query(QUERIES), splade.encode_document(DOCS), top_k=2)
    assert [[h["id"] for h in row] for row in hits] == [[f"d{h['corpus_id']}" for h in row] for row in ref]
    back = Index.load(index.save(tmp_path / "s.embf"), sparse_encoder=splade)
    assert back.search(QUERIES, top_k=2) == hits and back.dim == 0


def _manifest_bytes(path) -> bytes:
    import struct

    data = path.read_bytes()
    head_len = struct.unpack("<Q", data[-48:-40])[0]
    return data[-48 - head_len:-48]


def test_index_refuses_another_sparse_model(splade, tiny, tmp_path, sparse_bert):
    index = Index(tiny, sparse_encoder=splade)
    index.add(DOCS[:2])
    path = index.save(tmp_path / "a.embf")
    with pytest.raises(ModelMismatchError, match="sparse"):
        Index.load(path, tiny, sparse_encoder=sparse_bert)


@pytest.fixture(scope="module")
def sparse_bert(tmp_path_factory):
    from models_fixtures import build_mlm_bert

    return SparseEncoder(build_mlm_bert(tmp_path_factory.mktemp("mlm") / "bert"), threads=1)


# ---- fusions -----------------------------------------------------------------------------------------------------
def test_fusions():
    d = np.array([[0.9, 0.1, 0.5, 0.5]])
    s = np.array([[0.0, 3.0, 1.0, 0.0]])
    z = normalize_scores(d)
    np.testing.assert_allclose(z.mean(), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(), 1, atol=1e-12)
    assert (normalize_scores(np.ones((1, 3))) == 0).all() and (normalize_scores(np.ones((1, 3)), "minmax") == 0).all()
    np.testing.assert_allclose(normalize_scores(s, "minmax"), [[0, 1, 1 / 3, 0]])
    r = rrf_scores([d, s])
    # d ranks 0,2,3,1 (ties to the lower row); s ranks 1,2,0,3
    np.testing.assert_allclose(r, [[1 / 61 + 1 / 63, 1 / 64 + 1 / 61, 1 / 62 + 1 / 62, 1 / 63 + 1 / 64]])
    np.testing.assert_allclose(fuse_scores(d, s, sparse_weight=0), normalize_scores(d))
    np.testing.assert_allclose(fuse_scores(d, s, sparse_weight=1), normalize_scores(s))
    for kw in ({"fusion": "max"}, {"sparse_weight": 1.5}, {"normalization": "l2"}):
        with pytest.raises(ValueError):
            fuse_scores(d, s, **kw)
    with pytest.raises(ValueError, match="shape"):
        fuse_scores(d, s[:, :3])


# ---- BM25 and evaluation -------------------------------------------------------------------------------------------
def test_bm25_encoder_matches_bm25s():
    bm25s = pytest.importorskip("bm25s")
    from embfast.bm25 import BM25Encoder

    enc = BM25Encoder()
    docs = enc.encode_document(DOCS)
    assert isinstance(docs, sp.csr_array) and docs.shape == (len(DOCS), enc.vocab_size)
    q = enc.encode_query(QUERIES + ["zzzz unknown words"])
    assert q[[len(QUERIES)]].nnz == 0
    scores = (q @ docs.T).toarray()
    tokenizer = bm25s.tokenization.Tokenizer(stopwords="en")
    retriever = bm25s.BM25()
    retriever.index(tokenizer.tokenize(DOCS, return_as="tuple", show_progress=False), show_progress=False)
    for i, query in enumerate(QUERIES):
        ref = retriever.get_scores(tokenizer.tokenize([query], update_vocab=False, return_as="string",
                                                      show_progress=False)[0])
        np.testing.assert_allclose(scores[i], ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="encode_document"):
        BM25Encoder().encode_query(["a"])


def _beir(folder):
    folder.mkdir()
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as fh:
        for i, d in enumerate(DOCS):
            fh.write(json.dumps({"_id": f"d{i}", "title": "", "text": d}) + "\n")
    with open(folder / "queries_test.jsonl", "w", encoding="utf-8") as fh:
        for i, q in enumerate(QUERIES):
            fh.write(json.dumps({"_id": f"q{i}", "text": q}) + "\n")
    gold = {0: 0, 1: 2, 2: 5, 3: 4}
    (folder / "qrels_test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                           "".join(f"q{q}\td{d}\t1\n" for q, d in gold.items()))
    return folder


def test_eval_retrieval_sparse_and_hybrid(splade, tiny, tmp_path):
    from embfast.evaluation import evaluate_retrieval

    folder = _beir(tmp_path / "mini")
    res = evaluate_retrieval(None, folder, sparse=splade)
    assert res["ndcg_at_10"] == pytest.approx(1.0) and "dense" not in res
    res = evaluate_retrieval(tiny, folder, sparse=splade, hybrid="weighted")
    assert set(res) >= {"dense", "sparse", "hybrid"} and res["hybrid"]["sparse_weight"] == 0.3
    res = evaluate_retrieval(tiny, folder, sparse=splade, hybrid="rrf", sparse_weight=0.5)
    assert res["hybrid"]["fusion"] == "rrf"
    with pytest.raises(ValueError, match="hybrid"):
        evaluate_retrieval(None, folder, sparse=splade, hybrid="rrf")


def test_eval_cli_sparse(tmp_path, capsys):
    from embfast.cli import main

    model = require_splade_tiny()
    folder = _beir(tmp_path / "mini")
    assert main(["eval", "retrieval", str(folder), "--sparse", str(model)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ndcg_at_10"] == pytest.approx(1.0) and out["sparse_model"]
    assert main(["eval", "sts", str(folder), "--sparse", str(model)]) == 2


def test_serve_loads_a_sparse_model_by_kind(splade):
    from embfast.server_rerank import load_served_model

    assert isinstance(load_served_model(str(splade.model_dir), threads=1), SparseEncoder)
