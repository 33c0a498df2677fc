// The decoder layers of a Llama model with quantized projections (int8 W8A8, or a GGUF file's Q4_1 /
// Q8_0 / Q5_0 blocks), run for a step of a few rows in one call: no Python between the kernels of a layer or between layers (a single-stream decode step is ~10
// kernel calls × 30 layers, each of which otherwise pays a Python wrapper's checks).
#pragma once

#include <cstdint>
#include <vector>

namespace strata::cpu {

// A projection W [N, K] (one row per output channel) in one of the quantized formats.
struct Projection {
    enum Kind : int { kInt8 = 0, kQ4_1 = 1, kQ8_0 = 2, kQ5_0 = 3, kQ4_K = 4, kQ6_K = 5 } kind;
    const void* w;           // kInt8: int8 codes [N, K]; the GGUF kinds: the blocks' qs (gguf_gemv.h)
    const float* scale;      // kInt8: float32 [N]
    const uint16_t* d;       // the GGUF kinds: block scales (fp16 bits; gguf_gemv.h)
    const uint16_t* m;       // kQ4_1: block offsets; kQ4_K: super-block mins
    const uint8_t* qh;       // kQ5_0: the fifth bits; kQ6_K: the high bits
    const uint8_t* sc;       // kQ4_K: the blocks' scales and mins; kQ6_K: their scales
};

// One layer: RMSNorm weights float32 [hidden]; projections qkv [H*D + 2*KVH*D, hidden] (Q, K, V rows),
// o [hidden, H*D], gate_up [2*inter, hidden] (gate rows, then up rows), down [hidden, inter]; its float32
// K/V pools [KVH, num_slots, head_dim]. What only some architectures have is null where absent: a QKV bias
// (qwen2), RMSNorm weights over each Q and K head [head_dim] (qwen3, gemma3), norms of the attention and MLP
// outputs before their residual adds [hidden] (gemma3). A layer reads its group's step layout (layer groups
// of a sliding-window model: engine/kv_layout.py), one of the rotary tables, and attends its last `window`
// positions (0: all).
struct StackLayer {
    const float* attn_norm;
    const float* ffn_norm;
    Projection qkv, o, gate_up, down;
    float* k_pool;
    float* v_pool;
    const float* qkv_bias = nullptr;
    const float* q_norm = nullptr;
    const float* k_norm = nullptr;
    const float* post_attn_norm = nullptr;
    const float* post_ffn_norm = nullptr;
    int64_t group = 0;
    int64_t rope = 0;
    int64_t window = 0;
};

enum class Activation : int { kSilu = 0, kGeluTanh = 1 };

struct StackShape {
    int64_t hidden, heads, kv_heads, head_dim, inter, num_slots, block_size;
    float eps, scale;
    Activation act = Activation::kSilu;
};

// One step's attention layout over one layer group's block tables (kernels.PagedAttention's arrays).
struct StepLayout {
    const int64_t* slot_mapping;     // [T]
    const int64_t* block_table;      // [S, max_blocks]
    const int64_t* context_lens;     // [S]
    const int64_t* query_start;      // [S + 1]
    int64_t num_seqs, max_blocks;
};

// A rotary table for the step's rows: cos, sin [T, head_dim / 2].
struct Rope {
    const float* cos;
    const float* sin;
};

// h [T, hidden] float32: the embeddings in, the last layer's residual stream out (before the final norm),
// exactly as the model's _forward_fused computes it with the same kernels one call at a time (Gemma's GELU
// excepted: torch's there, ours here, a few ulps apart).
void layer_stack(const StackShape& shape, const std::vector<StackLayer>& layers, int64_t rows,
                 const std::vector<StepLayout>& groups, const std::vector<Rope>& ropes, float* h);

}  // namespace strata::cpu
