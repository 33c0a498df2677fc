// Math shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels, so both compute the same numbers.
#pragma once

#include <cmath>
#include <cstdint>

#include "hd.h"

namespace strata {

// the KV slot of position p of a sequence whose blocks are listed in `table`
STRATA_HD int64_t kv_slot(const int64_t* table, int64_t p, int64_t block_size) {
    return table[p / block_size] * block_size + p % block_size;
}

// RMSNorm's factor from a row's sum of squares
STRATA_HD float rms_inverse(float sum_of_squares, int64_t n, float eps) {
    return 1.0f / sqrtf(sum_of_squares / static_cast<float>(n) + eps);
}

// rotate-half rotary embedding of one pair (x1 from the first half of a head, x2 from the second)
STRATA_HD void rotate_pair(float& x1, float& x2, float c, float s) {
    const float a = x1, b = x2;
    x1 = a * c - b * s;
    x2 = b * c + a * s;
}

STRATA_HD float silu_mul(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

}  // namespace strata
