// x86 helpers shared by the CPU kernels: run-time instruction-set checks (the module is built without
// -march, so each AVX2 path is chosen when the CPU has it) and horizontal sums.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace strata::cpu {

inline bool has_avx2_fma() {
    static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return yes;
}

inline bool has_avx2_fma_f16c() {
    static const bool yes = has_avx2_fma() && __builtin_cpu_supports("f16c");
    return yes;
}

// the sum of v's eight lanes
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

}  // namespace strata::cpu
