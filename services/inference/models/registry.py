"""The model registry: a GGUF file's `general.architecture` picks the model class. A new architecture is one
file implementing `CausalLM` plus one line in MODELS; an unknown one is refused at load, naming the
supported ones."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

import torch

from kernels import LayerStack
from services.inference.models.attention import AttentionMetadata
from services.inference.models.compute import ComputePath
from services.inference.models.gemma3 import Gemma3Model
from services.inference.models.gguf_file import GGUFFile
from services.inference.models.llama import LlamaModel
from services.inference.models.quantize import auto_quantization, check_quantization, quantize, tensors_from_blocks


class CausalLM(Protocol):
    """What the engine, the quantization passes and the kernels' layer stack use of a model."""
    hp: Any                                   # hyper-parameters: num_layers, num_kv_heads, head_dim, vocab_size, ...
    dtype: torch.dtype
    device: torch.device
    quantization: str | None                  # set by the quantization pass that ran, if any
    architecture: str                         # the GGUF's general.architecture
    PROJECTIONS: tuple[str, ...]              # a layer's projection attributes

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  skip: Collection[str] = ()) -> "CausalLM": ...
    @staticmethod
    def hparams_from_gguf(gguf: GGUFFile) -> Any: ...
    @staticmethod
    def projection_sources(hp: Any, layer: int) -> dict[str, list[tuple[str, int | None]]]: ...
    @staticmethod
    def lm_head_source(hp: Any) -> str: ...
    def layer_stack(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                    layer_groups: Sequence[int] | None = None) -> LayerStack | None: ...
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                compute: ComputePath) -> torch.Tensor: ...
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


MODELS: dict[str, type[CausalLM]] = {
    "llama": LlamaModel,
    "qwen2": LlamaModel,         # the same block with Q/K/V biases (models/llama.py)
    "qwen3": LlamaModel,         # the same block with per-head Q/K norms
    "gemma3": Gemma3Model,       # sliding-window layers, sandwich norms, GELU (models/gemma3.py)
}


def model_class(architecture: str) -> type[CausalLM]:
    """The class serving `architecture` (a GGUF's general.architecture)."""
    cls = MODELS.get(architecture)
    if cls is None:
        raise ValueError(f"unsupported GGUF architecture {architecture!r}; supported: {', '.join(sorted(MODELS))}")
    return cls


def resolve_quantization(quantization: str | None, gguf: GGUFFile, device: str) -> str | None:
    """"auto" decided for this file on this device (models/quantize.auto_quantization); others as given."""
    if quantization != "auto":
        return quantization
    return auto_quantization(model_class(gguf.architecture), gguf, device)


def load_model(gguf: GGUFFile, dtype: torch.dtype = torch.float32, quantization: str | None = None,
               device: str | torch.device = "cpu") -> CausalLM:
    """The file's model: its architecture's class with dense weights in `dtype` on `device`, then the
    `quantization` pass (None: dense). The tensors that pass gives the file's blocks are never loaded dense.
    What cannot run as asked is refused before anything loads."""
    device = torch.device(device)
    check_quantization(quantization, dtype, device)
    cls = model_class(gguf.architecture)
    model = cls.from_gguf(gguf, dtype, device, skip=tensors_from_blocks(cls, gguf, quantization))
    if quantization is not None:
        quantize(model, quantization, gguf)
    return model
