"""Quantization as passes over a loaded dense model (in the manner of gpt-fast's quantization handlers): each
pass replaces the model's projections with quantized ones and records what it did in `model.quantization`.
The model never quantizes itself.

- "int8": W8A8 with SmoothQuant (calibrated on fixed prompts) for the block projections, weight-only int8
  for the LM head (its activations stay float32: W8A8 there cost more quality than it saved time;
  weight-only keeps the logits close and reads a quarter of the bytes).
- "gguf": every projection (and the LM head) multiplies the file's own Q4_1 / Q8_0 blocks for decode-sized
  inputs: rows are reordered and concatenated exactly as the dense weights were (Q/K un-permuted, Q|K|V and
  gate|up fused), so the weights are the same numbers, 5 (Q4_1) or 8.5 (Q8_0) bits each.

Both run float32 activations, on CPU only (their kernels are CPU kernels)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from kernels import GGUFMatrix
from services.inference.config import QUANTIZATIONS
from services.inference.models import smoothquant
from services.inference.models.gguf_file import GGUFFile
from services.inference.models.linear import GGUFLinear, Int8Linear, Int8WeightLinear
from services.inference.models.ops import unpermute_qk
from services.inference.models.tokenizer import Tokenizer

GGUF_BLOCK_TYPES = ("Q4_1", "Q8_0")          # the block types kernels.GGUFMatrix multiplies


def check_quantization(quantization: str | None, dtype: torch.dtype, device: torch.device) -> None:
    """Refuses, before anything loads, a quantization that cannot run as asked."""
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"unknown quantization {quantization!r}; supported: {', '.join(QUANTIZATIONS)}")
    if quantization and dtype != torch.float32:
        raise ValueError(f"{quantization} quantization runs with float32 activations (dtype float32)")
    if quantization and device.type != "cpu":
        raise ValueError(f"{quantization} quantization runs on CPU only (its kernels are CPU kernels); "
                         f"device {device} serves dense weights")


def quantize(model: Any, quantization: str, gguf: GGUFFile) -> None:
    """Runs the named pass over a dense float32 CPU model loaded from `gguf`, in place."""
    if model.quantization is not None:
        raise ValueError(f"the model is already quantized ({model.quantization})")
    check_quantization(quantization, model.dtype, model.device)
    PASSES[quantization](model, gguf)
    model.quantization = quantization


def int8_pass(model: Any, gguf: GGUFFile) -> None:
    """Smooth the dense weights, then W8A8 for every block projection and weight-only int8 for the LM head."""
    tok = Tokenizer.from_gguf(gguf)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
               for p in smoothquant.CALIBRATION_PROMPTS]
    smoothquant.smooth(model, smoothquant.activation_maxima(model, prompts))
    for layer in model.layers:
        for name in model.PROJECTIONS:
            setattr(layer, name, Int8Linear(getattr(layer, name).weight))
    model.lm_head = Int8WeightLinear(model.lm_head.weight)


def gguf_pass(model: Any, gguf: GGUFFile) -> None:
    """Every projection and the LM head multiply the file's own blocks for decode-sized inputs (the dense
    weights stay for larger ones)."""

    def blocks(name: str, heads: int | None) -> tuple[torch.Tensor, str, int]:
        t = gguf.raw_tensor(name)
        kind = gguf.tensor_type(name)
        if kind not in GGUF_BLOCK_TYPES:
            raise ValueError(f"quantization 'gguf' needs {' or '.join(GGUF_BLOCK_TYPES)} tensors; {name} is {kind}")
        raw = torch.from_numpy(np.array(t.data, copy=True))
        if heads is not None:                                  # whole rows move: blocks stay intact
            raw = unpermute_qk(raw, heads)
        return raw, kind, int(t.shape[0])

    def fused(sources: list[tuple[str, int | None]]) -> GGUFMatrix:
        parts = [blocks(name, heads) for name, heads in sources]
        kinds = {p[1] for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"fused projections need one block type, got {sorted(kinds)}")
        return GGUFMatrix(torch.cat([p[0] for p in parts]), kinds.pop(), parts[0][2])

    for i, layer in enumerate(model.layers):
        for name, sources in model.projection_sources(model.hp, i).items():
            setattr(layer, name, GGUFLinear(fused(sources), getattr(layer, name).weight))
    model.lm_head = GGUFLinear(fused([(model.lm_head_source(model.hp), None)]), model.lm_head.weight)


PASSES: dict[str, Callable[[Any, GGUFFile], None]] = {"int8": int8_pass, "gguf": gguf_pass}
