"""Replica choice, no grpc: least pending tokens (default), prefix affinity, round robin.

Each candidate carries the pending tokens its engine last reported (GetLoad) plus what this router has
sent it since, so a burst between two load polls spreads instead of piling onto one replica."""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

POLICIES = ("least_pending", "prefix_affinity", "round_robin")
PREFIX_CHARS = 256      # hashed characters of the affinity key (a system prompt's start)


@dataclass(frozen=True, slots=True)
class Candidate:
    address: str
    pending_tokens: int     # reported by the replica + sent by this router since that report
    in_flight: int          # this router's open requests on it


def _score(address: str, key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key + b"\0" + address.encode(), digest_size=8).digest(), "big")


class Picker:
    def __init__(self, policy: str = "least_pending") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}: one of {', '.join(POLICIES)}")
        self.policy = policy
        self._rr = itertools.count()

    def pick(self, candidates: Sequence[Candidate], prefix: str = "") -> Candidate | None:
        if not candidates:
            return None
        if self.policy == "round_robin":
            ordered = sorted(candidates, key=lambda c: c.address)
            return ordered[next(self._rr) % len(ordered)]
        if self.policy == "prefix_affinity" and prefix:
            # rendezvous hashing: each prefix has a stable favourite among the replicas that are up,
            # and losing a replica moves only the prefixes that favoured it
            key = prefix[:PREFIX_CHARS].encode("utf-8", "surrogatepass")
            return max(candidates, key=lambda c: _score(c.address, key))
        turn = next(self._rr)
        return min(candidates, key=lambda c: (c.pending_tokens, c.in_flight,
                                              _score(c.address, str(turn).encode())))


def split_pick(weights: Mapping[str, float], rng: random.Random | None = None) -> str:
    """One model of an A/B split, drawn by weight."""
    models = list(weights)
    return (rng or random).choices(models, weights=[weights[m] for m in models])[0]
