"""Persistent index search latency (fp32 / int8 / binary) and ``embfast encode`` throughput, one JSON line each.

Index (random unit vectors; search latency does not depend on their content):

    python benchmarks/bench_index.py index --n 1000000 --dim 384 --q 1 16 --k 10 --threads 2 --repeat 20

builds ``embfast.Index`` at each precision, saves it, loads it memory-mapped (with and
without the checksum pass) and times ``Index.search`` on vectors, against a plain numpy
brute force (``corpus @ q.T`` + ``argpartition``) measured in the same run.

Encode (real sentences, all-MiniLM-L6-v2 unless --model):

    python benchmarks/bench_index.py encode --sentences ../shared/data/throughput/sentences.txt --threads 2

times ``embfast encode FILE -o out.npy`` as a user runs it (a subprocess: model load and
output included) and as the job alone (``encode_files`` in-process, model loaded), against
a plain Python loop calling ``SentenceTransformer.encode`` on batches of the same lines and
saving the result (model load excluded), and checks nothing: benchmarks never assert.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["index", "encode", "all"])
    p.add_argument("--n", type=int, nargs="+", default=[1_000_000], help="index rows (default 1000000)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--q", type=int, nargs="+", default=[1, 16], help="queries per search call (default 1 16)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8", "binary"])
    p.add_argument("--rescore-multiplier", type=int, default=4)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="BLAS / OpenMP / ONNX Runtime / torch threads")
    p.add_argument("--folder", default="/tmp/embfast-bench-index", help="where index files and outputs go")
    p.add_argument("--sentences", default="../shared/data/throughput/sentences.txt")
    p.add_argument("--limit", type=int, default=None, help="encode at most this many sentences")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", default=None, help="model folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--skip-st", action="store_true", help="do not run sentence-transformers")
    return p.parse_args()


ARGS = _parse()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import embfast  # noqa: E402
from embfast.index import Index  # noqa: E402


def emit(row: dict) -> None:
    row.setdefault("build", {k: embfast.build_info().get(k) for k in ("isa", "openmp", "onnxruntime", "native")})
    print(json.dumps(row), flush=True)


def median_time(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    """Random unit vectors, generated in blocks (float32 throughout)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        x = rng.standard_normal((min(100_000, n - s), dim), dtype=np.float32)
        out[s:s + x.shape[0]] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def numpy_topk(q: np.ndarray, c: np.ndarray, k: int):
    s = q @ c.T
    idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(s, idx, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(idx, order, axis=1)


def bench_index() -> None:
    folder = Path(ARGS.folder)
    folder.mkdir(parents=True, exist_ok=True)
    for n in ARGS.n:
        corpus = unit_rows(n, ARGS.dim, 0)
        queries = unit_rows(max(ARGS.q), ARGS.dim, 1)
        for q in ARGS.q:
            t = median_time(lambda q=q: numpy_topk(queries[:q], corpus, ARGS.k), max(3, ARGS.repeat // 4), 1)
            emit({"bench": "index_search", "engine": "numpy brute force", "precision": "fp32", "n": n,
                  "dim": ARGS.dim, "q": q, "k": ARGS.k, "threads": ARGS.threads, "median_ms": t * 1000})
        for prec in ARGS.precisions:
            t0 = time.perf_counter()
            index = Index(precision=prec)
            index.add(corpus)
            index.search(queries[:1], top_k=ARGS.k)  # builds the codes
            build_s = time.perf_counter() - t0
            path = folder / f"bench-{n}-{prec}.embf"
            t0 = time.perf_counter()
            index.save(path)
            save_s = time.perf_counter() - t0
            del index
            t0 = time.perf_counter()
            Index.load(path, verify=True)
            load_verify_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            loaded = Index.load(path, verify=False)
            load_s = time.perf_counter() - t0
            for q in ARGS.q:
                t = median_time(lambda q=q, ix=loaded: ix.search(queries[:q], top_k=ARGS.k,
                                                                 rescore_multiplier=ARGS.rescore_multiplier),
                                ARGS.repeat)
                emit({"bench": "index_search", "engine": "embfast.Index (mmap)", "precision": prec, "n": n,
                      "dim": ARGS.dim, "q": q, "k": ARGS.k, "threads": ARGS.threads,
                      "rescore_multiplier": ARGS.rescore_multiplier if prec != "fp32" else None,
                      "median_ms": t * 1000, "build_s": build_s, "save_s": save_s, "load_s": load_s,
                      "load_verify_s": load_verify_s, "file_mb": path.stat().st_size / 1e6})
            del loaded
            path.unlink()


def _read_lines(path: str, limit: int | None) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        lines = [line.rstrip("\n") for line in fh if line.strip()]
    return lines[:limit] if limit else lines


def bench_encode() -> None:
    from embfast import Embedder
    from embfast.jobs import encode_files

    folder = Path(ARGS.folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = _read_lines(ARGS.sentences, ARGS.limit)
    src = folder / "sentences.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    n = len(lines)
    model_args = ["--model", ARGS.model] if ARGS.model else []

    cmd = [sys.executable, "-m", "embfast.cli", "encode", str(src), "-o", str(folder / "cli.npy"), "--quiet",
           "--threads", str(ARGS.threads), "--batch-size", str(ARGS.batch_size), *model_args]
    subprocess.run(cmd[:4] + [str(src), "-o", str(folder / "warm.npy"), "--quiet", *model_args], check=True,
                   capture_output=True)  # exports / builds the model once, outside the timing
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=folder)
    cli_s = time.perf_counter() - t0
    emit({"bench": "encode", "engine": "embfast encode (CLI, incl. start-up and model load)", "texts": n,
          "threads": ARGS.threads, "batch_size": ARGS.batch_size, "seconds": cli_s, "texts_per_s": n / cli_s})

    m = Embedder(ARGS.model, threads=ARGS.threads)
    m.encode(lines[:64])
    t0 = time.perf_counter()
    encode_files([str(src)], folder / "job.npy", m, batch_size=ARGS.batch_size, quiet=True)
    job_s = time.perf_counter() - t0
    emit({"bench": "encode", "engine": "embfast encode_files (job only)", "texts": n, "threads": ARGS.threads,
          "batch_size": ARGS.batch_size, "seconds": job_s, "texts_per_s": n / job_s})
    del m

    if ARGS.skip_st:
        return
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError:
        emit({"bench": "encode", "engine": "sentence-transformers", "skipped": "not installed"})
        return
    torch.set_num_threads(ARGS.threads)
    from embfast.export import default_model_path

    st = SentenceTransformer(str(ARGS.model or default_model_path()), device="cpu")
    st.encode(lines[:64])
    t0 = time.perf_counter()
    with open(src, encoding="utf-8") as fh:
        texts = [line.rstrip("\n") for line in fh]
    out = []
    for s in range(0, len(texts), ARGS.batch_size):  # the plain loop a user writes
        out.append(st.encode(texts[s:s + ARGS.batch_size], convert_to_numpy=True))
    np.save(folder / "st.npy", np.concatenate(out))
    st_s = time.perf_counter() - t0
    emit({"bench": "encode", "engine": "python loop over SentenceTransformer.encode", "texts": n,
          "threads": ARGS.threads, "batch_size": ARGS.batch_size, "seconds": st_s, "texts_per_s": n / st_s,
          "embfast_job_speedup": st_s / job_s, "embfast_cli_speedup": st_s / cli_s})


if __name__ == "__main__":
    if ARGS.what in ("index", "all"):
        bench_index()
    if ARGS.what in ("encode", "all"):
        bench_encode()
