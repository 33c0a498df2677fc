// Paged attention over block tables (see paged_attention.h): decodes, prefill chunks and verification
// runs in one call.
//
// One work item per (sequence, KV head, tile of the sequence's query rows), spread over OpenMP threads.
// An item reads the K rows the tile can see once, scoring each against every query vector of the tile
// (the tile's rows × the G = H / KVH query heads sharing the KV head: up to 16 dot products per K row
// load), takes a numerically safe softmax in float32 per vector over its own causal span, then reads the
// V rows, accumulating outputs in registers. Nothing is gathered or copied from the pools: rows are
// addressed through the block table.
#include "paged_attention.h"
#include "simd.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "../common/layer_math.h"

namespace strata::cpu {
namespace {

constexpr int64_t kMaxGroup = 16;

inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = uint32_t{x} << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// One work item: a tile of a sequence's query rows against one KV head. Its query vectors (the tile's rows
// × the G query heads sharing the KV head) are copied into a contiguous [n, D] buffer; vector j attends
// positions [lo[j], lens[j]) (causal: a row sees its own position and everything before it; lo[j] = 0 but in
// a sliding window). Positions count from the item's table: with a window it starts at the block holding the
// first row's first position, so the blocks before it are never read.
struct Item {
    const float* q;            // [n, D] gathered query vectors
    float* out;                // [n, D]
    const int64_t* lens;       // [n] one past the last position each vector attends
    const int64_t* lo;         // [n] the first position each vector attends
    int64_t n;                 // vectors in the tile
    int64_t len;               // the longest of lens (the last row's)
    const int64_t* table;      // this sequence's block ids, from the item's first block
    int64_t kv_offset;         // element offset of this KV head's slot 0 in the pools
};

// ---- scalar (any x86-64)
template <bool BF16>
inline float load1(const void* base, int64_t i) {
    if constexpr (BF16) return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    else return static_cast<const float*>(base)[i];
}

// softmax of vector j's scores over its own positions [lo, n); the tile's other positions get weight 0
void softmax_scalar(float* s, int64_t lo, int64_t n, int64_t len) {
    const float mx = *std::max_element(s + lo, s + n);
    float sum = 0.f;
    for (int64_t p = lo; p < n; ++p) sum += (s[p] = std::exp(s[p] - mx));
    const float inv = 1.f / sum;
    for (int64_t p = lo; p < n; ++p) s[p] *= inv;
    std::fill(s, s + lo, 0.f);
    std::fill(s + n, s + len, 0.f);
}

template <bool BF16>
void item_scalar(const Item& it, const void* k_pool, const void* v_pool, int64_t d, int64_t bs, float scale,
                 std::vector<float>& scores) {
    scores.resize(static_cast<size_t>(it.n * it.len));
    for (int64_t p = 0; p < it.len; ++p) {
        const int64_t row = it.kv_offset + kv_slot(it.table, p, bs) * d;
        for (int64_t j = 0; j < it.n; ++j) {
            float acc = 0.f;
            for (int64_t i = 0; i < d; ++i) acc += it.q[j * d + i] * load1<BF16>(k_pool, row + i);
            scores[j * it.len + p] = acc * scale;
        }
    }
    for (int64_t j = 0; j < it.n; ++j) softmax_scalar(scores.data() + j * it.len, it.lo[j], it.lens[j], it.len);
    std::fill(it.out, it.out + it.n * d, 0.f);
    for (int64_t p = 0; p < it.len; ++p) {
        const int64_t row = it.kv_offset + kv_slot(it.table, p, bs) * d;
        for (int64_t j = 0; j < it.n; ++j) {
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

// The eight sums of eight vectors in one: lane j = sum of a[j]'s lanes.
__attribute__((target("avx2,fma"))) inline __m256 reduce8(const __m256* a) {
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// Scores are kept position-major, `stride` (8 or 16: the item's vectors rounded up) per position, vector j
// of the item in lane j, so the reductions, the softmax and the masks all run 8 vectors to a register.
constexpr int64_t stride_for(int64_t n) { return n <= 8 ? 8 : 16; }

// Positions of an item are walked block by block (no division per row). Rows `ahead` positions on are
// prefetched: blocks are scattered over the pool, so the hardware prefetcher stops at each block's end.
struct Walk {
    const Item& it;
    int64_t d, bs, ahead;
    int64_t base(int64_t block) const { return it.kv_offset + it.table[block] * bs * d; }
    // the row `ahead` positions after offset o of a block starting at `base` (`next`: the following block's)
    int64_t ahead_row(int64_t o, int64_t base, int64_t next) const {
        return o + ahead < bs ? base + (o + ahead) * d : next + (o + ahead - bs) * d;
    }
};

// K pass for NV vectors (a compile-time count keeps the accumulators in registers): every K row is
// loaded once and dotted with all NV query vectors; the sums land in scores[p * stride + j] * scale.
// With NV <= 4 two rows go together: each query load serves both, the 2 * NV accumulator chains overlap,
// and one reduction gives both rows' scores (lanes 0-3 and 4-7).
template <bool BF16, int NV>
__attribute__((target("avx2,fma"))) void k_pass(const Item& it, const void* k_pool, int64_t d, int64_t bs, float scale,
                                                 float* scores) {
    constexpr int64_t elem = BF16 ? 2 : 4;
    constexpr int64_t stride = stride_for(NV);
    const Walk w{it, d, bs, std::min(kAhead, bs)};
    const __m256 vscale = _mm256_set1_ps(scale);
    auto prefetch = [&](int64_t p, int64_t o, int64_t base, int64_t next) {
        if (p + w.ahead < it.len)
            prefetch_row<BF16>(k_pool, w.ahead_row(o, base, next), d * elem);
    };
    for (int64_t blk = 0, p = 0; p < it.len; ++blk) {
        const int64_t base = w.base(blk);
        const int64_t next = p + bs < it.len ? w.base(blk + 1) : 0;
        const int64_t end = std::min(it.len, p + bs);
        int64_t o = 0;
        if constexpr (NV <= 4) {
            for (; p + 1 < end; p += 2, o += 2) {
                prefetch(p, o, base, next);
                prefetch(p + 1, o + 1, base, next);
                const int64_t row = base + o * d;
                __m256 acc[8];
                for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
                for (int64_t i = 0; i < d; i += 8) {
                    const __m256 k0 = load8<BF16>(k_pool, row + i), k1 = load8<BF16>(k_pool, row + d + i);
                    for (int j = 0; j < NV; ++j) {
                        const __m256 qv = _mm256_loadu_ps(it.q + j * d + i);
                        acc[j] = _mm256_fmadd_ps(qv, k0, acc[j]);
                        acc[4 + j] = _mm256_fmadd_ps(qv, k1, acc[4 + j]);
                    }
                }
                const __m256 both = _mm256_mul_ps(reduce8(acc), vscale);
                _mm256_storeu_ps(scores + p * stride, _mm256_zextps128_ps256(_mm256_castps256_ps128(both)));
                _mm256_storeu_ps(scores + (p + 1) * stride, _mm256_zextps128_ps256(_mm256_extractf128_ps(both, 1)));
            }
        }
        for (; p < end; ++p, ++o) {
            prefetch(p, o, base, next);
            const int64_t row = base + o * d;
            __m256 acc[stride];
            for (int j = 0; j < stride; ++j) acc[j] = _mm256_setzero_ps();
            for (int64_t i = 0; i < d; i += 8) {
                const __m256 k = load8<BF16>(k_pool, row + i);
                for (int j = 0; j < NV; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(it.q + j * d + i), k, acc[j]);
            }
            _mm256_storeu_ps(scores + p * stride, _mm256_mul_ps(reduce8(acc), vscale));
            if constexpr (NV > 8) _mm256_storeu_ps(scores + p * stride + 8, _mm256_mul_ps(reduce8(acc + 8), vscale));
        }
    }
}

// Softmax of each vector over its own positions (lane j sees lo[j] <= p < lens[j]; other positions get
// weight 0), left unnormalised: inv[j] = 1 / the sum, applied to the output.
__attribute__((target("avx2,fma"))) inline __m256 seen_at(int64_t p, __m256 vlo, __m256 vlen) {
    const __m256 vp = _mm256_set1_ps(static_cast<float>(p));
    return _mm256_and_ps(_mm256_cmp_ps(vp, vlen, _CMP_LT_OQ), _mm256_cmp_ps(vp, vlo, _CMP_GE_OQ));
}

__attribute__((target("avx2,fma"))) void softmax_lanes(const Item& it, float* scores, float* inv) {
    const int64_t stride = stride_for(it.n);
    for (int64_t g = 0; g < it.n; g += 8) {
        alignas(32) float lens[8], los[8];
        for (int64_t j = 0; j < 8; ++j) {
            lens[j] = static_cast<float>(g + j < it.n ? it.lens[g + j] : 0);
            los[j] = static_cast<float>(g + j < it.n ? it.lo[g + j] : 0);
        }
        const __m256 vlen = _mm256_load_ps(lens), vlo = _mm256_load_ps(los);
        const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
        __m256 mx = ninf;
        for (int64_t p = 0; p < it.len; ++p) {
            const __m256 seen = seen_at(p, vlo, vlen);
            mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, _mm256_loadu_ps(scores + p * stride + g), seen));
        }
        mx = _mm256_max_ps(mx, _mm256_set1_ps(-std::numeric_limits<float>::max()));   // lanes that see nothing
        __m256 sum = _mm256_setzero_ps();
        for (int64_t p = 0; p < it.len; ++p) {
            const __m256 seen = seen_at(p, vlo, vlen);
            float* s = scores + p * stride + g;
            const __m256 e = _mm256_and_ps(exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s), mx)), seen);
            _mm256_storeu_ps(s, e);
            sum = _mm256_add_ps(sum, e);
        }
        alignas(32) float sums[8];
        _mm256_store_ps(sums, sum);
        for (int64_t j = 0; j < 8 && g + j < it.n; ++j) inv[g + j] = sums[j] > 0.f ? 1.f / sums[j] : 0.f;
    }
}

// out[j, i0 : i0 + 8 * L] = inv[j] * sum_p w[p, j] * V[p, i0 : ...] for G consecutive vectors j0.. of the
// item (positions up to the last one's length): G * L accumulators, a compile-time count in one flat array,
// fully unrolled and walked in one loop over positions, so GCC keeps them in registers (with a run-time
// count, a 2-D array or a block loop around a row loop it kept them on the stack: a store-forwarding round
// trip per FMA, the V pass ~3x slower).
template <bool BF16, int G, int L>
__attribute__((target("avx2,fma"))) void v_slice(const Item& it, const void* v_pool, int64_t d, int64_t bs,
                                                  const float* scores, const float* inv, int64_t j0, int64_t i0) {
    constexpr int64_t elem = BF16 ? 2 : 4;
    const Walk w{it, d, bs, std::min(kAhead, bs)};
    const int64_t len = it.lens[j0 + G - 1], stride = stride_for(it.n);
    __m256 acc[G * L];                      // [j * L + c]
#pragma GCC unroll 16
    for (int i = 0; i < G * L; ++i) acc[i] = _mm256_setzero_ps();
    // one loop over positions; the block changes when o reaches bs
    int64_t blk = 0, o = 0, base = w.base(0) + i0, next = bs < len ? w.base(1) + i0 : 0;
    for (int64_t p = 0; p < len; ++p) {
        if (p + w.ahead < len)               // the rest of the row: later slices hit
            prefetch_row<BF16>(v_pool, w.ahead_row(o, base, next), (d - i0) * elem);
        const int64_t row = base + o * d;
        if (++o == bs && p + 1 < len) {
            o = 0, base = next, ++blk;
            next = (blk + 1) * bs < len ? w.base(blk + 1) + i0 : 0;
        }
        __m256 wj[G];
#pragma GCC unroll 16
        for (int j = 0; j < G; ++j) wj[j] = _mm256_broadcast_ss(scores + p * stride + j0 + j);
#pragma GCC unroll 16
        for (int c = 0; c < L; ++c) {
            const __m256 v = load8<BF16>(v_pool, row + c * 8);
#pragma GCC unroll 16
            for (int j = 0; j < G; ++j) acc[j * L + c] = _mm256_fmadd_ps(wj[j], v, acc[j * L + c]);
        }
    }
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j) {
        const __m256 norm = _mm256_set1_ps(inv[j0 + j]);
#pragma GCC unroll 16
        for (int c = 0; c < L; ++c) _mm256_storeu_ps(it.out + (j0 + j) * d + i0 + c * 8, _mm256_mul_ps(acc[j * L + c], norm));
    }
}

// the V pass for G vectors from j0, in slices of up to 8 * LM dimensions: G * LM accumulators + G weights +
// a V vector within the 16 registers (G = 3: 24 dimensions a slice)
template <bool BF16, int G>
void v_pass(const Item& it, const void* v_pool, int64_t d, int64_t bs, const float* scores, const float* inv,
            int64_t j0) {
    constexpr int64_t LM = G >= 3 ? 3 : 4;
    for (int64_t i0 = 0; i0 < d; i0 += 8 * LM) {
        switch (std::min<int64_t>(LM, (d - i0) / 8)) {
            case 4: v_slice<BF16, G, 4>(it, v_pool, d, bs, scores, inv, j0, i0); break;
            case 3: v_slice<BF16, G, 3>(it, v_pool, d, bs, scores, inv, j0, i0); break;
            case 2: v_slice<BF16, G, 2>(it, v_pool, d, bs, scores, inv, j0, i0); break;
            default: v_slice<BF16, G, 1>(it, v_pool, d, bs, scores, inv, j0, i0); break;
        }
    }
}

template <bool BF16, int NV>
__attribute__((target("avx2,fma"))) void item_avx2_n(const Item& it, const void* k_pool, const void* v_pool, int64_t d,
                                                      int64_t bs, float scale, std::vector<float>& scores) {
    scores.resize(static_cast<size_t>(it.len * stride_for(NV)));
    float inv[16];
    k_pass<BF16, NV>(it, k_pool, d, bs, scale, scores.data());
    softmax_lanes(it, scores.data(), inv);
    int64_t j0 = 0;
    for (; j0 + 3 <= NV; j0 += 3) v_pass<BF16, 3>(it, v_pool, d, bs, scores.data(), inv, j0);
    if (NV - j0 == 2) v_pass<BF16, 2>(it, v_pool, d, bs, scores.data(), inv, j0);
    if (NV - j0 == 1) v_pass<BF16, 1>(it, v_pool, d, bs, scores.data(), inv, j0);
}

template <bool BF16, int... N>
void item_avx2_dispatch(std::integer_sequence<int, N...>, const Item& it, const void* k_pool, const void* v_pool,
                        int64_t d, int64_t bs, float scale, std::vector<float>& scores) {
    using Fn = void (*)(const Item&, const void*, const void*, int64_t, int64_t, float, std::vector<float>&);
    static constexpr Fn table[] = {&item_avx2_n<BF16, N + 1>...};
    table[it.n - 1](it, k_pool, v_pool, d, bs, scale, scores);
}

// head_dim a multiple of 8, 1 <= it.n <= kMaxGroup
template <bool BF16>
void item_avx2(const Item& it, const void* k_pool, const void* v_pool, int64_t d, int64_t bs, float scale,
               std::vector<float>& scores) {
    item_avx2_dispatch<BF16>(std::make_integer_sequence<int, kMaxGroup>{}, it, k_pool, v_pool, d, bs, scale, scores);
}

}  // namespace

void paged_attention(const float* q, const void* k_pool, const void* v_pool, bool bf16_kv, const int64_t* block_table,
                     const int64_t* context_lens, const int64_t* query_start, int64_t num_seqs, int64_t num_heads,
                     int64_t num_kv_heads, int64_t head_dim, int64_t num_slots, int64_t block_size,
                     int64_t max_blocks, float scale, float* out, int64_t window) {
    const int64_t g = num_heads / num_kv_heads;
    const int64_t d = head_dim;
    const bool simd = has_avx2() && d % 8 == 0 && g <= kMaxGroup;
    // a tile holds as many query rows as fit kMaxGroup vectors (1 row where G > kMaxGroup: scalar path)
    const int64_t tile = std::max<int64_t>(1, kMaxGroup / g);
    // work items: (sequence, KV head, tile of its query rows)
    std::vector<int64_t> first_item(num_seqs + 1, 0);
    int64_t work = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t rows = query_start[s + 1] - query_start[s];
        first_item[s + 1] = first_item[s] + num_kv_heads * ((rows + tile - 1) / tile);
        work += context_lens[s] * rows;
    }
    const int64_t items = first_item[num_seqs];
    // small steps are not worth waking the thread team
    const bool parallel = work * num_kv_heads * d >= (int64_t{1} << 13) && items > 1;
#pragma omp parallel if (parallel)
    {
        std::vector<float> scores, qbuf, obuf;
        std::vector<int64_t> lens, lo;
        int64_t s = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < items; ++w) {
            while (first_item[s + 1] <= w) ++s;          // items ascend within a thread's chunks
            while (first_item[s] > w) --s;
            const int64_t local = w - first_item[s];
            const int64_t rows = query_start[s + 1] - query_start[s];
            const int64_t tiles = (rows + tile - 1) / tile;
            const int64_t h = local / tiles, r0 = (local % tiles) * tile, r1 = std::min(rows, r0 + tile);
            const int64_t n = (r1 - r0) * g;
            qbuf.resize(static_cast<size_t>(n * d));
            obuf.resize(static_cast<size_t>(n * d));
            lens.resize(static_cast<size_t>(n));
            lo.resize(static_cast<size_t>(n));
            // with a window, the item starts at the block of the first row's first position
            const int64_t first = window > 0 ? std::max<int64_t>(0, context_lens[s] - rows + r0 + 1 - window) : 0;
            const int64_t skip = first / block_size * block_size;
            for (int64_t r = r0; r < r1; ++r) {
                const int64_t t = query_start[s] + r;
                std::memcpy(qbuf.data() + (r - r0) * g * d, q + (t * num_heads + h * g) * d, sizeof(float) * g * d);
                // row r of `rows` sits at position context - rows + r and sees everything up to it (in a window:
                // its last `window` positions)
                const int64_t len = std::max<int64_t>(0, context_lens[s] - rows + r + 1);
                const int64_t from = window > 0 ? std::max<int64_t>(0, len - window) : 0;
                for (int64_t j = 0; j < g; ++j) {
                    lens[(r - r0) * g + j] = std::max<int64_t>(0, len - skip);
                    lo[(r - r0) * g + j] = std::max<int64_t>(0, from - skip);
                }
            }
            const Item it{qbuf.data(), obuf.data(), lens.data(), lo.data(), n, lens[n - 1],
                          block_table + s * max_blocks + skip / block_size, h * num_slots * d};
            if (lens[0] <= 0) {          // an empty context (lengths ascend within a tile)
                std::fill(obuf.begin(), obuf.end(), 0.f);
            } else if (simd) {
                if (bf16_kv) item_avx2<true>(it, k_pool, v_pool, d, block_size, scale, scores);
                else item_avx2<false>(it, k_pool, v_pool, d, block_size, scale, scores);
            } else {
                if (bf16_kv) item_scalar<true>(it, k_pool, v_pool, d, block_size, scale, scores);
                else item_scalar<false>(it, k_pool, v_pool, d, block_size, scale, scores);
            }
            for (int64_t r = r0; r < r1; ++r) {
                const int64_t t = query_start[s] + r;
                std::memcpy(out + (t * num_heads + h * g) * d, obuf.data() + (r - r0) * g * d, sizeof(float) * g * d);
            }
        }
    }
}

}  // namespace strata::cpu
