"""Ray: embed a ``ray.data.Dataset`` (Ray Data, one :class:`embfast.Embedder` per actor), or serve the HTTP API
on replicas across a cluster (Ray Serve, :func:`serve_app`).

>>> import ray
>>> from embfast.integrations.ray import EmbedBatch, embed_dataset
>>> ds = ray.data.read_parquet("s3://bucket/docs/")                       # a "text" column
>>> ds = embed_dataset(ds, model="/models/all-MiniLM-L6-v2", concurrency=8)  # adds "embedding"
>>> ds.write_parquet("s3://bucket/vectors/")

or, by hand: ``ds.map_batches(EmbedBatch, fn_constructor_kwargs={"model": ...},
compute=ray.data.ActorPoolStrategy(size=8), batch_size=256, num_cpus=1)``.

Each actor loads the model once (exported ONNX is cached under ``$EMBFAST_HOME`` on
each node, built once under a file lock) and embeds the batches Ray hands it. Rows keep
their other columns; the vectors are the same as a local ``Embedder.encode`` of the
same texts (up to float rounding of different batch compositions).
"""

from __future__ import annotations

import numpy as np


class EmbedBatch:
    """A callable class for ``ray.data.Dataset.map_batches``: embeds one column, adds another.

    Args:
        model: an Embedder model (folder, or None for the bundled all-MiniLM-L6-v2); loaded once per actor.
        text_column: the column holding the texts (str, none missing).
        output_column: the column to add: (rows, dim) float32 vectors.
        device, precision, threads, max_seq_length, truncate_dim: as :class:`embfast.Embedder`
            (``threads`` = ONNX Runtime threads in this actor; match the actor's ``num_cpus``).
        batch_size: texts per ONNX Runtime call inside a Ray batch (default 32).
        normalize_embeddings: L2-normalize (None: as the model says).

    A batch may be a dict of numpy arrays (``batch_format="numpy"``, the vectors become a
    (rows, dim) array), a pandas DataFrame (one 1-D array per row) or a pyarrow Table
    (a fixed-size list column); the same kind is returned.
    """

    def __init__(self, model=None, *, text_column: str = "text", output_column: str = "embedding",
                 device: str = "cpu", precision: str = "auto", threads: int | None = None,
                 max_seq_length: int | None = None, truncate_dim: int | None = None, batch_size: int = 32,
                 normalize_embeddings: bool | None = None):
        from embfast import Embedder

        self.embedder = Embedder(model, device=device, precision=precision, threads=threads,
                                 max_seq_length=max_seq_length, truncate_dim=truncate_dim)
        self.text_column, self.output_column = text_column, output_column
        self.batch_size, self.normalize = batch_size, normalize_embeddings

    def _encode(self, texts) -> np.ndarray:
        from embfast.encoder import as_text_list

        texts = list(texts)
        for i, t in enumerate(texts):
            if t is None or (isinstance(t, float) and t != t):  # pandas and arrow give None or NaN
                raise ValueError(f"column {self.text_column!r}[{i}] is missing (None or NaN); every row needs a text")
        texts, _ = as_text_list(texts, f"column {self.text_column!r}")
        emb = self.embedder.encode(texts, batch_size=self.batch_size, normalize_embeddings=self.normalize)
        return np.ascontiguousarray(emb, dtype=np.float32)

    def _missing(self, columns) -> ValueError:
        return ValueError(f"batch must have a {self.text_column!r} column (text_column), got columns "
                          f"{sorted(map(str, columns))}")

    def __call__(self, batch):
        """Embed ``batch[text_column]`` into ``batch[output_column]``; returns the batch's kind."""
        if isinstance(batch, dict):
            if self.text_column not in batch:
                raise self._missing(batch)
            out = dict(batch)
            out[self.output_column] = self._encode(np.asarray(batch[self.text_column]).tolist())
            return out
        if type(batch).__module__.startswith("pandas"):
            if self.text_column not in batch.columns:
                raise self._missing(batch.columns)
            emb = self._encode(batch[self.text_column].tolist())
            out = batch.copy()
            out[self.output_column] = list(emb)
            return out
        if type(batch).__module__.startswith("pyarrow"):
            import pyarrow as pa

            if self.text_column not in batch.column_names:
                raise self._missing(batch.column_names)
            emb = self._encode(batch.column(self.text_column).to_pylist())
            col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), emb.shape[1])
            return batch.append_column(self.output_column, col)
        raise TypeError(f"batch must be a dict of numpy arrays, a pandas DataFrame or a pyarrow Table, "
                        f"got {type(batch).__name__}")


def embed_dataset(ds, model=None, *, concurrency: int = 1, num_cpus: float = 1, num_gpus: float = 0,
                  batch_size: int = 256, batch_format: str = "numpy", text_column: str = "text",
                  output_column: str = "embedding", device: str | None = None, precision: str = "auto",
                  threads: int | None = None, **embed_kwargs):
    """Add an ``output_column`` of embeddings to a ``ray.data.Dataset`` (lazy, like every Ray Data step).

    Args:
        ds: the dataset; ``text_column`` must hold strings.
        model: the Embedder model for every actor (a folder reachable from every node, or None for the
            bundled model, which every node must have installed).
        concurrency: actors (each holds one Embedder).
        num_cpus / num_gpus: Ray resources per actor; ``num_gpus > 0`` defaults ``device`` to "cuda".
        batch_size: rows per Ray batch handed to an actor (default 256).
        batch_format: "numpy" (default), "pandas" or "pyarrow".
        threads: ONNX Runtime threads per actor (default: ``num_cpus``, at least 1).
        **embed_kwargs: more :class:`EmbedBatch` options (max_seq_length, truncate_dim, normalize_embeddings).

    Returns:
        The mapped dataset.
    """
    import ray.data

    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
    if device is None:
        device = "cuda" if num_gpus and num_gpus > 0 else "cpu"
    if threads is None:
        threads = max(1, int(num_cpus))
    kwargs = {"model": None if model is None else str(model), "text_column": text_column,
              "output_column": output_column, "device": device, "precision": precision, "threads": threads,
              **embed_kwargs}
    pool = ray.data.ActorPoolStrategy(size=concurrency)
    return ds.map_batches(EmbedBatch, fn_constructor_kwargs=kwargs, compute=pool, batch_size=batch_size,
                          batch_format=batch_format, num_cpus=num_cpus, num_gpus=num_gpus or None)


def _replica_app(models: list, model_args: dict, app_kwargs: dict):
    """The ASGI app one Ray Serve replica serves (runs inside the replica): every model, as ``embfast serve``
    with several ``--model`` does."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as `embfast serve`: no pools fighting the worker
    os.environ.setdefault("EMBFAST_ORT_SPIN", "0")
    from embfast.server import create_app
    from embfast.server.rerank import load_served_model

    loaded = [load_served_model(m, **model_args) for m in models]
    app = create_app(models=loaded, **app_kwargs)
    return _with_header(app, b"x-embfast-replica", f"{os.uname().nodename}:{os.getpid()}".encode())


def _with_header(app, name: bytes, value: bytes):
    """An ASGI app that adds one header to every HTTP answer of ``app`` (which replica answered)."""

    async def asgi(scope, receive, send):
        if scope["type"] != "http":  # lifespan: the app's own startup and shutdown
            return await app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (name, value)])
            await send(message)

        return await app(scope, receive, send_with_header)

    return asgi


class _AsgiHost:
    """Runs an ASGI app inside a replica without a server: its lifespan (startup on first use, shutdown on
    :meth:`close`) and one buffered HTTP exchange per :meth:`request` call."""

    def __init__(self, app):
        import asyncio

        self.app = app
        self._started: asyncio.Event | None = None
        self._lock = asyncio.Lock()
        self._lifespan_in = None
        self._lifespan_task = None
        self._failed: str | None = None

    async def _start(self) -> None:
        import asyncio

        async with self._lock:
            if self._started is not None:
                return
            self._started = asyncio.Event()
            self._lifespan_in = asyncio.Queue()
            done = asyncio.Event()

            async def receive():
                return await self._lifespan_in.get()

            async def send(message):
                if message["type"] == "lifespan.startup.failed":
                    self._failed = message.get("message", "startup failed")
                if message["type"] in ("lifespan.startup.complete", "lifespan.startup.failed"):
                    self._started.set()
                if message["type"].startswith("lifespan.shutdown."):
                    done.set()

            self._shutdown_done = done
            self._lifespan_task = asyncio.ensure_future(self.app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                                                 receive, send))
            await self._lifespan_in.put({"type": "lifespan.startup"})
            await self._started.wait()
        if self._failed:
            raise RuntimeError(f"the embfast app failed to start: {self._failed}")

    async def request(self, method: str, path: str, query_string: bytes, headers: list, body: bytes):
        """One HTTP request through the app: ``(status, headers, body)``."""
        import asyncio

        if self._started is None or not self._started.is_set():
            await self._start()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": query_string, "headers": [(bytes(k), bytes(v)) for k, v in headers],
                 "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
        sent = False
        disconnected = asyncio.Event()

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        status, out_headers, chunks = 500, [], []

        async def send(message):
            nonlocal status, out_headers
            if message["type"] == "http.response.start":
                status, out_headers = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        try:
            await self.app(scope, receive, send)
        finally:
            disconnected.set()
        return status, out_headers, b"".join(chunks)

    async def close(self) -> None:
        if self._lifespan_task is None:
            return
        await self._lifespan_in.put({"type": "lifespan.shutdown"})
        await self._shutdown_done.wait()
        await self._lifespan_task


def serve_app(models=None, *, num_replicas: int = 1, ray_actor_options: dict | None = None, name: str = "embfast",
              device: str = "cpu", precision: str = "auto", threads: int | None = None,
              max_ongoing_requests: int = 256, retries: int = 3, router_replicas: int = 1, **app_kwargs):
    """A Ray Serve application of embfast's HTTP API (the routes of ``embfast serve``), on ``num_replicas`` replicas.

    >>> from ray import serve
    >>> from embfast.integrations.ray import serve_app
    >>> serve.run(serve_app(["org/embedder", "org/reranker"], num_replicas=4, ray_actor_options={"num_cpus": 2}))

    or from the command line: ``serve run embfast.integrations.ray:app`` (the bundled model; ``EMBFAST_MODEL``
    and ``EMBFAST_REPLICAS`` choose others). Each replica loads the models once (exports are cached under
    ``$EMBFAST_HOME`` on each node, built once under a file lock) and runs its own dynamic batchers; Ray
    Serve's controller replaces a replica that dies. Every answer carries an ``x-embfast-replica: <host>:<pid>``
    header naming the replica that computed it.

    Two deployments: ``name`` (the replicas, which run the models) and ``name + "-router"`` (the ingress, a light
    async actor taking no CPU). The router hands each HTTP request to a replica through a Serve handle and, when
    that replica dies with the request (a crash, an OOM kill, ``ray.kill``), sends it again to another, up to
    ``retries`` times: every route of the API is a pure function of its request (idempotent), so a client never
    sees a replica's death. A replica stopped gracefully (scaling down, a redeploy) finishes its requests first.

    Args:
        models: what every replica serves, each a folder, Hub id (``org/name``), catalog name or None (the
            bundled all-MiniLM-L6-v2), its kind read from the model: embedders, cross-encoders and sparse
            encoders, any number (requests choose by name, see :mod:`embfast.server.registry`). Default None: the
            bundled model.
        num_replicas: replicas (>= 1, default 1).
        ray_actor_options: Ray resources per replica (default ``{"num_cpus": 1}``).
        name: the deployment's name (default ``"embfast"``).
        device, precision: as :class:`embfast.Embedder` (defaults "cpu", "auto").
        threads: ONNX Runtime threads per replica (default: the replica's ``num_cpus``, at least 1).
        max_ongoing_requests: requests one replica accepts at once (Ray Serve queues the rest; default 256).
        retries: times the router resends a request whose replica died (default 3; 0 = never); after that
            the client gets a 503 with ``retry-after``.
        router_replicas: router replicas (default 1; each is one async actor with ``num_cpus=0``).
        **app_kwargs: :func:`embfast.server.create_app` options (``max_batch_tokens``, ``max_wait_ms``,
            ``api_key``, ``max_inputs``, ...).

    Returns:
        A ``ray.serve.Application`` for ``serve.run``.

    Raises:
        ValueError: ``num_replicas`` < 1, ``retries`` < 0 or ``router_replicas`` < 1. ImportError: no
        ``ray[serve]``.
    """
    try:
        from ray import serve
    except ImportError as exc:
        raise ImportError(f"serve_app needs Ray Serve: pip install 'ray[serve]' ({exc})") from exc
    for arg, value, low in (("num_replicas", num_replicas, 1), ("retries", retries, 0),
                            ("router_replicas", router_replicas, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
    actor_options = dict(ray_actor_options or {"num_cpus": 1})
    if threads is None:
        threads = max(1, int(actor_options.get("num_cpus") or 1))
    models = [None] if models is None else [None if m is None else str(m) for m in
                                            ([models] if isinstance(models, str) else models)]
    model_args = {"device": device, "precision": precision, "threads": threads}

    class EmbfastReplica:
        """One replica: the embfast app, run in-process (:class:`_AsgiHost`), one HTTP exchange per call."""

        def __init__(self):
            self.host = _AsgiHost(_replica_app(models, model_args, app_kwargs))

        async def handle(self, method: str, path: str, query_string: bytes, headers: list, body: bytes):
            return await self.host.request(method, path, query_string, headers, body)

        async def __del__(self):  # Serve calls it when the replica stops, after its requests finished
            await self.host.close()

    class EmbfastRouter:
        """The ingress: forwards each HTTP request to a replica; resends it when that replica dies with it."""

        def __init__(self, replicas):
            self.replicas = replicas

        async def __call__(self, request):
            import asyncio

            from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
            from starlette.responses import Response

            body = await request.body()
            args = (request.method, request.url.path, request.scope.get("query_string", b""),
                    list(request.scope.get("headers", [])), body)
            last: Exception | None = None
            for attempt in range(retries + 1):
                try:
                    status, headers, content = await self.replicas.handle.remote(*args)
                except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:  # the replica died with it
                    last = exc
                    await asyncio.sleep(min(0.05 * 2 ** attempt, 1.0))
                    continue
                response = Response(content, status_code=status)
                response.raw_headers = [(bytes(k), bytes(v)) for k, v in headers]
                if attempt:
                    response.raw_headers.append((b"x-embfast-retries", str(attempt).encode()))
                return response
            return Response(f'{{"error": {{"message": "no replica could answer: {type(last).__name__}", '
                            f'"type": "server_error", "code": "replica_unavailable", "param": null}}}}',
                            status_code=503, media_type="application/json", headers={"retry-after": "1"})

    replica = serve.deployment(EmbfastReplica, name=name, num_replicas=num_replicas,
                               ray_actor_options=actor_options, max_ongoing_requests=max_ongoing_requests)
    router = serve.deployment(EmbfastRouter, name=f"{name}-router", num_replicas=router_replicas,
                              ray_actor_options={"num_cpus": 0},
                              max_ongoing_requests=max(1000, max_ongoing_requests * num_replicas))
    return router.bind(replica.bind())


def _app_from_env():
    """``serve run embfast.integrations.ray:app``: EMBFAST_MODEL (comma-separated) and EMBFAST_REPLICAS."""
    import os

    models = [m for m in os.environ.get("EMBFAST_MODEL", "").split(",") if m] or None
    return serve_app(models, num_replicas=int(os.environ.get("EMBFAST_REPLICAS", "1")))


def __getattr__(name: str):
    if name == "app":  # built on first use, so importing this module needs no Ray Serve
        return _app_from_env()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
