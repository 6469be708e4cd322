"""Reranking throughput on the CPU: embfast CrossEncoder (fp32, int8) vs sentence-transformers' CrossEncoder, one run.
int8 is the default recipe (one activation scale per token); embfast-int8-dynamic is ONNX Runtime's per-tensor one.

python benchmarks/bench_rerank.py --data ../shared/data --queries 50 --docs 100 --threads 2 --repeat 1

The work: SciFact test queries (the first ``--queries``), each with ``--docs`` candidate passages (its relevant
passages plus a fixed random sample, seed 0; title + text, most longer than the model takes, so they are cut
longest-first), scored as (query, passage) pairs, one ``predict`` call per query as a reranking stage does.
The model: ``--model DIR`` (a cross-encoder folder), or by default a cross-encoder built on all-MiniLM-L6-v2's
real weights with a seeded random one-label head (tests/models_fixtures.py:build_ce_minilm; no cross-encoder
weights can be downloaded here): its speed is a 6-layer MiniLM reranker's (ms-marco-MiniLM-L6 has the same
shape), its scores mean nothing. Runs alternate between implementations; medians of the per-repeat totals are
reported, with ratios to sentence-transformers (torch), plus agreement with it (max |score difference|) and
int8's Spearman correlation per query. Prints one JSON object (with build facts) at the end.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data", help="the folder holding scifact/")
    p.add_argument("--model", default=None, help="a cross-encoder folder (default: MiniLM weights + random head)")
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--docs", type=int, default=100, help="candidate passages per query")
    p.add_argument("--max-length", type=int, default=512, help="pair truncation of the default model (tokens)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batch-tokens", default="auto", help="embfast's padded-token budget per batch")
    p.add_argument("--impls", nargs="*", default=None,
                   help="subset of: st-torch st-onnx fastembed embfast-fp32 embfast-int8 (one activation scale per "
                        "token, the default) embfast-int8-dynamic (ONNX Runtime's per-tensor recipe)")
    return p.parse_args()


ARGS = _parse()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

warnings.filterwarnings("ignore")
IMPLS = ("st-torch", "st-onnx", "fastembed", "embfast-fp32", "embfast-int8", "embfast-int8-dynamic")


def load_work() -> list[tuple[str, list[str]]]:
    """[(query, candidate passages)] from SciFact's test split."""
    data = Path(ARGS.data) / "scifact"
    with open(data / "corpus.jsonl", encoding="utf-8") as fh:
        docs = {d["_id"]: (d["title"] + " " + d["text"]).strip() for d in map(json.loads, fh)}
    with open(data / "queries_test.jsonl", encoding="utf-8") as fh:
        queries = [json.loads(line) for line in fh][: ARGS.queries]
    relevant: dict[str, list[str]] = {}
    with open(data / "qrels_test.tsv", encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            qid, cid, _ = line.rstrip("\n").split("\t")
            relevant.setdefault(qid, []).append(cid)
    rnd = random.Random(0)
    ids = sorted(docs)
    work = []
    for q in queries:
        chosen = [c for c in relevant.get(q["_id"], []) if c in docs][: ARGS.docs]
        others = [c for c in rnd.sample(ids, ARGS.docs + len(chosen)) if c not in chosen]
        chosen += others[: ARGS.docs - len(chosen)]
        rnd.shuffle(chosen)
        work.append((q["text"], [docs[c] for c in chosen]))
    return work


def model_dir(tmp: Path) -> Path:
    if ARGS.model:
        return Path(ARGS.model)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import torch
    from models_fixtures import build_ce_minilm

    torch.set_num_threads(ARGS.threads)
    return build_ce_minilm(tmp / "minilm-ce", max_length=ARGS.max_length)


def fastembed_cross_encoder(folder: Path, out: Path):
    """fastembed's TextCrossEncoder on ``folder``'s fp32 ONNX export (registered as a custom model, loaded from
    a local path: nothing is downloaded)."""
    import shutil

    from fastembed.common.model_description import ModelSource
    from fastembed.rerank.cross_encoder import TextCrossEncoder

    from embfast import CrossEncoder

    onnx_dir = CrossEncoder(folder, precision="fp32", threads=ARGS.threads).model_dir
    out.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json", "vocab.txt"):
        if (folder / f).exists():
            shutil.copy(folder / f, out / f)
    shutil.copy(onnx_dir / "model.onnx", out / "model.onnx")
    TextCrossEncoder.add_custom_model("local/bench-cross-encoder", sources=ModelSource(hf="local/bench-cross-encoder"),
                                      model_file="model.onnx")
    return TextCrossEncoder("local/bench-cross-encoder", specific_model_path=str(out), threads=ARGS.threads,
                            cuda=False)


def main() -> int:
    import embfast
    from embfast import CrossEncoder

    work = load_work()
    impls = ARGS.impls or list(IMPLS)
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise SystemExit(f"unknown --impls {unknown}; choose from {IMPLS}")
    mbt = None if ARGS.max_batch_tokens == "none" else (
        "auto" if ARGS.max_batch_tokens == "auto" else int(ARGS.max_batch_tokens))
    with tempfile.TemporaryDirectory(prefix="bench-rerank-") as tmp:
        os.environ.setdefault("EMBFAST_HOME", str(Path(tmp) / "home"))
        folder = model_dir(Path(tmp))
        runners, models = {}, {}
        if "st-torch" in impls:
            import torch
            from sentence_transformers import CrossEncoder as STCrossEncoder

            torch.set_num_threads(ARGS.threads)
            st = STCrossEncoder(str(folder), device="cpu")
            models["st-torch"] = st
            runners["st-torch"] = lambda q, d: st.predict([(q, x) for x in d], batch_size=ARGS.batch_size,
                                                          show_progress_bar=False)
        if "st-onnx" in impls:  # sentence-transformers' own ONNX backend (optimum export of the same folder)
            from sentence_transformers import CrossEncoder as STCrossEncoder

            try:
                st_onnx = STCrossEncoder(str(folder), device="cpu", backend="onnx")
            except Exception as exc:  # noqa: BLE001 - reported, the others still run
                print(f"st-onnx skipped: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            else:
                models["st-onnx"] = st_onnx
                runners["st-onnx"] = lambda q, d: st_onnx.predict([(q, x) for x in d], batch_size=ARGS.batch_size,
                                                                  show_progress_bar=False)
        if "fastembed" in impls:  # fastembed's TextCrossEncoder on a local folder holding the same ONNX graph
            try:
                fe = fastembed_cross_encoder(folder, Path(tmp) / "fastembed-ce")
            except Exception as exc:  # noqa: BLE001 - reported, the others still run
                print(f"fastembed skipped: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            else:
                models["fastembed"] = fe
                # fastembed returns logits; the sigmoid is what sentence-transformers applies for one label
                runners["fastembed"] = lambda q, d: 1.0 / (1.0 + np.exp(-np.asarray(
                    list(fe.rerank(q, d, batch_size=ARGS.batch_size)), dtype=np.float64)))
        for precision in ("fp32", "int8", "int8-dynamic"):
            name = f"embfast-{precision}"
            if name in impls:
                t0 = time.perf_counter()
                if precision.startswith("int8"):  # the recipe is read when the model loads
                    os.environ["EMBFAST_INT8_RECIPE"] = "dynamic" if precision == "int8-dynamic" else "rows"
                ce = CrossEncoder(folder, precision=precision.split("-")[0], threads=ARGS.threads)
                os.environ.pop("EMBFAST_INT8_RECIPE", None)
                print(f"{name}: {ce} loaded in {time.perf_counter() - t0:.1f} s", flush=True)
                models[name] = ce
                runners[name] = (lambda ce: lambda q, d: ce.predict(
                    [(q, x) for x in d], ARGS.batch_size, max_batch_tokens=mbt))(ce)
        ours = models.get("embfast-fp32") or models.get("embfast-int8")
        tokens = None if ours is None else ours.tokenizer.tokenize([(q, x) for q, d in work for x in d]).lengths

        scores = {name: [run(q, d) for q, d in work[:2]] for name, run in runners.items()}  # warm-up
        times: dict[str, list[float]] = {name: [] for name in runners}
        per_query: dict[str, list[float]] = {name: [] for name in runners}  # one query x its passages
        for _ in range(ARGS.repeat):
            for name, run in runners.items():
                t0 = time.perf_counter()
                out = []
                for q, d in work:
                    t1 = time.perf_counter()
                    out.append(np.asarray(run(q, d), dtype=np.float64))
                    per_query[name].append(time.perf_counter() - t1)
                scores[name] = out
                times[name].append(time.perf_counter() - t0)

    pairs = sum(len(d) for _, d in work)
    result = {"queries": len(work), "docs_per_query": ARGS.docs, "pairs": pairs, "threads": ARGS.threads,
              "batch_size": ARGS.batch_size, "max_batch_tokens": ARGS.max_batch_tokens, "repeat": ARGS.repeat,
              "model": str(ARGS.model or "all-MiniLM-L6-v2 + random head"),
              "max_length": None if ours is None else ours.max_seq_length,
              "mean_tokens_per_pair": None if tokens is None else round(float(tokens.mean()), 1),
              "build": embfast.build_info(), "impls": {}}
    base = statistics.median(times["st-torch"]) if "st-torch" in times else None
    print(f"\n{pairs} pairs ({len(work)} queries x {ARGS.docs} passages), {ARGS.threads} threads, median of "
          f"{ARGS.repeat}")
    for name, ts in times.items():
        med = statistics.median(ts)
        row = {"seconds": round(med, 3), "pairs_per_s": round(pairs / med, 1),
               "ms_per_query": round(1000 * med / len(work), 1),
               "query_p50_ms": round(1000 * float(np.percentile(per_query[name], 50)), 1),
               "query_p99_ms": round(1000 * float(np.percentile(per_query[name], 99)), 1),
               "speedup_vs_st": round(base / med, 2) if base else None}
        if "st-torch" in scores and name != "st-torch":
            diff = max(float(np.abs(a - b).max()) for a, b in zip(scores[name], scores["st-torch"], strict=True))
            row["max_abs_diff_vs_st"] = diff
            ranks = [np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]
                     for a, b in zip(scores[name], scores["st-torch"], strict=True)]
            row["mean_spearman_vs_st"] = round(float(np.mean(ranks)), 4)
        result["impls"][name] = row
        print(f"  {name:14s} {row['pairs_per_s']:8.1f} pairs/s  {row['ms_per_query']:8.1f} ms/query"
              f"  (p50 {row['query_p50_ms']:.1f} / p99 {row['query_p99_ms']:.1f} ms)"
              + (f"  {row['speedup_vs_st']:.2f}x st" if base else "")
              + (f"  max|diff| {row['max_abs_diff_vs_st']:.2e}  spearman {row['mean_spearman_vs_st']:.4f}"
                 if "max_abs_diff_vs_st" in row else ""))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
