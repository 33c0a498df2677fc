"""Quantization as passes over a loaded dense model (in the manner of gpt-fast's quantization handlers): each
pass replaces the model's projections with quantized ones and records what it did in `model.quantization`.
The model never quantizes itself.

- "int8": W8A8 with SmoothQuant (calibrated on fixed prompts) for the block projections, weight-only int8
  for the LM head (its activations stay float32: W8A8 there cost more quality than it saved time;
  weight-only keeps the logits close and reads a quarter of the bytes).
- "gguf": every projection (and the LM head) multiplies the file's own Q4_1 / Q8_0 / Q5_0 / Q4_K / Q6_K
  blocks, at every row count: rows are reordered and concatenated exactly as the dense weights were (Q/K
  un-permuted, Q|K|V and gate|up fused), so the weights are the same numbers, 5 (Q4_1), 8.5 (Q8_0), 5.5
  (Q5_0), 4.5 (Q4_K) or 6.6 (Q6_K) bits each. A fused projection of mixed types is rewritten into Q8_0
  (kernels/gguf_convert.py: Q5_0 exactly, the others within 0.56 of a step). The token embedding is read
  from its blocks too; no float32 copy of a quantized weight is kept. Projections of other types are
  dequantized at load, with a log line.
- "auto" (the default) is decided before loading by `auto_quantization`: "gguf" on CPU where the file's
  projections are all blocks the kernels multiply, else dense.

Both run float32 activations, on CPU only (their kernels are CPU kernels)."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable

import numpy as np
import torch

from kernels import GGUFMatrix
from kernels.gguf_convert import NATIVE, convert, fused_kernel_type, kernel_type
from services.inference.config import QUANTIZATIONS
from services.inference.models import smoothquant
from services.inference.models.gguf_file import GGUFFile
from services.inference.models.linear import GGUFEmbedding, GGUFLinear, Int8Linear, Int8WeightLinear
from services.inference.models.ops import unpermute_qk
from services.inference.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GGUF_BLOCK_TYPES = NATIVE                   # the block types kernels.GGUFMatrix multiplies


def projection_tensors(model_class: Any, gguf: GGUFFile) -> list[str]:
    """Every GGUF tensor a quantization pass gives blocks to: the layers' projections and the LM head."""
    return [name for sources in projection_groups(model_class, gguf) for name, _ in sources]


def projection_groups(model_class: Any, gguf: GGUFFile) -> list[list[tuple[str, int | None]]]:
    """The sources of every projection (one list per fused projection) and of the LM head."""
    hp = model_class.hparams_from_gguf(gguf)
    groups = [sources for i in range(hp.num_layers) for sources in model_class.projection_sources(hp, i).values()]
    return groups + [[(model_class.lm_head_source(hp), None)]]


def on_kernels(gguf: GGUFFile, sources: list[tuple[str, int | None]]) -> bool:
    """Whether the "gguf" pass multiplies these tensors' blocks: all of one block type the kernels know, as
    stored or, for a fused projection of mixed types, rewritten into Q8_0 at load (kernels.gguf_convert). Others (float tensors, other types, fused projections of kernel types with no common
    one) stay dense."""
    return fused_kernel_type(gguf.tensor_type(name) for name, _ in sources) is not None


def auto_quantization(model_class: Any, gguf: GGUFFile, device: str) -> str | None:
    """What --quantization auto means for this file on this device: "gguf" on CPU when some projection is
    blocks the kernels multiply (the file's own blocks are the fastest CPU path at every batch size, and the
    smallest; the rest load dense), else None (dense: float files, GPUs)."""
    if device != "cpu":
        return None
    return "gguf" if any(on_kernels(gguf, g) for g in projection_groups(model_class, gguf)) else None


def tensors_from_blocks(model_class: Any, gguf: GGUFFile, quantization: str | None) -> frozenset[str]:
    """The GGUF tensors `quantization`'s pass reads from the file's blocks, so that loading skips their
    dense float32 copies (SmolLM2: 540 MB, freed again at once, that raised the replica's peak and left
    the C heap fragmented): the projections and the LM head the kernels multiply for "gguf", and the
    embedding where it is such blocks."""
    if quantization != "gguf":
        return frozenset()
    names = {name for g in projection_groups(model_class, gguf) if on_kernels(gguf, g) for name, _ in g}
    if kernel_type(gguf.tensor_type("token_embd.weight")) in GGUF_BLOCK_TYPES:
        names.add("token_embd.weight")
    return frozenset(names)


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
    """Runs the named pass over a float32 CPU model loaded from `gguf`, in place (dense, but for the tensors
    tensors_from_blocks names when load_model loaded it)."""
    if model.quantization is not None:
        raise ValueError(f"the model is already quantized ({model.quantization})")
    check_quantization(quantization, model.dtype, model.device)
    PASSES[quantization](model, gguf)
    model.quantization = quantization


def int8_pass(model: Any, gguf: GGUFFile) -> None:
    """Smooth the dense weights, then W8A8 for every block projection and weight-only int8 for the LM head."""
    if not getattr(model, "SMOOTHQUANT", False):
        raise ValueError(f"int8 quantization calibrates the Llama block only; {model.architecture} serves "
                         "'gguf' or none")
    tok = Tokenizer.from_gguf(gguf)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
               for p in smoothquant.CALIBRATION_PROMPTS]
    smoothquant.smooth(model, smoothquant.activation_maxima(model, prompts))
    for layer in model.layers:
        for name in model.PROJECTIONS:
            setattr(layer, name, Int8Linear(getattr(layer, name).weight))
    model.lm_head = Int8WeightLinear(model.lm_head.weight)


def gguf_pass(model: Any, gguf: GGUFFile) -> None:
    """Every projection and the LM head whose blocks the kernels multiply (on_kernels) use them; the
    embedding reads its blocks (the LM head's, when tied). The others keep the dense weights they were loaded
    with, logged once. Dense weights of the replaced ones, where the model was loaded with them, are dropped;
    load_model loads it without them (tensors_from_blocks)."""

    converted: Counter[str] = Counter()

    def blocks(name: str, heads: int | None, to: str) -> tuple[torch.Tensor, str, int]:
        t = gguf.raw_tensor(name)
        k, kind = int(t.shape[0]), gguf.tensor_type(name)
        data, block_type = convert(np.asarray(t.data), kind, k, to)
        if block_type != kind:
            converted[f"{kind} as {block_type}"] += 1
        raw = torch.from_numpy(np.array(data, copy=True))
        if heads is not None:                                  # whole rows move: blocks stay intact
            raw = unpermute_qk(raw, heads)
        return raw, block_type, k

    def fused(sources: list[tuple[str, int | None]]) -> GGUFMatrix:
        to = fused_kernel_type(gguf.tensor_type(name) for name, _ in sources)
        parts = [blocks(name, heads, to) for name, heads in sources]
        return GGUFMatrix(torch.cat([p[0] for p in parts]), parts[0][1], parts[0][2])

    dense: Counter[str] = Counter()
    for i, layer in enumerate(model.layers):
        for name, sources in model.projection_sources(model.hp, i).items():
            if on_kernels(gguf, sources):
                setattr(layer, name, GGUFLinear(fused(sources)))
            else:
                dense.update(gguf.tensor_type(t) for t, _ in sources)
    head = [(model.lm_head_source(model.hp), None)]
    if on_kernels(gguf, head):
        model.lm_head = GGUFLinear(fused(head))
    else:
        dense[gguf.tensor_type(head[0][0])] += 1
    if kernel_type(gguf.tensor_type("token_embd.weight")) in GGUF_BLOCK_TYPES:
        tied = model.hp.tie_word_embeddings and isinstance(model.lm_head, GGUFLinear)
        model.embed = GGUFEmbedding(model.lm_head.kernel if tied else fused([("token_embd.weight", None)]))
    if converted:
        log.info("GGUF blocks converted at load for the kernels (kernels/gguf_convert.py)",
                 extra={"tensors": ", ".join(f"{k} {n}" for k, n in converted.most_common())})
    if dense:
        log.info("tensors without a GGUF kernel dequantized at load",
                 extra={"dtype": str(model.dtype).removeprefix("torch."),
                        "tensors": ", ".join(f"{k} {n}" for k, n in dense.most_common())})


PASSES: dict[str, Callable[[Any, GGUFFile], None]] = {"int8": int8_pass, "gguf": gguf_pass}
