// Paged attention on CPU: decodes, prefill chunks and speculative verification runs of many sequences
// in one call, each reading its K/V in place through its block table.
#pragma once

#include <cstdint>

namespace strata::cpu {

// q [T, H, D] float32: sequence s owns rows query_start[s] .. query_start[s + 1] (query_start [S + 1],
// ascending, query_start[0] = 0); they are the last positions of its context, so row r of n sits at
// position context_lens[s] - n + r and attends positions 0 .. that one (causal). Requires
// n <= context_lens[s]. k_pool / v_pool [KVH, num_slots, D] (float32, or bfloat16 bits when bf16_kv);
// block_table [S, max_blocks] int64 (slot of position p = table[s][p / block_size] * block_size +
// p % block_size); out [T, H, D] float32. Query head h reads KV head h / (H / KVH) (grouped-query
// attention): each KV row is read once for all the heads and rows of a tile that share it. window > 0
// (sliding-window layers): the row at position P attends positions P - window + 1 .. P only, and blocks wholly
// before the first row's window are never read (their table entries may be any block id in the pool).
void paged_attention(const float* q, const void* k_pool, const void* v_pool, bool bf16_kv, const int64_t* block_table,
                     const int64_t* context_lens, const int64_t* query_start, int64_t num_seqs, int64_t num_heads,
                     int64_t num_kv_heads, int64_t head_dim, int64_t num_slots, int64_t block_size,
                     int64_t max_blocks, float scale, float* out, int64_t window = 0);

}  // namespace strata::cpu
