"""--quantization auto, the default: the file's own blocks on CPU wherever the kernels multiply every
projection's block type; dense for float files, on GPUs, and with an explicit bfloat16 dtype. A gguf model
keeps no float32 copy of its quantized weights."""

from __future__ import annotations

import numpy as np
import torch

from services.inference.config import engine_config
from services.inference.engine.factory import resolve
from services.inference.models.gguf_file import GGUFFile
from services.inference.models.linear import DenseLinear, GGUFEmbedding, GGUFLinear
from services.inference.models.llama import LlamaModel
from services.inference.models.quantize import auto_quantization, projection_tensors


def write_dense_llama(path, hidden: int = 64, inter: int = 128, layers: int = 1, vocab: int = 32) -> GGUFFile:
    """A float32 llama GGUF with random weights: every projection dense."""
    import gguf

    rng = np.random.default_rng(0)
    w = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(128)
    writer.add_vocab_size(vocab)
    writer.add_tensor("token_embd.weight", w(vocab, hidden))
    for i in range(layers):
        p = f"blk.{i}."
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (hidden // 2, hidden)),
                            ("attn_v", (hidden // 2, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))):
            writer.add_tensor(p + name + ".weight", w(*shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path)


def test_smollm2s_blocks_run_as_they_are_on_cpu_only(gguf_file):
    assert {gguf_file.tensor_type(n) for n in projection_tensors(LlamaModel, gguf_file)} == {"Q4_1", "Q8_0"}
    assert auto_quantization(LlamaModel, gguf_file, "cpu") == "gguf"
    assert auto_quantization(LlamaModel, gguf_file, "cuda") is None


def test_a_float_file_runs_dense(tmp_path):
    dense = write_dense_llama(tmp_path / "dense.gguf")
    assert auto_quantization(LlamaModel, dense, "cpu") is None
    config = resolve(engine_config(device="cpu"), gguf=dense)
    assert config.model.quantization is None and config.model.dtype in ("float32", "bfloat16")


def test_the_default_resolves_to_gguf_with_float32_activations(gguf_file):
    assert engine_config().model.quantization == "auto"
    config = resolve(engine_config(device="cpu"), gguf=gguf_file)
    assert (config.model.quantization, config.model.dtype) == ("gguf", "float32")
    # an explicit bfloat16 dtype asks for dense weights; an explicit none too
    assert resolve(engine_config(device="cpu", dtype="bfloat16"), gguf=gguf_file).model.quantization is None
    assert resolve(engine_config(device="cpu", quantization=None), gguf=gguf_file).model.quantization is None


def test_an_already_loaded_model_decides_auto(model_fp32, model_gguf):
    assert resolve(engine_config(), model=model_fp32).model.quantization is None
    assert resolve(engine_config(), model=model_gguf).model.quantization == "gguf"


def test_a_gguf_model_keeps_no_float_copy_of_its_quantized_weights(model_gguf, gguf_file):
    assert isinstance(model_gguf.embed, GGUFEmbedding) and isinstance(model_gguf.lm_head, GGUFLinear)
    assert model_gguf.embed.matrix is model_gguf.lm_head.kernel          # tied: one table
    for layer in model_gguf.layers:
        for name in LlamaModel.PROJECTIONS:
            proj = getattr(layer, name)
            assert isinstance(proj, GGUFLinear) and not isinstance(proj, DenseLinear)
            assert not any(isinstance(getattr(proj, slot, None), (torch.Tensor, DenseLinear))
                           for slot in ("dense", "weight_t"))
    # the embedding rows come back exactly as ggml dequantizes them
    ids = torch.tensor([0, 5, 49151, 5])
    table = torch.from_numpy(gguf_file.dequantize("token_embd.weight"))
    torch.testing.assert_close(model_gguf.embed(ids), table[ids], atol=0, rtol=0)


def test_a_gguf_model_loads_its_blocks_without_a_dense_detour(gguf_file, monkeypatch):
    """load_model never dequantizes a tensor the gguf pass reads from the blocks (SmolLM2: 540 MB of float32
    that raised the replica's peak and load time), and the model is the one the session's fixture holds."""
    from services.inference.models.registry import load_model

    dequantized = []
    dequantize = GGUFFile.dequantize
    monkeypatch.setattr(GGUFFile, "dequantize", lambda self, name: dequantized.append(name) or dequantize(self, name))
    model = load_model(gguf_file, quantization="gguf")
    blocks = set(projection_tensors(LlamaModel, gguf_file)) | {"token_embd.weight"}
    assert dequantized and not blocks & set(dequantized)          # only the norms were read dense
    assert all(name.endswith("norm.weight") for name in dequantized)
    ids = torch.tensor([1, 500, 49151])
    assert torch.equal(model.embed(ids), torch.from_numpy(gguf_file.dequantize("token_embd.weight"))[ids])
