// embfast._core: the only file that includes pybind11.
// Each binding validates with the GIL held, allocates outputs, then runs the
// kernel inside one gil_scoped_release. Inputs must already be C-contiguous
// float32 (the Python wrapper converts visibly); nothing is cast here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <sstream>
#include <string>

#include "embfast/common.hpp"
#include "embfast/pairs.hpp"
#include "embfast/pooling.hpp"
#include "embfast/quant.hpp"
#include "embfast/topk.hpp"

namespace py = pybind11;
using f32 = py::array_t<float, py::array::c_style>;
using i64 = py::array_t<std::int64_t, py::array::c_style>;
using i32 = py::array_t<std::int32_t, py::array::c_style>;
using i8 = py::array_t<std::int8_t, py::array::c_style>;
using u8 = py::array_t<std::uint8_t, py::array::c_style>;

#ifndef EMBFAST_VERSION
#define EMBFAST_VERSION "0.0.0"
#endif
#ifndef EMBFAST_BUILD_TYPE
#define EMBFAST_BUILD_TYPE "unknown"
#endif

namespace {

std::string shape_of(const py::array& a) {
    std::ostringstream os;
    os << "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) os << (i ? ", " : "") << a.shape(i);
    if (a.ndim() == 1) os << ",";
    os << ")";
    return os.str();
}

[[noreturn]] void fail(const std::string& func, const std::string& arg, const std::string& expected,
                       const std::string& actual) {
    throw std::invalid_argument(func + ": " + arg + " must be " + expected + ", got " + actual);
}

void need_ndim(const std::string& func, const std::string& arg, const py::array& a, int nd, const char* what) {
    if (a.ndim() != nd) fail(func, arg, what, "shape " + shape_of(a));
}

embfast::Pooling parse_mode(const std::string& m) {
    if (m == "mean") return embfast::Pooling::Mean;
    if (m == "cls") return embfast::Pooling::Cls;
    if (m == "max") return embfast::Pooling::Max;
    if (m == "lasttoken") return embfast::Pooling::LastToken;
    if (m == "mean_sqrt_len") return embfast::Pooling::MeanSqrtLen;
    fail("pool", "mode", "one of mean, cls, max, lasttoken, mean_sqrt_len", "'" + m + "'");
}

template <typename M>
f32 pool_impl(const f32& x, const py::array_t<M, py::array::c_style>& mask, const std::string& mode, int threads) {
    need_ndim("pool", "x", x, 3, "3-D (batch, seq_len, hidden)");
    need_ndim("pool", "mask", mask, 2, "2-D (batch, seq_len)");
    if (mask.shape(0) != x.shape(0) || mask.shape(1) != x.shape(1))
        fail("pool", "mask", "shape " + std::string("(") + std::to_string(x.shape(0)) + ", " +
                                 std::to_string(x.shape(1)) + ") to match x",
             "shape " + shape_of(mask));
    auto m = parse_mode(mode);
    if (threads < 0) fail("pool", "threads", ">= 0", std::to_string(threads));
    std::size_t b = x.shape(0), s = x.shape(1), h = x.shape(2);
    f32 out({static_cast<py::ssize_t>(b), static_cast<py::ssize_t>(h)});
    const float* xp = x.data();
    const M* mp = mask.data();
    float* op = out.mutable_data();
    {
        py::gil_scoped_release release;
        embfast::pool(xp, mp, op, b, s, h, m, threads);
    }
    return out;
}

f32 l2_normalize(const f32& x, int threads) {
    need_ndim("l2_normalize", "x", x, 2, "2-D (rows, dim)");
    if (threads < 0) fail("l2_normalize", "threads", ">= 0", std::to_string(threads));
    std::size_t r = x.shape(0), d = x.shape(1);
    f32 out({static_cast<py::ssize_t>(r), static_cast<py::ssize_t>(d)});
    const float* xp = x.data();
    float* op = out.mutable_data();
    {
        py::gil_scoped_release release;
        embfast::l2_normalize(xp, op, r, d, threads);
    }
    return out;
}

void check_qc(const char* func, const py::array& q, const py::array& c) {
    need_ndim(func, "queries", q, 2, "2-D (num_queries, dim)");
    need_ndim(func, "corpus", c, 2, "2-D (corpus_size, dim)");
    if (q.shape(1) != c.shape(1))
        fail(func, "queries", "of dim " + std::to_string(c.shape(1)) + " like the corpus",
             "shape " + shape_of(q) + " against corpus " + shape_of(c));
}

py::tuple topk_scan(const f32& q, const f32& qscale, const f32& c, std::int64_t k, bool corpus_norms, int threads) {
    check_qc("topk_scan", q, c);
    need_ndim("topk_scan", "qscale", qscale, 1, "1-D (num_queries,)");
    if (qscale.shape(0) != q.shape(0)) fail("topk_scan", "qscale", "one value per query", "shape " + shape_of(qscale));
    if (k < 0) fail("topk_scan", "k", ">= 0", std::to_string(k));
    if (threads < 0) fail("topk_scan", "threads", ">= 0", std::to_string(threads));
    std::size_t nq = q.shape(0), n = c.shape(0), d = c.shape(1);
    std::size_t kk = std::min<std::size_t>(static_cast<std::size_t>(k), n);
    f32 s({static_cast<py::ssize_t>(nq), static_cast<py::ssize_t>(kk)});
    i64 idx({static_cast<py::ssize_t>(nq), static_cast<py::ssize_t>(kk)});
    const float *qp = q.data(), *cp = c.data(), *sp = qscale.data();
    float* so = s.mutable_data();
    std::int64_t* io = idx.mutable_data();
    if (kk > 0 && nq > 0) {
        py::gil_scoped_release release;
        embfast::topk_scan(qp, sp, nq, cp, n, d, kk, corpus_norms, so, io, threads);
    }
    return py::make_tuple(s, idx);
}

void topk_merge_block(const f32& scores, std::int64_t offset, py::object row_scale, py::object col_scale, f32& heap_s,
                      i64& heap_i, i64& heap_n, int threads) {
    need_ndim("topk_merge_block", "scores", scores, 2, "2-D (num_queries, block)");
    need_ndim("topk_merge_block", "heap_scores", heap_s, 2, "2-D (num_queries, k)");
    std::size_t nq = scores.shape(0), b = scores.shape(1), k = heap_s.shape(1);
    if (static_cast<std::size_t>(heap_s.shape(0)) != nq || heap_i.ndim() != 2 || heap_i.shape(0) != heap_s.shape(0) ||
        heap_i.shape(1) != heap_s.shape(1) || heap_n.ndim() != 1 || static_cast<std::size_t>(heap_n.shape(0)) != nq)
        fail("topk_merge_block", "heaps", "(num_queries, k) scores and indices and (num_queries,) counts",
             shape_of(heap_s) + ", " + shape_of(heap_i) + ", " + shape_of(heap_n));
    const float* rs = nullptr;
    const float* cs = nullptr;
    f32 rsa, csa;
    if (!row_scale.is_none()) {
        rsa = row_scale.cast<f32>();
        if (rsa.ndim() != 1 || static_cast<std::size_t>(rsa.shape(0)) != nq)
            fail("topk_merge_block", "row_scale", "(num_queries,)", shape_of(rsa));
        rs = rsa.data();
    }
    if (!col_scale.is_none()) {
        csa = col_scale.cast<f32>();
        if (csa.ndim() != 1 || static_cast<std::size_t>(csa.shape(0)) != b)
            fail("topk_merge_block", "col_scale", "(block,)", shape_of(csa));
        cs = csa.data();
    }
    const float* sp = scores.data();
    float* hs = heap_s.mutable_data();
    std::int64_t* hi = heap_i.mutable_data();
    std::int64_t* hn = heap_n.mutable_data();
    py::gil_scoped_release release;
    embfast::topk_merge_block(sp, nq, b, offset, rs, cs, hs, hi, hn, k, threads);
}

void topk_merge_block_columns(const f32& scores, std::int64_t offset, f32& heap_s, i64& heap_i, i64& heap_n,
                              int threads) {
    need_ndim("topk_merge_block_columns", "scores", scores, 2, "2-D (rows, num_heaps)");
    need_ndim("topk_merge_block_columns", "heap_scores", heap_s, 2, "2-D (num_heaps, k)");
    std::size_t nr = scores.shape(0), b = scores.shape(1), k = heap_s.shape(1);
    if (static_cast<std::size_t>(heap_s.shape(0)) != b || heap_i.ndim() != 2 || heap_i.shape(0) != heap_s.shape(0) ||
        heap_i.shape(1) != heap_s.shape(1) || heap_n.ndim() != 1 || static_cast<std::size_t>(heap_n.shape(0)) != b)
        fail("topk_merge_block_columns", "heaps", "(num_heaps, k) scores and indices and (num_heaps,) counts, "
             "num_heaps = scores.shape[1]", shape_of(heap_s) + ", " + shape_of(heap_i) + ", " + shape_of(heap_n));
    if (threads < 0) fail("topk_merge_block_columns", "threads", ">= 0", std::to_string(threads));
    const float* sp = scores.data();
    float* hs = heap_s.mutable_data();
    std::int64_t* hi = heap_i.mutable_data();
    std::int64_t* hn = heap_n.mutable_data();
    py::gil_scoped_release release;
    embfast::topk_merge_block_columns(sp, nr, b, offset, hs, hi, hn, k, threads);
}

void topk_finalize(f32& heap_s, i64& heap_i, const i64& heap_n) {
    std::size_t nq = heap_s.shape(0), k = heap_s.ndim() == 2 ? heap_s.shape(1) : 0;
    float* hs = heap_s.mutable_data();
    std::int64_t* hi = heap_i.mutable_data();
    const std::int64_t* hn = heap_n.data();
    py::gil_scoped_release release;
    embfast::topk_finalize(hs, hi, hn, nq, k);
}

py::tuple threshold_pairs(const f32& scores, float threshold, std::int64_t row_offset, std::int64_t col_offset,
                          bool upper, int threads) {
    need_ndim("threshold_pairs", "scores", scores, 2, "2-D (rows, cols)");
    if (threads < 0) fail("threshold_pairs", "threads", ">= 0", std::to_string(threads));
    std::size_t m = scores.shape(0), n = scores.shape(1);
    const float* sp = scores.data();
    embfast::PairList pairs;
    {
        py::gil_scoped_release release;
        pairs = embfast::threshold_pairs(sp, m, n, threshold, row_offset, col_offset, upper, threads);
    }
    auto len = static_cast<py::ssize_t>(pairs.i.size());
    i64 oi(len), oj(len);
    f32 os(len);
    std::copy(pairs.i.begin(), pairs.i.end(), oi.mutable_data());
    std::copy(pairs.j.begin(), pairs.j.end(), oj.mutable_data());
    std::copy(pairs.s.begin(), pairs.s.end(), os.mutable_data());
    return py::make_tuple(oi, oj, os);
}

py::tuple screen_pairs(const i32& q, const f32& row_terms, const f32& col_terms, std::int64_t row_offset,
                       std::int64_t col_offset, bool upper, int threads) {
    need_ndim("screen_pairs", "q", q, 2, "2-D (rows, cols)");
    need_ndim("screen_pairs", "row_terms", row_terms, 2, "2-D (3, rows)");
    need_ndim("screen_pairs", "col_terms", col_terms, 2, "2-D (3, cols)");
    if (threads < 0) fail("screen_pairs", "threads", ">= 0", std::to_string(threads));
    std::size_t m = q.shape(0), n = q.shape(1);
    if (row_terms.shape(0) != 3 || static_cast<std::size_t>(row_terms.shape(1)) != m)
        fail("screen_pairs", "row_terms", "(3, q.shape[0])", "shape " + shape_of(row_terms));
    if (col_terms.shape(0) != 3 || static_cast<std::size_t>(col_terms.shape(1)) != n)
        fail("screen_pairs", "col_terms", "(3, q.shape[1])", "shape " + shape_of(col_terms));
    const float *rp = row_terms.data(), *cp = col_terms.data();
    embfast::ScreenRows terms{rp, rp + m, rp + 2 * m, cp, cp + n, cp + 2 * n};
    const std::int32_t* qp = q.data();
    embfast::PairList pairs;
    {
        py::gil_scoped_release release;
        pairs = embfast::screen_pairs(qp, m, n, terms, row_offset, col_offset, upper, threads);
    }
    auto len = static_cast<py::ssize_t>(pairs.i.size());
    i64 oi(len), oj(len);
    std::copy(pairs.i.begin(), pairs.i.end(), oi.mutable_data());
    std::copy(pairs.j.begin(), pairs.j.end(), oj.mutable_data());
    return py::make_tuple(oi, oj);
}

// ---- quantized corpora ------------------------------------------------------

py::tuple topk_int8(const i8& q, const i8& c, std::int64_t k, int threads) {
    check_qc("topk_int8", q, c);
    if (k < 0) fail("topk_int8", "k", ">= 0", std::to_string(k));
    std::size_t nq = q.shape(0), n = c.shape(0), d = c.shape(1);
    std::size_t kk = std::min<std::size_t>(static_cast<std::size_t>(k), n);
    f32 s({static_cast<py::ssize_t>(nq), static_cast<py::ssize_t>(kk)});
    i64 idx({static_cast<py::ssize_t>(nq), static_cast<py::ssize_t>(kk)});
    const std::int8_t *qp = q.data(), *cp = c.data();
    float* so = s.mutable_data();
    std::int64_t* io = idx.mutable_data();
    if (kk > 0 && nq > 0) {
        py::gil_scoped_release release;
        embfast::topk_int8(qp, nq, cp, n, d, kk, so, io, threads);
    }
    return py::make_tuple(s, idx);
}

py::tuple topk_hamming(const u8& q, const u8& c, std::int64_t k, int threads) {
    check_qc("topk_hamming", q, c);
    if (k < 0) fail("topk_hamming", "k", ">= 0", std::to_string(k));
    std::size_t nq = q.shape(0), n = c.shape(0), nb = c.shape(1);
    std::size_t kk = std::min<std::size_t>(static_cast<std::size_t>(k), n);
    f32 s({static_cast<py::ssize_t>(nq), static_cast<py::ssize_t>(kk)});
    i64 idx({static_cast<py::ssize_t>(nq), static_cast<py::ssize_t>(kk)});
    const std::uint8_t *qp = q.data(), *cp = c.data();
    float* so = s.mutable_data();
    std::int64_t* io = idx.mutable_data();
    if (kk > 0 && nq > 0) {
        py::gil_scoped_release release;
        embfast::topk_hamming(qp, nq, cp, n, nb, kk, so, io, threads);
    }
    return py::make_tuple(s, idx);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "embfast native kernels (pooling, normalization, exact top-k)";
    m.attr("__version__") = EMBFAST_VERSION;
#ifdef _OPENMP
    m.attr("HAS_OPENMP") = true;
#else
    m.attr("HAS_OPENMP") = false;
#endif
    m.attr("COMPILER") = __VERSION__;
    m.attr("BUILD_TYPE") = EMBFAST_BUILD_TYPE;
    m.def("isa", &embfast::isa_name, "The SIMD path kernels use now: 'avx2+fma' or 'generic'.");
    m.def("max_threads", &embfast::max_threads, "Threads that threads=0 means.");
    m.def(
        "set_force_generic", [](bool v) { embfast::force_generic_flag() = v; },
        "Force the portable (non-SIMD) path; for tests.");

    m.def("pool", &pool_impl<std::int64_t>, py::arg("x").noconvert(), py::arg("mask").noconvert(), py::arg("mode"),
          py::arg("threads") = 0);
    m.def("pool", &pool_impl<std::int32_t>, py::arg("x").noconvert(), py::arg("mask").noconvert(), py::arg("mode"),
          py::arg("threads") = 0, "Pool (batch, seq_len, hidden) token vectors to (batch, hidden).");
    m.def("l2_normalize", &l2_normalize, py::arg("x").noconvert(), py::arg("threads") = 0,
          "Rows divided by max(norm, 1e-12); returns a new (rows, dim) array.");
    m.def("topk_scan", &topk_scan, py::arg("queries").noconvert(), py::arg("qscale").noconvert(),
          py::arg("corpus").noconvert(), py::arg("k"), py::arg("corpus_norms"), py::arg("threads") = 0,
          "Streaming exact top-k: scores = (q . c) * qscale[q] / max(||c||, 1e-12 if corpus_norms).");
    m.def("topk_merge_block", &topk_merge_block, py::arg("scores").noconvert(), py::arg("offset"),
          py::arg("row_scale"), py::arg("col_scale"), py::arg("heap_scores").noconvert(),
          py::arg("heap_indices").noconvert(), py::arg("heap_counts").noconvert(), py::arg("threads") = 0);
    m.def("topk_merge_block_columns", &topk_merge_block_columns, py::arg("scores").noconvert(), py::arg("offset"),
          py::arg("heap_scores").noconvert(), py::arg("heap_indices").noconvert(), py::arg("heap_counts").noconvert(),
          py::arg("threads") = 0,
          "Merge the columns of scores (rows, num_heaps) into heaps (num_heaps, k): column j's candidates (row "
          "offset + r, in row order) go to heap j; the result of topk_merge_block on scores.T, without the copy.");
    m.def("topk_finalize", &topk_finalize, py::arg("heap_scores").noconvert(), py::arg("heap_indices").noconvert(),
          py::arg("heap_counts").noconvert());
    m.def("threshold_pairs", &threshold_pairs, py::arg("scores").noconvert(), py::arg("threshold"),
          py::arg("row_offset") = 0, py::arg("col_offset") = 0, py::arg("upper") = false, py::arg("threads") = 0,
          "(i, j, score) of every score >= threshold in a (rows, cols) tile, global indices row_offset + r and "
          "col_offset + c, in row order; upper: only j > i.");
    m.def("screen_pairs", &screen_pairs, py::arg("q").noconvert(), py::arg("row_terms").noconvert(),
          py::arg("col_terms").noconvert(), py::arg("row_offset") = 0, py::arg("col_offset") = 0,
          py::arg("upper") = false, py::arg("threads") = 0,
          "(i, j) of every entry of an int32 tile of quantized products passing the int8 screen "
          "q * sb[c] + r1[r] * eb[c] + r2[r] * nb[c] >= rt[r] (row_terms = (r1, r2, rt), col_terms = (sb, eb, nb)), "
          "global indices, row order; upper: only j > i.");
    m.def("topk_int8", &topk_int8, py::arg("queries").noconvert(), py::arg("corpus").noconvert(), py::arg("k"),
          py::arg("threads") = 0, "Top-k by int8 dot product (scores as float32).");
    m.def("topk_hamming", &topk_hamming, py::arg("queries").noconvert(), py::arg("corpus").noconvert(),
          py::arg("k"), py::arg("threads") = 0,
          "Top-k by packed-bit similarity: score = bits - hamming distance (higher is closer).");
}
