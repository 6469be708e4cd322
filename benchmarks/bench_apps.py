"""Apps on embeddings: paraphrase mining and community detection vs sentence-transformers, k-means vs
scikit-learn and faiss, peak memory; one run, side by side.

python benchmarks/bench_apps.py --data ../shared/data --sizes 20000 87938 --threads 2

The vectors: real sentences from throughput/sentences.txt (the first N), embedded once by embfast with
all-MiniLM-L6-v2 fp32 (cached in --cache). Each timed call runs in a fresh subprocess, so that its peak
resident memory (ru_maxrss, minus the process's size before the call) is its own; times are medians of
--repeat runs (one for the slow ones above 50k rows). sentence-transformers runs its defaults
(paraphrase_mining_embeddings: top_k=100, max_pairs=500,000; community_detection: threshold 0.75,
min_community_size 10). Agreement with sentence-transformers is reported beside each ratio.

--mining-1m N: the memory of mining N synthetic unit vectors (dim 384): the first row blocks of the join
(the heaps are allocated up front and every tile is the same size, so the peak is reached early) and the
pair-selection phase on heaps of the full size; the full join is not run (about 2 hours on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 87938])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cache", default="bench-apps-cache", help="folder for the embedded vectors")
    p.add_argument("--kmeans-k", type=int, default=100)
    p.add_argument("--mining-1m", type=int, default=1_000_000, help="rows for the memory check (0: skip)")
    p.add_argument("--tasks", nargs="+", default=["mining", "community", "kmeans"],
                   choices=["mining", "community", "kmeans"], help="what to measure (default: all three)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one measurement in a subprocess
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args()


ARGS = _parse()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def rss_mib() -> float:
    """Peak RSS of this process, MiB: VmHWM on Linux (ru_maxrss survives exec, so a child started by a big
    parent would inherit the parent's peak and report no growth), ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vectors(n: int) -> np.ndarray:
    path = Path(ARGS.cache) / f"minilm-{n}.npy"
    if not path.exists():
        import embfast
        from embfast.text import read_lines

        texts = [t for t in read_lines(Path(ARGS.data) / "throughput" / "sentences.txt") if t.strip()][:n]
        if len(texts) < n:
            raise SystemExit(f"only {len(texts)} sentences in {ARGS.data}/throughput/sentences.txt, asked {n}")
        path.parent.mkdir(parents=True, exist_ok=True)
        v = embfast.Embedder(threads=ARGS.threads).encode(texts)
        np.save(path, v)
    return np.load(path)


def measure(what: str, n: int) -> dict:
    """Run one measurement (``--only what``) in a fresh process; returns its JSON line."""
    cmd = [sys.executable, __file__, "--only", what, "--n", str(n), "--data", ARGS.data, "--cache", ARGS.cache,
           "--threads", str(ARGS.threads), "--kmeans-k", str(ARGS.kmeans_k)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{what} n={n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def one(what: str, n: int) -> None:
    """Inside the subprocess: load, note the memory, run, print {seconds, peak_mib, result}.

    Each side imports only what it runs, before the clock starts: torch's thread pool, loaded into an
    embfast run, slows embfast's own kernels (its idle OpenMP threads compete for the 2 cores), and no
    embfast user has torch loaded at inference time."""
    if what.startswith("mining-1m"):
        return one_1m(what, n)
    x = vectors(n)
    if what.startswith("st-"):
        import torch
        from sentence_transformers import util

        torch.set_num_threads(ARGS.threads)
    if what == "sk-kmeans":
        from sklearn.cluster import KMeans

    import embfast
    from embfast.mining import unit_rows

    if what == "faiss-kmeans":
        import faiss

        faiss.omp_set_num_threads(ARGS.threads)
    base = rss_mib()
    t0 = time.perf_counter()
    if what == "st-mining":
        res = util.paraphrase_mining_embeddings(torch.from_numpy(x))
        res = [[float(s), int(i), int(j)] for s, i, j in res]
    elif what == "ef-mining":
        res = [list(p) for p in embfast.paraphrase_mining(x, threads=ARGS.threads)]
    elif what == "st-community":
        res = util.community_detection(torch.from_numpy(x), threshold=0.75, min_community_size=10)
    elif what == "ef-community":
        res = embfast.community_detection(x, threshold=0.75, min_community_size=10)
    elif what == "sk-kmeans":
        km = KMeans(n_clusters=ARGS.kmeans_k, n_init=1, max_iter=25, random_state=0).fit(unit_rows(x))
        res = float(km.inertia_)
    elif what == "faiss-kmeans":
        u = unit_rows(x)
        km = faiss.Kmeans(u.shape[1], ARGS.kmeans_k, niter=25, seed=0, verbose=False)
        km.train(u)
        _, lab = km.index.search(u, 1)
        res = float(((u - km.centroids[lab[:, 0]]) ** 2).sum())
    else:
        raise SystemExit(f"unknown measurement {what}")
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "peak_mib": rss_mib() - base, "result": res}))


def one_1m(what: str, n: int) -> None:
    from embfast import mining

    rng = np.random.default_rng(0)
    path = Path(ARGS.cache) / f"synthetic-{n}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 384))
        for a in range(0, n, 100_000):
            out[a:a + 100_000] = rng.standard_normal((min(100_000, n - a), 384), dtype=np.float32)
        out.flush()
        del out
    x = np.load(path, mmap_mode="r")
    base = rss_mib()
    t0 = time.perf_counter()

    class Enough(Exception):
        pass

    done = [0]

    def stop_after_two_blocks(rows: int) -> None:
        done[0] += rows
        if done[0] >= 2 * mining.SELF_TILE:
            raise Enough

    try:
        mining.paraphrase_mining(x, top_k=100, progress=stop_after_two_blocks)
    except Enough:
        pass
    join_peak = rss_mib() - base
    join_secs = time.perf_counter() - t0
    # the pair-selection phase at full size, on heaps shaped as the join leaves them
    heap_s = np.sort(rng.random((n, 101), dtype=np.float32), axis=1)[:, ::-1].copy()
    heap_j = rng.integers(0, n, (n, 101), dtype=np.int64)
    t1 = time.perf_counter()
    pairs = mining.pairs_from_neighbours(heap_s, heap_j)
    print(json.dumps({"seconds": join_secs, "select_seconds": time.perf_counter() - t1, "join_peak_mib": join_peak,
                      "peak_mib": rss_mib() - base, "rows_joined": done[0], "pairs": len(pairs), "result": None}))


def agreement_mining(a: list, b: list) -> str:
    sa = {(i, j): s for s, i, j in a}
    sb = {(i, j): s for s, i, j in b}
    common = set(sa) & set(sb)
    diff = max((abs(sa[p] - sb[p]) for p in common), default=0.0)
    return f"{len(common) / max(len(sb), 1):.5f} of pairs shared, max score diff {diff:.1e}"


def agreement_communities(a: list, b: list) -> str:
    same = sum(set(x) == set(y) for x, y in zip(a, b, strict=False))
    central = sum(x[0] == y[0] for x, y in zip(a, b, strict=False))
    return f"{len(a)} vs {len(b)} communities, {same} identical sets, {central} same central element"


def main() -> None:
    if ARGS.only:
        return one(ARGS.only, ARGS.n)
    import embfast

    info = embfast.build_info()
    print(f"# embfast {info['version']} native={info['native']} isa={info['isa']} threads={ARGS.threads}, "
          f"{os.cpu_count()} cores")
    rows = []
    for n in ARGS.sizes:
        vectors(n)  # embed once, outside any timing
        reps = ARGS.repeat if n <= 50_000 else 1
        for task, ours, theirs, agree in (("paraphrase mining", "ef-mining", "st-mining", agreement_mining),
                                          ("community detection", "ef-community", "st-community",
                                           agreement_communities)):
            if ours[3:] not in ARGS.tasks:
                continue
            ef, st = [], []
            for _ in range(reps):  # alternating, so that a drift of the machine's speed hits both sides alike
                ef.append(measure(ours, n))
                st.append(measure(theirs, n))
            t_ef = statistics.median(r["seconds"] for r in ef)
            t_st = statistics.median(r["seconds"] for r in st)
            rows.append((task, n, t_st, t_ef, t_st / t_ef, st[0]["peak_mib"], ef[0]["peak_mib"],
                         agree(ef[0]["result"], st[0]["result"])))
            print(f"| {task} | {n:,} | {t_st:.2f} | {t_ef:.2f} | **{t_st / t_ef:.2f}x** | {st[0]['peak_mib']:.0f} | "
                  f"{ef[0]['peak_mib']:.0f} | {rows[-1][-1]} |", flush=True)
    n = max(ARGS.sizes)
    if "kmeans" in ARGS.tasks:
        sk = measure("sk-kmeans", n)
        try:
            fa = measure("faiss-kmeans", n)
        except SystemExit as exc:
            fa = None
            print(f"faiss k-means skipped: {str(exc)[:200]}")
        print(f"\nk-means, {n:,} vectors, k={ARGS.kmeans_k}, 25 iterations, 1 init: scikit-learn {sk['seconds']:.2f} s "
              f"(inertia {sk['result']:.1f})" + (f", faiss {fa['seconds']:.2f} s (inertia {fa['result']:.1f}), faiss "
                                                 f"{sk['seconds'] / fa['seconds']:.2f}x" if fa else ""))
    if ARGS.mining_1m:
        m = measure("mining-1m", ARGS.mining_1m)
        print(f"\nmining {ARGS.mining_1m:,} x 384 (memory-mapped input): peak {m['join_peak_mib']:.0f} MiB during the "
              f"join ({m['rows_joined']:,} rows joined in {m['seconds']:.1f} s), {m['peak_mib']:.0f} MiB with the "
              f"pair selection ({m['select_seconds']:.1f} s, {m['pairs']:,} pairs)")


if __name__ == "__main__":
    main()
