"""Specification of the continuous-batching scheduler, driven without a model: each simulated step
schedules, advances progress and appends a token for every chunk that samples."""

from __future__ import annotations

import itertools

import pytest

from services.inference.config import SchedulerConfig
from services.inference.engine.kv_cache_manager import KVCacheManager
from services.inference.engine.request import Request, RequestStatus
from services.inference.engine.scheduler import Scheduler, SchedulerOutput
from services.inference.sampling import SamplingParams

SAMPLED_TOKEN = 7
_prompt_bases = itertools.count(10_000, 10_000)   # distinct prompts share no prefix by default


def make_scheduler(**overrides: int | bool) -> Scheduler:
    config = dict(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, num_kv_blocks=64)
    config.update(overrides)
    kv = KVCacheManager(config.pop("num_kv_blocks"), config.pop("block_size"), config.pop("enable_prefix_caching", True))
    return Scheduler(SchedulerConfig(**config), kv)


def make_request(request_id: str, num_prompt_tokens: int = 4, *, max_tokens: int = 100, priority: int = 0,
                 prompt: list[int] | None = None) -> Request:
    if prompt is None:
        base = next(_prompt_bases)
        prompt = list(range(base, base + num_prompt_tokens))
    return Request(request_id, prompt, SamplingParams(temperature=0), max_tokens=max_tokens, priority=priority)


def add(sched: Scheduler, *requests: Request) -> None:
    for req in requests:
        sched.add_request(req)


def step(sched: Scheduler) -> SchedulerOutput:
    """One engine step without a model; requests that reach max_tokens finish, as in the engine."""
    out = sched.schedule()
    sched.update_after_step(out)
    for chunk in out.chunks:
        if chunk.samples:
            req = chunk.request
            req.append_token(SAMPLED_TOKEN)
            if req.num_output_tokens >= req.max_tokens:
                sched.finish_request(req.request_id, RequestStatus.FINISHED_LENGTH)
    return out


def chunks(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    """(request id, start, num_tokens, samples) of every scheduled chunk."""
    return [(c.request.request_id, c.start, c.num_tokens, c.samples) for c in out.chunks]


def ids(requests: list[Request]) -> list[str]:
    return [r.request_id for r in requests]


def assert_block_accounting_is_consistent(sched: Scheduler) -> None:
    pool = sched.kv.pool
    held = [b for r in sched.requests.values() for b in r.block_ids]
    assert sum(block.ref_cnt for block in pool.blocks) == len(held)
    assert pool.num_free_blocks == sum(1 for block in pool.blocks if block.ref_cnt == 0)


# queue

def test_add_request_rejects_a_duplicate_request_id():
    sched = make_scheduler()
    add(sched, make_request("a"))
    with pytest.raises(ValueError, match="duplicate"):
        add(sched, make_request("a"))


def test_empty_scheduler_schedules_nothing():
    out = make_scheduler().schedule()
    assert out.is_empty
    assert out.num_batched_tokens == 0


# token budget and chunked prefill

def test_long_prompt_is_prefilled_in_chunks_and_samples_only_on_its_last_chunk():
    sched = make_scheduler(max_num_batched_tokens=32)
    add(sched, make_request("long", 80))
    assert chunks(step(sched)) == [("long", 0, 32, False)]
    assert chunks(step(sched)) == [("long", 32, 32, False)]
    assert chunks(step(sched)) == [("long", 64, 16, True)]
    assert chunks(step(sched)) == [("long", 80, 1, True)]


def test_decodes_and_prefill_chunks_share_one_token_budget():
    sched = make_scheduler(max_num_batched_tokens=32)
    add(sched, make_request("short", 8))
    assert chunks(step(sched)) == [("short", 0, 8, True)]
    add(sched, make_request("long", 64))

    out = step(sched)
    assert chunks(out) == [("short", 8, 1, True), ("long", 0, 31, False)]
    assert out.num_batched_tokens == 32
    assert chunks(step(sched)) == [("short", 9, 1, True), ("long", 31, 31, False)]
    out = step(sched)
    assert chunks(out) == [("short", 10, 1, True), ("long", 62, 2, True)]
    assert out.num_batched_tokens == 3


def test_waiting_requests_get_nothing_once_running_requests_spend_the_budget():
    sched = make_scheduler(max_num_batched_tokens=2)
    add(sched, make_request("a", 1), make_request("b", 1))
    step(sched)
    add(sched, make_request("late", 1))
    assert chunks(step(sched)) == [("a", 1, 1, True), ("b", 1, 1, True)]
    assert ids(sched.waiting) == ["late"]


# admission

def test_max_num_seqs_caps_the_running_requests():
    sched = make_scheduler(max_num_seqs=2)
    add(sched, make_request("a"), make_request("b"), make_request("c"))
    assert [c[0] for c in chunks(step(sched))] == ["a", "b"]
    assert ids(sched.running) == ["a", "b"]
    assert ids(sched.waiting) == ["c"]
    assert [c[0] for c in chunks(step(sched))] == ["a", "b"]

    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert [c[0] for c in chunks(step(sched))] == ["b", "c"]


def test_waiting_requests_are_admitted_by_priority_then_arrival():
    sched = make_scheduler(max_num_seqs=1)
    add(sched,
        make_request("low", priority=5),
        make_request("high_first", priority=0),
        make_request("mid", priority=1),
        make_request("high_second", priority=0))
    assert ids(sched.waiting) == ["high_first", "high_second", "mid", "low"]

    admitted = []
    while sched.num_unfinished:
        [chunk] = step(sched).chunks
        admitted.append(chunk.request.request_id)
        sched.finish_request(chunk.request.request_id, RequestStatus.FINISHED_STOPPED)
    assert admitted == ["high_first", "high_second", "mid", "low"]


def test_a_more_urgent_request_takes_the_place_of_the_least_urgent_one_in_a_full_batch():
    sched = make_scheduler(max_num_seqs=2)
    add(sched, make_request("free-a", priority=10), make_request("free-b", priority=10))
    step(sched)
    add(sched, make_request("equal", priority=10))
    step(sched)                                        # equal priority: no one is displaced
    assert ids(sched.running) == ["free-a", "free-b"] and ids(sched.waiting) == ["equal"]
    add(sched, make_request("premium", priority=-10))
    out = step(sched)
    assert ids(out.preempted) == ["free-b"]            # the least urgent, latest running request
    assert ids(sched.running) == ["free-a", "premium"] and chunks(out) == [("premium", 0, 4, True)]
    assert ids(sched.waiting) == ["free-b", "equal"]   # recomputed later, before the later arrival
    assert_block_accounting_is_consistent(sched)


def test_a_request_more_urgent_than_every_running_one_gets_a_step_to_itself():
    sched = make_scheduler(max_num_seqs=8)
    add(sched, make_request("free-a", priority=10), make_request("free-b", priority=10))
    step(sched)
    add(sched, make_request("standard", 8, priority=0), make_request("free-c", priority=10))
    assert chunks(step(sched)) == [("standard", 0, 8, True)]          # the batch waits this one step
    assert [c[0] for c in chunks(step(sched))] == ["standard", "free-a", "free-b", "free-c"]
    add(sched, make_request("equal", priority=0))                       # not more urgent than "standard"
    assert "free-a" in [c[0] for c in chunks(step(sched))]


def test_admitted_request_is_running_and_remembers_its_prefix_hit():
    sched = make_scheduler(block_size=4)
    prompt = list(range(10))
    add(sched, make_request("first", prompt=prompt))
    step(sched)
    add(sched, make_request("second", prompt=prompt))

    assert chunks(step(sched)) == [("first", 10, 1, True), ("second", 8, 2, True)]
    second = sched.requests["second"]
    assert second.status is RequestStatus.RUNNING
    assert second.num_cached_tokens == 8
    assert second.block_ids[:2] == sched.requests["first"].block_ids[:2]


# preemption

def test_when_blocks_run_out_the_lowest_priority_running_request_is_preempted():
    sched = make_scheduler(block_size=4, num_kv_blocks=3)
    add(sched,
        make_request("background", 4, priority=2),   # arrived first, but least important
        make_request("urgent", 4, priority=0),
        make_request("normal", 3, priority=1))
    step(sched)                                      # one block each; the pool is full
    background = sched.requests["background"]

    out = step(sched)                                # "urgent" now needs a second block
    assert ids(out.preempted) == ["background"]
    assert chunks(out) == [("urgent", 4, 1, True), ("normal", 3, 1, True)]
    assert background.status is RequestStatus.PREEMPTED
    assert background.block_ids == []
    assert background.num_computed_tokens == 0
    assert background.num_preemptions == 1
    assert ids(sched.running) == ["urgent", "normal"]
    assert ids(sched.waiting) == ["background"]
    assert_block_accounting_is_consistent(sched)


def test_among_equal_priorities_the_latest_arrival_is_preempted():
    sched = make_scheduler(block_size=4, num_kv_blocks=3)
    add(sched,
        make_request("urgent", 4, priority=0),
        make_request("earlier", 3, priority=1),
        make_request("later", 3, priority=1))
    step(sched)

    out = step(sched)
    assert ids(out.preempted) == ["later"]
    assert chunks(out) == [("urgent", 4, 1, True), ("earlier", 3, 1, True)]


def test_request_that_cannot_grow_preempts_itself_when_it_is_the_lowest_priority():
    sched = make_scheduler(block_size=4, num_kv_blocks=2)
    add(sched, make_request("keeps", 3, priority=0), make_request("grows", 4, priority=1))
    step(sched)

    out = step(sched)
    assert ids(out.preempted) == ["grows"]
    assert chunks(out) == [("keeps", 3, 1, True)]
    assert sched.kv.num_free_blocks == 1


def test_no_waiting_request_is_admitted_in_a_step_that_preempted():
    sched = make_scheduler(block_size=4, num_kv_blocks=2)
    add(sched, make_request("keeps", 3, priority=0), make_request("grows", 4, priority=1))
    step(sched)
    add(sched, make_request("newcomer", 1, priority=0))   # would fit in the block freed below

    out = step(sched)
    assert ids(out.preempted) == ["grows"]
    assert "newcomer" not in [c[0] for c in chunks(out)]
    assert sched.requests["newcomer"].status is RequestStatus.WAITING


def test_preempted_request_is_rescheduled_and_recomputes_its_prompt_and_outputs():
    sched = make_scheduler(block_size=4, num_kv_blocks=3)
    add(sched,
        make_request("background", 4, priority=2),
        make_request("urgent", 4, priority=0),
        make_request("normal", 3, priority=1))
    step(sched)
    background = sched.requests["background"]
    tokens_before = list(background.all_token_ids)
    assert ids(step(sched).preempted) == ["background"]
    assert background.all_token_ids == tokens_before    # its generated token is kept

    sched.finish_request("urgent", RequestStatus.FINISHED_STOPPED)
    sched.finish_request("normal", RequestStatus.FINISHED_STOPPED)
    assert chunks(step(sched)) == [("background", 0, 5, True)]
    assert background.status is RequestStatus.RUNNING
    assert background.output_token_ids == [SAMPLED_TOKEN, SAMPLED_TOKEN]


# finishing

def test_finish_request_frees_the_blocks_of_a_running_request_and_drops_it():
    sched = make_scheduler(num_kv_blocks=8)
    add(sched, make_request("a", 10))
    step(sched)
    req = sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert req is not None and req.status is RequestStatus.FINISHED_STOPPED
    assert req.block_ids == []
    assert sched.running == [] and sched.waiting == []
    assert sched.num_unfinished == 0
    assert sched.kv.num_free_blocks == 8


def test_finish_request_removes_a_waiting_request():
    sched = make_scheduler()
    add(sched, make_request("a"))
    req = sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert req is not None and req.is_finished
    assert sched.waiting == []
    assert sched.schedule().is_empty


def test_finish_request_of_an_unknown_or_finished_request_returns_none():
    sched = make_scheduler()
    add(sched, make_request("a"))
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert sched.finish_request("a", RequestStatus.FINISHED_ABORTED) is None
    assert sched.finish_request("never-added", RequestStatus.FINISHED_ABORTED) is None


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_every_block_is_free_again_after_all_requests_finish(enable_prefix_caching):
    sched = make_scheduler(block_size=4, num_kv_blocks=12, max_num_batched_tokens=16, max_num_seqs=4,
                           enable_prefix_caching=enable_prefix_caching)
    shared = list(range(12))
    requests = [
        make_request("shared_a", prompt=shared + [100], max_tokens=6),
        make_request("shared_b", prompt=shared + [200, 201], max_tokens=6, priority=1),
        make_request("long", 30, max_tokens=6, priority=2),
        make_request("short", 2, max_tokens=8),
        make_request("mid", 9, max_tokens=6, priority=1),
        make_request("last", 5, max_tokens=6, priority=3),
    ]
    add(sched, *requests)
    for _ in range(200):
        if not sched.num_unfinished:
            break
        step(sched)
        assert_block_accounting_is_consistent(sched)
    assert sched.num_unfinished == 0
    assert sched.running == [] and sched.waiting == []
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert all(r.num_output_tokens == r.max_tokens for r in requests)
    assert sum(r.num_preemptions for r in requests) > 0   # the pool was tight enough to preempt
