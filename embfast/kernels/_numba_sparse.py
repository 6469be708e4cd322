"""numba kernel of :func:`embfast.kernels.sparse.topk_sparse` (term-at-a-time scoring + a bounded heap).

Same semantics as :func:`embfast.kernels.sparse.reference_topk_sparse`; inputs are validated CSR / CSC
arrays. Imported only when numba is installed.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def better(s1, i1, s2, i2):  # pragma: no cover - compiled
    return s1 > s2 or (s1 == s2 and i1 < i2)


@njit(cache=True)
def sift_down(hs, hi, size, pos):  # pragma: no cover - compiled; min-heap of the worst kept at the root
    while True:
        left = 2 * pos + 1
        if left >= size:
            return
        worst = left
        right = left + 1
        if right < size and better(hs[worst], hi[worst], hs[right], hi[right]):
            worst = right
        if better(hs[pos], hi[pos], hs[worst], hi[worst]):
            hs[pos], hs[worst] = hs[worst], hs[pos]
            hi[pos], hi[worst] = hi[worst], hi[pos]
            pos = worst
        else:
            return


@njit(cache=True)
def sift_up(hs, hi, pos):  # pragma: no cover - compiled
    while pos > 0:
        parent = (pos - 1) // 2
        if better(hs[parent], hi[parent], hs[pos], hi[pos]):
            hs[pos], hs[parent] = hs[parent], hs[pos]
            hi[pos], hi[parent] = hi[parent], hi[pos]
            pos = parent
        else:
            return


@njit(cache=True)
def best_first(hs, hi, size):  # pragma: no cover - compiled
    order = np.argsort(hi[:size])
    s2 = hs[:size][order]
    i2 = hi[:size][order]
    order2 = np.argsort(-s2, kind="mergesort")
    return s2[order2], i2[order2]


@njit(cache=True, parallel=True)
def topk_inverted(q_ptr, q_idx, q_val, p_ptr, p_rows, p_w, n, k, blocks, out_s, out_i):  # pragma: no cover
    nq = q_ptr.size - 1
    for blk in prange(blocks):
        acc = np.zeros(n, np.float64)
        seen = np.zeros(n, np.uint8)
        touched = np.empty(n, np.int32)
        hs = np.empty(k, np.float64)
        hi = np.empty(k, np.int64)
        neg_s = np.empty(n, np.float64)
        neg_i = np.empty(n, np.int64)
        for qi in range(blk * nq // blocks, (blk + 1) * nq // blocks):
            nt = 0
            for p in range(q_ptr[qi], q_ptr[qi + 1]):
                t = q_idx[p]
                w = np.float64(q_val[p])
                for j in range(p_ptr[t], p_ptr[t + 1]):
                    d = p_rows[j]
                    if seen[d] == 0:
                        seen[d] = 1
                        touched[nt] = d
                        nt += 1
                    acc[d] += w * np.float64(p_w[j])
            size = 0
            nneg = 0
            for a in range(nt):
                d = touched[a]
                s = acc[d]
                if s > 0.0:
                    if size < k:
                        hs[size] = s
                        hi[size] = d
                        sift_up(hs, hi, size)
                        size += 1
                    elif better(s, d, hs[0], hi[0]):
                        hs[0] = s
                        hi[0] = d
                        sift_down(hs, hi, size, 0)
                elif s < 0.0:
                    neg_s[nneg] = s
                    neg_i[nneg] = d
                    nneg += 1
            s_sorted, i_sorted = best_first(hs, hi, size)
            filled = size
            for a in range(size):
                out_s[qi, a] = s_sorted[a]
                out_i[qi, a] = i_sorted[a]
            d = 0
            while filled < k and d < n:  # rows scoring exactly 0, lowest first
                if acc[d] == 0.0:
                    out_s[qi, filled] = 0.0
                    out_i[qi, filled] = d
                    filled += 1
                d += 1
            if filled < k and nneg > 0:
                ns, ni = best_first(neg_s, neg_i, nneg)
                a = 0
                while filled < k and a < nneg:
                    out_s[qi, filled] = ns[a]
                    out_i[qi, filled] = ni[a]
                    filled += 1
                    a += 1
            for a in range(nt):
                d = touched[a]
                acc[d] = 0.0
                seen[d] = 0
