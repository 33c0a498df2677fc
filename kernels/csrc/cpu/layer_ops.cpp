// Residual-add + RMSNorm, rotary embedding and SiLU-and-mul (see layer_ops.h). One pass over each row instead of the
// five or six tensor operations (and temporaries) of the torch path; threads only for many rows.
#include "layer_ops.h"

#include <omp.h>

#include <cmath>

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

}  // namespace strata::cpu
