"""MTEB-style evaluation: STS (cosine Spearman) and BEIR retrieval (nDCG@10, recall@100).

Scored as MTEB scores them: STS embeds both sentences and correlates cosine
similarity with the gold score (Spearman, average ranks for ties); retrieval
embeds ``(title + " " + text).strip()`` documents and the queries, ranks by
cosine (top 1000), and computes nDCG@k with linear gains from the qrels and a
log2 discount, as pytrec_eval does, averaged over queries that have qrels.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from embfast import kernels


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata's 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation: Pearson correlation of average ranks."""
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def load_sts(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """STS pairs from a .jsonl (sentence1, sentence2, score) or a .tsv (score, sentence1, sentence2)."""
    path = Path(path)
    s1, s2, scores = [], [], []
    with open(path, encoding="utf-8") as fh:
        if path.suffix == ".jsonl":
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    s1.append(row["sentence1"])
                    s2.append(row["sentence2"])
                    scores.append(float(row["score"]))
                except (ValueError, KeyError) as exc:
                    raise ValueError(f"{path}:{n}: expected JSON with sentence1, sentence2, score ({exc})") from exc
        else:
            for n, line in enumerate(fh, 1):
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 3:
                    raise ValueError(f"{path}:{n}: expected score<TAB>sentence1<TAB>sentence2")
                scores.append(float(parts[0]))
                s1.append(parts[1])
                s2.append(parts[2])
    return s1, s2, np.asarray(scores)


def evaluate_sts(embedder, path: str | Path, *, batch_size: int = 32) -> dict:
    """Cosine Spearman (and Pearson) of an embedder on an STS file."""
    s1, s2, gold = load_sts(path)
    e1 = embedder.encode(s1, batch_size=batch_size, normalize_embeddings=True)
    e2 = embedder.encode(s2, batch_size=batch_size, normalize_embeddings=True)
    cos = (e1.astype(np.float64) * e2).sum(axis=1)
    pearson = float(np.corrcoef(cos, gold)[0, 1])
    return {"task": "sts", "pairs": len(gold), "cosine_spearman": spearman(cos, gold), "cosine_pearson": pearson}


def _first_existing(folder: Path, names: list[str]) -> Path:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    raise FileNotFoundError(f"{folder}: none of {names} found")


def load_beir(folder: str | Path, split: str = "test"):
    """A BEIR folder: corpus.jsonl, queries(_split).jsonl, qrels (qrels_split.tsv or qrels/split.tsv)."""
    folder = Path(folder)
    corpus_ids, docs = [], []
    with open(_first_existing(folder, ["corpus.jsonl"]), encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                d = json.loads(line)
                corpus_ids.append(str(d["_id"]))
                docs.append((d.get("title", "") + " " + d.get("text", "")).strip())
    queries = {}
    with open(_first_existing(folder, [f"queries_{split}.jsonl", "queries.jsonl"]), encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                q = json.loads(line)
                queries[str(q["_id"])] = q["text"]
    qrels: dict[str, dict[str, int]] = {}
    with open(_first_existing(folder, [f"qrels_{split}.tsv", f"qrels/{split}.tsv"]), encoding="utf-8") as fh:
        for row in csv.reader(fh, delimiter="\t"):
            if not row or row[0] == "query-id":
                continue
            qrels.setdefault(row[0].strip(), {})[row[1].strip()] = int(row[2])
    return corpus_ids, docs, queries, qrels


def ndcg_at_k(ranked: list[str], rels: dict[str, int], k: int) -> float:
    """nDCG@k with linear gains (pytrec_eval's ndcg_cut)."""
    dcg = sum(rels.get(d, 0) / np.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((g for g in rels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def _scores(idx: np.ndarray, qids: list[str], corpus_ids: list[str], qrels: dict) -> dict:
    ndcg, recall = [], []
    for row, qid in enumerate(qids):
        ranked = [corpus_ids[i] for i in idx[row] if i >= 0]
        rels = qrels[qid]
        ndcg.append(ndcg_at_k(ranked, rels, 10))
        relevant = {d for d, g in rels.items() if g > 0}
        recall.append(len(relevant & set(ranked[:100])) / max(len(relevant), 1))
    return {"ndcg_at_10": float(np.mean(ndcg)), "recall_at_100": float(np.mean(recall))}


def evaluate_retrieval(embedder, folder: str | Path, *, split: str = "test", batch_size: int = 32,
                       top_k: int = 1000, sparse=None, hybrid: str | None = None,
                       sparse_weight: float | None = None) -> dict:
    """nDCG@10 and recall@100 on a BEIR folder (queries with qrels only): dense, sparse or hybrid.

    Args:
        embedder: an :class:`~embfast.Embedder` (cosine, exact top-k), or None with ``sparse`` alone.
        sparse: a :class:`~embfast.SparseEncoder` or :class:`~embfast.bm25.BM25Encoder` (anything with
            ``encode_query`` / ``encode_document`` returning sparse rows): exact dot-product top-k
            (:func:`embfast.sparse_search`). Without ``hybrid`` only the sparse model is scored.
        hybrid: "rrf" or "weighted" (needs both models): the fused ranking is scored too, and dense and
            sparse alone are reported beside it (:mod:`embfast.hybrid`).
        sparse_weight: the weighted fusion's weight on the sparse side (default 0.3).

    Returns:
        ``{"task", "queries", "documents", "ndcg_at_10", "recall_at_100"}`` for the ranking asked for
        (hybrid > sparse > dense), plus ``"dense"`` / ``"sparse"`` / ``"hybrid"`` sub-results when several
        were computed.
    """
    from embfast.hybrid import DEFAULT_SPARSE_WEIGHT, fuse_scores, sparse_scores
    from embfast.kernels.reference import _select_topk
    from embfast.kernels.sparse import topk_sparse

    corpus_ids, docs, queries, qrels = load_beir(folder, split)
    qids = [q for q in queries if q in qrels]
    qtexts = [queries[q] for q in qids]
    out: dict = {"task": "retrieval", "queries": len(qids), "documents": len(docs)}
    results = {}
    if hybrid is not None and (embedder is None or sparse is None):
        raise ValueError("hybrid evaluation needs a dense model and a sparse model")
    if embedder is not None and (sparse is None or hybrid is not None):
        doc_emb = embedder.encode(docs, batch_size=batch_size, normalize_embeddings=True)
        q_emb = embedder.encode(qtexts, batch_size=batch_size, normalize_embeddings=True)
        _, idx = kernels.topk_cosine(q_emb, doc_emb, top_k, assume_normalized=True)
        results["dense"] = _scores(idx, qids, corpus_ids, qrels)
    if sparse is not None:
        doc_sp = sparse.encode_document(docs, batch_size=batch_size)
        q_sp = sparse.encode_query(qtexts, batch_size=batch_size)
        _, idx = topk_sparse(q_sp, doc_sp, top_k)
        results["sparse"] = _scores(idx, qids, corpus_ids, qrels)
        results["sparse"]["avg_nnz_document"] = round(doc_sp.nnz / max(doc_sp.shape[0], 1), 1)
    if hybrid is not None:
        dense = q_emb.astype(np.float64) @ doc_emb.astype(np.float64).T
        w = DEFAULT_SPARSE_WEIGHT if sparse_weight is None else sparse_weight
        fused = fuse_scores(dense, sparse_scores(q_sp, doc_sp), fusion=hybrid, sparse_weight=w)
        _, idx = _select_topk(fused, top_k)
        results["hybrid"] = {"fusion": hybrid, **({"sparse_weight": w} if hybrid == "weighted" else {}),
                             **_scores(idx, qids, corpus_ids, qrels)}
    main = results.get("hybrid") or results.get("sparse") or results["dense"]
    out.update({"ndcg_at_10": main["ndcg_at_10"], "recall_at_100": main["recall_at_100"]})
    if len(results) > 1:
        out.update(results)
    return out
