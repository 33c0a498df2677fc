"""Attention over the paged KV cache (torch reference path).

The KV pool of one layer is a pair of tensors [num_blocks * block_size, num_kv_heads, head_dim]
(flattened slots). A step's tokens are laid out decodes first (one token each), then prefill
chunks; the model runner builds `AttentionMetadata` once per step and every layer reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillSpan:
    start: int                      # first row of this chunk in the step's flattened tokens
    end: int                        # one past its last row
    context_slots: torch.Tensor     # [L] int64: KV slots of every position 0..L-1 of this sequence
    mask: torch.Tensor | None       # [n, L] bool (True = attend); None = plain causal (no earlier context)


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor              # [T] int64: where each new token's K/V is written
    num_decode_tokens: int                  # rows [0, D) are decodes, one token per sequence
    decode_slots: torch.Tensor | None       # [D, L] int64: context slots per decode, padded
    decode_mask: torch.Tensor | None        # [D, 1, 1, L] bool: True for real context positions
    prefills: list[PrefillSpan]


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """reshape-and-cache: store this step's K/V rows at their slots."""
    k_pool.index_copy_(0, slot_mapping, k)
    v_pool.index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                    v_pool: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] (already rotated) -> attention output [T, H, D]."""
    write_kv(k_pool, v_pool, k, v, meta.slot_mapping)
    outs = []
    nd = meta.num_decode_tokens
    # decode
    if nd:
        qd = q[:nd].unsqueeze(2)                                   # [B, H, 1, D]
        kd = k_pool[meta.decode_slots].transpose(1, 2)             # [B, KVH, L, D]
        vd = v_pool[meta.decode_slots].transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale,
                                            enable_gqa=True)
        outs.append(od.squeeze(2))
    # prefill
    for span in meta.prefills:
        qp = q[span.start:span.end].transpose(0, 1).unsqueeze(0)   # [1, H, n, D]
        if span.mask is None:
            kp = k[span.start:span.end].transpose(0, 1).unsqueeze(0)
            vp = v[span.start:span.end].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kp = k_pool[span.context_slots].transpose(0, 1).unsqueeze(0)
            vp = v_pool[span.context_slots].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=span.mask, scale=scale,
                                                enable_gqa=True)
        outs.append(op.squeeze(0).transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
