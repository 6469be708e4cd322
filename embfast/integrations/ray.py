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
    """The FastAPI app one Ray Serve replica serves (runs inside the replica)."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as `embfast serve`: no pools fighting the worker
    os.environ.setdefault("EMBFAST_ORT_SPIN", "0")
    from embfast.cross_encoder import CrossEncoder
    from embfast.server import create_app
    from embfast.server_rerank import load_served_model

    loaded = [load_served_model(m, **model_args) for m in models]
    embedders = [m for m in loaded if not isinstance(m, CrossEncoder)]
    rerankers = [m for m in loaded if isinstance(m, CrossEncoder)]
    if len(embedders) > 1 or len(rerankers) > 1:
        raise ValueError(f"one app serves one embedding model and one cross-encoder, got {len(embedders)} and "
                         f"{len(rerankers)}: {models}")
    app = create_app(embedders[0] if embedders else None, reranker=rerankers[0] if rerankers else None, **app_kwargs)
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


def serve_app(models=None, *, num_replicas: int = 1, ray_actor_options: dict | None = None, name: str = "embfast",
              device: str = "cpu", precision: str = "auto", threads: int | None = None,
              max_ongoing_requests: int = 256, **app_kwargs):
    """A Ray Serve application of embfast's HTTP API (the routes of ``embfast serve``), on ``num_replicas`` replicas.

    >>> from ray import serve
    >>> from embfast.integrations.ray import serve_app
    >>> serve.run(serve_app(["org/embedder", "org/reranker"], num_replicas=4, ray_actor_options={"num_cpus": 2}))

    or from the command line: ``serve run embfast.integrations.ray:app`` (the bundled model; ``EMBFAST_MODEL``
    and ``EMBFAST_REPLICAS`` choose others). Each replica loads the models once (exports are cached under
    ``$EMBFAST_HOME`` on each node, built once under a file lock) and runs its own dynamic batcher; Ray
    Serve's proxy spreads requests over the replicas and replaces a replica that dies. Every answer carries
    an ``x-embfast-replica: <host>:<pid>`` header naming the replica that computed it.

    Args:
        models: what every replica serves, each a folder, Hub id (``org/name``), catalog name or None (the
            bundled all-MiniLM-L6-v2), its kind read from the model: today at most one embedding model and one
            cross-encoder. Default None: the bundled model.
        num_replicas: replicas (>= 1, default 1).
        ray_actor_options: Ray resources per replica (default ``{"num_cpus": 1}``).
        name: the deployment's name (default ``"embfast"``).
        device, precision: as :class:`embfast.Embedder` (defaults "cpu", "auto").
        threads: ONNX Runtime threads per replica (default: the replica's ``num_cpus``, at least 1).
        max_ongoing_requests: requests one replica accepts at once (Ray Serve queues the rest; default 256).
        **app_kwargs: :func:`embfast.server.create_app` options (``max_batch_tokens``, ``max_wait_ms``,
            ``api_key``, ``max_inputs``, ...).

    Returns:
        A ``ray.serve.Application`` for ``serve.run``.

    Raises:
        ValueError: ``num_replicas`` < 1. ImportError: no ``ray[serve]``.
    """
    try:
        from ray import serve
    except ImportError as exc:
        raise ImportError(f"serve_app needs Ray Serve: pip install 'ray[serve]' ({exc})") from exc
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be an int >= 1, got {num_replicas!r}")
    actor_options = dict(ray_actor_options or {"num_cpus": 1})
    if threads is None:
        threads = max(1, int(actor_options.get("num_cpus") or 1))
    models = [None] if models is None else [None if m is None else str(m) for m in
                                            ([models] if isinstance(models, str) else models)]
    model_args = {"device": device, "precision": precision, "threads": threads}

    def build():  # evaluated in each replica, when it starts
        return _replica_app(models, model_args, app_kwargs)

    class EmbfastReplica:
        """One replica: the app that :func:`build` returns (Ray Serve runs its startup and shutdown)."""

    deployment = serve.deployment(serve.ingress(build)(EmbfastReplica), name=name, num_replicas=num_replicas,
                                  ray_actor_options=actor_options, max_ongoing_requests=max_ongoing_requests)
    return deployment.bind()


def _app_from_env():
    """``serve run embfast.integrations.ray:app``: EMBFAST_MODEL (comma-separated) and EMBFAST_REPLICAS."""
    import os

    models = [m for m in os.environ.get("EMBFAST_MODEL", "").split(",") if m] or None
    return serve_app(models, num_replicas=int(os.environ.get("EMBFAST_REPLICAS", "1")))


def __getattr__(name: str):
    if name == "app":  # built on first use, so importing this module needs no Ray Serve
        return _app_from_env()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
