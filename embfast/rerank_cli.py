"""``embfast rerank``: score passages against a query with a cross-encoder (transport only).

    embfast rerank CROSS_ENCODER_DIR "query" passages.txt -k 5        # one passage per line
    embfast rerank CROSS_ENCODER_DIR "query" --index docs.embf -k 5 --candidates 100   # search, then rerank

Flags mirror ``EMBFAST_*`` variables (``--device``, ``--precision``, ``--threads``).
"""

from __future__ import annotations

import json
import os
import time


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("rerank", help="rank passages (a text file, or an index's search hits) against a "
                              "query with a cross-encoder")
    p.add_argument("model", help="a cross-encoder folder (sentence-transformers CrossEncoder / HF sequence classifier)")
    p.add_argument("query")
    p.add_argument("passages", nargs="?", default=None, help="a text file, one passage per line")
    p.add_argument("--index", default=None, help="an embfast index file: rerank its search hits instead")
    p.add_argument("--embedder", default=os.environ.get("EMBFAST_MODEL"),
                   help="with --index: the embedding model the index was built with (default: bundled MiniLM)")
    p.add_argument("--candidates", type=int, default=100, help="with --index: hits given to the reranker")
    p.add_argument("-k", "--top-k", type=int, default=10, help="results to print (default 10)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--device", default=os.environ.get("EMBFAST_DEVICE", "cpu"), choices=["cpu", "cuda", "auto"])
    p.add_argument("--precision", default=os.environ.get("EMBFAST_PRECISION", "auto"),
                   choices=["fp32", "int8", "fp16", "auto"])
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_rerank)


def cmd_rerank(args) -> int:
    from embfast import CrossEncoder
    from embfast.text import read_lines

    if (args.passages is None) == (args.index is None):
        raise ValueError("give either a passages file or --index (not both)")
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    t0 = time.perf_counter()
    ce = CrossEncoder(args.model, device=args.device, precision=args.precision, threads=args.threads)
    if args.passages is not None:
        passages = read_lines(args.passages)
        hits = [{"id": h["corpus_id"], "score": h["score"], "text": h["text"]}
                for h in ce.rank(args.query, passages, top_k=args.top_k, return_documents=True,
                                 batch_size=args.batch_size)]
    else:
        from embfast import Embedder, Index

        embedder = Embedder(args.embedder, device=args.device, threads=args.threads)
        index = Index.load(args.index, embedder)
        hits = index.search(args.query, args.top_k, rerank=ce, rerank_candidates=args.candidates,
                            batch_size=args.batch_size)[0]
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"query": args.query, "model": ce.name, "hits": hits, "seconds": round(seconds, 3)},
                         ensure_ascii=False))
        return 0
    print(f"{ce}  ({seconds:.2f} s)")
    for rank, h in enumerate(hits, 1):
        print(f"{rank:3d}  {h['score']:.4f}  {h['id']}  {(h.get('text') or '')[:100]}")
    return 0
