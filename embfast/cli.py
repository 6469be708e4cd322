"""The ``embfast`` command line: transport only, it calls the facade.

Flags mirror ``EMBFAST_*`` environment variables (``--device`` = EMBFAST_DEVICE,
``--precision`` = EMBFAST_PRECISION, ``--model`` = EMBFAST_MODEL,
``--threads`` = EMBFAST_THREADS).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from importlib import resources


def _env(name: str, default=None):
    return os.environ.get(f"EMBFAST_{name}", default)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=_env("MODEL"), help="model folder, Hub id org/name or catalog name "
                   "(default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--device", default=_env("DEVICE", "cpu"), choices=["cpu", "cuda", "auto"])
    p.add_argument("--precision", default=_env("PRECISION", "auto"), choices=["fp32", "int8", "fp16", "auto"])
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--batch-size", type=int, default=32)


def _embedder(args):
    from embfast import Embedder

    return Embedder(args.model, device=args.device, precision=args.precision, threads=args.threads)


def cmd_info(args) -> int:
    from embfast import build_info

    print(json.dumps(build_info(), indent=2))
    return 0


def cmd_export(args) -> int:
    from embfast.export import ensure_exported, export_model

    t0 = time.perf_counter()
    out = export_model(args.model_dir, args.output) if args.output else ensure_exported(args.model_dir)
    if args.precision != "fp32":
        from embfast.variants import ensure_variant

        ensure_variant(out, args.precision)
    print(f"exported {args.model_dir} -> {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _read_lines(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 file (lines end at \\n only: :mod:`embfast.text`)."""
    from embfast.text import read_lines

    return [line for line in read_lines(path) if line.strip()]


def cmd_demo(args) -> int:
    """The main job: load (export once) the model, embed a sample, run searches, print throughput."""
    import numpy as np

    from embfast.text import split_lines

    t0 = time.perf_counter()
    m = _embedder(args)
    print(f"model: {m}  (ready in {time.perf_counter() - t0:.2f} s, from {m.model_dir})")
    data = resources.files("embfast") / "data"
    corpus = _read_lines(args.corpus) if args.corpus else split_lines((data / "sample.txt").read_text("utf-8"))
    queries = split_lines((data / "queries.txt").read_text("utf-8"))
    if args.limit:
        corpus = corpus[: args.limit]
    m.encode(corpus[:8])  # warm-up
    t1 = time.perf_counter()
    emb, info = m.encode(corpus, batch_size=args.batch_size, return_info=True)
    secs = time.perf_counter() - t1
    print(f"embedded {len(corpus)} texts -> {emb.shape} {emb.dtype} in {secs:.2f} s: "
          f"{len(corpus) / secs:.1f} texts/s, {int(info.token_counts.sum()) / secs:.0f} tokens/s, "
          f"{int(info.truncated.sum())} truncated at {m.max_seq_length} tokens")
    hits = m.search(queries, emb, top_k=2)
    for q, row in zip(queries, hits, strict=True):
        print(f"\nquery: {q}")
        for h in row:
            print(f"  {h['score']:.3f}  {corpus[h['corpus_id']][:100]}")
    lat = []
    for q in queries * 3:
        t = time.perf_counter()
        m.encode(q)
        lat.append((time.perf_counter() - t) * 1000)
    print(f"\nsingle-query latency: p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms")
    return 0


def cmd_eval(args) -> int:
    from embfast.evaluation import evaluate_retrieval, evaluate_sts

    if (args.sparse or args.hybrid) and args.task != "retrieval":
        raise ValueError("--sparse and --hybrid apply to retrieval only")
    if args.hybrid and not args.sparse:
        raise ValueError("--hybrid needs --sparse MODEL (a SPLADE folder, or 'bm25')")
    sparse_only = args.sparse and not args.hybrid
    m = None if sparse_only else _embedder(args)
    sparse = None
    if args.sparse:
        from embfast.bm25 import load_sparse_model

        sparse = load_sparse_model(args.sparse, device=args.device, precision=args.precision, threads=args.threads)
    t0 = time.perf_counter()
    if args.task == "sts":
        res = evaluate_sts(m, args.path, batch_size=args.batch_size)
    else:
        res = evaluate_retrieval(m, args.path, split=args.split, batch_size=args.batch_size, sparse=sparse,
                                 hybrid=args.hybrid, sparse_weight=args.sparse_weight)
    main = m if m is not None else sparse
    res.update({"model": m.manifest.get("name") if m is not None else None,
                "sparse_model": getattr(sparse, "name", None), "precision": getattr(main, "precision", None),
                "device": getattr(main, "device", "cpu"), "seconds": round(time.perf_counter() - t0, 1)})
    print(json.dumps(res, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embfast", description="Fast, exact text embeddings on ONNX Runtime")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="print build and runtime facts as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("export", help="export a sentence-transformers folder to ONNX (into the cache or -o)")
    s.add_argument("model_dir")
    s.add_argument("-o", "--output", default=None, help="output folder (default: the cache, $EMBFAST_HOME)")
    s.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16"],
                   help="also build this variant")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("demo", help="embed a sample, run searches, print throughput and latency")
    _model_args(s)
    s.add_argument("--corpus", default=None, help="a text file, one text per line (default: a bundled sample)")
    s.add_argument("--limit", type=int, default=None, help="embed at most this many texts")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("eval", help="MTEB-style evaluation: sts FILE or retrieval BEIR_DIR")
    s.add_argument("task", choices=["sts", "retrieval"])
    s.add_argument("path")
    s.add_argument("--split", default="test")
    s.add_argument("--sparse", default=None, help="retrieval with a sparse model: a SPLADE folder, or 'bm25'")
    s.add_argument("--hybrid", default=None, choices=["rrf", "weighted"],
                   help="fuse --model (dense) and --sparse rankings (default fusion for Index: weighted)")
    s.add_argument("--sparse-weight", type=float, default=None,
                   help="weighted fusion: weight of the sparse scores (default 0.3; z-scored)")
    _model_args(s)
    s.set_defaults(func=cmd_eval)
    for module in _EXTENSIONS:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:  # an optional extra (server, ray) is not installed: say so when used
            s = sub.add_parser(module.rsplit(".", 1)[-1], help=f"unavailable: {exc}")
            s.set_defaults(func=lambda args, exc=exc: _missing(exc))
            continue
        mod.register_cli(sub)
    return p


# Modules that add their own subcommands: each has register_cli(subparsers) and keeps its code to itself.
_EXTENSIONS: list[str] = ["embfast.jobs", "embfast.indexcmd", "embfast.benchcmd", "embfast.viz", "embfast.server",
                          "embfast.models", "embfast.hub", "embfast.appcmd", "embfast.rerank_cli"]


def _missing(exc: Exception) -> int:
    print(f"embfast: this command needs an optional dependency: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, TypeError, ImportError, RuntimeError) as exc:
        print(f"embfast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
