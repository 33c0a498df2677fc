// Quantized decoder layers in one call (see layer_stack.h): the same kernels the Python forward calls, in the
// same order, with scratch buffers reused across layers.
#include "layer_stack.h"

#include <cstring>

#include "gguf_gemv.h"
#include "int8_gemv.h"
#include "layer_ops.h"
#include "paged_attention.h"

namespace strata::cpu {
namespace {

void project(const Projection& p, const float* x, int64_t m, int64_t n, int64_t k, float* y) {
    switch (p.kind) {
        case Projection::kInt8: int8_linear(x, static_cast<const int8_t*>(p.w), p.scale, m, n, k, y); return;
        case Projection::kQ4_1:
        case Projection::kQ8_0:
        case Projection::kQ5_0:
        case Projection::kQ4_K:
        case Projection::kQ6_K: {
            const BlockType type = static_cast<BlockType>(p.kind - 1);      // the kinds follow BlockType's order
            const BlockMatrix w{type, static_cast<const uint8_t*>(p.w), p.d, p.m, n, k, p.qh, p.sc};
            gguf_gemv(w, x, m, y);
            return;
        }
    }
}

}  // namespace

void layer_stack(const StackShape& shape, const std::vector<StackLayer>& layers, int64_t rows,
                 const std::vector<StepLayout>& groups, const std::vector<Rope>& ropes, float* h) {
    const int64_t t = rows, hidden = shape.hidden, d = shape.head_dim;
    const int64_t q_size = shape.heads * d, kv_size = shape.kv_heads * d, qkv_width = q_size + 2 * kv_size;
    std::vector<float> x(t * hidden), qkv(t * qkv_width), q(t * q_size), attn(t * q_size), o(t * hidden),
        gate_up(t * 2 * shape.inter), act(t * shape.inter), pending(t * hidden);
    bool have_pending = false;                  // the MLP output not yet added to h
    for (const StackLayer& layer : layers) {
        const StepLayout& step = groups[layer.group];
        const Rope& rope = ropes[layer.rope];
        add_rms_norm(h, have_pending ? pending.data() : nullptr, layer.attn_norm, t, hidden, shape.eps, x.data());
        project(layer.qkv, x.data(), t, qkv_width, hidden, qkv.data());
        if (layer.qkv_bias != nullptr)
            for (int64_t r = 0; r < t; ++r)
                for (int64_t i = 0; i < qkv_width; ++i) qkv[r * qkv_width + i] += layer.qkv_bias[i];
        if (layer.q_norm != nullptr)            // each Q and K head normalized in place, before RoPE
            for (int64_t r = 0; r < t; ++r) {
                float* row = qkv.data() + r * qkv_width;
                add_rms_norm(row, nullptr, layer.q_norm, shape.heads, d, shape.eps, row);
                add_rms_norm(row + q_size, nullptr, layer.k_norm, shape.kv_heads, d, shape.eps, row + q_size);
            }
        rotary_inplace(qkv.data(), t, qkv_width, shape.heads + shape.kv_heads, d, rope.cos, rope.sin);
        reshape_and_cache(qkv.data() + q_size, qkv.data() + q_size + kv_size, qkv_width, qkv_width, step.slot_mapping,
                          t, shape.kv_heads, d, shape.num_slots, sizeof(float), layer.k_pool, layer.v_pool);
        for (int64_t r = 0; r < t; ++r)
            std::memcpy(q.data() + r * q_size, qkv.data() + r * qkv_width, sizeof(float) * q_size);
        paged_attention(q.data(), layer.k_pool, layer.v_pool, false, step.block_table, step.context_lens,
                        step.query_start, step.num_seqs, shape.heads, shape.kv_heads, d, shape.num_slots,
                        shape.block_size, step.max_blocks, shape.scale, attn.data(), layer.window);
        project(layer.o, attn.data(), t, hidden, q_size, o.data());
        if (layer.post_attn_norm != nullptr)
            add_rms_norm(o.data(), nullptr, layer.post_attn_norm, t, hidden, shape.eps, o.data());
        add_rms_norm(h, o.data(), layer.ffn_norm, t, hidden, shape.eps, x.data());
        project(layer.gate_up, x.data(), t, 2 * shape.inter, hidden, gate_up.data());
        if (shape.act == Activation::kGeluTanh) gelu_tanh_and_mul(gate_up.data(), t, shape.inter, act.data());
        else silu_and_mul(gate_up.data(), t, shape.inter, act.data());
        project(layer.down, act.data(), t, hidden, shape.inter, pending.data());
        if (layer.post_ffn_norm != nullptr)
            add_rms_norm(pending.data(), nullptr, layer.post_ffn_norm, t, hidden, shape.eps, pending.data());
        have_pending = true;
    }
    if (have_pending)
        for (int64_t i = 0; i < t * hidden; ++i) h[i] += pending[i];
}

}  // namespace strata::cpu
