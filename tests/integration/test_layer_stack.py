"""kernels.LayerStack (a quantized model's layers in one C++ call per step: int8 W8A8, or the GGUF file's
Q4_1 / Q8_0 blocks) against the same model run layer by layer through the Python forward: same tokens,
same hidden states, pools written the same."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import kernels
from kernels import PagedAttention
from services.inference.models.attention import AttentionMetadata
from services.inference.models.compute import choose_compute
from services.inference.sampling import SamplingParams
from tests.conftest import assert_all_blocks_free
from tests.integration.test_engine_batching import chat_prompts

pytestmark = pytest.mark.skipif(not kernels.available(), reason="kernels not built (make install)")


QUANTIZATIONS = ["int8", "gguf"]


@pytest.fixture(scope="module", params=QUANTIZATIONS)
def engines(make_engine, request):
    fused, layered = make_engine(quantization=request.param), make_engine(quantization=request.param)
    layered.runner.compute = replace(layered.runner.compute, layer_stack=None)   # the per-layer Python forward
    assert fused.runner.compute.layer_stack is not None
    return fused, layered


def test_generation_with_the_stack_equals_layer_by_layer(engines):
    fused, layered = engines
    prompts = chat_prompts(fused, 5)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for batch in ([prompts[0]], prompts):                     # one stream, then five
        a, b = fused.generate(batch, params), layered.generate(batch, params)
        assert [o.new_token_ids for o in a] == [o.new_token_ids for o in b]
    assert_all_blocks_free(fused)
    assert_all_blocks_free(layered)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_multi_row_steps_give_the_same_hidden_states_and_pools(quantization, request):
    """A step like a speculative verification: two sequences with 5 and 3 new rows over cached context."""
    model = request.getfixturevalue(f"model_{quantization}")
    hp, bs = model.hp, 16
    pools = lambda: [(torch.zeros(hp.num_kv_heads, 8 * bs, hp.head_dim), torch.zeros(hp.num_kv_heads, 8 * bs, hp.head_dim))
                     for _ in range(hp.num_layers)]   # noqa: E731
    g = torch.Generator().manual_seed(0)
    table = torch.tensor([[3, 5, 0], [1, 6, 7]])
    ctx, qlens = torch.tensor([20, 40]), torch.tensor([5, 3])
    positions = torch.cat([torch.arange(15, 20), torch.arange(37, 40)])
    seq = torch.tensor([0] * 5 + [1] * 3)
    slots = table[seq, positions // bs] * bs + positions % bs
    ids = torch.randint(0, hp.vocab_size, (8,), generator=g)
    a, b = pools(), pools()
    for pa, pb in zip(a, b):                                   # the same earlier context in both
        for x, y in zip(pa, pb):
            y.copy_(x.normal_(generator=g))
    meta = lambda: AttentionMetadata(slot_mapping=slots, block_size=bs, num_paged_rows=8, paged_block_table=table,   # noqa: E731
                                     decode_mask=None, prefills=[], paged_plan=PagedAttention(table, ctx, bs, qlens))
    fused = model.forward(ids, positions, a, meta(), choose_compute(model, a, bs))
    layered = model.forward(ids, positions, b, meta(), replace(choose_compute(model, b, bs), layer_stack=None))
    torch.testing.assert_close(fused, layered, atol=1e-5, rtol=1e-5)
    for (ka, va), (kb, vb) in zip(a, b):
        torch.testing.assert_close(ka, kb, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(va, vb, atol=1e-6, rtol=1e-6)


def test_bad_steps_are_refused(model_int8):
    hp, bs = model_int8.hp, 16
    pools = [(torch.zeros(hp.num_kv_heads, 4 * bs, hp.head_dim), torch.zeros(hp.num_kv_heads, 4 * bs, hp.head_dim))
             for _ in range(hp.num_layers)]
    stack = model_int8.layer_stack(pools, bs)
    table, ctx = torch.tensor([[0, 1]]), torch.tensor([3])
    h, cos, sin = torch.zeros(1, hp.hidden_size), torch.zeros(1, hp.head_dim // 2), torch.zeros(1, hp.head_dim // 2)
    with pytest.raises(ValueError, match="outside the pool"):
        stack(h, cos, sin, torch.tensor([4 * bs]), PagedAttention(table, ctx, bs))
    with pytest.raises(ValueError, match="T <= 16"):
        stack(torch.zeros(17, hp.hidden_size), cos, sin, torch.tensor([0]), PagedAttention(table, ctx, bs))
    with pytest.raises(ValueError, match="plan"):
        stack(h, cos, sin, torch.tensor([2]), PagedAttention(torch.tensor([[0, 9]]), ctx, bs))
    assert model_int8.layer_stack([(k.bfloat16(), v.bfloat16()) for k, v in pools], bs) is None


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("block", ["Q8_0", "Q4_1", "Q5_0"])
def test_every_architecture_runs_in_the_stack_as_layer_by_layer(arch, block, tmp_path, tokenizer):
    """The stack's optional parts on tiny random files: qwen2's QKV bias, qwen3's Q/K head norms, and gemma3's
    whole block (head norms, norms after attention and MLP, GELU-tanh, a global and a local rotary table, six
    layer groups each with its own block tables, local layers over a window of 8 that the prompts pass, with
    their out-of-window blocks released): greedy tokens and the top-5 log-probabilities of every step equal
    the per-layer Python forward's (1e-4: Gemma's GELU is ours in the stack, torch's layer by layer)."""
    from services.inference.config import engine_config
    from services.inference.engine.factory import build_engine
    from services.inference.models.gguf_file import GGUFFile
    from services.inference.models.registry import load_model
    from tests.integration.test_architectures import PROMPTS, write_tiny_gguf

    write_tiny_gguf(tmp_path / "model.gguf", arch, block)
    model = load_model(GGUFFile(tmp_path / "model.gguf"), quantization="gguf")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    outs = []
    for stack in (True, False):
        engine = build_engine(engine_config(dtype="float32", quantization="gguf", kv_cache_memory_gb=0.02,
                                            block_size=4), model=model, tokenizer=tokenizer)
        assert engine.runner.compute.layer_stack is not None
        if not stack:
            engine.runner.compute = replace(engine.runner.compute, layer_stack=None)
        outs.append(engine.generate(PROMPTS + [PROMPTS[1][:5]], params))
        assert_all_blocks_free(engine)
    for a, b in zip(*outs):
        assert a.new_token_ids == b.new_token_ids
        got = [lp for step in a.logprobs for _, lp in step.top]
        want = [lp for step in b.logprobs for _, lp in step.top]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
