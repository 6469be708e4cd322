"""Several models in one ``embfast serve``: routing by the request's model (body field or ?model=), 404 / 424
answers in each API family's shape, /v1/models and /info listing every model, the shared FIFO run lock, and the
command line (--model repeated, --served-model-name). Real models, a real uvicorn server on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from models_fixtures import build_ce_bert, require_splade_tiny
from test_server import serve

from embfast import CrossEncoder, SparseEncoder
from embfast.dynamic import RunLock
from embfast.server import create_app

TEXTS = ["The cat sat on the mat.", "how do I reset my password", "東京は日本の首都です。"]


def cos_rows(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def ce_dir(tmp_path_factory):
    return build_ce_bert(tmp_path_factory.mktemp("mm") / "reranker")


@pytest.fixture(scope="module")
def ce(ce_dir):
    return CrossEncoder(ce_dir, threads=1)


@pytest.fixture(scope="module")
def splade():
    return SparseEncoder(require_splade_tiny(), threads=1)


@pytest.fixture(scope="module")
def four(minilm, tiny, ce, splade):
    """A server with two embedders (one with an alias), a reranker and a SPLADE model."""
    app = create_app(models=[(minilm, "minilm,text-embedding-3-small"), (tiny, ["tiny"]), (ce, "reranker"),
                             (splade, "splade")], max_wait_ms=1.0)
    with serve(app) as (url, _):
        yield url, app


def test_openai_and_cohere_route_by_the_model_field(four, minilm, tiny):
    url, _ = four
    want = {"minilm": minilm.encode(TEXTS), "tiny": tiny.encode(TEXTS)}
    for model, served in (("minilm", "minilm"), ("text-embedding-3-small", "minilm"), ("tiny", "tiny"),
                          (None, "minilm")):
        body = {"input": TEXTS} if model is None else {"input": TEXTS, "model": model}
        r = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got = [d["embedding"] for d in r.json()["data"]]
        assert r.json()["model"] == served
        assert cos_rows(got, want[served]).min() >= 0.9999
        r = httpx.post(f"{url}/v2/embed", json={"texts": TEXTS, **({"model": model} if model else {}),
                                                 "embedding_types": ["float"]}, timeout=60)
        assert r.status_code == 200, r.text
        assert cos_rows(r.json()["embeddings"]["float"], want[served]).min() >= 0.9999
    # a name nobody serves: 404 listing the served ones, in each family's shape
    r = httpx.post(f"{url}/v1/embeddings", json={"input": "x", "model": "nope"}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model"
    assert all(n in err["message"] for n in ("minilm", "tiny", "reranker", "splade"))
    r = httpx.post(f"{url}/v2/embed", json={"texts": ["x"], "model": "nope"}, timeout=30)
    assert r.status_code == 404 and "'nope' is not served" in r.json()["message"]
    # a served name of another kind: 424 naming the kind
    r = httpx.post(f"{url}/v1/embeddings", json={"input": "x", "model": "reranker"}, timeout=30)
    assert r.status_code == 424 and r.json()["error"]["code"] == "wrong_model_kind", r.text
    assert "cross-encoder" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/embeddings", json={"input": "x", "model": 7}, timeout=30)
    assert r.status_code == 422


def test_tei_routes_take_a_model_query_parameter(four, minilm, tiny, ce, splade):
    url, _ = four
    for query, model in (("", minilm), ("?model=tiny", tiny), ("?model=minilm", minilm)):
        r = httpx.post(f"{url}/embed{query}", json={"inputs": TEXTS}, timeout=60)
        assert r.status_code == 200, r.text
        assert cos_rows(r.json(), model.encode(TEXTS)).min() >= 0.9999
    r = httpx.post(f"{url}/embed?model=nope", json={"inputs": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error_type"] == "not_found" and "tiny" in r.json()["error"]
    r = httpx.post(f"{url}/embed?model=splade", json={"inputs": "x"}, timeout=30)
    assert r.status_code == 424 and r.json()["error_type"] == "backend"
    r = httpx.post(f"{url}/similarity?model=tiny", json={"inputs": {"source_sentence": TEXTS[0],
                                                                     "sentences": TEXTS[1:]}}, timeout=30)
    v = tiny.encode(TEXTS)
    np.testing.assert_allclose(r.json(), v[1:] @ v[0], atol=1e-4)
    # the reranking and sparse routes find their model of the right kind without being told
    r = httpx.post(f"{url}/rerank", json={"query": "cats", "texts": TEXTS, "raw_scores": True}, timeout=30)
    scores = {h["index"]: h["score"] for h in r.json()}
    want = ce.predict([("cats", t) for t in TEXTS], activation_fn="identity")
    np.testing.assert_allclose([scores[i] for i in range(len(TEXTS))], want, atol=1e-4)
    r = httpx.post(f"{url}/v1/rerank", json={"model": "reranker", "query": "cats", "documents": TEXTS}, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "reranker"
    r = httpx.post(f"{url}/v1/rerank", json={"model": "tiny", "query": "cats", "documents": TEXTS}, timeout=30)
    assert r.status_code == 424 and "wrong_model_kind" in r.text
    r = httpx.post(f"{url}/embed_sparse", json={"inputs": TEXTS[0]}, timeout=30)
    got = {d["index"]: d["value"] for d in r.json()[0]}
    ref = splade.encode([TEXTS[0]])
    assert sorted(got) == sorted(ref.indices.tolist())
    # kind-neutral routes use the named model's tokenizer
    r = httpx.post(f"{url}/tokenize?model=splade", json={"inputs": "cats"}, timeout=30)
    assert [t["id"] for t in r.json()[0]] == splade.tokenizer.tokenizer.encode("cats").ids
    r = httpx.post(f"{url}/decode", json={"ids": [101, 102], "model": "nope"}, timeout=30)
    assert r.status_code == 404


def test_models_and_info_list_every_model(four, minilm, tiny):
    url, app = four
    data = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    by_id = {d["id"]: d for d in data}
    assert set(by_id) == {"minilm", "text-embedding-3-small", "tiny", "reranker", "splade"}
    assert by_id["text-embedding-3-small"]["root"] == "minilm"
    assert [by_id[n]["kind"] for n in ("minilm", "tiny", "reranker", "splade")] == [
        "embedder", "embedder", "cross-encoder", "sparse-encoder"]
    assert by_id["minilm"]["dim"] == 384 and by_id["tiny"]["dim"] == tiny.dim
    assert by_id["minilm"]["max_seq_length"] == minilm.config.max_seq_length
    for d in data:
        assert d["precision"] == "fp32" and d["memory"]["weights_bytes"] > 10_000
    # MiniLM's weights are ~90 MB of fp32
    assert 80e6 < by_id["minilm"]["memory"]["weights_bytes"] < 100e6
    info = httpx.get(f"{url}/info", timeout=30).json()
    assert [m["id"] for m in info["models"]] == ["minilm", "tiny", "reranker", "splade"]
    assert info["model_id"] == "minilm" and info["model_type"] == {"embedding": {"pooling": "mean"}}
    info = httpx.get(f"{url}/info?model=reranker", timeout=30).json()
    assert info["model_id"] == "reranker" and "reranker" in info["model_type"]
    # one run lock for all the models' batchers
    locks = {id(e.batcher.run_lock) for e in app.state.registry}
    assert len(locks) == 1 and isinstance(app.state.registry.entries[0].batcher.run_lock, RunLock)


def test_many_clients_on_several_models_get_their_own_answers(four, minilm, tiny, ce):
    url, _ = four
    texts = [f"sentence number {i} about {w}" for i, w in enumerate(["cats", "tax", "rain", "jazz"] * 6)]
    want = {"minilm": minilm.encode(texts), "tiny": tiny.encode(texts)}

    def client(k):
        model = ("minilm", "tiny")[k % 2]
        with httpx.Client(timeout=60) as c:
            if k % 3 == 2:
                r = c.post(f"{url}/rerank", json={"query": texts[k], "texts": texts[:5], "raw_scores": True})
                got = sorted((h["index"], h["score"]) for h in r.json())
                ref = ce.predict([(texts[k], t) for t in texts[:5]], activation_fn="identity")
                return float(np.abs(np.array([s for _, s in got]) - ref).max()) <= 1e-4
            r = c.post(f"{url}/v1/embeddings", json={"input": texts[k:k + 3], "model": model})
            got = [d["embedding"] for d in r.json()["data"]]
            return cos_rows(got, want[model][k:k + 3]).min() >= 0.9999

    with ThreadPoolExecutor(12) as pool:
        assert all(pool.map(client, range(24)))


def test_one_model_answers_any_name_and_duplicate_names_are_refused(tiny, minilm):
    with serve(create_app(tiny)) as (url, _):
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "x", "model": "text-embedding-ada-002"}, timeout=30)
        assert r.status_code == 200  # clients send their own default names; one model answers them all
    with pytest.raises(ValueError, match="two served models are named 'a'"):
        create_app(models=[(tiny, "a"), (minilm, "a")])
    with pytest.raises(TypeError, match="Embedder, CrossEncoder or SparseEncoder"):
        create_app(models=["not a model"])


def test_run_lock_is_first_come_first_served():
    lock = RunLock()
    order: list[int] = []
    threads = []
    with lock:  # hold it while three threads line up, one after the other
        for k in range(3):
            t = threading.Thread(target=lambda k=k: (lock.__enter__(), order.append(k), lock.__exit__()))
            t.start()
            threads.append(t)
            for _ in range(500):
                if lock._next == k + 2:  # the thread took its ticket
                    break
                threading.Event().wait(0.01)
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2] and lock.waits == 3


def test_run_lock_with_two_slots_runs_two_at_once_and_queues_the_rest_in_order():
    lock = RunLock(slots=2)
    order: list[int] = []
    inside = threading.Barrier(3, timeout=30)  # two holders and this thread meet while both hold a slot
    release = threading.Event()

    def hold():
        with lock:
            inside.wait()
            assert release.wait(30)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    inside.wait()  # both slots taken at once: no ticket was needed
    assert lock.waits == 0
    waiters = []
    for k in range(3):
        t = threading.Thread(target=lambda k=k: (lock.__enter__(), order.append(k), lock.__exit__()))
        t.start()
        waiters.append(t)
        for _ in range(500):
            if lock._next == k + 1:  # the thread took its ticket and waits
                break
            threading.Event().wait(0.01)
    assert order == [] and lock.waits == 3
    release.set()
    for t in holders + waiters:
        t.join(10)
    # 0 and 1 take the two freed slots (in ticket order, but they may append in either order); 2 waits for one
    assert sorted(order[:2]) == [0, 1] and order[2] == 2
    with pytest.raises(ValueError, match="slots must be an int >= 1"):
        RunLock(slots=0)


def test_cli_serves_several_models(tiny_dir, tiny, ce_dir, ce):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "EMBFAST_THREADS": "1", "EMBFAST_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "embfast.cli", "serve", "--port", str(port),
                             "--model", str(tiny_dir), "--model", str(ce_dir),
                             "--served-model-name", "tiny,my-embedder", "--served-model-name", "rr", "--workers", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(900):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            assert proc.poll() is None, proc.stdout.read()
            threading.Event().wait(0.1)
        data = {d["id"]: d for d in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}
        assert set(data) == {"tiny", "my-embedder", "rr"} and data["rr"]["kind"] == "cross-encoder"
        assert data["tiny"]["threads"] == 1 and data["tiny"]["memory"]["rss_load_bytes"] > 0
        assert data["tiny"]["workers"] == data["rr"]["workers"] == 2
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "cli", "model": "my-embedder"}, timeout=30)
        assert r.json()["model"] == "tiny"
        assert cos_rows(r.json()["data"][0]["embedding"], tiny.encode("cli")) >= 0.9999
        r = httpx.post(f"{url}/v1/rerank", json={"model": "rr", "query": "q", "documents": ["a", "b"]}, timeout=30)
        scores = sorted((h["index"], h["relevance_score"]) for h in r.json()["results"])
        np.testing.assert_allclose([s for _, s in scores], ce.predict([("q", "a"), ("q", "b")]), atol=1e-4)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out, out
