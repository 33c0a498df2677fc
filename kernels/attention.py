"""Paged attention read straight from the KV pool through block tables: decodes (one query row per
sequence), prefill chunks over cached context and speculative verification runs (several rows per
sequence, causal) in one call. The C++ kernel on CPU (AVX2/FMA when the CPU has them, OpenMP over
sequences × KV heads × query tiles), the CUDA kernel for float32 tensors on a GPU (where the CUDA module
was built; split-K over the context, each K/V row read once for its whole query-head group), the Triton
kernel on a GPU without it (or with STRATA_KERNELS=triton), the torch reference elsewhere or when
STRATA_KERNELS=reference.

A model calls it once per layer with the same block tables: `PagedAttention` checks the tables and
lengths once per step, and each layer's call checks only its own tensors. Calls take `backend`
(kernels.backend) as the model chose it once; without one they choose from their own tensors."""

from __future__ import annotations

import torch

from kernels import reference
from kernels._loader import cpu_module, cuda_module, device_of, triton_module
from kernels.backend import CPP, CUDA, KV_DTYPES, REFERENCE, TRITON, attention_backend, cache_backend


class PagedAttention:
    """One step's attention plan over S sequences.

    block_table [S, max_blocks] int64; context_lens [S] int64 (each at most max_blocks * block_size);
    query_lens [S] int64 (None: one row per sequence, a decode step): sequence s owns the next
    query_lens[s] rows of q, which are the last positions of its context (row r of n at position
    context_lens[s] - n + r, attending positions up to and including its own). Call it with each
    layer's q [T, H, D] and pools. window > 0 (sliding-window layers): each row attends its last `window`
    positions only, and blocks wholly before the first row's window are never read (their table entries may be
    any block of the pool: the engine's null block). Semantics: kernels.reference.paged_attention."""

    def __init__(self, block_table: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                 query_lens: torch.Tensor | None = None, window: int = 0) -> None:
        if block_table.dtype != torch.int64 or context_lens.dtype != torch.int64:
            raise TypeError("block_table and context_lens must be int64")
        if block_table.dim() != 2 or context_lens.dim() != 1 or block_table.shape[0] != context_lens.shape[0]:
            raise ValueError("block_table must be [S, max_blocks] and context_lens [S]")
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        s = block_table.shape[0]
        lo, hi = (int(context_lens.min()), int(context_lens.max())) if s else (0, 0)
        if lo < 0 or hi > block_table.shape[1] * block_size:
            raise ValueError("context lengths must be in [0, max_blocks * block_size]")
        if query_lens is None:
            query_lens = torch.ones(s, dtype=torch.int64)
        elif query_lens.dtype != torch.int64 or tuple(query_lens.shape) != (s,):
            raise ValueError(f"query_lens must be int64 [{s}]")
        elif s and (int(query_lens.min()) < 0 or bool((query_lens > context_lens).any())):
            raise ValueError("query lengths must be in [0, context length]: a sequence's rows are its last positions")
        self.block_table, self.context_lens = block_table.contiguous(), context_lens.contiguous()
        self.query_lens = query_lens.contiguous()
        self.query_start = torch.zeros(s + 1, dtype=torch.int64)
        torch.cumsum(self.query_lens, 0, out=self.query_start[1:])
        self.num_rows = int(self.query_start[-1])
        self.block_size = block_size
        self.window = window
        self.max_context = hi
        self.max_block = int(block_table.max()) if block_table.numel() else -1
        self.min_block = int(block_table.min()) if block_table.numel() else 0
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._workspaces: dict[tuple, tuple[int, torch.Tensor | None]] = {}

    @classmethod
    def from_lists(cls, block_tables: list[list[int]], context_lens: list[int], block_size: int,
                   query_lens: list[int], window: int = 0) -> "PagedAttention":
        """The same plan from the engine's Python lists (tables padded here with block 0), checked in Python:
        a decode step builds its plan from three tensors instead of a dozen small tensor ops."""
        s = len(block_tables)
        if not (len(context_lens) == len(query_lens) == s) or block_size < 1:
            raise ValueError("one context and query length per block table, and block_size >= 1")
        width = max((len(t) for t in block_tables), default=0)
        if any(not 0 <= c <= width * block_size for c in context_lens):
            raise ValueError("context lengths must be in [0, max_blocks * block_size]")
        if any(not 0 <= q <= c for q, c in zip(query_lens, context_lens)):
            raise ValueError("query lengths must be in [0, context length]: a sequence's rows are its last positions")
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        plan = cls.__new__(cls)
        plan.block_table = torch.tensor(padded, dtype=torch.int64).reshape(s, width)
        plan.context_lens = torch.tensor(context_lens, dtype=torch.int64)
        plan.query_lens = torch.tensor(query_lens, dtype=torch.int64)
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        plan.query_start = torch.tensor(starts, dtype=torch.int64)
        plan.num_rows = starts[-1]
        plan.block_size = block_size
        plan.window = window
        plan.max_context = max(context_lens, default=0)
        flat = [b for row in padded for b in row]
        plan.max_block, plan.min_block = (max(flat), min(flat)) if flat else (-1, 0)
        plan._on_device, plan._workspaces = {}, {}
        return plan

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query row: its sequence and how many positions it attends ([T] int64 each)."""
        return reference.paged_rows(self.context_lens, self.query_lens)

    def _workspace(self, gpu, device: torch.device, heads: int, kv_heads: int,
                   head_dim: int) -> tuple[int, torch.Tensor | None]:
        """The split-K kernel's partial sums for this plan's rows, sized and allocated once per plan: the layers
        of a step run one after another on one stream, so they share it."""
        key = (device, heads, kv_heads, head_dim)
        found = self._workspaces.get(key)
        if found is None:
            floats = gpu.paged_attention_workspace_floats(self.num_rows, heads, kv_heads, head_dim, self.max_context)
            found = self._workspaces[key] = (
                floats, torch.empty(floats, dtype=torch.float32, device=device) if floats else None)
        return found

    def device_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block_table, row_seq, row_len) on `device`, copied once per plan (every layer reuses them)."""
        tables = self._on_device.get(device)
        if tables is None:
            row_seq, row_len = self.rows()
            tables = self._on_device[device] = tuple(x.to(device, non_blocking=True)
                                                     for x in (self.block_table, row_seq, row_len))
        return tables

    def __call__(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scale: float,
                 backend: str | None = None) -> torch.Tensor:
        """q [T, H, D]; k_pool / v_pool [KVH, num_slots, D], float32 or bfloat16 (the same) → [T, H, D] in
        q's dtype."""
        if q.dim() != 3 or k_pool.dim() != 3 or k_pool.shape != v_pool.shape:
            raise ValueError("q must be [T, H, D] and k_pool / v_pool the same [KVH, num_slots, D]")
        t, h, d = q.shape
        kvh, num_slots, pool_d = k_pool.shape
        if t != self.num_rows:
            raise ValueError(f"q has {t} rows, the plan's sequences {self.num_rows}")
        if pool_d != d or h % kvh:
            raise ValueError(f"head_dim {d} vs pool {pool_d}, or {h} query heads not a multiple of {kvh} KV heads")
        if k_pool.dtype != v_pool.dtype or k_pool.dtype not in KV_DTYPES:
            raise TypeError(f"k_pool and v_pool must both be one of {KV_DTYPES}, got {k_pool.dtype} and {v_pool.dtype}")
        if num_slots % self.block_size or self.min_block < 0 or self.max_block >= num_slots // self.block_size:
            raise ValueError("the pool does not hold the block table's blocks (or num_slots is not whole blocks)")
        if backend is None:                                     # the plan's tables move to q's device
            one_device = len({x.device.type for x in (q, k_pool, v_pool)}) == 1
            backend = attention_backend(q.device, k_pool.dtype, q.dtype, d, self.block_size) if one_device else REFERENCE
        if backend == CUDA and self.window:
            backend = TRITON                     # the CUDA kernels read whole contexts; Triton has the window
        if backend == CUDA:
            return self._cuda(cuda_module(), q, k_pool, v_pool, scale)
        if backend == TRITON:
            table, row_seq, row_len = self.device_tables(q.device)
            with device_of(q):
                return triton_module().paged_attention_rows(q, k_pool, v_pool, table, row_seq, row_len, scale,
                                                            self.block_size, self.window)
        if backend == REFERENCE:
            return reference.paged_attention(q, k_pool, v_pool, self.block_table, self.context_lens, self.query_lens,
                                             scale, self.block_size, self.window)
        if backend != CPP:
            raise ValueError(f"unknown kernel backend {backend!r}")
        if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
            raise ValueError("k_pool and v_pool must be contiguous")
        qf = q.float().contiguous()
        out = torch.empty(t, h, d, dtype=torch.float32)
        cpu_module().paged_attention(
            qf.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), k_pool.dtype == torch.bfloat16,
            self.block_table.data_ptr(), self.context_lens.data_ptr(), self.query_start.data_ptr(),
            len(self.context_lens), h, kvh, d, num_slots, self.block_size, self.block_table.shape[1], float(scale),
            out.data_ptr(), self.window)
        return out if q.dtype == torch.float32 else out.to(q.dtype)

    def _cuda(self, gpu, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, scale: float) -> torch.Tensor:
        t, h, d = q.shape
        kvh, num_slots, _ = k_pool.shape
        table, row_seq, row_len = self.device_tables(q.device)
        q, k_pool, v_pool = q.contiguous(), k_pool.contiguous(), v_pool.contiguous()
        out = torch.empty_like(q)
        floats, workspace = self._workspace(gpu, q.device, h, kvh, d)
        with device_of(q):
            gpu.paged_attention(q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), table.data_ptr(),
                                row_seq.data_ptr(), row_len.data_ptr(), t, h, kvh, d, num_slots, self.block_size,
                                table.shape[1], self.max_context, float(scale), out.data_ptr(),
                                workspace.data_ptr() if workspace is not None else 0, floats,
                                torch.cuda.current_stream(q.device).cuda_stream)
        return out


class PagedDecode(PagedAttention):
    """The decode plan: one query row per sequence, attending its whole context."""

    def __init__(self, block_table: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> None:
        super().__init__(block_table, context_lens, block_size)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                    context_lens: torch.Tensor, query_lens: torch.Tensor | None, scale: float,
                    block_size: int, window: int = 0, backend: str | None = None) -> torch.Tensor:
    """One call: PagedAttention(block_table, context_lens, block_size, query_lens, window)(q, k_pool, v_pool,
    scale, backend)."""
    return PagedAttention(block_table, context_lens, block_size, query_lens, window)(q, k_pool, v_pool, scale, backend)


def paged_attention_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, block_size: int) -> torch.Tensor:
    """One query row per sequence: paged_attention with query_lens None."""
    return PagedAttention(block_table, context_lens, block_size)(q, k_pool, v_pool, scale)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                      slot_mapping: torch.Tensor, backend: str | None = None) -> None:
    """Write this step's K and V ([T, KVH, D] each; rows may be strided views of a fused QKV output,
    heads contiguous within a row) into the pools [KVH, num_slots, D] at slot_mapping [T] (int64)."""
    if k.dim() != 3 or k.shape != v.shape or k_pool.shape != v_pool.shape or k.shape[1:] != (k_pool.shape[0], k_pool.shape[2]):
        raise ValueError(f"k/v must be [T, KVH, D] matching pools [KVH, slots, D]; got {tuple(k.shape)}, {tuple(k_pool.shape)}")
    if slot_mapping.dtype != torch.int64 or tuple(slot_mapping.shape) != (k.shape[0],):
        raise ValueError(f"slot_mapping must be int64 [{k.shape[0]}]")
    if backend is None:
        one_device = len({t.device for t in (k, v, k_pool, v_pool, slot_mapping)}) == 1
        backend = cache_backend(k.device, k_pool.dtype) if one_device else REFERENCE
    if backend == REFERENCE or not (k.dtype == v.dtype == k_pool.dtype == v_pool.dtype
                                    and all(t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (k, v))
                                    and k_pool.is_contiguous() and v_pool.is_contiguous()):
        reference.reshape_and_cache(k, v, k_pool, v_pool, slot_mapping)
        return
    slots = slot_mapping.contiguous()
    args = (k.data_ptr(), v.data_ptr(), k.stride(0), v.stride(0), slots.data_ptr(), k.shape[0], k.shape[1], k.shape[2],
            k_pool.shape[1], k.element_size(), k_pool.data_ptr(), v_pool.data_ptr())
    if backend == CUDA:
        # slots outside the pool are skipped by the kernel (checking them here would synchronize the stream)
        with device_of(k):
            cuda_module().reshape_and_cache(*args, torch.cuda.current_stream(k.device).cuda_stream)
        return
    if backend != CPP:
        raise ValueError(f"reshape_and_cache has no {backend!r} kernel")
    if k.shape[0] and (int(slot_mapping.min()) < 0 or int(slot_mapping.max()) >= k_pool.shape[1]):
        raise ValueError("a slot is outside the pool")
    cpu_module().reshape_and_cache(*args)
