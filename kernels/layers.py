"""Row-wise kernels of a Llama layer, float32, C++ on CPU and CUDA on a GPU (where the CUDA module was built;
Triton on a GPU without it, or with STRATA_KERNELS=triton): fused residual-add + RMSNorm, rotary embedding
applied in place to the query and key heads of a fused QKV projection, and SiLU-and-mul over a fused
gate/up projection. The torch reference runs for other dtypes and devices, or when STRATA_KERNELS=reference.

Each takes `backend` (kernels.backend: "cpp", "cuda", "triton", "reference"), as a model chose it once for
its tensors; without one the call chooses from its own tensors' device and dtype."""

from __future__ import annotations

import torch

from kernels import reference
from kernels._loader import cpu_module, cuda_module, device_of, triton_module
from kernels.backend import CPP, CUDA, REFERENCE, TRITON, rows_backend


def _choose(*tensors: torch.Tensor) -> str:
    """The implementation for these tensors (no backend given): the reference unless all are float32 on one
    device."""
    if not all(t.dtype == torch.float32 for t in tensors):
        return REFERENCE
    devices = {t.device for t in tensors}
    if not all(t.is_cuda for t in tensors) and not all(t.device.type == "cpu" for t in tensors):
        return REFERENCE
    if len(devices) != 1:
        raise ValueError("all tensors must be on the same CUDA device")
    return rows_backend(tensors[0].device)


def _module(kind: str):
    return {CPP: cpu_module, CUDA: cuda_module, TRITON: triton_module}[kind]()


def _launch(kind: str, fn, args: tuple, t: torch.Tensor) -> None:
    """fn(*args) from the C++ module, or from the CUDA module on t's device and current stream."""
    if kind == CUDA:
        with device_of(t):
            fn(*args, torch.cuda.current_stream(t.device).cuda_stream)
    else:
        fn(*args)


def add_rms_norm_(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                  backend: str | None = None) -> torch.Tensor:
    """residual [T, H] += delta (in place; None = no add), then RMSNorm(residual) * weight → new [T, H]."""
    if residual.dim() != 2 or weight.shape != (residual.shape[1],):
        raise ValueError(f"residual must be [T, H] and weight [H], got {tuple(residual.shape)} and {tuple(weight.shape)}")
    if delta is not None and delta.shape != residual.shape:
        raise ValueError(f"delta must match residual {tuple(residual.shape)}, got {tuple(delta.shape)}")
    kind = backend or _choose(residual, weight, *(() if delta is None else (delta,)))
    if kind == REFERENCE or not residual.is_contiguous():
        return reference.add_rms_norm_(residual, delta, weight, eps)
    mod = _module(kind)
    delta = delta.contiguous() if delta is not None else None
    weight = weight.contiguous()
    if kind == TRITON:
        with device_of(residual):
            return mod.add_rms_norm_(residual, delta, weight, eps)
    out = torch.empty_like(residual)
    _launch(kind, mod.add_rms_norm, (residual.data_ptr(), delta.data_ptr() if delta is not None else 0,
                                     weight.data_ptr(), residual.shape[0], residual.shape[1], float(eps),
                                     out.data_ptr()), residual)
    return out


def rotary_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
            backend: str | None = None) -> torch.Tensor:
    """Rotate-half rotary embedding, in place, on the first `heads` heads of each row of x [T, W ≥ heads *
    head_dim] (rows may be strided: a fused QKV output rotates its Q and K heads in one call); cos/sin
    [T, head_dim / 2]. Returns x."""
    if x.dim() != 2 or x.stride(1) != 1 or x.shape[1] < heads * head_dim or head_dim % 2:
        raise ValueError("x must be [T, W] with contiguous rows of at least heads * head_dim (even) values")
    t = x.shape[0]
    if cos.shape != (t, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos and sin must be [{t}, {head_dim // 2}]")
    kind = backend or _choose(x, cos, sin)
    if kind == REFERENCE:
        return reference.rotary_(x, heads, head_dim, cos, sin)
    mod = _module(kind)
    if kind == TRITON:
        with device_of(x):
            return mod.rotary_(x, heads, head_dim, cos, sin)
    cos, sin = cos.contiguous(), sin.contiguous()
    _launch(kind, mod.rotary_inplace, (x.data_ptr(), t, x.stride(0), heads, head_dim, cos.data_ptr(), sin.data_ptr()), x)
    return x


def silu_and_mul(gate_up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """gate_up [T, 2I] (gate, then up) → silu(gate) * up [T, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2I], got {tuple(gate_up.shape)}")
    kind = backend or _choose(gate_up)
    if kind == REFERENCE:
        return reference.silu_and_mul(gate_up)
    mod = _module(kind)
    if kind == TRITON:
        with device_of(gate_up):
            return mod.silu_and_mul(gate_up)
    gate_up = gate_up.contiguous()
    t, inner = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, inner, dtype=torch.float32, device=gate_up.device)
    _launch(kind, mod.silu_and_mul, (gate_up.data_ptr(), t, inner, out.data_ptr()), gate_up)
    return out


def gelu_tanh_and_mul(gate_up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """gate_up [T, 2I] (gate, then up) → gelu_tanh(gate) * up [T, I] (Gemma's MLP): the C++ kernel on CPU (the
    one the layer stack runs, so both paths give the same bits); torch's elsewhere (no GPU kernel yet)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2I], got {tuple(gate_up.shape)}")
    kind = backend or _choose(gate_up)
    if kind != CPP:
        return reference.gelu_tanh_and_mul(gate_up)
    gate_up = gate_up.contiguous()
    t, inner = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, inner, dtype=torch.float32)
    cpu_module().gelu_tanh_and_mul(gate_up.data_ptr(), t, inner, out.data_ptr())
    return out
