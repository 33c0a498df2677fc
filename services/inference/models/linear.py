"""Projection weights and how they multiply: dense (float32/bfloat16) or int8 W8A8."""

from __future__ import annotations

import torch


class DenseLinear:
    """y = x @ w with w stored [in, out] contiguous (2-4x faster than F.linear's [out, in] layout at
    decode batch sizes with MKL on this class of CPU)."""

    __slots__ = ("weight",)

    def __init__(self, weight_t: torch.Tensor) -> None:
        self.weight = weight_t.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]


class Int8Linear:
    """W8A8: int8 weights with one scale per output channel, activations quantized per token at
    run time, int8 x int8 -> int32 products (VNNI/AMX through oneDNN), rescaled to float32.

    y[m, n] ~= sum_k x[m, k] w[k, n] = s_x[m] * s_w[n] * sum_k q_x[m, k] q_w[k, n]."""

    __slots__ = ("qweight", "scale")

    def __init__(self, weight_t: torch.Tensor) -> None:
        w = weight_t.float()                                          # [in, out]
        self.scale = w.abs().amax(dim=0).clamp_min(1e-8) / 127.0      # [out]
        # stored [out, in]; passed to _int_mm as a transposed view, its fastest layout here
        self.qweight = torch.round(w / self.scale).clamp_(-127, 127).to(torch.int8).t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        x_scale = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-8).div_(127.0)   # [M, 1]
        xq = torch.round(x2 / x_scale).to(torch.int8)
        y = torch._int_mm(xq, self.qweight.t()).float().mul_(x_scale).mul_(self.scale)
        return y.reshape(*shape[:-1], -1).to(x.dtype)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]


Linear = DenseLinear | Int8Linear
