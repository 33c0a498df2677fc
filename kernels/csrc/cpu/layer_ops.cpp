// Residual-add + RMSNorm, rotary embedding and SiLU-and-mul (see layer_ops.h). One pass over each row instead of the
// five or six tensor operations (and temporaries) of the torch path; threads only for many rows.
#include "layer_ops.h"

#include <omp.h>

#include <cmath>
#include <cstring>

#include "../common/layer_math.h"

namespace strata::cpu {

void add_rms_norm(float* residual, const float* delta, const float* weight, int64_t rows, int64_t hidden, float eps,
                  float* out) {
#pragma omp parallel for schedule(static) if (rows * hidden >= (int64_t{1} << 16))
    for (int64_t t = 0; t < rows; ++t) {
        float* r = residual + t * hidden;
        float sum = 0.f;
        if (delta != nullptr) {
            const float* d = delta + t * hidden;
            for (int64_t i = 0; i < hidden; ++i) {
                r[i] += d[i];
                sum += r[i] * r[i];
            }
        } else {
            for (int64_t i = 0; i < hidden; ++i) sum += r[i] * r[i];
        }
        const float inv = rms_inverse(sum, hidden, eps);
        float* o = out + t * hidden;
        for (int64_t i = 0; i < hidden; ++i) o[i] = weight[i] * (r[i] * inv);
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
#pragma omp parallel for schedule(static) if (rows * inner >= (int64_t{1} << 16))
    for (int64_t t = 0; t < rows; ++t) {
        const float* g = gate_up + t * 2 * inner;
        const float* u = g + inner;
        float* o = out + t * inner;
        for (int64_t i = 0; i < inner; ++i) o[i] = silu_mul(g[i], u[i]);
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
