// pybind11 bindings: raw pointers and explicit sizes only. kernels/*.py validate and allocate.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/cosine_topk.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "Strata's CPU kernels (pybind11 over raw pointers; call them through the kernels package)";
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
}
