"""The decoder layers of a Llama model with quantized projections (int8 W8A8 as kernels.Int8Matrix, or
a GGUF file's Q4_1 / Q8_0 blocks as kernels.GGUFMatrix) in one C++ call per step, for steps of a few
rows (single-stream decode, small batches, speculative verification): the kernels a Python forward would
call one by one (add + RMSNorm, quantized GEMV, rotary, reshape-and-cache, paged attention,
SiLU-and-mul), in the same order with the same numbers, minus ~10 Python wrapper calls per layer. Everything constant (weights,
norms, KV pools, shapes) is checked and bound once; a step passes only its inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels._loader import available, cpu_module
from kernels.attention import PagedAttention
from kernels.backend import MAX_DECODE_ROWS
from kernels.gguf import GGUFMatrix
from kernels.quantized import Int8Matrix

Matrix = Int8Matrix | GGUFMatrix


@dataclass(frozen=True, slots=True)
class StackLayerWeights:
    """One layer: RMSNorm weights [hidden] float32; projections qkv (Q, K, V rows), o, gate_up (gate rows,
    then up rows), down; the layer's K/V pools [KVH, num_slots, head_dim] float32."""
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    qkv: Matrix
    o: Matrix
    gate_up: Matrix
    down: Matrix
    k_pool: torch.Tensor
    v_pool: torch.Tensor


def _projection(mod, m: Matrix):
    if isinstance(m, Int8Matrix):
        return mod.Projection(0, m.wq.data_ptr(), m.w_scale.data_ptr(), 0, 0, 0)
    qs, d, offsets, qh = m._pointers()
    return mod.Projection(1 + m.type_code, qs, 0, d, offsets, qh)


class LayerStack:
    def __init__(self, layers: list[StackLayerWeights], *, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 inter: int, block_size: int, eps: float, scale: float) -> None:
        if not available():
            raise RuntimeError("the kernels are not built or are forced off (STRATA_KERNELS=reference)")
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        shapes = {"qkv": (q_size + 2 * kv_size, hidden), "o": (hidden, q_size), "gate_up": (2 * inter, hidden),
                  "down": (hidden, inter)}
        num_slots = layers[0].k_pool.shape[1] if layers else 0
        for i, layer in enumerate(layers):
            for name, (n, k) in shapes.items():
                m = getattr(layer, name)
                if not isinstance(m, (Int8Matrix, GGUFMatrix)) or (m.n, m.k) != (n, k):
                    raise ValueError(f"layer {i} {name}: must be an Int8Matrix or GGUFMatrix of [{n}, {k}]")
            for name in ("attn_norm", "ffn_norm"):
                w = getattr(layer, name)
                if w.dtype != torch.float32 or tuple(w.shape) != (hidden,) or not w.is_contiguous():
                    raise ValueError(f"layer {i} {name}: must be contiguous float32 [{hidden}]")
            for pool in (layer.k_pool, layer.v_pool):
                if pool.dtype != torch.float32 or tuple(pool.shape) != (kv_heads, num_slots, head_dim) \
                        or not pool.is_contiguous():
                    raise ValueError(f"layer {i}: K/V pools must be contiguous float32 [{kv_heads}, {num_slots}, {head_dim}]")
        if num_slots % block_size:
            raise ValueError("the pools must hold whole blocks")
        self.layers = layers                          # keeps every bound tensor alive
        # called just before each run's C++ call, which holds no GIL for the whole stack (ModelRunner.on_forward)
        self.before_run: Callable[[], None] | None = None
        self.hidden, self.head_dim, self.block_size, self.num_slots = hidden, head_dim, block_size, num_slots
        mod = cpu_module()
        bound = [mod.StackLayer(w.attn_norm.data_ptr(), w.ffn_norm.data_ptr(), *(_projection(mod, m) for m in (
                     w.qkv, w.o, w.gate_up, w.down)), w.k_pool.data_ptr(), w.v_pool.data_ptr())
                 for w in layers]
        self._stack = mod.LayerStack(bound, hidden, heads, kv_heads, head_dim, inter, num_slots, block_size, float(eps),
                                    float(scale))

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                 plan: PagedAttention) -> torch.Tensor:
        """h [T, hidden] float32 (the embeddings; updated in place to the last layer's output, before the
        final norm); cos/sin [T, head_dim / 2]; slot_mapping [T] int64: where each row's K/V goes; plan:
        the step's attention layout over the same rows. Returns h."""
        t = h.shape[0] if h.dim() == 2 else -1
        if t < 1 or t > MAX_DECODE_ROWS or h.shape[1] != self.hidden or h.dtype != torch.float32 or not h.is_contiguous():
            raise ValueError(f"h must be contiguous float32 [T <= {MAX_DECODE_ROWS}, {self.hidden}], got {tuple(h.shape)}")
        half = self.head_dim // 2
        if any(x.dtype != torch.float32 or tuple(x.shape) != (t, half) or not x.is_contiguous() for x in (cos, sin)):
            raise ValueError(f"cos and sin must be contiguous float32 [{t}, {half}]")
        if slot_mapping.dtype != torch.int64 or tuple(slot_mapping.shape) != (t,) or not slot_mapping.is_contiguous():
            raise ValueError(f"slot_mapping must be contiguous int64 [{t}]")
        if int(slot_mapping.min()) < 0 or int(slot_mapping.max()) >= self.num_slots:
            raise ValueError("a slot is outside the pool")
        if plan.num_rows != t or plan.block_size != self.block_size or plan.min_block < 0 \
                or plan.max_block >= self.num_slots // self.block_size:
            raise ValueError("the attention plan does not describe these rows over these pools")
        if self.before_run is not None:
            self.before_run()
        self._stack.run(h.data_ptr(), t, cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(),
                        plan.block_table.data_ptr(), plan.context_lens.data_ptr(), plan.query_start.data_ptr(),
                        len(plan.context_lens), plan.block_table.shape[1])
        return h
