"""The Llama family's math as plain torch functions: RMSNorm, rotary embeddings (rotate-half layout) and
the Q/K row order llama.cpp stores. The models' torch path and the SmoothQuant calibration share them."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of Q/K projections (back to HF's rotate-half layout)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cache(head_dim: int, max_positions: int, theta: float, scale: float = 1.0,
               factors: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [P, D/2] per position; `scale`: linear RoPE scaling (positions divided by it); `factors`
    [D/2]: each frequency divided by its own factor (llama.cpp's rope_freqs, as in Llama 3's scaling)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if factors is not None:
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
    if scale != 1.0:
        inv_freq = inv_freq / scale
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()                                # [P, D/2] each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] with cos/sin [T, D/2], rotate-half (NeoX) layout."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
