"""Fixtures shared by the unit tests' modules (a session fixture defined in one module and imported into
another is built once per module that names it: here it is built once)."""

from __future__ import annotations

import pytest

from services.inference.models.gguf_file import GGUFFile, default_model_path
from services.inference.models.tokenizer import Tokenizer


@pytest.fixture(scope="session")   # test_tokenizer_pre and _corpus: built once (~25 s)
def tokenizers(tmp_path_factory):
    """pre -> (ours, transformers'): SmolLM2's vocabulary written again with each `tokenizer.ggml.pre`."""
    transformers = pytest.importorskip("transformers")
    from tests.unit.test_tokenizer_pre import write_with_pre

    source = GGUFFile(default_model_path())
    out = {}
    for pre in ("llama-bpe", "qwen2", "smollm"):
        directory = tmp_path_factory.mktemp(pre)
        write_with_pre(source, directory / "tok.gguf", pre)
        out[pre] = (Tokenizer.from_gguf(GGUFFile(directory / "tok.gguf")),
                    transformers.AutoTokenizer.from_pretrained(str(directory), gguf_file="tok.gguf"))
    return out
