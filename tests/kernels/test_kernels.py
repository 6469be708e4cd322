"""Every kernel backend against the float64 NumPy reference (the spec)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embfast import kernels
from embfast.kernels import reference

DIMS = [1, 3, 7, 8, 15, 16, 17, 31, 33, 63, 65, 384, 768, 1024]
BACKENDS = ["reference", "native", "numba"]


def _available(name: str) -> bool:
    return {"reference": True, "native": kernels.HAS_NATIVE, "numba": kernels.HAS_NUMBA}[name]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if not _available(request.param):
        pytest.skip(f"{request.param} backend not installed")
    return request.param


@pytest.fixture(params=["auto", "generic"])
def isa_path(request):
    """Run native kernels on the SIMD path and on the forced portable path (then restore the path in force,
    which EMBFAST_ISA may have set for the whole run)."""
    if not kernels.HAS_NATIVE:
        if request.param == "generic":
            pytest.skip("native core not built")
        yield request.param
        return
    before = "generic" if kernels.isa() == "generic" else "auto"
    if request.param == "generic":
        kernels.set_isa("generic")
    yield request.param
    kernels.set_isa(before)


def test_native_core_loaded_when_required():
    """CI sets EMBFAST_REQUIRE_NATIVE=1: the compiled core must be the one running."""
    if os.environ.get("EMBFAST_REQUIRE_NATIVE") != "1":
        pytest.skip("EMBFAST_REQUIRE_NATIVE is not set")
    assert kernels.HAS_NATIVE
    assert kernels._backend("auto") == "native"
    info = kernels.build_info()
    assert info["native"] is True
    assert info["isa"] in ("avx2+fma", "generic")


def _tokens(rng, batch, seq, hidden):
    x = rng.standard_normal((batch, seq, hidden)).astype(np.float32)
    lengths = rng.integers(0, seq + 1, size=batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return x, mask


@pytest.mark.parametrize("mode", kernels.POOLING_MODES)
@pytest.mark.parametrize("hidden", DIMS)
def test_pool_matches_reference(backend, isa_path, mode, hidden):
    rng = np.random.default_rng(hidden)
    x, mask = _tokens(rng, 6, 9, hidden)
    mask[0] = 0  # all padding
    mask[1] = 1  # no padding
    expected = reference.pool(x, mask, mode)
    got = kernels.pool(x, mask, mode, backend=backend)
    assert got.dtype == np.float32 and got.shape == (6, hidden)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    if mode != "cls":
        assert np.all(got[0] == 0), "an all-padding row must pool to zeros"


@pytest.mark.parametrize("mode", kernels.POOLING_MODES)
def test_pool_seq_len_one_and_int32_mask(backend, mode):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 1, 17)).astype(np.float32)
    mask = np.array([[1], [0], [1], [1]], dtype=np.int32)
    np.testing.assert_allclose(kernels.pool(x, mask, mode, backend=backend), reference.pool(x, mask, mode),
                               rtol=1e-6, atol=1e-7)


def test_mean_pool_ignores_padding_values(backend):
    """Garbage in padded positions must not leak into the mean."""
    x = np.ones((1, 4, 8), dtype=np.float32)
    x[0, 2:] = 1e6
    mask = np.array([[1, 1, 0, 0]])
    np.testing.assert_array_equal(kernels.mean_pool(x, mask, backend=backend), np.ones((1, 8), np.float32))


def test_last_token_left_and_right_padding(backend):
    x = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    right = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = np.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    np.testing.assert_array_equal(kernels.last_token_pool(x, right, backend=backend), x[[0, 1], [1, 3]])
    np.testing.assert_array_equal(kernels.last_token_pool(x, left, "left", backend=backend), x[[0, 1], [3, 3]])


@pytest.mark.parametrize("dim", DIMS)
def test_l2_normalize(backend, isa_path, dim):
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((5, dim)).astype(np.float32) * 10
    x[2] = 0
    got = kernels.l2_normalize(x, backend=backend)
    np.testing.assert_allclose(got, reference.l2_normalize(x), rtol=1e-6, atol=1e-7)
    assert np.all(got[2] == 0) and not np.isnan(got).any()


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("nq", [1, 3, 5, 30])
def test_topk_cosine_matches_reference(backend, isa_path, dim, nq):
    rng = np.random.default_rng(dim * 100 + nq)
    corpus = rng.standard_normal((300, dim)).astype(np.float32)
    queries = rng.standard_normal((nq, dim)).astype(np.float32)
    ref_s, ref_i = reference.topk_cosine(queries, corpus, 10)
    s, i = kernels.topk_cosine(queries, corpus, 10, backend=backend)
    assert s.shape == (nq, 10) and i.dtype == np.int64
    np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-5)
    _assert_indices_score_as_reported(queries, corpus, s, i, normalized=False)


def _assert_indices_score_as_reported(queries, corpus, s, i, *, normalized):
    """float32 vs float64 may order near-ties differently: each returned index must carry its true score."""
    full = reference.topk_cosine(queries, corpus, corpus.shape[0], assume_normalized=normalized)
    true = np.empty((queries.shape[0], corpus.shape[0]))
    np.put_along_axis(true, full[1], full[0], axis=1)
    np.testing.assert_allclose(np.take_along_axis(true, i, axis=1), s, rtol=1e-5, atol=1e-5)


def test_topk_edge_cases(backend):
    rng = np.random.default_rng(7)
    corpus = rng.standard_normal((20, 16)).astype(np.float32)
    corpus[3] = 0.0  # zero row: cosine 0, never NaN
    corpus[5] = np.nan  # NaN row: never returned
    corpus[9] = corpus[4]  # tie: lower index first
    q = corpus[[4]].copy()
    s, i = kernels.topk_cosine(q, corpus, 3, backend=backend)
    assert i[0, 0] == 4 and i[0, 1] == 9
    s_all, i_all = kernels.topk_cosine(q, corpus, 100, backend=backend)  # k > n clamps
    assert s_all.shape == (1, 20)
    assert 5 not in i_all[0, :19] and i_all[0, 19] == -1 and np.isnan(s_all[0, 19])
    assert 3 in i_all[0]
    s0, i0 = kernels.topk_cosine(q, corpus, 0, backend=backend)
    assert s0.shape == (1, 0) and i0.shape == (1, 0)
    nan_q = np.full((1, 16), np.nan, dtype=np.float32)
    s_nan, i_nan = kernels.topk_cosine(np.vstack([nan_q, q]), corpus, 2, backend=backend)
    assert (i_nan[0] == -1).all() and i_nan[1, 0] == 4, "a NaN query must not corrupt the others"


def test_topk_ties_across_threads():
    """Equal scores split across thread slices still go to the lower index."""
    if not kernels.HAS_NATIVE:
        pytest.skip("native core not built")
    corpus = np.ones((10000, 8), dtype=np.float32)
    s, i = kernels.topk_cosine(np.ones((1, 8), np.float32), corpus, 5, backend="native", threads=2)
    assert i.tolist() == [[0, 1, 2, 3, 4]]


def test_topk_many_queries_blas_path():
    """From BLAS_MIN_QUERIES on, the native path uses BLAS blocks; results must not change."""
    if not kernels.HAS_NATIVE:
        pytest.skip("native core not built")
    rng = np.random.default_rng(3)
    corpus = rng.standard_normal((kernels.BLAS_BLOCK_ROWS + 777, 24)).astype(np.float32)
    queries = rng.standard_normal((kernels.BLAS_MIN_QUERIES + 5, 24)).astype(np.float32)
    for norm in (False, True):
        c = reference.l2_normalize(corpus) if norm else corpus
        q = reference.l2_normalize(queries) if norm else queries
        ref_s, ref_i = reference.topk_cosine(q, c, 7, assume_normalized=norm)
        s, i = kernels.topk_cosine(q, c, 7, assume_normalized=norm, backend="native")
        np.testing.assert_allclose(s, ref_s, rtol=1e-4, atol=1e-5)
        _assert_indices_score_as_reported(q, c, s, i, normalized=norm)


def test_topk_assume_normalized_is_inner_product(backend):
    rng = np.random.default_rng(11)
    c = rng.standard_normal((50, 12)).astype(np.float32) * 3
    q = rng.standard_normal((2, 12)).astype(np.float32)
    s, i = kernels.topk_cosine(q, c, 5, assume_normalized=True, backend=backend)
    expected = (q.astype(np.float64) @ c.T.astype(np.float64))
    np.testing.assert_allclose(s, np.take_along_axis(expected, i, axis=1), rtol=1e-5)


def test_readonly_and_noncontiguous_inputs(backend):
    rng = np.random.default_rng(5)
    base = rng.standard_normal((40, 64)).astype(np.float64)
    corpus = base[:, ::2]  # float64, non-contiguous
    corpus.flags.writeable = False
    q = base[:3, 1::2]
    ref_s, ref_i = reference.topk_cosine(q, corpus, 4)
    s, i = kernels.topk_cosine(q, corpus, 4, backend=backend)
    np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-5)
    _assert_indices_score_as_reported(q.astype(np.float32), corpus.astype(np.float32), s, i, normalized=False)
    x = np.asfortranarray(rng.standard_normal((3, 5, 7)).astype(np.float32))
    x.flags.writeable = False
    mask = np.ones((3, 5), dtype=bool)
    np.testing.assert_allclose(kernels.mean_pool(x, mask, backend=backend), reference.pool(x, mask, "mean"),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", [1, 7, 16, 31, 33, 384, 1024])
def test_topk_int8_and_hamming(backend, isa_path, dim):
    rng = np.random.default_rng(dim)
    c8 = rng.integers(-128, 128, (200, dim)).astype(np.int8)
    q8 = rng.integers(-128, 128, (3, dim)).astype(np.int8)
    ref = reference.topk_int8(q8, c8, 9)
    got = kernels.topk_int8(q8, c8, 9, backend=backend)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    nbytes = (dim + 7) // 8
    cb = rng.integers(0, 256, (200, nbytes)).astype(np.uint8)
    qb = rng.integers(0, 256, (3, nbytes)).astype(np.uint8)
    ref = reference.topk_hamming(qb, cb, 9)
    got = kernels.topk_hamming(qb, cb, 9, backend=backend)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])


ERRORS = [
    (lambda: kernels.mean_pool(np.zeros((2, 3)), np.ones((2, 3), np.int64)), ValueError, "3-D"),
    (lambda: kernels.mean_pool(np.zeros((2, 3, 4)), np.ones((2, 4), np.int64)), ValueError, "mask must have shape"),
    (lambda: kernels.mean_pool(np.zeros((2, 3, 4)), np.ones((2, 3), dtype=np.float32)), TypeError, "integer"),
    (lambda: kernels.mean_pool(np.array([[["a"]]]), np.ones((1, 1), np.int64)), TypeError, "numeric"),
    (lambda: kernels.pool(np.zeros((1, 1, 1)), np.ones((1, 1), np.int64), "median"), ValueError, "mode"),
    (lambda: kernels.last_token_pool(np.zeros((1, 1, 1)), np.ones((1, 1)), "top"), ValueError, "padding_side"),
    (lambda: kernels.l2_normalize(np.zeros(3)), ValueError, "2-D"),
    (lambda: kernels.topk_cosine(np.zeros((1, 3)), np.zeros((5, 4)), 1), ValueError, "dim"),
    (lambda: kernels.topk_cosine(np.zeros((1, 3)), np.zeros((5, 3)), -1), ValueError, "k must be >= 0"),
    (lambda: kernels.topk_cosine(np.zeros((1, 3)), np.zeros((5, 3)), 1.5), TypeError, "k must be an int"),
    (lambda: kernels.topk_cosine(np.zeros(3), np.zeros((5, 3)), 1), ValueError, "2-D"),
    (lambda: kernels.topk_int8(np.zeros((1, 3)), np.zeros((5, 3), np.int8), 1), TypeError, "int8"),
    (lambda: kernels.topk_hamming(np.zeros((1, 3), np.uint8), np.zeros((5, 4), np.uint8), 1), ValueError, "dim"),
    (lambda: kernels.l2_normalize(np.zeros((1, 3)), backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize(("call", "exc", "match"), ERRORS)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_native_binding_refuses_wrong_types():
    """The binding never casts: float64 reaches it only through the wrapper's visible conversion."""
    if not kernels.HAS_NATIVE:
        pytest.skip("native core not built")
    with pytest.raises(TypeError):
        kernels._core.l2_normalize(np.zeros((2, 3), dtype=np.float64), 0)
    with pytest.raises(ValueError, match="threads must be >= 0"):
        kernels._core.l2_normalize(np.zeros((2, 3), dtype=np.float32), -1)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), d=st.integers(1, 40), nq=st.integers(1, 6), k=st.integers(0, 70),
       seed=st.integers(0, 2**16))
def test_topk_random_shapes(n, d, nq, k, seed):
    rng = np.random.default_rng(seed)
    corpus = rng.standard_normal((n, d)).astype(np.float32)
    queries = rng.standard_normal((nq, d)).astype(np.float32)
    ref_s, ref_i = reference.topk_cosine(queries, corpus, k)
    for b in [b for b in BACKENDS[1:] if _available(b)]:
        s, i = kernels.topk_cosine(queries, corpus, k, backend=b)
        assert s.shape == ref_s.shape == (nq, min(k, n))
        np.testing.assert_allclose(s, ref_s, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 5), s=st.integers(1, 12), h=st.integers(1, 40), seed=st.integers(0, 2**16),
       mode=st.sampled_from(kernels.POOLING_MODES))
def test_pool_random_shapes(b, s, h, seed, mode):
    rng = np.random.default_rng(seed)
    x, mask = _tokens(rng, b, s, h)
    expected = reference.pool(x, mask, mode)
    for name in [n for n in BACKENDS[1:] if _available(n)]:
        np.testing.assert_allclose(kernels.pool(x, mask, mode, backend=name), expected, rtol=1e-5, atol=1e-5)


def test_two_threads_run_topk_concurrently():
    """The GIL is released: two Python threads get correct, independent results from long scans."""
    if not kernels.HAS_NATIVE:
        pytest.skip("native core not built")
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((200_000, 64)).astype(np.float32)
    queries = [rng.standard_normal((2, 64)).astype(np.float32) for _ in range(2)]
    expected = [kernels.topk_cosine(q, corpus, 5, threads=1) for q in queries]
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []
    inside = threading.Barrier(2)

    def work(j):
        try:
            inside.wait()
            results[j] = kernels.topk_cosine(queries[j], corpus, 5, threads=1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(j,)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for j in range(2):
        np.testing.assert_array_equal(results[j][1], expected[j][1])


def test_quantized_search_with_rescoring_finds_the_float_top_k():
    rng = np.random.default_rng(0)
    # clustered data so that quantization is not trivially exact
    centers = rng.standard_normal((20, 64)).astype(np.float32)
    corpus = reference.l2_normalize(centers[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 64)))
    queries = reference.l2_normalize(corpus[:10] + 0.05 * rng.standard_normal((10, 64)))
    _, exact = reference.topk_cosine(queries, corpus, 10)
    for kind, min_recall in (("int8", 0.95), ("binary", 0.8)):  # 64 bits carry little: a loose floor
        qc = kernels.quantize(corpus, kind)
        s, i = kernels.topk_quantized(queries, qc, 10, rescore_multiplier=10, rescore_vectors=corpus)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i.tolist(), exact.tolist(), strict=True)])
        assert recall >= min_recall, (kind, recall)
        # rescored scores are the exact cosines of the returned rows
        expected = (queries[:, None, :] * corpus[i]).sum(-1)
        np.testing.assert_allclose(s, expected, rtol=1e-5, atol=1e-5)
        raw_s, raw_i = kernels.topk_quantized(queries, qc, 5)
        assert raw_s.shape == (10, 5)


def test_quantize_errors():
    with pytest.raises(ValueError, match="kind"):
        kernels.quantize(np.zeros((3, 4)), "int4")
    qc = kernels.quantize(np.ones((3, 4)), "int8")
    with pytest.raises(ValueError, match="dim"):
        kernels.topk_quantized(np.zeros((1, 5)), qc, 1)
    with pytest.raises(ValueError, match="rescore_vectors"):
        kernels.topk_quantized(np.zeros((1, 4)), qc, 1, rescore_vectors=np.zeros((2, 4), np.float32))


@settings(max_examples=60, deadline=None)
@given(m=st.integers(0, 70), n=st.integers(0, 90), row_offset=st.integers(0, 100), col_offset=st.integers(0, 100),
       upper=st.booleans(), threshold=st.sampled_from([-np.inf, -0.5, 0.0, 0.7, 2.0, np.inf]),
       threads=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_threshold_pairs_equal_the_reference(m, n, row_offset, col_offset, upper, threshold, threads, seed):
    """The native pairs-over-a-threshold scan (near-duplicates, communities) returns exactly np.nonzero's pairs,
    in its order, NaN never kept, whatever the tile's shape, offsets and thread count."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(-1, 1, (m, n)).astype(np.float32)
    scores[rng.random((m, n)) < 0.05] = np.nan
    want = reference.threshold_pairs(scores, threshold, row_offset, col_offset, upper)
    for b in [b for b in BACKENDS if _available(b)]:
        got = kernels.threshold_pairs(scores, threshold, row_offset=row_offset, col_offset=col_offset, upper=upper,
                                      threads=threads, backend=b)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and np.array_equal(g, w), b
    if upper:
        assert (want[1] > want[0]).all()


def test_threshold_pairs_refuses_bad_input():
    with pytest.raises(ValueError, match="scores"):
        kernels.threshold_pairs(np.zeros(3, np.float32), 0.5)
    if kernels.HAS_NATIVE:
        with pytest.raises(ValueError, match="threads must be >= 0"):
            kernels._core.threshold_pairs(np.zeros((2, 2), np.float32), 0.5, 0, 0, False, -1)
