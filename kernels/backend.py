"""Which implementation each kernel family runs, decided in one place.

    cpp        the compiled CPU module (_C: AVX2/AVX-512 + OpenMP), for CPU tensors
    cuda       the compiled CUDA module (_cuda, where nvcc was found at install time), float32 on a GPU
    triton     kernels.triton on a GPU without the CUDA module, or with STRATA_KERNELS=triton
    reference  the pure-torch semantics (kernels.reference): other dtypes and devices, kernels not built, or
               STRATA_KERNELS=reference

A model decides once, with `select`, when it is bound to its KV pools, and passes the names it got to every
call (`backend=`). Called without one, a kernel asks the same functions about its own tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._loader import available, cuda_module, triton_module

CPP, CUDA, TRITON, REFERENCE = "cpp", "cuda", "triton", "reference"
KV_DTYPES = (torch.float32, torch.bfloat16)
# The most rows a decode kernel takes: the quantized GEMVs (kernels.Int8Matrix, kernels.GGUFMatrix), the layer
# stack (kernels.LayerStack), and the chunks a model sends through paged attention with the decodes.
MAX_DECODE_ROWS = 16


@dataclass(frozen=True, slots=True)
class KernelBackends:
    """Where each kernel family runs for one model's tensors."""
    rows: str         # residual-add + RMSNorm, rotary, SiLU-and-mul (float32 activations)
    attention: str    # paged attention over the KV pools
    cache: str        # reshape-and-cache into the KV pools


def rows_backend(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The row kernels' implementation for activations of `dtype` on `device` (they are float32 kernels)."""
    if dtype != torch.float32:
        return REFERENCE
    if device.type == "cpu":
        return CPP if available() else REFERENCE
    if device.type == "cuda":
        if cuda_module() is not None:
            return CUDA
        if triton_module() is not None:
            return TRITON
    return REFERENCE


def triton_takes(head_dim: int, block_size: int) -> bool:
    """The Triton paged-attention kernel's shapes: power-of-two head dims and block sizes (its tiles)."""
    return all(n > 0 and n & (n - 1) == 0 for n in (head_dim, block_size))


def attention_backend(device: torch.device, kv_dtype: torch.dtype, q_dtype: torch.dtype, head_dim: int,
                      block_size: int) -> str:
    """Paged attention's implementation: the C++ kernel on CPU (float32 or bfloat16 pools, any query dtype),
    on a GPU the CUDA kernel, else Triton where its tiles fit (float32 only)."""
    if device.type == "cpu":
        return CPP if available() and kv_dtype in KV_DTYPES else REFERENCE
    if device.type == "cuda" and kv_dtype == torch.float32 and q_dtype == torch.float32:
        if cuda_module() is not None:
            return CUDA
        if triton_module() is not None and triton_takes(head_dim, block_size):
            return TRITON
    return REFERENCE


def cache_backend(device: torch.device, kv_dtype: torch.dtype) -> str:
    """Reshape-and-cache's implementation (C++ or CUDA; Triton has none: the reference's index_copy_ runs)."""
    if kv_dtype not in KV_DTYPES:
        return REFERENCE
    if device.type == "cpu":
        return CPP if available() else REFERENCE
    return CUDA if device.type == "cuda" and cuda_module() is not None else REFERENCE


def select(device: torch.device, act_dtype: torch.dtype, kv_dtype: torch.dtype, head_dim: int,
           block_size: int) -> KernelBackends:
    """Every family's implementation for a model computing in `act_dtype` on `device` over KV pools of
    `kv_dtype` (its queries are `act_dtype` too)."""
    return KernelBackends(rows=rows_backend(device, act_dtype),
                          attention=attention_backend(device, kv_dtype, act_dtype, head_dim, block_size),
                          cache=cache_backend(device, kv_dtype))
