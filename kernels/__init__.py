"""Strata's kernels. C++ (CPU) through pybind11 in the private `_C` module; each public function here
validates its inputs, allocates outputs and runs the implementation kernels.backend chose (a model chooses
once and passes it; a bare call chooses from its tensors). `kernels.reference` holds the pure-torch version of
every kernel (the tests' reference, and the path `STRATA_KERNELS=reference` forces)."""

from kernels.attention import PagedAttention, PagedDecode, paged_attention, paged_attention_decode, reshape_and_cache
from kernels.backend import MAX_DECODE_ROWS, KernelBackends
from kernels.layers import add_rms_norm_, gelu_tanh_and_mul, rotary_, silu_and_mul
from kernels.quantized import Int8Matrix, int8_gemv, int8_linear, int8_weight_gemv
from kernels.gguf import GGUFMatrix, gguf_gemv
from kernels.stack import LayerStack, StackLayerWeights
from kernels.topk import cosine_topk, cosine_topk_f32, quantize_rows_int8
from kernels._loader import ISA_LEVELS, available, cpu_isa, set_cpu_isa, use_reference

__all__ = ["ISA_LEVELS", "MAX_DECODE_ROWS", "GGUFMatrix", "Int8Matrix", "KernelBackends", "LayerStack", "StackLayerWeights",
           "PagedAttention", "PagedDecode", "add_rms_norm_", "available", "cosine_topk", "cosine_topk_f32", "cpu_isa",
           "gguf_gemv", "int8_gemv", "int8_linear", "int8_weight_gemv", "paged_attention", "paged_attention_decode",
           "quantize_rows_int8", "reshape_and_cache", "rotary_", "set_cpu_isa", "silu_and_mul", "gelu_tanh_and_mul", "use_reference"]
