"""Parity of embfast with sentence-transformers on real data (an evaluation, not a test).

python benchmarks/parity.py --data ../shared/data [--precision fp32] [--sentences 1000] [--passages 100]
Prints min / mean cosine between embfast and SentenceTransformer(path).encode on the same folder, over real
sentences, SciFact passages (many longer than 256 word-pieces) and hard texts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HARD = ["", " ", "\n\t", "日本語のテキストです。", "Привет мир", "🙂🚀🔥 emoji only 🙂", "def f(x):\n    return x**2",
        "a" * 1_000_000, "مرحبا بالعالم", "x " * 5000]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--model", default=None)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--sentences", type=int, default=1000)
    p.add_argument("--passages", type=int, default=100)
    args = p.parse_args()

    import embfast
    from embfast.export import default_model_path

    data = Path(args.data)
    sentences = (data / "throughput" / "sentences.txt").read_text("utf-8").splitlines()[: args.sentences]
    with open(data / "scifact" / "corpus.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line) for _, line in zip(range(args.passages), fh, strict=False)]
    passages = [(d["title"] + " " + d["text"]).strip() for d in docs]
    texts = sentences + passages + HARD

    m = embfast.Embedder(args.model, precision=args.precision)
    ours, info = m.encode(texts, return_info=True)
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(args.model or default_model_path()), device="cpu")
    theirs = st.encode(texts, batch_size=32)
    cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1) + 1e-30)
    print(json.dumps({"texts": len(texts), "sentences": len(sentences), "passages": len(passages),
                      "hard": len(HARD), "truncated": int(info.truncated.sum()), "precision": m.precision,
                      "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                      "worst_text": texts[int(cos.argmin())][:80]}, indent=2))


if __name__ == "__main__":
    main()
