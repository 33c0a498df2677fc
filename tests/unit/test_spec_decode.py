"""Speculative decoding's pure parts: n-gram proposals, greedy verification and the rejection sampler's
output distribution (a statistical test with a fixed seed that a wrong acceptance rule fails)."""

from __future__ import annotations

import pytest
import torch

from services.inference.spec_decode import NgramProposer
from services.inference.spec_decode.rejection import greedy_verify, rejection_sample
from services.inference.spec_decode.policy import AcceptanceEstimate, choose_k, expected_tokens


def test_ngram_proposes_what_followed_the_latest_earlier_occurrence_of_the_longest_suffix():
    p = NgramProposer(min_n=2, max_n=4)
    assert p.lookup([1, 2, 3, 4, 5, 6, 1, 2, 3], 3) == [4, 5, 6]
    assert p.lookup([7, 8, 1, 2, 9, 9, 1, 2], 2) == [9, 9]
    # the longest matching suffix wins over a more recent shorter one
    assert p.lookup([5, 1, 2, 3, 4, 0, 2, 3, 6, 1, 2, 3], 1) == [4]
    # the latest occurrence of the chosen suffix
    assert p.lookup([1, 2, 7, 1, 2, 8, 1, 2], 1) == [8]
    assert p.lookup([1, 2, 3, 4], 3) == []                       # nothing recurs
    assert p.lookup([4, 5, 4, 5], 10) == [4, 5]                   # runs to the end of the tokens
    assert p.lookup([1, 2, 1, 2], 0) == []
    with pytest.raises(ValueError):
        NgramProposer(3, 2)


def test_greedy_verify_accepts_the_matching_prefix_then_the_targets_token():
    target = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4], [9, 9, 9, 9]])
    drafts = torch.tensor([[5, 6, 0], [7, 2, 3], [9, 9, 9]])
    out, n = greedy_verify(target, drafts, torch.tensor([3, 3, 2]))
    assert n.tolist() == [2, 0, 2]
    assert out.tolist() == [[5, 6, 7, -1], [1, -1, -1, -1], [9, 9, 9, -1]]   # row 3: bonus after its 2 drafts


def _first_token_counts(target: torch.Tensor, draft_probs: torch.Tensor | None, drafts: torch.Tensor, n: int,
                        seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    b = n
    k1, v = target.shape
    out, _ = rejection_sample(target.expand(b, k1, v), drafts.expand(b, -1), torch.full((b,), k1 - 1),
                              None if draft_probs is None else draft_probs.expand(b, -1, -1), [None] * b)
    return torch.bincount(out[:, 0], minlength=v).float()


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square critical value, 5 degrees of freedom, alpha = 0.001
CRITICAL_5 = 20.52


def test_rejection_sampling_with_point_mass_proposals_keeps_the_target_distribution():
    p = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    target = torch.stack([p, torch.full((6,), 1 / 6)])              # K = 1 proposal, then the bonus position
    drafts = torch.tensor([[1]])                                    # the likeliest token proposed
    counts = _first_token_counts(target, None, drafts, 20000, seed=0)
    assert _chi_square(counts, p) < CRITICAL_5


def test_rejection_sampling_with_a_draft_distribution_keeps_the_target_distribution():
    p = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.1, 0.1])
    n = 20000
    torch.manual_seed(1)
    drafts = torch.multinomial(q, n, replacement=True)[:, None]    # x ~ q, one proposal per row
    out, _ = rejection_sample(torch.stack([p, p]).expand(n, 2, 6), drafts, torch.ones(n, dtype=torch.int64),
                              q.expand(n, 1, 6), [None] * n)
    counts = torch.bincount(out[:, 0], minlength=6).float()
    assert _chi_square(counts, p) < CRITICAL_5
    # a wrong rule (always accept the proposal) gives q, not p: the same test rejects it
    assert _chi_square(torch.bincount(drafts[:, 0], minlength=6).float(), p) > CRITICAL_5


def test_a_wrong_residual_fails_the_statistical_test():
    """Resampling from p instead of normalize(max(0, p - q)) after a rejection biases the output."""
    p = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    n = 20000
    torch.manual_seed(2)
    accept = torch.rand(n) < p[1]                                   # point mass on token 1: accept w.p. p(1)
    wrong = torch.where(accept, torch.tensor(1), torch.multinomial(p, n, replacement=True))
    assert _chi_square(torch.bincount(wrong, minlength=6).float(), p) > CRITICAL_5


def test_seeded_rows_reproduce_and_rows_do_not_disturb_each_other():
    p = torch.softmax(torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(3)), dim=-1)
    drafts = torch.tensor([[4, 7], [1, 2]])
    a = rejection_sample(p, drafts, torch.tensor([2, 2]), None, [torch.Generator().manual_seed(9), None])[0][0]
    b = rejection_sample(p[:1], drafts[:1], torch.tensor([2]), None, [torch.Generator().manual_seed(9)])[0][0]
    assert torch.equal(a, b)
    out, n = rejection_sample(p, drafts, torch.tensor([0, 2]), None, [None, None])
    assert n[0] == 0 and out[0, 0] >= 0 and (out[0, 1:] == -1).all()   # no proposals: one token from p


def test_expected_tokens_of_a_run_is_the_truncated_geometric_sum():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_k_maximises_tokens_per_step_time_and_is_zero_when_proposing_does_not_pay():
    # k = 1 pays exactly when alpha > row cost
    assert choose_k(0.19, 4, 0.2) == 0 and choose_k(0.21, 4, 0.2) == 1
    # brute force over k: the chosen one has the best rate, ties to the smaller k
    for alpha in (0.3, 0.6, 0.8, 0.9, 0.97):
        for cost in (0.05, 0.2, 0.5):
            rates = [expected_tokens(alpha, k) / (1 + cost * k) for k in range(0, 9)]
            rates[0] = 1.0
            assert choose_k(alpha, 8, cost) == rates.index(max(rates)), (alpha, cost)
    ks = [choose_k(a, 8, 0.2) for a in (0.3, 0.6, 0.8, 0.9, 0.95, 0.99)]
    assert ks == sorted(ks) and ks[-1] == 8                  # more acceptance, longer runs, up to the limit
    assert choose_k(0.99, 3, 0.2) == 3 and choose_k(0.99, 0, 0.2) == 0


def test_the_acceptance_estimate_follows_recent_runs_and_fades_back_to_the_prior():
    est = AcceptanceEstimate()
    assert est.alpha == 0.5
    for _ in range(6):
        est.observe(4, 4)                                     # full accepts: copying
        est.decay()
    assert est.alpha > 0.9 and choose_k(est.alpha, 4, 0.2) == 4
    for _ in range(12):
        est.observe(2, 0)                                     # first-position misses: free text
        est.decay()
    assert est.alpha < 0.5 and choose_k(est.alpha, 4, 0.2) <= 1
    low = est.alpha
    for _ in range(60):                                       # no proposals for a while: evidence fades
        est.decay()
    assert low < est.alpha == pytest.approx(0.5, abs=0.02)
    assert choose_k(est.alpha, 4, 0.2) >= 1                   # so the request is probed again
