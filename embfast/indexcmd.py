"""``embfast index build|add|info`` and ``embfast search``: the persistent index from the command line.

Transport only: the index is :mod:`embfast.index`, its streaming, resumable build :mod:`embfast.index_build`
(the same work folder, state, lock and ``--resume`` as ``embfast encode``, :mod:`embfast.jobs`).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from embfast.index_build import build_index
from embfast.io import BadInputError
from embfast.jobs import (
    BadCounter,
    _bad_note,
    _embedder,
    _input_args,
    _model_args,
    _on_sigterm,
    _read_opts,
    work_folder,
)


def _stream_index(args, m, output, base=None):
    """Run the streaming build (:func:`embfast.index_build.build_index`); the result, or None when interrupted."""
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return build_index(args.inputs, output, m, precision=getattr(args, "precision", "fp32"), base=base,
                           vectors=args.vectors, read=_read_opts(args), batch_size=args.batch_size,
                           chunk_tokens=args.chunk_tokens, chunk_overlap=args.chunk_overlap,
                           with_ids=args.id_field is not None, store_text=not args.no_text,
                           shard_size=args.shard_size, resume=args.resume, skip_bad=args.skip_bad,
                           quiet=args.quiet, progress_interval=args.progress_interval)
    except BadInputError as exc:
        raise ValueError(f"{exc}{'' if args.skip_bad else '; pass --skip-bad to skip and count bad rows'}") from None
    except KeyboardInterrupt:
        folder = work_folder(output)
        kept = f"; finished shards are kept in {folder}: run the same command with --resume to finish" \
            if folder.exists() else ""
        print(f"embfast index: interrupted; {output} was not written{kept}", file=sys.stderr)
        return None
    finally:
        signal.signal(signal.SIGTERM, old)


def _notes(res) -> str:
    """What the summary line adds: bad rows skipped, shards resumed."""
    resumed = f"; resumed after {res.resumed_shards} shards" if res.resumed_shards else ""
    return _bad_note(BadCounter(rows=res.bad_rows, files=res.bad_files)) + resumed


def cmd_index_build(args) -> int:
    t0 = time.perf_counter()
    m = _embedder(args)
    res = _stream_index(args, m, args.output)
    if res is None:
        return 130
    print(f"built {args.output}: {res.rows} rows x {res.dim}, {res.precision}, model {m.manifest.get('name')} "
          f"({time.perf_counter() - t0:.1f} s){_notes(res)}")
    return 0


def _model_for_index(args, manifest_model: dict | None):
    """The --model given, else the model folder the index was built from (when it still exists)."""
    if args.model is None and manifest_model and manifest_model.get("source") \
            and Path(manifest_model["source"]).exists():
        return _embedder(args, manifest_model["source"])
    return _embedder(args)


def cmd_index_add(args) -> int:
    from embfast.index import read_index_manifest

    t0 = time.perf_counter()
    man = read_index_manifest(args.index)
    m = _model_for_index(args, man.get("model"))
    before = man["count"]
    res = _stream_index(args, m, args.index, base=args.index)
    if res is None:
        return 130
    print(f"added {res.added} rows to {args.index}: {before} -> {res.rows} rows "
          f"({time.perf_counter() - t0:.1f} s){_notes(res)}")
    return 0


def cmd_index_info(args) -> int:
    from embfast.index import read_index_manifest

    man = read_index_manifest(args.index)
    man.pop("sections", None)
    print(json.dumps(man, indent=2))
    return 0


def cmd_search(args) -> int:
    from embfast.index import Index, read_index_manifest

    m = _model_for_index(args, read_index_manifest(args.index).get("model"))
    index = Index.load(args.index, embedder=m, mmap=True, verify=not args.no_verify)
    if args.positive or args.negative:
        if args.queries:
            raise ValueError("give either QUERY texts or --positive/--negative ids, not both")
        if not args.positive:
            raise ValueError("--negative needs at least one --positive id")

        def as_ids(values):  # ids typed on the command line are strings; an int-id index wants ints
            if index._id_kind == "str":
                return values
            try:
                return [int(v) for v in values]
            except ValueError as exc:
                raise ValueError(f"this index has int ids, got {exc}") from None

        try:
            hits = [index.recommend(as_ids(args.positive), as_ids(args.negative or []), top_k=args.k,
                                    rescore=not args.no_rescore)]
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        args.queries = [f"recommend positive={args.positive} negative={args.negative or []}"]
    elif not args.queries:
        raise ValueError("give QUERY texts, or --positive ids to recommend by example")
    else:
        hits = index.search(args.queries, top_k=args.k, rescore=not args.no_rescore)
    if args.json:
        print(json.dumps([{"query": q, "hits": h} for q, h in zip(args.queries, hits, strict=True)],
                         ensure_ascii=False, indent=2))
        return 0
    for q, row in zip(args.queries, hits, strict=True):
        print(f"query: {q}")
        for rank, h in enumerate(row, 1):
            text = (h["text"] or "").replace("\n", " ")
            text = text if len(text) <= 200 else text[:197] + "..."
            print(f"{rank:>3}. {h['score']:.4f}  [{h['id']}]  {text}")
        if len(args.queries) > 1:
            print()
    return 0


def _index_job_args(p) -> None:
    p.add_argument("--no-text", action="store_true", help="do not store texts in the index")
    p.add_argument("--vectors", default=None, metavar="NPY",
                   help="index these precomputed vectors (.npy (rows, dim), e.g. from embfast encode) instead of "
                        "embedding INPUTs; INPUTs, if given, supply one record (id, text) per vector row")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run from its <output>.parts folder")


def register_cli(sub) -> None:
    """Add ``index build|add|info`` and ``search`` to the ``embfast`` command."""
    s = sub.add_parser("index", help="build or extend a persistent vector index (embfast.Index)")
    isub = s.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="embed a corpus into a new index file (streaming, resumable)")
    _input_args(b, optional=True)
    _model_args(b, precision_flag="--model-precision")
    b.add_argument("-o", "--output", required=True, help="the index file to write (atomically)")
    b.add_argument("--precision", default="fp32", choices=["fp32", "int8", "binary"],
                   help="how vectors are searched: fp32 exact, int8 or binary with fp32 rescoring (default fp32)")
    _index_job_args(b)
    b.set_defaults(func=cmd_index_build)
    a = isub.add_parser("add", help="embed more texts into an existing index (streaming, resumable)")
    a.add_argument("index", help="the index file (rewritten atomically)")
    _input_args(a, optional=True)
    _model_args(a, precision_flag="--model-precision")
    _index_job_args(a)
    a.set_defaults(func=cmd_index_add)
    i = isub.add_parser("info", help="print an index's manifest as JSON")
    i.add_argument("index")
    i.set_defaults(func=cmd_index_info)

    s = sub.add_parser("search", help="search an index with text queries, or recommend by example ids")
    s.add_argument("index")
    s.add_argument("queries", nargs="*", metavar="QUERY")
    s.add_argument("--positive", nargs="+", default=None, metavar="ID",
                   help="recommend rows like these ids (Qdrant's average_vector strategy) instead of a query")
    s.add_argument("--negative", nargs="+", default=None, metavar="ID", help="... and unlike these ids")
    s.add_argument("-k", "--top-k", dest="k", type=int, default=10, help="hits per query (default 10)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a ranked list")
    s.add_argument("--no-rescore", action="store_true", help="int8/binary: rank by quantized scores only")
    s.add_argument("--no-verify", action="store_true", help="skip the checksum pass over the index file")
    _model_args(s, precision_flag="--model-precision")
    s.set_defaults(func=cmd_search)

