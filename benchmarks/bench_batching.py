"""Sweep encode(batch_size, max_batch_tokens) on the bench_encode texts; the source of encode's defaults.

python benchmarks/bench_batching.py --data ../shared/data --precision fp32 int8 --repeat 3
Prints the median seconds per configuration (alternating configurations within each repeat).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

CONFIGS = [(32, 16384), (32, 2048), (32, 1024), (32, 512), (64, 1024), (128, 8192), (512, 16384)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--sentences", type=int, default=1000)
    p.add_argument("--passages", type=int, default=100)
    p.add_argument("--precision", nargs="+", default=["fp32", "int8"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    import embfast

    data, rnd = Path(args.data), random.Random(0)  # the same texts as bench_encode.py
    sentences = (data / "throughput" / "sentences.txt").read_text("utf-8").splitlines()
    with open(data / "scifact" / "corpus.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    texts = rnd.sample(sentences, args.sentences) + [
        (d["title"] + " " + d["text"]).strip() for d in rnd.sample(docs, args.passages)]
    for prec in args.precision:
        m = embfast.Embedder(precision=prec, threads=args.threads)
        m.encode(texts[:200])
        times: dict[tuple, list[float]] = {c: [] for c in CONFIGS}
        for _ in range(args.repeat):
            for bs, budget in CONFIGS:
                t0 = time.perf_counter()
                m.encode(texts, batch_size=bs, max_batch_tokens=budget)
                times[(bs, budget)].append(time.perf_counter() - t0)
        for (bs, budget), ts in times.items():
            print(json.dumps({"precision": prec, "batch_size": bs, "max_batch_tokens": budget,
                              "median_s": round(statistics.median(ts), 2)}), flush=True)


if __name__ == "__main__":
    main()
