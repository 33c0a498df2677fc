"""Router building blocks without sockets: the circuit breaker and the replica choice."""

from __future__ import annotations

from collections import Counter

import pytest

from services.router.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from services.router.policy import Candidate, Picker, split_pick


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_circuit_opens_after_threshold_failures_in_window_then_probes_once_and_closes():
    clock = Clock()
    cb = CircuitBreaker(failure_threshold=3, window_s=10, cooldown_s=5, clock=clock)
    cb.record_failure()
    clock.t = 11                       # the first failure leaves the window
    cb.record_failure()
    cb.record_failure()
    assert cb.state == CLOSED and cb.allow()
    cb.record_failure()
    assert cb.state == OPEN and not cb.allow() and cb.opened == 1
    clock.t = 16
    assert cb.state == HALF_OPEN
    assert cb.allow() and not cb.allow()         # one probe at a time
    cb.record_success()
    assert cb.state == CLOSED and cb.allow()


def test_a_failed_probe_reopens_for_another_cooldown():
    clock = Clock()
    cb = CircuitBreaker(failure_threshold=1, window_s=10, cooldown_s=5, clock=clock)
    cb.record_failure()
    clock.t = 5
    assert cb.allow()
    cb.record_failure()
    assert cb.state == OPEN and cb.opened == 2
    clock.t = 9.9
    assert cb.state == OPEN
    clock.t = 10
    assert cb.state == HALF_OPEN
    assert cb.allow()
    cb.release()                                 # the caller left: the probe slot is free again
    assert cb.allow()


def test_a_passing_health_check_half_opens_an_open_circuit_without_waiting_for_the_cooldown():
    clock = Clock()
    cb = CircuitBreaker(failure_threshold=1, window_s=10, cooldown_s=30, clock=clock)
    cb.health_restored()                         # a closed circuit stays closed
    assert cb.state == CLOSED
    cb.record_failure()
    clock.t = 2
    assert cb.state == OPEN
    cb.health_restored()
    assert cb.state == HALF_OPEN
    assert cb.allow() and not cb.allow()         # the next request is the one probe
    cb.health_restored()                         # while the probe is out: still that one
    assert not cb.allow()
    cb.record_failure()                          # the probe failed: a full cool-down again
    assert cb.state == OPEN and cb.opened == 2
    clock.t = 31.9
    assert cb.state == OPEN
    cb.health_restored()
    assert cb.allow()
    cb.record_success()
    assert cb.state == CLOSED and cb.allow()


def test_circuit_rejects_nonsense_settings():
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)


def test_least_pending_prefers_the_least_loaded_and_spreads_ties():
    p = Picker("least_pending")
    busy, idle = Candidate("a:1", 500, 2), Candidate("b:1", 10, 0)
    assert all(p.pick([busy, idle]).address == "b:1" for _ in range(10))
    tie = [Candidate("a:1", 0, 0), Candidate("b:1", 0, 0)]
    assert set(Counter(p.pick(tie).address for _ in range(50))) == {"a:1", "b:1"}
    assert p.pick([]) is None


def test_prefix_affinity_is_stable_and_moves_only_the_lost_replicas_prefixes():
    p = Picker("prefix_affinity")
    three = [Candidate(f"r{i}:1", 0, 0) for i in range(3)]
    prefixes = [f"system: you are assistant number {i}" for i in range(300)]
    first = {x: p.pick(three, x).address for x in prefixes}
    assert first == {x: p.pick(three, x).address for x in prefixes}           # stable
    assert len(set(first.values())) == 3                                       # and spread
    two = [c for c in three if c.address != "r0:1"]
    moved = [x for x in prefixes if p.pick(two, x).address != first[x]]
    assert all(first[x] == "r0:1" for x in moved)                              # only r0's prefixes move


def test_round_robin_cycles_and_unknown_policy_is_refused():
    p = Picker("round_robin")
    cands = [Candidate("a:1", 0, 0), Candidate("b:1", 0, 0), Candidate("c:1", 0, 0)]
    assert [p.pick(cands).address for _ in range(6)] == ["a:1", "b:1", "c:1"] * 2
    with pytest.raises(ValueError, match="unknown routing policy"):
        Picker("fastest")


def test_split_sends_each_model_its_share():
    import random
    rng = random.Random(7)
    counts = Counter(split_pick({"v1": 0.9, "v2": 0.1, "off": 0.0}, rng) for _ in range(10_000))
    assert counts["off"] == 0 and 0.08 < counts["v2"] / 10_000 < 0.12
