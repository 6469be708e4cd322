"""The int8 screen of a threshold self-join: which pairs of unit rows can score at least a threshold, from exact
integer products, with a proven bound, so that only those few pairs are scored in float32.

Rows are quantized twice, each with its own scale (symmetric, round to nearest): as the left operand to
``qa = round(x / sa) + 128`` (uint8, ``sa = max|x| / 127``) and as the right one to ``qb = round(y / sb)``
(int8 in [-64, 64], ``sb = max|y| / 64``). ONNX Runtime's ``MatMulInteger`` (MLAS's u8s8 GEMM: ``vpdpbusd``
with AVX-512 VNNI / AVX-VNNI, ``vpmaddubsw`` on plain AVX2) gives ``q = (qa - 128) . qb`` exactly in int32:
the int8 side is kept within +-64 so that ``vpmaddubsw``'s int16 pair sums (at most 2 x 255 x 64 = 32,640)
never saturate, and :func:`exact_products` checks the exactness once per process on extreme values.

The bound (Cauchy-Schwarz, with x^ = sa (qa - 128) and y^ = sb qb):
``|x.y - x^.y^| <= |x| |y - y^| + |x - x^| |y^|``. So a pair is a candidate when
``sa sb q + |x| |y - y^| + |x - x^| |y^| >= threshold - margin``; ``margin`` covers the float32 rounding of
the exact rescoring (``d 2^-24``, the classic bound for a d-term dot product of unit vectors) and of the
screen's own arithmetic. Every pair whose float32 score is at least the threshold is then a candidate; the
candidates are rescored in float32 and kept if they reach it. The same pairs as the float32 join, 1.2-1.4x
faster than it on MLAS's sgemm (real sentences at 0.75: 0.43 against 0.52 s at 20k rows, 7.4 against 10.5 s at
88k; 2.2-2.5x against NumPy's BLAS; benchmarks/README.md, issue 18).
"""

from __future__ import annotations

import logging

import numpy as np

from embfast import gemm

log = logging.getLogger("embfast")

#: the int8 side's range: +-64 keeps MLAS's AVX2 (vpmaddubsw) pair sums below int16's limit
B_LEVELS = 64
#: the uint8 side's range around its zero point 128
A_LEVELS = 127

_exact: bool | None = None


def exact_products(threads: int = 0) -> bool:
    """Whether this machine's ``MatMulInteger`` is exact on the screen's ranges (checked once per process, on
    extreme and random values, against NumPy's int64 product). False only on a kernel that saturates."""
    global _exact
    if _exact is None:
        rng = np.random.default_rng(0)
        d = 384
        qa = rng.integers(0, 256, (48, d)).astype(np.uint8)
        qa[:8] = 255
        qa[8:16] = 0
        qa[16:24, ::2], qa[16:24, 1::2] = 255, 0
        qb = rng.integers(-B_LEVELS, B_LEVELS + 1, (d, 40)).astype(np.int8)
        qb[:, :8] = B_LEVELS
        qb[:, 8:16] = -B_LEVELS
        qb[::2, 16:24], qb[1::2, 16:24] = B_LEVELS, -B_LEVELS
        got = gemm.int8_products(qa, qb, threads=threads)
        want = (qa.astype(np.int64) - 128) @ qb.astype(np.int64)
        _exact = bool(np.array_equal(got, want))
        if not _exact:
            log.warning("embfast: ONNX Runtime's MatMulInteger is not exact on this CPU; threshold joins run in "
                        "float32 only (slower, same pairs)")
    return _exact


class Quantized:
    """Unit rows ``x`` (n, d) quantized for the screen; see the module docstring.

    Attributes: ``qa`` uint8 (n, d); ``qb_t`` int8 (d, n) (MatMulInteger's right operand); ``row_terms(a, b,
    threshold)`` and ``col_terms(c, d)`` the float32 (3, rows) and (3, cols) arrays of
    :func:`embfast.kernels.screen_pairs`. ``margin``: how far below the threshold the screen looks.
    """

    def __init__(self, x: np.ndarray, chunk: int = 1024):
        n, d = x.shape
        self.qa = np.empty((n, d), np.uint8)
        qb = np.empty((n, d), np.int8)
        self.sa, self.sb, self.norm, self.err_a, self.err_b, self.norm_b = (np.empty(n) for _ in range(6))
        # the temporaries of one chunk at a time, small enough to stay in cache (20k rows of 384: 0.05 s against
        # 0.09-0.14 s with chunks of 8,192, first call in a fresh process, ad hoc)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            xc = np.asarray(x[a:b], dtype=np.float32)
            peak = np.abs(xc).max(axis=1) if d else np.zeros(b - a, np.float32)
            peak[peak == 0] = 1.0  # a zero row: q = 0, no error
            sa, sb = (peak / np.float32(A_LEVELS))[:, None], (peak / np.float32(B_LEVELS))[:, None]
            ia = np.clip(np.rint(xc / sa), -A_LEVELS, A_LEVELS)
            ib = np.clip(np.rint(xc / sb), -B_LEVELS, B_LEVELS)
            self.qa[a:b] = ia + 128
            qb[a:b] = ib
            # the scales used below are exactly these float32 values, so x^ = sa * ia holds exactly in float64
            self.sa[a:b], self.sb[a:b] = sa[:, 0], sb[:, 0]
            self.norm[a:b] = _norms(xc)            # |x|
            self.err_a[a:b] = _norms(xc - sa * ia)  # |x - x^| (left side), float32 differences: see margin
            self.err_b[a:b] = _norms(xc - sb * ib)  # |y - y^| (right side)
            self.norm_b[a:b] = _norms(sb * ib)      # |y^|
        self.qb_t = np.ascontiguousarray(qb.T)
        # the float32 rescoring (d 2^-24 for a d-term dot product of unit vectors, doubled), the float32 error
        # vectors (each component within 2^-23 max|x|: sqrt(d) 2^-22 on a norm, doubled) and the screen's own float32
        self.margin = 2.0 * d * 2.0**-24 + 4.0 * np.sqrt(d) * 2.0**-22 + 1e-5

    def row_terms(self, a: int, b: int, threshold: float) -> np.ndarray:
        """(3, b - a) float32: |x| / sa, |x - x^| / sa, (threshold - margin) / sa for rows a..b-1."""
        sa = self.sa[a:b]
        return np.ascontiguousarray(np.stack([self.norm[a:b] / sa, self.err_a[a:b] / sa,
                                              (threshold - self.margin) / sa]), dtype=np.float32)

    def col_terms(self, c: int, d: int) -> np.ndarray:
        """(3, d - c) float32: sb, |y - y^|, |y^| for columns c..d-1."""
        return np.ascontiguousarray(np.stack([self.sb[c:d], self.err_b[c:d], self.norm_b[c:d]]), dtype=np.float32)


def _norms(v: np.ndarray) -> np.ndarray:
    """L2 norms of the rows of a float32 array, summed in float64."""
    return np.sqrt(np.einsum("ij,ij->i", v, v, dtype=np.float64))


def products(q: Quantized, a: int, b: int, c: int, d: int, threads: int = 0,
             out: np.ndarray | None = None) -> np.ndarray:
    """The exact int32 products (b - a, d - c) of rows a..b-1 (left) and c..d-1 (right). ``out``: a flat int32
    buffer of at least (b - a) (d - c) entries to write into (no fresh 32 MiB output, and its page faults, per
    tile: 10% faster over a 20k join); the result is a view of it."""
    return gemm.int8_products(q.qa[a:b], np.ascontiguousarray(q.qb_t[:, c:d]), out=out, threads=threads)
