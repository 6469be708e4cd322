"""One caller at a time through the DynamicBatcher: does a second worker cost anything when there is nothing to
run side by side? In-process, no HTTP: single sentences (or ``--texts-per-call`` of them) sent one after the
other, for batching off (1 worker), on (1 worker) and on (2 workers), each ``--repeat`` times; reports the mean,
p50 and p99 time per call, the mean batch time (pad + ONNX Runtime + pooling, from the batch listener) and how
often each worker thread was woken (Linux /proc voluntary context switches).

    python benchmarks/bench_workers_one_caller.py --sentences ../shared/data/throughput/sentences.txt
    python benchmarks/bench_workers_one_caller.py --sentences ../shared/data/throughput/sentences.txt --texts-per-call 8

Timings are only meaningful on a quiet machine; nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np

CONFIGS = {"off-w1": {"merge_requests": False}, "on-w1": {}, "on-w2": {"workers": 2}}


def wakeups(thread: threading.Thread) -> int:
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("voluntary_ctxt_switches")))


def run(model, sentences: list[str], calls: int, k: int = 1, **kw) -> dict:
    from embfast.dynamic import DynamicBatcher

    b = DynamicBatcher(model, **kw)
    batch_s: list[float] = []
    b.add_batch_listener(lambda st: batch_s.append(st.seconds))
    for i in range(50):  # warm-up; starts the workers
        b.encode(call(sentences, i, k))
    time.sleep(0.2)
    workers = [t for t in threading.enumerate() if t.name.startswith("embfast-batcher")]
    before = [wakeups(t) for t in workers]
    batch_s.clear()
    took = []
    for i in range(50, 50 + calls):
        text = call(sentences, i, k)
        t0 = time.perf_counter()
        b.encode(text)
        took.append(time.perf_counter() - t0)
    woken = [wakeups(t) - w for t, w in zip(workers, before, strict=True)]
    b.close()
    ms = np.array(took) * 1e3
    return {"mean_ms": round(float(ms.mean()), 3), "p50_ms": round(float(np.median(ms)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "batch_mean_ms": round(float(np.mean(batch_s)) * 1e3, 3), "worker_wakeups": woken}


def call(sentences: list[str], i: int, k: int) -> str | list[str]:
    """The i-th call's input: one sentence (k = 1) or a list of k."""
    return sentences[i % len(sentences)] if k == 1 else [sentences[(i * k + j) % len(sentences)] for j in range(k)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", required=True, help="text file, one sentence per line")
    p.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--calls", type=int, default=1500, help="sequential calls per run (default 1500)")
    p.add_argument("--texts-per-call", type=int, default=1,
                   help="sentences per call: 1 sends a string, more a list (default 1)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each configuration, interleaved (default 3)")
    p.add_argument("--json-out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    from embfast import Embedder, build_info

    with open(args.sentences, encoding="utf-8") as fh:
        sentences = [line.strip() for line in fh if line.strip()][: (args.calls + 50) * args.texts_per_call]
    model = Embedder(args.model) if args.model else Embedder()
    lines = [{"bench": "workers_one_caller", "build": build_info(), "calls": args.calls,
              "texts_per_call": args.texts_per_call}]
    print(json.dumps(lines[0]), flush=True)
    for rep in range(args.repeat):
        for name, kw in CONFIGS.items():
            row = {"config": name, "round": rep, **run(model, sentences, args.calls, args.texts_per_call, **kw)}
            lines.append(row)
            print(json.dumps(row), flush=True)
    if args.json_out:
        with open(args.json_out, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
