"""What every proposer of speculative tokens implements, and the speculation counters of an engine.

A proposer gets the requests about to decode and, for each, how many tokens to propose at most (`ks`,
chosen by spec_decode/policy.py); it answers up to that many token ids per request. `release` frees
whatever it keeps for a request (a draft model's KV blocks) when the request finishes, aborts or is
preempted. The engine treats every proposer alike: n-gram lookup (spec_decode/ngram.py) keeps nothing,
the draft model (engine/draft_proposer.py) keeps a shadow request per target request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.inference.config import MAX_SPECULATIVE_TOKENS


class ProposalRequest(Protocol):
    """The part of an engine request a proposer reads."""
    request_id: str
    all_token_ids: list[int]              # prompt and output tokens so far


class Proposer(Protocol):
    def propose(self, requests: Sequence[ProposalRequest], ks: Sequence[int]) -> list[list[int]]:
        """Up to ks[i] proposed tokens for requests[i] (fewer, or none, when it has nothing to offer)."""
        ...

    def release(self, request_id: str) -> None:
        """Forget the request: it finished, was aborted or was preempted (recomputed from scratch later)."""
        ...


@dataclass(slots=True)
class SpecDecodeStats:
    """An engine's speculation since start: verification runs that carried proposals and their outcome."""
    drafts: int = 0                      # verification runs that carried proposals
    draft_tokens: int = 0                # proposals verified
    accepted_tokens: int = 0             # proposals accepted
    emitted_tokens: int = 0              # tokens those runs produced (accepted + 1 each)
    accepted_by_position: list[int] = field(default_factory=lambda: [0] * MAX_SPECULATIVE_TOKENS)

    def observe(self, proposed: int, accepted: int) -> None:
        """One verification run: `accepted` of its `proposed` proposals taken (the first `accepted`)."""
        self.drafts += 1
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        self.emitted_tokens += accepted + 1
        for i in range(accepted):
            self.accepted_by_position[i] += 1
