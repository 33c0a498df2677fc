// Residual-add + RMSNorm, rotary embedding and SiLU-and-mul (see layer_ops.h). One pass over each row instead of the
// five or six tensor operations (and temporaries) of the torch path (AVX2 for the norm and SiLU: a scalar
// expf per value cost ~15 us a layer at decode); threads only for many rows.
#include "layer_ops.h"
#include "simd.h"

#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstring>

#include "../common/layer_math.h"

namespace strata::cpu {

namespace {

// one row: r += d (when given), o = weight * r * rms_inverse(sum r^2); eight lanes of partial sums
__attribute__((target("avx2,fma"))) void add_rms_norm_row_avx2(float* r, const float* d, const float* weight,
                                                               int64_t hidden, float eps, float* o) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= hidden; i += 8) {
        __m256 v = _mm256_loadu_ps(r + i);
        if (d != nullptr) {
            v = _mm256_add_ps(v, _mm256_loadu_ps(d + i));
            _mm256_storeu_ps(r + i, v);
        }
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float sum = hsum(acc);
    for (; i < hidden; ++i) {
        if (d != nullptr) r[i] += d[i];
        sum += r[i] * r[i];
    }
    const float inv = rms_inverse(sum, hidden, eps);
    const __m256 vinv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= hidden; i += 8)
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i), _mm256_mul_ps(_mm256_loadu_ps(r + i), vinv)));
    for (; i < hidden; ++i) o[i] = weight[i] * (r[i] * inv);
}

void add_rms_norm_row_scalar(float* r, const float* d, const float* weight, int64_t hidden, float eps, float* o) {
    float sum = 0.f;
    for (int64_t i = 0; i < hidden; ++i) {
        if (d != nullptr) r[i] += d[i];
        sum += r[i] * r[i];
    }
    const float inv = rms_inverse(sum, hidden, eps);
    for (int64_t i = 0; i < hidden; ++i) o[i] = weight[i] * (r[i] * inv);
}

// silu(g) * u with e = exp(-|g|) (the exp's domain): sigmoid(g) = 1 / (1 + e) for g >= 0, e / (1 + e) below
__attribute__((target("avx2,fma"))) void silu_and_mul_row_avx2(const float* g, const float* u, int64_t n, float* o) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = exp_avx2(_mm256_or_ps(x, sign));                       // exp(-|x|)
        const __m256 num = _mm256_blendv_ps(one, e, x);                          // sign bit set: x < 0
        const __m256 sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; ++i) o[i] = silu_mul(g[i], u[i]);
}

constexpr float kGeluC = 0.7978845608028654f;      // sqrt(2 / pi)

// x / 2 * (1 + tanh(y)) = x * sigmoid(2 y), y = sqrt(2 / pi) (x + 0.044715 x^3): the sigmoid form keeps its
// precision where 1 + tanh(y) cancels (x below about -3)
inline float gelu_tanh_mul(float x, float u) {
    const float y = kGeluC * (x + 0.044715f * x * x * x);
    return x / (1.0f + std::exp(-2.0f * y)) * u;
}

// sigmoid(2 y) with e = exp(-2 |y|) (the exp's domain): 1 / (1 + e) for y >= 0, e / (1 + e) below
__attribute__((target("avx2,fma"))) void gelu_tanh_and_mul_row_avx2(const float* g, const float* u, int64_t n,
                                                                    float* o) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    const __m256 c2 = _mm256_set1_ps(2.0f * kGeluC), cubic = _mm256_set1_ps(0.044715f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 y2 = _mm256_mul_ps(c2, _mm256_fmadd_ps(_mm256_mul_ps(cubic, x), _mm256_mul_ps(x, x), x));
        const __m256 e = exp_avx2(_mm256_or_ps(y2, sign));                       // exp(-|2y|)
        const __m256 num = _mm256_blendv_ps(one, e, y2);                         // sign bit set: y < 0
        const __m256 sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; ++i) o[i] = gelu_tanh_mul(g[i], u[i]);
}

}  // namespace

void add_rms_norm(float* residual, const float* delta, const float* weight, int64_t rows, int64_t hidden, float eps,
                  float* out) {
    const bool simd = has_avx2();
#pragma omp parallel for schedule(static) if (rows * hidden >= (int64_t{1} << 16))
    for (int64_t t = 0; t < rows; ++t) {
        const float* d = delta != nullptr ? delta + t * hidden : nullptr;
        if (simd) add_rms_norm_row_avx2(residual + t * hidden, d, weight, hidden, eps, out + t * hidden);
        else add_rms_norm_row_scalar(residual + t * hidden, d, weight, hidden, eps, out + t * hidden);
    }
}

void rotary_inplace(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim, const float* cos,
                    const float* sin) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (rows * heads * head_dim >= (int64_t{1} << 16))
    for (int64_t t = 0; t < rows; ++t) {
        const float* c = cos + t * half;
        const float* s = sin + t * half;
        for (int64_t j = 0; j < heads; ++j) {
            float* x1 = x + t * row_stride + j * head_dim;
            float* x2 = x1 + half;
            for (int64_t i = 0; i < half; ++i) rotate_pair(x1[i], x2[i], c[i], s[i]);
        }
    }
}

void silu_and_mul(const float* gate_up, int64_t rows, int64_t inner, float* out) {
    const bool simd = has_avx2();
#pragma omp parallel for schedule(static) if (rows * inner >= (int64_t{1} << 16))
    for (int64_t t = 0; t < rows; ++t) {
        const float* g = gate_up + t * 2 * inner;
        const float* u = g + inner;
        float* o = out + t * inner;
        if (simd) {
            silu_and_mul_row_avx2(g, u, inner, o);
        } else {
            for (int64_t i = 0; i < inner; ++i) o[i] = silu_mul(g[i], u[i]);
        }
    }
}

void gelu_tanh_and_mul(const float* gate_up, int64_t rows, int64_t inner, float* out) {
    const bool simd = has_avx2();
#pragma omp parallel for schedule(static) if (rows * inner >= (int64_t{1} << 16))
    for (int64_t t = 0; t < rows; ++t) {
        const float* g = gate_up + t * 2 * inner;
        const float* u = g + inner;
        float* o = out + t * inner;
        if (simd) {
            gelu_tanh_and_mul_row_avx2(g, u, inner, o);
        } else {
            for (int64_t i = 0; i < inner; ++i) o[i] = gelu_tanh_mul(g[i], u[i]);
        }
    }
}

void reshape_and_cache(const void* k, const void* v, int64_t k_stride, int64_t v_stride, const int64_t* slot_mapping,
                       int64_t rows, int64_t kv_heads, int64_t head_dim, int64_t num_slots, int64_t elem_bytes,
                       void* k_pool, void* v_pool) {
    const size_t head_bytes = static_cast<size_t>(head_dim * elem_bytes);
    const auto* ks = static_cast<const char*>(k);
    const auto* vs = static_cast<const char*>(v);
    auto* kp = static_cast<char*>(k_pool);
    auto* vp = static_cast<char*>(v_pool);
    for (int64_t t = 0; t < rows; ++t) {
        const int64_t slot = slot_mapping[t];
        for (int64_t h = 0; h < kv_heads; ++h) {
            const int64_t dst = (h * num_slots + slot) * head_dim * elem_bytes;
            std::memcpy(kp + dst, ks + (t * k_stride + h * head_dim) * elem_bytes, head_bytes);
            std::memcpy(vp + dst, vs + (t * v_stride + h * head_dim) * elem_bytes, head_bytes);
        }
    }
}

}  // namespace strata::cpu
