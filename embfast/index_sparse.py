"""Sparse vectors beside the dense ones (or alone) in an :class:`embfast.Index`; its sparse and hybrid search.

An index created with ``sparse_encoder=`` (a :class:`~embfast.SparseEncoder`) encodes every text it adds
with ``encode_document`` too and keeps the (n, vocab) CSR rows; ``Index.search(..., mode="sparse")`` ranks by
exact dot product (:mod:`embfast.kernels.sparse`: posting lists built once, rebuilt after adds) and
``mode="hybrid"`` fuses the dense cosine and the sparse dot product of every row (:mod:`embfast.hybrid`;
default: z-scored weighted fusion, 0.3 on the sparse side; ``fusion="rrf"`` for reciprocal rank fusion).
``Index(sparse_encoder=...)`` without an embedder keeps sparse rows only (dim 0; search defaults to sparse).
On disk: three more sections (``sparse.indptr`` int64, ``sparse.indices`` int32, ``sparse.data`` float32), each
sha256-checked like the others, and ``"sparse": {"model", "width", "nnz"}`` in the manifest.
"""

from __future__ import annotations

import numpy as np

SEARCH_MODES = ("dense", "sparse", "hybrid")


def sparse_model_info(encoder) -> dict:
    man = getattr(encoder, "manifest", {}) or {}
    return {"name": man.get("name") or getattr(encoder, "name", None), "source_checksum": man.get("source_checksum"),
            "source": man.get("source"), "vocab_size": int(encoder.vocab_size)}


class SparseRows:
    """(n, width) CSR rows: a base (maybe read from a file) plus rows appended since; posting lists cached."""

    def __init__(self, width: int, base=None):
        import scipy.sparse as sp

        self.width = int(width)
        self.base = base if base is not None else sp.csr_array((0, self.width), dtype=np.float32)
        self.extra: list = []
        self._inverted = None

    def __len__(self) -> int:
        return int(self.base.shape[0]) + sum(int(e.shape[0]) for e in self.extra)

    def append(self, rows) -> None:
        from embfast.kernels.sparse import as_csr

        self.extra.append(as_csr(rows, "sparse rows", self.width))
        self._inverted = None

    def full(self):
        import scipy.sparse as sp

        if self.extra:
            self.base = sp.csr_array(sp.vstack([self.base, *self.extra], format="csr"))
            self.extra = []
        return self.base

    def inverted(self):
        from embfast.kernels.sparse import InvertedIndex

        if self._inverted is None:
            self._inverted = InvertedIndex(self.full())
        return self._inverted

    def write(self, section) -> dict:
        m = self.full()
        section("sparse.indptr", [m.indptr], np.int64, (m.shape[0] + 1,))
        section("sparse.indices", [m.indices], np.int32, (m.nnz,))
        section("sparse.data", [m.data], np.float32, (m.nnz,))
        return {"width": self.width, "nnz": int(m.nnz)}

    @classmethod
    def read(cls, arr, info: dict, n: int) -> SparseRows:
        import scipy.sparse as sp

        base = sp.csr_array((np.asarray(arr("sparse.data")), np.asarray(arr("sparse.indices")),
                             np.asarray(arr("sparse.indptr"))), shape=(n, int(info["width"])))
        return cls(info["width"], base)


def search(index, queries, top_k: int, *, mode: str, fusion: str, sparse_weight: float, batch_size: int
           ) -> list[list[dict]]:
    """``Index.search`` for ``mode`` "sparse" or "hybrid" (see the module docstring).

    Hits: ``{"id", "score", "text", "metadata"}`` best first (ties to the earlier row); hybrid hits also carry
    ``dense_score`` (cosine) and ``sparse_score`` (dot product); ``score`` is the fused score.

    Raises:
        ValueError: an index without sparse rows or sparse encoder, queries that are not texts.
    """
    from embfast.encoder import as_text_list
    from embfast.hybrid import fuse_scores, sparse_scores
    from embfast.kernels.reference import _select_topk
    from embfast.kernels.sparse import topk_sparse

    if index._sparse is None or index.sparse_encoder is None:
        raise ValueError(f"mode={mode!r} needs sparse rows: create the index with Index(embedder, "
                         "sparse_encoder=SparseEncoder(...)) (or load it with sparse_encoder=)")
    if not (isinstance(queries, str) or (isinstance(queries, (list, tuple)) and
                                         all(isinstance(q, str) for q in queries))):
        raise TypeError(f"mode={mode!r} needs text queries (a str or a list of str): the sparse encoder reads them")
    texts, _ = as_text_list(queries, "queries")
    q_sparse = index.sparse_encoder.encode_query(texts, batch_size=batch_size)
    if len(index) == 0:
        return [[] for _ in texts]
    if mode == "sparse":
        scores, idx = topk_sparse(q_sparse, index._sparse.inverted(), top_k)
        extra = None
    else:
        q_dense, _ = index._as_vectors(texts, None, batch_size, "queries")
        dense = q_dense.astype(np.float64) @ np.asarray(index._vectors.full(), dtype=np.float64).T
        sparse = sparse_scores(q_sparse, index._sparse.full())
        fused = fuse_scores(dense, sparse, fusion=fusion, sparse_weight=sparse_weight)
        scores, idx = _select_topk(fused, top_k)
        extra = (dense, sparse)
    out = []
    for r, (s_row, i_row) in enumerate(zip(scores.tolist(), idx.tolist(), strict=True)):
        hits = []
        for s, i in zip(s_row, i_row, strict=True):
            if i < 0:
                continue
            hit = {"id": index.id_at(i), "score": s, "text": index.text_at(i), "metadata": index.metadata_at(i)}
            if extra is not None:
                hit["dense_score"], hit["sparse_score"] = float(extra[0][r, i]), float(extra[1][r, i])
            hits.append(hit)
        out.append(hits)
    return out
