"""Cosine of each precision's embeddings to fp32 on real texts (an evaluation, not a timing).

python benchmarks/precision_accuracy.py --data ../shared/data --sentences 1500 --passages 500 --precisions int8
Texts: a fixed sample (seed 1) of real sentences plus SciFact passages. Prints min / mean / 1st percentile.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--model", default=None)
    p.add_argument("--sentences", type=int, default=1500)
    p.add_argument("--passages", type=int, default=500)
    p.add_argument("--precisions", nargs="+", default=["int8"])
    args = p.parse_args()

    import embfast

    rnd = random.Random(1)
    data = Path(args.data)
    sentences = (data / "throughput" / "sentences.txt").read_text("utf-8").splitlines()
    with open(data / "scifact" / "corpus.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    texts = rnd.sample(sentences, args.sentences) + [(d["title"] + " " + d["text"]).strip()
                                                     for d in rnd.sample(docs, args.passages)]
    ref = embfast.Embedder(args.model, precision="fp32").encode(texts, normalize_embeddings=True)
    for prec in args.precisions:
        emb = embfast.Embedder(args.model, precision=prec).encode(texts, normalize_embeddings=True)
        cos = (emb * ref).sum(1)
        print(json.dumps({"precision": prec, "texts": len(texts), "sentences": args.sentences,
                          "passages": args.passages, "min_cosine": round(float(cos.min()), 4),
                          "p1_cosine": round(float(np.percentile(cos, 1)), 4),
                          "mean_cosine": round(float(cos.mean()), 4),
                          "worst_text": texts[int(cos.argmin())][:60]}))


if __name__ == "__main__":
    main()
