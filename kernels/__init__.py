"""Strata's kernels. C++ (CPU) through pybind11 in the private `_C` module; each public function here
validates its inputs, allocates outputs and dispatches by device. `kernels.reference` holds the pure-torch
version of every kernel (the tests' reference, and the path `STRATA_KERNELS=reference` forces)."""

from kernels.topk import cosine_topk, cosine_topk_f32, quantize_rows_int8
from kernels._loader import available, use_reference

__all__ = ["available", "cosine_topk", "cosine_topk_f32", "quantize_rows_int8", "use_reference"]
