"""int8 x int8 products for the few activation rows of a decode step (the W8A8 linear layers): the C++
kernel on CPU (AVX2 maddubs, OpenMP over output channels), the torch reference elsewhere or when
STRATA_KERNELS=reference. On CPUs without VNNI/AMX, where oneDNN's int8 matmul is a slow reference loop,
this is what makes int8 decode fast."""

from __future__ import annotations

import torch

from kernels import reference
from kernels._loader import available, cpu_module


def int8_gemv(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """y [M, N] float32 = x_scale[:, None] * w_scale[None, :] * (xq [M, K] @ wq [N, K]ᵀ), integer sums exact.

    xq, wq: int8 with codes in [-127, 127] (checked for xq; wq as Int8Linear quantizes it); scales
    float32 [M] and [N]."""
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise TypeError(f"xq and wq must be int8, got {xq.dtype} and {wq.dtype}")
    if x_scale.dtype != torch.float32 or w_scale.dtype != torch.float32:
        raise TypeError("x_scale and w_scale must be float32")
    if xq.dim() != 2 or wq.dim() != 2 or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"xq must be [M, K] and wq [N, K] with the same K, got {tuple(xq.shape)} and {tuple(wq.shape)}")
    m, k = xq.shape
    n = wq.shape[0]
    if tuple(x_scale.shape) != (m,) or tuple(w_scale.shape) != (n,):
        raise ValueError(f"x_scale must be [{m}] and w_scale [{n}]")
    if m and int(xq.min()) < -127:
        raise ValueError("activation codes must be in [-127, 127]")
    devices = {t.device.type for t in (xq, x_scale, wq, w_scale)}
    if devices != {"cpu"} or not available():
        return reference.int8_gemv(xq, x_scale, wq, w_scale)
    if not wq.is_contiguous():
        raise ValueError("wq must be contiguous ([N, K] row-major)")
    xq, x_scale, w_scale = xq.contiguous(), x_scale.contiguous(), w_scale.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    cpu_module().int8_gemv(xq.data_ptr(), x_scale.data_ptr(), wq.data_ptr(), w_scale.data_ptr(), m, n, k, y.data_ptr())
    return y


def _check_weights(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> None:
    if x.dtype != torch.float32 or x.dim() != 2:
        raise TypeError(f"x must be 2-D float32, got {x.dtype} with {x.dim()} dims")
    if wq.dtype != torch.int8 or wq.dim() != 2 or wq.shape[1] != x.shape[1]:
        raise ValueError(f"wq must be int8 [N, {x.shape[1]}], got {wq.dtype} {tuple(wq.shape)}")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (wq.shape[0],):
        raise ValueError(f"w_scale must be float32 [{wq.shape[0]}]")


def int8_weight_gemv(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Weight-only int8: y [M, N] = x [M, K] float32 @ (wq [N, K] int8 * w_scale[:, None])ᵀ, float32 sums."""
    _check_weights(x, wq, w_scale)
    devices = {t.device.type for t in (x, wq, w_scale)}
    if devices != {"cpu"} or not available():
        return reference.int8_weight_gemv(x, wq, w_scale)
    return Int8Matrix(wq, w_scale).weight_only(x)


def int8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """W8A8 from float32 activations: each row of x [M, K] quantized to int8 (scale = max|x| / 127, codes
    rounded half to even, as services.inference.models.linear.Int8Linear does), then int8_gemv → [M, N]."""
    _check_weights(x, wq, w_scale)
    devices = {t.device.type for t in (x, wq, w_scale)}
    if devices != {"cpu"} or not available():
        return reference.int8_linear(x, wq, w_scale)
    return Int8Matrix(wq, w_scale).linear(x)


class Int8Matrix:
    """int8 weights wq [N, K] (codes in [-127, 127]) with their per-row scales, checked once, for a
    layer that multiplies them every step: `linear(x)` (W8A8, as int8_linear) and `weight_only(x)` (as
    int8_weight_gemv) take float32 x [M, K] on CPU with the compiled kernels (kernels.available())."""

    __slots__ = ("wq", "w_scale", "n", "k")

    def __init__(self, wq: torch.Tensor, w_scale: torch.Tensor) -> None:
        if wq.dtype != torch.int8 or wq.dim() != 2 or wq.device.type != "cpu":
            raise ValueError(f"wq must be a 2-D int8 CPU tensor, got {wq.dtype} {tuple(wq.shape)} on {wq.device}")
        if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (wq.shape[0],):
            raise ValueError(f"w_scale must be float32 [{wq.shape[0]}]")
        self.wq, self.w_scale = wq.contiguous(), w_scale.contiguous()
        self.n, self.k = wq.shape

    def _run(self, fn, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.k or x.device.type != "cpu":
            raise ValueError(f"x must be float32 [M, {self.k}] on CPU, got {x.dtype} {tuple(x.shape)}")
        x = x.contiguous()
        y = torch.empty(x.shape[0], self.n, dtype=torch.float32)
        fn(x.data_ptr(), self.wq.data_ptr(), self.w_scale.data_ptr(), x.shape[0], self.n, self.k, y.data_ptr())
        return y

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(cpu_module().int8_linear, x)

    def weight_only(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(cpu_module().int8_weight_gemv, x)
