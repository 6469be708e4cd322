"""Cosine of each precision's embeddings to fp32 on real texts (an evaluation, not a timing).

python benchmarks/precision_accuracy.py --data ../shared/data --sentences 1500 --passages 500 --precisions int8
Texts: a fixed sample (seed 1) of real sentences plus SciFact passages. Prints min / mean / 1st percentile.
"int8" is the default int8 (one activation scale per row, EMBFAST_INT8_RECIPE=rows; "int8-rows" names it
too); "int8-dynamic" is ONNX Runtime's per-tensor recipe (EMBFAST_INT8_RECIPE=dynamic). With --invariance, every text
is also embedded alone (its own call, no padding) and compared with its vector from the batched run (max
abs difference over all texts and dimensions; issue 14 asks for <= 1e-5).
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
    p.add_argument("--invariance", action="store_true", help="also embed each text alone and compare")
    args = p.parse_args()

    import os

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
        if prec.startswith("int8"):
            os.environ["EMBFAST_INT8_RECIPE"] = "dynamic" if prec == "int8-dynamic" else "rows"
        model = embfast.Embedder(args.model, precision=prec.split("-")[0])
        os.environ.pop("EMBFAST_INT8_RECIPE", None)
        emb = model.encode(texts, normalize_embeddings=True)
        cos = (emb * ref).sum(1)
        row = {"precision": prec, "texts": len(texts), "sentences": args.sentences,
               "passages": args.passages, "min_cosine": round(float(cos.min()), 4),
               "p1_cosine": round(float(np.percentile(cos, 1)), 4),
               "mean_cosine": round(float(cos.mean()), 4),
               "worst_text": texts[int(cos.argmin())][:60]}
        if args.invariance:
            alone = np.stack([model.encode([t], normalize_embeddings=True)[0] for t in texts])
            diff = np.abs(alone - emb).max(axis=1)
            row.update({"alone_vs_batched_max_abs": float(diff.max()), "texts_over_1e-5": int((diff > 1e-5).sum())})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
