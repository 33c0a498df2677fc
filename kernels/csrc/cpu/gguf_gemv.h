// Products from a GGUF file's quantized weights (llama.cpp's Q4_1 and Q8_0 blocks, regrouped at load), for
// the few activation rows of a decode step and the many of a prefill chunk: the weights keep the file's
// values and bits (Q4_1: 5 a weight, Q8_0: 8.5), so a step reads a fraction of the float32 bytes.
#pragma once

#include <cstdint>

namespace strata::cpu {

// A GGUF block holds 32 weights along K: Q4_1 = fp16 d, fp16 m, 16 bytes of nibbles (weight i = d * q_i + m,
// q_i = qs[i] & 15 for i < 16, qs[i - 16] >> 4 otherwise); Q8_0 = fp16 d, 32 int8 codes (weight i = d * q_i).
// Regrouped per matrix W [N, K] with nb = K / 32 blocks a row:
//   qs    [N, nb * 16] bytes (Q4_1) or [N, nb * 32] (Q8_0): a block's codes as 32-bit words (Q4_1: 4, word t
//         holding values 4t..4t+3 in its low nibbles and 16+4t..16+4t+3 in its high ones; Q8_0: 8, word t
//         values 4t..4t+3), transposed per group of 8 blocks along K (the last group of a row may be
//         shorter): group bytes = word 0 of each of its blocks, then word 1, ... — the file's bytes, reordered
//   d, m  [N, nbp] fp16 bits, nbp = nb rounded up to a multiple of 8, zero past nb (m: Q4_1 only)
// so one 256-bit load holds the same word of eight blocks, one block per lane, and the scales of those
// 8 blocks convert in one instruction.
//
// Q5_0 = fp16 d, 32 bits qh, 16 bytes of nibbles (weight i = d * (q_i - 16), q_i = the Q4 nibble of value i
// as above | bit i of qh << 4): qs and d as Q4_1's, no m (the offset is -16 d, exact), and the fifth bits
// regrouped to match the vectors the kernel loads from qs:
//   qh    [N, nbp * 4] bytes: 32 per group of blocks; vector t of the group's qs (32 bytes for a group of 8,
//         4 or 2 blocks: 4, 2 or 1 vectors; in_group * 4 bytes, masked, for other short groups: 4 vectors)
//         has two 32-bit masks at 8t: bit p of the first is the fifth bit of byte p's low nibble, bit p of
//         the second that of its high nibble
// so a vector's 64 fifth bits expand to bytes with one shuffle and compare. 22 bytes a block, the file's.
//
// Q4_K = super-blocks of 256 weights (K a multiple of 256): fp16 d and dmin, 6-bit scale sc_b and min m_b
// per 32-weight block b, 4-bit codes (weight i of block b = d * sc_b * q_i - dmin * m_b). The codes are
// stored as Q4_1's (value i in the low nibble, i + 16 in the high one; qs regrouped the same, a group being
// one super-block), and
//   d, m  [N, K / 256] fp16 bits: each super-block's d and dmin
//   sc    [N, K / 32 * 2] bytes: per super-block its 8 scales, then its 8 mins (6-bit values, unpacked)
// 148 bytes a super-block against the file's 144 (its 6-bit fields packed in 12 bytes).
//
// Q6_K = super-blocks of 256 weights: fp16 d, an int8 scale per 16 weights, 6-bit codes (weight i = d *
// sc_{i / 16} * (q_i - 32)). A 32-weight block b holds two scales: sc_a for its values 0..15, sc_b for 16..31.
// The codes' low 4 bits are stored as Q4_1's nibbles (qs, regrouped the same; a group is a super-block), and
//   qh    [N, K / 32 * 8] bytes: their high 2 bits, per group 16 bytes for each of the 4 vectors of its qs:
//         byte i holds, for the vector's bytes i and 16 + i, 4 bits each (low nibble's 2 bits, then high's)
//   sc    [N, K / 32 * 2] int8: per super-block the 8 blocks' sc_a, then their sc_b
//   d     [N, K / 256] fp16 bits
// 210 bytes a super-block, the file's.
enum class BlockType : int { kQ4_1 = 0, kQ8_0 = 1, kQ5_0 = 2, kQ4_K = 3, kQ6_K = 4 };

struct BlockMatrix {
    BlockType type;
    const uint8_t* qs;
    const uint16_t* d;
    const uint16_t* m;       // Q4_1 only
    int64_t n, k;            // K a multiple of 32
    const uint8_t* qh = nullptr;   // Q5_0: fifth bits; Q6_K: high bits
    const uint8_t* sc = nullptr;   // Q4_K: scales and mins; Q6_K: scales (int8)
};

inline int64_t padded_blocks(int64_t k) { return (k / 32 + 7) / 8 * 8; }

// bytes of a Q5_0 row's qh
inline int64_t qh_row_bytes(int64_t k) { return padded_blocks(k) * 4; }

// Activations for these products (llama.cpp's Q8_1): per row and 32-value block, scale dx = max|x| / 127,
// codes c = round(x * 127 / max|x|) (half to even; 0 where the block is all zero) as int8, and
// sx = dx * sum(c), the quantized block's sum, for Q4_1's offset term. That sum must be the quantized one:
// then a Q4_1 product is exactly (d q + m) · (dx c), whose error (d q + m) · (x - dx c) is centred; the
// exact float sum leaves d q · (x - dx c), biased by q's mean of 7.5, which costs this model +2.7%
// perplexity instead of +0.5% (and the reason an earlier int8 attempt here looked worse than int16).
// x [M, K] → xq [M, padded_blocks(K) * 32] int8, each group of blocks' codes as 32-bit words, word-major
// like the weights (a group of 8: vector t = word t of each block, one block per 4-byte lane; a last group
// of 4 or 2 blocks packed 2 or 4 words a vector; other short groups one word a vector in its first
// lanes), zero elsewhere; dx, sx [M, padded_blocks(K)] (zero past K).
void quantize_blocks_q8(const float* x, int64_t m, int64_t k, int8_t* xq, float* dx, float* sx);

// y [M, N] float32 = x [M, K] · Wᵀ: y[r, n] = sum_b d_nb * dx_rb * (q_nb · xq_rb) (+ m_nb * sx_rb for Q4_1,
// + (-16 d_nb) * sx_rb for Q5_0 with its unsigned codes q; Q4_K: d_nb = d * sc_b, the offset - dmin * m_b;
// Q6_K: d * dx_rb * (sc_a (q - 32) · xq over values 0..15 + sc_b (q - 32) · xq over 16..31), exact integers),
// the block dot products exact in int32.
void gguf_gemv(const BlockMatrix& w, const float* x, int64_t m, float* y);

// out [count, K] float32 = rows ids[0..count) of W, as ggml dequantizes them (Q4_1: q * d + m, Q8_0 and
// Q5_0: q * d, Q5_0's q = its 5-bit code - 16, Q4_K: q * (d * sc) - dmin * m, Q6_K: (d * sc) * (q - 32),
// each product and sum rounded once): an embedding lookup straight from the blocks. ids must be in [0, N).
void gguf_dequantize_rows(const BlockMatrix& w, const int64_t* ids, int64_t count, float* out);

}  // namespace strata::cpu
