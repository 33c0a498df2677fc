"""Continuous batching, prefix caching, preemption, seeded sampling and stop conditions (real model)."""

from __future__ import annotations

import pytest

from services.inference.sampling import SamplingParams
from tests.conftest import assert_all_blocks_free

TOPICS = ["the ocean", "a robot", "mountains", "coffee", "the moon", "a library", "winter", "trains",
          "music", "a garden", "volcanoes", "chess", "bread", "rain", "bees", "a lighthouse"]


def chat_prompts(engine, n: int, prefix: str = "") -> list[list[int]]:
    return [engine.tokenizer.encode(engine.render_chat(
        [{"role": "user", "content": f"{prefix}Write one sentence about {TOPICS[i % len(TOPICS)]} (#{i})."}]))
        for i in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine("float32", max_num_seqs=64)


@pytest.fixture(autouse=True)
def pool_returns_to_full_after_each_test(engine):
    yield
    assert_all_blocks_free(engine)


def test_greedy_tokens_alone_equal_tokens_inside_a_32_request_batch(engine):
    prompts = chat_prompts(engine, 32)
    batch = engine.generate(prompts, GREEDY)
    for i in (0, 13, 31):
        alone = engine.generate([prompts[i]], GREEDY)[0]
        assert alone.new_token_ids == batch[i].new_token_ids
    assert_all_blocks_free(engine)


def test_prefix_caching_on_and_off_give_identical_outputs(make_engine):
    shared = "You are reviewing a long report about renewable energy in northern Europe. " * 6
    on, off = make_engine("float32"), make_engine("float32", enable_prefix_caching=False)
    prompts = chat_prompts(on, 6, prefix=shared)
    out_on = on.generate(prompts, GREEDY)
    out_again = on.generate(prompts, GREEDY)           # served mostly from the prefix cache
    out_off = off.generate(prompts, GREEDY)
    assert [o.new_token_ids for o in out_on] == [o.new_token_ids for o in out_off]
    assert [o.new_token_ids for o in out_again] == [o.new_token_ids for o in out_off]
    assert all(o.num_cached_tokens > 0 for o in out_again)
    assert on.stats().prefix_cache_hit_tokens_total > 0 and off.stats().prefix_cache_hit_tokens_total == 0
    assert_all_blocks_free(on)
    assert_all_blocks_free(off)


def test_preemption_forced_by_a_tiny_kv_pool_gives_identical_outputs(engine, make_engine):
    prompts = chat_prompts(engine, 8)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reference = engine.generate(prompts, params)
    longest = max(len(p) for p in prompts) + 40
    tiny = make_engine("float32", num_kv_blocks=(longest // 16 + 1) * 3, max_model_len=longest + 16)
    squeezed = tiny.generate(prompts, params)
    assert tiny.stats().num_preemptions_total > 0
    assert [o.new_token_ids for o in squeezed] == [o.new_token_ids for o in reference]
    assert_all_blocks_free(tiny)


def test_chunked_prefill_gives_the_same_tokens_as_one_shot_prefill(engine, make_engine):
    prompts = chat_prompts(engine, 4, prefix="Please read carefully. " * 10)
    chunked = make_engine("float32", max_num_batched_tokens=32)
    assert [o.new_token_ids for o in chunked.generate(prompts, GREEDY)] == \
        [o.new_token_ids for o in engine.generate(prompts, GREEDY)]
    assert_all_blocks_free(chunked)


def test_seeded_sampling_is_reproducible_and_independent_of_batch_neighbours(engine):
    prompts = chat_prompts(engine, 6)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=1234, ignore_eos=True)
    alone = engine.generate([prompts[0]], seeded)[0].new_token_ids
    again = engine.generate([prompts[0]], seeded)[0].new_token_ids
    neighbours = [SamplingParams(temperature=1.2, max_tokens=30, ignore_eos=True)] * 5
    in_batch = engine.generate(prompts, [seeded, *neighbours])[0].new_token_ids
    other_seed = engine.generate([prompts[0]], SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24,
                                                              seed=99, ignore_eos=True))[0].new_token_ids
    assert alone == again == in_batch
    assert other_seed != alone
    assert_all_blocks_free(engine)


def test_stop_string_ends_generation_and_is_cut_from_the_text(engine):
    prompt = engine.tokenizer.encode("1, 2, 3, 4, 5,")
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=30))[0]
    assert " 9" in free.text
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop=(" 9",)))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[:free.text.index(" 9")]
    assert len(out.new_token_ids) < len(free.new_token_ids)
    assert_all_blocks_free(engine)


def test_stop_token_id_ends_generation_including_that_token(engine):
    prompt = engine.tokenizer.encode("1, 2, 3, 4, 5,")
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop_id = free.new_token_ids[5]
    first = free.new_token_ids.index(stop_id)
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=(stop_id,)))[0]
    assert out.finish_reason == "stop"
    assert out.new_token_ids == free.new_token_ids[:first + 1]


def test_eos_stops_unless_ignore_eos_and_min_tokens_delays_it(engine):
    prompt = chat_prompts(engine, 1)[0]
    natural = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=200))[0]
    assert natural.finish_reason == "stop" and natural.new_token_ids[-1] == engine.tokenizer.eos_token_id
    n = len(natural.new_token_ids)
    longer = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=200, min_tokens=n + 5))[0]
    assert len(longer.new_token_ids) >= n + 5
    assert engine.tokenizer.eos_token_id not in longer.new_token_ids[:n + 5]
    ignored = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=n + 10, ignore_eos=True))[0]
    assert ignored.finish_reason == "length" and len(ignored.new_token_ids) == n + 10


def test_max_tokens_bounds_the_output_exactly(engine):
    out = engine.generate(chat_prompts(engine, 3), SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    assert all(len(o.new_token_ids) == 7 and o.finish_reason == "length" for o in out)


def test_logprobs_are_returned_for_every_token_with_top_n(engine):
    out = engine.generate(chat_prompts(engine, 1), SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0]
    assert len(out.logprobs) == len(out.new_token_ids)
    for lp, tok in zip(out.logprobs, out.new_token_ids):
        assert lp.token_id == tok and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0][0] == tok            # greedy: the sampled token is the top one
        assert [p for _, p in lp.top] == sorted((p for _, p in lp.top), reverse=True)


def test_abort_frees_every_block_of_a_running_request(engine):
    rid = engine.add_request(chat_prompts(engine, 1)[0], SamplingParams(temperature=0, max_tokens=100))
    for _ in range(3):
        engine.step()
    assert engine.stats().num_free_blocks < engine.stats().num_total_blocks
    final = engine.abort_request(rid)
    assert final.finished and final.finish_reason == "abort"
    assert_all_blocks_free(engine)


def test_priority_orders_waiting_requests(make_engine):
    eng = make_engine("float32", max_num_seqs=1)
    prompts = chat_prompts(eng, 3)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    low = eng.add_request(prompts[0], params, priority=5)
    high = eng.add_request(prompts[1], params, priority=-1)
    finished = []
    while eng.has_unfinished_requests():
        finished += [o.request_id for o in eng.step() if o.finished]
    assert finished == [high, low]
    assert_all_blocks_free(eng)


def test_unset_max_tokens_runs_to_the_smaller_of_context_and_kv_capacity(make_engine):
    small = make_engine("float32", num_kv_blocks=4)          # 64 tokens of KV, context window 8192
    prompt = small.tokenizer.encode("Count slowly: one, two, three,")
    out = small.generate([prompt], SamplingParams(temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(prompt) + len(out.new_token_ids) == 64
    with pytest.raises(ValueError, match="KV cache"):
        small.add_request(prompt, SamplingParams(max_tokens=100))
    assert_all_blocks_free(small)
