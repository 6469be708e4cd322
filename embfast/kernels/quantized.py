"""Quantized corpora for search at scale: int8 and packed-bit binary, with optional float rescoring.

- ``quantize(corpus, "int8")``: sentence-transformers' int8 (per-dimension calibration
  ranges [min, max], 256 levels, minus 128); queries are quantized with the same ranges
  and candidates ranked by the exact int32 dot product.
- ``quantize(corpus, "binary")``: bits of x > 0 packed 8 per byte ("ubinary");
  candidates ranked by bits - Hamming distance (popcount).
- ``topk_quantized(queries, qcorpus, k, rescore_multiplier=4, rescore_vectors=...)``:
  take ``rescore_multiplier * k`` candidates from the quantized corpus, then rank them
  by the exact float score of the float query against ``rescore_vectors`` (the float
  corpus, in memory or memory-mapped from disk). Without rescore vectors the scores are
  cosine estimates, on the same scale as every other search so that one threshold works
  everywhere: int8, the cosine of the float query with the dequantized row (each code at
  its bucket's centre; the k candidates are re-ordered by it); binary,
  ``1 - 2 * hamming / dim`` (the order of the Hamming ranking).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embfast.kernels import reference

KINDS = ("int8", "binary")


@dataclass
class QuantizedCorpus:
    """A quantized corpus.

    Attributes:
        kind: "int8" or "binary".
        codes: (n, dim) int8, or (n, ceil(dim / 8)) uint8 packed bits.
        dim: the float dimension.
        ranges: (2, dim) float32 calibration ranges for int8 (None for binary).
    """

    kind: str
    codes: np.ndarray
    dim: int
    ranges: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def encode_queries(self, queries: np.ndarray) -> np.ndarray:
        """Quantize float queries (q, dim) like the corpus."""
        if self.kind == "int8":
            return reference.quantize_int8(queries, self.ranges)
        return reference.quantize_binary(queries)


def quantize(corpus, kind: str, *, ranges: np.ndarray | None = None,
             calibration: np.ndarray | None = None) -> QuantizedCorpus:
    """Quantize a float corpus (n, dim).

    Args:
        kind: "int8" or "binary".
        ranges: int8 calibration ranges (2, dim); default from ``calibration`` or the corpus itself.
    """
    from embfast.kernels import as_float32

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    c = as_float32(corpus, "corpus", 2)
    if kind == "binary":
        return QuantizedCorpus("binary", reference.quantize_binary(c), c.shape[1])
    if ranges is None:
        src = c if calibration is None else as_float32(calibration, "calibration", 2)
        if src.shape[0] == 0:
            raise ValueError("int8 quantization needs a non-empty corpus or calibration set for its ranges")
        ranges = reference.int8_ranges(src)
    ranges = np.asarray(ranges, dtype=np.float32)
    if ranges.shape != (2, c.shape[1]):
        raise ValueError(f"ranges must have shape (2, {c.shape[1]}), got {ranges.shape}")
    return QuantizedCorpus("int8", reference.quantize_int8(c, ranges), c.shape[1], ranges)


def _cosine_estimates(q: np.ndarray, qcorpus: QuantizedCorpus, raw: np.ndarray,
                      idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantized scores -> cosine estimates, best first (ties to the lower row)."""
    if qcorpus.kind == "binary":
        hamming = qcorpus.codes.shape[1] * 8 - raw  # padding bits are 0 in both, so they never differ
        return (1.0 - 2.0 * hamming / qcorpus.dim).astype(np.float32), idx
    est = np.full(raw.shape, np.nan, dtype=np.float32)
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), np.float32(1e-12))
    for row in range(q.shape[0]):
        ok = idx[row] >= 0
        deq = reference.dequantize_int8(qcorpus.codes[idx[row][ok]], qcorpus.ranges)
        norms = np.maximum(np.linalg.norm(deq, axis=1), np.float32(1e-12))
        est[row, ok] = (deq @ qn[row]) / norms
    order = np.lexsort((idx, -np.nan_to_num(est, nan=-np.inf)), axis=1)
    return np.take_along_axis(est, order, axis=1), np.take_along_axis(idx, order, axis=1)


def topk_quantized(queries, qcorpus: QuantizedCorpus, k: int, *, rescore_multiplier: int = 4,
                   rescore_vectors: np.ndarray | None = None, assume_normalized: bool = False, threads: int = 0,
                   backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Top-k of float queries (q, dim) over a quantized corpus, optionally rescored in float.

    Returns scores (q, min(k, n)) float32 and indices (q, min(k, n)) int64, best first.
    Scores are cosine similarities when rescored (inner products with
    ``assume_normalized``), else cosine estimates (see the module docstring). The raw
    quantized scores (int8 dot products, bits - Hamming) come from ``kernels.topk_int8`` /
    ``kernels.topk_hamming``.
    """
    from embfast import kernels

    k = kernels._check_k(k)
    q = kernels.as_float32(queries, "queries", 2)
    if q.shape[1] != qcorpus.dim:
        raise ValueError(f"queries have dim {q.shape[1]} but the quantized corpus has dim {qcorpus.dim}")
    if rescore_multiplier < 1:
        raise ValueError(f"rescore_multiplier must be >= 1, got {rescore_multiplier}")
    n = len(qcorpus)
    if rescore_vectors is not None and rescore_vectors.shape != (n, qcorpus.dim):
        raise ValueError(f"rescore_vectors must have shape ({n}, {qcorpus.dim}), got {rescore_vectors.shape}")
    candidates = min(n, k * rescore_multiplier) if rescore_vectors is not None else min(n, k)
    qq = qcorpus.encode_queries(q)
    if qcorpus.kind == "int8":
        s, idx = kernels.topk_int8(qq, qcorpus.codes, candidates, threads=threads, backend=backend)
    else:
        s, idx = kernels.topk_hamming(qq, qcorpus.codes, candidates, threads=threads, backend=backend)
    if rescore_vectors is None or k == 0:
        return _cosine_estimates(q, qcorpus, s[:, :k], idx[:, :k])
    kk = min(k, n)
    out_s = np.full((q.shape[0], kk), np.nan, dtype=np.float32)
    out_i = np.full((q.shape[0], kk), -1, dtype=np.int64)
    for row in range(q.shape[0]):
        cand = idx[row][idx[row] >= 0]
        cand.sort()  # sorted indices: ties resolve to the lower index; sequential reads from a memmap
        vecs = kernels.as_float32(rescore_vectors[cand], "rescore_vectors", 2)
        rs, ri = kernels.topk_cosine(q[row:row + 1], vecs, kk, assume_normalized=assume_normalized, threads=1,
                                     backend=backend)
        m = int((ri[0] >= 0).sum())
        out_s[row, :m] = rs[0, :m]
        out_i[row, :m] = cand[ri[0, :m]]
    return out_s, out_i
