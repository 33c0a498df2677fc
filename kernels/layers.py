"""Row-wise kernels of a Llama layer, float32, C++ on CPU and CUDA on a GPU (where the CUDA module was built;
Triton on a GPU without it, or with STRATA_KERNELS=triton): fused residual-add + RMSNorm, rotary embedding
applied in place to the query and key heads of a fused QKV projection, and SiLU-and-mul over a fused
gate/up projection. The torch reference runs for
other dtypes and devices, or when STRATA_KERNELS=reference."""

from __future__ import annotations

import torch

from kernels import reference
from kernels._loader import available, cpu_module, cuda_module, device_of, triton_module


def _fast(*tensors: torch.Tensor) -> bool:
    return available() and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def _cuda(*tensors: torch.Tensor):
    """The CUDA module when every tensor is float32 on one CUDA device and the module is built, else None."""
    mod = cuda_module()
    if mod is None or not all(t.dtype == torch.float32 and t.is_cuda for t in tensors):
        return None
    if len({t.device for t in tensors}) != 1:
        raise ValueError("all tensors must be on the same CUDA device")
    return mod


def _triton(*tensors: torch.Tensor):
    """kernels.triton when every tensor is float32 on a GPU and the CUDA module does not take them, else None."""
    if cuda_module() is not None or not all(t.dtype == torch.float32 and t.is_cuda for t in tensors):
        return None
    return triton_module()


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def add_rms_norm_(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual [T, H] += delta (in place; None = no add), then RMSNorm(residual) * weight → new [T, H]."""
    if residual.dim() != 2 or weight.shape != (residual.shape[1],):
        raise ValueError(f"residual must be [T, H] and weight [H], got {tuple(residual.shape)} and {tuple(weight.shape)}")
    if delta is not None and delta.shape != residual.shape:
        raise ValueError(f"delta must match residual {tuple(residual.shape)}, got {tuple(delta.shape)}")
    tensors = (residual, weight) if delta is None else (residual, weight, delta)
    tri = _triton(*tensors)
    if tri is not None and residual.is_contiguous():
        with device_of(residual):
            return tri.add_rms_norm_(residual, None if delta is None else delta.contiguous(), weight.contiguous(), eps)
    gpu = _cuda(*tensors)
    if (gpu is None and not _fast(*tensors)) or not residual.is_contiguous():
        return reference.add_rms_norm_(residual, delta, weight, eps)
    delta = delta.contiguous() if delta is not None else None
    weight = weight.contiguous()
    out = torch.empty_like(residual)
    args = (residual.data_ptr(), delta.data_ptr() if delta is not None else 0, weight.data_ptr(), residual.shape[0],
            residual.shape[1], float(eps), out.data_ptr())
    if gpu is not None:
        with device_of(residual):
            gpu.add_rms_norm(*args, _stream(residual))
    else:
        cpu_module().add_rms_norm(*args)
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
    tri = _triton(x, cos, sin)
    if tri is not None:
        with device_of(x):
            return tri.rotary_(x, heads, head_dim, cos, sin)
    gpu = _cuda(x, cos, sin)
    if gpu is None and not _fast(x, cos, sin):
        return reference.rotary_(x, heads, head_dim, cos, sin)
    cos, sin = cos.contiguous(), sin.contiguous()
    args = (x.data_ptr(), t, x.stride(0), heads, head_dim, cos.data_ptr(), sin.data_ptr())
    if gpu is not None:
        with device_of(x):
            gpu.rotary_inplace(*args, _stream(x))
    else:
        cpu_module().rotary_inplace(*args)
    return x


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate, then up) → silu(gate) * up [T, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2I], got {tuple(gate_up.shape)}")
    tri = _triton(gate_up)
    if tri is not None:
        with device_of(gate_up):
            return tri.silu_and_mul(gate_up)
    gpu = _cuda(gate_up)
    if gpu is None and not _fast(gate_up):
        return reference.silu_and_mul(gate_up)
    gate_up = gate_up.contiguous()
    t, inner = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, inner, dtype=torch.float32, device=gate_up.device)
    if gpu is not None:
        with device_of(gate_up):
            gpu.silu_and_mul(gate_up.data_ptr(), t, inner, out.data_ptr(), _stream(gate_up))
    else:
        cpu_module().silu_and_mul(gate_up.data_ptr(), t, inner, out.data_ptr())
    return out
