"""float32 engine output equals HF transformers on the same GGUF (greedy tokens and logits)."""

from __future__ import annotations

import pytest
import torch

from services.inference.sampling import SamplingParams
from tests.conftest import assert_all_blocks_free

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "List three prime numbers."}],
]
RAW = [
    "Once upon a time",
    "def fibonacci(n):\n    ",
    "The mitochondria is",
    "1, 2, 3, 5, 8, 13,",
    "Translate to French: The weather is nice today.\nFrench:",
]
NUM_TOKENS = 48


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine("float32")


@pytest.fixture(scope="module")
def prompts(engine):
    texts = [engine.render_chat(m) for m in CHATS] + RAW
    return [engine.tokenizer.encode(t) for t in texts]


def hf_greedy_tokens(hf_model, prompts: list[list[int]], num_tokens: int = NUM_TOKENS,
                     pad_token_id: int = 2) -> list[list[int]]:
    """HF transformers' greedy continuation of each prompt, decoded step by step (tests/integration/test_engine_gpu.py)."""
    outs = []
    with torch.no_grad():
        for ids in prompts:
            gen = hf_model.generate(torch.tensor([ids]), max_new_tokens=num_tokens, do_sample=False,
                                    eos_token_id=None, pad_token_id=pad_token_id, attention_mask=torch.ones(1, len(ids)))
            outs.append(gen[0, len(ids):].tolist())
    return outs


def hf_choices(hf_model, prompt: list[int], continuation: list[int]) -> list[int]:
    """HF's greedy token after the prompt and after each prefix of `continuation`, in one teacher-forced forward.

    A continuation is HF's greedy one exactly when it equals these: HF's argmax given every prefix of it is
    its next token. So comparing them checks what comparing with HF's `generate` checks, at one forward a
    prompt instead of one a token (HF's float32 decode is slow here: 20 Gemma prompts took 150 s of the CI
    run). The two differ only in HF's own rounding between its batched and its incremental forward."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + continuation]), logits_to_keep=len(continuation) + 1).logits[0]
    return logits[:len(continuation)].argmax(-1).tolist()


def test_greedy_tokens_equal_hf_transformers_over_48_tokens(engine, prompts, hf_model):
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        assert len(out.new_token_ids) == NUM_TOKENS and out.finish_reason == "length"
        assert out.new_token_ids == hf_choices(hf_model, ids, out.new_token_ids), engine.tokenizer.decode(ids)
    assert_all_blocks_free(engine)


def prefill_logits(model, ids: list[int]) -> torch.Tensor:
    """One prefill step of `ids` through a Strata model (on its device): the logits of every position."""
    from services.inference.models.attention import AttentionMetadata, PrefillSpan, new_kv_pool, single_table_metadata
    from services.inference.models.compute import choose_compute

    hp, device, n = model.hp, model.device, len(ids)
    kv = [(new_kv_pool(hp.num_kv_heads, n, hp.head_dim, torch.float32, device),
           new_kv_pool(hp.num_kv_heads, n, hp.head_dim, torch.float32, device)) for _ in range(hp.num_layers)]
    slots = torch.arange(n, device=device)
    meta = AttentionMetadata(slots, 1, 0, None, None, [PrefillSpan(0, n, None, None)])
    single_table_metadata(meta, hp, [], [0])
    with torch.inference_mode():
        return model.compute_logits(model.forward(torch.tensor(ids, device=device), slots, kv, meta,
                                                  choose_compute(model, kv, 1)))


def assert_first_step_logits_close(model, hf_model, prompts: list[list[int]], atol: float = 1e-3) -> None:
    """One prefill step of each prompt through `model` (on its device) gives HF's logits within `atol`."""
    for ids in prompts:
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(prefill_logits(model, ids).cpu(), ref, atol=atol, rtol=0)


def test_first_step_logits_within_1e3_of_hf(model_fp32, hf_model, prompts):
    assert_first_step_logits_close(model_fp32, hf_model, prompts)


def test_text_output_decodes_the_generated_tokens(engine, prompts):
    out = engine.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert out.text == engine.tokenizer.decode(out.new_token_ids)
