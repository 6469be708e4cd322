"""``embfast serve`` on the command line: flags (each with an EMBFAST_* environment variable) and uvicorn."""

from __future__ import annotations

import argparse
import os
import time

from embfast.server.app import create_app
from embfast.server.common import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_INPUTS, DEFAULT_MAX_REQUEST_BYTES


def _env(name: str, default=None):
    return os.environ.get(f"EMBFAST_{name}", default)


def _env_flag(name: str, default: bool) -> bool:
    value = _env(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def _parse_workers(value) -> int | str:
    """``--workers``: an int >= 1 or "auto" (resolved by :func:`_workers` once the models are loaded)."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise ValueError(f"--workers must be an int >= 1 or auto, got {value!r}")
    return workers


def _workers(value: int | str, models: list, dynamic_batching: bool) -> int:
    """Resolve ``--workers auto``: 2 when every model runs on the CPU on 2 or more ONNX Runtime threads and
    requests are batched together, else 1. Measured on 2 cores (benchmarks/README.md, "Two workers by default"):
    2 workers served 1.02-1.16x the throughput of 1 worker at 1 to 512 clients over HTTP, single sentences and 8
    texts per request; on CUDA a second worker has no session of its own to run on."""
    if value != "auto":
        return int(value)
    cpu = all(getattr(m, "device", "cpu") == "cpu" and getattr(getattr(m, "session", None), "threads", 1) >= 2
              for m in models)
    return 2 if cpu and dynamic_batching else 1


def register_cli(subparsers) -> None:
    """Add ``embfast serve`` (flags mirror EMBFAST_* environment variables)."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible embedding server (FastAPI + uvicorn)",
                              description="Serve OpenAI's /v1/embeddings, TEI's /embed (and /rerank, /predict, "
                                          "/similarity, /tokenize, /decode, /info), Cohere's /v2/embed and "
                                          "/v2/rerank, /v1/search, /health, /metrics. Every "
                                          "flag has an EMBFAST_* environment variable (--max-wait-ms = "
                                          "EMBFAST_MAX_WAIT_MS).")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=_env("PORT", 8080), help="port (default 8080)")
    p.add_argument("--model", action="append", default=None,
                   help="a model to serve: a folder, an embfast export or a Hugging Face Hub id (org/name); repeat it "
                        "to serve several in one process (embedders, cross-encoders and sparse encoders, the kind read "
                        "from each folder; requests choose by their 'model' field or ?model=). Default: the bundled "
                        "all-MiniLM-L6-v2 (EMBFAST_MODEL: one, or several separated by commas)")
    p.add_argument("--served-model-name", action="append", default=None, metavar="NAME[,ALIAS...]",
                   help="the name(s) the i-th --model answers to, comma-separated (the first is what answers carry); "
                        "default: the model's own name (EMBFAST_SERVED_MODEL_NAME: for the first model)")
    p.add_argument("--reranker", default=_env("RERANKER"),
                   help="a cross-encoder folder for /rerank, /predict and /v1/rerank, next to --model")
    p.add_argument("--sparse", default=_env("SPARSE"), help="a sparse encoder (SPLADE) folder for /embed_sparse")
    p.add_argument("--device", default=_env("DEVICE", "cpu"), choices=["cpu", "cuda", "auto"])
    p.add_argument("--precision", default=_env("PRECISION", "fp32"), choices=["fp32", "int8", "fp16", "auto"])
    p.add_argument("--threads", type=int, default=_env("THREADS"),
                   help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--workers", default=_env("WORKERS", "auto"),
                   help="batches each model may run at once: N >= 1, or auto (default): 2 with dynamic batching on "
                        "the CPU when the models have 2 or more threads, else 1. With N > 1, under load N batches "
                        "run side by side on threads / N threads each (a second ONNX Runtime session: the model's "
                        "weights twice in memory), and a batch that would run alone still gets all the threads")
    p.add_argument("--max-batch-tokens", type=int, default=_env("MAX_BATCH_TOKENS", 16384),
                   help="padded tokens per ONNX Runtime batch (default 16384)")
    p.add_argument("--max-wait-ms", type=float, default=_env("MAX_WAIT_MS", 2.0),
                   help="an idle worker waits this long for more texts to merge (default 2 ms)")
    p.add_argument("--queue-policy", default=_env("QUEUE_POLICY", "deadline"), choices=["deadline", "oldest"],
                   help="which waiting texts the next batch serves: deadline (default; arrival plus the request's own "
                        "estimated run time, earliest first) or oldest (arrival order); see DynamicBatcher")
    p.add_argument("--lookahead-texts", type=int, default=_env("LOOKAHEAD_TEXTS"),
                   help="how many waiting texts, most urgent first, the batcher plans each batch from (texts of "
                        "similar length are grouped to save padding, so a younger text can overtake an older one "
                        "within them); default: DynamicBatcher's (32 on the CPU)")
    p.add_argument("--share-tokens", type=int, default=_env("SHARE_TOKENS", 128),
                   help="with several workers under a light load (at most 2 x workers x this many tokens queued), "
                        "a batch holds at most its worker's share of the queued tokens, and at least this many "
                        "padded tokens (default 128; 0: no split); see DynamicBatcher")
    p.add_argument("--call-cost-tokens", default=_env("CALL_COST_TOKENS"),
                   help="the batcher's fixed cost of one ONNX Runtime call in padded tokens, or 'auto' (fitted while "
                        "serving); default: DynamicBatcher's")
    p.add_argument("--max-queue", type=int, default=_env("MAX_QUEUE", 1024),
                   help="requests waiting or running before 429 (default 1024)")
    p.add_argument("--max-queue-texts", type=int, default=_env("MAX_QUEUE_TEXTS"),
                   help="texts waiting or running before 429 (default 32768); a request over 1/16 of it may fill "
                        "the queue only to 3/4; one request over all of it: 413")
    p.add_argument("--max-queue-tokens", type=int, default=_env("MAX_QUEUE_TOKENS"),
                   help="tokens waiting or running before 429 (default 4 x 2048 x max_seq_length: 2097152 for "
                        "all-MiniLM-L6-v2); same rules as --max-queue-texts")
    p.add_argument("--body-timeout-s", type=float, default=_env("BODY_TIMEOUT_S", DEFAULT_BODY_TIMEOUT_S),
                   help=f"a request body that sends nothing for this long gets 408 and its connection closed "
                        f"(default {DEFAULT_BODY_TIMEOUT_S:g} s; 0 = wait forever)")
    p.add_argument("--max-client-batch-size", type=int, default=_env("MAX_CLIENT_BATCH_SIZE", DEFAULT_MAX_INPUTS),
                   help=f"most texts (or documents to rerank) per request, as TEI (default {DEFAULT_MAX_INPUTS}); "
                        "more: 422")
    p.add_argument("--max-request-bytes", type=int, default=_env("MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES),
                   help="largest request body in bytes (default 2000000)")
    p.add_argument("--strict-requests", action=argparse.BooleanOptionalAction,
                   default=_env_flag("STRICT_REQUESTS", False),
                   help="refuse (422) request fields a route does not know; default: ignore them, logged once "
                        "per name, as TEI and vLLM do with what proxies and SDKs add")
    p.add_argument("--token-ids", default=_env("TOKEN_IDS"), metavar="model|tiktoken:ENCODING",
                   help="accept input given as token ids: 'model' = ids of this model's tokenizer, fed as they are; "
                        "'tiktoken:cl100k_base' = OpenAI ids (langchain-openai's default) decoded to text "
                        "(default: refuse them with a 422 that says how to send text)")
    p.add_argument("--api-key", default=_env("API_KEY"), help="require 'Authorization: Bearer KEY' (default: none)")
    p.add_argument("--corpus", default=_env("CORPUS"),
                   help="for /v1/search: an .npy file of (n, dim) embeddings, or an embfast index file")
    p.add_argument("--corpus-texts", default=_env("CORPUS_TEXTS"), help="the .npy corpus's texts, one per line")
    p.add_argument("--dynamic-batching", action=argparse.BooleanOptionalAction,
                   default=_env_flag("DYNAMIC_BATCHING", True),
                   help="merge concurrent requests into batches (default on; off = one request per ORT call)")
    p.add_argument("--shutdown-timeout-s", type=float, default=_env("SHUTDOWN_TIMEOUT_S", 30.0),
                   help="on SIGINT/SIGTERM, wait this long for in-flight requests (default 30 s)")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"),
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=_env_flag("ACCESS_LOG", False),
                   help="log every request (default off)")
    p.set_defaults(func=cmd_serve)


def _call_cost(value):
    """--call-cost-tokens: None, 'auto' or a number >= 0."""
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--call-cost-tokens must be a number >= 0 or 'auto', got {value!r}") from None


def _rss_bytes() -> int | None:
    """This process's resident memory (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def measured_load(load, spec, **kwargs):
    """``load(spec, **kwargs)`` with ``load_rss_bytes`` set on the model: the process RSS growth while it loaded
    (its ONNX Runtime session and weights; an export run on the way counts too), what /v1/models reports."""
    before = _rss_bytes()
    model = load(spec, **kwargs)
    after = _rss_bytes()
    model.load_rss_bytes = None if before is None or after is None else max(after - before, 0)
    return model


def cmd_serve(args) -> int:
    """Load the model, build the app, run uvicorn until SIGINT/SIGTERM (in-flight requests finish)."""
    # A server tokenizes many small inputs at once: the tokenizers' own thread pool and ORT's spinning
    # threads would only fight the worker for the cores (set either variable to override).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("EMBFAST_ORT_SPIN", "0")
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(f"embfast serve needs the server extra: pip install 'embfast[server]' ({exc})") from exc
    from embfast import CrossEncoder, SparseEncoder
    from embfast.server.rerank import load_served_model

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    t0 = time.perf_counter()
    workers = _parse_workers(args.workers)
    model_args = {"device": args.device, "precision": args.precision, "threads": args.threads}
    specs = args.model if args.model else [m.strip() for m in (_env("MODEL") or "").split(",") if m.strip()] or [None]
    names = list(args.served_model_name or ([_env("SERVED_MODEL_NAME")] if _env("SERVED_MODEL_NAME") else []))
    if len(names) > len(specs):
        raise ValueError(f"{len(names)} --served-model-name for {len(specs)} --model: give at most one per model")
    names += [None] * (len(specs) - len(names))
    loaded = [(measured_load(load_served_model, spec, **model_args), n) for spec, n in zip(specs, names, strict=True)]
    if args.reranker:
        loaded.append((measured_load(CrossEncoder, args.reranker, **model_args), None))
    if args.sparse:
        loaded.append((measured_load(SparseEncoder, args.sparse, **model_args), None))
    embedder = loaded[0][0]
    workers = _workers(workers, [m for m, _ in loaded], args.dynamic_batching)
    app = create_app(models=loaded, max_batch_tokens=args.max_batch_tokens,
                     max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, dynamic_batching=args.dynamic_batching,
                     call_cost_tokens=_call_cost(args.call_cost_tokens), queue_policy=args.queue_policy,
                     lookahead_texts=None if args.lookahead_texts is None else int(args.lookahead_texts),
                     share_tokens=int(args.share_tokens),
                     max_queue_texts=None if args.max_queue_texts is None else int(args.max_queue_texts),
                     max_queue_tokens=None if args.max_queue_tokens is None else int(args.max_queue_tokens),
                     body_timeout_s=float(args.body_timeout_s) or None,
                     max_request_bytes=args.max_request_bytes, api_key=args.api_key or None,
                     corpus=args.corpus, corpus_texts=args.corpus_texts, max_inputs=args.max_client_batch_size,
                     strict_requests=args.strict_requests, token_ids=args.token_ids, workers=workers)
    route = "/rerank" if isinstance(embedder, CrossEncoder) else "/v1/embeddings"
    served = " + ".join(f"{e.model!r} as {', '.join(map(repr, e.names))}" for e in app.state.registry)
    print(f"embfast serve: {served} ready in {time.perf_counter() - t0:.1f} s; "
          f"http://{args.host}:{args.port}{route}", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"embfast serve: warning: listening on {args.host} without --api-key", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
                timeout_graceful_shutdown=args.shutdown_timeout_s)
    return 0
