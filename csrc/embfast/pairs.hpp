// embfast native core: the pairs of a score tile at or above a threshold (near-duplicates, communities).
//
// Every (row, col) of a (m, n) row-major float32 tile whose score >= threshold (NaN never is), with global
// indices row0 + row and col0 + col; with `upper`, only pairs whose global col > global row (the upper triangle
// of a self-join). Output in row order, columns increasing within a row: NumPy's np.nonzero order, the
// reference (embfast/kernels/reference.py: threshold_pairs).
#pragma once

#include <algorithm>
#include <vector>

#include "common.hpp"

namespace embfast {

struct PairList {
    std::vector<std::int64_t> i, j;
    std::vector<float> s;
};

// Rows [r0, r1) of the tile into `out`. Columns are checked 16 at a time first (one OR over a short loop the
// compiler vectorizes): almost every score of a join is below the threshold, so the pushes are rare.
EMBFAST_INLINE void threshold_rows_body(const float* s, std::size_t n, float thr, std::int64_t row0,
                                        std::int64_t col0, bool upper, std::size_t r0, std::size_t r1, PairList& out) {
    for (std::size_t r = r0; r < r1; ++r) {
        const float* row = s + r * n;
        std::size_t c = 0;
        if (upper) {
            std::int64_t first = row0 + static_cast<std::int64_t>(r) + 1 - col0;  // global col > global row
            if (first >= static_cast<std::int64_t>(n)) continue;
            if (first > 0) c = static_cast<std::size_t>(first);
        }
        for (; c < n;) {
            std::size_t end = std::min(n, c + 16);
            unsigned any = 0;
            for (std::size_t k = c; k < end; ++k) any |= static_cast<unsigned>(row[k] >= thr);
            if (any) {
                for (std::size_t k = c; k < end; ++k) {
                    if (row[k] >= thr) {
                        out.i.push_back(row0 + static_cast<std::int64_t>(r));
                        out.j.push_back(col0 + static_cast<std::int64_t>(k));
                        out.s.push_back(row[k]);
                    }
                }
            }
            c = end;
        }
    }
}

inline void threshold_rows(const float* s, std::size_t n, float thr, std::int64_t row0, std::int64_t col0,
                           bool upper, std::size_t r0, std::size_t r1, PairList& out) {
    threshold_rows_body(s, n, thr, row0, col0, upper, r0, r1, out);
}

#if EMBFAST_X86
// The same loop compiled for AVX2 (the 16-score test vectorizes to two or one compares).
EMBFAST_AVX2_ENTRY void threshold_rows_avx2(const float* s, std::size_t n, float thr, std::int64_t row0,
                                            std::int64_t col0, bool upper, std::size_t r0, std::size_t r1,
                                            PairList& out) {
    threshold_rows_body(s, n, thr, row0, col0, upper, r0, r1, out);
}
#endif

// Rows [0, m) of a (m, n) tile split in contiguous ranges across threads, each range scanned by
// scan(r0, r1, part), the parts joined in row order (a scan that records no scores leaves s empty).
template <typename Scan>
inline PairList pairs_by_rows(std::size_t m, std::size_t n, int threads, Scan scan) {
    int t = resolve_threads(threads, static_cast<double>(m) * n, 1.0e6);
    if (t > static_cast<int>(m)) t = m > 0 ? static_cast<int>(m) : 1;
    std::vector<PairList> parts(t);
#pragma omp parallel for num_threads(t) schedule(static) if (t > 1)
    for (int k = 0; k < t; ++k) scan(m * k / t, m * (k + 1) / t, parts[k]);
    if (t == 1) return std::move(parts[0]);
    PairList out;
    std::size_t total = 0;
    for (const auto& part : parts) total += part.i.size();
    out.i.reserve(total);
    out.j.reserve(total);
    for (const auto& part : parts) {
        out.i.insert(out.i.end(), part.i.begin(), part.i.end());
        out.j.insert(out.j.end(), part.j.begin(), part.j.end());
        out.s.insert(out.s.end(), part.s.begin(), part.s.end());
    }
    return out;
}

// The whole tile, rows split in contiguous ranges across threads and joined in row order.
inline PairList threshold_pairs(const float* s, std::size_t m, std::size_t n, float thr, std::int64_t row0,
                                std::int64_t col0, bool upper, int threads) {
    const bool avx2 = use_avx2();
    return pairs_by_rows(m, n, threads, [&](std::size_t r0, std::size_t r1, PairList& part) {
#if EMBFAST_X86
        if (avx2) return threshold_rows_avx2(s, n, thr, row0, col0, upper, r0, r1, part);
#endif
        (void)avx2;
        threshold_rows(s, n, thr, row0, col0, upper, r0, r1, part);
    });
}

// ---- the int8 screen of a threshold self-join ----------------------------------------------------------------
//
// q is a (m, n) row-major int32 tile of exact integer products qa_r . qb_c of quantized rows (embfast/mining.py:
// rows r quantized with scale sa_r, columns c with scale sb_c). A pair is a candidate when the bound
//     q * sa_r * sb_c + nx_r * eb_c + ea_r * nb_c >= threshold
// holds, where nx_r = |x_r|, ea_r = |x_r - sa_r qa_r|, eb_c = |y_c - sb_c qb_c| and nb_c = |sb_c qb_c| (L2 norms):
// by Cauchy-Schwarz |x.y - x^.y^| <= |x| |y - y^| + |x - x^| |y^|, so every pair whose true score is at least the
// threshold is a candidate (the caller lowers the threshold by a margin for float rounding). Divided by sa_r > 0,
// the test per entry is fma(q, sb_c, r1 * eb_c + r2 * nb_c) >= rt, with r1 = nx_r / sa_r, r2 = ea_r / sa_r and
// rt = threshold / sa_r per row. Output as threshold_pairs (row order, columns increasing), without scores.
struct ScreenRows {
    const float *r1, *r2, *rt;  // per row (m)
    const float *sb, *eb, *nb;  // per column (n)
};

EMBFAST_INLINE void screen_rows_body(const std::int32_t* q, std::size_t n, const ScreenRows& p, std::int64_t row0,
                                     std::int64_t col0, bool upper, std::size_t r0, std::size_t r1, PairList& out) {
    for (std::size_t r = r0; r < r1; ++r) {
        const std::int32_t* row = q + r * n;
        const float a = p.r1[r], b = p.r2[r], t = p.rt[r];
        std::size_t c = 0;
        if (upper) {
            std::int64_t first = row0 + static_cast<std::int64_t>(r) + 1 - col0;
            if (first >= static_cast<std::int64_t>(n)) continue;
            if (first > 0) c = static_cast<std::size_t>(first);
        }
        for (; c < n;) {
            std::size_t end = std::min(n, c + 16);
            unsigned any = 0;
            for (std::size_t k = c; k < end; ++k)
                any |= static_cast<unsigned>(static_cast<float>(row[k]) * p.sb[k] + (a * p.eb[k] + b * p.nb[k]) >= t);
            if (any) {
                for (std::size_t k = c; k < end; ++k) {
                    if (static_cast<float>(row[k]) * p.sb[k] + (a * p.eb[k] + b * p.nb[k]) >= t) {
                        out.i.push_back(row0 + static_cast<std::int64_t>(r));
                        out.j.push_back(col0 + static_cast<std::int64_t>(k));
                    }
                }
            }
            c = end;
        }
    }
}

inline void screen_rows(const std::int32_t* q, std::size_t n, const ScreenRows& p, std::int64_t row0,
                        std::int64_t col0, bool upper, std::size_t r0, std::size_t r1, PairList& out) {
    screen_rows_body(q, n, p, row0, col0, upper, r0, r1, out);
}

#if EMBFAST_X86
EMBFAST_AVX2_ENTRY void screen_rows_avx2(const std::int32_t* q, std::size_t n, const ScreenRows& p, std::int64_t row0,
                                         std::int64_t col0, bool upper, std::size_t r0, std::size_t r1,
                                         PairList& out) {
    screen_rows_body(q, n, p, row0, col0, upper, r0, r1, out);
}
#endif

inline PairList screen_pairs(const std::int32_t* q, std::size_t m, std::size_t n, const ScreenRows& p,
                             std::int64_t row0, std::int64_t col0, bool upper, int threads) {
    const bool avx2 = use_avx2();
    return pairs_by_rows(m, n, threads, [&](std::size_t r0, std::size_t r1, PairList& part) {
#if EMBFAST_X86
        if (avx2) return screen_rows_avx2(q, n, p, row0, col0, upper, r0, r1, part);
#endif
        (void)avx2;
        screen_rows(q, n, p, row0, col0, upper, r0, r1, part);
    });
}

}  // namespace embfast
