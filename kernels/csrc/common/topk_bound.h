// Bounds shared by every implementation of the int8-screened exact cosine top-k (CPU now, CUDA later).
//
// A row v (unit length) is stored as int8 codes c with a scale s and the norm of what the codes miss,
// r = ||v - s*c||. The query q (unit length) is quantized the same way: q = s_q*c_q + e_q. Then
//   |q.v - s_q*s*(c_q.c)| <= ||e_q||*(1 + r) + r
// (Cauchy-Schwarz on both error terms, with ||s*c|| <= 1 + r). A row whose approximate score plus this
// bound is below the k-th best approximate score minus its own bound can never be in the exact top-k,
// so only the few rows that could be are re-scored in float32: the result is the exact top-k.
#pragma once

#include "hd.h"

namespace strata {

STRATA_HD float int8_score_bound(float query_err, float row_err) {
    return query_err * (1.0f + row_err) + row_err;
}

}  // namespace strata
