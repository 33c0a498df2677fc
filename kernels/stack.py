"""The decoder layers of a Llama-family model (llama, qwen2, qwen3, gemma3) with quantized projections (int8
W8A8 as kernels.Int8Matrix, or a GGUF file's Q4_1 / Q8_0 / Q5_0 / Q4_K / Q6_K blocks as kernels.GGUFMatrix) in one C++
call per step, for steps of a few rows (single-stream decode, small batches, speculative verification): the
kernels a Python forward would call one by one (add + RMSNorm, quantized GEMV, QKV bias, Q/K head norms,
rotary, reshape-and-cache, paged attention with its window, SiLU- or GELU-and-mul, Gemma's output norms), in
the same order with the same numbers, minus ~10 Python wrapper calls per layer. Everything constant (weights,
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
    then up rows), down; the layer's K/V pools [KVH, num_slots, head_dim] float32. Where the architecture has
    them: a QKV bias [q + 2 kv] (qwen2), RMSNorm weights over each Q and K head [head_dim] (qwen3, gemma3),
    norms of the attention and MLP outputs [hidden] (gemma3). `group`: the layer group whose block tables it
    reads (engine/kv_layout.py), `rope`: which rotary table, `window`: its sliding window (0: none)."""
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    qkv: Matrix
    o: Matrix
    gate_up: Matrix
    down: Matrix
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    qkv_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None
    group: int = 0
    rope: int = 0
    window: int = 0


ACTIVATIONS = ("silu", "gelu_tanh")          # csrc/cpu/layer_stack.h Activation


def _projection(mod, m: Matrix):
    if isinstance(m, Int8Matrix):
        return mod.Projection(0, m.wq.data_ptr(), m.w_scale.data_ptr(), 0, 0, 0, 0)
    qs, d, offsets, qh, sc = m._pointers()
    return mod.Projection(1 + m.type_code, qs, 0, d, offsets, qh, sc)


def _vector(w: torch.Tensor | None, size: int, what: str) -> int:
    """The address of an optional float32 vector [size] (0 when absent), checked."""
    if w is None:
        return 0
    if w.dtype != torch.float32 or tuple(w.shape) != (size,) or not w.is_contiguous():
        raise ValueError(f"{what} must be contiguous float32 [{size}]")
    return w.data_ptr()


class LayerStack:
    def __init__(self, layers: list[StackLayerWeights], *, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 inter: int, block_size: int, eps: float, scale: float, act: str = "silu") -> None:
        if not available():
            raise RuntimeError("the kernels are not built or are forced off (STRATA_KERNELS=reference)")
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        shapes = {"qkv": (q_size + 2 * kv_size, hidden), "o": (hidden, q_size), "gate_up": (2 * inter, hidden),
                  "down": (hidden, inter)}
        num_slots = layers[0].k_pool.shape[1] if layers else 0
        mod = cpu_module()
        bound = []
        for i, layer in enumerate(layers):
            for name, (n, k) in shapes.items():
                m = getattr(layer, name)
                if not isinstance(m, (Int8Matrix, GGUFMatrix)) or (m.n, m.k) != (n, k):
                    raise ValueError(f"layer {i} {name}: must be an Int8Matrix or GGUFMatrix of [{n}, {k}]")
            for pool in (layer.k_pool, layer.v_pool):
                if pool.dtype != torch.float32 or tuple(pool.shape) != (kv_heads, num_slots, head_dim) \
                        or not pool.is_contiguous():
                    raise ValueError(f"layer {i}: K/V pools must be contiguous float32 [{kv_heads}, {num_slots}, {head_dim}]")
            if (layer.q_norm is None) != (layer.k_norm is None) or min(layer.group, layer.rope, layer.window) < 0:
                raise ValueError(f"layer {i}: Q and K norms go together; group, rope and window are >= 0")
            vectors = [_vector(getattr(layer, name), size, f"layer {i} {name}") for name, size in (
                ("attn_norm", hidden), ("ffn_norm", hidden), ("qkv_bias", q_size + 2 * kv_size), ("q_norm", head_dim),
                ("k_norm", head_dim), ("post_attn_norm", hidden), ("post_ffn_norm", hidden))]
            if not vectors[0] or not vectors[1]:
                raise ValueError(f"layer {i}: attn_norm and ffn_norm are required")
            bound.append(mod.StackLayer(vectors[0], vectors[1], *(_projection(mod, getattr(layer, m)) for m in (
                "qkv", "o", "gate_up", "down")), layer.k_pool.data_ptr(), layer.v_pool.data_ptr(), *vectors[2:],
                layer.group, layer.rope, layer.window))
        if num_slots % block_size:
            raise ValueError("the pools must hold whole blocks")
        self.layers = layers                          # keeps every bound tensor alive
        # called just before each run's C++ call, which holds no GIL for the whole stack (ModelRunner.on_forward)
        self.before_run: Callable[[], None] | None = None
        self.hidden, self.head_dim, self.block_size, self.num_slots = hidden, head_dim, block_size, num_slots
        # per layer group: its first layer (a model's per-layer metadata is its group's)
        first: dict[int, int] = {}
        for i, layer in enumerate(layers):
            first.setdefault(layer.group, i)
        if sorted(first) != list(range(len(first))):
            raise ValueError("layer groups must be numbered 0, 1, ... without gaps")
        if any(layer.window != layers[first[layer.group]].window for layer in layers):
            raise ValueError("the layers of a group share its window")
        self.first_layers = [first[g] for g in range(len(first))]
        self.num_ropes = 1 + max((layer.rope for layer in layers), default=0)
        self._stack = mod.LayerStack(bound, hidden, heads, kv_heads, head_dim, inter, num_slots, block_size, float(eps),
                                    float(scale), ACTIVATIONS.index(act))

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                 plan: PagedAttention) -> torch.Tensor:
        """A stack of one layer group and one rotary table (every Llama-block model): h [T, hidden] float32
        (the embeddings; updated in place to the last layer's output, before the final norm); cos/sin
        [T, head_dim / 2]; slot_mapping [T] int64: where each row's K/V goes; plan: the step's attention layout
        over the same rows. Returns h."""
        return self.run(h, [(cos, sin)], [(slot_mapping, plan)])

    def run(self, h: torch.Tensor, ropes: list[tuple[torch.Tensor, torch.Tensor]],
            layouts: list[tuple[torch.Tensor, PagedAttention]]) -> torch.Tensor:
        """h as __call__; ropes: (cos, sin) per rotary table; layouts: (slot_mapping, plan) per layer group
        (that of its first layer, first_layers[g])."""
        t = h.shape[0] if h.dim() == 2 else -1
        if t < 1 or t > MAX_DECODE_ROWS or h.shape[1] != self.hidden or h.dtype != torch.float32 or not h.is_contiguous():
            raise ValueError(f"h must be contiguous float32 [T <= {MAX_DECODE_ROWS}, {self.hidden}], got {tuple(h.shape)}")
        half = self.head_dim // 2
        if len(ropes) != self.num_ropes or any(x.dtype != torch.float32 or tuple(x.shape) != (t, half)
                                               or not x.is_contiguous() for pair in ropes for x in pair):
            raise ValueError(f"{self.num_ropes} rotary table(s) of cos and sin, contiguous float32 [{t}, {half}]")
        if len(layouts) != len(self.first_layers):
            raise ValueError(f"one (slot_mapping, plan) per layer group ({len(self.first_layers)})")
        groups = []
        for (slot_mapping, plan), first in zip(layouts, self.first_layers):
            if slot_mapping.dtype != torch.int64 or tuple(slot_mapping.shape) != (t,) or not slot_mapping.is_contiguous():
                raise ValueError(f"slot_mapping must be contiguous int64 [{t}]")
            if int(slot_mapping.min()) < 0 or int(slot_mapping.max()) >= self.num_slots:
                raise ValueError("a slot is outside the pool")
            if plan.num_rows != t or plan.block_size != self.block_size or plan.min_block < 0 \
                    or plan.max_block >= self.num_slots // self.block_size or plan.window != self.layers[first].window:
                raise ValueError("the attention plan does not describe these rows over these pools")
            groups.append((slot_mapping.data_ptr(), plan.block_table.data_ptr(), plan.context_lens.data_ptr(),
                           plan.query_start.data_ptr(), len(plan.context_lens), plan.block_table.shape[1]))
        if self.before_run is not None:
            self.before_run()
        self._stack.run(h.data_ptr(), t, [(c.data_ptr(), s.data_ptr()) for c, s in ropes], groups)
        return h
