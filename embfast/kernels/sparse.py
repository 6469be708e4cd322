"""Exact top-k by dot product over sparse vectors (SPLADE, BM25): an inverted index and a numba kernel.

The corpus (n, vocab) CSR is turned once into posting lists (its CSC: for each vocabulary id, the rows
holding it and their weights), as term-at-a-time retrieval does (Zobel & Moffat, "Inverted files for
text search engines", 2006). A query then touches only the rows that share a term with it: for each
of its non-zero terms ``t`` with weight ``w``, ``acc[row] += w * weight`` over ``t``'s postings, in
float64; the best ``k`` touched rows are kept in a bounded heap. The answer is the exact top-k of the
full score row ``query @ corpus.T``: ranked by score descending, ties to the lower row; rows that share
no term score 0 and fill the list after the positive ones, lowest row first (then negative scores, for
corpora with negative weights), exactly as :func:`reference_topk_sparse` orders them; ``k`` clamps to n.

Threads: queries are split into ``threads`` blocks (numba ``prange``); each block owns a (n,) float64
accumulator and a seen-flag array, reset through its touched list (no O(n) clear per query).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["InvertedIndex", "reference_topk_sparse", "topk_sparse"]


def _sp():
    try:
        import scipy.sparse as sp
    except ImportError as exc:  # pragma: no cover
        raise ImportError("sparse search needs scipy: pip install 'embfast[sparse]'") from exc
    return sp


def as_csr(x, name: str, width: int | None = None):
    """A ``scipy.sparse.csr_array`` of float32 with sorted, summed entries (a visible copy where needed).

    Accepts any scipy sparse array / matrix, or a 1-D / 2-D dense array (one row per vector).

    Raises:
        TypeError: not an array. ValueError: a width other than ``width``, non-finite values.
    """
    sp = _sp()
    if sp.issparse(x):
        m = x.reshape(1, -1) if x.ndim == 1 else x
        m = sp.csr_array(m, dtype=np.float32)
    elif isinstance(x, np.ndarray) or isinstance(x, (list, tuple)):
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiub" or arr.ndim not in (1, 2):
            raise TypeError(f"{name} must be a scipy sparse array or a 1-D / 2-D numeric array, got dtype "
                            f"{arr.dtype} shape {arr.shape}")
        m = sp.csr_array(np.atleast_2d(arr).astype(np.float32))
    else:
        raise TypeError(f"{name} must be a scipy sparse array (csr_array) or a numeric array, got {type(x).__name__}")
    if width is not None and m.shape[1] != width:
        raise ValueError(f"{name} has {m.shape[1]} columns but the corpus has {width}; encode both with the same model")
    m.sum_duplicates()
    if m.nnz and not np.isfinite(m.data).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return m


class InvertedIndex:
    """Posting lists of a sparse corpus: for each column (vocabulary id), its rows and weights.

    Args:
        corpus: (n, vocab) sparse vectors (any scipy sparse format, or dense).

    Attributes:
        n (rows), width (columns), indptr (width + 1,) int64, rows (nnz,) int32, weights (nnz,) float32:
        the CSC arrays, rows ascending within each column.
    """

    def __init__(self, corpus):
        m = as_csr(corpus, "corpus")
        csc = m.tocsc()
        csc.sort_indices()
        self.n, self.width = int(m.shape[0]), int(m.shape[1])
        self.indptr = csc.indptr.astype(np.int64)
        self.rows = csc.indices.astype(np.int32)
        self.weights = csc.data.astype(np.float32)

    @property
    def nnz(self) -> int:
        return int(self.weights.size)

    def __repr__(self) -> str:
        return f"InvertedIndex({self.n} rows x {self.width} columns, {self.nnz} non-zeros)"


def reference_topk_sparse(queries, corpus, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The spec: the full float64 score matrix ``queries @ corpus.T`` and best-first selection (higher
    first, ties to the lower row, k clamped to n). Returns scores (q, min(k, n)) float32 and rows int64."""
    from embfast.kernels.reference import _select_topk

    q = as_csr(queries, "queries").astype(np.float64)
    c = as_csr(corpus, "corpus", q.shape[1]).astype(np.float64)
    scores = (q @ c.T).toarray()
    return _select_topk(scores, k)


def _threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
        raise ValueError(f"threads must be an int >= 0 (0 = all cores), got {threads!r}")
    if threads:
        return int(threads)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


def topk_sparse(queries, corpus, k: int, *, threads: int = 0, backend: str = "auto"
                ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows of ``corpus`` by dot product with each query (see the module docstring).

    Args:
        queries: (q, vocab) or (vocab,) sparse vectors (scipy sparse or dense).
        corpus: (n, vocab) sparse vectors, or an :class:`InvertedIndex` built from them (reuse it across
            calls: building costs one CSR -> CSC conversion).
        k: results per query (>= 0; clamps to n).
        threads: 0 = all cores (default), 1 = serial; never more threads than queries.
        backend: "auto" (numba when installed, else the reference), "numba" or "reference".

    Returns:
        scores (q, min(k, n)) float32 and rows (q, min(k, n)) int64, best first.

    Raises:
        TypeError / ValueError: bad arrays, widths that differ, k < 0. RuntimeError: numba asked for and missing.
    """
    from embfast.kernels import HAS_NUMBA, _check_k

    k = _check_k(k)
    if backend not in ("auto", "numba", "reference"):
        raise ValueError(f"backend must be one of auto, numba, reference, got {backend!r}")
    if backend == "numba" and not HAS_NUMBA:
        raise RuntimeError("backend='numba' asked for, but numba is not installed: pip install 'embfast[numba]'")
    index = corpus if isinstance(corpus, InvertedIndex) else InvertedIndex(corpus)
    q = as_csr(queries, "queries", index.width)
    nq, kk = q.shape[0], min(k, index.n)
    if backend == "reference" or (backend == "auto" and not HAS_NUMBA):
        from embfast.kernels.reference import _select_topk

        c = _sp().csc_array((index.weights.astype(np.float64), index.rows, index.indptr),
                            shape=(index.n, index.width))
        return _select_topk((q.astype(np.float64) @ c.T).toarray(), k)
    out_s = np.zeros((nq, kk), np.float32)
    out_i = np.full((nq, kk), -1, np.int64)
    if nq == 0 or kk == 0:
        return out_s, out_i
    blocks = max(1, min(_threads(threads), nq))
    import numba

    old = numba.get_num_threads()
    numba.set_num_threads(min(blocks, numba.config.NUMBA_NUM_THREADS))
    try:
        from embfast.kernels._numba_sparse import topk_inverted

        topk_inverted(q.indptr.astype(np.int64), q.indices.astype(np.int64), q.data.astype(np.float32), index.indptr,
                  index.rows, index.weights, index.n, kk, blocks, out_s, out_i)
    finally:
        numba.set_num_threads(old)
    return out_s, out_i
