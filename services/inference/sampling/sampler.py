"""Batched token sampling: logits [B, V] plus per-row parameters -> one token per row.

The hot path is a chain of small pure tensor functions, each testable alone:

    apply_banned_tokens -> apply_penalties -> (greedy rows: argmax)
                        -> apply_temperature -> apply_top_k_top_p -> softmax -> apply_min_p
                        -> random_sample (exponential race, one generator per row)
    compute_logprobs works on the raw logits, before any of the above (vLLM's "raw logprobs").

`build_sampling_metadata` turns the per-request rows into tensors once per step; a tensor is left
as None when no row in the batch needs it, so an all-greedy batch without penalties costs one
argmax.
No function here mutates the caller's logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.inference.sampling.params import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    """One request's sampling state at this step (built by the model runner)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None  # per request; None only for greedy rows
    banned_token_ids: Sequence[int] = ()  # e.g. EOS and stop ids while min_tokens is not reached


@dataclass(slots=True, frozen=True)
class SamplingMetadata:
    """Per-step tensors for a batch of B rows over a vocabulary of V tokens."""

    vocab_size: int  # V; logits must be [B, V]
    generators: tuple[torch.Generator | None, ...]  # [B]; None for greedy rows
    all_greedy: bool  # every row takes the argmax: no temperature or filtering work at all
    greedy_mask: torch.Tensor | None  # [B] bool; None unless greedy and random rows are mixed
    temperature: torch.Tensor | None  # [B] float32, 1.0 on greedy rows; None when all greedy
    top_k: torch.Tensor | None  # [B] int64 in [1, V]; None when no random row uses top-k
    top_p: torch.Tensor | None  # [B] float32; None when no random row uses top-p
    min_p: torch.Tensor | None  # [B] float32; None when no random row uses min-p
    repetition_penalty: torch.Tensor | None  # [B] float32; None when every row is 1.0
    frequency_penalty: torch.Tensor | None  # [B] float32; None with presence when no row uses them
    presence_penalty: torch.Tensor | None  # [B] float32
    seen_mask: torch.Tensor | None  # [B, V] bool: token in prompt or output (repetition penalty)
    output_counts: torch.Tensor | None  # [B, V] float32: occurrences in output (freq/presence)
    banned_rows: torch.Tensor | None  # [N] int64 row index of each banned (row, token) pair
    banned_token_ids: torch.Tensor | None  # [N] int64 token id of each banned pair
    num_logprobs: tuple[int | None, ...]  # [B] each row's requested top-n (None = no logprobs)
    max_num_logprobs: int | None  # n_max over the batch; None when no row asked for logprobs

    @property
    def batch_size(self) -> int:
        return len(self.generators)

    @property
    def no_penalties(self) -> bool:
        return self.repetition_penalty is None and self.frequency_penalty is None


@dataclass(slots=True, frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64 sampled token per row
    logprobs: torch.Tensor | None  # [B] float32 raw logprob of the sampled token; None: none asked
    top_token_ids: torch.Tensor | None  # [B, n_max] int64 most likely first; row i uses first n_i
    top_logprobs: torch.Tensor | None  # [B, n_max] float32, descending


def make_generator(seed: int | None) -> torch.Generator:
    """A per-request generator: seeded when the request gave a seed, else from OS entropy."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] -> [B] int64, the first maximum of each row (torch.argmax's answer). A float32 CPU tensor
    goes through numpy, whose SIMD argmax is ~6x faster here (27 vs 162 us for 5 x 49,152): a greedy
    step's and a verification step's last reduction."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
        return torch.from_numpy(x.contiguous().numpy().argmax(axis=-1)).to(torch.int64)
    return x.argmax(dim=-1)


# metadata


def build_sampling_metadata(rows: Sequence[SamplingRow], vocab_size: int) -> SamplingMetadata:
    """Builds this step's tensors; raises ValueError for a random row without a generator."""
    params = [row.params for row in rows]
    greedy = [p.greedy for p in params]
    for i, row in enumerate(rows):
        if not greedy[i] and row.generator is None:
            raise ValueError(
                f"row {i} samples (temperature={row.params.temperature}) but has no generator"
            )
    all_greedy = all(greedy)
    random_params = [p for p, g in zip(params, greedy) if not g]
    mixed = not all_greedy and any(greedy)

    def per_row(values: Sequence[float], neutral: float, dtype: torch.dtype) -> torch.Tensor:
        # greedy rows get the neutral value: their random draw is never used
        return torch.tensor([neutral if g else v for v, g in zip(values, greedy)], dtype=dtype)

    temperature = top_k = top_p = min_p = None
    if not all_greedy:
        temperature = per_row([p.temperature for p in params], 1.0, torch.float32)
        if any(p.top_k > 0 for p in random_params):
            ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
            top_k = per_row(ks, vocab_size, torch.int64)
        if any(p.top_p < 1.0 for p in random_params):
            top_p = per_row([p.top_p for p in params], 1.0, torch.float32)
        if any(p.min_p > 0.0 for p in random_params):
            min_p = per_row([p.min_p for p in params], 0.0, torch.float32)

    # penalties (greedy rows are penalised too)
    repetition_penalty, seen_mask = _repetition_tensors(rows, vocab_size)
    frequency_penalty, presence_penalty, output_counts = _frequency_presence_tensors(
        rows, vocab_size
    )

    banned_rows, banned_ids = _banned_pairs(rows, vocab_size)
    num_logprobs = tuple(p.logprobs for p in params)
    asked = [n for n in num_logprobs if n is not None]
    return SamplingMetadata(
        vocab_size=vocab_size,
        generators=tuple(None if g else r.generator for r, g in zip(rows, greedy)),
        all_greedy=all_greedy,
        greedy_mask=torch.tensor(greedy, dtype=torch.bool) if mixed else None,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        seen_mask=seen_mask,
        output_counts=output_counts,
        banned_rows=banned_rows,
        banned_token_ids=banned_ids,
        num_logprobs=num_logprobs,
        max_num_logprobs=max(asked) if asked else None,
    )


def _repetition_tensors(
    rows: Sequence[SamplingRow], vocab_size: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(penalty [B], seen_mask [B, V]) or (None, None) when every row's penalty is 1."""
    uses = [r.params.repetition_penalty != 1.0 for r in rows]
    if not any(uses):
        return None, None
    prompts = _token_counts(
        [r.prompt_token_ids if u else () for r, u in zip(rows, uses)], vocab_size
    )
    outputs = _token_counts(
        [r.output_token_ids if u else () for r, u in zip(rows, uses)], vocab_size
    )
    penalty = torch.tensor([r.params.repetition_penalty for r in rows])
    return penalty, (prompts > 0) | (outputs > 0)


def _frequency_presence_tensors(
    rows: Sequence[SamplingRow], vocab_size: int
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(frequency [B], presence [B], output counts [B, V]) or Nones when no row uses them."""
    uses = [r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0 for r in rows]
    if not any(uses):
        return None, None, None
    counts = _token_counts(
        [r.output_token_ids if u else () for r, u in zip(rows, uses)], vocab_size
    )
    frequency = torch.tensor([r.params.frequency_penalty for r in rows])
    presence = torch.tensor([r.params.presence_penalty for r in rows])
    return frequency, presence, counts


def _token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """[B, V] float32 occurrence counts; rows are padded with the out-of-vocab id V (dropped)."""
    longest = max((len(t) for t in token_lists), default=0)
    padded = torch.full((len(token_lists), longest), vocab_size, dtype=torch.int64)
    for i, tokens in enumerate(token_lists):
        if len(tokens):
            padded[i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.int64)
    counts = torch.zeros(len(token_lists), vocab_size + 1)
    counts.scatter_add_(1, padded, torch.ones(padded.shape))
    return counts[:, :vocab_size]


def _banned_pairs(
    rows: Sequence[SamplingRow], vocab_size: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    pairs = [(i, t) for i, row in enumerate(rows) for t in row.banned_token_ids]
    if not pairs:
        return None, None
    for i, token_id in pairs:
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"row {i} bans token {token_id}, outside [0, {vocab_size})")
    rows_and_ids = torch.tensor(pairs, dtype=torch.int64)
    return rows_and_ids[:, 0], rows_and_ids[:, 1]


# logits processing (pure: each returns a new tensor or its input unchanged)


def apply_banned_tokens(
    logits: torch.Tensor, banned_rows: torch.Tensor | None, banned_token_ids: torch.Tensor | None
) -> torch.Tensor:
    if banned_rows is None or banned_token_ids is None:
        return logits
    return logits.index_put((banned_rows, banned_token_ids), logits.new_tensor(float("-inf")))


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (prompt + output tokens), then frequency and presence (output tokens only)."""
    if meta.repetition_penalty is not None and meta.seen_mask is not None:
        penalty = torch.where(meta.seen_mask, meta.repetition_penalty.unsqueeze(1), 1.0)
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    if meta.frequency_penalty is not None and meta.presence_penalty is not None:
        counts = meta.output_counts
        assert counts is not None
        logits = (
            logits
            - meta.frequency_penalty.unsqueeze(1) * counts
            - meta.presence_penalty.unsqueeze(1) * (counts > 0)
        )
    return logits


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return logits / temperature.unsqueeze(1)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Sets filtered logits to -inf. top_k: [B] (0 or above V = keep all); top_p: [B] in (0, 1].

    Ties with the k-th largest logit are kept. Top-p keeps the smallest set of most likely tokens
    whose probability reaches p (after top-k), and always the most likely token.
    """
    if top_k is None and top_p is None:
        return logits
    vocab_size = logits.shape[-1]
    if top_k is not None:
        top_k = torch.where((top_k <= 0) | (top_k > vocab_size), vocab_size, top_k)
    if top_p is None:
        assert top_k is not None
        return _apply_top_k_only(logits, top_k)
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        kth_largest = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Top-k without a full sort: one topk of the largest k in the batch."""
    max_k = int(top_k.max())
    top_values = logits.topk(max_k, dim=-1).values
    kth_largest = top_values.gather(1, (top_k - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    """Zeroes tokens whose probability is below min_p times the row's largest probability."""
    if min_p is None:
        return probs
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return probs.masked_fill(probs < threshold, 0.0)


def random_sample(
    probs: torch.Tensor, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Exponential race: argmax(p / q) with q ~ Exp(1) is a draw from p (p need not sum to 1).

    Each row's q comes from that row's own generator, so a seeded row's tokens do not depend on
    the rest of the batch. Rows without a generator draw nothing (their result is meaningless).
    """
    q = torch.ones_like(probs)
    for i, generator in enumerate(generators):
        if generator is not None:
            exponential_(q[i], generator)
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


def exponential_(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fills x with Exp(1) draws as -log(U), U ~ Uniform[0, 1): the same distribution as torch's
    `exponential_`, drawn ~4.5x faster on CPU (1.4 vs 6.2 ms for Gemma 3's 262,144 tokens, per sampled row
    and step). U = 0 gives +inf: that token is never chosen, as its probability of being drawn is 0."""
    return x.uniform_(generator=generator).log_().neg_()


def compute_logprobs(
    raw_logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprob of token_ids [B], top ids [B, num_top], top logprobs [B, num_top] descending)."""
    logprobs = raw_logits.log_softmax(dim=-1)
    sampled = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1, sorted=True)
    return sampled, top_ids, top_logprobs


# the step


def sample(logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
    """Samples one token per row of logits [B, V]; logits are not modified."""
    if logits.dim() != 2 or tuple(logits.shape) != (meta.batch_size, meta.vocab_size):
        raise ValueError(
            f"logits must be [{meta.batch_size}, {meta.vocab_size}], got {list(logits.shape)}"
        )
    raw_logits = logits.float()
    processed = apply_banned_tokens(raw_logits, meta.banned_rows, meta.banned_token_ids)
    processed = apply_penalties(processed, meta)
    token_ids = _choose_tokens(processed, meta)
    if meta.max_num_logprobs is None:
        return SamplerOutput(token_ids, None, None, None)
    sampled, top_ids, top_logprobs = compute_logprobs(raw_logits, token_ids, meta.max_num_logprobs)
    return SamplerOutput(token_ids, sampled, top_ids, top_logprobs)


def target_distribution(logits: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What `sample` would draw from, for verifying proposals: (the argmax of the processed logits [B] —
    the token of greedy rows —, the normalised distribution of random rows [B, V], None when all rows
    are greedy; greedy rows' entries there are meaningless)."""
    processed = apply_penalties(apply_banned_tokens(logits.float(), meta.banned_rows, meta.banned_token_ids), meta)
    greedy = argmax_rows(processed)
    if meta.all_greedy:
        return greedy, None
    assert meta.temperature is not None
    scaled = apply_top_k_top_p(apply_temperature(processed, meta.temperature), meta.top_k, meta.top_p)
    probs = apply_min_p(scaled.softmax(dim=-1), meta.min_p)
    return greedy, probs / probs.sum(dim=-1, keepdim=True)


def _choose_tokens(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    if meta.all_greedy:
        return argmax_rows(logits)
    assert meta.temperature is not None
    greedy_tokens = argmax_rows(logits) if meta.greedy_mask is not None else None
    scaled = apply_temperature(logits, meta.temperature)
    scaled = apply_top_k_top_p(scaled, meta.top_k, meta.top_p)
    probs = apply_min_p(scaled.softmax(dim=-1), meta.min_p)
    random_tokens = random_sample(probs, meta.generators)
    if greedy_tokens is None or meta.greedy_mask is None:
        return random_tokens
    return torch.where(meta.greedy_mask, greedy_tokens, random_tokens)
