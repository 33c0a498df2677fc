// pybind11 bindings of the CUDA module (_cuda): raw device pointers, explicit sizes, a stream handle.
// A failed launch raises RuntimeError with CUDA's message.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check(int code, const char* what) {
    if (code != 0) throw std::runtime_error(std::string(what) + ": " + strata::cuda::error_string(code));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "Strata's CUDA kernels (pybind11 over raw device pointers; call them through the kernels package)";
    m.def("device_count", &strata::cuda::device_count);
    m.def("add_rms_norm", [](uintptr_t residual, uintptr_t delta, uintptr_t weight, int64_t rows, int64_t hidden,
                             float eps, uintptr_t out, uintptr_t stream) {
        check(strata::cuda::add_rms_norm(ptr<float>(residual), ptr<const float>(delta), ptr<const float>(weight), rows,
                                         hidden, eps, ptr<float>(out), stream_of(stream)), "add_rms_norm");
    });
    m.def("rotary_inplace", [](uintptr_t x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
                               uintptr_t cos, uintptr_t sin, uintptr_t stream) {
        check(strata::cuda::rotary_inplace(ptr<float>(x), rows, row_stride, heads, head_dim, ptr<const float>(cos),
                                           ptr<const float>(sin), stream_of(stream)), "rotary_inplace");
    });
    m.def("silu_and_mul", [](uintptr_t gate_up, int64_t rows, int64_t inner, uintptr_t out, uintptr_t stream) {
        check(strata::cuda::silu_and_mul(ptr<const float>(gate_up), rows, inner, ptr<float>(out), stream_of(stream)),
              "silu_and_mul");
    });
    m.def("paged_attention",
          [](uintptr_t q, uintptr_t k_pool, uintptr_t v_pool, uintptr_t block_table, uintptr_t row_seq,
             uintptr_t row_len, int64_t rows, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t num_slots,
             int64_t block_size, int64_t max_blocks, int64_t max_context, float scale, uintptr_t out,
             uintptr_t workspace, int64_t workspace_floats, uintptr_t stream) {
              check(strata::cuda::paged_attention(
                        ptr<const float>(q), ptr<const float>(k_pool), ptr<const float>(v_pool),
                        ptr<const int64_t>(block_table), ptr<const int64_t>(row_seq), ptr<const int64_t>(row_len),
                        rows, num_heads, num_kv_heads, head_dim, num_slots, block_size, max_blocks, max_context, scale,
                        ptr<float>(out), ptr<float>(workspace), workspace_floats, stream_of(stream)),
                    "paged_attention");
          });
    m.def("paged_attention_workspace_floats", &strata::cuda::paged_attention_workspace_floats,
          "floats of workspace paged_attention needs for these sizes (0: none)");
    m.def("paged_attention_fast", &strata::cuda::paged_attention_fast,
          "whether these sizes run the split-K kernel (given 16-byte aligned tensors)");
    m.def("reshape_and_cache", [](uintptr_t k, uintptr_t v, int64_t k_stride, int64_t v_stride, uintptr_t slot_mapping,
                                  int64_t rows, int64_t kv_heads, int64_t head_dim, int64_t num_slots,
                                  int64_t elem_bytes, uintptr_t k_pool, uintptr_t v_pool, uintptr_t stream) {
        check(strata::cuda::reshape_and_cache(ptr<const void>(k), ptr<const void>(v), k_stride, v_stride,
                                              ptr<const int64_t>(slot_mapping), rows, kv_heads, head_dim, num_slots,
                                              elem_bytes, ptr<void>(k_pool), ptr<void>(v_pool), stream_of(stream)),
              "reshape_and_cache");
    });
}
