// embfast native core: exact top-k by cosine / inner product.
//
// Ordering everywhere: higher score first; equal scores go to the lower corpus
// index. NaN scores are never returned. k is clamped to the corpus size by the
// caller; results are written sorted, best first.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.hpp"

namespace embfast {

// a ranks before b
EMBFAST_INLINE bool better(float sa, std::int64_t ia, float sb, std::int64_t ib) {
    return sa > sb || (sa == sb && ia < ib);
}

// Bounded heap keeping the k best (score, index) pairs; the worst sits at the
// root so a candidate is compared with one value.
struct TopKHeap {
    float* s;
    std::int64_t* i;
    std::size_t k;
    std::size_t size = 0;

    TopKHeap(float* s_, std::int64_t* i_, std::size_t k_, std::size_t size_ = 0) : s(s_), i(i_), k(k_), size(size_) {}

    // Worse-than relation turned into a heap with the worst on top.
    EMBFAST_INLINE bool worse(std::size_t a, std::size_t b) const { return better(s[b], i[b], s[a], i[a]); }

    void sift_down(std::size_t pos) {
        for (;;) {
            std::size_t l = 2 * pos + 1, r = l + 1, w = pos;
            if (l < size && worse(l, w)) w = l;
            if (r < size && worse(r, w)) w = r;
            if (w == pos) return;
            std::swap(s[pos], s[w]);
            std::swap(i[pos], i[w]);
            pos = w;
        }
    }
    void sift_up(std::size_t pos) {
        while (pos > 0) {
            std::size_t p = (pos - 1) / 2;
            if (!worse(pos, p)) return;
            std::swap(s[pos], s[p]);
            std::swap(i[pos], i[p]);
            pos = p;
        }
    }
    // Offer one candidate (NaN is dropped).
    EMBFAST_INLINE void push(float score, std::int64_t idx) {
        if (k == 0 || score != score) return;
        if (size < k) {
            s[size] = score;
            i[size] = idx;
            ++size;
            sift_up(size - 1);
        } else if (better(score, idx, s[0], i[0])) {
            s[0] = score;
            i[0] = idx;
            sift_down(0);
        }
    }
    // Lowest score that can still enter (for a cheap pre-check during scans).
    EMBFAST_INLINE float threshold() const {
        return size < k ? -std::numeric_limits<float>::infinity() : s[0];
    }
    EMBFAST_INLINE bool full() const { return size >= k; }

    // Sort best-first in place; unused slots get score NaN and index -1.
    void sort_best_first() {
        std::vector<std::pair<float, std::int64_t>> tmp(size);
        for (std::size_t j = 0; j < size; ++j) tmp[j] = {s[j], i[j]};
        std::sort(tmp.begin(), tmp.end(),
                  [](const auto& a, const auto& b) { return better(a.first, a.second, b.first, b.second); });
        for (std::size_t j = 0; j < size; ++j) {
            s[j] = tmp[j].first;
            i[j] = tmp[j].second;
        }
        for (std::size_t j = size; j < k; ++j) {
            s[j] = std::numeric_limits<float>::quiet_NaN();
            i[j] = -1;
        }
    }
};

// ---------------------------------------------------------------------------
// Dot products of one corpus row with nq queries (and the row's squared norm).

EMBFAST_INLINE void row_dots_generic(const float* row, const float* Q, std::size_t nq, std::size_t d, float* out,
                                     float* row_sq) {
    for (std::size_t q = 0; q < nq; ++q) {
        const float* qq = Q + q * d;
        float acc = 0.0f;
        for (std::size_t j = 0; j < d; ++j) acc += row[j] * qq[j];
        out[q] = acc;
    }
    if (row_sq) {
        float acc = 0.0f;
        for (std::size_t j = 0; j < d; ++j) acc += row[j] * row[j];
        *row_sq = acc;
    }
}

#if EMBFAST_X86
EMBFAST_AVX2 inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    s = _mm_add_ss(s, sh);
    return _mm_cvtss_f32(s);
}

// Dot of one row with one vector, 4 accumulators of 8 lanes.
EMBFAST_AVX2 inline float dot_avx2(const float* a, const float* b, std::size_t d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    std::size_t j = 0;
    for (; j + 32 <= d; j += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 16), _mm256_loadu_ps(b + j + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 24), _mm256_loadu_ps(b + j + 24), a3);
    }
    for (; j + 8 <= d; j += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), a0);
    float acc = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; j < d; ++j) acc += a[j] * b[j];
    return acc;
}

// Dots of one row with 4 queries at once: the row chunk is loaded once.
EMBFAST_AVX2 inline void dot4_avx2(const float* row, const float* q0, const float* q1, const float* q2,
                                           const float* q3, std::size_t d, float* out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
    std::size_t j = 0;
    for (; j + 16 <= d; j += 16) {
        __m256 r = _mm256_loadu_ps(row + j), r2 = _mm256_loadu_ps(row + j + 8);
        a0 = _mm256_fmadd_ps(r, _mm256_loadu_ps(q0 + j), a0);
        a1 = _mm256_fmadd_ps(r, _mm256_loadu_ps(q1 + j), a1);
        a2 = _mm256_fmadd_ps(r, _mm256_loadu_ps(q2 + j), a2);
        a3 = _mm256_fmadd_ps(r, _mm256_loadu_ps(q3 + j), a3);
        b0 = _mm256_fmadd_ps(r2, _mm256_loadu_ps(q0 + j + 8), b0);
        b1 = _mm256_fmadd_ps(r2, _mm256_loadu_ps(q1 + j + 8), b1);
        b2 = _mm256_fmadd_ps(r2, _mm256_loadu_ps(q2 + j + 8), b2);
        b3 = _mm256_fmadd_ps(r2, _mm256_loadu_ps(q3 + j + 8), b3);
    }
    for (; j + 8 <= d; j += 8) {
        __m256 r = _mm256_loadu_ps(row + j);
        a0 = _mm256_fmadd_ps(r, _mm256_loadu_ps(q0 + j), a0);
        a1 = _mm256_fmadd_ps(r, _mm256_loadu_ps(q1 + j), a1);
        a2 = _mm256_fmadd_ps(r, _mm256_loadu_ps(q2 + j), a2);
        a3 = _mm256_fmadd_ps(r, _mm256_loadu_ps(q3 + j), a3);
    }
    float s0 = hsum8(_mm256_add_ps(a0, b0)), s1 = hsum8(_mm256_add_ps(a1, b1));
    float s2 = hsum8(_mm256_add_ps(a2, b2)), s3 = hsum8(_mm256_add_ps(a3, b3));
    for (; j < d; ++j) {
        s0 += row[j] * q0[j];
        s1 += row[j] * q1[j];
        s2 += row[j] * q2[j];
        s3 += row[j] * q3[j];
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
}

EMBFAST_AVX2 inline void row_dots_avx2(const float* row, const float* Q, std::size_t nq, std::size_t d,
                                               float* out, float* row_sq) {
    std::size_t q = 0;
    for (; q + 4 <= nq; q += 4)
        dot4_avx2(row, Q + q * d, Q + (q + 1) * d, Q + (q + 2) * d, Q + (q + 3) * d, d, out + q);
    for (; q < nq; ++q) out[q] = dot_avx2(row, Q + q * d, d);
    if (row_sq) *row_sq = dot_avx2(row, row, d);
}
#endif

// Scan corpus rows [begin, end) against all queries, offering scores to heaps.
// qscale[q] multiplies query q's scores (1/||q|| for cosine, 1 for inner
// product); when `corpus_norms` is set each row's score is also divided by
// max(||row||, 1e-12).
struct ScanArgs {
    const float* Q;
    const float* qscale;
    std::size_t nq;
    const float* C;
    std::size_t d;
    bool corpus_norms;
};

template <bool AVX>
inline void scan_rows_body(const ScanArgs& a, std::size_t begin, std::size_t end, TopKHeap* heaps,
                                   float* buf) {
    float row_sq = 1.0f;
    for (std::size_t r = begin; r < end; ++r) {
        const float* row = a.C + r * a.d;
#if EMBFAST_X86
        if constexpr (AVX) {
            row_dots_avx2(row, a.Q, a.nq, a.d, buf, a.corpus_norms ? &row_sq : nullptr);
        } else
#endif
        {
            row_dots_generic(row, a.Q, a.nq, a.d, buf, a.corpus_norms ? &row_sq : nullptr);
        }
        float cinv = 1.0f;
        if (a.corpus_norms) {
            float n = std::sqrt(row_sq);
            cinv = 1.0f / (n > 1e-12f ? n : 1e-12f);
        }
        for (std::size_t q = 0; q < a.nq; ++q) {
            float sc = buf[q] * a.qscale[q] * cinv;
            TopKHeap& h = heaps[q];
            if (sc > h.threshold() || !h.full()) h.push(sc, static_cast<std::int64_t>(r));
        }
    }
}

EMBFAST_FLATTEN void scan_rows_generic(const ScanArgs& a, std::size_t begin, std::size_t end, TopKHeap* heaps, float* buf) {
    scan_rows_body<false>(a, begin, end, heaps, buf);
}
#if EMBFAST_X86
EMBFAST_AVX2_ENTRY void scan_rows_avx2(const ScanArgs& a, std::size_t begin, std::size_t end, TopKHeap* heaps,
                                        float* buf) {
    scan_rows_body<true>(a, begin, end, heaps, buf);
}
#endif

// Corpus-parallel top-k driver shared by every scan: each thread scans a
// contiguous slice of [0, n) with worker(begin, end, heaps) into its own nq
// heaps; the heaps are then merged per query (ties still go to the lower
// index) and written best-first to out_s / out_i (nq, k).
template <typename Worker>
void parallel_corpus_topk(std::size_t nq, std::size_t n, std::size_t k, int threads, float* out_s,
                          std::int64_t* out_i, Worker worker) {
    if (static_cast<std::size_t>(threads) > n) threads = static_cast<int>(std::max<std::size_t>(n, 1));
    std::vector<float> hs(static_cast<std::size_t>(threads) * nq * k);
    std::vector<std::int64_t> hi(hs.size());
    std::vector<std::size_t> hsize(static_cast<std::size_t>(threads) * nq, 0);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int tid = 0, nt = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        std::size_t chunk = (n + nt - 1) / nt;
        std::size_t begin = std::min(n, chunk * tid), end = std::min(n, begin + chunk);
        std::vector<TopKHeap> heaps;
        heaps.reserve(nq);
        for (std::size_t q = 0; q < nq; ++q) {
            std::size_t off = (static_cast<std::size_t>(tid) * nq + q) * k;
            heaps.emplace_back(hs.data() + off, hi.data() + off, k);
        }
        worker(begin, end, heaps.data());
        for (std::size_t q = 0; q < nq; ++q) hsize[static_cast<std::size_t>(tid) * nq + q] = heaps[q].size;
    }
    for (std::size_t q = 0; q < nq; ++q) {
        TopKHeap out(out_s + q * k, out_i + q * k, k);
        for (int t = 0; t < threads; ++t) {
            std::size_t slot = static_cast<std::size_t>(t) * nq + q;
            for (std::size_t j = 0; j < hsize[slot]; ++j) out.push(hs[slot * k + j], hi[slot * k + j]);
        }
        out.sort_best_first();
    }
}

// Exact top-k of every query against the corpus by streaming the corpus once.
// Q (nq, d), C (n, d) float32 C-contiguous; out_s (nq, k), out_i (nq, k).
// Best for few queries (memory-bound); for many queries the Python layer uses
// BLAS score blocks + topk_merge_block instead.
inline void topk_scan(const float* Q, const float* qscale, std::size_t nq, const float* C, std::size_t n,
                      std::size_t d, std::size_t k, bool corpus_norms, float* out_s, std::int64_t* out_i,
                      int threads) {
    int t = resolve_threads(threads, static_cast<double>(n) * d * (nq + (corpus_norms ? 1 : 0)), 1.0e6);
    ScanArgs args{Q, qscale, nq, C, d, corpus_norms};
    auto scan = &scan_rows_generic;
#if EMBFAST_X86
    if (use_avx2()) scan = &scan_rows_avx2;
#endif
    parallel_corpus_topk(nq, n, k, t, out_s, out_i, [&](std::size_t begin, std::size_t end, TopKHeap* heaps) {
        std::vector<float> buf(nq + 4);
        scan(args, begin, end, heaps, buf.data());
    });
}

// Scores a merge checks at once against the heap threshold before looking at any one of them.
constexpr std::size_t kMergeRun = 16;

// Merge a block of precomputed scores into running heaps.
// scores (nq, b) float32 holds raw dot products of every query with corpus rows
// [offset, offset + b); score = scores * row_scale[q] * col_scale[j] (either
// scale may be null = 1). Heaps are (nq, k) arrays with per-query fill counts.
inline void topk_merge_block(const float* scores, std::size_t nq, std::size_t b, std::int64_t offset,
                             const float* row_scale, const float* col_scale, float* heap_s, std::int64_t* heap_i,
                             std::int64_t* heap_n, std::size_t k, int threads) {
    int t = resolve_threads(threads, static_cast<double>(nq) * b, 2.0e5);
#pragma omp parallel for num_threads(t) schedule(static) if (t > 1)
    for (std::int64_t q = 0; q < static_cast<std::int64_t>(nq); ++q) {
        TopKHeap h(heap_s + q * k, heap_i + q * k, k, static_cast<std::size_t>(heap_n[q]));
        const float* row = scores + q * b;
        float rs = row_scale ? row_scale[q] : 1.0f;
        float thr = h.threshold();  // -inf until the heap is full; NaN never passes (push drops it anyway)
        std::size_t j = 0;
        if (!row_scale && !col_scale) {  // raw scores: skip runs of kMergeRun that cannot enter at once
            for (; j + kMergeRun <= b; j += kMergeRun) {
                bool any = false;
                for (std::size_t u = 0; u < kMergeRun; ++u) any |= row[j + u] >= thr;
                if (!any) continue;
                for (std::size_t u = 0; u < kMergeRun; ++u) {
                    if (row[j + u] >= thr) {
                        h.push(row[j + u], offset + static_cast<std::int64_t>(j + u));
                        thr = h.threshold();
                    }
                }
            }
        }
        for (; j < b; ++j) {
            float sc = row[j] * rs;
            if (col_scale) sc *= col_scale[j];
            if (sc >= thr) {
                h.push(sc, offset + static_cast<std::int64_t>(j));
                thr = h.threshold();
            }
        }
        heap_n[q] = static_cast<std::int64_t>(h.size);
    }
}

// Merge the columns of a block of scores into running heaps: scores (nr, b) holds raw dot products of
// the rows [offset, offset + nr) with the b owners of the heaps; column j's candidates go to heap j.
// The same result as topk_merge_block on the transposed block (candidates offered in row order), without
// writing the transpose: each thread owns strips of columns and streams the rows, so reads stay
// contiguous and the pre-check reads a small array of heap thresholds.
inline void topk_merge_block_columns(const float* scores, std::size_t nr, std::size_t b, std::int64_t offset,
                                     float* heap_s, std::int64_t* heap_i, std::int64_t* heap_n, std::size_t k,
                                     int threads) {
    if (k == 0) return;
    constexpr std::size_t kStrip = 256;
    const std::int64_t strips = static_cast<std::int64_t>((b + kStrip - 1) / kStrip);
    int t = resolve_threads(threads, static_cast<double>(nr) * b, 2.0e5);
#pragma omp parallel for num_threads(t) schedule(dynamic) if (t > 1)
    for (std::int64_t st = 0; st < strips; ++st) {
        const std::size_t j0 = static_cast<std::size_t>(st) * kStrip, j1 = std::min(b, j0 + kStrip);
        float thr[kStrip];
        for (std::size_t j = j0; j < j1; ++j) {
            TopKHeap h(heap_s + j * k, heap_i + j * k, k, static_cast<std::size_t>(heap_n[j]));
            thr[j - j0] = h.threshold();
        }
        for (std::size_t r = 0; r < nr; ++r) {
            const float* row = scores + r * b;
            std::size_t j = j0;
            for (; j + kMergeRun <= j1; j += kMergeRun) {  // skip runs that cannot enter at once
                bool any = false;
                for (std::size_t u = 0; u < kMergeRun; ++u) any |= row[j + u] >= thr[j - j0 + u];
                if (!any) continue;
                for (std::size_t u = 0; u < kMergeRun; ++u) {
                    if (row[j + u] >= thr[j - j0 + u]) {
                        TopKHeap h(heap_s + (j + u) * k, heap_i + (j + u) * k, k,
                                   static_cast<std::size_t>(heap_n[j + u]));
                        h.push(row[j + u], offset + static_cast<std::int64_t>(r));
                        heap_n[j + u] = static_cast<std::int64_t>(h.size);
                        thr[j - j0 + u] = h.threshold();
                    }
                }
            }
            for (; j < j1; ++j) {
                const float sc = row[j];
                if (sc >= thr[j - j0]) {  // NaN never passes (push drops it anyway)
                    TopKHeap h(heap_s + j * k, heap_i + j * k, k, static_cast<std::size_t>(heap_n[j]));
                    h.push(sc, offset + static_cast<std::int64_t>(r));
                    heap_n[j] = static_cast<std::int64_t>(h.size);
                    thr[j - j0] = h.threshold();
                }
            }
        }
    }
}

// Sort running heaps best-first (unused slots: NaN score, index -1).
inline void topk_finalize(float* heap_s, std::int64_t* heap_i, const std::int64_t* heap_n, std::size_t nq,
                          std::size_t k) {
    for (std::size_t q = 0; q < nq; ++q) {
        TopKHeap h(heap_s + q * k, heap_i + q * k, k, static_cast<std::size_t>(heap_n[q]));
        h.sort_best_first();
    }
}

}  // namespace embfast
