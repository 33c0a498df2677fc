// Exact cosine top-k for the semantic cache's index (see cosine_topk.h and ../common/topk_bound.h).
//
// One pass over the rows reads 1 byte per dimension instead of 4 (the int8 codes) and keeps, per query,
// the k best lower bounds seen; rows whose upper bound is under that are dropped on the spot. The rows
// that survive are re-scored from the float32 matrix, so the answer is the float32 top-k. Rows are split
// into one contiguous range per OpenMP thread; inside a range, blocks of rows are scored against every
// query so a batch of queries reads the matrix once.
#include "cosine_topk.h"
#include "simd.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "../common/topk_bound.h"

namespace strata::cpu {
namespace {

constexpr int64_t kBlockRows = 64;
constexpr int64_t kParallelWork = int64_t{1} << 22;   // below this many multiply-adds one thread is faster
const float kNegInf = -std::numeric_limits<float>::infinity();
// float32 rounding of the re-scored dot products (d * 2^-24 relative at d = 384 is ~2e-5 worst case)
constexpr float kRoundingSlack = 3e-5f;

__attribute__((target("avx2"))) int32_t dot_i8_avx2(const int8_t* a, const int8_t* b, int64_t d) {
    __m256i acc = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t i = 0;
    for (; i + 32 <= d; i += 32) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i));
        const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i));
        // maddubs wants unsigned x signed: |a| times b with a's sign (codes are in [-127, 127], no overflow)
        const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    int32_t total = _mm_cvtsi128_si32(s);
    for (; i < d; ++i) total += int32_t{a[i]} * int32_t{b[i]};
    return total;
}

int32_t dot_i8_scalar(const int8_t* a, const int8_t* b, int64_t d) {
    int32_t total = 0;
    for (int64_t i = 0; i < d; ++i) total += int32_t{a[i]} * int32_t{b[i]};
    return total;
}

__attribute__((target("avx2,fma"))) float dot_f32_avx2(const float* a, const float* b, int64_t d) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    __m256 acc = _mm256_add_ps(acc0, acc1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
    float total = _mm_cvtss_f32(s);
    for (; i < d; ++i) total += a[i] * b[i];
    return total;
}

float dot_f32_scalar(const float* a, const float* b, int64_t d) {
    float total = 0.0f;
    for (int64_t i = 0; i < d; ++i) total += a[i] * b[i];
    return total;
}

float dot_f32(const float* a, const float* b, int64_t d) {
    return has_avx2() ? dot_f32_avx2(a, b, d) : dot_f32_scalar(a, b, d);
}

// The k largest values seen, as a min-heap: front() is the k-th largest once full.
class KBest {
  public:
    explicit KBest(int64_t k) : k_(static_cast<size_t>(k)) { heap_.reserve(k_ + 1); }
    float floor() const { return heap_.size() < k_ ? kNegInf : heap_.front(); }
    void push(float v) {
        if (heap_.size() < k_) {
            heap_.push_back(v);
            std::push_heap(heap_.begin(), heap_.end(), std::greater<>());
        } else if (v > heap_.front()) {
            std::pop_heap(heap_.begin(), heap_.end(), std::greater<>());
            heap_.back() = v;
            std::push_heap(heap_.begin(), heap_.end(), std::greater<>());
        }
    }
    const std::vector<float>& values() const { return heap_; }

  private:
    size_t k_;
    std::vector<float> heap_;
};

struct Screen {           // one thread's view of one query
    explicit Screen(int64_t k) : lower(k) {}
    KBest lower;          // k best lower bounds
    std::vector<std::pair<float, int64_t>> maybe;   // (upper bound, row) of rows that may be in the top-k
};

struct Scored {
    float score;
    int64_t row;
    bool operator<(const Scored& o) const { return score > o.score || (score == o.score && row < o.row); }
};

void write_top(std::vector<Scored>& scored, int64_t k, int64_t* rows, float* scores) {
    const size_t keep = std::min<size_t>(scored.size(), static_cast<size_t>(k));
    std::partial_sort(scored.begin(), scored.begin() + keep, scored.end());
    for (int64_t j = 0; j < k; ++j) {
        const bool have = static_cast<size_t>(j) < keep;
        rows[j] = have ? scored[j].row : -1;
        scores[j] = have ? scored[j].score : kNegInf;
    }
}

int thread_count(int64_t work) {
    return work >= kParallelWork ? omp_get_max_threads() : 1;
}

}  // namespace

int64_t cosine_topk_int8(const float* rows, const int8_t* codes, const float* scales, const float* errs,
                         const int32_t* parts, int64_t n, int64_t d, const float* queries,
                         const int32_t* query_parts, int64_t m, int64_t k, int64_t* out_rows,
                         float* out_scores) {
    // quantize the queries like the rows
    std::vector<int8_t> qcodes(static_cast<size_t>(m * d));
    std::vector<float> qscale(m), qerr(m);
    for (int64_t j = 0; j < m; ++j) {
        const float* q = queries + j * d;
        float amax = 0.0f;
        for (int64_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(q[i]));
        const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
        double err2 = 0.0;
        for (int64_t i = 0; i < d; ++i) {
            const float c = std::nearbyint(std::clamp(q[i] / s, -127.0f, 127.0f));
            qcodes[j * d + i] = static_cast<int8_t>(c);
            err2 += double(q[i] - s * c) * double(q[i] - s * c);
        }
        qscale[j] = s;
        qerr[j] = static_cast<float>(std::sqrt(err2)) * 1.0001f;   // rounding slack: a bound must hold
    }
    const auto dot_i8 = has_avx2() ? dot_i8_avx2 : dot_i8_scalar;
    const int threads = thread_count(n * d * m);
    std::vector<std::vector<Screen>> screens(threads, std::vector<Screen>(m, Screen(k)));

#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        std::vector<Screen>& mine = screens[t];
        const int64_t begin = n * t / nt, end = n * (t + 1) / nt;
        for (int64_t b0 = begin; b0 < end; b0 += kBlockRows) {
            const int64_t b1 = std::min(end, b0 + kBlockRows);
            for (int64_t j = 0; j < m; ++j) {
                Screen& sc = mine[j];
                const int8_t* qc = qcodes.data() + j * d;
                for (int64_t r = b0; r < b1; ++r) {
                    if (parts[r] != query_parts[j]) continue;
                    const float approx = qscale[j] * scales[r] * static_cast<float>(dot_i8(qc, codes + r * d, d));
                    const float slack = int8_score_bound(qerr[j], errs[r]) + kRoundingSlack;
                    if (approx + slack < sc.lower.floor()) continue;
                    sc.maybe.emplace_back(approx + slack, r);
                    sc.lower.push(approx - slack);
                }
            }
        }
    }

    int64_t rescored = 0;
    for (int64_t j = 0; j < m; ++j) {
        KBest lower(k);   // the k best lower bounds over all threads: nothing under them can be in the top-k
        for (int t = 0; t < threads; ++t)
            for (float v : screens[t][j].lower.values()) lower.push(v);
        const float cut = lower.floor();
        std::vector<Scored> scored;
        for (int t = 0; t < threads; ++t)
            for (const auto& [upper, r] : screens[t][j].maybe)
                if (upper >= cut) scored.push_back({dot_f32(queries + j * d, rows + r * d, d), r});
        rescored += static_cast<int64_t>(scored.size());
        write_top(scored, k, out_rows + j * k, out_scores + j * k);
    }
    return rescored;
}

void cosine_topk_f32(const float* rows, const int32_t* parts, int64_t n, int64_t d, const float* queries,
                     const int32_t* query_parts, int64_t m, int64_t k, int64_t* out_rows, float* out_scores) {
    const int threads = thread_count(n * d * m);
    std::vector<std::vector<std::vector<Scored>>> best(threads, std::vector<std::vector<Scored>>(m));

#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t begin = n * t / nt, end = n * (t + 1) / nt;
        for (int64_t b0 = begin; b0 < end; b0 += kBlockRows) {
            const int64_t b1 = std::min(end, b0 + kBlockRows);
            for (int64_t j = 0; j < m; ++j) {
                std::vector<Scored>& heap = best[t][j];   // worst of the k best at front (std heap with <)
                for (int64_t r = b0; r < b1; ++r) {
                    if (parts[r] != query_parts[j]) continue;
                    const Scored s{dot_f32(queries + j * d, rows + r * d, d), r};
                    if (static_cast<int64_t>(heap.size()) < k) {
                        heap.push_back(s);
                        std::push_heap(heap.begin(), heap.end());
                    } else if (s < heap.front()) {
                        std::pop_heap(heap.begin(), heap.end());
                        heap.back() = s;
                        std::push_heap(heap.begin(), heap.end());
                    }
                }
            }
        }
    }
    for (int64_t j = 0; j < m; ++j) {
        std::vector<Scored> all;
        for (int t = 0; t < threads; ++t) all.insert(all.end(), best[t][j].begin(), best[t][j].end());
        write_top(all, k, out_rows + j * k, out_scores + j * k);
    }
}

}  // namespace strata::cpu
