// Residual-add + RMSNorm and rotary embedding (see norm_rope.h). One pass over each row instead of the
// five or six tensor operations (and temporaries) of the torch path; threads only for many rows.
#include "norm_rope.h"

#include <omp.h>

#include <cmath>

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
        const float inv = 1.f / std::sqrt(sum / static_cast<float>(hidden) + eps);
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
            for (int64_t i = 0; i < half; ++i) {
                const float a = x1[i], b = x2[i];
                x1[i] = a * c[i] - b * s[i];
                x2[i] = b * c[i] + a * s[i];
            }
        }
    }
}

}  // namespace strata::cpu
