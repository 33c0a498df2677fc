"""The benchmarks' in-process engines over the installed models, by short name."""

from __future__ import annotations

MODELS = ("smollm2", "gemma")


def weights(model: str) -> dict:
    """build_engine's model and tokenizer for `model`: {} for SmolLM2 (the default model), Gemma 3 270M's file
    loaded through its GGUF kernels."""
    if model == "smollm2":
        return {}
    if model != "gemma":
        raise ValueError(f"unknown model {model!r}: one of {', '.join(MODELS)}")
    from services.inference.models import catalog
    from services.inference.models.gguf_file import GGUFFile
    from services.inference.models.registry import load_model
    from services.inference.models.tokenizer import Tokenizer

    gguf = GGUFFile(catalog.models_dir() / "gemma-3-270m-q4_k_m.gguf")
    return {"model": load_model(gguf, quantization="gguf"), "tokenizer": Tokenizer.from_gguf(gguf)}
