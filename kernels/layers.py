"""Row-wise kernels of a Llama layer, float32 on CPU: fused residual-add + RMSNorm, and rotary embedding
applied in place to the query and key heads of a fused QKV projection. The torch reference runs for
other dtypes and devices, or when STRATA_KERNELS=reference."""

from __future__ import annotations

import torch

from kernels import reference
from kernels._loader import available, cpu_module


def _fast(*tensors: torch.Tensor) -> bool:
    return available() and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def add_rms_norm_(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual [T, H] += delta (in place; None = no add), then RMSNorm(residual) * weight → new [T, H]."""
    if residual.dim() != 2 or weight.shape != (residual.shape[1],):
        raise ValueError(f"residual must be [T, H] and weight [H], got {tuple(residual.shape)} and {tuple(weight.shape)}")
    if delta is not None and delta.shape != residual.shape:
        raise ValueError(f"delta must match residual {tuple(residual.shape)}, got {tuple(delta.shape)}")
    tensors = (residual, weight) if delta is None else (residual, weight, delta)
    if not _fast(*tensors) or not residual.is_contiguous():
        return reference.add_rms_norm_(residual, delta, weight, eps)
    delta = delta.contiguous() if delta is not None else None
    weight = weight.contiguous()
    out = torch.empty_like(residual)
    cpu_module().add_rms_norm(residual.data_ptr(), delta.data_ptr() if delta is not None else 0, weight.data_ptr(),
                              residual.shape[0], residual.shape[1], float(eps), out.data_ptr())
    return out


def rotary_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding, in place, on the first `heads` heads of each row of x [T, W ≥ heads *
    head_dim] (rows may be strided: a fused QKV output rotates its Q and K heads in one call); cos/sin
    [T, head_dim / 2]. Returns x."""
    if x.dim() != 2 or x.stride(1) != 1 or x.shape[1] < heads * head_dim or head_dim % 2:
        raise ValueError("x must be [T, W] with contiguous rows of at least heads * head_dim (even) values")
    t = x.shape[0]
    if cos.shape != (t, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must be [{t}, {head_dim // 2}]")
    if not _fast(x, cos, sin):
        return reference.rotary_(x, heads, head_dim, cos, sin)
    cos, sin = cos.contiguous(), sin.contiguous()
    cpu_module().rotary_inplace(x.data_ptr(), t, x.stride(0), heads, head_dim, cos.data_ptr(), sin.data_ptr())
    return x
