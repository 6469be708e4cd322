"""One client, several embfast servers, measured request by request in turn: batching on vs off at one client
without the machine's drift between measuring windows, over rounds of fresh server processes.

bench_server.py measures each server for a window of seconds, one after the other. At one client the two
modes run the same calls (a lone request is one batch on all the cores, batching on or off), yet its 5-second
windows differed by up to 15% between two identically configured servers over 9 rounds: this machine's speed
drifts from one window to the next. Here one sequential client (Python's http.client, one keep-alive
connection per server) sends request i to every server in turn before request i + 1 (the first server of each
turn rotates), so every server sees the same texts, in the same order, under the same drift; only one request is
in flight at a time, so the idle servers sleep. Drift gone, a second effect shows: a server *process* can be 2-4%
faster or slower than an identical one for its whole life (where its memory and threads landed), so each round
starts fresh processes (in a rotated order) and the figures are pooled over the rounds.

Per server: texts/s as a client with no cost of its own sees it (texts / the sum of request latencies), p50 and
p99 latency in ms, over all rounds. Against ``--reference`` (default: the first off mode): the throughput ratio
with a 95% bootstrap interval over the rounds, each round's ratio (median, [min, max]), the rounds where the
server was at least as fast and those where its p99 was at most the reference's. Every answer is checked (status
200, one vector per text) and each server's vectors are compared with the reference's for the same texts
(cosine >= 0.9999 expected; the minimum is reported). Give an A/A pair (two modes that run the same code at one
client, e.g. off and off-st0) to see the noise floor.

    python benchmarks/bench_one_client.py --modes on-w2,off,off-st0 --texts-per-request 1,8 --rounds 9
    python benchmarks/bench_one_client.py --model /tmp/tiny --rounds 2 --duration-s 2 --warmup-s 0.5   # smoke
    # this build against an earlier one (pip install --no-deps --target /tmp/base <earlier checkout>)
    python benchmarks/bench_one_client.py --modes on-w2,off --baseline /tmp/base --reference on-w2-baseline

Modes as in bench_server.py (on, off, on-wN, ..., -stN, ...). Prints one JSON line per server, point and round,
and one per server and point over the rounds, then a markdown table; never asserts.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import (  # noqa: E402
    APIS,
    DEFAULT_SENTENCES,
    ON_OFF_MODE,
    _ints,
    embfast_server,
    machine,
    parse_mode,
    read_sentences,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", default=str(DEFAULT_SENTENCES), help="text file, one sentence per line")
    p.add_argument("--limit", type=int, default=20000, help="use the first N sentences (default 20000)")
    p.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--modes", default="on-w2,off",
                   help="embfast servers, as bench_server.py's --modes (on/off modes only), comma-separated "
                        "(default on-w2,off: the server's default, 2 workers, and batching off)")
    p.add_argument("--reference", default=None,
                   help="the mode the others are compared with (default: the first off mode, else the last)")
    p.add_argument("--texts-per-request", type=_ints, default=[1, 8],
                   help="sentences per request: 1 sends a string, k > 1 a list (default 1,8)")
    p.add_argument("--duration-s", type=float, default=20.0,
                   help="measured seconds per point and round, all servers together (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, each with fresh server processes (default 5)")
    p.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured seconds before each point (default 3)")
    p.add_argument("--threads", type=int, default=None, help="embfast ONNX Runtime threads (default: all cores)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="embfast --max-wait-ms (default 2)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="embfast --max-batch-tokens (default 16384)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"], help="embfast model precision")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="also run each mode from another build of embfast installed in DIR (`pip install --no-deps "
                        "--target DIR` of an earlier commit), as MODE-baseline: old and new code request by request")
    p.add_argument("--json-out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--startup-timeout-s", type=float, default=300.0, help="wait this long for a server to start")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if len(args.modes) < (1 if args.baseline else 2) or not all(re.fullmatch(ON_OFF_MODE, m) for m in args.modes) \
            or len(set(args.modes)) < len(args.modes):
        p.error(f"--modes needs at least two different on/off modes (one with --baseline; as bench_server.py's), "
                f"got {args.modes}")
    args.labels = args.modes + ([m + "-baseline" for m in args.modes] if args.baseline else [])
    if args.reference is None:
        args.reference = next((m for m in args.modes if m.startswith("off")), args.modes[-1])
    if args.reference not in args.labels:
        p.error(f"--reference {args.reference!r} is not one of --modes (or MODE-baseline with --baseline)")
    if args.baseline and not Path(args.baseline, "embfast").is_dir():
        p.error(f"--baseline {args.baseline!r} holds no embfast package")
    if args.duration_s <= 0 or args.warmup_s < 0 or args.rounds < 1:
        p.error("--duration-s must be > 0, --warmup-s >= 0 and --rounds >= 1")
    # what bench_server.embfast_server reads besides these
    args.call_cost_tokens = args.queue_policy = None
    return args


class Client:
    """One keep-alive HTTP connection to a server's /v1/embeddings."""

    def __init__(self, server):
        self.server = server
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)

    def post(self, body: bytes) -> tuple[float, int, bytes]:
        """(seconds from sending to the whole answer read, status, answer body)."""
        t0 = time.perf_counter()
        self.conn.request("POST", self.server.path, body, {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        return time.perf_counter() - t0, resp.status, data

    def close(self) -> None:
        self.conn.close()


def check(status: int, data: bytes, k: int):
    """The answer's vectors (k x dim, float64), or a string saying what is wrong with it."""
    import numpy as np

    if status != 200:
        return f"status {status}: {data[:200]!r}"
    try:
        rows = [d["embedding"] for d in json.loads(data)["data"]]
    except (ValueError, KeyError, TypeError) as exc:
        return f"malformed answer ({exc})"
    if len(rows) != k:
        return f"{len(rows)} vectors for {k} texts"
    return np.asarray(rows, dtype=np.float64)


def cosine_min(a, b) -> float:
    import numpy as np

    num = (a * b).sum(axis=1)
    return float((num / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def run_point(clients: list[Client], bodies: list[bytes], k: int, seconds: float, ref: int) -> dict:
    """Turns until ``seconds`` have passed: in turn t, body t goes to every server, the first one rotating.
    Returns {"latencies": [[s, ...] per server], "errors": [...], "cos_min": [...]} (latencies in turn order)."""
    n = len(clients)
    lat: list[list[float]] = [[] for _ in clients]
    errors = [0] * n
    cos_min = [1.0] * n
    stop_at = time.perf_counter() + seconds
    t = 0
    while time.perf_counter() < stop_at:
        body = bodies[t % len(bodies)]
        answers = [None] * n
        for j in [(t + i) % n for i in range(n)]:
            seconds_j, status, data = clients[j].post(body)
            lat[j].append(seconds_j)
            answers[j] = check(status, data, k)
        if all(not isinstance(a, str) for a in answers):
            for j in range(n):
                cos_min[j] = min(cos_min[j], cosine_min(answers[j], answers[ref]))
        else:
            for j, a in enumerate(answers):
                errors[j] += isinstance(a, str)
                if isinstance(a, str) and errors[j] == 1:
                    print(f"bench_one_client: {clients[j].server.name}: {a}", file=sys.stderr)
        t += 1
    return {"latencies": lat, "errors": errors, "cos_min": cos_min}


def point_stats(lat_ms, k: int) -> dict:
    """texts/s (k per request over the sum of latencies), p50 and p99 latency (ms) of one server's requests."""
    import numpy as np

    lat_ms = np.asarray(lat_ms)
    return {"texts_per_s": round(k * 1000.0 / float(lat_ms.mean()), 2),
            "p50_ms": round(float(np.percentile(lat_ms, 50)), 2), "p99_ms": round(float(np.percentile(lat_ms, 99)), 2)}


def summarize(rounds: list[dict], names: list[str], ref: int, k: int, seed: int = 0) -> list[dict]:
    """Per server, over the rounds (each a fresh set of processes): texts/s, p50 and p99 of all its requests;
    against the reference: the throughput ratio of all requests with a 95% bootstrap interval over the rounds
    (rounds resampled with replacement, 2,000 times), each round's ratio (median, [min, max]) and the rounds where
    the server was at least as fast, and had a p99 at most the reference's."""
    import numpy as np

    lat = [[np.array(r["latencies"][j]) * 1000.0 for r in rounds] for j in range(len(names))]  # ms
    sums = np.array([[x.sum() for x in per] for per in lat])  # servers x rounds
    counts = np.array([[x.size for x in per] for per in lat])
    p99 = np.array([[np.percentile(x, 99) for x in per] for per in lat])
    picks = np.random.default_rng(seed).integers(0, len(rounds), size=(2000, len(rounds)))
    rows = []
    for j, name in enumerate(names):
        row = {"mode": name, "rounds": len(rounds), "requests": int(counts[j].sum()),
               "errors": sum(r["errors"][j] for r in rounds), **point_stats(np.concatenate(lat[j]), k),
               "cosine_min_vs_reference": round(min(r["cos_min"][j] for r in rounds), 6)}
        if j != ref:
            # same turns in every round, so the mean latencies' ratio is the throughput ratio
            per_round = (sums[ref] / counts[ref]) / (sums[j] / counts[j])
            boot = (sums[ref][picks].sum(axis=1) / sums[j][picks].sum(axis=1))
            row.update({
                "throughput_ratio": round(float(sums[ref].sum() / sums[j].sum()), 4),
                "throughput_ratio_ci95": [round(float(x), 4) for x in np.percentile(boot, [2.5, 97.5])],
                "round_ratio_median": round(float(np.median(per_round)), 4),
                "round_ratio_range": [round(float(per_round.min()), 4), round(float(per_round.max()), 4)],
                "rounds_at_least_as_fast": int((per_round >= 1.0).sum()),
                "p99_diff_ms": round(float(np.percentile(np.concatenate(lat[j]), 99)
                                           - np.percentile(np.concatenate(lat[ref]), 99)), 2),
                "rounds_p99_at_most": int((p99[j] <= p99[ref]).sum()),
            })
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| server | texts/req | requests | texts/s | p50 ms | p99 ms | throughput vs ref [95% CI] | "
           "per round: median [min, max] | rounds >= | p99 - ref ms | rounds p99 <= | min cosine vs ref |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "throughput_ratio" in r:
            lo, hi = r["throughput_ratio_ci95"]
            rlo, rhi = r["round_ratio_range"]
            n = r["rounds"]
            vs = (f"{r['throughput_ratio']:.3f}x [{lo:.3f}, {hi:.3f}] | {r['round_ratio_median']:.3f}x "
                  f"[{rlo:.3f}, {rhi:.3f}] | {r['rounds_at_least_as_fast']}/{n} | {r['p99_diff_ms']:+.2f} | "
                  f"{r['rounds_p99_at_most']}/{n}")
        else:
            vs = "reference | | | | "
        out.append(f"| {r['mode']} | {r['texts_per_request']} | {r['requests']} | {r['texts_per_s']} | "
                   f"{r['p50_ms']} | {r['p99_ms']} | {vs} | {r['cosine_min_vs_reference']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    from embfast import build_info
    from embfast.export import default_model_path

    read = read_sentences(args, "bench_one_client")
    if read is None:
        return 2
    path, sentences = read
    header = {"bench": "one_client", "machine": machine(), "build": build_info(),
              "model": args.model or str(default_model_path()), "sentences": str(path),
              "n_sentences": len(sentences), "duration_s": args.duration_s, "warmup_s": args.warmup_s,
              "rounds": args.rounds, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    print(json.dumps(header), flush=True)
    ref = args.labels.index(args.reference)
    make = APIS["openai"][1]
    bodies = {k: [json.dumps(make([sentences[(b * k + j) % len(sentences)] for j in range(k)], "embfast")).encode()
                  for b in range(2000)] for k in args.texts_per_request}
    out = open(args.json_out, "a", encoding="utf-8") if args.json_out else None  # noqa: SIM115

    def emit(row):
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")

    results: dict[int, list[dict]] = {k: [] for k in args.texts_per_request}
    extras: list[dict] = []
    rows: list[dict] = []
    try:
        if out:
            out.write(json.dumps(header) + "\n")
        for rnd in range(args.rounds):
            servers = [embfast_server(args, **parse_mode(m)) for m in args.modes]
            if args.baseline:
                servers += [embfast_server(args, **parse_mode(m), baseline=args.baseline) for m in args.modes]
            clients: list[Client] = []
            try:
                for j in [(rnd + i) % len(servers) for i in range(len(servers))]:  # start order rotates too
                    servers[j].start(args.startup_timeout_s)
                clients = [Client(s) for s in servers]
                extras = [s.extra for s in servers]
                for k in args.texts_per_request:
                    if args.warmup_s > 0:
                        run_point(clients, bodies[k], k, args.warmup_s, ref)
                    res = run_point(clients, bodies[k], k, args.duration_s, ref)
                    results[k].append(res)
                    for j, server in enumerate(servers):
                        emit({"bench": "one_client", "server": "embfast", **server.extra, "mode": args.labels[j],
                              "concurrency": 1, "texts_per_request": k, "round": rnd,
                              "requests": len(res["latencies"][j]), "errors": res["errors"][j],
                              **point_stats([x * 1000.0 for x in res["latencies"][j]], k)})
            finally:
                for c in clients:
                    c.close()
                for server in servers:
                    server.stop()
        for k in args.texts_per_request:
            for server_extra, row in zip(extras, summarize(results[k], args.labels, ref, k), strict=True):
                row = {"bench": "one_client", "server": "embfast", **server_extra, **row, "concurrency": 1,
                       "texts_per_request": k, "reference": args.reference, "aggregate": "rounds"}
                rows.append(row)
                emit(row)
    finally:
        if out:
            out.close()
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
