// embfast native core: token pooling and L2 normalization.
//
// Contract (all kernels): x is (batch, seq_len, hidden) float32, C-contiguous;
// mask is (batch, seq_len) of int32 or int64, nonzero = real token; out is
// (batch, hidden) float32, C-contiguous, fully written. Rows are independent,
// so the batch is split across OpenMP threads. No kernel throws.
#pragma once

#include <cmath>
#include <cstring>

#include "common.hpp"

namespace embfast {

enum class Pooling { Mean, Cls, Max, LastToken, MeanSqrtLen };

// One output row. Written as plain loops over `hidden` so that the compiler
// vectorizes them; the AVX2 wrapper below recompiles this body for AVX2.
template <typename M>
EMBFAST_INLINE void pool_row(const float* x, const M* mask, float* out, std::size_t seq, std::size_t hidden,
                             Pooling mode) {
    switch (mode) {
        case Pooling::Cls: {
            std::memcpy(out, x, hidden * sizeof(float));
            return;
        }
        case Pooling::LastToken: {
            // Last position with a real token; works for left and right padding.
            std::size_t s = seq;
            while (s > 0 && mask[s - 1] == 0) --s;
            if (s == 0) {
                std::memset(out, 0, hidden * sizeof(float));
            } else {
                std::memcpy(out, x + (s - 1) * hidden, hidden * sizeof(float));
            }
            return;
        }
        case Pooling::Max: {
            bool any = false;
            for (std::size_t s = 0; s < seq; ++s) {
                if (mask[s] == 0) continue;
                const float* xs = x + s * hidden;
                if (!any) {
                    std::memcpy(out, xs, hidden * sizeof(float));
                    any = true;
                } else {
                    for (std::size_t h = 0; h < hidden; ++h) out[h] = out[h] < xs[h] ? xs[h] : out[h];
                }
            }
            if (!any) std::memset(out, 0, hidden * sizeof(float));
            return;
        }
        case Pooling::Mean:
        case Pooling::MeanSqrtLen: {
            std::memset(out, 0, hidden * sizeof(float));
            std::size_t count = 0;
            for (std::size_t s = 0; s < seq; ++s) {
                if (mask[s] == 0) continue;
                ++count;
                const float* xs = x + s * hidden;
                for (std::size_t h = 0; h < hidden; ++h) out[h] += xs[h];
            }
            // Mean divides by max(count, 1e-9) as sentence-transformers does, so
            // an all-padding row stays zero.
            float denom = mode == Pooling::Mean ? (count > 0 ? static_cast<float>(count) : 1e-9f)
                                                : (count > 0 ? std::sqrt(static_cast<float>(count)) : 1e-9f);
            float inv = 1.0f / denom;
            if (count == 0) inv = 0.0f;
            for (std::size_t h = 0; h < hidden; ++h) out[h] *= inv;
            return;
        }
    }
}

#if EMBFAST_X86
// The row body recompiled for AVX2 (called per row so that OpenMP's outlined
// region needs no target attribute of its own).
template <typename M>
EMBFAST_AVX2 void pool_row_avx2(const float* x, const M* mask, float* out, std::size_t seq, std::size_t hidden,
                                Pooling mode) {
    pool_row(x, mask, out, seq, hidden, mode);
}
#endif

template <typename M>
void pool_row_plain(const float* x, const M* mask, float* out, std::size_t seq, std::size_t hidden, Pooling mode) {
    pool_row(x, mask, out, seq, hidden, mode);
}

template <typename M>
void pool(const float* x, const M* mask, float* out, std::size_t batch, std::size_t seq, std::size_t hidden,
          Pooling mode, int threads) {
    int t = resolve_threads(threads, static_cast<double>(batch) * seq * hidden);
    auto row_fn = &pool_row_plain<M>;
#if EMBFAST_X86
    if (use_avx2()) row_fn = &pool_row_avx2<M>;
#endif
#pragma omp parallel for num_threads(t) schedule(static) if (t > 1)
    for (std::int64_t b = 0; b < static_cast<std::int64_t>(batch); ++b)
        row_fn(x + b * seq * hidden, mask + b * seq, out + b * hidden, seq, hidden, mode);
}

// ---------------------------------------------------------------------------
// L2 normalization: out[i] = x[i] / max(||x[i]||, 1e-12). Zero rows stay zero;
// a row holding NaN or inf yields NaN (it is not silently repaired). The norm
// is accumulated in double so that it matches the float64 reference closely.
EMBFAST_INLINE void normalize_row(const float* x, float* out, std::size_t dim) {
    double ss = 0.0;
    for (std::size_t j = 0; j < dim; ++j) ss += static_cast<double>(x[j]) * x[j];
    double n = std::sqrt(ss);
    float inv = static_cast<float>(1.0 / (n > 1e-12 ? n : 1e-12));
    for (std::size_t j = 0; j < dim; ++j) out[j] = x[j] * inv;
}

inline void l2_normalize(const float* x, float* out, std::size_t rows, std::size_t dim, int threads) {
    int t = resolve_threads(threads, static_cast<double>(rows) * dim, 1.0e6);
#pragma omp parallel for num_threads(t) schedule(static) if (t > 1)
    for (std::int64_t i = 0; i < static_cast<std::int64_t>(rows); ++i) normalize_row(x + i * dim, out + i * dim, dim);
}

}  // namespace embfast
