// Matrix-vector products from a GGUF file's quantized weights (llama.cpp's Q4_1 and Q8_0 blocks,
// regrouped at load), for the few activation rows of a decode step: the weights keep the file's values
// and bits (Q4_1: 5 a weight, Q8_0: 8.5), so a step reads a fraction of the float32 bytes.
#pragma once

#include <cstdint>

namespace strata::cpu {

// A GGUF block holds 32 weights along K: Q4_1 = fp16 d, fp16 m, 16 bytes of nibbles (weight i = d * q_i + m,
// q_i = qs[i] & 15 for i < 16, qs[i - 16] >> 4 otherwise); Q8_0 = fp16 d, 32 int8 codes (weight i = d * q_i).
// Regrouped per matrix W [N, K] with nb = K / 32 blocks a row:
//   qs    [N, nb, 16] bytes (Q4_1 nibbles) or [N, nb, 32] int8 (Q8_0 codes), as in the file
//   d, m  [N, nbp] fp16 bits, nbp = nb rounded up to a multiple of 8, zero past nb (m: Q4_1 only)
// so the scales of 8 blocks convert in one instruction.
enum class BlockType : int { kQ4_1 = 0, kQ8_0 = 1 };

struct BlockMatrix {
    BlockType type;
    const uint8_t* qs;
    const uint16_t* d;
    const uint16_t* m;       // null for Q8_0
    int64_t n, k;            // K a multiple of 32
};

inline int64_t padded_blocks(int64_t k) { return (k / 32 + 7) / 8 * 8; }

// Activations for these products: per row and 32-value block, scale dx = max|x| / 32767, codes
// round(x / dx) (half to even; 0 where the block is all zero): int16, a relative error of ~1e-5 of the
// block's largest value (llama.cpp's int8 codes cost this model 3.5% perplexity; these cost nothing
// measurable), and the block's float sum sx (for Q4_1's offset term).
// x [M, K] → xq [M, K] int16; dx, sx [M, padded_blocks(K)] (zero past K).
void quantize_blocks_q16(const float* x, int64_t m, int64_t k, int16_t* xq, float* dx, float* sx);

// y [M, N] float32 = x [M, K] · Wᵀ: y[r, n] = sum_b d_nb * dx_rb * (q_nb · xq_rb) (+ m_nb * sx_rb for Q4_1),
// the block dot products exact in int32.
void gguf_gemv(const BlockMatrix& w, const float* x, int64_t m, float* y);

}  // namespace strata::cpu
