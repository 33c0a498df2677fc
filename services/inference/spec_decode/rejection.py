"""Verification of proposed tokens against the target model: pure tensor functions.

Greedy rows accept a proposal while it equals the target's argmax, then emit the argmax at the first
mismatch (or after the last proposal: the bonus token): the output is exactly greedy decoding's.

Sampled rows use rejection sampling (Leviathan et al.; Chen et al.): proposal x_i drawn from q_i is
accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection one token is drawn from
normalize(max(0, p_i - q_i)) and the run ends; when all are accepted a bonus token is drawn from p_k.
Every emitted token is then distributed exactly as the target's p. A proposer without probabilities
(n-gram lookup) is a point mass: q_i = one-hot(x_i), so acceptance is p_i(x_i) and the residual is p_i
without x_i.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.inference.sampling.sampler import exponential_


def greedy_verify(target_tokens: torch.Tensor, draft_tokens: torch.Tensor, num_drafts: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor]:
    """target_tokens [B, K+1] (the target's choice at each position), draft_tokens [B, K], num_drafts [B]
    (row b's proposals are the first num_drafts[b]) → (tokens [B, K+1] with -1 past each row's output,
    num_accepted [B]). Row b emits its accepted proposals then target_tokens[b, num_accepted[b]]."""
    b, k1 = target_tokens.shape
    k = k1 - 1
    positions = torch.arange(k)
    match = (draft_tokens == target_tokens[:, :k]) & (positions[None, :] < num_drafts[:, None])
    num_accepted = match.int().cumprod(dim=1).sum(dim=1)
    out = torch.full((b, k1), -1, dtype=torch.int64)
    emitted = torch.arange(k1)[None, :] <= num_accepted[:, None]
    out[emitted] = target_tokens[emitted]          # accepted proposals equal the target's tokens there
    return out, num_accepted


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from unnormalised probs [V] (exponential race, as the sampler draws)."""
    q = exponential_(torch.empty_like(probs), generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return int((probs / q).argmax())


def rejection_sample(target_probs: torch.Tensor, draft_tokens: torch.Tensor, num_drafts: torch.Tensor,
                     draft_probs: torch.Tensor | None, generators: Sequence[torch.Generator | None]) -> tuple[
        torch.Tensor, torch.Tensor]:
    """target_probs [B, K+1, V] (the target's sampling distribution at each position, rows summing to 1),
    draft_tokens [B, K], num_drafts [B], draft_probs [B, K, V] or None (point-mass proposals),
    generators [B] (None: torch's global generator) → (tokens [B, K+1] with -1 past each row's output,
    num_accepted [B]). Per row the draws come from its own generator in a fixed order (one uniform per
    proposal considered, then one exponential race), so seeded requests reproduce."""
    b, k1, v = target_probs.shape
    out = torch.full((b, k1), -1, dtype=torch.int64)
    num_accepted = torch.zeros(b, dtype=torch.int64)
    for row in range(b):
        gen, n = generators[row], int(num_drafts[row])
        p = target_probs[row].float()
        accepted = 0
        if n:
            drafts = draft_tokens[row, :n]
            p_x = p[torch.arange(n), drafts]
            q_x = torch.ones(n) if draft_probs is None else draft_probs[row, torch.arange(n), drafts].float()
            u = _uniform((n,), gen)
            ok = u * q_x < p_x                       # u < min(1, p/q), written without a division
            accepted = int(ok.int().cumprod(0).sum())
            out[row, :accepted] = drafts[:accepted]
        if accepted < n:                             # the first rejection: draw from the residual
            q = torch.zeros(v) if draft_probs is None else draft_probs[row, accepted].float()
            if draft_probs is None:
                q[draft_tokens[row, accepted]] = 1.0
            residual = (p[accepted] - q).clamp_min(0.0)
            if float(residual.sum()) <= 0.0:         # p == q to rounding: p itself is the residual's limit
                residual = p[accepted]
            out[row, accepted] = _draw(residual, gen)
        else:                                        # all accepted (or none proposed): the bonus token
            out[row, accepted] = _draw(p[accepted], gen)
        num_accepted[row] = accepted
    return out, num_accepted
