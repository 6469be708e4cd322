"""Ray Serve on a real local cluster: two replicas of the HTTP API answer concurrent clients correctly; a replica
killed mid-test is replaced and every request the cluster answered is right."""

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
    from ray.util.state import list_actors

    return sorted(a.name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                  if a.class_name.startswith("ServeReplica:embfast"))


def test_two_replicas_answer_concurrent_clients(served, tiny):
    want = tiny.encode(TEXTS)
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: _embed(client, served, i), range(240)))
    assert len(answers) == 240
    for i, vec, _ in answers:
        np.testing.assert_allclose(vec, want[i % len(TEXTS)], rtol=1e-4, atol=1e-5)
    assert len({replica for _, _, replica in answers}) == 2  # both replicas answered
    assert len(_replicas()) == 2


def test_killed_replica_is_replaced_and_no_answer_is_wrong(served, tiny):
    want = tiny.encode(TEXTS)
    before = _replicas()
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
    while len(results) < 40:
        time.sleep(0.05)
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # Serve's controller starts a replacement
        now = _replicas()
        if len(now) == 2 and before[0] not in now:
            break
        time.sleep(0.5)
    answered_before = len(results)
    while len(results) < answered_before + 40:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(60)
    now = _replicas()
    assert len(now) == 2 and before[0] not in now, (before, now)
    for i, vec, _ in results:
        np.testing.assert_allclose(vec, want[i % len(TEXTS)], rtol=1e-4, atol=1e-5)
    # a request in flight on the killed process may fail (it was never answered); every other one was answered
    assert len(failures) <= 4 * 1, failures
