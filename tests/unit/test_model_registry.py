"""The model registry: a GGUF's general.architecture picks the model class; an unknown one is refused at
load, before any weight is read, with the supported architectures named."""

from __future__ import annotations

import numpy as np
import pytest

from services.inference.models.gguf_file import GGUFFile
from services.inference.models.llama import LlamaModel
from services.inference.models.registry import MODELS, load_model, model_class


def write_gguf(path, architecture: str) -> GGUFFile:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path)


def test_llama_files_get_the_llama_class(gguf_file):
    assert gguf_file.architecture == "llama" and model_class("llama") is LlamaModel and MODELS["llama"] is LlamaModel


def test_an_unknown_architecture_is_refused_naming_the_supported_ones(tmp_path):
    gguf = write_gguf(tmp_path / "m.gguf", "mamba")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'mamba'; supported: gemma3, llama, qwen2, qwen3"):
        load_model(gguf)


def test_quantizing_twice_is_refused(model_gguf, gguf_file):
    from services.inference.models.quantize import quantize
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model_gguf, "int8", gguf_file)
