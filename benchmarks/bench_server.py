"""Embedding-server throughput and latency under concurrent clients: embfast (dynamic batching on / off)
and, when given, infinity side by side on the same model.

Each server runs as its own process (``embfast serve``; ``infinity_emb v2``);
this process is the load generator: ``--concurrency`` closed-loop clients
(asyncio + httpx, one connection each), each sending real sentences, either one
per request (a JSON string) or ``k`` per request (a list), for ``--duration-s``
seconds after ``--warmup-s`` of the same load. Every request carries
``{"input": ..., "model": ...}`` with ``encoding_format`` float, as OpenAI's
clients send to /v1/embeddings.

Prints one JSON line per (server, clients, texts per request) with requests/s,
texts/s, p50 / p99 / mean latency in ms and errors, then a markdown table. It
never asserts; timings are only meaningful on a quiet machine.

    python benchmarks/bench_server.py                          # embfast on vs off, 1/8/32/128 clients
    python benchmarks/bench_server.py --infinity /tmp/infinity-venv/bin/infinity_emb
    python benchmarks/bench_server.py --model /tmp/tiny --concurrency 1,8 --duration-s 1 --warmup-s 0.5  # smoke
    python benchmarks/bench_server.py --modes on,two-models,two-processes --concurrency 8,32,128
    python benchmarks/bench_server.py --load wrk --rounds 3     # wrk (apt-get install wrk) as the load generator
    # the HTTP layer's cost per request: each API family, the floors (uvicorn alone; httptools alone) and the same
    # load on an in-process batcher, in turn in every round (the cost is the median of the rounds' differences)
    python benchmarks/bench_server.py --modes on-w2,raw-w2,bare-w2 --apis openai,tei,cohere --in-process \
        --concurrency 1,32 --texts-per-request 1 --rounds 5 --load wrk --profile
    # the same with the model on a core of its own and HTTP on the other (--threads 1, one worker, pinned)
    python benchmarks/bench_server.py --modes on-w1,raw-w1 --threads 1 --pin-model-core --apis openai,tei,cohere \
        --in-process --concurrency 1,32 --texts-per-request 1 --rounds 5 --load wrk --profile

``--modes two-models`` serves the model twice in one ``embfast serve`` (``--model M --model M``, names a and
b; the two share the cores through one run lock), clients alternating between the names; ``two-processes``
runs two ``embfast serve`` processes, one model each with all the cores' threads (what three separate engines
for an embedder, a reranker and a sparse model do today), clients alternating between them. Both are compared
with ``on`` (one model, one process) at the same load: total texts/s.

infinity must live in its own environment (``python -m venv /tmp/infinity-venv &&
/tmp/infinity-venv/bin/pip install -c constraints.txt "infinity-emb[torch,server]"``):
it pins its own versions of packages embfast uses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SENTENCES = ROOT.parent / "shared" / "data" / "throughput" / "sentences.txt"


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be ints >= 1, got {text!r}")
    return values


# an on/off mode: on-w2-la16-bt128-st0-oldest and every shorter form (see parse_mode)
ON_OFF_MODE = r"(on|off)(-w[1-9][0-9]*)?(-la[1-9][0-9]*)?(-bt[1-9][0-9]*)?(-st[0-9]+)?(-oldest|-deadline)?"


def read_sentences(args, prog: str) -> tuple[Path, list[str]] | None:
    """``--sentences`` (its first ``--limit`` non-empty lines), with ``--model`` made absolute (the servers run
    from another folder); None, after saying why on stderr, when the file is missing."""
    path = Path(args.sentences)
    if not path.is_file():
        print(f"{prog}: sentences file not found: {path} (pass --sentences)", file=sys.stderr)
        return None
    with path.open(encoding="utf-8") as fh:
        sentences = [line.strip() for line in fh if line.strip()][: args.limit]
    if args.model and Path(args.model).exists():
        args.model = str(Path(args.model).resolve())
    return path, sentences


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", default=str(DEFAULT_SENTENCES), help="text file, one sentence per line")
    p.add_argument("--limit", type=int, default=20000, help="use the first N sentences (default 20000)")
    p.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--concurrency", type=_ints, default=[1, 8, 32, 128], help="clients (default 1,8,32,128)")
    p.add_argument("--texts-per-request", type=_ints, default=[1, 8],
                   help="sentences per request: 1 sends a string, k > 1 a list (default 1,8)")
    p.add_argument("--modes", default="on,off",
                   help="embfast servers: on (dynamic batching), off, two-models (two models in one process), "
                        "two-processes (one model each); on-wN / off-wN / two-models-wN: with --workers N (N "
                        "batches at once, each on cores / N threads); a suffix -laN sets that server's "
                        "--lookahead-texts (on-w2-la16), -btN its --max-batch-tokens (on-w2-bt128), -stN its "
                        "--share-tokens (on-w2-st0: no split); a suffix -oldest or -deadline sets that "
                        "server's --queue-policy (on-w2-oldest); bare-wN: benchmarks/bare_server.py, uvicorn and "
                        "the same batcher with no server code between (the floor of embfast's HTTP cost); "
                        "comma-separated (default on,off)")
    p.add_argument("--duration-s", type=float, default=15.0, help="measured seconds per point (default 15)")
    p.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds before each point (default 3)")
    p.add_argument("--threads", type=int, default=None, help="embfast ONNX Runtime threads (default: all cores)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="embfast --max-wait-ms (default 2)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="embfast --max-batch-tokens (default 16384)")
    p.add_argument("--queue-policy", default=None, choices=["deadline", "oldest"],
                   help="embfast servers' --queue-policy (default: theirs, deadline)")
    p.add_argument("--call-cost-tokens", default=None, help="embfast --call-cost-tokens (default: the server's)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"], help="embfast model precision")
    p.add_argument("--infinity", default=None,
                   help="path to the infinity_emb executable (its own venv); omitted: infinity is skipped")
    p.add_argument("--infinity-engine", default="torch", choices=["torch", "optimum"],
                   help="infinity backend (default torch, its default). optimum needs infinity-emb[optimum] and a "
                        "folder with model.onnx; infinity 0.0.78 + optimum 2.1 failed to load it here")
    p.add_argument("--infinity-batch-size", type=int, default=32, help="infinity --batch-size (default 32)")
    p.add_argument("--apis", default="openai",
                   help="API families to load embfast with (batching on): openai (/v1/embeddings), tei (/embed), "
                        "cohere (/v2/embed); comma-separated (default openai)")
    p.add_argument("--in-process", action="store_true",
                   help="also run the same load on a DynamicBatcher in this process (no HTTP), one per on/off[-wN] "
                        "mode: the HTTP layer's cost per request is each API's p50 minus this p50. With --rounds > 1 "
                        "the batchers take their turn in every round beside the servers, and the cost is the median "
                        "of the rounds' paired differences (the machine's speed drifts between rounds)")
    p.add_argument("--no-http", action="store_true",
                   help="with --in-process: skip the HTTP servers (the batcher alone, with a load generator that "
                        "costs next to nothing)")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="also run each on/off mode's server from another build of embfast installed in DIR (e.g. "
                        "`pip install --no-deps --target DIR` of an earlier commit; put first on the server's "
                        "PYTHONPATH), named embfast-...-baseline: old and new code measured in one run")
    p.add_argument("--pin-model-core", action="store_true",
                   help="run the model's batcher threads (embfast's and the bare servers' workers, the in-process "
                        "batcher's) on the last core and everything else (event loops, tokenizer threads, this "
                        "benchmark, wrk) on the others, so that the HTTP layer never takes the model's core: use "
                        "with --threads 1 and -w1 modes, to measure what HTTP adds when it does not compete for "
                        "the model's CPU (as on a GPU server or a host with cores to spare); Linux only")
    p.add_argument("--profile", action="store_true",
                   help="also say where the time goes (embfast servers, bare servers and the in-process batcher, "
                        "whose event loop is also its load generator): CPU seconds per request of each server "
                        "thread group (event loop, batcher worker, ONNX Runtime's pool, tokenizer pool) and of "
                        "the load generator, from /proc; batches, texts per batch, queue wait and planning time "
                        "from /metrics")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every point this many times; with more than one, all servers are started at once "
                        "and each round measures every server at a point before moving on, so drift on a shared "
                        "machine hits all of them alike, in an order rotated each round; the table gives each point's "
                        "median over the rounds")
    p.add_argument("--load", default="httpx", choices=["httpx", "wrk"],
                   help="load generator for HTTP servers: httpx (asyncio, this process; checks every answer's "
                        "vector count, but costs 1-50 ms of CPU per request on the same cores) or wrk (the C "
                        "tool, Debian's wrk, one thread, cycling the same bodies; counts non-2xx answers as "
                        "errors; a few microseconds per request, so the server gets the cores)")
    p.add_argument("--json-out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--startup-timeout-s", type=float, default=300.0, help="wait this long for a server to start")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    pattern = (ON_OFF_MODE + r"|two-models(-w[1-9][0-9]*)?"
               r"|two-processes"
               r"|(bare|raw)(-w[1-9][0-9]*)?")
    if not all(re.fullmatch(pattern, m) for m in modes):
        p.error(f"--modes must be a comma-separated list of on, off, on-wN, off-wN (each optionally -laN, -btN, "
                f"-stN, then -oldest or -deadline), two-models, two-models-wN, two-processes, bare, bare-wN, raw, "
                f"raw-wN, got {args.modes!r}")
    args.modes = modes
    if args.pin_model_core and (not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2):
        p.error("--pin-model-core needs Linux and at least 2 cores")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.load == "wrk" and "two-processes" in modes:
        p.error("--load wrk sends to one server; two-processes needs --load httpx")
    if args.load == "wrk" and shutil.which("wrk") is None:
        p.error("--load wrk needs the wrk binary (apt-get install wrk)")
    if args.duration_s <= 0 or args.warmup_s < 0:
        p.error("--duration-s must be > 0 and --warmup-s >= 0")
    return args


# ---- servers -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on 127.0.0.1; ``path`` is its embeddings route."""

    def __init__(self, name: str, cmd: list[str], port: int, path: str, model_name: str, env: dict | None = None,
                 extra: dict | None = None):
        self.name, self.cmd, self.port, self.path, self.model_name = name, cmd, port, path, model_name
        self.env = {**os.environ, **(env or {})}
        self.extra = extra or {}
        self.proc: subprocess.Popen | None = None
        self.log = Path(f"/tmp/bench_server_{name}_{port}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def targets(self) -> list[tuple[str, str]]:
        """(base url, model name) pairs; client c sends to ``targets[c % len(targets)]``."""
        return [(self.url, name) for name in self.extra.get("served_names", [self.model_name])]

    def start(self, timeout: float) -> None:
        import httpx

        # from a neutral folder: `python -m` puts the current folder first on sys.path, and a source checkout there
        # (this repository, without its compiled core) would shadow the installed package
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     cwd=tempfile.gettempdir())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}")
            try:
                r = httpx.post(self.url + self.path, json={"input": "warm up", "model": self.model_name}, timeout=30)
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def parse_mode(mode: str) -> dict:
    """An on/off mode (``on-w2-la16-st0-oldest``) as :func:`embfast_server`'s keyword arguments; a setting the mode
    does not name is None (the default)."""
    policy = next((p for p in ("oldest", "deadline") if mode.endswith("-" + p)), None)
    if policy:
        mode = mode[: -len(policy) - 1]
    mode, _, st = mode.partition("-st")
    mode, _, bt = mode.partition("-bt")
    mode, _, la = mode.partition("-la")
    batching, _, w = mode.partition("-w")
    return {"batching": batching == "on", "workers": int(w or 1), "queue_policy": policy,
            "lookahead": int(la) if la else None, "batch_tokens": int(bt) if bt else None,
            "share_tokens": int(st) if st else None}


def batcher_settings(args, queue_policy: str | None = None, lookahead: int | None = None,
                     batch_tokens: int | None = None, share_tokens: int | None = None) -> dict:
    """The batcher settings a result row records (a server's, or the in-process batcher's of the same mode): the
    token budget and queue policy always (None: the server's default policy), look-ahead and share only when set."""
    out = {"max_batch_tokens": batch_tokens or args.max_batch_tokens, "queue_policy": queue_policy or args.queue_policy}
    if lookahead is not None:
        out["lookahead_texts"] = lookahead
    if share_tokens is not None:
        out["share_tokens"] = share_tokens
    return out


def embfast_server(args, batching: bool, models: int = 1, workers: int = 1, baseline: str | None = None,
                   queue_policy: str | None = None, lookahead: int | None = None,
                   batch_tokens: int | None = None, share_tokens: int | None = None) -> Server:
    """``embfast serve``; ``models`` 2 serves the model twice in the process, as "a" and "b"; ``workers``:
    its ``--workers``; ``baseline``: a folder holding another build of embfast, run instead of this one;
    ``queue_policy``: its ``--queue-policy`` (default: ``--queue-policy``'s); ``lookahead``: its
    ``--lookahead-texts`` (default: the server's); ``batch_tokens``: its ``--max-batch-tokens`` (default:
    ``--max-batch-tokens``); ``share_tokens``: its ``--share-tokens`` (default: the server's)."""
    queue_policy = queue_policy or args.queue_policy
    batch_tokens = batch_tokens or args.max_batch_tokens
    port = free_port()
    cmd = [sys.executable, "-m", "embfast.cli", "serve", "--port", str(port), "--log-level", "warning",
           "--max-wait-ms", str(args.max_wait_ms), "--max-batch-tokens", str(batch_tokens),
           "--max-queue", "100000", "--precision", args.precision,
           "--dynamic-batching" if batching else "--no-dynamic-batching"]
    names = ["a", "b"][:models] if models > 1 else []
    for name in names:
        cmd += ["--model", args.model or str(_default_model()), "--served-model-name", name]
    if args.model and not names:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.call_cost_tokens is not None:
        cmd += ["--call-cost-tokens", str(args.call_cost_tokens)]
    if queue_policy is not None:
        cmd += ["--queue-policy", queue_policy]
    cmd += ["--workers", str(workers)]  # explicit: the server's default (auto) is 2 on a multi-core CPU
    if lookahead is not None:
        cmd += ["--lookahead-texts", str(lookahead)]
    if share_tokens is not None:
        cmd += ["--share-tokens", str(share_tokens)]
    extra = {"dynamic_batching": batching, "workers": workers, "max_wait_ms": args.max_wait_ms,
             "precision": args.precision, "call_cost_tokens": args.call_cost_tokens,
             **batcher_settings(args, queue_policy, lookahead, batch_tokens, share_tokens)}
    if names:
        extra.update(served_names=names, layout="two models, one process")
    env = {"EMBFAST_REQUIRE_NATIVE": "1"}  # the native kernels, as in-process: never a silent fallback
    if baseline:
        env["PYTHONPATH"] = os.pathsep.join([baseline, *filter(None, [os.environ.get("PYTHONPATH")])])
        extra["baseline"] = baseline
    tag = ("-baseline" if baseline else "") + (f"-{queue_policy}" if queue_policy else "") + \
        (f"-la{lookahead}" if lookahead is not None else "") + \
        (f"-bt{batch_tokens}" if batch_tokens != args.max_batch_tokens else "") + \
        (f"-st{share_tokens}" if share_tokens is not None else "")
    return Server(f"embfast-{'on' if batching else 'off'}-w{workers}{tag}", cmd, port,
                  "/v1/embeddings", names[0] if names else "embfast", env=env, extra=extra)


def bare_server(args, workers: int = 2, raw: bool = False) -> Server:
    """benchmarks/bare_server.py: uvicorn and the same batcher with no server code in between (the floor); ``raw``:
    its ``--raw`` server (httptools on uvloop, no ASGI server)."""
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).with_name("bare_server.py")), "--port", str(port), "--workers",
           str(workers), "--max-wait-ms", str(args.max_wait_ms), "--max-batch-tokens", str(args.max_batch_tokens),
           "--precision", args.precision] + (["--raw"] if raw else [])
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    layout = "httptools protocol, same batcher" if raw else "bare ASGI app, same batcher"
    return Server(f"{'raw' if raw else 'bare'}-w{workers}", cmd, port, "/v1/embeddings", "embfast",
                  env={"EMBFAST_REQUIRE_NATIVE": "1"},
                  extra={"dynamic_batching": True, "workers": workers, "layout": layout, **batcher_settings(args)})


def _default_model():
    from embfast.export import default_model_path

    return default_model_path()


class ServerGroup:
    """Several single-model servers measured as one: clients alternate between them."""

    def __init__(self, servers: list[Server], layout: str):
        self.servers = servers
        self.name = servers[0].name
        self.path = servers[0].path
        self.model_name = servers[0].model_name
        self.extra = {**servers[0].extra, "layout": layout}

    @property
    def targets(self) -> list[tuple[str, str]]:
        return [t for s in self.servers for t in s.targets]

    def start(self, timeout: float) -> None:
        for s in self.servers:
            s.start(timeout)

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


def infinity_server(args, model_dir: str) -> Server:
    port = free_port()
    cmd = [args.infinity, "v2", "--model-id", model_dir, "--served-model-name", "bench", "--engine",
           args.infinity_engine, "--device", "cpu", "--batch-size", str(args.infinity_batch_size), "--host",
           "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-model-warmup"]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
           "DO_NOT_TRACK": "1"}
    return Server("infinity", cmd, port, "/embeddings", "bench", env=env,
                  extra={"engine": args.infinity_engine, "batch_size": args.infinity_batch_size})


# ---- load -------------------------------------------------------------------------------------------
#: API family -> (path, request body for a chunk of texts, number of vectors in a 200 answer)
APIS = {
    "openai": ("/v1/embeddings", lambda chunk, model: {"input": chunk[0] if len(chunk) == 1 else chunk, "model": model,
                                                        "encoding_format": "float"},
               lambda body: len(body["data"])),
    "tei": ("/embed", lambda chunk, model: {"inputs": chunk[0] if len(chunk) == 1 else chunk}, len),
    "cohere": ("/v2/embed", lambda chunk, model: {"texts": chunk, "model": model, "input_type": "search_document",
                                                  "embedding_types": ["float"]},
               lambda body: len(body["embeddings"]["float"])),
}


async def run_inprocess(batcher, sentences: list[str], clients: int, k: int, seconds: float,
                        wrk_order: bool = False) -> dict:
    """The same closed-loop load on a DynamicBatcher in this process (asyncio callers, no HTTP). ``wrk_order``:
    the texts wrk sends (the first 2,000 chunks, cycled in order, one counter for all clients: see
    :func:`run_wrk`) instead of the httpx clients' (each client its own stride), so that the HTTP cost per
    request compares the same texts (the two orders differ by 1.5% in mean tokens per sentence)."""
    latencies: list[float] = []
    texts_done = 0
    counter = 0
    stop_at = time.perf_counter() + seconds

    async def client(c: int) -> None:
        nonlocal texts_done, counter
        i = c * 997
        while time.perf_counter() < stop_at:
            if wrk_order:
                b = counter % 2000
                counter += 1
                chunk = [sentences[(b * k + j) % len(sentences)] for j in range(k)]
            else:
                chunk = [sentences[(i + j) % len(sentences)] for j in range(k)]
                i += k * clients
            t0 = time.perf_counter()
            await batcher.encode_async(chunk[0] if k == 1 else chunk)
            latencies.append(time.perf_counter() - t0)
            texts_done += k

    t_start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return {"latencies": latencies, "errors": 0, "texts": texts_done, "seconds": time.perf_counter() - t_start}


async def run_load(server: Server, sentences: list[str], clients: int, k: int, seconds: float,
                   api: str = "openai") -> dict:
    """``clients`` closed-loop clients for ``seconds``; returns counts and latencies (seconds)."""
    import httpx

    latencies: list[float] = []
    errors = 0
    texts_done = 0
    stop_at = time.perf_counter() + seconds
    # one pool for all clients: one client object per simulated client measured costlier still for the load
    # generator at 128 clients (30-50 ms of CPU per request against 17-22)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        async def client(c: int) -> None:
            nonlocal errors, texts_done
            i = c * 997
            url, model_name = server.targets[c % len(server.targets)]
            while time.perf_counter() < stop_at:
                chunk = [sentences[(i + j) % len(sentences)] for j in range(k)]
                i += k * clients
                if api == "openai":
                    path, body = server.path, {"input": chunk[0] if k == 1 else chunk, "model": model_name,
                                               "encoding_format": "float"}
                    vectors = APIS["openai"][2]
                else:
                    path, make, vectors = APIS[api]
                    body = make(chunk, model_name)
                t0 = time.perf_counter()
                try:
                    r = await http.post(url + path, json=body)
                    ok = r.status_code == 200 and vectors(r.json()) == k
                except (httpx.HTTPError, ValueError, KeyError):
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                    texts_done += k
                else:
                    errors += 1

        t_start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - t_start
    return {"latencies": latencies, "errors": errors, "texts": texts_done, "seconds": elapsed}


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of ``pid``'s threads, by group: the main thread (the event loop), embfast's
    named threads (batcher worker, tokenizer pool) and the rest (ONNX Runtime's intra-op pool, mostly)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        seconds = (int(fields[11]) + int(fields[12])) / tick
        group = ("event loop" if task.name == str(pid) else "batcher worker" if comm.startswith("embfast-batch")
                 else "tokenizer pool" if comm.startswith("embfast-tok") else "ORT pool + other")
        out[group] = out.get(group, 0.0) + seconds
    return out


def model_core() -> tuple[set[int], set[int]]:
    """(the model's core, the others) for --pin-model-core: the last core, and all before it."""
    cores = set(range(os.cpu_count() or 1))
    return {max(cores)}, cores - {max(cores)}


def pin_model_core(pid: int) -> None:
    """Pin ``pid``'s batcher worker threads (OS names ``embfast-batch*``) to the model's core and its other threads
    to the rest (a worker starts with its first request: call after a warm-up)."""
    model, rest = model_core()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            os.sched_setaffinity(int(task.name), model if comm.startswith("embfast-batch") else rest)
        except (OSError, ValueError):  # the thread ended meanwhile
            continue


def _metric_sums(url: str) -> dict[str, float]:
    """Totals from embfast's /metrics: batches, texts, batch seconds, queue wait, planning, request seconds."""
    import httpx

    want = {"embfast_batch_texts_count": "batches", "embfast_batch_texts_sum": "texts",
            "embfast_batch_duration_seconds_sum": "batch_s", "embfast_queue_wait_seconds_sum": "wait_s",
            "embfast_batch_planning_seconds_total": "plan_s"}
    out = dict.fromkeys(want.values(), 0.0) | {"server_request_s": 0.0, "server_requests": 0.0}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if name in want:
            out[want[name]] += float(value)
        elif name.startswith("embfast_request_duration_seconds_sum") and "/v1/embeddings" in name:
            out["server_request_s"] += float(value)
        elif name.startswith("embfast_request_duration_seconds_count") and "/v1/embeddings" in name:
            out["server_requests"] += float(value)
    return out


def _profile(server, before: dict, after: dict, requests: int) -> dict:
    """Per-request CPU milliseconds by thread group, and batch figures, between two snapshots."""
    n = max(requests, 1)
    cpu = {g: round((after["cpu"].get(g, 0.0) - before["cpu"].get(g, 0.0)) * 1000 / n, 3) for g in after["cpu"]}
    if before["http"]:  # in process, the load generator is the event loop (and the process is the server)
        cpu["load generator"] = round((after["self"] - before["self"]) * 1000 / n, 3)
    m = {k: after["metrics"][k] - before["metrics"][k] for k in after["metrics"]}
    if not m:  # a server without embfast's /metrics (bare), or the in-process batcher: its threads' CPU only
        return {"cpu_ms_per_request": cpu}
    batches = max(m["batches"], 1)
    return {"cpu_ms_per_request": cpu,
            "batches": int(m["batches"]), "texts_per_batch": round(m["texts"] / batches, 1),
            "batch_ms": round(m["batch_s"] * 1000 / batches, 2),
            "queue_wait_ms": round(m["wait_s"] * 1000 / batches, 1),
            "plan_ms": round(m["plan_s"] * 1000 / batches, 3),
            "server_ms_per_request": round(m["server_request_s"] * 1000 / max(m["server_requests"], 1), 1),
            "ort_busy": round(m["batch_s"] / max(after["wall"] - before["wall"], 1e-9), 3)}


def _snapshot(server) -> dict:
    """CPU by thread group of the server's process (this one for the in-process batcher, whose event loop is the
    load generator's too), this process's own CPU, embfast's /metrics totals (embfast servers only)."""
    t = os.times()
    http = isinstance(server, Server)
    return {"cpu": _thread_cpu(server.proc.pid if http else os.getpid()), "self": t.user + t.system,
            "metrics": _metric_sums(server.url) if http and server.name.startswith("embfast") else {},
            "wall": time.perf_counter(), "http": http}


_WRK_SCRIPT = """
bodies = {%(bodies)s}
counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  counter = counter + 1
  return wrk.format(nil, "%(path)s", nil, bodies[(counter %% #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, '
    .. '"mean_us": %%.1f, "non2xx": %%d, "socket_errors": %%d}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.mean, e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def rotated(items: list, n: int) -> list:
    """``items`` rotated left by ``n`` (round n's turn order)."""
    n = n % len(items) if items else 0
    return items[n:] + items[:n]


def wait_idle(server: Server, timeout: float = 600.0) -> float:
    """Wait until the server has no request in flight and no batch running (embfast's /metrics); returns the
    seconds waited. wrk closes its connections at the end of a run with requests still queued: the server
    cancels those, but batches already running finish (at 512 clients x 8 texts, up to a second each); without
    this, the next point would start behind them."""
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        busy = 0.0
        for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
            if line.startswith(("embfast_inflight_requests", "embfast_running_batches")):
                busy += float(line.rsplit(" ", 1)[1])
        if busy == 0:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} still busy after {timeout} s")


def run_wrk(server: Server, sentences: list[str], clients: int, k: int, seconds: float, api: str = "openai") -> dict:
    """The same closed-loop load from wrk (one thread, ``clients`` connections): 2,000 bodies (chunk b holds
    sentences b*k .. b*k+k-1), cycled in order (the in-process load sends the same with ``wrk_order``); model
    names alternate per request as the clients do.
    Returns counts and the latency summary (ms): wrk keeps no per-request list."""
    names = [name for _, name in server.targets]
    path, make = (server.path, APIS["openai"][1]) if api == "openai" else APIS[api][:2]
    bodies = []
    for b in range(2000):
        chunk = [sentences[(b * k + j) % len(sentences)] for j in range(k)]
        text = json.dumps(make(chunk, names[b % len(names)]))
        bodies.append("[==[" + text + "]==]")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(_WRK_SCRIPT % {"bodies": ",\n".join(bodies), "path": path})
        script = fh.name
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "120s",
                              "-s", script, server.targets[0][0]], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script)
    if server.name.startswith("embfast"):
        wait_idle(server)
    line = next((ln for ln in out.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    w = json.loads(line[len("WRKJSON "):])
    ok = w["requests"] - w["non2xx"]
    return {"ok": ok, "errors": w["non2xx"] + w["socket_errors"], "texts": ok * k, "seconds": w["duration_us"] / 1e6,
            "p50_ms": w["p50_us"] / 1000, "p99_ms": w["p99_us"] / 1000, "mean_ms": w["mean_us"] / 1000}


def measure(server, sentences: list[str], clients: int, k: int, args, api: str = "openai") -> dict:
    """One point: ``server`` a Server (HTTP, through ``api``) or a DynamicBatcher (in-process)."""
    import numpy as np

    wrk = getattr(args, "load", "httpx") == "wrk" and isinstance(server, Server)
    if isinstance(server, (Server, ServerGroup)):
        name, extra = server.name.split("-")[0], {**server.extra, "api": api}
        if wrk:  # returns the latency summary (wrk keeps no per-request list)
            def run(seconds):
                return run_wrk(server, sentences, clients, k, seconds, api)
        else:
            def run(seconds):
                return asyncio.run(run_load(server, sentences, clients, k, seconds, api))
    else:
        name, extra = "in-process", {"dynamic_batching": server.merge_requests, "workers": server.workers,
                                     "api": "python", **getattr(server, "bench_settings", {})}

        def run(seconds):
            return asyncio.run(run_inprocess(server, sentences, clients, k, seconds, wrk_order=args.load == "wrk"))
    if args.warmup_s > 0:
        run(args.warmup_s)
    if getattr(args, "pin_model_core", False) and not isinstance(server, ServerGroup):
        pin_model_core(server.proc.pid if isinstance(server, Server) else os.getpid())
    profiling = getattr(args, "profile", False) and (name in ("embfast", "bare", "raw", "in-process"))
    before = _snapshot(server) if profiling else None
    res = run(args.duration_s)
    if wrk:
        n, p50, p99, mean = res["ok"], res["p50_ms"], res["p99_ms"], res["mean_ms"]
    else:
        lat = np.array(res["latencies"]) * 1000
        n = len(lat)
        p50, p99, mean = ((float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), float(lat.mean()))
                          if n else (None, None, None))
    if profiling:
        extra = {**extra, "profile": _profile(server, before, _snapshot(server), n)}
    return {
        "bench": "server", "server": name, **extra,
        "load": "wrk" if wrk else ("httpx" if name != "in-process" else "python"), "concurrency": clients,
        "texts_per_request": k, "requests": n, "errors": res["errors"], "seconds": round(res["seconds"], 3),
        "requests_per_s": round(n / res["seconds"], 2), "texts_per_s": round(res["texts"] / res["seconds"], 2),
        **{key: round(v, 2) if n and v is not None else None
           for key, v in (("p50_ms", p50), ("p99_ms", p99), ("mean_ms", mean))},
    }


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"cpu": cpu, "cores": cores, "python": platform.python_version()}


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (server, layout, API, clients, texts per request): the median of each figure over the rounds,
    with ``rounds`` (how many) and ``texts_per_s_range`` ([min, max])."""
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    paired = paired_http_cost(rows) if all("round" in r for r in rows) else {}
    out = []
    for key, group in groups.items():
        row = {k: v for k, v in group[0].items() if k not in ("round", "profile")}
        for name in ("requests_per_s", "texts_per_s", "p50_ms", "p99_ms", "mean_ms"):
            vals = [r[name] for r in group if r.get(name) is not None]
            row[name] = round(float(np.median(vals)), 2) if vals else None
        row["requests"] = sum(r["requests"] for r in group)
        row["errors"] = sum(r["errors"] for r in group)
        row["rounds"] = len(group)
        row["texts_per_s_range"] = [min(r["texts_per_s"] for r in group), max(r["texts_per_s"] for r in group)]
        if paired.get(key):
            row["http_cost_ms"] = round(float(np.median(paired[key])), 2)
            row["http_cost_ms_range"] = [round(min(paired[key]), 2), round(max(paired[key]), 2)]
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    out = ["| server | API | batching | models | clients | texts/req | req/s | texts/s | p50 ms | p99 ms | errors |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    one = {(r["concurrency"], r["texts_per_request"]): r["texts_per_s"] for r in rows
           if r["server"] == "embfast" and r.get("dynamic_batching") and "layout" not in r and r.get("workers", 1) == 1
           and r.get("api", "openai") == "openai" and not r.get("baseline")}
    for r in rows:
        batching = {True: "on", False: "off"}.get(r.get("dynamic_batching"), f"batch {r.get('batch_size', '-')}")
        if r.get("workers", 1) > 1:
            batching += f" ({r['workers']} workers)"
        layout = r.get("layout", "one")
        base = one.get((r["concurrency"], r["texts_per_request"]))
        if "layout" in r and base:
            layout += f" ({r['texts_per_s'] / base:.0%} of one)"
        out.append(f"| {_label(r)} | {r.get('api', 'openai')} | {batching} | {layout} | {r['concurrency']} | "
                   f"{r['texts_per_request']} | {r['requests_per_s']} | {r['texts_per_s']} | {r['p50_ms']} | "
                   f"{r['p99_ms']} | {r['errors']} |")
    base = {(r["concurrency"], r["texts_per_request"]): r["p50_ms"] for r in rows if r["server"] == "in-process"}
    extra = []
    for r in rows:
        point = (r["concurrency"], r["texts_per_request"])
        if r["server"] not in ("embfast", "bare", "raw") or not r.get("dynamic_batching") or point not in base \
                or r["p50_ms"] is None:
            continue
        what = (f"- HTTP cost per request ({_label(r)} {r['api']}, "
                f"{r['concurrency']} clients, {r['texts_per_request']} text(s)): ")
        if r.get("http_cost_ms") is not None:  # rounds paired with the in-process batcher's
            lo, hi = r["http_cost_ms_range"]
            extra.append(what + f"{r['http_cost_ms']:.2f} ms, the median of {r['rounds']} rounds' p50 minus "
                         f"in-process p50 [{lo:.2f} to {hi:.2f}]")
        else:
            extra.append(what + f"p50 {r['p50_ms']} - {base[point]} = {r['p50_ms'] - base[point]:.2f} ms")
    return "\n".join(out + ([""] + extra if extra else []))


def _label(r: dict) -> str:
    """A row's server and the settings it was given: ``embfast (oldest) (share tokens 0)``."""
    return r["server"] + (" (baseline)" if r.get("baseline") else "") + \
        (f" ({r['queue_policy']})" if r.get("queue_policy") else "") + \
        (f" (look-ahead {r['lookahead_texts']})" if r.get("lookahead_texts") else "") + \
        (f" (batch tokens {r['max_batch_tokens']})" if r.get("max_batch_tokens", 16384) != 16384 else "") + \
        (f" (share tokens {r['share_tokens']})" if r.get("share_tokens") is not None else "")


def paired_http_cost(rows: list[dict]) -> dict[tuple, list[float]]:
    """Each HTTP server's p50 minus the in-process batcher's of the same round, batcher settings (batching,
    workers, token budget, policy, look-ahead, share), clients and texts per request: {median_rows key: [ms per
    round]}."""
    def pair(r):
        return (r.get("dynamic_batching"), r.get("workers"), r.get("max_batch_tokens"), r.get("queue_policy"),
                r.get("lookahead_texts"), r.get("share_tokens"), r["concurrency"], r["texts_per_request"],
                r.get("round"))

    inproc = {pair(r): r["p50_ms"] for r in rows if r["server"] == "in-process" and r.get("p50_ms") is not None}
    out: dict[tuple, list[float]] = {}
    for r in rows:
        base = inproc.get(pair(r))
        if r["server"] != "in-process" and base is not None and r.get("p50_ms") is not None:
            out.setdefault(_group_key(r), []).append(r["p50_ms"] - base)
    return out


def _group_key(r: dict) -> tuple:
    return (r["server"], r.get("dynamic_batching"), r.get("workers"), r.get("layout"), r.get("api"),
            r.get("baseline"), r.get("queue_policy"), r.get("lookahead_texts"), r.get("max_batch_tokens"),
            r.get("share_tokens"), r["concurrency"], r["texts_per_request"])


def main(argv=None) -> int:
    args = parse_args(argv)
    from embfast import build_info
    from embfast.export import default_model_path

    read = read_sentences(args, "bench_server")
    if read is None:
        return 2
    path, sentences = read
    model_dir = args.model or str(default_model_path())
    if args.pin_model_core:  # this process, and so every server and wrk it starts, off the model's core
        os.sched_setaffinity(0, model_core()[1])
    header = {"bench": "server", "machine": machine(), "build": build_info(), "model": model_dir,
              "sentences": str(path), "n_sentences": len(sentences), "duration_s": args.duration_s,
              "warmup_s": args.warmup_s, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    print(json.dumps(header), flush=True)
    servers: list = []
    for mode in args.modes:
        if mode.startswith(("on", "off")):
            servers.append(embfast_server(args, **parse_mode(mode)))
            if args.baseline:
                servers.append(embfast_server(args, **parse_mode(mode), baseline=args.baseline))
        elif mode.startswith(("bare", "raw")):
            servers.append(bare_server(args, workers=int(mode.partition("-w")[2] or 2), raw=mode.startswith("raw")))
        elif mode.startswith("two-models"):
            servers.append(embfast_server(args, True, models=2, workers=int(mode.partition("-w")[2] or 1)))
        else:
            servers.append(ServerGroup([embfast_server(args, True), embfast_server(args, True)],
                                       "two processes"))
    if args.infinity:
        if Path(args.infinity).is_file():
            servers.append(infinity_server(args, model_dir))
        else:
            print(json.dumps({"bench": "server", "skipped": "infinity", "why": f"{args.infinity} not found"}))
    if args.no_http:
        if not args.in_process:
            print("bench_server: --no-http needs --in-process", file=sys.stderr)
            return 2
        servers = []
    rows: list[dict] = []
    out = open(args.json_out, "a", encoding="utf-8") if args.json_out else None  # noqa: SIM115
    try:
        if out:
            out.write(json.dumps(header) + "\n")

        def emit(row):
            rows.append(row)
            print(json.dumps(row), flush=True)
            if out:
                out.write(json.dumps(row) + "\n")

        def apis_of(server):
            extra = getattr(server, "extra", {})  # (a DynamicBatcher has none: in-process, no API)
            return args.apis.split(",") if extra.get("dynamic_batching") and "layout" not in extra else ["openai"]

        def inprocess_batchers() -> list:
            from embfast import DynamicBatcher, Embedder

            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the settings `embfast serve` runs with
            os.environ.setdefault("EMBFAST_ORT_SPIN", "0")
            model = Embedder(args.model, precision=args.precision, threads=args.threads) if args.model else \
                Embedder(precision=args.precision, threads=args.threads)
            made = []
            for mode in [m for m in args.modes if m.startswith(("on", "off"))] or ["on"]:
                m = parse_mode(mode)  # the same settings as that mode's server
                settings = batcher_settings(args, m["queue_policy"], m["lookahead"], m["batch_tokens"],
                                            m["share_tokens"])
                options = {"queue_policy": settings["queue_policy"], "lookahead_texts": m["lookahead"],
                           "share_tokens": m["share_tokens"]}
                b = DynamicBatcher(model, max_batch_tokens=settings["max_batch_tokens"],
                                   max_wait_ms=args.max_wait_ms, max_queue=100000, merge_requests=m["batching"],
                                   workers=m["workers"], **{k: v for k, v in options.items() if v is not None})
                b.bench_settings = settings  # recorded in its rows, to pair them with the same mode's server
                made.append(b)
            return made

        # With rounds, the in-process batchers take their turn in each round beside the servers (idle servers
        # sleep): the HTTP cost is then a difference within one round, not between runs minutes apart.
        interleaved = args.in_process and args.rounds > 1 and bool(servers)

        if args.rounds == 1:  # one server at a time: the others hold no memory meanwhile
            for server in servers:
                try:
                    server.start(args.startup_timeout_s)
                except RuntimeError as exc:
                    print(json.dumps({"bench": "server", "skipped": server.name, "why": str(exc)}), flush=True)
                    continue
                try:
                    for api in apis_of(server):
                        for k in args.texts_per_request:
                            for clients in args.concurrency:
                                emit(measure(server, sentences, clients, k, args, api))
                finally:
                    server.stop()
        else:  # all servers up (idle ones sleep), every point measured on each in turn, round after round; the
            # turn order rotates each round: whichever server came first at a point was the slowest there at one
            # client in 7 of 9 rounds (3-8%; whatever the mode), so a fixed order favoured the later modes
            running, inproc = [], []
            try:
                for server in servers:
                    try:
                        server.start(args.startup_timeout_s)
                        running.append(server)
                    except RuntimeError as exc:
                        print(json.dumps({"bench": "server", "skipped": server.name, "why": str(exc)}), flush=True)
                inproc = inprocess_batchers() if interleaved else []
                running += inproc
                for rnd in range(args.rounds):
                    for k in args.texts_per_request:
                        for clients in args.concurrency:
                            for server in rotated(running, rnd):
                                for api in apis_of(server):
                                    emit({**measure(server, sentences, clients, k, args, api), "round": rnd})
            finally:
                for server in running:
                    server.close() if server in inproc else server.stop()
            rows[:] = median_rows(rows)
            for row in rows:
                print(json.dumps({**row, "aggregate": "median"}), flush=True)
                if out:
                    out.write(json.dumps({**row, "aggregate": "median"}) + "\n")
        if args.in_process and not interleaved:  # after the servers stopped: the cores are this process's alone
            batchers = inprocess_batchers()
            try:
                for rnd in range(args.rounds):
                    for k in args.texts_per_request:
                        for clients in args.concurrency:
                            for batcher in rotated(batchers, rnd):
                                emit({**measure(batcher, sentences, clients, k, args), "round": rnd})
            finally:
                for batcher in batchers:
                    batcher.close()
            if args.rounds > 1:
                inproc = [r for r in rows if r["server"] == "in-process"]
                rows[:] = [r for r in rows if r["server"] != "in-process"] + median_rows(inproc)
    finally:
        if out:
            out.close()
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
