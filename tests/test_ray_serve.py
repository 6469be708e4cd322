"""Ray Serve on a real local cluster: two replicas of the HTTP API answer concurrent clients correctly; a replica
killed while clients send is replaced and the router resends what died with it (no request lost), replicas
stopped gracefully lose no request, and every answer is right."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from embfast.integrations.ray import serve_app  # noqa: E402

TEXTS = [f"text number {i}: " + "some words " * (i % 7) for i in range(60)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny):
    """The app on 2 replicas of a 2-CPU local cluster; yields the base URL."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = serve_app([str(tiny.model_dir)], num_replicas=2, ray_actor_options={"num_cpus": 0.5}, threads=1,
                    max_wait_ms=1.0)
    serve.run(app, name="embfast", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def _embed(client: httpx.Client, url: str, i: int) -> tuple[int, np.ndarray, str]:
    r = client.post(f"{url}/v1/embeddings", json={"input": [TEXTS[i % len(TEXTS)]]}, timeout=60)
    r.raise_for_status()
    return i, np.asarray(r.json()["data"][0]["embedding"], dtype=np.float32), r.headers["x-embfast-replica"]


def _replicas() -> list[str]:
    """Names of the live replica actors of the app (GCS look-up: needs no dashboard)."""
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::embfast#embfast#"))


def _running() -> int:
    status = serve.status().applications["embfast"].deployments["embfast"]
    return status.replica_states.get("RUNNING", 0)


def test_two_replicas_answer_concurrent_clients(served, tiny):
    want = tiny.encode(TEXTS)
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: _embed(client, served, i), range(240)))
    assert len(answers) == 240
    for i, vec, _ in answers:
        np.testing.assert_allclose(vec, want[i % len(TEXTS)], rtol=1e-4, atol=1e-5)
    assert len({replica for _, _, replica in answers}) == 2  # both replicas answered
    assert len(_replicas()) == 2 and _running() == 2


def test_killed_replica_is_replaced_and_no_request_is_lost(served, tiny):
    """SIGKILL a replica while every replica is busy with large requests: the router resends the requests that
    died with it to the other replica, so every client gets its answer, right, and Serve starts a replacement.

    Requests are large (1,920 texts, hundreds of ms on one thread) and four clients keep both replicas busy, so a
    kill almost always lands on a request in flight; if one found its replica between two requests (nothing to
    resend), the test kills the replacement too, up to three times, so it always tests the resend."""
    want = tiny.encode(TEXTS)
    repeat = 32
    stop = threading.Event()
    results: list = []
    failures: list = []
    retried: list = []

    def client_loop():
        with httpx.Client() as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{served}/v1/embeddings", json={"input": TEXTS * repeat}, timeout=300)
                    r.raise_for_status()
                    got = np.asarray([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
                    results.append(got)
                    if "x-embfast-retries" in r.headers:
                        retried.append(int(r.headers["x-embfast-retries"]))
                except httpx.HTTPError as exc:
                    failures.append(exc)

    def wait_for_answers(n: int):
        goal = len(results) + n
        deadline = time.monotonic() + 300
        while len(results) < goal and time.monotonic() < deadline and not failures:
            time.sleep(0.05)

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    killed: list[str] = []
    try:
        wait_for_answers(4)
        for _ in range(3):
            before = _replicas()
            killed.append(before[0])
            ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # Serve's controller starts a replacement
                now = _replicas()
                if len(now) == 2 and before[0] not in now and _running() == 2:
                    break
                time.sleep(0.5)
            wait_for_answers(4)
            if retried or failures:
                break
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    now = _replicas()
    assert len(now) == 2 and not set(killed) & set(now), (killed, now)
    assert failures == [], failures  # no request lost: the ones on the killed replica were resent
    assert retried, f"{len(killed)} kills found no request in flight (the test did not test the resend)"
    for got in results:
        np.testing.assert_allclose(got, np.tile(want, (repeat, 1)), rtol=1e-4, atol=1e-5)


def test_replicas_stopped_gracefully_lose_nothing(served, tiny):
    """Scaling 2 -> 1 -> 2 replicas while clients send: Serve drains a stopping replica, so no request fails."""
    want = tiny.encode(TEXTS)
    stop = threading.Event()
    results: list = []
    failures: list = []

    def client_loop():
        with httpx.Client() as client:
            i = 0
            while not stop.is_set():
                try:
                    results.append(_embed(client, served, i))
                except httpx.HTTPError as exc:
                    failures.append(exc)
                i += 1

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    for replicas in (1, 2):
        serve.run(serve_app([str(tiny.model_dir)], num_replicas=replicas, ray_actor_options={"num_cpus": 0.5},
                            threads=1, max_wait_ms=1.0), name="embfast", route_prefix="/")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (_running() != replicas or len(_replicas()) != replicas):
            time.sleep(0.5)
        assert _running() == replicas
    answered = len(results)
    while len(results) < answered + 20:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(60)
    assert failures == [], failures
    for i, vec, _ in results:
        np.testing.assert_allclose(vec, want[i % len(TEXTS)], rtol=1e-4, atol=1e-5)


def test_serve_app_arguments():
    with pytest.raises(ValueError, match="num_replicas must be an int >= 1, got 0"):
        serve_app(num_replicas=0)
    with pytest.raises(ValueError, match="retries must be an int >= 0"):
        serve_app(retries=-1)
    app = serve_app("org/name", num_replicas=3, ray_actor_options={"num_cpus": 2})
    assert type(app).__name__ == "Application"
