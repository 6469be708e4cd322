// embfast native core: top-k over quantized corpora.
//
// int8: score = sum_j q[j] * c[j] in int32, returned as float32 (exact).
// binary: vectors packed 8 dims per byte (numpy.packbits order); score =
// number of bits - Hamming distance, so higher is closer, like the float case.
// Same ordering and tie rule as topk.hpp; corpus split across threads.
#pragma once

#include <cstring>
#include <vector>

#include "common.hpp"
#include "topk.hpp"

namespace embfast {

EMBFAST_INLINE std::int32_t dot_i8_generic(const std::int8_t* a, const std::int8_t* b, std::size_t d) {
    std::int32_t acc = 0;
    for (std::size_t j = 0; j < d; ++j) acc += static_cast<std::int32_t>(a[j]) * b[j];
    return acc;
}

EMBFAST_INLINE std::uint32_t hamming_generic(const std::uint8_t* a, const std::uint8_t* b, std::size_t nb) {
    std::uint32_t acc = 0;
    std::size_t j = 0;
    for (; j + 8 <= nb; j += 8) {
        std::uint64_t x, y;
        std::memcpy(&x, a + j, 8);
        std::memcpy(&y, b + j, 8);
        acc += static_cast<std::uint32_t>(__builtin_popcountll(x ^ y));
    }
    for (; j < nb; ++j) acc += static_cast<std::uint32_t>(__builtin_popcount(static_cast<unsigned>(a[j] ^ b[j])));
    return acc;
}

#if EMBFAST_X86
EMBFAST_AVX2 inline std::uint32_t hamming_popcnt(const std::uint8_t* a, const std::uint8_t* b,
                                                         std::size_t nb) {
    std::uint64_t acc = 0;
    std::size_t j = 0;
    for (; j + 8 <= nb; j += 8) {
        std::uint64_t x, y;
        std::memcpy(&x, a + j, 8);
        std::memcpy(&y, b + j, 8);
        acc += static_cast<std::uint64_t>(_mm_popcnt_u64(x ^ y));
    }
    for (; j < nb; ++j) acc += static_cast<std::uint64_t>(_mm_popcnt_u32(static_cast<unsigned>(a[j] ^ b[j])));
    return static_cast<std::uint32_t>(acc);
}
#endif

// Per-thread scans over corpus rows [begin, end): one plain and one AVX2 body.
template <typename T, typename ScoreFn>
inline void scan_quantized(const T* Q, std::size_t nq, const T* C, std::size_t begin, std::size_t end,
                                   std::size_t d, TopKHeap* heaps, ScoreFn score_fn) {
    for (std::size_t r = begin; r < end; ++r) {
        const T* row = C + r * d;
        for (std::size_t q = 0; q < nq; ++q) {
            float sc = score_fn(Q + q * d, row, d);
            TopKHeap& h = heaps[q];
            if (sc > h.threshold() || !h.full()) h.push(sc, static_cast<std::int64_t>(r));
        }
    }
}

struct Int8Dot {
    EMBFAST_INLINE float operator()(const std::int8_t* a, const std::int8_t* b, std::size_t d) const {
        return static_cast<float>(dot_i8_generic(a, b, d));
    }
};
struct BitSim {
    float bits;
    EMBFAST_INLINE float operator()(const std::uint8_t* a, const std::uint8_t* b, std::size_t nb) const {
        return bits - static_cast<float>(hamming_generic(a, b, nb));
    }
};
EMBFAST_FLATTEN void scan_int8_generic(const std::int8_t* Q, std::size_t nq, const std::int8_t* C, std::size_t b,
                              std::size_t e, std::size_t d, TopKHeap* h) {
    scan_quantized(Q, nq, C, b, e, d, h, Int8Dot{});
}
EMBFAST_FLATTEN void scan_bits_generic(const std::uint8_t* Q, std::size_t nq, const std::uint8_t* C, std::size_t b,
                              std::size_t e, std::size_t nb, TopKHeap* h) {
    scan_quantized(Q, nq, C, b, e, nb, h, BitSim{static_cast<float>(nb * 8)});
}

#if EMBFAST_X86
struct BitSimPopcnt {
    float bits;
    EMBFAST_AVX2 inline float operator()(const std::uint8_t* a, const std::uint8_t* b, std::size_t nb) const {
        return bits - static_cast<float>(hamming_popcnt(a, b, nb));
    }
};
// Dot of an int8 row with a query already widened to int16 (padded with zeros to a
// multiple of 16): one sign extension per 16 corpus bytes instead of four shuffles
// per 32 bytes when both sides are widened row by row.
EMBFAST_AVX2 inline std::int32_t dot_i8_i16_avx2(const std::int8_t* row, const std::int16_t* q16, std::size_t d) {
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    std::size_t j = 0;
    for (; j + 32 <= d; j += 32) {
        __m256i r0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
        __m256i r1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j + 16)));
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(r0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q16 + j))));
        acc1 = _mm256_add_epi32(acc1,
                                _mm256_madd_epi16(r1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q16 + j + 16))));
    }
    for (; j + 16 <= d; j += 16) {
        __m256i r0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(r0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q16 + j))));
    }
    __m256i acc = _mm256_add_epi32(acc0, acc1);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    std::int32_t r = _mm_cvtsi128_si32(s);
    for (; j < d; ++j) r += static_cast<std::int32_t>(row[j]) * q16[j];
    return r;
}

// Dots of 4 consecutive int8 rows with one widened query: four independent
// accumulator chains hide the madd latency, and each query load serves 4 rows.
EMBFAST_AVX2 inline void dot4_i8_i16_avx2(const std::int8_t* rows, std::size_t d, const std::int16_t* q16,
                                          std::int32_t* out) {
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256(), a2 = _mm256_setzero_si256(),
            a3 = _mm256_setzero_si256();
    std::size_t j = 0;
    for (; j + 16 <= d; j += 16) {
        __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q16 + j));
        const std::int8_t* p = rows + j;
        __m256i r0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        __m256i r1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + d)));
        __m256i r2 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * d)));
        __m256i r3 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 3 * d)));
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(r0, qv));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(r1, qv));
        a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(r2, qv));
        a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(r3, qv));
    }
    // horizontal sums of the four accumulators at once
    __m256i h01 = _mm256_hadd_epi32(a0, a1), h23 = _mm256_hadd_epi32(a2, a3);
    __m256i h = _mm256_hadd_epi32(h01, h23);  // per 128-bit lane: [r0, r1, r2, r3] partial sums
    __m128i sums = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), sums);
    for (; j < d; ++j)
        for (std::size_t k = 0; k < 4; ++k) out[k] += static_cast<std::int32_t>(rows[k * d + j]) * q16[j];
}

EMBFAST_AVX2_ENTRY void scan_int8_avx2(const std::int8_t* Q, std::size_t nq, const std::int8_t* C, std::size_t b,
                                       std::size_t e, std::size_t d, TopKHeap* h) {
    std::vector<std::int16_t> q16(nq * d);  // queries widened once per thread
    for (std::size_t i = 0; i < nq * d; ++i) q16[i] = Q[i];
    auto offer = [&](std::size_t q, std::size_t r, std::int32_t dot) {
        float sc = static_cast<float>(dot);
        TopKHeap& hh = h[q];
        if (sc > hh.threshold() || !hh.full()) hh.push(sc, static_cast<std::int64_t>(r));
    };
    std::size_t r = b;
    std::int32_t dots[4];
    constexpr std::size_t kAhead = 16;  // rows prefetched ahead: int8 rows need more uops per byte than
                                        // float rows, so fewer misses are in flight without it
    for (; r + 4 <= e; r += 4) {  // rows in increasing order keep the lower-index tie rule
        if (r + kAhead + 4 <= e) {
            const char* next = reinterpret_cast<const char*>(C + (r + kAhead) * d);
            for (std::size_t off = 0; off < 4 * d; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
        }
        for (std::size_t q = 0; q < nq; ++q) {
            dot4_i8_i16_avx2(C + r * d, d, q16.data() + q * d, dots);
            for (std::size_t k = 0; k < 4; ++k) offer(q, r + k, dots[k]);
        }
    }
    for (; r < e; ++r)
        for (std::size_t q = 0; q < nq; ++q) offer(q, r, dot_i8_i16_avx2(C + r * d, q16.data() + q * d, d));
}

EMBFAST_AVX2_ENTRY void scan_bits_popcnt(const std::uint8_t* Q, std::size_t nq, const std::uint8_t* C,
                                          std::size_t b, std::size_t e, std::size_t nb, TopKHeap* h) {
    scan_quantized(Q, nq, C, b, e, nb, h, BitSimPopcnt{static_cast<float>(nb * 8)});
}
#endif

inline void topk_int8(const std::int8_t* Q, std::size_t nq, const std::int8_t* C, std::size_t n, std::size_t d,
                      std::size_t k, float* s, std::int64_t* i, int threads) {
    int t = resolve_threads(threads, static_cast<double>(n) * d * nq, 1.0e6);
    auto scan = &scan_int8_generic;
#if EMBFAST_X86
    if (use_avx2()) scan = &scan_int8_avx2;
#endif
    parallel_corpus_topk(nq, n, k, t, s, i,
                         [&](std::size_t b, std::size_t e, TopKHeap* h) { scan(Q, nq, C, b, e, d, h); });
}

inline void topk_hamming(const std::uint8_t* Q, std::size_t nq, const std::uint8_t* C, std::size_t n, std::size_t nb,
                         std::size_t k, float* s, std::int64_t* i, int threads) {
    int t = resolve_threads(threads, static_cast<double>(n) * nb * nq, 1.0e5);
    auto scan = &scan_bits_generic;
#if EMBFAST_X86
    if (use_avx2()) scan = &scan_bits_popcnt;
#endif
    parallel_corpus_topk(nq, n, k, t, s, i,
                         [&](std::size_t b, std::size_t e, TopKHeap* h) { scan(Q, nq, C, b, e, nb, h); });
}

}  // namespace embfast
