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
inline void threshold_rows(const float* s, std::size_t n, float thr, std::int64_t row0, std::int64_t col0,
                           bool upper, std::size_t r0, std::size_t r1, PairList& out) {
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
            bool any = false;
            for (std::size_t k = c; k < end; ++k) any |= row[k] >= thr;
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

// The whole tile, rows split in contiguous ranges across threads and joined in row order.
inline PairList threshold_pairs(const float* s, std::size_t m, std::size_t n, float thr, std::int64_t row0,
                                std::int64_t col0, bool upper, int threads) {
    int t = resolve_threads(threads, static_cast<double>(m) * n, 1.0e6);
    if (t > static_cast<int>(m)) t = m > 0 ? static_cast<int>(m) : 1;
    std::vector<PairList> parts(t);
#pragma omp parallel for num_threads(t) schedule(static) if (t > 1)
    for (int p = 0; p < t; ++p) {
        std::size_t r0 = m * p / t, r1 = m * (p + 1) / t;
        threshold_rows(s, n, thr, row0, col0, upper, r0, r1, parts[p]);
    }
    if (t == 1) return std::move(parts[0]);
    PairList out;
    std::size_t total = 0;
    for (const auto& p : parts) total += p.i.size();
    out.i.reserve(total);
    out.j.reserve(total);
    out.s.reserve(total);
    for (const auto& p : parts) {
        out.i.insert(out.i.end(), p.i.begin(), p.i.end());
        out.j.insert(out.j.end(), p.j.begin(), p.j.end());
        out.s.insert(out.s.end(), p.s.begin(), p.s.end());
    }
    return out;
}

}  // namespace embfast
