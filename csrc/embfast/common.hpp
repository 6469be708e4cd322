// embfast native core: shared helpers (threads, ISA detection, error text).
// Pure C++: nothing here knows about Python.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define EMBFAST_X86 1
#include <immintrin.h>
#define EMBFAST_AVX2 __attribute__((target("avx2,fma,popcnt")))
#else
#define EMBFAST_X86 0
#define EMBFAST_AVX2
#endif

#if defined(__GNUC__)
#define EMBFAST_INLINE inline __attribute__((always_inline))
// Entry points of a SIMD path: everything they call is inlined into them, so
// helpers compiled for AVX2 inline into an AVX2 context only.
#define EMBFAST_FLATTEN inline __attribute__((flatten))
#else
#define EMBFAST_INLINE inline
#define EMBFAST_FLATTEN inline
#endif
#define EMBFAST_AVX2_ENTRY EMBFAST_AVX2 EMBFAST_FLATTEN

namespace embfast {

// True when this CPU can run the AVX2+FMA paths (checked once, at run time).
inline bool cpu_has_avx2_fma() {
#if EMBFAST_X86
    static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("popcnt");
    return ok;
#else
    return false;
#endif
}

// Set by the bindings to force the portable path in tests ("generic") or to
// use the best one ("auto").
inline bool& force_generic_flag() {
    static bool flag = false;
    return flag;
}

inline bool use_avx2() { return !force_generic_flag() && cpu_has_avx2_fma(); }

inline const char* isa_name() { return use_avx2() ? "avx2+fma" : "generic"; }

inline int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// threads: 0 = all cores, 1 = serial, n = n threads; small problems (work below
// `serial_below` multiply-adds) run serially because waking a pool costs more.
inline int resolve_threads(int threads, double work, double serial_below = 2.0e5) {
    if (threads < 0) throw std::invalid_argument("threads must be >= 0, got " + std::to_string(threads));
    int t = threads == 0 ? max_threads() : threads;
    if (work < serial_below) t = 1;
    return t < 1 ? 1 : t;
}

}  // namespace embfast
