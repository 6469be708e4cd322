"""Exact top-k search: embfast vs FAISS IndexFlatIP, numpy, sentence-transformers, usearch, in one run.

python benchmarks/bench_topk.py --n 200000 1000000 --q 1 16 1000 --k 10 --threads 2 --repeat 5 \
    --embeddings /tmp/sentences_minilm.npy --data ../shared/data

Prints one JSON line per measurement and a markdown table: median seconds, ratio to FAISS,
GB/s scanned (q=1) against this machine's measured read bandwidth, GFLOP/s (q=1000) against
measured numpy sgemm. Also: int8 / binary corpora with rescoring (speed vs fp32 at q=1; recall@10
on real all-MiniLM-L6-v2 embeddings of ../shared/data/throughput/sentences.txt), and pooling +
normalization of a (64, 256, 384) batch against the NumPy reference.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[200_000, 1_000_000])
    p.add_argument("--q", type=int, nargs="+", default=[1, 16, 1000])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--rescore-multiplier", type=int, default=4)
    p.add_argument("--embeddings", default="/tmp/sentences_minilm.npy",
                   help="real embeddings cache (.npy); computed from --data if missing")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--skip", nargs="*", default=[], help="competitors to skip: faiss numpy st usearch")
    p.add_argument("--only", nargs="*", default=None, help="sections: fp32 quantized pooling")
    return p.parse_args()


ARGS = _parse()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import json  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import embfast  # noqa: E402
from embfast import kernels  # noqa: E402
from embfast.kernels import reference  # noqa: E402

ROWS: list[dict] = []


def timeit(fn, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def emit(**row) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def machine_limits(n_bytes: int = 1 << 30) -> dict:
    """Read bandwidth and numpy sgemm GFLOP/s of this machine.

    Bandwidth is the best of two read-only streams over a 1 GiB float32 array:
    numpy sums in ``threads`` Python threads, and a BLAS sgemv (x (rows, dim) @ v),
    which OpenBLAS threads itself. Both only read the array once.
    """
    x = np.ones(n_bytes // 4, dtype=np.float32)
    parts = np.array_split(x, ARGS.threads)

    def par():
        ts = [threading.Thread(target=p.sum) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    x2 = x[: x.size // ARGS.dim * ARGS.dim].reshape(-1, ARGS.dim)
    v = np.ones(ARGS.dim, dtype=np.float32)
    stream = min(timeit(par, 3), timeit(lambda: x2 @ v, 3))
    bw = x.nbytes / stream / 1e9
    a = np.random.default_rng(0).standard_normal((1000, ARGS.dim)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((65536, ARGS.dim)).astype(np.float32)
    out = np.empty((1000, 65536), dtype=np.float32)
    t = timeit(lambda: np.matmul(a, b.T, out=out), 3)
    return {"read_gb_s": round(bw, 2), "sgemm_gflop_s": round(2 * 1000 * 65536 * ARGS.dim / t / 1e9, 1)}


def numpy_topk(q: np.ndarray, c: np.ndarray, k: int):
    """The usual numpy way: matmul + argpartition + sort, in query chunks to bound memory."""
    out = []
    for s in range(0, q.shape[0], 64):
        scores = q[s:s + 64] @ c.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(scores, part, 1)
        order = np.argsort(-ps, axis=1)
        out.append(np.take_along_axis(part, order, 1))
    return np.vstack(out)


def bench_fp32(limits: dict) -> None:
    for n in ARGS.n:
        _bench_fp32_at(n, limits)


def _bench_fp32_at(n: int, limits: dict) -> None:
    rng = np.random.default_rng(42)
    corpus = reference.l2_normalize(rng.standard_normal((n, ARGS.dim), dtype=np.float32))
    index = None
    if "faiss" not in ARGS.skip:
        try:
            import faiss

            faiss.omp_set_num_threads(ARGS.threads)
            index = faiss.IndexFlatIP(ARGS.dim)
            index.add(corpus)
        except ImportError:
            print("faiss not installed: pip install faiss-cpu", file=sys.stderr)
    usearch_search = None
    if "usearch" not in ARGS.skip:
        try:
            from usearch.index import search as usearch_search
        except ImportError:
            usearch_search = None
    st_search = corpus_t = None
    if "st" not in ARGS.skip:
        try:
            import torch
            from sentence_transformers.util import semantic_search as st_search

            torch.set_num_threads(ARGS.threads)
            corpus_t = torch.from_numpy(corpus)
        except ImportError:
            st_search = None
    for nq in ARGS.q:
        queries = reference.l2_normalize(rng.standard_normal((nq, ARGS.dim), dtype=np.float32))
        rep = ARGS.repeat if nq < 1000 else max(2, ARGS.repeat // 2)
        few = max(2, rep // 2)
        results = {"embfast": timeit(lambda: kernels.topk_cosine(queries, corpus, ARGS.k, assume_normalized=True),
                                     rep)}
        ref_idx = kernels.topk_cosine(queries, corpus, ARGS.k, assume_normalized=True)[1]
        if index is not None:
            results["faiss"] = timeit(lambda: index.search(queries, ARGS.k), rep)
            agree = (index.search(queries, ARGS.k)[1] == ref_idx).mean()
            emit(section="fp32", check="faiss_same_indices", n=n, q=nq, fraction=float(agree))
        if "numpy" not in ARGS.skip:
            results["numpy"] = timeit(lambda: numpy_topk(queries, corpus, ARGS.k), few)
        if st_search is not None:
            qt = torch.from_numpy(queries)
            results["sentence-transformers"] = timeit(lambda: st_search(qt, corpus_t, top_k=ARGS.k), few)
        if usearch_search is not None:
            results["usearch-exact"] = timeit(
                lambda: usearch_search(corpus, queries, ARGS.k, metric="ip", exact=True, threads=ARGS.threads), few)
        base = results.get("faiss")
        for name, secs in results.items():
            row = {"section": "fp32", "impl": name, "n": n, "q": nq, "k": ARGS.k, "median_s": round(secs, 5),
                   "x_faiss": round(base / secs, 2) if base else None}
            if nq == 1:
                gbs = corpus.nbytes / secs / 1e9
                row.update(gb_s=round(gbs, 2), pct_bandwidth=round(100 * gbs / limits["read_gb_s"], 1))
            if nq >= 1000:
                gf = 2 * nq * n * ARGS.dim / secs / 1e9
                row.update(gflop_s=round(gf, 1), pct_sgemm=round(100 * gf / limits["sgemm_gflop_s"], 1))
            emit(**row)


def real_embeddings() -> np.ndarray:
    path = ARGS.embeddings
    if os.path.exists(path):
        return np.load(path)
    texts = open(os.path.join(ARGS.data, "throughput", "sentences.txt"), encoding="utf-8").read().splitlines()
    print(f"encoding {len(texts)} sentences once into {path} ...", file=sys.stderr, flush=True)
    emb = embfast.Embedder().encode(texts, batch_size=64, show_progress_bar=True)
    np.save(path, emb)
    return emb


def bench_quantized() -> None:
    emb = real_embeddings()
    rng = np.random.default_rng(0)
    perm = rng.permutation(emb.shape[0])
    queries, corpus = emb[perm[:1000]], emb[perm[1000:]]
    _, exact = kernels.topk_cosine(queries, corpus, ARGS.k, assume_normalized=True)
    for kind in ("int8", "binary"):
        qc = kernels.quantize(corpus, kind)
        for mult in sorted({1, ARGS.rescore_multiplier, 10}):
            _, idx = kernels.topk_quantized(queries, qc, ARGS.k, rescore_multiplier=mult, rescore_vectors=corpus,
                                            assume_normalized=True)
            recall = float(np.mean([len(set(a) & set(b)) / ARGS.k for a, b in zip(idx.tolist(), exact.tolist(),
                                                                                    strict=True)]))
            emit(section="quantized-recall", kind=kind, corpus=len(corpus), queries=1000,
                 rescore_multiplier=mult, recall_at_10=round(recall, 4))
        _, raw = kernels.topk_quantized(queries, qc, ARGS.k)
        recall = float(np.mean([len(set(a) & set(b)) / ARGS.k for a, b in zip(raw.tolist(), exact.tolist(),
                                                                                strict=True)]))
        emit(section="quantized-recall", kind=kind, corpus=len(corpus), queries=1000, rescore_multiplier=None,
             recall_at_10=round(recall, 4))
    # speed at scale: real vectors tiled with noise up to the largest n
    n = max(ARGS.n)
    big = reference.l2_normalize(np.tile(corpus, (n // len(corpus) + 1, 1))[:n]
                                 + 0.01 * rng.standard_normal((n, corpus.shape[1]), dtype=np.float32))
    q1 = queries[:1]
    t_fp32 = timeit(lambda: kernels.topk_cosine(q1, big, ARGS.k, assume_normalized=True), ARGS.repeat)
    emit(section="quantized-speed", kind="fp32", n=n, q=1, median_s=round(t_fp32, 5), x_fp32=1.0)
    for kind in ("int8", "binary"):
        qc = kernels.quantize(big, kind)
        for mult in sorted({ARGS.rescore_multiplier, 10}):
            t = timeit(lambda qc=qc, mult=mult: kernels.topk_quantized(
                q1, qc, ARGS.k, rescore_multiplier=mult, rescore_vectors=big, assume_normalized=True), ARGS.repeat)
            emit(section="quantized-speed", kind=kind, n=n, q=1, rescore_multiplier=mult,
                 median_s=round(t, 5), x_fp32=round(t_fp32 / t, 2))


def bench_pooling() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 256, 384), dtype=np.float32)
    lengths = rng.integers(8, 257, 64)
    mask = (np.arange(256)[None, :] < lengths[:, None]).astype(np.int64)

    def numpy_f32():  # what users write by hand (sentence-transformers' ONNX docs style)
        m = mask[:, :, None].astype(np.float32)
        v = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    impls = {
        "reference (float64 spec)": lambda: reference.l2_normalize(reference.pool(x, mask, "mean")),
        "numpy float32": numpy_f32,
    }
    for b in ("native", "numba"):
        if (b == "native" and kernels.HAS_NATIVE) or (b == "numba" and kernels.HAS_NUMBA):
            impls[f"embfast {b}"] = lambda b=b: kernels.l2_normalize(kernels.mean_pool(x, mask, backend=b),
                                                                     backend=b)
    times = {name: timeit(fn, ARGS.repeat * 4, warmup=2) for name, fn in impls.items()}
    ref = times["reference (float64 spec)"]
    for name, t in times.items():
        emit(section="pooling", impl=name, shape=[64, 256, 384], median_ms=round(t * 1000, 3),
             x_reference=round(ref / t, 1), x_numpy_f32=round(times["numpy float32"] / t, 1))


def main() -> None:
    info = embfast.build_info()
    limits = machine_limits()
    emit(section="machine", cpu=_cpu_name(), cores=os.cpu_count(), threads=ARGS.threads, isa=info["isa"],
         openmp=info["openmp"], **limits)
    sections = ARGS.only or ["pooling", "quantized", "fp32"]
    if "pooling" in sections:
        bench_pooling()
    if "quantized" in sections:
        bench_quantized()
    if "fp32" in sections:
        bench_fp32(limits)
    print("\n| section | impl / kind | n | q | median | ratio | machine limit |", flush=True)
    print("|---|---|---|---|---|---|---|")
    for r in ROWS:
        if r["section"] == "fp32" and "impl" in r:
            lim = (f"{r['gb_s']} GB/s = {r['pct_bandwidth']}% bw" if "gb_s" in r else
                   f"{r['gflop_s']} GFLOP/s = {r['pct_sgemm']}% sgemm" if "gflop_s" in r else "")
            print(f"| fp32 | {r['impl']} | {r['n']:,} | {r['q']} | {r['median_s'] * 1000:.1f} ms | "
                  f"{r['x_faiss']}x faiss | {lim} |")
        elif r["section"] == "quantized-speed":
            print(f"| quantized | {r['kind']} rescore x{r.get('rescore_multiplier')} | {r['n']:,} | 1 | "
                  f"{r['median_s'] * 1000:.2f} ms | "
                  f"{r['x_fp32']}x fp32 | |")
        elif r["section"] == "quantized-recall":
            print(f"| recall@10 | {r['kind']} rescore x{r['rescore_multiplier']} | {r['corpus']:,} | 1000 | "
                  f"{r['recall_at_10']} | | |")
        elif r["section"] == "pooling":
            print(f"| pool+norm | {r['impl']} | (64,256,384) | | {r['median_ms']} ms | "
                  f"{r['x_reference']}x ref, {r['x_numpy_f32']}x numpy f32 | |")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
