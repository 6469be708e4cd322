"""``embfast dedup`` and ``embfast cluster``: near-duplicate removal and topic clusters from the command line.

Transport only: the algorithms are :mod:`embfast.mining` and :mod:`embfast.clustering`.

``embfast dedup INPUT... --threshold 0.92 -o unique.txt [--groups groups.jsonl] [--resume]`` embeds the texts
(the streaming, resumable ``embfast encode`` job), joins every pair at or above the threshold (blocked, each
pair once; the join's finished row blocks are saved too), groups them (connected components: single linkage)
and writes the first text of each group and every text in no group, in input order. The work lives in
``OUTPUT.parts/`` until the output is written; ``--resume`` finishes an interrupted run.

``embfast cluster VECTORS --texts TEXTS --method community|kmeans -o clusters.jsonl`` writes one JSON line per
cluster, largest first: size, c-TF-IDF keywords, the most central texts and every member row.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from embfast import io as jio
from embfast.jobs import _embedder, _input_args, _lock_job, _model_args, _read_opts, encode_files, work_folder
from embfast.mining import duplicate_groups, upper_pairs, use_screen
from embfast.screen import Quantized

DEDUP_FORMAT = 1
JOIN_ROWS = 4096  # rows of the upper-triangle join saved per block (the unit of --resume for the join)


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rows", disable=quiet, file=sys.stderr)


def _atomic_lines(path: Path, lines) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for line in lines:
            fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def dedup_files(inputs: list[str], output: str | Path, embedder, *, threshold: float = 0.92,
                groups: str | Path | None = None, read: jio.ReadOptions | None = None, resume: bool = False,
                skip_bad: bool = False, quiet: bool = True, batch_size: int = 32) -> dict:
    """Remove near-duplicates from text files; see the module docstring.

    Args:
        inputs: files or globs (.txt, .jsonl, .csv, .parquet), read as ``embfast encode`` reads them.
        output: .txt (one kept text per line; texts must not hold a line break) or .jsonl (``{"id", "text"}``).
        threshold: cosine at or above which two texts are duplicates (default 0.92).
        groups: also write one JSON line per group of duplicates: ``{"group", "size", "keep", "members":
            [{"row", "id", "text", "score"}]}`` (score: cosine to the kept text).
        resume: finish the interrupted run kept in ``OUTPUT.parts``; without it that folder is an error.

    Returns:
        {"texts", "kept", "removed", "groups", "seconds"}.
    """
    t0 = time.perf_counter()
    output = Path(output)
    if output.suffix.lower() not in (".txt", ".jsonl"):
        raise ValueError(f"output must end in .txt or .jsonl, got {str(output)!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [-1, 1], got {threshold!r}")
    read = read or jio.ReadOptions()
    paths = jio.expand_inputs(inputs)
    config = {"format": DEDUP_FORMAT, "threshold": float(threshold), "model": embedder.manifest.get("name"),
              "model_checksum": embedder.manifest.get("source_checksum"), "text_field": read.text_field,
              "id_field": read.id_field, "input_format": read.input_format, "inputs": jio.fingerprint(paths),
              "skip_bad": skip_bad}
    folder = work_folder(output)
    if folder.exists() and not resume:
        raise ValueError(f"{folder} holds an interrupted run of this job; pass --resume to finish it, or delete "
                         "the folder to start over")
    folder.mkdir(parents=True, exist_ok=True)
    lock = _lock_job(folder, output)
    try:
        state_path = folder / "dedup.json"
        if state_path.exists():
            if json.loads(state_path.read_text("utf-8")) != config:
                raise ValueError(f"--resume: the inputs or settings changed since the interrupted run; delete "
                                 f"{folder} to start over")
        else:
            state_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
        vectors_path = folder / "vectors.npy"
        if not vectors_path.exists():  # the encode job keeps its own shards in vectors.npy.parts: resumable
            encode_files(paths, vectors_path, embedder, read=read, batch_size=batch_size, normalize=True,
                         resume=True, skip_bad=skip_bad, quiet=quiet)
        x = np.load(vectors_path, mmap_mode="r")
        n = x.shape[0]
        x = np.ascontiguousarray(x, dtype=np.float32)
        bar = _progress(n, "dedup", quiet)
        quantized = None  # the int8 screen's copy of the rows, made once for every part of the join
        pairs_i, pairs_j, pairs_s = [], [], []
        for a in range(0, n, JOIN_ROWS):
            b = min(a + JOIN_ROWS, n)
            part = folder / f"pairs-{a:012d}.npz"
            if not part.exists():
                if quantized is None and use_screen(x, a, b):
                    quantized = Quantized(x)
                i, j, s = upper_pairs(x, float(threshold), start_row=a, stop_row=b, quantized=quantized)
                tmp = part.with_name(part.name + ".tmp.npz")
                np.savez(tmp, i=i, j=j, s=s)
                os.replace(tmp, part)
            with np.load(part) as z:
                pairs_i.append(z["i"])
                pairs_j.append(z["j"])
                pairs_s.append(z["s"])
            bar.update(b - a)
        bar.close()
        i, j, s = (np.concatenate(v) if v else np.empty(0) for v in (pairs_i, pairs_j, pairs_s))
        found = duplicate_groups(n, i.astype(np.int64), j.astype(np.int64))
        drop = np.zeros(n, dtype=bool)
        for g in found:
            drop[g[1:]] = True
        records = list(jio.read_records(paths, read, on_bad=(lambda exc: None) if skip_bad else None))
        if len(records) != n:
            raise RuntimeError(f"the inputs hold {len(records)} texts but {n} were embedded; delete {folder} and "
                               "run again")
        if output.suffix.lower() == ".txt":
            bad = next((r for r, d in zip(records, drop, strict=True) if not d and ("\n" in r.text or "\r" in r.text)),
                       None)
            if bad is not None:
                raise ValueError(f"{bad.source}: the text holds a line break, which a .txt output cannot keep as one "
                                 "line; write a .jsonl output instead")
            _atomic_lines(output, (r.text for r, d in zip(records, drop, strict=True) if not d))
        else:
            _atomic_lines(output, (json.dumps({"id": r.id, "text": r.text}, ensure_ascii=False)
                                   for r, d in zip(records, drop, strict=True) if not d))
        if groups is not None:
            x_rows = x
            lines = []
            for gi, g in enumerate(found):
                scores = x_rows[g] @ x_rows[g[0]]
                lines.append(json.dumps({"group": gi, "size": len(g), "keep": records[g[0]].id, "members": [
                    {"row": r, "id": records[r].id, "text": records[r].text, "score": round(float(sc), 6)}
                    for r, sc in zip(g, scores.tolist(), strict=True)]}, ensure_ascii=False))
            _atomic_lines(Path(groups), lines)
    finally:
        lock.close()
    shutil.rmtree(folder, ignore_errors=True)
    return {"texts": n, "kept": int(n - drop.sum()), "removed": int(drop.sum()), "groups": len(found),
            "seconds": time.perf_counter() - t0}


def cmd_dedup(args) -> int:
    if args.chunk_tokens:
        raise ValueError("dedup compares whole texts: --chunk-tokens does not apply")
    m = _embedder(args)
    try:
        res = dedup_files(args.inputs, args.output, m, threshold=args.threshold, groups=args.groups,
                          read=_read_opts(args), resume=args.resume, skip_bad=args.skip_bad, quiet=args.quiet,
                          batch_size=args.batch_size)
    except KeyboardInterrupt:
        print(f"embfast dedup: interrupted; finished work is kept in {work_folder(args.output)}: run the same "
              "command with --resume to finish", file=sys.stderr)
        return 130
    except jio.BadInputError as exc:
        print(f"embfast dedup: error: {exc}{'' if args.skip_bad else '; pass --skip-bad to skip bad rows'}",
              file=sys.stderr)
        return 2
    print(f"{res['texts']} texts: kept {res['kept']}, removed {res['removed']} near-duplicates in {res['groups']} "
          f"groups (cosine >= {args.threshold}) -> {args.output}"
          + (f", groups in {args.groups}" if args.groups else "") + f" ({res['seconds']:.1f} s)")
    return 0


def cmd_cluster(args) -> int:
    from embfast.clustering import cluster, describe_clusters
    from embfast.viz import read_labels

    x = jio.load_vectors(args.vectors)
    if x.shape[0] == 0:
        raise ValueError(f"{args.vectors} holds no rows to cluster")
    texts = read_labels(args.texts, x.shape[0]) if args.texts else None
    t0 = time.perf_counter()
    labels = cluster(x, method=args.method, k=args.k, threshold=args.threshold,
                     min_community_size=args.min_community_size, seed=args.seed)
    found = describe_clusters(x, labels, texts, top_texts=args.top_texts)
    lines = []
    for d in found:
        item = {"cluster": d["cluster"], "size": d["size"], "keywords": d.get("keywords", []),
                "central": [{"row": r, **({"text": t} if texts is not None else {})}
                            for r, t in zip(d["central"], d.get("texts", [None] * len(d["central"])), strict=True)],
                "members": d["members"]}
        lines.append(json.dumps(item, ensure_ascii=False))
    _atomic_lines(Path(args.output), lines)
    clustered = int((labels >= 0).sum())
    print(f"{len(found)} clusters ({args.method}) over {x.shape[0]} rows, {clustered} clustered, in "
          f"{time.perf_counter() - t0:.1f} s -> {args.output}")
    for d in found[:10]:
        words = ", ".join(d.get("keywords", [])[:6])
        print(f"  {d['cluster']:>4}  {d['size']:>7}  {words}")
    return 0


def register_cli(sub) -> None:
    """Add ``embfast dedup`` and ``embfast cluster``."""
    s = sub.add_parser("dedup", help="remove near-duplicate texts (embed, join pairs above a threshold, group)")
    _input_args(s)
    _model_args(s)
    s.add_argument("-o", "--output", required=True, help="the kept texts: .txt (one per line) or .jsonl")
    s.add_argument("--threshold", type=float, default=0.92, help="cosine for duplicates (default 0.92)")
    s.add_argument("--groups", default=None, help="also write the groups of duplicates as JSON lines")
    s.add_argument("--resume", action="store_true", help="finish an interrupted run from its <output>.parts folder")
    s.set_defaults(func=cmd_dedup)

    c = sub.add_parser("cluster", help="cluster embeddings (community detection or k-means) and describe clusters")
    c.add_argument("vectors", help="vectors from embfast encode: .npy, .parquet or .jsonl")
    c.add_argument("--texts", default=None, help="a text file with one text per vector row (keywords, central texts)")
    c.add_argument("--method", choices=["community", "kmeans"], default="community")
    c.add_argument("--k", type=int, default=None, help="clusters for --method kmeans")
    c.add_argument("--threshold", type=float, default=0.75, help="community detection: cosine (default 0.75)")
    c.add_argument("--min-community-size", type=int, default=10, help="community detection: smallest (default 10)")
    c.add_argument("--top-texts", type=int, default=5, help="central texts per cluster (default 5)")
    c.add_argument("--seed", type=int, default=0, help="k-means random state (default 0)")
    c.add_argument("-o", "--output", required=True, help="clusters as JSON lines, largest first")
    c.set_defaults(func=cmd_cluster)
