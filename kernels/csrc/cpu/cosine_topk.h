#pragma once
#include <cstdint>

namespace strata::cpu {

// Exact cosine top-k over the rows of one partition, screened with int8 codes (see topk_bound.h).
// rows: n x d float32 (unit rows), codes: n x d int8, scales/errs: n, parts: n partition codes.
// queries: m x d float32 (unit), query_parts: m. Writes out_rows/out_scores (m x k), best first;
// slots past the last match get row -1 and score -inf. Returns the number of rows re-scored exactly.
int64_t cosine_topk_int8(const float* rows, const int8_t* codes, const float* scales, const float* errs,
                         const int32_t* parts, int64_t n, int64_t d, const float* queries,
                         const int32_t* query_parts, int64_t m, int64_t k, int64_t* out_rows,
                         float* out_scores);

// Plain float32 exact top-k (no screening): the kernel the benchmark compares against.
void cosine_topk_f32(const float* rows, const int32_t* parts, int64_t n, int64_t d, const float* queries,
                     const int32_t* query_parts, int64_t m, int64_t k, int64_t* out_rows, float* out_scores);

}  // namespace strata::cpu
