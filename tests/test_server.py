"""The embedding server over real HTTP on 127.0.0.1: correctness under concurrency, bad requests, auth,
payload limit, 429 under overload, graceful shutdown, the openai client, search, info, metrics, the CLI.

Each server runs uvicorn in a thread on a free loopback port. Where a test needs
requests to stay in flight, a batch listener parks the batcher's worker until
the test releases it; nothing asserts on timing.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from embfast.server import create_app

SENTENCES = ["The cat sat on the mat.", "A feline rested on the rug.", "Stock markets fell sharply today.",
             "Привет, как дела?", "東京は日本の首都です。", "def f(x): return x * 2", "🙂🙃 emoji only",
             "The quick brown fox jumps over the lazy dog. " * 4, "word " * 300, "x"]


@contextlib.contextmanager
def serve(app):
    """Run ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yields (base_url, uvicorn.Server)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(3000):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


class Gate:
    """A batch listener that parks the worker after each batch until released."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, stats) -> None:
        self.entered.set()
        assert self.release.wait(30), "test gate never released"


def wait_for(predicate, what: str) -> None:
    for _ in range(3000):
        if predicate():
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def refuses(port: int) -> bool:
    """True when nothing accepts connections on 127.0.0.1:port any more."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """A default server on the tiny model, with a search corpus of SENTENCES."""
    folder = tmp_path_factory.mktemp("corpus")
    np.save(folder / "corpus.npy", tiny.encode(SENTENCES))
    (folder / "corpus.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    app = create_app(tiny, corpus=folder / "corpus.npy", corpus_texts=folder / "corpus.txt", model_name="tiny")
    with serve(app) as (url, _):
        yield url, app


def test_32_concurrent_clients_get_their_own_vectors(server, tiny):
    url, _ = server
    expected = dict(zip(SENTENCES, tiny.encode(SENTENCES), strict=True))
    counts = dict(zip(SENTENCES, tiny.count_tokens(SENTENCES).tolist(), strict=True))
    rng = np.random.default_rng(0)
    jobs = [[SENTENCES[j] for j in rng.integers(0, len(SENTENCES), size=i % 4 + 1)] for i in range(96)]

    def client(k):
        worst = 1.0
        with httpx.Client(base_url=url, timeout=60) as c:
            for texts in jobs[k::32]:
                single = len(texts) == 1 and k % 2 == 0
                r = c.post("/v1/embeddings", json={"input": texts[0] if single else texts, "model": "any"})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["object"] == "list" and body["model"] == "tiny"
                assert [d["index"] for d in body["data"]] == list(range(len(texts)))
                assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == sum(counts[t] for t in texts)
                for d, t in zip(body["data"], texts, strict=True):
                    worst = min(worst, cosine(d["embedding"], expected[t]))
        return worst

    with ThreadPoolExecutor(32) as pool:
        assert min(pool.map(client, range(32))) >= 0.9999


def test_base64_dimensions_and_truncation(server, tiny):
    url, _ = server
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/embeddings", json={"input": SENTENCES[:3], "encoding_format": "base64"})
        vecs = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]
        np.testing.assert_allclose(np.stack(vecs), tiny.encode(SENTENCES[:3]), rtol=1e-4, atol=1e-5)

        r = c.post("/v1/embeddings", json={"input": SENTENCES[:3], "dimensions": 8})
        cut = np.array([d["embedding"] for d in r.json()["data"]])
        assert cut.shape == (3, 8)
        np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(cut, tiny.encode(SENTENCES[:3], truncate_dim=8), rtol=1e-4, atol=1e-5)

        long_text = "word " * 300
        r = c.post("/v1/embeddings", json={"input": ["short", long_text]})
        assert r.status_code == 200 and r.headers["x-embfast-truncated-inputs"] == "1"
        assert r.json()["usage"]["prompt_tokens"] == 3 + tiny.max_seq_length


BAD_REQUESTS = [
    (b"{not json", 400, "valid JSON"),
    (b"", 400, "empty body"),
    (b'{"input": "\xff"}', 400, "UTF-8"),
    (b"\xff\xfe{}", 400, "UTF-8"),
    (b"[1, 2]", 400, "must be a JSON object, got array"),
    (b"{}", 422, "input is required"),
    (b'{"input": null}', 422, "got null"),
    (b'{"input": []}', 422, "must not be an empty list"),
    (b'{"input": ""}', 422, "non-empty string"),
    (b'{"input": ["a", ""]}', 422, r"input\[1\] must be a non-empty string"),
    (b'{"input": ["a", 3]}', 422, r"input\[1\] must be a string, got number"),
    (b'{"input": ["a", ["b"]]}', 422, "nested lists"),
    (b'{"input": [1, 2, 3]}', 422, "check_embedding_ctx_length=False"),
    (b'{"input": {"text": "a"}}', 422, "got object"),
    (b'{"input": "a", "encoding_format": "int8"}', 422, "encoding_format must be 'float' or 'base64'"),
    (b'{"input": "a", "dimensions": 0}', 422, r"dimensions must be an integer in \[1, 32\], got 0"),
    (b'{"input": "a", "dimensions": 33}', 422, "got 33"),
    (b'{"input": "a", "dimensions": "8"}', 422, "dimensions must be an integer"),
    (b'{"input": "a", "dimensions": true}', 422, "dimensions must be an integer"),
    (b'{"input": "a", "model": 5}', 422, "model must be a string"),
    (b'{"input": "a", "input_type": 3}', 422, "input_type must be one of"),
    (b'{"input": "a", "truncate": "yes"}', 422, "truncate must be true or false"),
    (json.dumps({"input": ["ok", "word " * 300], "truncate": False}).encode(), 422, "max_seq_length"),
    (json.dumps({"input": ["a"] * 2049}).encode(), 422, "at most 2048"),
]


@pytest.mark.parametrize(("body", "status", "match"), BAD_REQUESTS)
def test_bad_requests_get_clear_4xx(server, body, status, match):
    url, _ = server
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["code"]
        assert re.search(match, err["message"]), err["message"]
        assert c.post("/v1/embeddings", json={"input": "still serving"}).status_code == 200


def test_unknown_routes_and_methods(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.get("/v1/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.get("/v1/embeddings")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_search_health_info_models_metrics(server, tiny):
    url, _ = server
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/search", json={"query": [SENTENCES[2], SENTENCES[0]], "top_k": 3})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert data[0]["hits"][0]["id"] == 2 and data[0]["hits"][0]["score"] > 0.9999
        assert data[1]["hits"][0]["text"] == SENTENCES[0] and len(data[1]["hits"]) == 3
        assert c.post("/v1/search", json={"query": "x", "top_k": 0}).status_code == 422
        assert c.post("/v1/search", json={"query": []}).status_code == 422

        assert c.get("/health").json() == {"status": "ok"}
        info = c.get("/info").json()
        assert info["model"] == "tiny" and info["dim"] == tiny.dim and info["precision"] == "fp32"
        assert info["provider"] == "CPUExecutionProvider" and info["corpus"]["size"] == len(SENTENCES)
        assert info["corpus"]["kind"] == "vectors" and info["corpus"]["texts"] is True
        assert "native" in info["build"] and info["batching"]["dynamic"] is True
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"

        assert c.post("/v1/embeddings", json={"input": "counted"}).status_code == 200
        assert c.post("/v1/embeddings", json={"input": None}).status_code == 422
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
        for name in ("embfast_queue_texts", "embfast_inflight_requests", "embfast_batch_texts_bucket",
                     "embfast_batch_tokens_bucket", "embfast_request_duration_seconds_bucket",
                     'embfast_errors_total{kind="invalid_input"}', "embfast_rejected_total"):
            assert name in text, name
        assert 'embfast_requests_total{code="200",endpoint="/v1/embeddings"}' in text
        for line in text.splitlines():  # every sample line is "name{labels} number"
            if line and not line.startswith("#"):
                float(line.rsplit(" ", 1)[1])


def test_search_without_corpus_and_bad_corpus(tiny, tmp_path):
    with serve(create_app(tiny)) as (url, _):
        r = httpx.post(f"{url}/v1/search", json={"query": "x"}, timeout=60)
        assert r.status_code == 404 and "--corpus" in r.json()["error"]["message"]
    np.save(tmp_path / "wide.npy", np.zeros((3, 64), dtype=np.float32))
    with pytest.raises(ValueError, match=r"dim must be in \[1, 32\]"):
        create_app(tiny, corpus=tmp_path / "wide.npy")
    np.save(tmp_path / "ok.npy", np.ones((3, 32), dtype=np.float64))
    (tmp_path / "two.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"one text per corpus vector \(3\), got 2"):
        create_app(tiny, corpus=tmp_path / "ok.npy", corpus_texts=tmp_path / "two.txt")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        create_app(tiny, corpus=tmp_path / "missing.npy")


def test_search_an_embfast_index(tiny, tmp_path):
    from embfast import Index

    index = Index(tiny)
    index.add(SENTENCES, ids=[f"doc-{i}" for i in range(len(SENTENCES))],
              metadata=[{"n": i} for i in range(len(SENTENCES))])
    index.save(tmp_path / "docs.embf")
    with serve(create_app(tiny, corpus=tmp_path / "docs.embf")) as (url, _):
        r = httpx.post(f"{url}/v1/search", json={"query": SENTENCES[1], "top_k": 2}, timeout=60)
        assert r.status_code == 200, r.text
        top = r.json()["data"][0]["hits"][0]
        assert (top["id"], top["text"], top["metadata"]) == ("doc-1", SENTENCES[1], {"n": 1})
        assert top["score"] > 0.9999
        assert httpx.get(f"{url}/info", timeout=60).json()["corpus"]["kind"] == "index"
    with pytest.raises(ValueError, match="holds its own texts"):
        create_app(tiny, corpus=tmp_path / "docs.embf", corpus_texts=["x"] * len(SENTENCES))


def test_api_key(tiny):
    import openai

    with serve(create_app(tiny, api_key="s3cret")) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as c:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
                r = c.post("/v1/embeddings", json={"input": "x"}, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert c.get("/metrics").status_code == 401
            assert c.get("/health").status_code == 200
            r = c.post("/v1/embeddings", json={"input": "x"}, headers={"authorization": "Bearer s3cret"})
            assert r.status_code == 200
        with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                client.embeddings.create(model="tiny", input="x")
        with openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0) as client:
            assert len(client.embeddings.create(model="tiny", input="x").data[0].embedding) == tiny.dim


def test_payload_limit(tiny):
    with serve(create_app(tiny, max_request_bytes=1000)) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/v1/embeddings", json={"input": ["word " * 100] * 5})
            assert r.status_code == 413 and "at most 1000 bytes" in r.json()["error"]["message"]

            def chunks():  # no Content-Length: counted while streaming
                yield b'{"input": ["'
                for _ in range(50):
                    yield b"word " * 20
                yield b'"]}'

            r = c.post("/v1/embeddings", content=chunks())
            assert r.status_code == 413
            r = c.post("/v1/embeddings", content=b"x" * 3_000_000)  # far over: drained, then refused
            assert r.status_code == 413
            assert c.post("/v1/embeddings", json={"input": "small"}).status_code == 200


def test_overload_gives_429_then_recovers(tiny):
    app = create_app(tiny, max_queue=1)
    gate = Gate()
    app.state.batcher.add_batch_listener(gate)
    with serve(app) as (url, _), httpx.Client(base_url=url, timeout=60) as c1, \
            httpx.Client(base_url=url, timeout=60) as c2:
        assert c1.post("/v1/embeddings", json={"input": "first"}).status_code == 200
        assert gate.entered.wait(30)  # the worker is parked: nothing else finishes
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(c1.post, "/v1/embeddings", json={"input": "queued"})
            wait_for(lambda: app.state.batcher.stats()["in_flight_requests"] == 1, "one request in flight")
            r = c2.post("/v1/embeddings", json={"input": "over the limit"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error" and "max_queue=1" in r.json()["error"]["message"]
            gate.release.set()
            assert queued.result(60).status_code == 200
        assert c2.post("/v1/embeddings", json={"input": "after"}).status_code == 200
        assert re.search(r"embfast_rejected_total 1(\.0)?\n", c2.get("/metrics").text)


def test_shutdown_finishes_requests_in_flight(tiny):
    app = create_app(tiny)
    batcher = app.state.batcher
    gate = Gate()
    batcher.add_batch_listener(gate)
    texts = [f"in flight {i}" for i in range(6)]
    with serve(app) as (url, server):
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "first"}, timeout=60).status_code == 200
        assert gate.entered.wait(30)
        pool = ThreadPoolExecutor(len(texts))
        futures = [pool.submit(httpx.post, f"{url}/v1/embeddings", json={"input": t}, timeout=60) for t in texts]
        wait_for(lambda: batcher.stats()["in_flight_requests"] == len(texts), "requests in flight")
        server.should_exit = True  # as SIGTERM does
        port = int(url.rsplit(":", 1)[1])
        wait_for(lambda: refuses(port), "the listening socket to close")  # shutting down, requests still held
        gate.release.set()
        responses = [f.result(60) for f in futures]
        pool.shutdown()
    assert [r.status_code for r in responses] == [200] * len(texts)
    for r, t in zip(responses, texts, strict=True):
        assert cosine(r.json()["data"][0]["embedding"], tiny.encode(t)) >= 0.9999
    assert batcher.closed and batcher.stats()["in_flight_requests"] == 0


def test_openai_client(server, tiny):
    import openai

    url, _ = server
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        res = client.embeddings.create(model="tiny", input=SENTENCES[:4])  # the client asks for base64
        got = np.array([d.embedding for d in res.data])
        np.testing.assert_allclose(got, tiny.encode(SENTENCES[:4]), rtol=1e-4, atol=1e-5)
        assert res.usage.prompt_tokens == int(tiny.count_tokens(SENTENCES[:4]).sum())
        res = client.embeddings.create(model="tiny", input="one", encoding_format="float", dimensions=16)
        assert len(res.data[0].embedding) == 16
        with pytest.raises(openai.UnprocessableEntityError, match="non-empty"):
            client.embeddings.create(model="tiny", input="")


def test_cli_serve_flags_env_and_sigterm(tiny_dir, tiny, tmp_path):
    from embfast.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.max_request_bytes, args.dynamic_batching) == ("127.0.0.1", 8080,
                                                                                    2_000_000, True)
    env = {**os.environ, "EMBFAST_MAX_WAIT_MS": "0.5", "EMBFAST_DYNAMIC_BATCHING": "0", "EMBFAST_API_KEY": "k",
           "EMBFAST_MODEL": str(tiny_dir), "EMBFAST_THREADS": "1", "EMBFAST_LOG_LEVEL": "warning",
           "EMBFAST_MAX_CLIENT_BATCH_SIZE": "3"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "embfast.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            assert proc.poll() is None, proc.stdout.read()
            threading.Event().wait(0.1)
        info = httpx.get(f"{url}/info", headers={"authorization": "Bearer k"}, timeout=30).json()
        assert info["batching"]["dynamic"] is False and info["batching"]["max_wait_ms"] == 0.5
        assert info["threads"] == 1
        r = httpx.post(f"{url}/v1/embeddings", json={"input": "cli"}, headers={"authorization": "Bearer k"},
                       timeout=30)
        assert cosine(r.json()["data"][0]["embedding"], tiny.encode("cli")) >= 0.9999
        assert info["limits"]["max_inputs"] == 3
        r = httpx.post(f"{url}/v1/embeddings", json={"input": ["a"] * 4}, headers={"authorization": "Bearer k"},
                       timeout=30)
        assert r.status_code == 422 and "at most 3 strings" in r.json()["error"]["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal it caught: exit by SIGTERM, no traceback
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out, out


def test_workers_auto_is_two_for_batched_multi_thread_cpu_models(tiny_dir):
    from embfast import Embedder
    from embfast.cli import build_parser
    from embfast.server.cli import _parse_workers, _workers

    assert build_parser().parse_args(["serve"]).workers == "auto"
    two, one = Embedder(tiny_dir, threads=2), Embedder(tiny_dir, threads=1)
    assert _workers(_parse_workers("auto"), [two], True) == 2
    assert _workers("auto", [two, one], True) == 1  # a one-thread model has nothing to split
    assert _workers("auto", [two], False) == 1  # dynamic batching off: one request per call, first come first served
    assert _workers(_parse_workers(" 3 "), [one], True) == 3
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(ValueError, match="--workers must be an int >= 1 or auto"):
            _parse_workers(bad)


@pytest.mark.slow
def test_real_model_under_32_clients(minilm):
    texts = [line for line in SENTENCES * 4]
    expected = minilm.encode(texts)
    with serve(create_app(minilm)) as (url, _):
        def client(k):
            with httpx.Client(base_url=url, timeout=120) as c:
                r = c.post("/v1/embeddings", json={"input": texts[k % len(texts):][:3]})
                assert r.status_code == 200, r.text
                return min(cosine(d["embedding"], expected[k % len(texts) + i])
                           for i, d in enumerate(r.json()["data"]))

        with ThreadPoolExecutor(32) as pool:
            assert min(pool.map(client, range(32))) >= 0.9999


def test_token_budget_429_with_retry_after_on_every_api_family(tiny, tmp_path):
    """A burst of long requests fills the token budget: small ones are still admitted and served, long ones get
    429 with an integer retry-after on the OpenAI, TEI, Cohere and rerank routes; one request over the whole
    budget gets 413; nothing gets a 5xx."""
    from models_fixtures import build_ce_bert

    from embfast import CrossEncoder

    ce = CrossEncoder(build_ce_bert(tmp_path / "ce"), threads=1)
    app = create_app(tiny, reranker=ce, max_queue_tokens=4096)
    # The two models share one run lock: holding it parks both workers before their next batch. (A batch
    # listener that parks a worker would hold the lock too, and block the other model's first request.)
    run_lock = app.state.batcher.run_lock
    assert run_lock is not None and app.state.rerank_batcher.run_lock is run_lock
    held = False
    long = ["word " * 200] * 16  # 16 x 64 tokens: a quarter of the budget, a "large" request
    doc = "word " * 200
    routes = {"/v1/embeddings": lambda n: {"input": long[:n]}, "/embed": lambda n: {"inputs": long[:n]},
              "/v2/embed": lambda n: {"texts": long[:n], "input_type": "search_document",
                                      "embedding_types": ["float"]},
              "/rerank": lambda n: {"query": "q", "texts": [doc] * n},
              "/v1/rerank": lambda n: {"query": "q", "documents": [doc] * n}}
    statuses = []
    with serve(app) as (url, _), ThreadPoolExecutor(16) as pool:
        def post(path, body):
            with httpx.Client(base_url=url, timeout=60) as c:
                r = c.post(path, json=body)
            statuses.append(r.status_code)
            return r

        try:
            assert post("/v1/embeddings", {"input": "first"}).status_code == 200
            assert post("/rerank", {"query": "q", "texts": ["first"]}).status_code == 200
            run_lock.acquire()  # both workers parked from here on
            held = True
            burst = [pool.submit(post, "/v1/embeddings", {"input": long}) for _ in range(3)]
            burst += [pool.submit(post, "/rerank", {"query": "q", "texts": [doc] * 16}) for _ in range(3)]
            wait_for(lambda: app.state.batcher.stats()["in_flight_tokens"] == 3 * 1024, "3 long requests admitted")
            wait_for(lambda: app.state.rerank_batcher.stats()["in_flight_requests"] == 3, "3 long rerank requests")
            for path, body in routes.items():
                r = post(path, body(16))
                assert r.status_code == 429, (path, r.text)
                assert int(r.headers["retry-after"]) >= 1, path
                assert "max_queue_tokens=4096" in r.text and "retry later" in r.text, path
            small = [pool.submit(post, path, body(1)) for path, body in routes.items()]
            wait_for(lambda: app.state.batcher.stats()["in_flight_requests"] == 3 + 3, "small requests admitted")
            wait_for(lambda: app.state.rerank_batcher.stats()["in_flight_requests"] == 3 + 2, "small reranks")
            tokens = [b.stats()["in_flight_tokens"] for b in (app.state.batcher, app.state.rerank_batcher)]
            assert 3000 <= tokens[0] < 4000  # the gauge sums the served models' batchers
            assert re.search(rf"embfast_inflight_tokens {sum(tokens)}(\.0)?\n", httpx.get(f"{url}/metrics").text)
            r = post("/v1/embeddings", {"input": ["word " * 200] * 80})  # 5120 tokens: never fits
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
            assert "split it" in r.json()["error"]["message"] and "retry-after" not in r.headers
        finally:
            if held:
                run_lock.release()
        for f in burst + small:
            assert f.result(60).status_code == 200
        assert cosine(small[0].result().json()["data"][0]["embedding"], tiny.encode(long[0])) >= 0.9999
        assert post("/v1/embeddings", {"input": long}).status_code == 200  # recovered
    assert not [s for s in statuses if s >= 500]
    assert sorted(set(statuses)) == [200, 413, 429]


def raw_request(url: str, head: bytes, body: bytes) -> socket.socket:
    """A raw loopback connection that sent ``head`` and ``body`` (and nothing more)."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(head + body)
    return s


def test_stalled_request_body_gets_408_and_the_connection_closes(tiny):
    app = create_app(tiny, body_timeout_s=0.5)
    with serve(app) as (url, _):
        with raw_request(url, b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                              b"content-length: 100\r\n\r\n", b'{"input": "stalls') as s:
            answer = b""
            while chunk := s.recv(65536):  # the server answers, then closes: recv gets b"" (no 30 s timeout)
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"connection: close" in answer.lower() and b"body_timeout" in answer
        with httpx.Client(base_url=url, timeout=30) as c:  # meanwhile and after, others are served
            assert c.post("/embed", json={"inputs": "fine"}).status_code == 200
            assert re.search(r'embfast_errors_total\{kind="body_timeout"\} 1(\.0)?\n', c.get("/metrics").text)
    with pytest.raises(ValueError, match="body_timeout_s"):
        create_app(tiny, body_timeout_s=0)


def test_queue_and_body_timeout_flags_and_env(tiny, monkeypatch):
    from embfast.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.max_queue_texts, args.max_queue_tokens, args.body_timeout_s) == (None, None, 30.0)
    assert args.queue_policy == "deadline"
    assert build_parser().parse_args(["serve", "--queue-policy", "oldest"]).queue_policy == "oldest"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--queue-policy", "lifo"])
    assert create_app(tiny, queue_policy="oldest").state.batcher.queue_policy == "oldest"
    monkeypatch.setenv("EMBFAST_QUEUE_POLICY", "oldest")
    assert build_parser().parse_args(["serve"]).queue_policy == "oldest"
    assert args.lookahead_texts is None and create_app(tiny).state.batcher.lookahead_texts == 32
    assert build_parser().parse_args(["serve", "--lookahead-texts", "16"]).lookahead_texts == 16
    assert create_app(tiny, lookahead_texts=16).state.batcher.lookahead_texts == 16
    with pytest.raises(ValueError, match="lookahead_texts"):
        create_app(tiny, lookahead_texts=0)
    assert args.share_tokens == 128 and create_app(tiny).state.batcher.share_tokens == 128
    assert build_parser().parse_args(["serve", "--share-tokens", "0"]).share_tokens == 0
    assert create_app(tiny, share_tokens=256).state.batcher.share_tokens == 256
    with pytest.raises(ValueError, match="share_tokens"):
        create_app(tiny, share_tokens=-1)
    monkeypatch.setenv("EMBFAST_SHARE_TOKENS", "64")
    assert build_parser().parse_args(["serve"]).share_tokens == 64
    monkeypatch.setenv("EMBFAST_MAX_QUEUE_TOKENS", "5000")
    monkeypatch.setenv("EMBFAST_BODY_TIMEOUT_S", "0")
    args = build_parser().parse_args(["serve", "--max-queue-texts", "100"])
    assert (args.max_queue_texts, args.max_queue_tokens, args.body_timeout_s) == (100, 5000, 0.0)
    app = create_app(tiny, max_queue_texts=100, max_queue_tokens=5000, body_timeout_s=None)
    with serve(app) as (url, _):
        info = httpx.get(f"{url}/info", timeout=30).json()
    assert (info["batching"]["max_queue_texts"], info["batching"]["max_queue_tokens"]) == (100, 5000)
    assert (info["batching"]["queue_policy"], info["batching"]["lookahead_texts"]) == ("deadline", 32)
    assert info["batching"]["share_tokens"] == 128
    assert info["limits"]["body_timeout_s"] is None


@pytest.mark.parametrize("path, key", [("/v1/embeddings", "input"), ("/embed", "inputs")])
def test_a_client_that_goes_away_takes_its_queued_texts_with_it(tiny, path, key):
    """A client that closes its connection while its texts wait: the request is cancelled, its texts leave the
    queue without being computed (status 499 in the metrics), and the server serves the next client."""
    app = create_app(tiny)
    batcher = app.state.batcher
    gate = Gate()
    batcher.add_batch_listener(gate)
    texts = [f"nobody will read this {i}" for i in range(40)]
    body = json.dumps({key: texts}).encode()
    with serve(app) as (url, _):
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/embeddings", json={"input": "first"}, timeout=60)
            assert gate.entered.wait(30)  # the worker is parked after the first batch
            with raw_request(url, b"POST " + path.encode() + b" HTTP/1.1\r\nhost: x\r\ncontent-type: "
                             b"application/json\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n", body):
                wait_for(lambda: batcher.stats()["queued_texts"] == len(texts), "the texts in the queue")
            # the socket is closed: the request leaves the queue while the worker is still parked
            wait_for(lambda: batcher.stats()["in_flight_requests"] == 0, "the request to be dropped")
            stats = batcher.stats()
            assert stats["queued_texts"] == 0 and stats["cancelled"] == 1 and stats["texts"] == 1
            assert stats["running_batches"] == 1  # the parked batch of "first"
            gate.release.set()
            assert first.result(60).status_code == 200
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/v1/embeddings", json={"input": "next"})
            assert r.status_code == 200
            assert cosine(r.json()["data"][0]["embedding"], tiny.encode("next")) >= 0.9999
            wait_for(lambda: batcher.stats()["running_batches"] == 0, "the worker to finish")
            text = c.get("/metrics").text
    assert batcher.stats()["texts"] == 2  # "first" and "next": none of the 40
    assert re.search(r"embfast_cancelled_total 1(\.0)?\n", text)
    assert re.search(r'embfast_requests_total\{code="499",endpoint="' + re.escape(path) + r'"\} 1(\.0)?\n', text)
    assert re.search(r'embfast_errors_total\{kind="client_disconnected"\} 1(\.0)?\n', text)
    assert re.search(r"embfast_running_batches 0(\.0)?\n", text)


async def _asgi_post(asgi, path: str, body: bytes) -> tuple[int, list, bytes]:
    """POST ``body`` to ``path`` through the ASGI callable ``asgi``: (status, headers, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"x"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    messages, sent = [{"type": "http.request", "body": body, "more_body": False}], []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await asgi(scope, receive, send)
    return sent[0]["status"], sent[0]["headers"], b"".join(m.get("body", b"") for m in sent[1:])


def test_direct_routes_answer_as_fastapi_routing_does(tiny):
    """The load-carrying POST routes are called past FastAPI's router (``_DirectRoutes``, issue 19): for good and
    bad requests on each API family, the answer (status, headers, body) is the one FastAPI's own routing gives."""
    import asyncio

    app = create_app(tiny)
    direct = app.front.app
    assert {("POST", p) for p in ("/v1/embeddings", "/embed", "/", "/v2/embed", "/rerank", "/v1/search")} \
        <= set(direct.routes)
    cases = [("/v1/embeddings", {"input": "hello there", "model": "m"}), ("/v1/embeddings", {"input": ""}),
             ("/v1/embeddings", {"input": [1, 2, 3]}), ("/v1/embeddings", b"{not json"),
             ("/v1/embeddings", {"input": "x", "dimensions": 8, "encoding_format": "base64"}),
             ("/embed", {"inputs": ["a", "b"], "normalize": False}), ("/embed", {"inputs": 3}), ("/", {"inputs": "c"}),
             ("/v2/embed", {"texts": ["x"], "input_type": "search_query", "embedding_types": ["float", "int8"]}),
             ("/v2/embed", {"texts": []}), ("/rerank", {"query": "q", "texts": ["a"]}), ("/v1/search", {"query": "x"})]
    try:
        for path, body in cases:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            got = asyncio.run(_asgi_post(direct, path, raw))
            want = asyncio.run(_asgi_post(app.behind, path, raw))
            got, want = [(s, h, json.loads(b)) for s, h, b in (got, want)]
            if path == "/v2/embed" and got[0] == 200:  # Cohere's answers carry a random id
                got[2]["id"] = want[2]["id"]
            assert got == want, (path, body)
            assert got[0] == 200 or {"error", "message"} & set(got[2]), (path, got)  # Cohere's errors: message
    finally:
        app.state.batcher.close()
