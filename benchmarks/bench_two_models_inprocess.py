"""Two models on the same cores, in-process (no HTTP): why do two batchers serve less than one?

Closed-loop caller threads send single sentences (or ``--texts-per-request`` of them), alternating between the
batchers as ``bench_server.py --modes two-models`` alternates between the served names. Three layouts, each
with ``workers=2`` per batcher, as ``embfast serve`` runs by default on a multi-core CPU:

- ``one``: one DynamicBatcher on one model (the baseline);
- ``two-copies``: two batchers on two loaded copies of the model, sharing one RunLock of 2 slots (what
  ``embfast serve --model A --model B`` does);
- ``two-shared``: two batchers on the same loaded model, also sharing the side-by-side twin session, so
  every call reads one copy of the weights (this isolates the cost of a second copy of the weights).

Reports texts/s, p50 / p99 ms per request, and from the batch listener: texts per batch, how busy the
2 cores were with ONNX Runtime calls (sum of batch seconds x threads / wall / 2), core-milliseconds per text and
core-microseconds per padded token (a batch's seconds are pad + ONNX Runtime + pooling, ORT 97% of it).

    python benchmarks/bench_two_models_inprocess.py --sentences ../shared/data/throughput/sentences.txt

The caller threads share the GIL with the batchers' workers, so absolute latencies are not the server's; the
layouts are compared within one run, in an order rotated each round. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np

LAYOUTS = ("one", "two-copies", "two-shared")


def make(layout: str, first, second, max_wait_ms: float) -> list:
    from embfast.dynamic import DynamicBatcher, RunLock

    if layout == "one":
        return [DynamicBatcher(first, workers=2, max_wait_ms=max_wait_ms)]
    slots = RunLock(slots=2)
    model = first if layout == "two-shared" else second
    batchers = [DynamicBatcher(first, workers=2, run_lock=slots, max_wait_ms=max_wait_ms),
                DynamicBatcher(model, workers=2, run_lock=slots, max_wait_ms=max_wait_ms)]
    if layout == "two-shared":  # one twin session for both: one copy of the weights in every call
        batchers[1]._narrow = batchers[0]._narrow
    return batchers


def load(batchers: list, sentences: list[str], clients: int, k: int, seconds: float,
         first_only: bool = False) -> tuple[int, list[float]]:
    """Closed loop: ``clients`` threads, request i of a caller goes to batcher i % len(batchers) (or always to
    the first)."""
    stop = time.monotonic() + seconds
    done = [0] * clients
    took: list[float] = []

    def caller(c: int) -> None:
        i = c
        while time.monotonic() < stop:
            b = batchers[0 if first_only else i % len(batchers)]
            j = (i * k) % (len(sentences) - k)
            t0 = time.perf_counter()
            b.encode(sentences[j] if k == 1 else sentences[j:j + k])
            took.append(time.perf_counter() - t0)
            done[c] += k
            i += clients

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done), took


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", required=True, help="text file, one sentence per line")
    p.add_argument("--model", default=None, help="model folder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--clients", type=int, default=8, help="closed-loop caller threads (default 8)")
    p.add_argument("--texts-per-request", type=int, default=1, help="sentences per request (default 1)")
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per layout and round (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, layouts in rotated order (default 3)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="the batchers' max_wait_ms (default 2)")
    p.add_argument("--load-on", choices=["both", "first"], default="both",
                   help="both: callers alternate between the models (default); first: only the first model is "
                        "busy, the second idles (an embedder under load next to an idle reranker)")
    p.add_argument("--json-out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("EMBFAST_ORT_SPIN", "0")  # as `embfast serve` runs
    from embfast import Embedder, build_info

    with open(args.sentences, encoding="utf-8") as fh:
        sentences = [line.strip() for line in fh if line.strip()][:20000]
    first, second = (Embedder(args.model), Embedder(args.model)) if args.model else (Embedder(), Embedder())
    lines = [{"bench": "two_models_inprocess", "build": build_info(), **vars(args)}]
    print(json.dumps(lines[0]), flush=True)
    for rnd in range(args.rounds):
        order = LAYOUTS[rnd % len(LAYOUTS):] + LAYOUTS[:rnd % len(LAYOUTS)]
        for layout in order:
            batchers = make(layout, first, second, args.max_wait_ms)
            stats: list[tuple[int, float, int, int]] = []
            for b in batchers:
                b.add_batch_listener(lambda st: stats.append((st.texts, st.seconds, st.threads, st.padded_tokens)))
            try:
                first_only = args.load_on == "first"
                load(batchers, sentences, args.clients, args.texts_per_request, 1.0, first_only)  # warm-up
                stats.clear()
                t0 = time.monotonic()
                texts, took = load(batchers, sentences, args.clients, args.texts_per_request, args.seconds,
                                   first_only)
                wall = time.monotonic() - t0
            finally:
                for b in batchers:
                    b.close()
            a = np.array(stats, dtype=float)
            core_s = float((a[:, 1] * a[:, 2]).sum())
            ms = np.array(took) * 1e3
            row = {"layout": layout, "round": rnd, "texts_per_s": round(texts / wall, 1),
                   "p50_ms": round(float(np.median(ms)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
                   "texts_per_batch": round(float(a[:, 0].mean()), 2), "ort_busy": round(core_s / wall / 2, 3),
                   "core_ms_per_text": round(core_s / a[:, 0].sum() * 1e3, 3),
                   "core_us_per_padded_token": round(core_s / a[:, 3].sum() * 1e6, 1)}
            lines.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| layout | texts/s (median) | x one | texts per batch | ORT busy | core ms per text "
          "| core us per padded token |")
    print("|---|---|---|---|---|---|---|")
    med = {}
    for layout in LAYOUTS:
        rows = [r for r in lines[1:] if r["layout"] == layout]
        med[layout] = {key: float(np.median([r[key] for r in rows]))
                       for key in ("texts_per_s", "texts_per_batch", "ort_busy", "core_ms_per_text",
                                   "core_us_per_padded_token")}
    for layout, m in med.items():
        print(f"| {layout} | {m['texts_per_s']:.1f} | {m['texts_per_s'] / med['one']['texts_per_s']:.2f} | "
              f"{m['texts_per_batch']:.2f} | {m['ort_busy']:.2f} | {m['core_ms_per_text']:.2f} | "
              f"{m['core_us_per_padded_token']:.0f} |")
    if args.json_out:
        with open(args.json_out, "a", encoding="utf-8") as fh:
            for line in lines:
                fh.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
