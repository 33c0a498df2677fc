"""How many tokens to propose for a request: the tokens a verification run is expected to yield against
what it costs.

If each proposal is accepted with probability α until the first rejection, a run of k proposals emits
    E(k) = 1 + α + α² + … + α^k = (1 − α^(k+1)) / (1 − α)     tokens
and costs about C(k) = 1 + c·k plain decode steps, c being one extra verified row's cost relative to a
one-row step (`EngineConfig.spec_row_cost`, measured by `python -m bench.spec_decode`). The engine proposes
the k in 1..limit that maximises E(k) / C(k), and nothing when even the best loses to plain decoding
(E/C ≤ 1; for k = 1 that is α ≤ c).

α is estimated per request from its own verification runs: a run of k with a accepted is a successes
and, when a < k, one failure (positions after the first rejection are not observed). The counts decay
every decode step toward a prior of α = 0.5, so the estimate follows a request's runs of copying and of
free text, and a request whose proposals stopped paying is probed again (with k = 1) once its evidence
has faded.
"""

from __future__ import annotations

from dataclasses import dataclass

PRIOR_ACCEPTED = 1.0       # the prior: α = 0.5, worth two observations
PRIOR_REJECTED = 1.0
DECAY_PER_STEP = 0.9       # evidence from ~10 steps ago counts a third as much as this step's


def expected_tokens(alpha: float, k: int) -> float:
    """E(k): tokens a verification run of k proposals emits (the target's own token included)."""
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def choose_k(alpha: float, limit: int, row_cost: float) -> int:
    """The k in 0..limit with the most tokens per unit of step time; 0 when proposing does not pay."""
    best_k, best = 0, 1.0
    for k in range(1, limit + 1):
        rate = expected_tokens(alpha, k) / (1.0 + row_cost * k)
        if rate > best:
            best_k, best = k, rate
    return best_k


@dataclass(slots=True)
class AcceptanceEstimate:
    """One request's decayed counts of accepted and rejected proposals."""

    accepted: float = 0.0
    rejected: float = 0.0

    @property
    def alpha(self) -> float:
        return (self.accepted + PRIOR_ACCEPTED) / (self.accepted + self.rejected + PRIOR_ACCEPTED + PRIOR_REJECTED)

    def observe(self, proposed: int, accepted: int) -> None:
        """A verification run: `accepted` of `proposed` proposals taken."""
        self.accepted += accepted
        self.rejected += 1.0 if accepted < proposed else 0.0

    def decay(self) -> None:
        """One decode step passed."""
        self.accepted *= DECAY_PER_STEP
        self.rejected *= DECAY_PER_STEP
