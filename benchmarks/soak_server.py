"""Soak and fault test of ``embfast serve``: a bounded run of many clients with a realistic mix of good, bad and
broken requests, every answer checked, the server's memory and file descriptors watched.

The server runs as a subprocess (``embfast serve``, the bundled all-MiniLM-L6-v2 unless ``--model``) on a free
127.0.0.1 port; nothing leaves the machine. ``--clients`` closed-loop clients (asyncio + httpx, one connection
each) send, for ``--duration-s`` seconds:

- single queries (a JSON string) and batches of 1-64 texts (a list), to OpenAI's /v1/embeddings and TEI's /embed;
  every 200 answer is checked row by row against this process's own ``Embedder.encode`` of the same texts
  (cosine >= 0.9999; reference vectors computed once per text before the load starts);
- 5 % bad requests (invalid JSON, empty or mistyped input, an over-long text with truncate false, a lone
  surrogate, unknown routes, wrong methods, too many inputs): each must get a 4xx;
- 2 % clients that disconnect mid-request (raw sockets: half a body then close, or a whole request then close
  before the answer): the server must shrug them off (its /metrics must show no 5xx);
- ``--slow-clients`` clients that start an upload and stop sending (headers and part of a body, or headers only):
  the server must answer 408 after ``--body-timeout-s`` and close the connection, so a stalled upload holds
  nothing.

Every ``--sample-s`` the server's RSS (/proc/PID/status VmRSS), open file descriptors (/proc/PID/fd) and threads are
sampled. Reported: requests served, status counts, mismatches, 5xx (client side and the server's own counters),
RSS at ``--baseline-s`` (minute 1) and at the end (growth), descriptors before the load, during and after the
clients closed, p50 / p99 latency of the 200 answers that finished in each ``--bucket-s`` (minute; the last
bucket also holds the requests that were in flight at the end), with RSS and descriptors at its end. Prints a
JSON document (also written to ``--out``) and a markdown table; with ``--check`` exits 1 when a check fails.

    python benchmarks/soak_server.py                                   # 10 minutes, 64 clients
    python benchmarks/soak_server.py --duration-s 30 --clients 8 --body-timeout-s 2 --baseline-s 10 --bucket-s 10

Latencies depend on the machine and what else runs on it; the checks do not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SENTENCES = ROOT.parent / "shared" / "data" / "throughput" / "sentences.txt"
BAD_SHARE = 0.05
DISCONNECT_SHARE = 0.02
TEI_SHARE = 0.2  # good requests sent to TEI's /embed instead of OpenAI's /v1/embeddings
SINGLE_SHARE = 0.4  # good requests that are one query (a JSON string)
MIN_COSINE = 0.9999
# Fallback texts when the sentences file is missing: varied lengths and scripts.
_WORDS = ("the cat sat on a mat while markets fell sharply and Tokyo is the capital of Japan; "
          "Привет как дела 東京は日本の首都です def f(x): return x * 2 🙂").split()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration-s", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--clients", type=int, default=64, help="closed-loop clients (default 64)")
    p.add_argument("--slow-clients", type=int, default=3,
                   help="clients that start uploads and stop sending, in a loop (default 3)")
    p.add_argument("--body-timeout-s", type=float, default=10.0, help="the server's --body-timeout-s (default 10)")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--threads", type=int, default=None, help="the server's ONNX Runtime threads (default: all cores)")
    p.add_argument("--sentences", default=str(DEFAULT_SENTENCES),
                   help="text file, one sentence per line (missing: generated texts)")
    p.add_argument("--pool", type=int, default=2000, help="distinct texts the clients draw from (default 2000)")
    p.add_argument("--sample-s", type=float, default=1.0, help="RSS / descriptor sampling interval (default 1 s)")
    p.add_argument("--baseline-s", type=float, default=60.0,
                   help="RSS growth is measured from this time into the run (default 60: minute 1), at most a third "
                        "of the run")
    p.add_argument("--bucket-s", type=float, default=60.0, help="latency percentiles per bucket (default 60 s)")
    p.add_argument("--bad-share", type=float, default=BAD_SHARE, help="share of bad requests (default 0.05)")
    p.add_argument("--disconnect-share", type=float, default=DISCONNECT_SHARE,
                   help="share of requests whose client hangs up mid-request (default 0.02)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="exit 1 when a check fails")
    args = p.parse_args(argv)
    if not (0 <= args.bad_share and 0 <= args.disconnect_share and args.bad_share + args.disconnect_share < 1):
        p.error("--bad-share and --disconnect-share must be >= 0 and sum to less than 1")
    if args.duration_s <= 0 or args.clients < 1 or args.slow_clients < 0 or args.body_timeout_s <= 0:
        p.error("--duration-s and --body-timeout-s must be > 0, --clients >= 1, --slow-clients >= 0")
    return args


# ---- the server -------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int, log_path: Path) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "embfast.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--body-timeout-s", str(args.body_timeout_s)]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    # run outside any source checkout, so the installed package (with its compiled core) is the one imported
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"embfast serve exited with {proc.returncode}; see {log_path}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=10).status_code == 200:
                return proc
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"embfast serve did not become ready in 300 s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sample_proc(pid: int) -> dict:
    """RSS (MiB), open descriptors and threads of ``pid`` from /proc."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return {"rss_mib": round(rss, 1), "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads}


# ---- texts and references -----------------------------------------------------------------------------------
def load_texts(args) -> list[str]:
    rng = random.Random(args.seed)
    path = Path(args.sentences)
    if path.is_file():
        with path.open(encoding="utf-8") as fh:
            lines = [line.strip() for line in fh if line.strip()]
        rng.shuffle(lines)
        short = lines[: args.pool]
    else:
        short = [" ".join(rng.choices(_WORDS, k=rng.randint(2, 40))) for _ in range(args.pool)]
    # a tenth of the pool: long texts (several sentences), some cut at max_seq_length
    longs = [" ".join(rng.sample(short, min(len(short), rng.randint(5, 25)))) for _ in range(max(1, args.pool // 10))]
    return list(dict.fromkeys(short + longs))


def reference_vectors(args, texts: list[str]) -> np.ndarray:
    from embfast import Embedder

    model = Embedder(args.model, precision="fp32")  # the server's default precision; None: the bundled model
    ref = model.encode(texts, normalize_embeddings=True)
    return np.asarray(ref, dtype=np.float32)


# ---- the clients --------------------------------------------------------------------------------------------
def bad_requests(long_text: str) -> list[tuple[str, str, bytes | None, str]]:
    """(method, path, body, what): each must get a 4xx."""
    j = json.dumps
    return [
        ("POST", "/v1/embeddings", b'{"input": ["unterminated', "invalid JSON"),
        ("POST", "/v1/embeddings", j({"input": ""}).encode(), "empty input"),
        ("POST", "/v1/embeddings", j({"input": []}).encode(), "empty list"),
        ("POST", "/v1/embeddings", j({"input": ["ok", 3.5]}).encode(), "a number among the texts"),
        ("POST", "/v1/embeddings", j({"input": "x", "dimensions": 0}).encode(), "dimensions 0"),
        ("POST", "/v1/embeddings", j({"input": long_text, "truncate": False}).encode(), "too long, truncate false"),
        ("POST", "/v1/embeddings", b'{"input": "\\ud800 lone surrogate"}', "lone surrogate"),
        ("POST", "/v1/embeddings", j({"input": ["x"] * 3000}).encode(), "too many inputs"),
        ("POST", "/v1/embeddings", b"[1, 2, 3]", "not an object"),
        ("POST", "/embed", j({"inputs": 5}).encode(), "TEI inputs a number"),
        ("POST", "/v1/nothing", j({"input": "x"}).encode(), "unknown route"),
        ("GET", "/v1/embeddings", None, "wrong method"),
    ]


class Stats:
    def __init__(self):
        self.records: list[tuple[float, float, int, str]] = []  # (t since start, seconds, status, kind)
        self.mismatches: list[dict] = []
        self.bad_not_4xx: list[dict] = []
        self.transport_errors: dict[str, int] = {}
        self.slow: list[dict] = []  # one per stalled upload: status, seconds until the answer
        self.disconnects = 0
        self.checked_rows = 0
        self.min_cosine = 1.0

    def error(self, kind: str, exc: BaseException) -> None:
        key = f"{kind}: {type(exc).__name__}"
        self.transport_errors[key] = self.transport_errors.get(key, 0) + 1


def check_rows(stats: Stats, got: list, idx: list[int], ref: np.ndarray, what: str) -> None:
    vecs = np.asarray(got, dtype=np.float32)
    if vecs.shape != (len(idx), ref.shape[1]):
        stats.mismatches.append({"what": what, "shape": list(vecs.shape), "expected": [len(idx), ref.shape[1]]})
        return
    vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    cos = (vecs * ref[idx]).sum(1)
    stats.checked_rows += len(idx)
    low = float(cos.min())
    stats.min_cosine = min(stats.min_cosine, low)
    if low < MIN_COSINE:
        stats.mismatches.append({"what": what, "min_cosine": low, "row": int(np.argmin(cos))})


async def raw_exchange(port: int, head: bytes, body: bytes, *, close_after_send: bool, timeout: float) -> bytes:
    """Send ``head + body`` on a fresh connection; return what the server answers before closing (b"" when
    ``close_after_send``: the client hangs up instead)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        if close_after_send:
            return b""
        out = b""
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
        return out
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def request_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {length}\r\n\r\n").encode()


async def good_client(cid: int, url: str, port: int, texts: list[str], ref: np.ndarray, stats: Stats,
                      t0: float, stop: float, args) -> None:
    import httpx

    rng = random.Random(args.seed * 1000 + cid)
    bad = bad_requests(texts[-1] + " " + " ".join(texts[:40]))
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        while time.monotonic() < stop:
            roll = rng.random()
            t = time.monotonic()
            if roll < args.bad_share:
                method, path, body, what = rng.choice(bad)
                try:
                    r = await client.request(method, path, content=body,
                                             headers={"content-type": "application/json"})
                except httpx.HTTPError as exc:
                    stats.error("bad", exc)
                    continue
                stats.records.append((t - t0, time.monotonic() - t, r.status_code, "bad"))
                if not 400 <= r.status_code < 500:
                    stats.bad_not_4xx.append({"what": what, "status": r.status_code, "body": r.text[:200]})
                continue
            if roll < args.bad_share + args.disconnect_share:
                idx = rng.sample(range(len(texts)), rng.randint(1, 64))
                body = json.dumps({"input": [texts[i] for i in idx]}).encode()
                mid_body = rng.random() < 0.5
                try:  # half a body then hang up, or the whole request then hang up before the answer
                    await raw_exchange(port, request_head("/v1/embeddings", len(body)),
                                       body[: len(body) // 2] if mid_body else body, close_after_send=True,
                                       timeout=10)
                    stats.disconnects += 1
                except OSError as exc:
                    stats.error("disconnect", exc)
                continue
            n = 1 if rng.random() < SINGLE_SHARE else rng.randint(1, 64)
            idx = [rng.randrange(len(texts)) for _ in range(n)]
            tei = rng.random() < TEI_SHARE
            single = n == 1 and rng.random() < 0.5
            value = texts[idx[0]] if single else [texts[i] for i in idx]
            path, body = ("/embed", {"inputs": value}) if tei else ("/v1/embeddings", {"input": value})
            try:
                r = await client.post(path, json=body)
            except httpx.HTTPError as exc:
                stats.error("good", exc)
                continue
            stats.records.append((t - t0, time.monotonic() - t, r.status_code, "good"))
            if r.status_code == 200:
                data = r.json()
                rows = data if tei else [d["embedding"] for d in data["data"]]
                check_rows(stats, rows, idx, ref, path)


async def slow_client(cid: int, port: int, stats: Stats, body_timeout: float, stop: float) -> None:
    """Start an upload, stop sending, and time the server's answer (it must be 408, then a closed connection)."""
    rng = random.Random(cid)
    body = json.dumps({"input": ["a text that never finishes arriving"] * 20}).encode()
    while time.monotonic() + body_timeout < stop:
        sent = body[: rng.randint(1, len(body) - 1)] if rng.random() < 0.7 else b""
        t = time.monotonic()
        try:
            answer = await raw_exchange(port, request_head("/v1/embeddings", len(body)), sent,
                                        close_after_send=False, timeout=body_timeout + 30)
            status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
        except (OSError, TimeoutError) as exc:
            stats.error("slow", exc)
            status = -1
        stats.slow.append({"status": status, "seconds": round(time.monotonic() - t, 2), "sent": len(sent)})


async def sampler(pid: int, samples: list, t0: float, every: float, done: asyncio.Event) -> None:
    while not done.is_set():
        with contextlib.suppress(OSError, ValueError):
            samples.append({"t": round(time.monotonic() - t0, 1), **sample_proc(pid)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every)


async def run_load(args, url: str, port: int, pid: int, texts: list[str], ref: np.ndarray) -> tuple[Stats, list]:
    stats, samples = Stats(), []
    t0 = time.monotonic()
    stop = t0 + args.duration_s
    done = asyncio.Event()
    sample_task = asyncio.create_task(sampler(pid, samples, t0, args.sample_s, done))
    tasks = [asyncio.create_task(good_client(c, url, port, texts, ref, stats, t0, stop, args))
             for c in range(args.clients)]
    tasks += [asyncio.create_task(slow_client(c, port, stats, args.body_timeout_s, stop))
              for c in range(args.slow_clients)]
    _, late = await asyncio.wait(tasks, timeout=args.duration_s + args.body_timeout_s + 150)
    for task in late:  # a request stuck past every timeout: report it, do not hang
        task.cancel()
        stats.transport_errors["stuck past the end"] = stats.transport_errors.get("stuck past the end", 0) + 1
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            stats.error("client crashed", task.exception())
    await asyncio.sleep(max(2.0, args.sample_s * 2))  # connections close; the server lets go of them
    done.set()
    await sample_task
    return stats, samples


# ---- the report ---------------------------------------------------------------------------------------------
def server_counts(url: str) -> dict:
    """The server's own request counts by status code and error counts by kind, from /metrics."""
    import re

    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    codes: dict[str, float] = {}
    for m in re.finditer(r'^embfast_requests_total\{([^}]*)\} ([0-9.e+]+)$', text, re.M):
        code = re.search(r'code="(\d+)"', m.group(1)).group(1)
        codes[code] = codes.get(code, 0) + float(m.group(2))
    kinds = {m.group(1): float(m.group(2)) for m in
             re.finditer(r'^embfast_errors_total\{kind="([^"]+)"\} ([0-9.e+]+)$', text, re.M)}
    return {"codes": {k: int(v) for k, v in sorted(codes.items())},
            "errors": {k: int(v) for k, v in sorted(kinds.items())}}


def report(args, stats: Stats, samples: list, before: dict, after: dict, server: dict) -> dict:
    # (finish time, seconds) of the 200 answers: a bucket holds the answers that finished in it
    good = [(t + s, s) for t, s, status, kind in stats.records if kind == "good" and status == 200]
    statuses: dict[str, int] = {}
    for _, _, status, _ in stats.records:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    buckets = []
    n_buckets = int(np.ceil(args.duration_s / args.bucket_s))
    for b in range(n_buckets):
        lo, hi = b * args.bucket_s, (b + 1) * args.bucket_s
        lat = np.array([s for t, s in good if lo <= t < hi or (b == n_buckets - 1 and t >= hi)]) * 1000
        last = [x for x in samples if x["t"] < hi][-1:] or [before]
        buckets.append({"from_s": round(lo), "served": int(lat.size),
                        "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
                        "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
                        "rss_mib": last[0]["rss_mib"], "fds": last[0]["fds"]})
    baseline_t = min(args.baseline_s, args.duration_s / 3)
    load = [s for s in samples if s["t"] <= args.duration_s]
    base = next((s for s in load if s["t"] >= baseline_t), load[0] if load else before)
    end = load[-1] if load else before
    growth = (end["rss_mib"] - base["rss_mib"]) / base["rss_mib"]
    fds_during = [s["fds"] for s in load if s["t"] >= baseline_t] or [end["fds"]]
    server_5xx = sum(v for k, v in server["codes"].items() if k.startswith("5"))
    client_5xx = sum(v for k, v in statuses.items() if k.startswith("5"))
    slow_408 = sum(1 for s in stats.slow if s["status"] == 408)
    checks = {
        "served": len(good) > 0,
        "no_5xx": client_5xx == 0 and server_5xx == 0,
        "all_200_match": not stats.mismatches,
        "bad_requests_4xx": not stats.bad_not_4xx,
        "slow_uploads_408": bool(stats.slow) and slow_408 == len(stats.slow) if args.slow_clients else True,
        "slow_uploads_released_in_time": all(s["seconds"] <= args.body_timeout_s + 5 for s in stats.slow),
        "rss_growth_under_10pct": growth < 0.10,
        "fds_back_to_start": after["fds"] <= before["fds"] + 4,
        "no_transport_errors": not stats.transport_errors,
    }
    return {
        "what": "embfast serve soak", "duration_s": args.duration_s, "clients": args.clients,
        "slow_clients": args.slow_clients, "bad_share": args.bad_share, "disconnect_share": args.disconnect_share,
        "body_timeout_s": args.body_timeout_s, "model": args.model or "bundled",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "requests": len(stats.records), "served_200": len(good), "rows_checked": stats.checked_rows,
        "min_cosine": round(stats.min_cosine, 6), "statuses": dict(sorted(statuses.items())),
        "disconnects": stats.disconnects, "mismatches": stats.mismatches[:20], "bad_not_4xx": stats.bad_not_4xx[:20],
        "slow_uploads": {"count": len(stats.slow), "answered_408": slow_408,
                         "max_seconds": max((s["seconds"] for s in stats.slow), default=None),
                         "other": [s for s in stats.slow if s["status"] != 408][:10]},
        "transport_errors": stats.transport_errors, "server": server,
        "rss_mib": {"before": before["rss_mib"], "baseline_t_s": base["t"], "baseline": base["rss_mib"],
                    "end": end["rss_mib"], "after": after["rss_mib"], "growth": round(growth, 4),
                    "max": max((s["rss_mib"] for s in load), default=None)},
        "fds": {"before": before["fds"], "during_min": min(fds_during), "during_max": max(fds_during),
                "end": end["fds"], "after": after["fds"]},
        "threads": {"before": before["threads"], "after": after["threads"]},
        "per_bucket": buckets, "bucket_s": args.bucket_s, "checks": checks, "ok": all(checks.values()),
        "samples": samples,
    }


def table(rep: dict) -> str:
    lines = [f"soak: {rep['duration_s']:g} s, {rep['clients']} clients + {rep['slow_clients']} slow uploads; "
             f"{rep['requests']} requests, {rep['served_200']} answered 200 ({rep['rows_checked']} rows checked, "
             f"min cosine {rep['min_cosine']}), statuses {rep['statuses']}, {rep['disconnects']} disconnects, "
             f"slow uploads {rep['slow_uploads']['answered_408']}/{rep['slow_uploads']['count']} got 408 "
             f"(max {rep['slow_uploads']['max_seconds']} s)",
             f"server-side codes {rep['server']['codes']}, errors {rep['server']['errors']}",
             f"RSS MiB: before {rep['rss_mib']['before']}, at {rep['rss_mib']['baseline_t_s']} s "
             f"{rep['rss_mib']['baseline']}, end {rep['rss_mib']['end']} (growth {rep['rss_mib']['growth']:.1%}); "
             f"fds: before {rep['fds']['before']}, during {rep['fds']['during_min']}-{rep['fds']['during_max']}, "
             f"after {rep['fds']['after']}; threads {rep['threads']['before']} -> {rep['threads']['after']}",
             "", "| from (s) | served 200 | p50 (ms) | p99 (ms) | RSS at end (MiB) | fds at end |",
             "|---:|---:|---:|---:|---:|---:|"]
    for b in rep["per_bucket"]:
        lines.append(f"| {b['from_s']} | {b['served']} | {b['p50_ms']} | {b['p99_ms']} | {b['rss_mib']} | {b['fds']} |")
    lines.append("")
    lines.append("checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in rep["checks"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    texts = load_texts(args)
    print(f"soak: {len(texts)} distinct texts; computing reference vectors ...", flush=True)
    ref = reference_vectors(args, texts)
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"soak_server_{port}.log"
    proc = start_server(args, port, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        before = sample_proc(proc.pid)
        print(f"soak: server pid {proc.pid} on {url} (log {log_path}); {args.duration_s:g} s at {args.clients} "
              f"clients ...", flush=True)
        stats, samples = asyncio.run(run_load(args, url, port, proc.pid, texts, ref))
        after = sample_proc(proc.pid)
        server = server_counts(url)
    finally:
        stop_server(proc)
    rep = report(args, stats, samples, before, after, server)
    rep["server_log_tail"] = log_path.read_text(errors="replace")[-2000:]
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1))
    print(json.dumps({k: v for k, v in rep.items() if k not in ("samples", "server_log_tail")}))
    print(table(rep))
    return 1 if args.check and not rep["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
