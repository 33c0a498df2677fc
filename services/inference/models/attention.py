"""Attention over the paged KV cache.

The step's first rows ("paged rows": decodes, and with the kernel every chunk of a few rows, such as a
speculative verification run) go through the paged-attention kernel (kernels.PagedAttention: causal,
reading K/V in place through the block tables) where the model's compute path has one
(models/compute.py); without it the paged rows are decodes only and use the torch path below.
Longer prefill chunks use torch's SDPA over their gathered context.

The KV pool of one layer is a pair of tensors [num_kv_heads, num_blocks * block_size, head_dim]:
heads outermost, so gathering a sequence's blocks yields [KVH, L, D], the layout the attention
matmuls want, with no transposing copy. A step's tokens are laid out paged rows first, then the longer
prefill chunks; the model runner builds `AttentionMetadata` once per step and every layer reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kernels import KernelBackends, reshape_and_cache


@dataclass(slots=True)
class PrefillSpan:
    start: int                        # first row of this chunk in the step's flattened tokens
    end: int                          # one past its last row
    block_ids: torch.Tensor | None    # [nb] int64: blocks holding positions 0.. of this sequence
    mask: torch.Tensor | None         # [n, nb * block_size] bool (True = attend)
    # block_ids is None for a chunk with no earlier context: it attends over its own K/V, plain causal
    # (mask None) or as mask [n, n] says (a sliding window shorter than the chunk)


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor               # [T] int64: where each new token's K/V is written
    block_size: int                          # tokens per KV block
    num_paged_rows: int                      # rows [0, P): the paged rows (decodes, short chunks)
    paged_block_table: torch.Tensor | None   # [S, nb] int64: block ids per paged sequence, padded
    decode_mask: torch.Tensor | None         # [S, nb * block_size] bool: context positions (torch path: decodes)
    prefills: list[PrefillSpan]
    paged_plan: Any = None                   # kernels.PagedAttention: paged rows read the pool in place
    per_layer: "list[AttentionMetadata] | None" = None   # each layer's own (its group's table, its window);
    #                                                        None: every layer reads this one

    def to(self, device: torch.device) -> "AttentionMetadata":
        """The same metadata with its tensors on `device` (the plan keeps its own per-device copies); each
        distinct per-layer metadata is moved once (a group's layers share theirs, the first group's is this)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        spans = [PrefillSpan(p.start, p.end, move(p.block_ids), move(p.mask)) for p in self.prefills]
        moved = AttentionMetadata(move(self.slot_mapping), self.block_size, self.num_paged_rows,
                                  move(self.paged_block_table), move(self.decode_mask), spans, self.paged_plan)
        if self.per_layer is not None:
            done: dict[int, AttentionMetadata] = {id(self): moved}
            moved.per_layer = [done[id(m)] if id(m) in done else done.setdefault(id(m), m.to(device))
                               for m in self.per_layer]
        return moved


def window_metadata(meta: AttentionMetadata, window: int, paged_context_lens: list[int],
                    prefill_starts: list[int]) -> AttentionMetadata:
    """The step's metadata for sliding-window layers: the same slots, each row's mask cut to the last `window`
    positions up to its own. `paged_context_lens`: the paged rows' context lengths (decodes, torch path);
    `prefill_starts`: each prefill span's first position. A paged-attention plan must have been built with the
    window (kernels.PagedAttention(window=...)): it is kept as it is."""
    if meta.paged_plan is not None and meta.paged_plan.window != window:
        raise ValueError(f"the paged rows' plan has window {meta.paged_plan.window}, not {window}")
    mask = meta.decode_mask
    if mask is not None:
        ctx = torch.tensor(paged_context_lens, dtype=torch.int64)[:, None]
        mask = mask & (torch.arange(mask.shape[1])[None, :] >= ctx - window)
    spans = []
    for start, span in zip(prefill_starts, meta.prefills):
        n = span.end - span.start
        new_pos = torch.arange(start, start + n)[:, None]
        if span.block_ids is None:        # its own rows only: causal, and within the window
            cols = torch.arange(n)[None, :]
            cut = None if n <= window else (cols <= new_pos) & (cols > new_pos - window)
        else:
            cut = span.mask & (torch.arange(span.mask.shape[1])[None, :] > new_pos - window)
        spans.append(PrefillSpan(span.start, span.end, span.block_ids, cut))
    return AttentionMetadata(meta.slot_mapping, meta.block_size, meta.num_paged_rows, meta.paged_block_table,
                             mask, spans, meta.paged_plan)


def single_table_metadata(meta: AttentionMetadata, hp: Any, paged_context_lens: list[int],
                          prefill_starts: list[int]) -> AttentionMetadata:
    """`meta` for a model whose layers all use one block table (a scratch pool per layer, as the tests and
    tools/perplexity.py build): where the model has sliding-window layers (hp.sliding_layers), theirs get the
    windowed copy (window_metadata) through `per_layer`."""
    window = getattr(hp, "sliding_window", 0)
    if window and any(hp.sliding_layers):
        local = window_metadata(meta, window, paged_context_lens, prefill_starts)
        meta.per_layer = [local if s else meta for s in hp.sliding_layers]
    return meta


def new_kv_pool(num_kv_heads: int, num_slots: int, head_dim: int, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(num_kv_heads, num_slots, head_dim, dtype=dtype, device=device)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, backend: str) -> None:
    """reshape-and-cache: store this step's K/V rows ([T, KVH, D], strided views of the QKV output are
    fine) at their slots (kernels.reshape_and_cache: one C++ or CUDA call for both, or torch)."""
    reshape_and_cache(k, v, k_pool, v_pool, slot_mapping, backend)


def gather_blocks(pool: torch.Tensor, block_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """pool [KVH, slots, D], block_ids [..., nb] -> [KVH, ..., nb * block_size, D] (one copy)."""
    heads, _, dim = pool.shape
    rows = pool.view(heads, -1, block_size * dim).index_select(1, block_ids.reshape(-1))
    return rows.view(heads, *block_ids.shape[:-1], block_ids.shape[-1] * block_size, dim)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One query per sequence. q [B, H, D], k/v [KVH, B, L, D], mask [B, L] -> [B, H, D].

    Plain batched matmuls: for a single query row they beat the CPU flash-attention kernel by
    several times. Query heads are grouped onto their KV head (GQA) without repeating K/V."""
    b, h, d = q.shape
    kvh = k.shape[0]
    qg = q.view(b, kvh, h // kvh, d).transpose(0, 1)                      # [KVH, B, G, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale        # [KVH, B, G, L]
    scores = scores.masked_fill(~mask[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).transpose(0, 1).reshape(b, h, d)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                    v_pool: torch.Tensor, meta: AttentionMetadata, scale: float,
                    kernels: KernelBackends) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] (already rotated) -> attention output [T, H, D]; `kernels`: where
    reshape-and-cache and the paged rows' kernel run (models/compute.py)."""
    write_kv(k_pool, v_pool, k, v, meta.slot_mapping, kernels.cache)
    outs = []
    nd = meta.num_paged_rows
    if nd and meta.paged_plan is not None:
        outs.append(meta.paged_plan(q[:nd], k_pool, v_pool, scale, kernels.attention))
    elif nd:
        outs.append(decode_attention(q[:nd], gather_blocks(k_pool, meta.paged_block_table, meta.block_size),
                                     gather_blocks(v_pool, meta.paged_block_table, meta.block_size),
                                     meta.decode_mask, scale))
    # prefill
    for span in meta.prefills:
        qp = q[span.start:span.end].transpose(0, 1).unsqueeze(0)   # [1, H, n, D]
        if span.block_ids is None:
            kp = k[span.start:span.end].transpose(0, 1).unsqueeze(0)
            vp = v[span.start:span.end].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=span.mask is None, attn_mask=span.mask,
                                                scale=scale, enable_gqa=True)
        else:
            kp = gather_blocks(k_pool, span.block_ids, meta.block_size).unsqueeze(0)   # [1, KVH, L, D]
            vp = gather_blocks(v_pool, span.block_ids, meta.block_size).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=span.mask, scale=scale,
                                                enable_gqa=True)
        outs.append(op.squeeze(0).transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
