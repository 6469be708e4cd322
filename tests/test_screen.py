"""The int8 screen of threshold self-joins (embfast/screen.py, kernels.screen_pairs): exact integer products, a bound
that holds, and the same pairs as the float32 join."""

from __future__ import annotations

import numpy as np
import pytest

from embfast import kernels, mining, screen
from embfast.kernels import reference

TIE = 1e-5


def unit(x: np.ndarray) -> np.ndarray:
    return mining.unit_rows(x)


def near_threshold(n: int, dim: int, threshold: float, seed: int = 0) -> np.ndarray:
    """Pairs (2k, 2k + 1) at cosines spread within +-2e-3 of ``threshold``: the hardest case for a screen."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n // 2, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    w = rng.standard_normal((n // 2, dim))
    w -= (w * u).sum(1, keepdims=True) * u
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    cos = np.clip(threshold + rng.uniform(-2e-3, 2e-3, n // 2), -1, 1)
    v = cos[:, None] * u + np.sqrt(1 - cos[:, None] ** 2) * w
    out = np.empty((n // 2 * 2, dim))
    out[0::2], out[1::2] = u, v
    return out.astype(np.float32)


def test_int8_products_are_exact_here():
    """MLAS's u8s8 GEMM on this CPU gives the exact integer products on the screen's ranges (extremes included);
    otherwise the screen would not be used (same pairs, float32 speed)."""
    assert screen.exact_products()
    rng = np.random.default_rng(1)
    x = unit(rng.standard_normal((300, 384)).astype(np.float32) ** 3)  # heavy-tailed rows: wide scales
    q = screen.Quantized(x)
    got = screen.products(q, 0, 300, 0, 300)
    want = (q.qa.astype(np.int64) - 128) @ q.qb_t.astype(np.int64)
    np.testing.assert_array_equal(got, want)
    assert q.qa.dtype == np.uint8 and q.qb_t.dtype == np.int8 and np.abs(q.qb_t.astype(int)).max() <= screen.B_LEVELS


@pytest.mark.parametrize("dim", [8, 32, 384])
def test_the_bound_holds_for_every_pair(dim):
    """|x.y - x^.y^| <= |x| |y - y^| + |x - x^| |y^| (in float64) for every pair, outliers and zero rows too."""
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((200, dim)).astype(np.float32)
    x[3] = 0
    x[4, 0] = 50.0  # one huge component: a coarse scale for that row
    x = unit(x)
    q = screen.Quantized(x)
    xhat = q.sa[:, None] * (q.qa.astype(np.float64) - 128)
    yhat = q.sb[:, None] * q.qb_t.T.astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(x - xhat, axis=1), q.err_a, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(x - yhat, axis=1), q.err_b, atol=1e-6)
    exact = x.astype(np.float64) @ x.astype(np.float64).T
    approx = xhat @ yhat.T
    bound = q.norm[:, None] * q.err_b[None, :] + q.err_a[:, None] * q.norm_b[None, :]
    assert np.all(np.abs(exact - approx) <= bound + 1e-9)
    assert q.margin > 2 * dim * 2.0**-24


def test_screen_pairs_native_equals_the_reference():
    rng = np.random.default_rng(2)
    m, n = 300, 517  # not a multiple of 16
    qt = rng.integers(-40000, 40000, (m, n)).astype(np.int32)
    rows = np.stack([rng.uniform(100, 200, m), rng.uniform(0, 5, m), rng.uniform(-5, 60, m)]).astype(np.float32)
    cols = np.stack([rng.uniform(0.001, 0.002, n), rng.uniform(0, 0.02, n),
                     rng.uniform(0.9, 1.0, n)]).astype(np.float32)
    value = (qt.astype(np.float64) * cols[0] + rows[0, :, None] * cols[1] + rows[1, :, None] * cols[2])
    for upper, r0, c0 in ((False, 0, 0), (True, 0, 0), (True, 100, 50), (True, 0, 400), (False, 7, 9)):
        want = reference.screen_pairs(qt, rows, cols, r0, c0, upper)
        assert len(want[0]) > 1000
        for threads in (1, 2):
            got = kernels.screen_pairs(qt, rows, cols, row_offset=r0, col_offset=c0, upper=upper, threads=threads)
            a = set(zip(got[0].tolist(), got[1].tolist(), strict=True))
            b = set(zip(want[0].tolist(), want[1].tolist(), strict=True))
            for i, j in a ^ b:  # only float rounding at the cut may differ (FMA or not)
                assert abs(value[i - r0, j - c0] - rows[2, i - r0]) <= 1e-4 * abs(rows[2, i - r0]) + 1e-3
            assert len(a ^ b) <= 2
            order = np.lexsort((got[1], got[0]))
            assert np.array_equal(order, np.arange(len(order))), "row order, columns increasing"
            if upper:
                assert np.all(got[1] > got[0])


def test_screen_pairs_refuses_bad_input():
    q = np.zeros((4, 5), np.int32)
    rows, cols = np.zeros((3, 4), np.float32), np.zeros((3, 5), np.float32)
    with pytest.raises(TypeError, match="int32"):
        kernels.screen_pairs(q.astype(np.float32), rows, cols)
    with pytest.raises(ValueError, match="row_terms"):
        kernels.screen_pairs(q, cols, cols)
    with pytest.raises(ValueError, match="2-D"):
        kernels.screen_pairs(q[0], rows, cols)
    with pytest.raises(ValueError, match="threads"):
        kernels._core.screen_pairs(q, rows, cols, 0, 0, False, -1)


@pytest.mark.parametrize(("dim", "threshold"), [(384, 0.75), (384, 0.92), (32, 0.8), (32, 0.5), (16, 0.0),
                                                (384, -0.2)])
def test_screened_join_gives_the_float32_joins_pairs(dim, threshold):
    """The screened join and the plain float32 join find the same pairs (a pair may differ only at a float tie
    with the threshold), with the same scores; low thresholds go through the per-tile float32 fallback."""
    rng = np.random.default_rng(dim)
    centers = rng.standard_normal((40, dim)).astype(np.float32)
    x = centers[rng.integers(0, 40, 2600)] + 0.35 * rng.standard_normal((2600, dim)).astype(np.float32)
    x[5] = x[7]  # exact duplicates
    x[9] = 0
    x = unit(x)
    plain = mining.upper_pairs(x, threshold, screen=False)
    screened = mining.upper_pairs(x, threshold, screen=True)
    full = x.astype(np.float64) @ x.astype(np.float64).T
    a = set(zip(plain[0].tolist(), plain[1].tolist(), strict=True))
    b = set(zip(screened[0].tolist(), screened[1].tolist(), strict=True))
    assert len(a) > 100
    for p in a ^ b:
        assert abs(full[p] - threshold) <= TIE, (p, full[p])
    common = [k for k, p in enumerate(zip(screened[0].tolist(), screened[1].tolist(), strict=True)) if p in a]
    np.testing.assert_allclose(screened[2][common], full[screened[0][common], screened[1][common]], atol=TIE)
    assert np.all(screened[0] < screened[1]) and np.all(np.diff(screened[0]) >= 0)


@pytest.mark.parametrize("threshold", [0.75, 0.95])
def test_screened_join_misses_no_pair_next_to_the_threshold(threshold):
    """Pairs placed within +-2e-3 of the threshold (far inside the int8 error): every pair whose cosine is above it
    by more than float rounding is found, none below it by more is returned."""
    x = unit(near_threshold(4000, 384, threshold))
    i, j, s = mining.upper_pairs(x, threshold, screen=True)
    full = x.astype(np.float64) @ x.astype(np.float64).T
    want = {(a, b) for a, b in zip(*np.nonzero(np.triu(full >= threshold + TIE, k=1)), strict=True)}
    got = set(zip(i.tolist(), j.tolist(), strict=True))
    assert len(want) > 900
    assert want <= got
    assert all(full[p] >= threshold - TIE for p in got)


def test_screened_join_by_row_ranges_is_the_whole_join():
    """``start_row`` / ``stop_row`` (a resumable dedup) through the screen: the parts add up to the whole."""
    x = unit(near_threshold(3000, 64, 0.9, seed=3))
    whole = mining.upper_pairs(x, 0.9, screen=True)
    ranges = ((0, 1000), (1000, 2999), (2999, 3000))
    parts = [mining.upper_pairs(x, 0.9, start_row=a, stop_row=b, screen=True) for a, b in ranges]
    q = screen.Quantized(x)  # quantized once for every part, as embfast dedup does
    shared = [mining.upper_pairs(x, 0.9, start_row=a, stop_row=b, screen=True, quantized=q) for a, b in ranges]
    for k in range(3):
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
        np.testing.assert_array_equal(np.concatenate([p[k] for p in shared]), whole[k])
    with pytest.raises(ValueError, match="quantized holds"):
        mining.upper_pairs(x[:2000], 0.9, screen=True, quantized=q)


def test_big_joins_use_the_screen_by_default(monkeypatch):
    calls = []
    real = screen.products
    monkeypatch.setattr(screen, "products", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = unit(near_threshold(2200, 32, 0.9))
    mining.near_duplicate_pairs(x, 0.9)
    assert calls, "2,200 rows (4.8M scores) go through the int8 screen"
    calls.clear()
    mining.near_duplicate_pairs(x[:1000], 0.9)
    assert not calls, "1,000 rows stay float32"


def test_gemm_products_match_numpy_and_write_into_the_buffer():
    """embfast.gemm (ONNX Runtime's MLAS): float32 a @ b.T within float32 rounding of NumPy's, the same bits from
    any calling thread and into a caller's buffer; int8 products exact."""
    from concurrent.futures import ThreadPoolExecutor

    from embfast import gemm

    rng = np.random.default_rng(5)
    a = rng.standard_normal((300, 384)).astype(np.float32)
    b = rng.standard_normal((517, 384)).astype(np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64).T
    got = gemm.float_products(a, b)
    assert got.shape == (300, 517) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max())
    buf = np.full(300 * 600, np.nan, np.float32)
    into = gemm.float_products(a, b, out=buf)
    assert np.shares_memory(into, buf)
    np.testing.assert_array_equal(into, got)
    with ThreadPoolExecutor(3) as pool:
        for other in pool.map(lambda _: gemm.float_products(a, b), range(3)):
            np.testing.assert_array_equal(other, got)
    np.testing.assert_array_equal(gemm.float_products(a[:, :16].astype(np.float64), b[:, :16]),
                                  gemm.float_products(a[:, :16], b[:, :16]))  # converted, not refused
    qa = rng.integers(0, 256, (40, 384)).astype(np.uint8)
    qb = rng.integers(-64, 65, (384, 50)).astype(np.int8)
    np.testing.assert_array_equal(gemm.int8_products(qa, qb), (qa.astype(np.int64) - 128) @ qb.astype(np.int64))
