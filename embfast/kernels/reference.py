"""The executable spec: one short, obviously correct NumPy function per kernel.

Every other backend (native C++, numba) is tested against these, computed in
float64. Shapes: token vectors ``x`` are (batch, seq_len, hidden); ``mask`` is
(batch, seq_len), nonzero = real token.
"""

from __future__ import annotations

import numpy as np

POOLING_MODES = ("mean", "cls", "max", "lasttoken", "mean_sqrt_len")


def pool(x: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Pool token vectors to one vector per row.

    - ``mean``: masked sum / max(count, 1e-9); an all-padding row gives zeros.
    - ``mean_sqrt_len``: masked sum / sqrt(count); all-padding gives zeros.
    - ``cls``: the first token, whatever the mask (as sentence-transformers).
    - ``max``: element-wise max over real tokens; all-padding gives zeros.
    - ``lasttoken``: the last position whose mask is nonzero (right or left
      padding alike); all-padding gives zeros.

    Returns (batch, hidden) float32.
    """
    x64 = np.asarray(x, dtype=np.float64)
    m = np.asarray(mask) != 0
    batch, _, hidden = x64.shape
    count = m.sum(axis=1)
    if mode == "cls":
        out = x64[:, 0, :]
    elif mode in ("mean", "mean_sqrt_len"):
        summed = (x64 * m[:, :, None]).sum(axis=1)
        denom = np.maximum(count, 1e-9) if mode == "mean" else np.sqrt(np.maximum(count, 1e-18))
        out = summed / denom[:, None]
        out[count == 0] = 0.0
    elif mode == "max":
        masked = np.where(m[:, :, None], x64, -np.inf)
        out = masked.max(axis=1) if x64.shape[1] else np.zeros((batch, hidden))
        out[count == 0] = 0.0
    elif mode == "lasttoken":
        out = np.zeros((batch, hidden))
        for b in range(batch):
            pos = np.flatnonzero(m[b])
            if pos.size:
                out[b] = x64[b, pos[-1]]
    else:
        raise ValueError(f"pool: mode must be one of {', '.join(POOLING_MODES)}, got {mode!r}")
    return out.astype(np.float32)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by max(||row||, 1e-12): zero rows stay zero, never NaN. (rows, dim) float32."""
    x64 = np.asarray(x, dtype=np.float64)
    norms = np.sqrt((x64 * x64).sum(axis=1, keepdims=True))
    return (x64 / np.maximum(norms, 1e-12)).astype(np.float32)


def _select_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-first selection per row of (q, n) float64 scores.

    Higher first, ties to the lower index, NaN never returned; k clamps to n.
    Slots left when fewer than k scores are valid hold score NaN and index -1.
    """
    q, n = scores.shape
    k = min(k, n)
    out_s = np.full((q, k), np.nan, dtype=np.float32)
    out_i = np.full((q, k), -1, dtype=np.int64)
    for r in range(q):
        valid = np.flatnonzero(~np.isnan(scores[r]))
        order = valid[np.lexsort((valid, -scores[r, valid]))][:k]
        out_s[r, : order.size] = scores[r, order]
        out_i[r, : order.size] = order
    return out_s, out_i


def topk_cosine(
    queries: np.ndarray, corpus: np.ndarray, k: int, *, assume_normalized: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine similarity (inner product when ``assume_normalized``).

    queries (q, dim), corpus (n, dim) -> scores (q, min(k, n)) float32, indices
    (q, min(k, n)) int64. Cosine = dot / (max(|q|, 1e-12) * max(|c|, 1e-12)).
    """
    q64 = np.asarray(queries, dtype=np.float64)
    c64 = np.asarray(corpus, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        if not assume_normalized:
            q64 = q64 / np.maximum(np.sqrt((q64 * q64).sum(axis=1, keepdims=True)), 1e-12)
            c64 = c64 / np.maximum(np.sqrt((c64 * c64).sum(axis=1, keepdims=True)), 1e-12)
        scores = q64 @ c64.T
    return _select_topk(scores, k)


def int8_ranges(embeddings: np.ndarray) -> np.ndarray:
    """Calibration ranges as sentence-transformers computes them: (2, dim) = [min; max] per dimension."""
    e = np.asarray(embeddings, dtype=np.float32)
    return np.vstack((e.min(axis=0), e.max(axis=0)))


def quantize_levels(embeddings: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """sentence-transformers' 256 levels: clip(floor((x - min) / ((max - min) / 255)), 0, 255) as float32.

    A dimension with max == min uses step 1. Values outside the calibration range clip to 0 or 255.
    """
    e = np.asarray(embeddings, dtype=np.float32)
    starts = ranges[0, :]
    steps = (ranges[1, :] - ranges[0, :]) / 255
    steps = np.where(steps == 0, np.float32(1.0), steps)
    return np.clip(np.floor((e - starts) / steps), 0, 255)


def quantize_int8(embeddings: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """sentence-transformers' int8: :func:`quantize_levels` - 128, as int8."""
    return (quantize_levels(embeddings, ranges) - 128).astype(np.int8)


def dequantize_int8(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """The centre of each int8 code's bucket: min + (code + 128 + 0.5) * step, float32 (inverse of quantize_int8).

    Within half a step of the original value for values inside the calibration range.
    """
    starts = ranges[0, :].astype(np.float32)
    steps = (ranges[1, :] - ranges[0, :]).astype(np.float32) / 255
    steps = np.where(steps == 0, np.float32(1.0), steps)
    return (starts + (np.asarray(codes, dtype=np.float32) + np.float32(128.5)) * steps).astype(np.float32)


def quantize_binary(embeddings: np.ndarray, *, signed: bool = False) -> np.ndarray:
    """Packed bits of x > 0 (numpy.packbits order): (n, ceil(dim / 8)) uint8 ("ubinary").

    ``signed=True`` gives sentence-transformers' "binary": the packed bytes minus 128 as int8.
    """
    packed = np.packbits(np.asarray(embeddings) > 0, axis=-1)
    return (packed.astype(np.int16) - 128).astype(np.int8) if signed else packed


def topk_int8(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by exact int32 dot product of int8 vectors; scores as float32."""
    scores = np.asarray(queries, dtype=np.int64) @ np.asarray(corpus, dtype=np.int64).T
    return _select_topk(scores.astype(np.float64), k)


def topk_hamming(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over packed-bit uint8 vectors; score = bits - Hamming distance (higher is closer)."""
    qb = np.unpackbits(np.asarray(queries, dtype=np.uint8), axis=1).astype(np.int64)
    cb = np.unpackbits(np.asarray(corpus, dtype=np.uint8), axis=1).astype(np.int64)
    ham = (qb[:, None, :] != cb[None, :, :]).sum(axis=2)
    return _select_topk((qb.shape[1] - ham).astype(np.float64), k)


def threshold_pairs(scores: np.ndarray, threshold: float, row_offset: int = 0, col_offset: int = 0,
                    upper: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (i, j, score) of a (rows, cols) score tile with score >= threshold (NaN never is), with global indices
    i = row_offset + r, j = col_offset + c; ``upper``: only j > i. In row order, columns increasing (np.nonzero's).
    Returns int64 i, int64 j, float32 scores."""
    keep = scores >= np.float32(threshold)
    if upper:
        keep &= (np.arange(scores.shape[1])[None, :] + col_offset) > (np.arange(scores.shape[0])[:, None] + row_offset)
    r, c = np.nonzero(keep)
    return r.astype(np.int64) + row_offset, c.astype(np.int64) + col_offset, scores[r, c].astype(np.float32)


def screen_pairs(q: np.ndarray, row_terms: np.ndarray, col_terms: np.ndarray, row_offset: int = 0,
                 col_offset: int = 0, upper: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The int8 screen of a threshold self-join (:mod:`embfast.screen`): (i, j) of every entry of the int32 tile
    ``q`` (rows, cols) with ``q * sb[c] + (r1[r] * eb[c] + r2[r] * nb[c]) >= rt[r]`` in float32, where
    ``row_terms = (r1, r2, rt)`` (3, rows) and ``col_terms = (sb, eb, nb)`` (3, cols); global indices, row order,
    columns increasing; ``upper``: only j > i. Returns int64 i, int64 j."""
    r1, r2, rt = (t[:, None] for t in row_terms.astype(np.float32))
    sb, eb, nb = col_terms.astype(np.float32)
    keep = q.astype(np.float32) * sb + (r1 * eb + r2 * nb) >= rt
    if upper:
        keep &= (np.arange(q.shape[1])[None, :] + col_offset) > (np.arange(q.shape[0])[:, None] + row_offset)
    r, c = np.nonzero(keep)
    return r.astype(np.int64) + row_offset, c.astype(np.int64) + col_offset
