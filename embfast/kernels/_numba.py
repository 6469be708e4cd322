"""numba versions of the kernels: used when the C++ core is missing, tested against the reference.

Same semantics as :mod:`embfast.kernels.reference`; inputs are already
validated, C-contiguous float32 (int8 / uint8 for quantized search).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

_MODES = {"mean": 0, "cls": 1, "max": 2, "lasttoken": 3, "mean_sqrt_len": 4}


@njit(parallel=True, cache=True, fastmath=False)
def _pool(x, mask, mode):  # pragma: no cover - compiled
    batch, seq, hidden = x.shape
    out = np.zeros((batch, hidden), dtype=np.float32)
    for b in prange(batch):
        if mode == 1:
            out[b, :] = x[b, 0, :]
            continue
        count = 0
        last = -1
        for s in range(seq):
            if mask[b, s] == 0:
                continue
            last = s
            if mode == 2:
                if count == 0:
                    out[b, :] = x[b, s, :]
                else:
                    for h in range(hidden):
                        if x[b, s, h] > out[b, h]:
                            out[b, h] = x[b, s, h]
            elif mode == 0 or mode == 4:
                for h in range(hidden):
                    out[b, h] += x[b, s, h]
            count += 1
        if mode == 3:
            if last >= 0:
                out[b, :] = x[b, last, :]
        elif (mode == 0 or mode == 4) and count > 0:
            denom = np.float32(count) if mode == 0 else np.float32(np.sqrt(count))
            for h in range(hidden):
                out[b, h] /= denom
    return out


def pool(x: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    return _pool(x, mask, _MODES[mode])


@njit(parallel=True, cache=True)
def l2_normalize(x):  # pragma: no cover - compiled
    rows, dim = x.shape
    out = np.empty_like(x)
    for i in prange(rows):
        ss = 0.0
        for j in range(dim):
            ss += np.float64(x[i, j]) * x[i, j]
        inv = 1.0 / max(np.sqrt(ss), 1e-12)
        for j in range(dim):
            out[i, j] = x[i, j] * inv
    return out


@njit(cache=True)
def _select(scores, k, out_s, out_i):  # pragma: no cover - compiled
    """Best-first top-k of one row: higher score, then lower index; NaN skipped."""
    valid = np.flatnonzero(~np.isnan(scores))
    vals = scores[valid]
    # stable sort on -score keeps the lower index first among ties
    order = np.argsort(-vals, kind="mergesort")
    m = min(k, order.size)
    for j in range(m):
        out_s[j] = vals[order[j]]
        out_i[j] = valid[order[j]]


@njit(parallel=True, cache=True)
def _topk_float(q, c, k, normalize):  # pragma: no cover - compiled
    nq, n = q.shape[0], c.shape[0]
    out_s = np.full((nq, k), np.nan, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    cinv = np.ones(n, dtype=np.float32)
    if normalize:
        for r in prange(n):
            cinv[r] = 1.0 / max(np.sqrt(np.sum(c[r] * c[r])), 1e-12)
    for i in range(nq):
        qinv = np.float32(1.0)
        if normalize:
            qinv = 1.0 / max(np.sqrt(np.sum(q[i] * q[i])), 1e-12)
        scores = np.empty(n, dtype=np.float32)
        for r in prange(n):
            acc = np.float32(0.0)
            for j in range(c.shape[1]):
                acc += q[i, j] * c[r, j]
            scores[r] = acc * qinv * cinv[r]
        _select(scores, k, out_s[i], out_i[i])
    return out_s, out_i


def topk_cosine(q: np.ndarray, c: np.ndarray, k: int, assume_normalized: bool):
    return _topk_float(q, c, min(k, c.shape[0]), not assume_normalized)


@njit(parallel=True, cache=True)
def _topk_int8(q, c, k):  # pragma: no cover - compiled
    nq, n = q.shape[0], c.shape[0]
    out_s = np.full((nq, k), np.nan, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    for i in range(nq):
        scores = np.empty(n, dtype=np.float32)
        for r in prange(n):
            acc = 0
            for j in range(c.shape[1]):
                acc += np.int32(q[i, j]) * np.int32(c[r, j])
            scores[r] = acc
        _select(scores, k, out_s[i], out_i[i])
    return out_s, out_i


def topk_int8(q: np.ndarray, c: np.ndarray, k: int):
    return _topk_int8(q, c, min(k, c.shape[0]))


@njit(cache=True)
def _popcount8(v):  # pragma: no cover - compiled
    v = v - ((v >> 1) & 0x55)
    v = (v & 0x33) + ((v >> 2) & 0x33)
    return (v + (v >> 4)) & 0x0F


@njit(parallel=True, cache=True)
def _topk_hamming(q, c, k):  # pragma: no cover - compiled
    nq, n, nb = q.shape[0], c.shape[0], c.shape[1]
    out_s = np.full((nq, k), np.nan, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    for i in range(nq):
        scores = np.empty(n, dtype=np.float32)
        for r in prange(n):
            ham = 0
            for j in range(nb):
                ham += _popcount8(np.int32(q[i, j] ^ c[r, j]))
            scores[r] = nb * 8 - ham
        _select(scores, k, out_s[i], out_i[i])
    return out_s, out_i


def topk_hamming(q: np.ndarray, c: np.ndarray, k: int):
    return _topk_hamming(q, c, min(k, c.shape[0]))


__all__ = ["l2_normalize", "pool", "topk_cosine", "topk_hamming", "topk_int8", "numba"]
