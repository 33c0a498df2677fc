// Paged attention for decode on CPU: one query token per sequence over its KV blocks.
#pragma once

#include <cstdint>

namespace strata::cpu {

// q [B, H, D] float32; k_pool / v_pool [KVH, num_slots, D] (float32 or bfloat16 bits when bf16_kv);
// block_table [B, max_blocks] int64 (slot of position p = table[b][p / block_size] * block_size +
// p % block_size); context_lens [B] int64; out [B, H, D] float32. Query head h reads KV head
// h / (H / KVH) (grouped-query attention): each KV row is read once for all the heads that share it.
void paged_attention_decode(const float* q, const void* k_pool, const void* v_pool, bool bf16_kv,
                            const int64_t* block_table, const int64_t* context_lens, int64_t batch,
                            int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t num_slots,
                            int64_t block_size, int64_t max_blocks, float scale, float* out);

}  // namespace strata::cpu
