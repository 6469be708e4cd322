"""Exact semantic search over embeddings, with sentence-transformers' result shape."""

from __future__ import annotations

import numpy as np

from embfast import kernels


def semantic_search(query_embeddings, corpus_embeddings, top_k: int = 10, *, threads: int = 0,
                    assume_normalized: bool = False) -> list[list[dict]]:
    """Cosine-similarity top-k, like ``sentence_transformers.util.semantic_search``.

    Args:
        query_embeddings: (dim,) or (q, dim) float array.
        corpus_embeddings: (n, dim) float array.
        top_k: results per query; larger than the corpus returns the whole corpus.
        assume_normalized: skip the norms (inner product) when rows are unit length.

    Returns:
        One list per query of ``{"corpus_id": int, "score": float}``, best first;
        ties go to the lower corpus id; a NaN score is never returned.

    Raises:
        ValueError: a dimension mismatch or a wrong ndim; TypeError: a non-integer top_k.
    """
    q = np.asarray(query_embeddings)
    if q.ndim == 1:
        q = q[None, :]
    c = np.asarray(corpus_embeddings)
    if c.ndim != 2:
        raise ValueError(f"corpus_embeddings must be 2-D (corpus_size, dim), got shape {c.shape}")
    if c.shape[0] == 0:
        kernels._check_k(top_k)
        return [[] for _ in range(q.shape[0])]
    scores, idx = kernels.topk_cosine(q, c, top_k, threads=threads, assume_normalized=assume_normalized)
    results = []
    for s_row, i_row in zip(scores.tolist(), idx.tolist(), strict=True):
        results.append([{"corpus_id": i, "score": s} for s, i in zip(s_row, i_row, strict=True) if i >= 0])
    return results


def sparse_search(query_rows, corpus, top_k: int = 10, *, threads: int = 0) -> list[list[dict]]:
    """Exact dot-product top-k over sparse vectors (SPLADE, BM25), with semantic_search's result shape.

    Args:
        query_rows: (q, vocab) or (vocab,) sparse vectors: a ``scipy.sparse`` array / matrix (what
            :meth:`embfast.SparseEncoder.encode` returns) or a dense array.
        corpus: (n, vocab) sparse vectors, or an :class:`embfast.kernels.sparse.InvertedIndex` of them
            (build it once to search a corpus many times).
        top_k: results per query (>= 0); larger than the corpus returns the whole corpus.
        threads: 0 = all cores (default), 1 = serial.

    Returns:
        One list per query of ``{"corpus_id": int, "score": float}``, best first; ties go to the lower
        corpus id; rows sharing no term with the query score 0 and come after every positive score.
        Algorithm: posting lists per vocabulary id, term-at-a-time accumulation, a bounded heap
        (:mod:`embfast.kernels.sparse`, numba; the NumPy / scipy reference without numba).

    Raises:
        TypeError / ValueError: not sparse vectors, widths that differ, NaN weights, top_k < 0.
    """
    from embfast.kernels.sparse import topk_sparse

    scores, idx = topk_sparse(query_rows, corpus, top_k, threads=threads)
    return [[{"corpus_id": i, "score": s} for s, i in zip(s_row, i_row, strict=True) if i >= 0]
            for s_row, i_row in zip(scores.tolist(), idx.tolist(), strict=True)]
