"""Paged attention for decode (one query token per sequence), read straight from the KV pool through
the block table: the C++ kernel on CPU (AVX2/FMA when the CPU has them, OpenMP over sequences × KV
heads), the CUDA kernel for float32 tensors on a GPU (where the CUDA module was built), the torch
reference elsewhere or when STRATA_KERNELS=reference.

A model calls it once per layer with the same block table: `PagedDecode` checks the table and the
context lengths once per step, and each layer's call checks only its own tensors."""

from __future__ import annotations

import torch

from kernels import reference
from kernels._loader import available, cpu_module, cuda_module

KV_DTYPES = (torch.float32, torch.bfloat16)


class PagedDecode:
    """One step's decode plan: block_table [B, max_blocks] int64, context_lens [B] int64 (each at most
    max_blocks * block_size). Call it with each layer's q and pools."""

    def __init__(self, block_table: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> None:
        if block_table.dtype != torch.int64 or context_lens.dtype != torch.int64:
            raise TypeError("block_table and context_lens must be int64")
        if block_table.dim() != 2 or context_lens.dim() != 1 or block_table.shape[0] != context_lens.shape[0]:
            raise ValueError("block_table must be [B, max_blocks] and context_lens [B]")
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        b = block_table.shape[0]
        lo, hi = (int(context_lens.min()), int(context_lens.max())) if b else (0, 0)
        if lo < 0 or hi > block_table.shape[1] * block_size:
            raise ValueError("context lengths must be in [0, max_blocks * block_size]")
        self.block_table, self.context_lens = block_table.contiguous(), context_lens.contiguous()
        self.block_size = block_size
        self.max_context = hi
        self.max_block = int(block_table.max()) if block_table.numel() else -1
        self.min_block = int(block_table.min()) if block_table.numel() else 0

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B, H, D]; k_pool / v_pool [KVH, num_slots, D], float32 or bfloat16 (the same) → [B, H, D] in
        q's dtype. Semantics: kernels.reference.paged_attention_decode."""
        if q.dim() != 3 or k_pool.dim() != 3 or k_pool.shape != v_pool.shape:
            raise ValueError("q must be [B, H, D] and k_pool / v_pool the same [KVH, num_slots, D]")
        b, h, d = q.shape
        kvh, num_slots, pool_d = k_pool.shape
        if b != self.block_table.shape[0]:
            raise ValueError(f"q has {b} sequences, the block table {self.block_table.shape[0]}")
        if pool_d != d or h % kvh:
            raise ValueError(f"head_dim {d} vs pool {pool_d}, or {h} query heads not a multiple of {kvh} KV heads")
        if k_pool.dtype != v_pool.dtype or k_pool.dtype not in KV_DTYPES:
            raise TypeError(f"k_pool and v_pool must both be one of {KV_DTYPES}, got {k_pool.dtype} and {v_pool.dtype}")
        if num_slots % self.block_size or self.min_block < 0 or self.max_block >= num_slots // self.block_size:
            raise ValueError("the pool does not hold the block table's blocks (or num_slots is not whole blocks)")
        devices = {t.device.type for t in (q, k_pool, v_pool, self.block_table)}
        gpu = cuda_module()
        if devices == {"cuda"} and gpu is not None and k_pool.dtype == torch.float32 and q.dtype == torch.float32:
            return self._cuda(gpu, q, k_pool, v_pool, scale)
        if devices != {"cpu"} or not available():
            return reference.paged_attention_decode(q, k_pool, v_pool, self.block_table, self.context_lens, scale,
                                                    self.block_size)
        if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
            raise ValueError("k_pool and v_pool must be contiguous")
        qf = q.float().contiguous()
        out = torch.empty(b, h, d, dtype=torch.float32)
        cpu_module().paged_attention_decode(
            qf.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), k_pool.dtype == torch.bfloat16,
            self.block_table.data_ptr(), self.context_lens.data_ptr(), b, h, kvh, d, num_slots, self.block_size,
            self.block_table.shape[1], float(scale), out.data_ptr())
        return out if q.dtype == torch.float32 else out.to(q.dtype)


    def _cuda(self, gpu, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scale: float) -> torch.Tensor:
        b, h, d = q.shape
        kvh, num_slots, _ = k_pool.shape
        table, lens = self.block_table.to(q.device), self.context_lens.to(q.device)
        q, k_pool, v_pool = q.contiguous(), k_pool.contiguous(), v_pool.contiguous()
        out = torch.empty_like(q)
        gpu.paged_attention_decode(q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), table.data_ptr(),
                                   lens.data_ptr(), b, h, kvh, d, num_slots, self.block_size, table.shape[1],
                                   self.max_context, float(scale), out.data_ptr(),
                                   torch.cuda.current_stream(q.device).cuda_stream)
        return out


def paged_attention_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, block_size: int) -> torch.Tensor:
    """One call: PagedDecode(block_table, context_lens, block_size)(q, k_pool, v_pool, scale)."""
    return PagedDecode(block_table, context_lens, block_size)(q, k_pool, v_pool, scale)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Write this step's K and V ([T, KVH, D] each; rows may be strided views of a fused QKV output,
    heads contiguous within a row) into the pools [KVH, num_slots, D] at slot_mapping [T] (int64)."""
    if k.dim() != 3 or k.shape != v.shape or k_pool.shape != v_pool.shape or k.shape[1:] != (k_pool.shape[0], k_pool.shape[2]):
        raise ValueError(f"k/v must be [T, KVH, D] matching pools [KVH, slots, D]; got {tuple(k.shape)}, {tuple(k_pool.shape)}")
    if slot_mapping.dtype != torch.int64 or tuple(slot_mapping.shape) != (k.shape[0],):
        raise ValueError(f"slot_mapping must be int64 [{k.shape[0]}]")
    same = k.dtype == v.dtype == k_pool.dtype == v_pool.dtype and k.dtype in KV_DTYPES
    rows_ok = all(t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (k, v))
    devices = {t.device.type for t in (k, v, k_pool, v_pool, slot_mapping)}
    if not (same and rows_ok and devices == {"cpu"} and available() and k_pool.is_contiguous() and v_pool.is_contiguous()):
        reference.reshape_and_cache(k, v, k_pool, v_pool, slot_mapping)
        return
    if k.shape[0] and (int(slot_mapping.min()) < 0 or int(slot_mapping.max()) >= k_pool.shape[1]):
        raise ValueError("a slot is outside the pool")
    slots = slot_mapping.contiguous()
    cpu_module().reshape_and_cache(k.data_ptr(), v.data_ptr(), k.stride(0), v.stride(0), slots.data_ptr(), k.shape[0],
                                   k.shape[1], k.shape[2], k_pool.shape[1], k.element_size(), k_pool.data_ptr(),
                                   v_pool.data_ptr())
