// Row-wise kernels of a Llama layer: fused residual-add + RMSNorm, rotary embedding in place, SiLU-and-mul
// (GELU-tanh-and-mul for Gemma).
#pragma once

#include <cstdint>

namespace strata::cpu {

// residual [T, H] += delta [T, H] (delta may be null: plain RMSNorm); then
// out [T, H] = weight [H] * residual * 1 / sqrt(mean(residual^2) + eps). float32, rows contiguous.
void add_rms_norm(float* residual, const float* delta, const float* weight, int64_t rows, int64_t hidden, float eps,
                  float* out);

// Rotate-half (NeoX) rotary embedding in place on the first `heads` heads of every row of x:
// row t starts at x + t * row_stride, head j at + j * head_dim; cos/sin [T, head_dim / 2].
// x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin over the two halves of each head.
void rotary_inplace(float* x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim, const float* cos,
                    const float* sin);

// reshape-and-cache: the K and V of `rows` new tokens (row t of k at k + t * k_stride, its heads
// contiguous, head_dim values each; likewise v) copied into the pools [KVH, num_slots, head_dim] at
// slot_mapping[t]; elements of elem_bytes bytes (4 float32, 2 bfloat16), the same type on both sides.
void reshape_and_cache(const void* k, const void* v, int64_t k_stride, int64_t v_stride, const int64_t* slot_mapping,
                       int64_t rows, int64_t kv_heads, int64_t head_dim, int64_t num_slots, int64_t elem_bytes,
                       void* k_pool, void* v_pool);

// out [T, I] = silu(gate_up[t, :I]) * gate_up[t, I:] for gate_up [T, 2I] (the fused gate/up projection).
void silu_and_mul(const float* gate_up, int64_t rows, int64_t inner, float* out);

// out [T, I] = gelu_tanh(gate_up[t, :I]) * gate_up[t, I:] (Gemma's MLP): gelu_tanh(x) = x / 2 * (1 +
// tanh(sqrt(2 / pi) * (x + 0.044715 x^3))), computed as x * sigmoid(2 * that argument) (within 1e-5 of torch's).
void gelu_tanh_and_mul(const float* gate_up, int64_t rows, int64_t inner, float* out);

}  // namespace strata::cpu
