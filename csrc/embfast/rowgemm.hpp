// embfast native core: int8 matrix products with one activation scale per row (per token), fused.
//
// y[r, c] = act( float(sum_k (q[r, k] - zp) * w[k, c]) * col_scale[c] * amax[r] + bias[c] + residual[r, c] )
//
// with, for each row r of the input x (one token's hidden vector), optionally smoothed per channel
// (v = x * smooth, SmoothQuant):
//   amax[r] = max(max_k |v[r, k]|, floor)            (symmetric: zero point 128, 127 levels)
//   amax[r] = max(max_k  v[r, k],  floor)            (shifted, for GELU outputs: zero point 16, 239 levels)
//   q[r, k] = clamp(rint(v[r, k] * (levels / amax[r])) + zp, 0, 255)
// and w (K, N) int8 weights whose per-column scales are folded into col_scale (= w_scale / levels).
// act is the identity or GELU (erf form). This is embfast.rowquant's graph (ReduceMax, Div, Mul,
// QuantizeLinear, MatMulIntegerToFloat, Mul, Add, BiasGelu) as one pass over each row block: the row is
// quantized once into a buffer that stays in cache and the output is scaled in registers.
//
// Integer products are exact on every path (AVX-512 VNNI vpdpbusd, AVX2 vpmaddwd on int16 pairs, generic C++),
// and every float step is element-wise in a fixed order with no FMA contraction (this file is compiled with
// -ffp-contract=off), so each ISA gives the same bits, and a row's output depends on nothing but that row:
// the product is batch-invariant by construction. The NumPy reference is embfast.rowquant.reference_matmul.
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common.hpp"

#if EMBFAST_X86
#define EMBFAST_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))
#else
#define EMBFAST_AVX512VNNI
#endif
#define EMBFAST_AVX512VNNI_ENTRY EMBFAST_AVX512VNNI EMBFAST_FLATTEN

namespace embfast {
namespace rowgemm {

enum class Isa { generic = 0, avx2 = 1, avx512vnni = 2 };

inline const char* isa_label(Isa isa) {
    return isa == Isa::avx512vnni ? "avx512vnni" : isa == Isa::avx2 ? "avx2" : "generic";
}

inline Isa cpu_best_isa() {
#if EMBFAST_X86
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
        return Isa::avx512vnni;
    if (cpu_has_avx2_fma()) return Isa::avx2;
#endif
    return Isa::generic;
}

// The path to use: the CPU's best, lowered by EMBFAST_ISA ("generic", or "avx2" to test that path on an
// AVX-512 CPU). Read when a kernel is created.
inline Isa chosen_isa() {
    Isa best = cpu_best_isa();
    const char* env = std::getenv("EMBFAST_ISA");
    std::string v = env ? env : "";
    for (auto& ch : v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (v == "generic") return Isa::generic;
    if (v == "avx2" && best != Isa::generic) return Isa::avx2;
    return best;
}

constexpr int kVnniRows = 8;    // rows per AVX-512 micro-kernel call
constexpr int kVnniCols = 32;   // columns per AVX-512 micro-kernel call (two zmm of int32)
constexpr int kAvx2Rows = 4;
constexpr int kAvx2Cols = 16;   // two ymm of int32
constexpr int kMaxRows = 8;

struct Activation {
    enum Kind { none = 0, gelu = 1 };
};

// Weights packed once for one ISA, with everything the epilogue needs.
struct Packed {
    Isa isa = Isa::generic;
    int K = 0, N = 0;       // logical shape of w
    int Kp = 0, Np = 0;     // padded: K to 4 (VNNI) or 2 (AVX2), N to the micro-kernel's columns
    std::vector<int8_t> w8;     // VNNI: [Np/32][Kp/4][32][4]
    std::vector<int16_t> w16;   // AVX2: [Np/16][Kp/2][16][2]; generic: transposed, [N][K]
    std::vector<int32_t> colsum;    // (Np) sum_k w[k, c] (VNNI zero-point correction)
    std::vector<float> col_scale;   // (Np)
    std::vector<float> bias;        // (Np), zeros when there is none
    bool has_bias = false;
};

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

inline Packed pack(const int8_t* w, int K, int N, const float* col_scale, const float* bias, Isa isa) {
    Packed p;
    p.isa = isa;
    p.K = K;
    p.N = N;
    if (isa == Isa::avx512vnni) {
        p.Kp = round_up(K, 4);
        p.Np = round_up(N, kVnniCols);
        p.w8.assign(static_cast<size_t>(p.Kp) * p.Np, 0);
        const int k4 = p.Kp / 4;
        for (int b = 0; b < p.Np / kVnniCols; ++b)
            for (int kk = 0; kk < k4; ++kk)
                for (int c = 0; c < kVnniCols; ++c)
                    for (int j = 0; j < 4; ++j) {
                        const int k = kk * 4 + j, col = b * kVnniCols + c;
                        if (k < K && col < N)
                            p.w8[((static_cast<size_t>(b) * k4 + kk) * kVnniCols + c) * 4 + j] =
                                w[static_cast<size_t>(k) * N + col];
                    }
    } else if (isa == Isa::avx2) {
        p.Kp = round_up(K, 2);
        p.Np = round_up(N, kAvx2Cols);
        p.w16.assign(static_cast<size_t>(p.Kp) * p.Np, 0);
        const int k2 = p.Kp / 2;
        for (int b = 0; b < p.Np / kAvx2Cols; ++b)
            for (int kk = 0; kk < k2; ++kk)
                for (int c = 0; c < kAvx2Cols; ++c)
                    for (int j = 0; j < 2; ++j) {
                        const int k = kk * 2 + j, col = b * kAvx2Cols + c;
                        if (k < K && col < N)
                            p.w16[((static_cast<size_t>(b) * k2 + kk) * kAvx2Cols + c) * 2 + j] =
                                w[static_cast<size_t>(k) * N + col];
                    }
    } else {
        p.Kp = K;
        p.Np = N;
        p.w16.resize(static_cast<size_t>(K) * N);
        for (int c = 0; c < N; ++c)
            for (int k = 0; k < K; ++k) p.w16[static_cast<size_t>(c) * K + k] = w[static_cast<size_t>(k) * N + c];
    }
    p.colsum.assign(p.Np, 0);
    p.col_scale.assign(p.Np, 0.0f);
    p.bias.assign(p.Np, 0.0f);
    for (int c = 0; c < N; ++c) {
        int32_t s = 0;
        for (int k = 0; k < K; ++k) s += w[static_cast<size_t>(k) * N + c];
        p.colsum[c] = s;
        p.col_scale[c] = col_scale[c];
        p.bias[c] = bias ? bias[c] : 0.0f;
    }
    p.has_bias = bias != nullptr;
    return p;
}

// How the rows are quantized.
struct RowQuant {
    int zero_point = 128;   // 128: symmetric; 16: shifted (GELU outputs)
    float levels = 127.0f;  // levels / amax is the row's multiplier
    float floor = 1e-30f;   // amax is at least this
    bool shifted = false;   // amax from the maximum (shifted) instead of the largest |v| (symmetric)
    const float* smooth = nullptr;  // (K) per-channel multiplier, or none
    int activation = Activation::none;
};

// ---------------------------------------------------------------------------------------------
// GELU, erf form: 0.5 x (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7),
// exp by range reduction (x = n ln2 + r) and a degree-6 polynomial. Each step is one IEEE float32
// operation, written the same way in the scalar and the SIMD versions, so they give the same bits.
namespace gelu_c {
constexpr float kP = 0.3275911f, kA1 = 0.254829592f, kA2 = -0.284496736f, kA3 = 1.421413741f,
                kA4 = -1.453152027f, kA5 = 1.061405429f;
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860682030941723e-6f;
constexpr float kE2 = 0.5f, kE3 = 0.166666671633720398f, kE4 = 4.16666716337203979e-2f,
                kE5 = 8.33333376795053482e-3f, kE6 = 1.38888892251253128e-3f;
constexpr float kExpMin = -87.0f;  // exp(-z*z) below this is 0 for the erf's purpose (z >= 9.3)
}  // namespace gelu_c

// exp(x) for x in [kExpMin, 0].
inline float exp_neg_scalar(float x) {
    using namespace gelu_c;
    x = x < kExpMin ? kExpMin : x;
    float n = std::nearbyint(x * kLog2e);
    float r = x - n * kLn2Hi;
    r = r - n * kLn2Lo;
    float p = kE6;
    p = p * r + kE5;
    p = p * r + kE4;
    p = p * r + kE3;
    p = p * r + kE2;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return std::ldexp(p, static_cast<int>(n));
}

inline float gelu_scalar(float x) {
    using namespace gelu_c;
    float z = x * kInvSqrt2;
    float a = std::fabs(z);
    float t = 1.0f / (1.0f + kP * a);
    float poly = kA5;
    poly = poly * t + kA4;
    poly = poly * t + kA3;
    poly = poly * t + kA2;
    poly = poly * t + kA1;
    poly = poly * t;
    float e = exp_neg_scalar(-(a * a));
    float erf_abs = 1.0f - poly * e;
    float erf = z < 0.0f ? -erf_abs : erf_abs;
    return 0.5f * x * (1.0f + erf);
}

// ---------------------------------------------------------------------------------------------
// Row quantization (all paths give the same bytes and amax: max is exact, each step one IEEE op).

// The scalar steps of a row's quantization: the spec. The SIMD versions do the same lane by lane and call these
// for the channels past the last full vector.
inline float row_max_from(const float* x, int k, int K, const RowQuant& rq, float m) {
    for (; k < K; ++k) {
        float v = rq.smooth ? x[k] * rq.smooth[k] : x[k];
        float a = rq.shifted ? v : std::fabs(v);
        if (a > m) m = a;
    }
    return m;
}

inline float row_amax(float m, const RowQuant& rq) { return m > rq.floor ? m : rq.floor; }

inline void quantize_from(const float* x, int k, int K, const RowQuant& rq, float inv, uint8_t* q) {
    for (; k < K; ++k) {
        float v = rq.smooth ? x[k] * rq.smooth[k] : x[k];
        float s = std::nearbyint(v * inv) + static_cast<float>(rq.zero_point);
        s = s < 0.0f ? 0.0f : (s > 255.0f ? 255.0f : s);
        q[k] = static_cast<uint8_t>(s);
    }
}

inline void quantize_row_generic(const float* x, int K, const RowQuant& rq, uint8_t* q, float* amax_out) {
    const float amax = row_amax(row_max_from(x, 0, K, rq, -INFINITY), rq);
    quantize_from(x, 0, K, rq, rq.levels / amax, q);
    *amax_out = amax;
}

#if EMBFAST_X86
EMBFAST_AVX512VNNI_ENTRY void quantize_row_avx512(const float* x, int K, const RowQuant& rq, uint8_t* q,
                                                   float* amax_out) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 v = _mm512_loadu_ps(x + k);
        if (rq.smooth) v = _mm512_mul_ps(v, _mm512_loadu_ps(rq.smooth + k));
        if (!rq.shifted) v = _mm512_andnot_ps(sign, v);
        mx = _mm512_max_ps(mx, v);
    }
    const float amax = row_amax(row_max_from(x, k, K, rq, _mm512_reduce_max_ps(mx)), rq);
    const float inv = rq.levels / amax;
    const __m512 vinv = _mm512_set1_ps(inv), zp = _mm512_set1_ps(static_cast<float>(rq.zero_point));
    const __m512 lo = _mm512_setzero_ps(), hi = _mm512_set1_ps(255.0f);
    for (k = 0; k + 16 <= K; k += 16) {
        __m512 v = _mm512_loadu_ps(x + k);
        if (rq.smooth) v = _mm512_mul_ps(v, _mm512_loadu_ps(rq.smooth + k));
        __m512 s = _mm512_add_ps(_mm512_roundscale_ps(_mm512_mul_ps(v, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zp);
        s = _mm512_min_ps(_mm512_max_ps(s, lo), hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtusepi32_epi8(_mm512_cvttps_epi32(s)));
    }
    quantize_from(x, k, K, rq, inv, q);
    *amax_out = amax;
}

EMBFAST_AVX2_ENTRY void quantize_row_avx2(const float* x, int K, const RowQuant& rq, uint8_t* q, float* amax_out) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_set1_ps(-INFINITY);
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        if (rq.smooth) v = _mm256_mul_ps(v, _mm256_loadu_ps(rq.smooth + k));
        if (!rq.shifted) v = _mm256_andnot_ps(sign, v);
        mx = _mm256_max_ps(mx, v);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mx);
    float m = lanes[0];
    for (int i = 1; i < 8; ++i) m = lanes[i] > m ? lanes[i] : m;
    const float amax = row_amax(row_max_from(x, k, K, rq, m), rq);
    const float inv = rq.levels / amax;
    const __m256 vinv = _mm256_set1_ps(inv), zp = _mm256_set1_ps(static_cast<float>(rq.zero_point));
    const __m256 lo = _mm256_setzero_ps(), hi = _mm256_set1_ps(255.0f);
    for (k = 0; k + 8 <= K; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        if (rq.smooth) v = _mm256_mul_ps(v, _mm256_loadu_ps(rq.smooth + k));
        __m256 s = _mm256_add_ps(_mm256_round_ps(_mm256_mul_ps(v, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), zp);
        s = _mm256_min_ps(_mm256_max_ps(s, lo), hi);
        __m256i i32 = _mm256_cvttps_epi32(s);
        __m128i i16 = _mm_packus_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packus_epi16(i16, i16));
    }
    quantize_from(x, k, K, rq, inv, q);
    *amax_out = amax;
}
#endif

// ---------------------------------------------------------------------------------------------
// Epilogue, one output value (the spec; SIMD versions repeat it lane-wise).
inline float epilogue_scalar(int32_t acc, float col_scale, float amax, float bias, const float* residual,
                             int activation) {
    float v = static_cast<float>(acc) * col_scale;
    v = v * amax;
    v = v + bias;
    if (residual) v = v + *residual;
    if (activation == Activation::gelu) v = gelu_scalar(v);
    return v;
}

#if EMBFAST_X86
EMBFAST_AVX512VNNI EMBFAST_INLINE __m512 exp_neg_avx512(__m512 x) {
    using namespace gelu_c;
    x = _mm512_max_ps(x, _mm512_set1_ps(kExpMin));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(kLn2Hi)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(kLn2Lo)));
    __m512 p = _mm512_set1_ps(kE6);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kE5));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kE4));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kE3));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kE2));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

EMBFAST_AVX512VNNI EMBFAST_INLINE __m512 gelu_avx512(__m512 x) {
    using namespace gelu_c;
    __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(kInvSqrt2));
    __m512 a = _mm512_andnot_ps(_mm512_set1_ps(-0.0f), z);
    __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_mul_ps(_mm512_set1_ps(kP), a)));
    __m512 poly = _mm512_set1_ps(kA5);
    poly = _mm512_add_ps(_mm512_mul_ps(poly, t), _mm512_set1_ps(kA4));
    poly = _mm512_add_ps(_mm512_mul_ps(poly, t), _mm512_set1_ps(kA3));
    poly = _mm512_add_ps(_mm512_mul_ps(poly, t), _mm512_set1_ps(kA2));
    poly = _mm512_add_ps(_mm512_mul_ps(poly, t), _mm512_set1_ps(kA1));
    poly = _mm512_mul_ps(poly, t);
    __m512 e = exp_neg_avx512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
    __m512 erf_abs = _mm512_sub_ps(_mm512_set1_ps(1.0f), _mm512_mul_ps(poly, e));
    __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 erf = _mm512_mask_sub_ps(erf_abs, neg, _mm512_setzero_ps(), erf_abs);
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), erf));
}

EMBFAST_AVX2 EMBFAST_INLINE __m256 exp_neg_avx2(__m256 x) {
    using namespace gelu_c;
    x = _mm256_max_ps(x, _mm256_set1_ps(kExpMin));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(kLn2Hi)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(kLn2Lo)));
    __m256 p = _mm256_set1_ps(kE6);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kE5));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kE4));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kE3));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(kE2));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.0f));
    // 2^n by the exponent field: n >= -126 here (x >= -87), so the result is a normal float.
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

EMBFAST_AVX2 EMBFAST_INLINE __m256 gelu_avx2(__m256 x) {
    using namespace gelu_c;
    __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(kInvSqrt2));
    __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z);
    __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_mul_ps(_mm256_set1_ps(kP), a)));
    __m256 poly = _mm256_set1_ps(kA5);
    poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(kA4));
    poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(kA3));
    poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(kA2));
    poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(kA1));
    poly = _mm256_mul_ps(poly, t);
    __m256 e = exp_neg_avx2(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
    __m256 erf_abs = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_mul_ps(poly, e));
    __m256 neg = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ);
    __m256 erf = _mm256_blendv_ps(erf_abs, _mm256_sub_ps(_mm256_setzero_ps(), erf_abs), neg);
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), erf));
}
#endif

// ---------------------------------------------------------------------------------------------
// Products of one block of rows (at most kMaxRows), quantized rows q (rows x Kp, zero-padded), into y.

// Where the output columns go: `parts` equal tensors of `width` columns each (a QKV projection written
// straight into Q, K and V), or one (parts = 1, width = N). Each is row-major with `width` columns.
struct Out {
    float* y[3] = {nullptr, nullptr, nullptr};
    int parts = 1;
    int width = 0;
};

struct Block {
    const uint8_t* q;       // rows x Kp
    const float* amax;      // rows
    int rows;
    const float* residual;  // rows x ld_res, or null
    const Out* out;
    int64_t row0;           // the block's first row in the output
    size_t ld_res;
};

// The output address of (row r of the block, column col); a micro-kernel tile never straddles two parts.
inline float* dst(const Block& b, int r, int col) {
    const Out& o = *b.out;
    const int part = o.parts == 1 ? 0 : col / o.width;
    return o.y[part] + (b.row0 + r) * static_cast<int64_t>(o.width) + (col - part * o.width);
}

// One dot product per output over contiguous int16 pairs: compilers vectorize this reduction with the
// baseline ISA's multiply-add of int16 pairs (SSE2 pmaddwd), exactly, since |q - zp| * |w| <= 255 * 127.
inline int32_t dot_i16(const int16_t* a, const int16_t* w, int K) {
    int32_t s = 0;
    for (int k = 0; k < K; ++k) s += static_cast<int32_t>(a[k]) * static_cast<int32_t>(w[k]);
    return s;
}

// a16: the block's rows of (q - zero_point) as int16, Kp (= K) apart.
inline void block_generic(const Packed& p, const RowQuant& rq, const int16_t* a16, const Block& b) {
    for (int r = 0; r < b.rows; ++r) {
        const int16_t* a = a16 + static_cast<size_t>(r) * p.Kp;
        const float* res = b.residual ? b.residual + r * b.ld_res : nullptr;
        for (int c = 0; c < p.N; ++c) {
            const int32_t acc = dot_i16(a, p.w16.data() + static_cast<size_t>(c) * p.K, p.K);
            *dst(b, r, c) = epilogue_scalar(acc, p.col_scale[c], b.amax[r], p.bias[c], res ? res + c : nullptr,
                                    rq.activation);
        }
    }
}

#if EMBFAST_X86
// acc += dot4(a as uint8, w as int8) per int32 lane, in place. Inline assembly, accumulators in named
// variables: GCC 12 compiles the intrinsic (_mm512_dpbusd_epi32) with a register copy of the accumulator
// per call, and an array of accumulators ends up on the stack; either halves the kernel's speed.
#define EMBFAST_DPBUSD(acc, a, w) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(w))

// kVnniRows (8) rows x 32 columns; rows past b.rows hold the zero point (zero products) and are not stored.
EMBFAST_AVX512VNNI_ENTRY void micro_vnni(const Packed& p, const RowQuant& rq, const Block& b, int nb) {
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
            c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00, c70 = c00, c71 = c00;
    const int k4 = p.Kp / 4;
    const size_t ld = static_cast<size_t>(p.Kp);
    const int8_t* wp = p.w8.data() + static_cast<size_t>(nb) * k4 * kVnniCols * 4;
    const uint8_t* q0 = b.q;
    for (int kk = 0; kk < k4; ++kk, wp += 128, q0 += 4) {
        const __m512i w0 = _mm512_loadu_si512(wp);
        const __m512i w1 = _mm512_loadu_si512(wp + 64);
        int32_t a4;
#define EMBFAST_ROW(r, lo, hi)                        \
        std::memcpy(&a4, q0 + (r) * ld, 4);           \
        {                                             \
            const __m512i a = _mm512_set1_epi32(a4);  \
            EMBFAST_DPBUSD(lo, a, w0);                \
            EMBFAST_DPBUSD(hi, a, w1);                \
        }
        EMBFAST_ROW(0, c00, c01)
        EMBFAST_ROW(1, c10, c11)
        EMBFAST_ROW(2, c20, c21)
        EMBFAST_ROW(3, c30, c31)
        EMBFAST_ROW(4, c40, c41)
        EMBFAST_ROW(5, c50, c51)
        EMBFAST_ROW(6, c60, c61)
        EMBFAST_ROW(7, c70, c71)
#undef EMBFAST_ROW
    }
    const __m512i acc[kVnniRows][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31},
                                       {c40, c41}, {c50, c51}, {c60, c61}, {c70, c71}};
    const int col0 = nb * kVnniCols;
    const int ncols = std::min(kVnniCols, p.N - col0);
    const __mmask16 m0 = ncols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << ncols) - 1);
    const __mmask16 m1 = ncols >= 32 ? 0xFFFF : ncols <= 16 ? 0 : static_cast<__mmask16>((1u << (ncols - 16)) - 1);
    const __mmask16 masks[2] = {m0, m1};
    const __m512i zp = _mm512_set1_epi32(rq.zero_point);
    for (int r = 0; r < b.rows; ++r) {
        const __m512 amax = _mm512_set1_ps(b.amax[r]);
        float* yr = dst(b, r, col0);
        const float* res = b.residual ? b.residual + r * b.ld_res + col0 : nullptr;
        for (int h = 0; h < 2; ++h) {
            if (!masks[h]) continue;
            const int c = col0 + h * 16;
            const __m512i corr = _mm512_mullo_epi32(zp, _mm512_loadu_si512(p.colsum.data() + c));
            __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][h], corr));
            v = _mm512_mul_ps(v, _mm512_loadu_ps(p.col_scale.data() + c));
            v = _mm512_mul_ps(v, amax);
            v = _mm512_add_ps(v, _mm512_loadu_ps(p.bias.data() + c));
            if (res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[h], res + h * 16));
            if (rq.activation == Activation::gelu) v = gelu_avx512(v);
            _mm512_mask_storeu_ps(yr + h * 16, masks[h], v);
        }
    }
}
#undef EMBFAST_DPBUSD

// kAvx2Rows (4) rows x 16 columns; rows past b.rows hold zeros (zero products) and are not stored.
EMBFAST_AVX2_ENTRY void micro_avx2(const Packed& p, const RowQuant& rq, const int16_t* a16, const Block& b, int nb) {
    // a16: 4 rows x Kp of (q - zero_point) as int16. Accumulators in named variables, summed through inline
    // assembly: GCC 12 otherwise adds a register copy per accumulator per step, or keeps an array on the stack.
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
            c31 = c00;
    const int k2 = p.Kp / 2;
    const size_t ld = static_cast<size_t>(p.Kp);
    const int16_t* wp = p.w16.data() + static_cast<size_t>(nb) * k2 * kAvx2Cols * 2;
    const int16_t* a0 = a16;
    for (int kk = 0; kk < k2; ++kk, wp += 32, a0 += 2) {
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 16));
        int32_t a2;
#define EMBFAST_ROW(r, lo, hi)                                                      \
        std::memcpy(&a2, a0 + (r) * ld, 4);                                         \
        {                                                                           \
            const __m256i a = _mm256_set1_epi32(a2);                                \
            const __m256i p0 = _mm256_madd_epi16(a, w0), p1 = _mm256_madd_epi16(a, w1); \
            __asm__("vpaddd %1, %0, %0" : "+x"(lo) : "x"(p0));                      \
            __asm__("vpaddd %1, %0, %0" : "+x"(hi) : "x"(p1));                      \
        }
        EMBFAST_ROW(0, c00, c01)
        EMBFAST_ROW(1, c10, c11)
        EMBFAST_ROW(2, c20, c21)
        EMBFAST_ROW(3, c30, c31)
#undef EMBFAST_ROW
    }
    const __m256i acc[kAvx2Rows][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
    const int col0 = nb * kAvx2Cols;
    const int ncols = std::min(kAvx2Cols, p.N - col0);
    alignas(32) float tmp[8];
    for (int r = 0; r < b.rows; ++r) {
        const __m256 amax = _mm256_set1_ps(b.amax[r]);
        float* yr = dst(b, r, col0);
        const float* res = b.residual ? b.residual + r * b.ld_res + col0 : nullptr;
        for (int h = 0; h < 2; ++h) {
            const int n = std::min(8, ncols - h * 8);
            if (n <= 0) continue;
            const int c = col0 + h * 8;
            __m256 v = _mm256_cvtepi32_ps(acc[r][h]);
            v = _mm256_mul_ps(v, _mm256_loadu_ps(p.col_scale.data() + c));
            v = _mm256_mul_ps(v, amax);
            v = _mm256_add_ps(v, _mm256_loadu_ps(p.bias.data() + c));
            if (res) {
                if (n == 8) {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(res + h * 8));
                } else {
                    alignas(32) float rbuf[8] = {0};
                    std::memcpy(rbuf, res + h * 8, sizeof(float) * n);
                    v = _mm256_add_ps(v, _mm256_load_ps(rbuf));
                }
            }
            if (rq.activation == Activation::gelu) v = gelu_avx2(v);
            if (n == 8) {
                _mm256_storeu_ps(yr + h * 8, v);
            } else {
                _mm256_store_ps(tmp, v);
                std::memcpy(yr + h * 8, tmp, sizeof(float) * n);
            }
        }
    }
}
#endif

// Output rows r0 to r1 (into `out`) for input rows x (M x K, row stride ldx). With out.parts > 1, out.width
// must be a multiple of kVnniCols (the micro-kernels' tiles stay within one part).
inline void compute_rows(const Packed& p, const RowQuant& rq, const float* x, size_t ldx, const float* residual,
                         size_t ld_res, const Out& out, int64_t r0, int64_t r1) {
    thread_local std::vector<uint8_t> qbuf;
    thread_local std::vector<int16_t> a16;
    qbuf.assign(static_cast<size_t>(kMaxRows) * p.Kp, static_cast<uint8_t>(rq.zero_point));
    float amax[kMaxRows];
    const int step = p.isa == Isa::avx2 ? kAvx2Rows : kVnniRows;
    for (int64_t r = r0; r < r1; r += step) {
        const int rows = static_cast<int>(std::min<int64_t>(step, r1 - r));
        for (int i = 0; i < rows; ++i) {
            const float* xr = x + (r + i) * ldx;
            uint8_t* qr = qbuf.data() + static_cast<size_t>(i) * p.Kp;
#if EMBFAST_X86
            if (p.isa == Isa::avx512vnni)
                quantize_row_avx512(xr, p.K, rq, qr, amax + i);
            else if (p.isa == Isa::avx2)
                quantize_row_avx2(xr, p.K, rq, qr, amax + i);
            else
#endif
                quantize_row_generic(xr, p.K, rq, qr, amax + i);
        }
        for (int i = rows; i < step; ++i) {  // unused rows of the block: zero products, never stored
            std::memset(qbuf.data() + static_cast<size_t>(i) * p.Kp, rq.zero_point, p.Kp);
            amax[i] = 0.0f;
        }
        Block b{qbuf.data(), amax, rows, residual ? residual + r * ld_res : nullptr, &out, r, ld_res};
#if EMBFAST_X86
        if (p.isa == Isa::avx512vnni) {
            for (int nb = 0; nb < p.Np / kVnniCols; ++nb) micro_vnni(p, rq, b, nb);
            continue;
        }
#endif
        // AVX2 and the portable path multiply int16 pairs: the rows as (q - zero_point).
        a16.resize(static_cast<size_t>(step) * p.Kp);
        for (size_t i = 0; i < a16.size(); ++i) a16[i] = static_cast<int16_t>(static_cast<int>(qbuf[i]) - rq.zero_point);
#if EMBFAST_X86
        if (p.isa == Isa::avx2) {
            for (int nb = 0; nb < p.Np / kAvx2Cols; ++nb) micro_avx2(p, rq, a16.data(), b, nb);
            continue;
        }
#endif
        block_generic(p, rq, a16.data(), b);
    }
}

}  // namespace rowgemm
}  // namespace embfast
