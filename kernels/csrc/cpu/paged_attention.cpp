// Paged attention, decode (see paged_attention.h).
//
// One work item per (sequence, KV head), spread over OpenMP threads. An item reads the sequence's K rows
// once, scoring them against every query head of its group (G = H / KVH dot products per row, the K row
// loaded once), takes a numerically safe softmax in float32, then reads the V rows once, accumulating
// the G outputs. Nothing is gathered or copied: rows are addressed through the block table.
#include "paged_attention.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/layer_math.h"

namespace strata::cpu {
namespace {

constexpr int64_t kMaxGroup = 16;

bool has_avx2() {
    static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return yes;
}

inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = uint32_t{x} << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

struct Item {
    const float* q;            // [G, D] the group's query heads
    float* out;                // [G, D]
    const int64_t* table;      // this sequence's block ids
    int64_t len;               // context length
    int64_t kv_offset;         // element offset of this KV head's slot 0 in the pools
};

// ---- scalar (any x86-64)
template <bool BF16>
inline float load1(const void* base, int64_t i) {
    if constexpr (BF16) return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    else return static_cast<const float*>(base)[i];
}

template <bool BF16>
void item_scalar(const Item& it, const void* k_pool, const void* v_pool, int64_t g, int64_t d, int64_t bs,
                 float scale, std::vector<float>& scores) {
    scores.resize(static_cast<size_t>(g * it.len));
    for (int64_t p = 0; p < it.len; ++p) {
        const int64_t row = it.kv_offset + kv_slot(it.table, p, bs) * d;
        for (int64_t j = 0; j < g; ++j) {
            float acc = 0.f;
            for (int64_t i = 0; i < d; ++i) acc += it.q[j * d + i] * load1<BF16>(k_pool, row + i);
            scores[j * it.len + p] = acc * scale;
        }
    }
    for (int64_t j = 0; j < g; ++j) {
        float* s = scores.data() + j * it.len;
        const float mx = *std::max_element(s, s + it.len);
        float sum = 0.f;
        for (int64_t p = 0; p < it.len; ++p) sum += (s[p] = std::exp(s[p] - mx));
        const float inv = 1.f / sum;
        for (int64_t p = 0; p < it.len; ++p) s[p] *= inv;
    }
    std::fill(it.out, it.out + g * d, 0.f);
    for (int64_t p = 0; p < it.len; ++p) {
        const int64_t row = it.kv_offset + kv_slot(it.table, p, bs) * d;
        for (int64_t j = 0; j < g; ++j) {
            const float w = scores[j * it.len + p];
            for (int64_t i = 0; i < d; ++i) it.out[j * d + i] += w * load1<BF16>(v_pool, row + i);
        }
    }
}

// Blocks are scattered over the pool, so the hardware prefetcher stops at each block's end: rows
// kAhead positions ahead are requested explicitly.
constexpr int64_t kAhead = 16;

template <bool BF16>
inline void prefetch_row(const void* base, int64_t element, int64_t bytes) {
    const char* at = static_cast<const char*>(base) + element * (BF16 ? 2 : 4);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(at + b, _MM_HINT_T0);
}

// ---- AVX2 + FMA (head_dim a multiple of 8)
template <bool BF16>
__attribute__((target("avx2,fma"))) inline __m256 load8(const void* base, int64_t i) {
    if constexpr (BF16) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
        return _mm256_loadu_ps(static_cast<const float*>(base) + i);
    }
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// e^x for x <= 0 (softmax after subtracting the max), 8 lanes: Cephes' polynomial, ~2 ulp; x < -87 → 0
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

// softmax in place over n scores
__attribute__((target("avx2,fma"))) void softmax_avx2(float* s, int64_t n) {
    const float mx = *std::max_element(s, s + n);
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    int64_t p = 0;
    for (; p + 8 <= n; p += 8) {
        const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + p), vmx));
        _mm256_storeu_ps(s + p, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (; p < n; ++p) sum += (s[p] = std::exp(s[p] - mx));
    const __m256 inv = _mm256_set1_ps(1.f / sum);
    p = 0;
    for (; p + 8 <= n; p += 8) _mm256_storeu_ps(s + p, _mm256_mul_ps(_mm256_loadu_ps(s + p), inv));
    for (; p < n; ++p) s[p] *= 1.f / sum;
}

// out[j, :] = sum_p w[j, p] * V[p, :] for the G query heads of a group, 32 dimensions (4 registers) per
// pass: G * 4 accumulators stay in registers instead of a load and a store of the output per row.
template <bool BF16, int G>
__attribute__((target("avx2,fma"))) void v_pass(const Item& it, const void* v_pool, int64_t d, int64_t bs,
                                                 const float* w) {
    constexpr int64_t elem = BF16 ? 2 : 4;
    for (int64_t i0 = 0; i0 < d; i0 += 32) {
        const int64_t lanes = std::min<int64_t>(4, (d - i0) / 8);
        __m256 acc[G][4];
        for (int j = 0; j < G; ++j)
            for (int c = 0; c < 4; ++c) acc[j][c] = _mm256_setzero_ps();
        for (int64_t p = 0; p < it.len; ++p) {
            const int64_t row = it.kv_offset + kv_slot(it.table, p, bs) * d + i0;
            if (p + kAhead < it.len)
                prefetch_row<BF16>(v_pool, it.kv_offset + kv_slot(it.table, p + kAhead, bs) * d + i0, lanes * 8 * elem);
            __m256 wj[G];
            for (int j = 0; j < G; ++j) wj[j] = _mm256_set1_ps(w[j * it.len + p]);
            for (int64_t c = 0; c < lanes; ++c) {
                const __m256 v = load8<BF16>(v_pool, row + c * 8);
                for (int j = 0; j < G; ++j) acc[j][c] = _mm256_fmadd_ps(wj[j], v, acc[j][c]);
            }
        }
        for (int j = 0; j < G; ++j)
            for (int64_t c = 0; c < lanes; ++c) _mm256_storeu_ps(it.out + j * d + i0 + c * 8, acc[j][c]);
    }
}

template <bool BF16>
__attribute__((target("avx2,fma"))) void item_avx2(const Item& it, const void* k_pool, const void* v_pool, int64_t g,
                                                    int64_t d, int64_t bs, float scale, std::vector<float>& scores) {
    scores.resize(static_cast<size_t>(g * it.len));
    constexpr int64_t elem = BF16 ? 2 : 4;
    for (int64_t p = 0; p < it.len; ++p) {
        const int64_t row = it.kv_offset + kv_slot(it.table, p, bs) * d;
        if (p + kAhead < it.len) prefetch_row<BF16>(k_pool, it.kv_offset + kv_slot(it.table, p + kAhead, bs) * d, d * elem);
        __m256 acc[kMaxGroup];
        for (int64_t j = 0; j < g; ++j) acc[j] = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i += 8) {
            const __m256 k = load8<BF16>(k_pool, row + i);
            for (int64_t j = 0; j < g; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(it.q + j * d + i), k, acc[j]);
        }
        for (int64_t j = 0; j < g; ++j) scores[j * it.len + p] = hsum(acc[j]) * scale;
    }
    for (int64_t j = 0; j < g; ++j) softmax_avx2(scores.data() + j * it.len, it.len);
    switch (g) {                      // the weighted sum of V with its accumulators in registers
        case 1: v_pass<BF16, 1>(it, v_pool, d, bs, scores.data()); return;
        case 2: v_pass<BF16, 2>(it, v_pool, d, bs, scores.data()); return;
        case 3: v_pass<BF16, 3>(it, v_pool, d, bs, scores.data()); return;
        default: break;
    }
    std::fill(it.out, it.out + g * d, 0.f);
    for (int64_t p = 0; p < it.len; ++p) {
        const int64_t row = it.kv_offset + kv_slot(it.table, p, bs) * d;
        if (p + kAhead < it.len) prefetch_row<BF16>(v_pool, it.kv_offset + kv_slot(it.table, p + kAhead, bs) * d, d * elem);
        for (int64_t i = 0; i < d; i += 8) {
            const __m256 v = load8<BF16>(v_pool, row + i);
            for (int64_t j = 0; j < g; ++j) {
                float* o = it.out + j * d + i;
                _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(scores[j * it.len + p]), v, _mm256_loadu_ps(o)));
            }
        }
    }
}

}  // namespace

void paged_attention_decode(const float* q, const void* k_pool, const void* v_pool, bool bf16_kv,
                            const int64_t* block_table, const int64_t* context_lens, int64_t batch,
                            int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t num_slots,
                            int64_t block_size, int64_t max_blocks, float scale, float* out) {
    const int64_t g = num_heads / num_kv_heads;
    const int64_t d = head_dim;
    const bool simd = has_avx2() && d % 8 == 0 && g <= kMaxGroup;
    const int64_t items = batch * num_kv_heads;
    int64_t work = 0;
    for (int64_t b = 0; b < batch; ++b) work += context_lens[b];
    // small steps are not worth waking the thread team
    const bool parallel = work * num_kv_heads * d >= (int64_t{1} << 16) && items > 1;
#pragma omp parallel if (parallel)
    {
        std::vector<float> scores;
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < items; ++w) {
            const int64_t b = w / num_kv_heads, h = w % num_kv_heads;
            const Item it{q + (b * num_heads + h * g) * d, out + (b * num_heads + h * g) * d,
                          block_table + b * max_blocks, context_lens[b], h * num_slots * d};
            if (it.len <= 0) {
                std::fill(it.out, it.out + g * d, 0.f);
                continue;
            }
            if (simd) {
                if (bf16_kv) item_avx2<true>(it, k_pool, v_pool, g, d, block_size, scale, scores);
                else item_avx2<false>(it, k_pool, v_pool, g, d, block_size, scale, scores);
            } else {
                if (bf16_kv) item_scalar<true>(it, k_pool, v_pool, g, d, block_size, scale, scores);
                else item_scalar<false>(it, k_pool, v_pool, g, d, block_size, scale, scores);
            }
        }
    }
}

}  // namespace strata::cpu
