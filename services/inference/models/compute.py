"""Which implementation runs a model's steps, decided once when the model is bound to its KV pools
(`choose_compute`) and recorded per step (`StepPath`).

- the layer stack (kernels.LayerStack): a quantized model's layers in one C++ call, for steps of only paged
  rows, at most kernels.MAX_DECODE_ROWS of them (single-stream decode, small batches, verification runs);
- the row kernels: a float32 model's per-layer forward with the fused add + RMSNorm, rotary and SiLU-and-mul
  kernels (C++, CUDA or Triton);
- torch: the same forward in plain torch (bfloat16 models; kernels not built or forced off).
Paged attention and reshape-and-cache run where `kernels` (kernels.backend.select) says, on every path but
the stack's (which runs its own)."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import torch

from kernels import MAX_DECODE_ROWS, KernelBackends, LayerStack
from kernels.backend import REFERENCE, select

log = logging.getLogger(__name__)


class StepPath(enum.Enum):
    LAYER_STACK = "layer_stack"
    ROW_KERNELS = "row_kernels"
    TORCH = "torch"


@dataclass(frozen=True, slots=True)
class ComputePath:
    kernels: KernelBackends            # where the row kernels, paged attention and reshape-and-cache run
    layer_stack: LayerStack | None     # the quantized layers bound to the KV pools, or None

    @property
    def row_kernels(self) -> bool:
        """Whether the per-layer forward runs the fused row kernels (else plain torch)."""
        return self.kernels.rows != REFERENCE

    @property
    def paged_attention(self) -> bool:
        """Whether paged rows read the KV pools through the paged-attention kernel (else decode matmuls)."""
        return self.kernels.attention != REFERENCE

    @property
    def paged_max_rows(self) -> int:
        """The longest chunk laid out as paged rows: a few rows with the kernel (short prefill chunks,
        verification runs), else decodes only; longer chunks are prefill spans (torch's SDPA)."""
        return MAX_DECODE_ROWS if self.paged_attention else 1

    def step_path(self, num_rows: int, only_paged_rows: bool) -> StepPath:
        """The path of a step of `num_rows` rows (all paged rows, or some prefill spans too)."""
        if self.layer_stack is not None and only_paged_rows and num_rows <= MAX_DECODE_ROWS:
            return StepPath.LAYER_STACK
        return StepPath.ROW_KERNELS if self.row_kernels else StepPath.TORCH

    def describe(self) -> dict[str, str]:
        k = self.kernels
        return {"layer_stack": "on" if self.layer_stack is not None else "off", "row_kernels": k.rows,
                "paged_attention": k.attention, "reshape_and_cache": k.cache}


def choose_compute(model: Any, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                   layer_groups: Sequence[int] | None = None) -> ComputePath:
    """The path for `model` over these KV pools: the kernels' implementations for its device and dtypes, and
    the layer stack where the model is quantized, the kernels are on and the pools are float32.
    layer_groups: each layer's KV layer group (engine/kv_layout.py), which a sliding-window model's stack needs."""
    pool = kv_caches[0][0]
    kernels = select(model.device, model.dtype, pool.dtype, model.hp.head_dim, block_size)
    return ComputePath(kernels, model.layer_stack(kv_caches, block_size, layer_groups))
