"""Speculative decoding inside continuous batching (the real model on its served path, the file's blocks through
the layer stack; float32 for preemption): greedy output is the same with
and without n-gram speculation — stop strings, EOS and max_tokens inside an accepted run, preemption —,
rejected slots and aborted requests give every KV block back, requests can turn it off, and the
engine stops proposing when the batch is large."""

from __future__ import annotations

import pytest

from services.inference.engine.engine import InvalidRequestError
from services.inference.sampling import SamplingParams
from tests.conftest import assert_all_blocks_free

CODE = '''def area(width, height):
    return width * height


def perimeter(width, height):
    return 2 * (width + height)
'''
GROUNDED = [
    "Repeat the following code exactly, then stop:\n\n" + CODE,
    "Copy this sentence word for word: The quick brown fox jumps over the lazy dog near the river bank.",
]
OPEN = ["Write one sentence about the moon.", "Name three colours."]


def prompts(engine, texts):
    return [engine.tokenizer.encode(engine.render_chat([{"role": "user", "content": t}])) for t in texts]


@pytest.fixture(scope="module")
def engines(make_engine):
    plain = make_engine("float32", quantization="gguf")
    spec = make_engine("float32", quantization="gguf", speculative="ngram", num_speculative_tokens=4, spec_max_batch=4)
    return plain, spec


@pytest.fixture(autouse=True)
def pool_returns_to_full(engines):
    yield
    for e in engines:
        assert_all_blocks_free(e)


def tokens(outs):
    return [o.new_token_ids for o in outs]


def test_greedy_outputs_are_identical_with_and_without_speculation(engines):
    plain, spec = engines
    ps = prompts(plain, GROUNDED + OPEN)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    before = spec.stats()
    assert tokens(spec.generate(ps, params)) == tokens(plain.generate(ps, params))       # batched, 4 <= spec_max_batch
    for p in ps[:2]:                                                                         # alone
        assert tokens(spec.generate([p], params)) == tokens(plain.generate([p], params))
    after = spec.stats()
    assert after.spec_accepted_tokens_total > before.spec_accepted_tokens_total > -1
    assert after.spec_mean_tokens_per_step > 1.5                                            # the grounded prompts copy
    assert sum(after.spec_accepted_by_position) == after.spec_accepted_tokens_total


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 6, 11])
def test_max_tokens_inside_an_accepted_run_is_exact(engines, max_tokens):
    plain, spec = engines
    ps = prompts(plain, GROUNDED[:1])
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    out = spec.generate(ps, params)[0]
    assert out.new_token_ids == plain.generate(ps, params)[0].new_token_ids
    assert len(out.new_token_ids) == max_tokens and out.finish_reason == "length"


def test_stop_strings_and_eos_inside_an_accepted_run(engines):
    plain, spec = engines
    ps = prompts(plain, GROUNDED[:1])
    full = plain.generate(ps, SamplingParams(temperature=0, max_tokens=40))[0]
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 6]          # text from the middle of a copied run
    assert stop.strip()
    for params in (SamplingParams(temperature=0, max_tokens=40, stop=(stop,)), SamplingParams(temperature=0, max_tokens=200)):
        a, b = spec.generate(ps, params)[0], plain.generate(ps, params)[0]
        assert (a.new_token_ids, a.text, a.finish_reason) == (b.new_token_ids, b.text, b.finish_reason)
    assert a.finish_reason == "stop"                                          # the copy ends with EOS


def test_logprobs_of_tokens_from_an_accepted_run_match_plain_decoding(engines):
    plain, spec = engines
    ps = prompts(plain, GROUNDED[:1])
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)
    before = spec.stats().spec_accepted_tokens_total
    a, b = spec.generate(ps, params)[0], plain.generate(ps, params)[0]
    assert spec.stats().spec_accepted_tokens_total > before
    assert [lp.token_id for lp in a.logprobs] == a.new_token_ids == b.new_token_ids
    for x, y in zip(a.logprobs, b.logprobs):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-3)
        assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_preemption_with_speculation_gives_identical_outputs(engines, make_engine):
    # float32: a preempted request is recomputed as a prefill (SDPA) whose last bits differ from the decode
    # kernels'; the file's blocks quantize activations to int8, where such a difference can move a code and
    # then a near-tie token. In float32 the two agree to the token here.
    plain = make_engine("float32")
    ps = prompts(plain, GROUNDED + OPEN)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    longest = max(len(p) for p in ps) + 40
    tiny = make_engine("float32", speculative="ngram", num_kv_blocks=(longest // 16 + 1) * 2, max_model_len=longest + 16)
    squeezed = tiny.generate(ps, params)
    assert tiny.stats().num_preemptions_total > 0 and tiny.stats().spec_drafts_total > 0
    assert tokens(squeezed) == tokens(plain.generate(ps, params))
    assert_all_blocks_free(tiny)


def test_aborting_mid_speculation_frees_every_block(engines):
    _, spec = engines
    rid = spec.add_request(prompts(spec, GROUNDED[:1])[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    req = spec.scheduler.requests[rid]
    for _ in range(100):                              # decode until a step would carry proposals
        spec._propose()
        if req.spec_token_ids and req.num_output_tokens > 4:
            break
        spec.step()
    assert req.spec_token_ids
    sched = spec.scheduler.schedule()                 # their slots allocated
    assert any(c.spec_token_ids for c in sched.chunks)
    assert spec.abort_request(rid).finish_reason == "abort"
    assert_all_blocks_free(spec)


def test_requests_can_turn_speculation_off_and_bad_values_are_refused(engines):
    plain, spec = engines
    p = prompts(plain, GROUNDED[:1])[0]
    before = spec.stats().spec_drafts_total
    rid = spec.add_request(p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), num_speculative_tokens=0)
    while spec.has_unfinished_requests():
        spec.step()
    assert spec.stats().spec_drafts_total == before and rid not in spec.scheduler.requests
    for bad in (-1, 17):
        with pytest.raises(InvalidRequestError, match="num_speculative_tokens"):
            spec.add_request(p, SamplingParams(max_tokens=4), num_speculative_tokens=bad)


def test_no_proposals_while_the_batch_is_larger_than_spec_max_batch(engines):
    plain, spec = engines
    ps = prompts(plain, GROUNDED * 3)                 # 6 decoding requests > spec_max_batch = 4
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = spec.stats().spec_drafts_total
    assert tokens(spec.generate(ps, params)) == tokens(plain.generate(ps, params))
    assert spec.stats().spec_drafts_total == before


def test_a_step_with_proposals_stays_within_the_decode_kernels_rows(engines, monkeypatch):
    """Four requests proposing k = 4 would verify 20 rows, past the 16 the layer kernels take (the float32
    path beyond is several times slower): the longest runs are shortened to fit."""
    from kernels import MAX_DECODE_ROWS

    plain, spec = engines
    ps = prompts(plain, GROUNDED * 2)
    rows = []
    execute = spec.runner.execute
    monkeypatch.setattr(spec.runner, "execute", lambda sched: rows.append(sched.num_batched_tokens) or execute(sched))
    monkeypatch.setattr(spec, "config", spec.config.with_settings(spec_row_cost=0.0))   # always the longest k
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    assert tokens(spec.generate(ps, params)) == tokens(plain.generate(ps, params))
    decode_steps = rows[1:]                                           # after the prompts' prefill
    assert max(decode_steps) == MAX_DECODE_ROWS                       # proposals were made, up to the limit
    assert all(r <= MAX_DECODE_ROWS for r in decode_steps)


def test_seeded_sampling_with_speculation_runs_and_reproduces(engines):
    _, spec = engines
    p = prompts(spec, GROUNDED[:1])[0]
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=32, ignore_eos=True)
    a, b = spec.generate([p], params)[0], spec.generate([p], params)[0]
    assert a.new_token_ids == b.new_token_ids and len(a.new_token_ids) == 32


# draft-model proposals
def tiny_llama(vocab_size: int, seed: int):
    """A randomly initialised 2-layer Llama with the target's vocabulary: a draft that is almost always wrong."""
    import torch

    from services.inference.models.linear import DenseLinear
    from services.inference.models.llama import LlamaHParams, LlamaLayer, LlamaModel

    g = torch.Generator().manual_seed(seed)
    hidden, heads, kv_heads, head_dim, inter = 64, 4, 2, 16, 128
    hp = LlamaHParams(num_layers=2, hidden_size=hidden, intermediate_size=inter, num_heads=heads, num_kv_heads=kv_heads,
                      head_dim=head_dim, rope_theta=10000.0, rms_norm_eps=1e-5, vocab_size=vocab_size,
                      max_position_embeddings=8192, tie_word_embeddings=True)
    w = lambda *shape: torch.randn(*shape, generator=g) * 0.1   # noqa: E731
    layers = [LlamaLayer(attn_norm=torch.ones(hidden), qkv=DenseLinear(w(hidden, (heads + 2 * kv_heads) * head_dim)),
                         o=DenseLinear(w(heads * head_dim, hidden)), ffn_norm=torch.ones(hidden),
                         gate_up=DenseLinear(w(hidden, 2 * inter)), down=DenseLinear(w(inter, hidden)))
              for _ in range(hp.num_layers)]
    embed = w(vocab_size, hidden)
    return LlamaModel(hp, layers, embed, torch.ones(hidden), DenseLinear(embed.t().contiguous()), torch.float32)


def assert_draft_blocks_free(engine) -> None:
    assert engine.proposer.num_free_blocks == engine.proposer.kv.num_blocks


@pytest.mark.parametrize("draft", ["random", "gguf"])
def test_draft_model_proposals_keep_greedy_output_and_give_back_their_blocks(engines, make_engine, model_fp32,
                                                                              tokenizer, request, draft):
    from services.inference.config import engine_config
    from services.inference.engine.factory import build_engine

    plain, _ = engines
    model = tiny_llama(model_fp32.hp.vocab_size, seed=5) if draft == "random" else request.getfixturevalue("model_gguf")
    # spec_row_cost 0: always propose k = 4 (the policy would soon switch the random draft off)
    eng = build_engine(engine_config(dtype="float32", kv_cache_memory_gb=0.25, speculative="draft", num_speculative_tokens=4,
                                     spec_row_cost=0.0), model=model_fp32, tokenizer=tokenizer, draft_model=model)
    ps = prompts(plain, GROUNDED + OPEN[:1])
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    assert tokens(eng.generate(ps, params)) == tokens(plain.generate(ps, params))
    stats = eng.stats()
    assert stats.spec_drafts_total > 0
    if draft == "gguf":                          # the model itself, quantized: nearly every proposal holds
        assert stats.spec_acceptance_rate > 0.8
    assert_all_blocks_free(eng)
    assert_draft_blocks_free(eng)
    # abort mid-speculation: the target's and the draft's blocks come back
    rid = eng.add_request(ps[0], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    for _ in range(4):
        eng.step()
    eng._propose()
    assert eng.scheduler.requests[rid].spec_token_ids
    eng.scheduler.schedule()
    eng.abort_request(rid)
    assert_all_blocks_free(eng)
    assert_draft_blocks_free(eng)
