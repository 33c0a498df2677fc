// GGUF block GEMV (see gguf_gemv.h).
//
// The activations are quantized once per call to int8 per 32-value block (llama.cpp's Q8_1: codes, scale
// and the sum of the quantized values), stored by pairs of blocks (a, b) as [a 0..15, b 0..15, a 16..31, b 16..31]:
// the order in which one 32-byte load of two Q4_1 blocks splits into its low and high nibbles. Each pair
// of weight blocks is loaded once and multiplied with every activation row in AVX2 registers: maddubs
// multiplies unsigned by signed bytes into pairwise int16 sums (Q4_1's nibbles are 0..15 as they are;
// Q8_0's codes go in as |w| with the sign moved onto x: at most 2 * 128 * 127, no saturation) and a madd
// with ones widens them to int32, exact: one vector per pair, lanes 0-3 block a's partial sums, 4-7 b's.
// Four pairs' vectors are reduced into one vector of eight block sums (three hadds and a permute),
// converted once, and one FMA applies the eight blocks' scales (d * dx, converted from fp16 eight at a
// time) and another the Q4_1 offsets (m * sx), in the same order for every row count. Output channels are split over OpenMP threads.
// Without AVX2 a scalar loop computes the same sums.
#include "gguf_gemv.h"
#include "simd.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace strata::cpu {
namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kMaxRows = 8;          // activation rows per pass over the weights

// where value i of block b sits in a row of activation codes (pairs of blocks, see above)
inline int64_t code_index(int64_t b, int64_t i) { return (b / 2) * 64 + (i / 16) * 32 + (b % 2) * 16 + i % 16; }

// IEEE half → float (normals, subnormals, inf, nan), for the scalar path
inline float half_to_float(uint16_t h) {
    const uint32_t sign = uint32_t{h & 0x8000u} << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {                                       // subnormal: normalise
        int e = -1;
        uint32_t m = mant;
        do { ++e; m <<= 1; } while ((m & 0x400u) == 0);
        bits = sign | ((112 - e) << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

constexpr int64_t qs_bytes(BlockType t) { return t == BlockType::kQ4_1 ? 16 : 32; }

// bytes of activation codes per row: whole pairs of blocks, zero past K
inline int64_t code_stride(int64_t k) { return padded_blocks(k) * kBlock; }

// ---- scalar (any x86-64)
void rows_scalar(const BlockMatrix& w, const int8_t* xq, const float* dx, const float* sx, int64_t rows,
                 int64_t n0, int64_t n1, float* y) {
    const int64_t nb = w.k / kBlock, nbp = padded_blocks(w.k), qb = qs_bytes(w.type), stride = code_stride(w.k);
    for (int64_t j = n0; j < n1; ++j) {
        for (int64_t r = 0; r < rows; ++r) {
            float total = 0.f;
            for (int64_t b = 0; b < nb; ++b) {
                const uint8_t* q = w.qs + (j * nb + b) * qb;
                const int8_t* xr = xq + r * stride;
                int32_t dot = 0;
                for (int64_t i = 0; i < kBlock; ++i) {
                    const int32_t wi = w.type == BlockType::kQ4_1 ? (i < 16 ? q[i] & 15 : q[i - 16] >> 4)
                                                                  : int32_t{static_cast<int8_t>(q[i])};
                    dot += wi * xr[code_index(b, i)];
                }
                total += half_to_float(w.d[j * nbp + b]) * dx[r * nbp + b] * static_cast<float>(dot);
                if (w.m != nullptr) total += half_to_float(w.m[j * nbp + b]) * sx[r * nbp + b];
            }
            y[r * w.n + j] = total;
        }
    }
}

// ---- AVX2 (+ FMA, F16C)
__attribute__((target("avx2,f16c"))) inline __m256 load_half8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Blocks u*2 and u*2+1 of a channel (just the first when `single`: K's last block of an odd count), as
// maddubs's unsigned operands lo = [a 0..15, b 0..15], hi = [a 16..31, b 16..31] (Q8_0: |codes|, with
// their signs in slo / shi for the activations).
template <BlockType T>
struct PairWeights {
    __m256i lo, hi, slo, shi;

    __attribute__((target("avx2"))) inline PairWeights(const uint8_t* q, bool single) {
        if constexpr (T == BlockType::kQ4_1) {
            const __m256i qs = single ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)))
                                      : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
            const __m256i low4 = _mm256_set1_epi8(15);
            lo = _mm256_and_si256(qs, low4);
            hi = _mm256_and_si256(_mm256_srli_epi16(qs, 4), low4);
        } else {
            const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
            const __m256i b = single ? _mm256_setzero_si256() : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
            slo = _mm256_permute2x128_si256(a, b, 0x20);
            shi = _mm256_permute2x128_si256(a, b, 0x31);
            lo = _mm256_abs_epi8(slo);
            hi = _mm256_abs_epi8(shi);
        }
    }

    // the pair's exact dot products with 64 activation codes x: int32 lanes 0-3 block a's, 4-7 b's
    __attribute__((target("avx2"))) inline __m256i dot(const int8_t* x) const {
        __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
        __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
        const __m256i ones = _mm256_set1_epi16(1);
        if constexpr (T == BlockType::kQ4_1) {   // int16 sums <= 2 * 2 * 15 * 127: add before widening
            return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi)), ones);
        } else {
            xlo = _mm256_sign_epi8(xlo, slo);
            xhi = _mm256_sign_epi8(xhi, shi);
            return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, xlo), ones),
                                    _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xhi), ones));
        }
    }
};

// A thread walks its channels' rows in order, but a row is only a few hundred bytes and the hardware
// prefetcher ramps up slowly across the many small matrices of a step: the row ~3 KB ahead is requested
// explicitly (x1.04-1.15 single-stream decode here, in alternating runs of one process).
constexpr int64_t kPrefetchBytes = 3072;

inline void prefetch_ahead(const uint8_t* row, int64_t row_bytes) {
    const uint8_t* ahead = row + (kPrefetchBytes + row_bytes - 1) / row_bytes * row_bytes;
    for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + o), _MM_HINT_T0);
}

// four pairs' vectors (blocks 0..7 of a group) → the eight block sums in order
__attribute__((target("avx2"))) inline __m256i reduce_pairs(const __m256i* p) {
    const __m256i t = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));  // 0 2 4 6 | 1 3 5 7
    return _mm256_permutevar8x32_epi32(t, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// One output channel j against R activation rows. Per group of eight blocks, each pair's dot products go
// into p (registers for one or two rows; the compiler parks them in L1 for more), then per row the four
// pair vectors are reduced to the eight block sums (three hadds and a permute), converted once, and one
// FMA applies the blocks' scales (d * dx), another the Q4_1 offsets (m * sx). Every row sees the same
// operations in the same order whatever R is, so a row's result does not depend on how many rows share
// the call: greedy decoding gives the same tokens alone, batched, or verifying speculative proposals.
template <BlockType T, int R>
__attribute__((target("avx2,fma,f16c"))) void channel_avx2(const BlockMatrix& w, const int8_t* xq, const float* dx,
                                                             const float* sx, int64_t j, float* y) {
    const int64_t nb = w.k / kBlock, nbp = padded_blocks(w.k), stride = code_stride(w.k);
    constexpr int64_t qb = qs_bytes(T);
    const uint8_t* qrow = w.qs + j * nb * qb;
    prefetch_ahead(qrow, nb * qb);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < nb; g += 8) {
        __m256i p[R][4];
        for (int64_t u = 0; u < 4; ++u) {
            const int64_t b = g + 2 * u;
            if (b >= nb) {                                      // the padding past K: zero sums
                for (int r = 0; r < R; ++r) p[r][u] = _mm256_setzero_si256();
                continue;
            }
            const PairWeights<T> pw(qrow + b * qb, b + 1 == nb);
            for (int r = 0; r < R; ++r) p[r][u] = pw.dot(xq + r * stride + b * kBlock);
        }
        const __m256 d = load_half8(w.d + j * nbp + g);
        for (int r = 0; r < R; ++r) {
            const __m256 sums = _mm256_cvtepi32_ps(reduce_pairs(p[r]));
            acc[r] = _mm256_fmadd_ps(sums, _mm256_mul_ps(d, _mm256_loadu_ps(dx + r * nbp + g)), acc[r]);
            if constexpr (T == BlockType::kQ4_1)
                acc[r] = _mm256_fmadd_ps(load_half8(w.m + j * nbp + g), _mm256_loadu_ps(sx + r * nbp + g), acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) y[r * w.n + j] = hsum(acc[r]);
}

template <BlockType T>
void rows_avx2(const BlockMatrix& w, const int8_t* xq, const float* dx, const float* sx, int64_t rows, int64_t n0,
               int64_t n1, float* y) {
    for (int64_t j = n0; j < n1; ++j) {
        switch (rows) {
            case 1: channel_avx2<T, 1>(w, xq, dx, sx, j, y); break;
            case 2: channel_avx2<T, 2>(w, xq, dx, sx, j, y); break;
            case 3: channel_avx2<T, 3>(w, xq, dx, sx, j, y); break;
            case 4: channel_avx2<T, 4>(w, xq, dx, sx, j, y); break;
            case 5: channel_avx2<T, 5>(w, xq, dx, sx, j, y); break;
            case 6: channel_avx2<T, 6>(w, xq, dx, sx, j, y); break;
            case 7: channel_avx2<T, 7>(w, xq, dx, sx, j, y); break;
            default: channel_avx2<T, 8>(w, xq, dx, sx, j, y); break;
        }
    }
}

// one 32-value block: codes round(x * (127 / amax)) (half to even) to lo (values 0..15) and hi (16..31),
// scale amax / 127, the quantized values' sum
__attribute__((target("avx2,fma"))) void quantize_block_avx2(const float* x, int8_t* lo, int8_t* hi, float* d, float* s) {
    const __m256 v[4] = {_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8), _mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24)};
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                                _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float mx = _mm_cvtss_f32(m4);
    *d = mx / 127.0f;
    const __m256 inv = _mm256_set1_ps(mx > 0.f ? 127.0f / mx : 0.f);
    __m256i i[4];
    for (int t = 0; t < 4; ++t)
        i[t] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[t], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i isum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    *s = *d * hsum(_mm256_cvtepi32_ps(isum));                // exact: |sum| <= 32 * 127
    // packs work within 128-bit lanes: [0-3 4-7 | ...] interleaved, put back in order with one permute
    const __m256i packed = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3])),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm256_castsi256_si128(packed));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm256_extracti128_si256(packed, 1));
}

}  // namespace

void quantize_blocks_q8(const float* x, int64_t m, int64_t k, int8_t* xq, float* dx, float* sx) {
    const int64_t nb = k / kBlock, nbp = padded_blocks(k), stride = code_stride(k);
    const bool simd = has_avx2_fma();
    for (int64_t r = 0; r < m; ++r) {
        int8_t* xr = xq + r * stride;
        for (int64_t b = 0; b < nbp; ++b) {
            float* d = dx + r * nbp + b;
            float* s = sx + r * nbp + b;
            int8_t *lo = xr + code_index(b, 0), *hi = xr + code_index(b, 16);
            if (b >= nb) {
                *d = *s = 0.f;
                std::memset(lo, 0, 16);
                std::memset(hi, 0, 16);
                continue;
            }
            const float* xb = x + r * k + b * kBlock;
            if (simd) {
                quantize_block_avx2(xb, lo, hi, d, s);
                continue;
            }
            float amax = 0.f;
            for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
            const float inv = amax > 0.f ? 127.0f / amax : 0.f;
            int32_t sum = 0;
            for (int64_t i = 0; i < kBlock; ++i) {
                const int8_t c = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
                xr[code_index(b, i)] = c;
                sum += c;
            }
            *d = amax / 127.0f;
            *s = *d * static_cast<float>(sum);
        }
    }
}

void gguf_gemv(const BlockMatrix& w, const float* x, int64_t m, float* y) {
    const int64_t nbp = padded_blocks(w.k), stride = code_stride(w.k);
    std::vector<int8_t> xq(static_cast<size_t>(m * stride));
    std::vector<float> dx(static_cast<size_t>(m * nbp)), sx(static_cast<size_t>(m * nbp));
    quantize_blocks_q8(x, m, w.k, xq.data(), dx.data(), sx.data());
    const bool simd = has_avx2_fma_f16c();
    constexpr int64_t chunk = 32;                 // output channels per OpenMP task
    const int64_t chunks = (w.n + chunk - 1) / chunk;
    const bool parallel = w.n * w.k >= (int64_t{1} << 15) && chunks > 1;
    for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
        const int64_t rows = std::min(kMaxRows, m - r0);
        const int8_t* xr = xq.data() + r0 * stride;
        const float *dr = dx.data() + r0 * nbp, *sr = sx.data() + r0 * nbp;
        float* yr = y + r0 * w.n;
#pragma omp parallel for schedule(static) if (parallel)
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t n0 = c * chunk, n1 = std::min(w.n, n0 + chunk);
            if (!simd) rows_scalar(w, xr, dr, sr, rows, n0, n1, yr);
            else if (w.type == BlockType::kQ4_1) rows_avx2<BlockType::kQ4_1>(w, xr, dr, sr, rows, n0, n1, yr);
            else rows_avx2<BlockType::kQ8_0>(w, xr, dr, sr, rows, n0, n1, yr);
        }
    }
}

}  // namespace strata::cpu
