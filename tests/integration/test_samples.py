"""Several samples of one prompt (SamplingParams.n): the prompt is computed once and its KV blocks are shared,
each sample draws on its own (seed + i), and nothing leaks (real model, float32: batch-invariant, so a sample
equals the same request run alone)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from services.inference.engine.async_engine import AsyncEngine
from services.inference.engine.engine import InvalidRequestError
from services.inference.sampling import SamplingParams
from tests.conftest import assert_all_blocks_free

PROMPT = ("A lighthouse keeper writes a letter to the ships that pass in the night, describing the storms of the "
          "last winter, the birds that rest on the gallery rail and the slow turning of the great lamp. ")


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine("float32", max_num_seqs=32, num_speculative_tokens=0)


@pytest.fixture(autouse=True)
def pool_returns_to_full_after_each_test(engine):
    yield
    assert_all_blocks_free(engine)


def run(engine, prompt: list[int], params: SamplingParams, on_step=None) -> dict[int, list]:
    """Step one request to the end: each sample's outputs, by index."""
    rid = engine.add_request(prompt, params)
    outs: dict[int, list] = defaultdict(list)
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            outs[out.index].append(out)
        if on_step is not None:
            on_step()
    return outs


def tokens(outs: list) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def test_samples_share_the_prompt_blocks_and_compute_only_the_last_partial_block(engine):
    prompt = engine.tokenizer.encode(PROMPT * 2)
    bs = engine.scheduler.kv.block_size
    shared = (len(prompt) - 1) // bs
    assert shared >= 2
    seen = {}

    def check():
        running = [r for r in engine.scheduler.running if r.group_id == rid[0]]
        if len(running) == 4 and not seen:
            tables = [r.block_ids[:shared] for r in sorted(running, key=lambda r: r.index)]
            assert all(t == tables[0] for t in tables)                      # the same blocks, not copies
            assert all(engine.scheduler.kv.pool.blocks[b].ref_cnt == 4 for b in tables[0])
            own = [r.block_ids[shared:] for r in running]
            assert len({b for t in own for b in t}) == sum(map(len, own))   # the rest is each sample's own
            seen["used"] = engine.stats().num_total_blocks - engine.stats().num_free_blocks
            seen["own"] = sum(map(len, own))

    rid = []
    orig = engine.add_request

    def add(*a, **k):
        rid.append(orig(*a, **k))
        return rid[-1]
    engine.add_request = add
    try:
        before = engine.stats().prompt_tokens_total
        outs = run(engine, prompt, SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True, n=4), check)
    finally:
        del engine.add_request
    assert seen["used"] == shared + seen["own"]
    assert sorted(outs) == [0, 1, 2, 3]
    assert all(len(tokens(o)) == 12 and o[-1].finished and o[-1].finish_reason == "length" for o in outs.values())
    assert engine.stats().prompt_tokens_total - before == len(prompt)      # the prompt counted once


def test_a_seeded_sample_equals_the_same_request_alone_with_seed_plus_its_index(engine):
    prompt = engine.tokenizer.encode(PROMPT)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    group = run(engine, prompt, SamplingParams(**{**_fields(params), "n": 3}))
    for i in range(3):
        alone = engine.generate([prompt], SamplingParams(**{**_fields(params), "seed": 1234 + i}))[0]
        assert tokens(group[i]) == alone.new_token_ids, i
    assert len({tuple(tokens(o)) for o in group.values()}) > 1               # different draws
    again = run(engine, prompt, SamplingParams(**{**_fields(params), "n": 3}))
    assert [tokens(again[i]) for i in range(3)] == [tokens(group[i]) for i in range(3)]


def test_greedy_samples_are_the_greedy_answer_and_logprobs_of_the_first_token_agree(engine):
    prompt = engine.tokenizer.encode(PROMPT)
    alone = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3))[0]
    group = run(engine, prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3, n=3))
    for i in range(3):
        assert tokens(group[i]) == alone.new_token_ids
        lps = [lp for o in group[i] for lp in o.logprobs]
        assert [lp.token_id for lp in lps] == alone.new_token_ids
        for got, want in zip(lps, alone.logprobs):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert [t for t, _ in got.top] == [t for t, _ in want.top]


def test_a_prompt_shorter_than_a_block_and_prefix_caching_off(make_engine):
    off = make_engine("float32", enable_prefix_caching=False, num_speculative_tokens=0)
    for text in ("Hi", PROMPT):
        prompt = off.tokenizer.encode(text)
        alone = off.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
        group = run(off, prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2))
        assert [tokens(group[i]) for i in range(2)] == [alone.new_token_ids] * 2
        assert_all_blocks_free(off)


def test_abort_before_and_after_the_fork_frees_every_block(engine):
    prompt = engine.tokenizer.encode(PROMPT * 3)
    params = SamplingParams(temperature=1.0, max_tokens=50, ignore_eos=True, n=4)
    rid = engine.add_request(prompt, params)
    assert engine.abort_request(rid).finish_reason == "abort"                # nothing computed yet
    assert not engine.has_unfinished_requests()
    rid = engine.add_request(prompt, params)
    for _ in range(3):
        engine.step()
    assert len([r for r in engine.scheduler.requests.values() if r.group_id == rid]) == 4
    engine.abort_request(rid)
    assert not engine.has_unfinished_requests()


def test_a_sample_that_ends_early_leaves_the_others_running(engine):
    prompt = engine.tokenizer.encode(PROMPT)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, n=4, stop=(" ",))
    outs = run(engine, prompt, params)
    assert sorted(outs) == [0, 1, 2, 3] and all(o[-1].finished for o in outs.values())


def test_n_out_of_range_and_offline_generate_refuse(engine):
    prompt = engine.tokenizer.encode("Hello")
    for n in (0, 17):
        with pytest.raises(InvalidRequestError, match="n must be"):
            engine.add_request(prompt, SamplingParams(n=n))
    with pytest.raises(InvalidRequestError, match="n > 1"):
        engine.generate([prompt], SamplingParams(n=2, max_tokens=2))


def test_async_engine_streams_every_sample_then_ends(engine):
    prompt = engine.tokenizer.encode(PROMPT)

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        try:
            got = defaultdict(list)
            async for out in ae.generate(prompt, SamplingParams(temperature=0.8, seed=5, max_tokens=8, ignore_eos=True, n=3)):
                got[out.index].append(out)
            # cancelled mid-stream: every sample is aborted and freed
            stream = ae.generate(prompt, SamplingParams(temperature=0.8, max_tokens=200, ignore_eos=True, n=3))
            await anext(stream)
            await stream.aclose()
            for _ in range(200):
                if ae.stats.num_free_blocks == ae.stats.num_total_blocks and not engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.02)
            return got
        finally:
            ae.shutdown()
    got = asyncio.run(main())
    assert sorted(got) == [0, 1, 2] and all(len(tokens(o)) == 8 and o[-1].finished for o in got.values())


def _fields(p: SamplingParams) -> dict:
    return {f: getattr(p, f) for f in p.__slots__}
