// int8 GEMV for decode (see int8_gemv.h).
//
// Decode multiplies a handful of activation rows by every weight row, so the weights' bytes are the
// cost: output channels are split over OpenMP threads, each weight row is streamed once, and its 32-byte
// chunks are multiplied with every activation row (up to kMaxRows at a time) in AVX2 registers:
// maddubs(|w|, sign(x, w)) gives pairwise int16 sums (no saturation: 2 * 127 * 127 < 2^15), madd widens
// them to int32. Without AVX2 a scalar loop computes the same integers.
#include "int8_gemv.h"
#include "simd.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace strata::cpu {
namespace {

constexpr int64_t kMaxRows = 8;

__attribute__((target("avx2"))) inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

// rows [r0, r0 + rows) of x against output channels [n0, n1)
__attribute__((target("avx2"))) void block_avx2(const int8_t* xq, const float* x_scale, const int8_t* wq,
                                                 const float* w_scale, int64_t rows, int64_t n, int64_t k,
                                                 int64_t n0, int64_t n1, float* y) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t k32 = k - k % 32;
    for (int64_t j = n0; j < n1; ++j) {
        const int8_t* w = wq + j * k;
        __m256i acc[kMaxRows];
        for (int64_t r = 0; r < rows; ++r) acc[r] = _mm256_setzero_si256();
        for (int64_t i = 0; i < k32; i += 32) {
            const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
            const __m256i wabs = _mm256_sign_epi8(wv, wv);
            for (int64_t r = 0; r < rows; ++r) {
                const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * k + i));
                const __m256i p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv));
                acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, ones));
            }
        }
        for (int64_t r = 0; r < rows; ++r) {
            int32_t total = hsum_i32(acc[r]);
            for (int64_t i = k32; i < k; ++i) total += int32_t{w[i]} * int32_t{xq[r * k + i]};
            y[r * n + j] = static_cast<float>(total) * x_scale[r] * w_scale[j];
        }
    }
}

void block_scalar(const int8_t* xq, const float* x_scale, const int8_t* wq, const float* w_scale, int64_t rows,
                  int64_t n, int64_t k, int64_t n0, int64_t n1, float* y) {
    for (int64_t j = n0; j < n1; ++j) {
        for (int64_t r = 0; r < rows; ++r) {
            int32_t total = 0;
            for (int64_t i = 0; i < k; ++i) total += int32_t{wq[j * k + i]} * int32_t{xq[r * k + i]};
            y[r * n + j] = static_cast<float>(total) * x_scale[r] * w_scale[j];
        }
    }
}

// Runs block(r0, rows, n0, n1) over row groups of up to kMaxRows and chunks of `chunk` output channels,
// the chunks of a row group spread over OpenMP threads (enough per thread to amortise the fork, small
// enough to balance).
template <typename Block>
void over_blocks(int64_t m, int64_t n, int64_t k, int64_t chunk, Block block) {
    const int64_t chunks = (n + chunk - 1) / chunk;
    const bool parallel = n * k >= (int64_t{1} << 15) && chunks > 1;
    for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
        const int64_t rows = std::min(kMaxRows, m - r0);
#pragma omp parallel for schedule(static) if (parallel)
        for (int64_t c = 0; c < chunks; ++c) block(r0, rows, c * chunk, std::min(n, (c + 1) * chunk));
    }
}

}  // namespace

void int8_gemv(const int8_t* xq, const float* x_scale, const int8_t* wq, const float* w_scale, int64_t m, int64_t n,
               int64_t k, float* y) {
    const bool simd = has_avx2();
    over_blocks(m, n, k, 64, [&](int64_t r0, int64_t rows, int64_t n0, int64_t n1) {
        if (simd) block_avx2(xq + r0 * k, x_scale + r0, wq, w_scale, rows, n, k, n0, n1, y + r0 * n);
        else block_scalar(xq + r0 * k, x_scale + r0, wq, w_scale, rows, n, k, n0, n1, y + r0 * n);
    });
}

void int8_linear(const float* x, const int8_t* wq, const float* w_scale, int64_t m, int64_t n, int64_t k, float* y) {
    std::vector<int8_t> xq(static_cast<size_t>(m * k));
    std::vector<float> xs(static_cast<size_t>(m));
    for (int64_t r = 0; r < m; ++r) {
        const float* row = x + r * k;
        float amax = 0.f;
        for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(row[i]));
        const float scale = std::max(amax, 1e-8f) / 127.0f;
        xs[r] = scale;
        for (int64_t i = 0; i < k; ++i) {
            const float v = std::nearbyint(row[i] / scale);      // half to even, as torch.round
            xq[r * k + i] = static_cast<int8_t>(std::clamp(v, -127.0f, 127.0f));
        }
    }
    int8_gemv(xq.data(), xs.data(), wq, w_scale, m, n, k, y);
}

namespace {

__attribute__((target("avx2,fma"))) inline __m256 load_w8(const int8_t* w) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}

// One or two activation rows (single-stream decode's LM head): four output channels at a time, so four
// (or eight) independent FMA chains hide the FMA latency that one chain per channel would wait on.
template <int R>
__attribute__((target("avx2,fma"))) int64_t weight_block_few_rows(const float* x, const int8_t* wq,
                                                                   const float* w_scale, int64_t n, int64_t k,
                                                                   int64_t n0, int64_t n1, float* y) {
    constexpr int C = 4;
    const int64_t k8 = k - k % 8;
    int64_t j = n0;
    for (; j + C <= n1; j += C) {
        __m256 acc[C][R];
        for (int c = 0; c < C; ++c)
            for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps();
        for (int64_t i = 0; i < k8; i += 8) {
            __m256 xv[R];
            for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * k + i);
            for (int c = 0; c < C; ++c) {
                const __m256 wv = load_w8(wq + (j + c) * k + i);
                for (int r = 0; r < R; ++r) acc[c][r] = _mm256_fmadd_ps(xv[r], wv, acc[c][r]);
            }
        }
        for (int c = 0; c < C; ++c) {
            const int8_t* w = wq + (j + c) * k;
            for (int r = 0; r < R; ++r) {
                float total = hsum(acc[c][r]);
                for (int64_t i = k8; i < k; ++i) total += x[r * k + i] * static_cast<float>(w[i]);
                y[r * n + j + c] = total * w_scale[j + c];
            }
        }
    }
    return j;                                   // the first channel left for the general loop
}

__attribute__((target("avx2,fma"))) void weight_block_avx2(const float* x, const int8_t* wq, const float* w_scale,
                                                            int64_t rows, int64_t n, int64_t k, int64_t n0,
                                                            int64_t n1, float* y) {
    const int64_t k8 = k - k % 8;
    if (rows == 1) n0 = weight_block_few_rows<1>(x, wq, w_scale, n, k, n0, n1, y);
    else if (rows == 2) n0 = weight_block_few_rows<2>(x, wq, w_scale, n, k, n0, n1, y);
    for (int64_t j = n0; j < n1; ++j) {
        const int8_t* w = wq + j * k;
        __m256 acc[kMaxRows];
        for (int64_t r = 0; r < rows; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t i = 0; i < k8; i += 8) {
            const __m256 wv = load_w8(w + i);
            for (int64_t r = 0; r < rows; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i), wv, acc[r]);
        }
        for (int64_t r = 0; r < rows; ++r) {
            float total = hsum(acc[r]);
            for (int64_t i = k8; i < k; ++i) total += x[r * k + i] * static_cast<float>(w[i]);
            y[r * n + j] = total * w_scale[j];
        }
    }
}

void weight_block_scalar(const float* x, const int8_t* wq, const float* w_scale, int64_t rows, int64_t n, int64_t k,
                         int64_t n0, int64_t n1, float* y) {
    for (int64_t j = n0; j < n1; ++j) {
        for (int64_t r = 0; r < rows; ++r) {
            float total = 0.f;
            for (int64_t i = 0; i < k; ++i) total += x[r * k + i] * static_cast<float>(wq[j * k + i]);
            y[r * n + j] = total * w_scale[j];
        }
    }
}

}  // namespace

void int8_weight_gemv(const float* x, const int8_t* wq, const float* w_scale, int64_t m, int64_t n, int64_t k,
                      float* y) {
    const bool simd = has_avx2();
    over_blocks(m, n, k, 256, [&](int64_t r0, int64_t rows, int64_t n0, int64_t n1) {
        if (simd) weight_block_avx2(x + r0 * k, wq, w_scale, rows, n, k, n0, n1, y + r0 * n);
        else weight_block_scalar(x + r0 * k, wq, w_scale, rows, n, k, n0, n1, y + r0 * n);
    });
}

}  // namespace strata::cpu
