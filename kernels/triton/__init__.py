"""Triton versions of the layer kernels, for GPUs (they also run on CPU tensors under TRITON_INTERPRET=1,
which is how the tests check them on a machine without a GPU). Same semantics as kernels.reference;
Triton is optional (`pip install '.[triton]'`)."""

from kernels.triton.layers import (add_rms_norm_, paged_attention, paged_attention_decode, paged_attention_rows,
                                   rotary_, silu_and_mul)

__all__ = ["add_rms_norm_", "paged_attention", "paged_attention_decode", "paged_attention_rows", "rotary_",
           "silu_and_mul"]
