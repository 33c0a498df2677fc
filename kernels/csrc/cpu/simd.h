// x86 helpers shared by the CPU kernels: run-time instruction-set levels (the module is built without
// -march, so each SIMD path is chosen when the CPU has it), horizontal sums and a vector exp.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace strata::cpu {

// Instruction-set levels, in order. The module runs the best level the CPU has, capped by
// set_isa_cap (kernels.set_cpu_isa / STRATA_CPU_ISA): a test compares the levels' results on one machine,
// an operator can rule a level out.
enum class Isa : int {
    kScalar = 0,
    kAvx2 = 1,          // AVX2 + FMA + F16C
    kAvxVnni = 2,       // + AVX-VNNI (vpdpbusd on 256-bit vectors, VEX-encoded: Alder Lake and later cores,
                        //   Sierra Forest Xeons; no AVX-512 needed)
    kAvx512Vnni = 3,    // + AVX512F/BW/VL and AVX512-VNNI (vpdpbusd, EVEX-encoded: no AVX-VNNI needed)
};

inline bool cpu_has_avx_vnni() {
    static const bool has = __builtin_cpu_supports("avxvnni");
    return has;
}

inline Isa cpu_isa() {
    static const Isa best = [] {
        if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
            return Isa::kScalar;
        const bool vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
        return vnni ? Isa::kAvx512Vnni : cpu_has_avx_vnni() ? Isa::kAvxVnni : Isa::kAvx2;
    }();
    return best;
}

inline std::atomic<int>& isa_cap() {
    static std::atomic<int> cap{static_cast<int>(Isa::kAvx512Vnni)};
    return cap;
}

inline void set_isa_cap(Isa level) { isa_cap().store(static_cast<int>(level), std::memory_order_relaxed); }

// the level the kernels run at now: the cap or the CPU's best, whichever is lower, and AVX2 for a cap at
// AVX-VNNI on a CPU with AVX512-VNNI but not AVX-VNNI (Ice Lake, Zen 4)
inline Isa active_isa() {
    const auto level = static_cast<Isa>(std::min(static_cast<int>(cpu_isa()), isa_cap().load(std::memory_order_relaxed)));
    return level == Isa::kAvxVnni && !cpu_has_avx_vnni() ? Isa::kAvx2 : level;
}

inline bool has_avx2() { return active_isa() >= Isa::kAvx2; }

// the sum of v's eight lanes
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// e^x for x <= 0 (softmax after subtracting the max), 8 lanes: Cephes' polynomial, ~2 ulp; x < -87 → 0
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

}  // namespace strata::cpu
