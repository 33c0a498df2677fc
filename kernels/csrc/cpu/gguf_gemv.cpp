// GGUF block GEMV (see gguf_gemv.h).
//
// Blocks are taken eight at a time (a group; the last group of a row may hold fewer), and both operands
// are laid out so that one 256-bit vector holds the same four values of each of the group's eight blocks,
// one block per 32-bit lane (a 4-byte transpose of the group; gguf_gemv.h): then every byte product
// instruction adds into lanes that each belong to one block, and after a group the eight lanes are its
// eight exact int32 block sums, with no horizontal reduction.
//
// The activations are quantized once per call to int8 per 32-value block (llama.cpp's Q8_1: codes, scale
// and the sum of the quantized values). Each weight vector is loaded once per group and multiplied with
// every activation row: unsigned by signed byte products summed exactly into int32 (AVX2: maddubs + madd;
// AVX-VNNI and AVX512-VNNI: vpdpbusd; gguf_gemv_simd.inc). Q4_1's and Q4_K's nibbles are unsigned as they
// are, Q5_0's with their fifth bits ORed in (0..31); for Q8_0 AVX2 multiplies |w| by x carrying w's sign,
// VNNI the codes biased to unsigned (x + 128) by w, then takes 128 * sum(w) off. A group's eight sums are
// converted once, and one FMA applies the eight blocks' scales (d * dx: fp16 d converted eight at a time,
// Q4_K's d * sc from its super-block), another the offsets times the activation blocks' sums (Q4_1: m;
// Q5_0: -16 d; Q4_K: -dmin * m_b), in the same order for every row count and at every instruction-set level. Output
// channels are split over OpenMP threads. Without AVX2 a scalar loop computes the same sums. From 4 rows
// an AVX512-VNNI CPU multiplies in tiles instead (gguf_gemv_simd.inc: 512-bit products, the same sums and
// float operations, so the same bits), over panels of rows x chunks of channels; other levels take more
// than 8 rows 8 at a time.
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

constexpr int64_t kGroup = 8;            // blocks per group: one 32-bit lane each

// blocks in the group of block b, of a row of nb
inline int64_t group_size(int64_t b, int64_t nb) { return std::min(kGroup, nb - b / kGroup * kGroup); }

// a group of 8, 4 or 2 blocks fills whole vectors with its words (1, 2 or 4 words a vector)
inline bool packed_group(int64_t in_group) { return in_group >= 2 && kGroup % in_group == 0; }

// where value i of block b (of nb) sits in a row of activation codes: its group's words word-major, as
// the weights (gguf_gemv.h), in whole vectors for groups of 8, 4 or 2 blocks (4 or 2 words a vector),
// else one word a vector, masked to the group's lanes
inline int64_t code_index(int64_t b, int64_t i, int64_t nb) {
    const int64_t g = b / kGroup * kGroup, in_group = group_size(b, nb);
    const int64_t lanes = packed_group(in_group) ? in_group : kGroup;
    return g * kBlock + ((i / 4) * lanes + b - g) * 4 + i % 4;
}

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

constexpr int64_t qs_bytes(BlockType t) { return t == BlockType::kQ8_0 ? 32 : 16; }

// Q5_0: where the fifth bit of the code stored at byte p of group g's qs sits in qh (gguf_gemv.h): the
// vector holding p, its mask for the low (values < 16) or high nibbles, the bit
inline bool fifth_bit(const BlockMatrix& w, int64_t j, int64_t g, int64_t in_group, int64_t p, bool high) {
    const int64_t vector_bytes = in_group == kGroup || packed_group(in_group) ? 32 : in_group * 4;
    const uint8_t* masks = w.qh + j * qh_row_bytes(w.k) + g / kGroup * 32 + p / vector_bytes * 8 + (high ? 4 : 0);
    const int64_t bit = p % vector_bytes;
    return (masks[bit / 8] >> (bit % 8)) & 1;
}

// bytes of activation codes per row: whole groups, zero past K
inline int64_t code_stride(int64_t k) { return padded_blocks(k) * kBlock; }

// the code of value i (0..31) of block b in channel j's weights (gguf_gemv.h: 32-bit word i / 4 of the
// block's codes, Q4_1's words holding values i and i + 16 in their low and high nibbles, transposed per group)
inline int32_t weight_code(const BlockMatrix& w, int64_t j, int64_t b, int64_t i) {
    const int64_t nb = w.k / kBlock, qb = qs_bytes(w.type), g = b / kGroup * kGroup, in_group = group_size(b, nb);
    const int64_t word = w.type == BlockType::kQ8_0 ? i / 4 : i % 16 / 4;
    const int64_t p = (word * in_group + b - g) * 4 + i % 4;      // the byte's place in its group's codes
    const uint8_t byte = w.qs[j * nb * qb + g * qb + p];
    if (w.type == BlockType::kQ8_0) return static_cast<int8_t>(byte);
    const int32_t nibble = i < 16 ? byte & 15 : byte >> 4;
    if (w.type != BlockType::kQ5_0) return nibble;
    return nibble | fifth_bit(w, j, g, in_group, p, i >= 16) << 4;          // Q5_0: unsigned, 0..31
}

// Q6_K: the 6-bit code (0..63) of value i of block b (gguf_gemv.h: groups are whole super-blocks)
inline int32_t q6_code(const BlockMatrix& w, int64_t j, int64_t b, int64_t i) {
    const int64_t nb = w.k / kBlock, g = b / kGroup * kGroup;
    const int64_t p = ((i % 16 / 4) * kGroup + b - g) * 4 + i % 4;           // the byte's place in the group's qs
    const uint8_t byte = w.qs[j * nb * 16 + g * 16 + p];
    const int32_t nibble = i < 16 ? byte & 15 : byte >> 4;
    const uint8_t high = w.qh[j * nb * 8 + g * 8 + p / 32 * 16 + p % 16];
    const int32_t bits = p % 32 < 16 ? high & 15 : high >> 4;                 // byte p's 4 high bits
    return nibble | (i < 16 ? bits & 3 : bits >> 2) << 4;
}

// ---- scalar (any x86-64)
void rows_scalar(const BlockMatrix& w, const int8_t* xq, const float* dx, const float* sx, int64_t rows,
                 int64_t n0, int64_t n1, float* y) {
    const int64_t nb = w.k / kBlock, nbp = padded_blocks(w.k), stride = code_stride(w.k);
    for (int64_t j = n0; j < n1; ++j) {
        for (int64_t r = 0; r < rows; ++r) {
            float total = 0.f;
            for (int64_t b = 0; b < nb; ++b) {
                const int8_t* xr = xq + r * stride;
                if (w.type == BlockType::kQ6_K) {
                    int32_t half[2] = {0, 0};
                    for (int64_t i = 0; i < kBlock; ++i) half[i / 16] += (q6_code(w, j, b, i) - 32) * xr[code_index(b, i, nb)];
                    const auto* sc = reinterpret_cast<const int8_t*>(w.sc) + (j * nb + b / kGroup * kGroup) * 2 + b % kGroup;
                    const float d = half_to_float(w.d[j * (nb / kGroup) + b / kGroup]);
                    total += d * dx[r * nbp + b] * static_cast<float>(sc[0] * half[0] + sc[kGroup] * half[1]);
                    continue;
                }
                int32_t dot = 0;
                for (int64_t i = 0; i < kBlock; ++i) dot += weight_code(w, j, b, i) * xr[code_index(b, i, nb)];
                if (w.type == BlockType::kQ4_K) {
                    const uint8_t* scm = w.sc + (j * nb + b / kGroup * kGroup) * 2 + b % kGroup;
                    const int64_t sb = j * (nb / kGroup) + b / kGroup;
                    total += half_to_float(w.d[sb]) * static_cast<float>(scm[0]) * dx[r * nbp + b] * static_cast<float>(dot);
                    total -= half_to_float(w.m[sb]) * static_cast<float>(scm[kGroup]) * sx[r * nbp + b];
                    continue;
                }
                const float d = half_to_float(w.d[j * nbp + b]);
                total += d * dx[r * nbp + b] * static_cast<float>(dot);
                if (w.type == BlockType::kQ4_1) total += half_to_float(w.m[j * nbp + b]) * sx[r * nbp + b];
                if (w.type == BlockType::kQ5_0) total += d * -16.f * sx[r * nbp + b];
            }
            y[r * w.n + j] = total;
        }
    }
}

// A thread walks its channels' rows in order, but a row is only a few hundred bytes and the hardware
// prefetcher ramps up slowly across the many small matrices of a step: the row ~3 KB ahead is requested
// explicitly (x1.04-1.15 single-stream decode here, in alternating runs of one process).
constexpr int64_t kPrefetchBytes = 3072;

inline void prefetch_row(const uint8_t* row, int64_t row_bytes) {
    for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(row + o), _MM_HINT_T0);
}

inline void prefetch_ahead(const uint8_t* row, int64_t row_bytes) {
    const uint8_t* ahead = row + (kPrefetchBytes + row_bytes - 1) / row_bytes * row_bytes;
    for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + o), _MM_HINT_T0);
}

// ---- SIMD: one body (gguf_gemv_simd.inc) compiled for each instruction-set level
namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define STRATA_GGUF_VNNI 0
#define STRATA_GGUF_TILES 0
#include "gguf_gemv_simd.inc"
#undef STRATA_GGUF_TILES
#undef STRATA_GGUF_VNNI
#pragma GCC pop_options
}  // namespace avx2

// AVX-VNNI: the VNNI body with the VEX-encoded vpdpbusd (the same operation on 256-bit vectors); no tiles,
// which need 512-bit registers, so more than 8 rows run 8 at a time
namespace avxvnni {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define STRATA_GGUF_VNNI 1
#define STRATA_GGUF_TILES 0
#define STRATA_DPBUSD256 _mm256_dpbusd_avx_epi32
#include "gguf_gemv_simd.inc"
#undef STRATA_DPBUSD256
#undef STRATA_GGUF_TILES
#undef STRATA_GGUF_VNNI
#pragma GCC pop_options
}  // namespace avxvnni

namespace vnni {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define STRATA_GGUF_VNNI 1
#define STRATA_GGUF_TILES 1
#define STRATA_DPBUSD256 _mm256_dpbusd_epi32
#include "gguf_gemv_simd.inc"
#undef STRATA_DPBUSD256
#undef STRATA_GGUF_TILES
#undef STRATA_GGUF_VNNI
#pragma GCC pop_options
}  // namespace vnni

// one 32-value block: codes round(x * (127 / amax)) (half to even) to c[0..31], scale amax / 127, the
// quantized values' sum
__attribute__((target("avx2,fma"))) void quantize_block_avx2(const float* x, int8_t* c, float* d, float* s) {
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
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c), packed);
}

// channels n0..n1 of w against `rows` activation rows, at the best instruction-set level in force;
// `unsigned_codes`: it takes the activation codes biased by 128 (as unsigned bytes)
using RowsFn = void (*)(const BlockMatrix&, const int8_t*, const float*, const float*, int64_t, int64_t, int64_t, float*);

struct RowsKernel {
    RowsFn fn;
    bool unsigned_codes;
};

// the kernel of one level for each type: Q8_0 with VNNI takes the codes biased to unsigned (its weights are
// the signed operand), as Q6_K's (its codes - 32); Q4_1's, Q5_0's and Q4_K's codes are unsigned already
template <template <BlockType> class Range, bool kVnni>
RowsKernel for_type(BlockType t) {
    switch (t) {
        case BlockType::kQ4_1: return {Range<BlockType::kQ4_1>::fn, false};
        case BlockType::kQ8_0: return {Range<BlockType::kQ8_0>::fn, kVnni};
        case BlockType::kQ5_0: return {Range<BlockType::kQ5_0>::fn, false};
        case BlockType::kQ4_K: return {Range<BlockType::kQ4_K>::fn, false};
        default: return {Range<BlockType::kQ6_K>::fn, kVnni};       // signed weights: codes biased with VNNI
    }
}

RowsKernel pick_rows(BlockType t) {
    switch (active_isa()) {
        case Isa::kAvx512Vnni: return for_type<vnni::Range, true>(t);
        case Isa::kAvxVnni: return for_type<avxvnni::Range, true>(t);
        case Isa::kAvx2: return for_type<avx2::Range, false>(t);
        default: return {rows_scalar, false};
    }
}

}  // namespace

void quantize_blocks_q8(const float* x, int64_t m, int64_t k, int8_t* xq, float* dx, float* sx) {
    const int64_t nb = k / kBlock, nbp = padded_blocks(k), stride = code_stride(k);
    const bool simd = has_avx2();
    std::memset(xq, 0, static_cast<size_t>(m * stride));
#pragma omp parallel for schedule(static) if (m * k >= (int64_t{1} << 16))
    for (int64_t r = 0; r < m; ++r) {
        int8_t* xr = xq + r * stride;
        for (int64_t b = nb; b < nbp; ++b) dx[r * nbp + b] = sx[r * nbp + b] = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
            float* d = dx + r * nbp + b;
            float* s = sx + r * nbp + b;
            alignas(32) int8_t c[kBlock];
            const float* xb = x + r * k + b * kBlock;
            if (simd) {
                quantize_block_avx2(xb, c, d, s);
            } else {
                float amax = 0.f;
                for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
                const float inv = amax > 0.f ? 127.0f / amax : 0.f;
                int32_t sum = 0;
                for (int64_t i = 0; i < kBlock; ++i) {
                    c[i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
                    sum += c[i];
                }
                *d = amax / 127.0f;
                *s = *d * static_cast<float>(sum);
            }
            // its 8 words, at code_index(b, 4t, nb) for word t, worked out once a block
            const int64_t g = b / kGroup * kGroup, in_group = group_size(b, nb);
            const int64_t lanes = packed_group(in_group) ? in_group : kGroup;
            int8_t* word0 = xr + g * kBlock + (b - g) * 4;
            for (int64_t t = 0; t < kBlock / 4; ++t) std::memcpy(word0 + t * lanes * 4, c + t * 4, 4);
        }
    }
}

// The tiles from 4 rows up, the per-channel code below: in-process decode steps (SmolLM2 Q4_1, its Q8_0 LM
// head; Zen 5, alternating builds) at 4 / 5 / 6 / 8 streams ran 1.2-1.3x / 1.1-1.3x / 1.3x / 1.4-1.6x faster
// with tiles (the 8-row LM head 1.05 ms against 2.35), level at 3, and 1.1-1.2x slower at 1 and 2, where the
// per-channel code's prefetch keeps the weights' stream from memory ahead (the tiles win those only on
// weights already in cache).
constexpr int64_t kTileMinRows = 4;

void gguf_gemv(const BlockMatrix& w, const float* x, int64_t m, float* y) {
    const int64_t nbp = padded_blocks(w.k), stride = code_stride(w.k);
    // the codes start on a cache line (rows are whole lines: stride is a multiple of 256), so no vector
    // load of them splits two lines (a split 512-bit load costs the tiles a third of their speed)
    std::vector<int8_t> codes(static_cast<size_t>(m * stride + 63));
    int8_t* xq = codes.data() + (64 - reinterpret_cast<uintptr_t>(codes.data()) % 64) % 64;
    std::vector<float> dx(static_cast<size_t>(m * nbp)), sx(static_cast<size_t>(m * nbp));
    quantize_blocks_q8(x, m, w.k, xq, dx.data(), sx.data());
    const RowsKernel kernel = pick_rows(w.type);
    if (kernel.unsigned_codes)
        for (int64_t i = 0; i < m * stride; ++i) xq[i] = static_cast<int8_t>(static_cast<uint8_t>(xq[i]) ^ 0x80u);   // c + 128
    constexpr int64_t chunk = 32;                 // output channels per OpenMP task
    const int64_t chunks = (w.n + chunk - 1) / chunk;
    const bool parallel = w.n * w.k >= (int64_t{1} << 15) && chunks > 1;
    if (m >= kTileMinRows && active_isa() == Isa::kAvx512Vnni) {
        // tiles (gguf_gemv_simd.inc), over panels of rows x chunks of channels: a thread takes whole
        // panels' worth of consecutive tasks, so a panel's codes stay in its L2 while the weights pass
        const auto range = w.type == BlockType::kQ4_1   ? vnni::tile_range<BlockType::kQ4_1>
                           : w.type == BlockType::kQ8_0 ? vnni::tile_range<BlockType::kQ8_0>
                           : w.type == BlockType::kQ5_0 ? vnni::tile_range_expanded<BlockType::kQ5_0>
                           : w.type == BlockType::kQ4_K ? vnni::tile_range<BlockType::kQ4_K>
                                                        : vnni::tile_range_expanded<BlockType::kQ6_K>;
        constexpr int64_t panel = 128;
        const int64_t panels = (m + panel - 1) / panel;
#pragma omp parallel for schedule(static) if (parallel)
        for (int64_t t = 0; t < panels * chunks; ++t) {
            const int64_t p = t / chunks, c = t % chunks;
            range(w, xq, dx.data(), sx.data(), p * panel, std::min(m, (p + 1) * panel), c * chunk,
                  std::min(w.n, (c + 1) * chunk), y);
        }
        return;
    }
    for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
        const int64_t rows = std::min(kMaxRows, m - r0);
        const int8_t* xr = xq + r0 * stride;
        const float *dr = dx.data() + r0 * nbp, *sr = sx.data() + r0 * nbp;
        float* yr = y + r0 * w.n;
#pragma omp parallel for schedule(static) if (parallel)
        for (int64_t c = 0; c < chunks; ++c) kernel.fn(w, xr, dr, sr, rows, c * chunk, std::min(w.n, (c + 1) * chunk), yr);
    }
}

void gguf_dequantize_rows(const BlockMatrix& w, const int64_t* ids, int64_t count, float* out) {
    const int64_t nb = w.k / kBlock, nbp = padded_blocks(w.k), qb = qs_bytes(w.type);
    for (int64_t r = 0; r < count; ++r) {
        const int64_t j = ids[r];
        const uint8_t* row = w.qs + j * nb * qb;
        float* o = out + r * w.k;
        for (int64_t g = 0; g < nb; g += kGroup) {           // a group's codes: word t of each of its blocks
            const int64_t in_group = std::min(kGroup, nb - g);
            for (int64_t b = g; b < g + in_group; ++b, o += kBlock) {
                const float d = half_to_float(w.d[j * nbp + b]);
                const uint8_t* lane = row + g * qb + (b - g) * 4;    // this block's bytes of word 0
                if (w.type == BlockType::kQ8_0) {
                    for (int64_t i = 0; i < kBlock; ++i)
                        o[i] = static_cast<float>(static_cast<int8_t>(lane[(i / 4) * in_group * 4 + i % 4])) * d;
                } else if (w.type == BlockType::kQ5_0) {
                    for (int64_t i = 0; i < kBlock; ++i)
                        o[i] = static_cast<float>(weight_code(w, j, b, i) - 16) * d;
                } else if (w.type == BlockType::kQ6_K) {      // ggml: (d * sc) * (q - 32)
                    const auto* sc = reinterpret_cast<const int8_t*>(w.sc) + (j * nb + g) * 2 + (b - g);
                    const float d6 = half_to_float(w.d[j * (nb / kGroup) + g / kGroup]);
                    for (int64_t i = 0; i < kBlock; ++i)
                        o[i] = d6 * static_cast<float>(sc[i < 16 ? 0 : kGroup]) * static_cast<float>(q6_code(w, j, b, i) - 32);
                } else if (w.type == BlockType::kQ4_K) {      // ggml: d1 = d * sc, m1 = dmin * m, q * d1 - m1
                    const uint8_t* scm = w.sc + (j * nb + g) * 2 + (b - g);
                    const int64_t sb = j * (nb / kGroup) + g / kGroup;
                    const float d1 = half_to_float(w.d[sb]) * static_cast<float>(scm[0]);
                    const float m1 = half_to_float(w.m[sb]) * static_cast<float>(scm[kGroup]);
                    for (int64_t i = 0; i < kBlock; ++i) o[i] = static_cast<float>(weight_code(w, j, b, i)) * d1 - m1;
                } else {                                     // word t: values 4t..4t+3 low, 16+4t.. high nibbles
                    const float m = half_to_float(w.m[j * nbp + b]);
                    for (int64_t i = 0; i < 16; ++i) {
                        const uint8_t byte = lane[(i / 4) * in_group * 4 + i % 4];
                        o[i] = static_cast<float>(byte & 15) * d + m;
                        o[i + 16] = static_cast<float>(byte >> 4) * d + m;
                    }
                }
            }
        }
    }
}

}  // namespace strata::cpu
