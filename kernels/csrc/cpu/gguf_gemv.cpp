// GGUF block GEMV (see gguf_gemv.h).
//
// The activations are quantized once per call to int16 per 32-value block. Each weight block is unpacked
// once (Q4_1: its nibbles, Q8_0: its codes, widened to 32 int16) and multiplied with every activation row
// in AVX2 registers: madd gives pairwise int32 sums (at most 2 * 128 * 32767 each: exact). Eight blocks'
// int32 vectors are reduced
// into one vector of eight block sums, converted once, and one FMA applies the eight blocks' scales
// (d * dx, converted from fp16 eight at a time) and another the Q4_1 offsets (m * sx). Output channels
// are split over OpenMP threads. Without AVX2 a scalar loop computes the same sums.
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

int64_t qs_bytes(BlockType t) { return t == BlockType::kQ4_1 ? 16 : 32; }

// ---- scalar (any x86-64)
void rows_scalar(const BlockMatrix& w, const int16_t* xq, const float* dx, const float* sx, int64_t rows,
                 int64_t n0, int64_t n1, float* y) {
    const int64_t nb = w.k / kBlock, nbp = padded_blocks(w.k), qb = qs_bytes(w.type);
    for (int64_t j = n0; j < n1; ++j) {
        for (int64_t r = 0; r < rows; ++r) {
            float total = 0.f;
            for (int64_t b = 0; b < nb; ++b) {
                const uint8_t* q = w.qs + (j * nb + b) * qb;
                const int16_t* xb = xq + r * w.k + b * kBlock;
                int32_t dot = 0;
                if (w.type == BlockType::kQ4_1) {
                    for (int i = 0; i < 16; ++i) dot += int32_t{q[i] & 15} * xb[i] + int32_t{q[i] >> 4} * xb[i + 16];
                } else {
                    for (int i = 0; i < 32; ++i) dot += int32_t{static_cast<int8_t>(q[i])} * xb[i];
                }
                total += half_to_float(w.d[j * nbp + b]) * dx[r * nbp + b] * static_cast<float>(dot);
                if (w.m != nullptr) total += half_to_float(w.m[j * nbp + b]) * sx[r * nbp + b];
            }
            y[r * w.n + j] = total;
        }
    }
}

// ---- AVX2 (+ FMA, F16C)
// lane i = the sum of the eight int32 lanes of a[i]
__attribute__((target("avx2"))) inline __m256i reduce8_epi32(const __m256i* a) {
    const __m256i t0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
    const __m256i t1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]), _mm256_hadd_epi32(a[6], a[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(t0, t1, 0x20), _mm256_permute2x128_si256(t0, t1, 0x31));
}

__attribute__((target("avx2,f16c"))) inline __m256 load_half8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// a block's 32 codes widened to int16: Q4_1's nibbles (low ones are weights 0..15), Q8_0's signed bytes
template <BlockType T>
__attribute__((target("avx2"))) inline void unpack_block(const uint8_t* q, __m256i& q0, __m256i& q1) {
    if constexpr (T == BlockType::kQ4_1) {
        const __m128i low4 = _mm_set1_epi8(15);
        const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
        q0 = _mm256_cvtepu8_epi16(_mm_and_si128(qs, low4));
        q1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(qs, 4), low4));
    } else {
        const __m128i* qs = reinterpret_cast<const __m128i*>(q);
        q0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(qs));
        q1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(qs + 1));
    }
}

// one output channel j against R activation rows
template <BlockType T, int R>
__attribute__((target("avx2,fma,f16c"))) void channel_avx2(const BlockMatrix& w, const int16_t* xq, const float* dx,
                                                             const float* sx, int64_t j, float* y) {
    const int64_t nb = w.k / kBlock, nbp = padded_blocks(w.k);
    constexpr int64_t qb = T == BlockType::kQ4_1 ? 16 : 32;
    const uint8_t* qrow = w.qs + j * nb * qb;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < nb; g += 8) {
        const int64_t blocks = std::min<int64_t>(8, nb - g);
        __m256i p[R][8];
        for (int64_t b = 0; b < 8; ++b) {
            if (b >= blocks) {                                  // the padding past K: zero sums
                for (int r = 0; r < R; ++r) p[r][b] = _mm256_setzero_si256();
                continue;
            }
            __m256i q0, q1;                                     // weights 0..15 and 16..31 as int16
            unpack_block<T>(qrow + (g + b) * qb, q0, q1);
            for (int r = 0; r < R; ++r) {
                const __m256i* xv = reinterpret_cast<const __m256i*>(xq + r * w.k + (g + b) * kBlock);
                p[r][b] = _mm256_add_epi32(_mm256_madd_epi16(q0, _mm256_loadu_si256(xv)),
                                           _mm256_madd_epi16(q1, _mm256_loadu_si256(xv + 1)));
            }
        }
        const __m256 d = load_half8(w.d + j * nbp + g);
        for (int r = 0; r < R; ++r) {
            const __m256 sums = _mm256_cvtepi32_ps(reduce8_epi32(p[r]));
            acc[r] = _mm256_fmadd_ps(sums, _mm256_mul_ps(d, _mm256_loadu_ps(dx + r * nbp + g)), acc[r]);
            if constexpr (T == BlockType::kQ4_1)
                acc[r] = _mm256_fmadd_ps(load_half8(w.m + j * nbp + g), _mm256_loadu_ps(sx + r * nbp + g), acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) y[r * w.n + j] = hsum(acc[r]);
}

// Three to eight activation rows: each block's int32 sums are scaled right away (one FMA per block and
// row into the row's accumulator: the rows' chains overlap), which keeps R + 2 vectors live instead of
// the 8 * R a deferred reduction would need. Q4_1's offsets: one FMA per eight blocks and row.
template <BlockType T, int R>
__attribute__((target("avx2,fma,f16c"))) void channel_rows_avx2(const BlockMatrix& w, const int16_t* xq,
                                                                  const float* dx, const float* sx, int64_t j,
                                                                  float* y) {
    const int64_t nb = w.k / kBlock, nbp = padded_blocks(w.k);
    constexpr int64_t qb = T == BlockType::kQ4_1 ? 16 : 32;
    const uint8_t* qrow = w.qs + j * nb * qb;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < nb; g += 8) {
        alignas(32) float d[8];
        _mm256_store_ps(d, load_half8(w.d + j * nbp + g));
        const int64_t blocks = std::min<int64_t>(8, nb - g);
        for (int64_t b = 0; b < blocks; ++b) {
            __m256i q0, q1;                                     // weights 0..15 and 16..31 as int16
            unpack_block<T>(qrow + (g + b) * qb, q0, q1);
            for (int r = 0; r < R; ++r) {
                const __m256i* xv = reinterpret_cast<const __m256i*>(xq + r * w.k + (g + b) * kBlock);
                const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(q0, _mm256_loadu_si256(xv)),
                                                   _mm256_madd_epi16(q1, _mm256_loadu_si256(xv + 1)));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[b] * dx[r * nbp + g + b]), acc[r]);
            }
        }
        if constexpr (T == BlockType::kQ4_1) {
            const __m256 m = load_half8(w.m + j * nbp + g);
            for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(m, _mm256_loadu_ps(sx + r * nbp + g), acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) y[r * w.n + j] = hsum(acc[r]);
}

template <BlockType T>
void rows_avx2(const BlockMatrix& w, const int16_t* xq, const float* dx, const float* sx, int64_t rows, int64_t n0,
               int64_t n1, float* y) {
    for (int64_t j = n0; j < n1; ++j) {
        switch (rows) {
            case 1: channel_avx2<T, 1>(w, xq, dx, sx, j, y); break;
            case 2: channel_avx2<T, 2>(w, xq, dx, sx, j, y); break;
            case 3: channel_rows_avx2<T, 3>(w, xq, dx, sx, j, y); break;
            case 4: channel_rows_avx2<T, 4>(w, xq, dx, sx, j, y); break;
            case 5: channel_rows_avx2<T, 5>(w, xq, dx, sx, j, y); break;
            case 6: channel_rows_avx2<T, 6>(w, xq, dx, sx, j, y); break;
            case 7: channel_rows_avx2<T, 7>(w, xq, dx, sx, j, y); break;
            default: channel_rows_avx2<T, 8>(w, xq, dx, sx, j, y); break;
        }
    }
}

}  // namespace

void quantize_blocks_q16(const float* x, int64_t m, int64_t k, int16_t* xq, float* dx, float* sx) {
    const int64_t nb = k / kBlock, nbp = padded_blocks(k);
    for (int64_t r = 0; r < m; ++r) {
        for (int64_t b = 0; b < nbp; ++b) {
            if (b >= nb) {
                dx[r * nbp + b] = sx[r * nbp + b] = 0.f;
                continue;
            }
            const float* xb = x + r * k + b * kBlock;
            float amax = 0.f, sum = 0.f;
            for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i])), sum += xb[i];
            const float scale = amax / 32767.0f;
            int16_t* q = xq + r * k + b * kBlock;
            for (int64_t i = 0; i < kBlock; ++i)
                q[i] = scale > 0.f ? static_cast<int16_t>(std::nearbyint(xb[i] / scale)) : 0;
            dx[r * nbp + b] = scale;
            sx[r * nbp + b] = sum;
        }
    }
}

void gguf_gemv(const BlockMatrix& w, const float* x, int64_t m, float* y) {
    const int64_t nbp = padded_blocks(w.k);
    std::vector<int16_t> xq(static_cast<size_t>(m * w.k));
    std::vector<float> dx(static_cast<size_t>(m * nbp)), sx(static_cast<size_t>(m * nbp));
    quantize_blocks_q16(x, m, w.k, xq.data(), dx.data(), sx.data());
    const bool simd = has_avx2_fma_f16c();
    constexpr int64_t chunk = 32;                 // output channels per OpenMP task
    const int64_t chunks = (w.n + chunk - 1) / chunk;
    const bool parallel = w.n * w.k >= (int64_t{1} << 15) && chunks > 1;
    for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
        const int64_t rows = std::min(kMaxRows, m - r0);
        const int16_t* xr = xq.data() + r0 * w.k;
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
