// pybind11 bindings: raw pointers and explicit sizes only. kernels/*.py validate and allocate.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>
#include <string>

#include "cpu/cosine_topk.h"
#include "cpu/gguf_gemv.h"
#include "cpu/int8_gemv.h"
#include "cpu/layer_ops.h"
#include "cpu/layer_stack.h"
#include "cpu/paged_attention.h"
#include "cpu/simd.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

void check_block_type(int block_type) {
    if (block_type < 0 || block_type > 4)
        throw py::value_error("block type must be 0 (Q4_1), 1 (Q8_0), 2 (Q5_0), 3 (Q4_K) or 4 (Q6_K)");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "Strata's CPU kernels (pybind11 over raw pointers; call them through the kernels package)";
    // instruction-set levels: 0 scalar, 1 AVX2, 2 AVX-VNNI, 3 AVX512-VNNI (csrc/cpu/simd.h)
    m.def("active_isa", [] { return static_cast<int>(strata::cpu::active_isa()); }, "the level the kernels run at");
    m.def("set_isa_cap", [](int level) {
        if (level < 0 || level > 3)
            throw py::value_error("isa level must be 0 (scalar), 1 (avx2), 2 (avxvnni) or 3 (avx512vnni)");
        strata::cpu::set_isa_cap(static_cast<strata::cpu::Isa>(level));
    });
    // quantized decoder layers, one call per step: the layers' pointers are bound once (kernels.LayerStack)
    py::class_<strata::cpu::Projection>(m, "Projection")
        .def(py::init([](int kind, uintptr_t w, uintptr_t scale, uintptr_t d, uintptr_t m, uintptr_t qh, uintptr_t sc) {
            if (kind < 0 || kind > 5)
                throw py::value_error("projection kind must be 0 (int8), 1 (Q4_1), 2 (Q8_0), 3 (Q5_0), 4 (Q4_K) or 5 (Q6_K)");
            return strata::cpu::Projection{static_cast<strata::cpu::Projection::Kind>(kind), ptr<const void>(w),
                                           ptr<const float>(scale), ptr<const uint16_t>(d), ptr<const uint16_t>(m),
                                           ptr<const uint8_t>(qh), ptr<const uint8_t>(sc)};
        }));
    py::class_<strata::cpu::StackLayer>(m, "StackLayer")
        .def(py::init([](uintptr_t attn_norm, uintptr_t ffn_norm, const strata::cpu::Projection& qkv,
                         const strata::cpu::Projection& o, const strata::cpu::Projection& gate_up,
                         const strata::cpu::Projection& down, uintptr_t k_pool, uintptr_t v_pool, uintptr_t qkv_bias,
                         uintptr_t q_norm, uintptr_t k_norm, uintptr_t post_attn_norm, uintptr_t post_ffn_norm,
                         int64_t group, int64_t rope, int64_t window) {
            return strata::cpu::StackLayer{ptr<const float>(attn_norm), ptr<const float>(ffn_norm), qkv, o, gate_up, down,
                                           ptr<float>(k_pool), ptr<float>(v_pool), ptr<const float>(qkv_bias),
                                           ptr<const float>(q_norm), ptr<const float>(k_norm),
                                           ptr<const float>(post_attn_norm), ptr<const float>(post_ffn_norm), group,
                                           rope, window};
        }));
    struct Stack {
        strata::cpu::StackShape shape;
        std::vector<strata::cpu::StackLayer> layers;
        int64_t num_groups, num_ropes;
    };
    py::class_<Stack>(m, "LayerStack")
        .def(py::init([](std::vector<strata::cpu::StackLayer> layers, int64_t hidden, int64_t heads, int64_t kv_heads,
                         int64_t head_dim, int64_t inter, int64_t num_slots, int64_t block_size, float eps, float scale,
                         int act) {
            if (act < 0 || act > 1) throw py::value_error("act must be 0 (SiLU) or 1 (GELU-tanh)");
            int64_t groups = 0, ropes = 0;
            for (const auto& layer : layers) {
                if (layer.group < 0 || layer.rope < 0 || layer.window < 0)
                    throw py::value_error("a layer's group, rope and window must be >= 0");
                groups = std::max(groups, layer.group + 1);
                ropes = std::max(ropes, layer.rope + 1);
            }
            return Stack{{hidden, heads, kv_heads, head_dim, inter, num_slots, block_size, eps, scale,
                          static_cast<strata::cpu::Activation>(act)},
                         std::move(layers), groups, ropes};
        }))
        // ropes: (cos, sin) per rotary table; groups: (slot_mapping, block_table, context_lens, query_start,
        // num_seqs, max_blocks) per layer group
        .def("run", [](const Stack& stack, uintptr_t h, int64_t rows,
                       const std::vector<std::pair<uintptr_t, uintptr_t>>& ropes,
                       const std::vector<std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t, int64_t, int64_t>>& groups) {
            if (static_cast<int64_t>(groups.size()) < stack.num_groups || static_cast<int64_t>(ropes.size()) < stack.num_ropes)
                throw py::value_error("a step layout per layer group and a rotary table per rope are needed");
            std::vector<strata::cpu::Rope> rope_tables;
            for (const auto& [cos, sin] : ropes) rope_tables.push_back({ptr<const float>(cos), ptr<const float>(sin)});
            std::vector<strata::cpu::StepLayout> steps;
            for (const auto& [slots, table, ctx, starts, seqs, max_blocks] : groups)
                steps.push_back({ptr<const int64_t>(slots), ptr<const int64_t>(table), ptr<const int64_t>(ctx),
                                 ptr<const int64_t>(starts), seqs, max_blocks});
            py::gil_scoped_release release;
            strata::cpu::layer_stack(stack.shape, stack.layers, rows, steps, rope_tables, ptr<float>(h));
        });
    m.def(
        "cosine_topk_int8",
        [](uintptr_t rows, uintptr_t codes, uintptr_t scales, uintptr_t errs, uintptr_t parts, int64_t n, int64_t d,
           uintptr_t queries, uintptr_t query_parts, int64_t m, int64_t k, uintptr_t out_rows, uintptr_t out_scores) {
            py::gil_scoped_release release;
            return strata::cpu::cosine_topk_int8(ptr<const float>(rows), ptr<const int8_t>(codes),
                                                 ptr<const float>(scales), ptr<const float>(errs),
                                                 ptr<const int32_t>(parts), n, d, ptr<const float>(queries),
                                                 ptr<const int32_t>(query_parts), m, k, ptr<int64_t>(out_rows),
                                                 ptr<float>(out_scores));
        });
    m.def(
        "cosine_topk_f32",
        [](uintptr_t rows, uintptr_t parts, int64_t n, int64_t d, uintptr_t queries, uintptr_t query_parts, int64_t m,
           int64_t k, uintptr_t out_rows, uintptr_t out_scores) {
            py::gil_scoped_release release;
            strata::cpu::cosine_topk_f32(ptr<const float>(rows), ptr<const int32_t>(parts), n, d,
                                         ptr<const float>(queries), ptr<const int32_t>(query_parts), m, k,
                                         ptr<int64_t>(out_rows), ptr<float>(out_scores));
        });
    m.def(
        "paged_attention",
        [](uintptr_t q, uintptr_t k_pool, uintptr_t v_pool, bool bf16_kv, uintptr_t block_table, uintptr_t context_lens,
           uintptr_t query_start, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
           int64_t num_slots, int64_t block_size, int64_t max_blocks, float scale, uintptr_t out, int64_t window) {
            py::gil_scoped_release release;
            strata::cpu::paged_attention(ptr<const float>(q), ptr<const void>(k_pool), ptr<const void>(v_pool), bf16_kv,
                                         ptr<const int64_t>(block_table), ptr<const int64_t>(context_lens),
                                         ptr<const int64_t>(query_start), num_seqs, num_heads, num_kv_heads, head_dim,
                                         num_slots, block_size, max_blocks, scale, ptr<float>(out), window);
        },
        py::arg("q"), py::arg("k_pool"), py::arg("v_pool"), py::arg("bf16_kv"), py::arg("block_table"),
        py::arg("context_lens"), py::arg("query_start"), py::arg("num_seqs"), py::arg("num_heads"),
        py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("num_slots"), py::arg("block_size"),
        py::arg("max_blocks"), py::arg("scale"), py::arg("out"), py::arg("window") = 0);
    m.def(
        "gguf_gemv",
        [](int block_type, uintptr_t qs, uintptr_t d, uintptr_t m_offsets, int64_t n, int64_t k, uintptr_t x, int64_t m,
           uintptr_t y, uintptr_t qh, uintptr_t sc) {
            check_block_type(block_type);
            py::gil_scoped_release release;
            const strata::cpu::BlockMatrix w{static_cast<strata::cpu::BlockType>(block_type), ptr<const uint8_t>(qs),
                                             ptr<const uint16_t>(d), ptr<const uint16_t>(m_offsets), n, k,
                                             ptr<const uint8_t>(qh), ptr<const uint8_t>(sc)};
            strata::cpu::gguf_gemv(w, ptr<const float>(x), m, ptr<float>(y));
        });
    m.def(
        "gguf_dequantize_rows",   // a few rows, microseconds: the GIL is kept (handing it over would let the
                                  // event loop hold it for a whole switch interval)
        [](int block_type, uintptr_t qs, uintptr_t d, uintptr_t m_offsets, int64_t n, int64_t k, uintptr_t ids,
           int64_t count, uintptr_t out, uintptr_t qh, uintptr_t sc) {
            check_block_type(block_type);
            const int64_t* rows = ptr<const int64_t>(ids);
            for (int64_t r = 0; r < count; ++r)
                if (rows[r] < 0 || rows[r] >= n) throw py::index_error("row ids must be in [0, " + std::to_string(n) + ")");
            const strata::cpu::BlockMatrix w{static_cast<strata::cpu::BlockType>(block_type), ptr<const uint8_t>(qs),
                                             ptr<const uint16_t>(d), ptr<const uint16_t>(m_offsets), n, k,
                                             ptr<const uint8_t>(qh), ptr<const uint8_t>(sc)};
            strata::cpu::gguf_dequantize_rows(w, rows, count, ptr<float>(out));
        });
    m.def(
        "int8_gemv",
        [](uintptr_t xq, uintptr_t x_scale, uintptr_t wq, uintptr_t w_scale, int64_t m, int64_t n, int64_t k,
           uintptr_t y) {
            py::gil_scoped_release release;
            strata::cpu::int8_gemv(ptr<const int8_t>(xq), ptr<const float>(x_scale), ptr<const int8_t>(wq),
                                   ptr<const float>(w_scale), m, n, k, ptr<float>(y));
        });
    m.def("int8_linear", [](uintptr_t x, uintptr_t wq, uintptr_t w_scale, int64_t m, int64_t n, int64_t k, uintptr_t y) {
        py::gil_scoped_release release;
        strata::cpu::int8_linear(ptr<const float>(x), ptr<const int8_t>(wq), ptr<const float>(w_scale), m, n, k,
                                 ptr<float>(y));
    });
    m.def("int8_weight_gemv",
          [](uintptr_t x, uintptr_t wq, uintptr_t w_scale, int64_t m, int64_t n, int64_t k, uintptr_t y) {
              py::gil_scoped_release release;
              strata::cpu::int8_weight_gemv(ptr<const float>(x), ptr<const int8_t>(wq), ptr<const float>(w_scale), m,
                                            n, k, ptr<float>(y));
          });
    m.def("add_rms_norm", [](uintptr_t residual, uintptr_t delta, uintptr_t weight, int64_t rows, int64_t hidden,
                             float eps, uintptr_t out) {
        py::gil_scoped_release release;
        strata::cpu::add_rms_norm(ptr<float>(residual), ptr<const float>(delta), ptr<const float>(weight), rows, hidden,
                                  eps, ptr<float>(out));
    });
    m.def("rotary_inplace", [](uintptr_t x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
                               uintptr_t cos, uintptr_t sin) {
        py::gil_scoped_release release;
        strata::cpu::rotary_inplace(ptr<float>(x), rows, row_stride, heads, head_dim, ptr<const float>(cos),
                                    ptr<const float>(sin));
    });
    m.def("silu_and_mul", [](uintptr_t gate_up, int64_t rows, int64_t inner, uintptr_t out) {
        py::gil_scoped_release release;
        strata::cpu::silu_and_mul(ptr<const float>(gate_up), rows, inner, ptr<float>(out));
    });
    m.def("gelu_tanh_and_mul", [](uintptr_t gate_up, int64_t rows, int64_t inner, uintptr_t out) {
        py::gil_scoped_release release;
        strata::cpu::gelu_tanh_and_mul(ptr<const float>(gate_up), rows, inner, ptr<float>(out));
    });
    m.def("reshape_and_cache", [](uintptr_t k, uintptr_t v, int64_t k_stride, int64_t v_stride, uintptr_t slot_mapping,
                                  int64_t rows, int64_t kv_heads, int64_t head_dim, int64_t num_slots,
                                  int64_t elem_bytes, uintptr_t k_pool, uintptr_t v_pool) {
        py::gil_scoped_release release;
        strata::cpu::reshape_and_cache(ptr<const void>(k), ptr<const void>(v), k_stride, v_stride,
                                       ptr<const int64_t>(slot_mapping), rows, kv_heads, head_dim, num_slots,
                                       elem_bytes, ptr<void>(k_pool), ptr<void>(v_pool));
    });
}
