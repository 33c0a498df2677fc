// The decoder layers of a Llama model with quantized projections (int8 W8A8, or a GGUF file's Q4_1 /
// Q8_0 / Q5_0 blocks), run for a step of a few rows in one call: no Python between the kernels of a layer or between layers (a single-stream decode step is ~10
// kernel calls × 30 layers, each of which otherwise pays a Python wrapper's checks).
#pragma once

#include <cstdint>
#include <vector>

namespace strata::cpu {

// A projection W [N, K] (one row per output channel) in one of the quantized formats.
struct Projection {
    enum Kind : int { kInt8 = 0, kQ4_1 = 1, kQ8_0 = 2, kQ5_0 = 3 } kind;
    const void* w;           // kInt8: int8 codes [N, K]; kQ4_1 / kQ8_0 / kQ5_0: the blocks' qs (gguf_gemv.h)
    const float* scale;      // kInt8: float32 [N]
    const uint16_t* d;       // kQ4_1 / kQ8_0 / kQ5_0: block scales [N, nbp] (fp16 bits)
    const uint16_t* m;       // kQ4_1: block offsets [N, nbp]
    const uint8_t* qh;       // kQ5_0: the fifth bits [N, nbp * 4]
};

// One layer: RMSNorm weights float32 [hidden]; projections qkv [H*D + 2*KVH*D, hidden] (Q, K, V rows),
// o [hidden, H*D], gate_up [2*inter, hidden] (gate rows, then up rows), down [hidden, inter]; its float32
// K/V pools [KVH, num_slots, head_dim].
struct StackLayer {
    const float* attn_norm;
    const float* ffn_norm;
    Projection qkv, o, gate_up, down;
    float* k_pool;
    float* v_pool;
};

struct StackShape {
    int64_t hidden, heads, kv_heads, head_dim, inter, num_slots, block_size;
    float eps, scale;
};

// One step's attention layout (kernels.PagedAttention's arrays) and rotary tables.
struct StepLayout {
    int64_t rows;                    // T
    const float* cos;                // [T, head_dim / 2]
    const float* sin;
    const int64_t* slot_mapping;     // [T]
    const int64_t* block_table;      // [S, max_blocks]
    const int64_t* context_lens;     // [S]
    const int64_t* query_start;      // [S + 1]
    int64_t num_seqs, max_blocks;
};

// h [T, hidden] float32: the embeddings in, the last layer's residual stream out (before the final norm),
// exactly as LlamaModel._forward_fused computes it with the same kernels one call at a time.
void layer_stack(const StackShape& shape, const std::vector<StackLayer>& layers, const StepLayout& step, float* h);

}  // namespace strata::cpu
