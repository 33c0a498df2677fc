// int8 x int8 products for the few rows of a decode step (W8A8 linear layers).
#pragma once

#include <cstdint>

namespace strata::cpu {

// y[m, n] = x_scale[m] * w_scale[n] * sum_k xq[m, k] * wq[n, k]
// xq [M, K] int8 (activations quantized per row), wq [N, K] int8 (weights, one row per output channel),
// x_scale [M], w_scale [N] float32, y [M, N] float32. Integer sums are exact (int32); codes must be in
// [-127, 127]. Built for small M (decode): each weight row is read once for all M rows.
void int8_gemv(const int8_t* xq, const float* x_scale, const int8_t* wq, const float* w_scale, int64_t m, int64_t n,
               int64_t k, float* y);

// The same product from float32 activations x [M, K]: each row is quantized first exactly as
// Int8Linear does (scale = max|x| / 127, at least 1e-8 / 127; codes = x / scale rounded half to even).
void int8_linear(const float* x, const int8_t* wq, const float* w_scale, int64_t m, int64_t n, int64_t k, float* y);

// Weight-only int8 (W8A16-style): y[m, n] = w_scale[n] * sum_k x[m, k] * wq[n, k] with float32
// activations x [M, K] (the LM head: its logits keep float32 activations, its weights cost 1 byte each).
void int8_weight_gemv(const float* x, const int8_t* wq, const float* w_scale, int64_t m, int64_t n, int64_t k,
                      float* y);

}  // namespace strata::cpu
