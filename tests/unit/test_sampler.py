"""Specification of the sampling package: parameters, metadata and the batched sampler."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from services.inference.sampling import SamplingParams
from services.inference.sampling.sampler import (
    SamplingMetadata,
    SamplingRow,
    apply_penalties,
    apply_top_k_top_p,
    argmax_rows,
    build_sampling_metadata,
    make_generator,
    sample,
)

VOCAB = 32


def row(
    params: SamplingParams | None = None,
    *,
    prompt: tuple[int, ...] = (1, 2, 3),
    output: tuple[int, ...] = (),
    banned: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> SamplingRow:
    params = params or SamplingParams()
    if generator is None and not params.greedy:
        generator = make_generator(params.seed if params.seed is not None else 0)
    return SamplingRow(params, prompt, output, generator, banned)


def run(rows: list[SamplingRow], logits: torch.Tensor) -> torch.Tensor:
    return sample(logits, build_sampling_metadata(rows, logits.shape[-1])).token_ids


def random_logits(batch: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


GREEDY = SamplingParams(temperature=0.0)


# greedy


def test_greedy_rows_return_the_argmax_of_the_logits() -> None:
    logits = random_logits(4)
    tokens = run([row(GREEDY) for _ in range(4)], logits)
    torch.testing.assert_close(tokens, logits.argmax(dim=-1))


def test_all_greedy_batch_builds_no_penalty_or_filter_tensors() -> None:
    meta = build_sampling_metadata([row(GREEDY), row(GREEDY)], VOCAB)
    assert meta.all_greedy and meta.no_penalties
    tensors = [getattr(meta, f.name) for f in dataclasses.fields(SamplingMetadata)]
    assert not any(isinstance(t, torch.Tensor) for t in tensors)


def test_rows_without_top_k_top_p_or_min_p_build_no_filter_tensors() -> None:
    meta = build_sampling_metadata([row(SamplingParams(temperature=0.7)), row(GREEDY)], VOCAB)
    assert meta.top_k is None and meta.top_p is None and meta.min_p is None
    assert meta.greedy_mask is not None and meta.temperature is not None


def test_mixed_batch_takes_argmax_on_greedy_rows_only() -> None:
    logits = random_logits(3)
    rows = [row(GREEDY), row(SamplingParams(temperature=5.0, seed=1)), row(GREEDY)]
    tokens = run(rows, logits)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_sampling_row_without_a_generator_is_rejected() -> None:
    bad = SamplingRow(SamplingParams(temperature=1.0), (), (), None)
    with pytest.raises(ValueError, match="generator"):
        build_sampling_metadata([bad], VOCAB)


def test_sample_does_not_modify_the_callers_logits() -> None:
    logits = random_logits(2)
    before = logits.clone()
    params = SamplingParams(
        temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
        frequency_penalty=0.5, presence_penalty=0.5, logprobs=3,
    )
    run([row(params, output=(4, 4, 5), banned=(7,)), row(GREEDY, banned=(1,))], logits)
    torch.testing.assert_close(logits, before, rtol=0, atol=0)


# reproducibility


def test_same_seed_gives_the_same_tokens() -> None:
    params = SamplingParams(temperature=1.5, seed=1234)
    logits = random_logits(1)
    first = run([row(params)], logits).item()  # a fresh generator from the request's seed
    g1, g2 = make_generator(1234), make_generator(1234)
    a = [run([row(params, generator=g1)], logits).item() for _ in range(20)]
    b = [run([row(params, generator=g2)], logits).item() for _ in range(20)]
    assert a == b and a[0] == first
    assert len(set(a)) > 1  # the generator advances between steps


def test_neighbours_in_the_batch_do_not_change_a_seeded_rows_tokens() -> None:
    seeded = SamplingParams(temperature=1.2, top_p=0.95, seed=99)
    alone_gen, batched_gen = make_generator(99), make_generator(99)
    neighbours = [
        row(SamplingParams(temperature=2.0, top_k=3), generator=make_generator(5)),
        row(GREEDY),
        row(SamplingParams(temperature=0.5, min_p=0.2), generator=make_generator(6)),
    ]
    alone, batched = [], []
    for step in range(8):
        logits = random_logits(4, seed=100 + step)
        alone.append(run([row(seeded, generator=alone_gen)], logits[1:2]).item())
        rows = [neighbours[0], row(seeded, generator=batched_gen), *neighbours[1:]]
        batched.append(run(rows, logits)[1].item())
    assert alone == batched
    assert len(set(alone)) > 1


# filters


def test_top_k_of_one_equals_greedy() -> None:
    logits = random_logits(6)
    rows = [row(SamplingParams(temperature=3.0, top_k=1, seed=i)) for i in range(6)]
    torch.testing.assert_close(run(rows, logits), logits.argmax(dim=-1))


def test_top_k_above_the_vocab_size_keeps_every_token() -> None:
    meta = build_sampling_metadata([row(SamplingParams(top_k=10 * VOCAB, seed=0))], VOCAB)
    assert meta.top_k is not None and meta.top_k.tolist() == [VOCAB]
    assert sample(random_logits(1), meta).token_ids.shape == (1,)


def test_top_k_filter_treats_zero_and_oversized_k_as_keep_all() -> None:
    logits = random_logits(3, vocab=6)
    out = apply_top_k_top_p(logits, torch.tensor([0, 100, 2]), None)
    torch.testing.assert_close(out[:2], logits[:2])
    assert int(torch.isfinite(out[2]).sum()) == 2


def test_tiny_top_p_equals_greedy() -> None:
    logits = random_logits(6)
    rows = [row(SamplingParams(temperature=3.0, top_p=1e-6, seed=i)) for i in range(6)]
    torch.testing.assert_close(run(rows, logits), logits.argmax(dim=-1))


def test_top_k_and_top_p_together_only_sample_within_both() -> None:
    logits = torch.tensor([[4.0, 3.9, 3.8, 0.0, 0.0, 0.0]]).repeat(400, 1)
    generator = make_generator(3)
    params = SamplingParams(top_k=3, top_p=0.6)  # top-3 are ~1/3 each: top-p keeps two of them
    tokens = run([row(params, generator=generator) for _ in range(400)], logits)
    assert set(tokens.tolist()) == {0, 1}


def test_min_p_never_samples_tokens_below_the_threshold() -> None:
    # probs ~ [0.50, 0.30, 0.13, 0.05, 0.02]: min_p=0.2 keeps tokens with prob >= 0.10
    logits = torch.tensor([0.50, 0.30, 0.13, 0.05, 0.02]).log().repeat(2000, 1)
    generator = make_generator(11)
    tokens = run([row(SamplingParams(min_p=0.2), generator=generator) for _ in range(2000)], logits)
    assert set(tokens.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_distribution_matches_softmax_of_logits_over_temperature(
    temperature: float,
) -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5])
    draws = 4000
    generator = make_generator(2024)
    params = SamplingParams(temperature=temperature)
    tokens = run([row(params, generator=generator) for _ in range(draws)], logits.repeat(draws, 1))
    observed = torch.bincount(tokens, minlength=4).double()

    def chi_square(t: float) -> float:
        expected = torch.softmax(logits.double() / t, dim=-1) * draws
        return float(((observed - expected) ** 2 / expected).sum())

    assert chi_square(temperature) < 16.27  # p = 0.001 with 3 degrees of freedom
    assert chi_square(1.0) > 100  # a sampler that ignored the temperature would fail


# penalties


def penalised(params: SamplingParams, logits: torch.Tensor, **kw: tuple[int, ...]) -> torch.Tensor:
    meta = build_sampling_metadata([row(params, **kw)], logits.shape[-1])
    return apply_penalties(logits, meta)


def test_repetition_penalty_divides_positive_and_multiplies_negative_repeated_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    out = penalised(SamplingParams(repetition_penalty=2.0), logits, prompt=(0,), output=(1,))
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 2.0, -2.0, 1.0]]))


def test_frequency_penalty_scales_with_count_and_presence_does_not() -> None:
    logits = torch.zeros(1, 4)
    output = (1, 2, 2, 2)
    freq = penalised(SamplingParams(frequency_penalty=0.5), logits, prompt=(0,), output=output)
    torch.testing.assert_close(freq, torch.tensor([[0.0, -0.5, -1.5, 0.0]]))
    pres = penalised(SamplingParams(presence_penalty=0.5), logits, prompt=(0,), output=output)
    torch.testing.assert_close(pres, torch.tensor([[0.0, -0.5, -0.5, 0.0]]))


def test_greedy_rows_take_the_argmax_of_penalised_logits() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert run([row(params, prompt=(), output=(0,))], logits).item() == 1


# banned tokens and logprobs


def test_banned_token_ids_are_never_sampled() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]]).repeat(300, 1)
    generator = make_generator(8)
    sampled = row(SamplingParams(temperature=2.0), generator=generator, banned=(0, 1))
    rows = [sampled] * 299 + [row(GREEDY, banned=(0,))]
    tokens = run(rows, logits)
    assert not set(tokens[:-1].tolist()) & {0, 1}
    assert tokens[-1].item() == 1


def test_logprobs_are_raw_log_softmax_and_top_n_is_sorted_descending() -> None:
    logits = random_logits(3)
    params = [
        SamplingParams(temperature=0.7, repetition_penalty=1.5, logprobs=2, seed=0),
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(seed=2),
    ]
    out = sample(logits, build_sampling_metadata([row(p, output=(3,)) for p in params], VOCAB))
    assert out.logprobs is not None and out.top_logprobs is not None
    assert out.top_token_ids is not None
    raw = logits.log_softmax(dim=-1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids.unsqueeze(1)).squeeze(1))
    assert out.top_logprobs.shape == (3, 5) and out.top_token_ids.shape == (3, 5)
    assert bool((out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all())
    torch.testing.assert_close(out.top_logprobs, raw.gather(1, out.top_token_ids))
    torch.testing.assert_close(out.top_token_ids[:, 0], logits.argmax(dim=-1))


def test_no_logprobs_are_computed_when_no_row_asks() -> None:
    out = sample(random_logits(2), build_sampling_metadata([row(GREEDY), row()], VOCAB))
    assert out.logprobs is None and out.top_token_ids is None and out.top_logprobs is None


def test_logits_of_the_wrong_shape_are_rejected() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        sample(random_logits(2), build_sampling_metadata([row(GREEDY)], VOCAB))


# validation


def test_default_params_are_valid_and_sampled() -> None:
    SamplingParams().validate(VOCAB)
    assert not SamplingParams().greedy and SamplingParams(temperature=0.0).greedy


def test_params_at_the_edges_of_every_range_are_valid() -> None:
    SamplingParams(
        temperature=10.0, top_k=VOCAB, top_p=1e-9, min_p=1.0, repetition_penalty=10.0,
        presence_penalty=-2.0, frequency_penalty=2.0, seed=-(2**63), max_tokens=1, min_tokens=1,
        stop=("x" * 256,) * 16, stop_token_ids=(VOCAB - 1,) * 64, logprobs=20,
    ).validate(VOCAB)
    SamplingParams(temperature=0.0, seed=2**63 - 1, logprobs=0).validate(VOCAB)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", 10.5),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_k", -1),
        ("top_k", VOCAB + 1),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 10.1),
        ("repetition_penalty", math.inf),
        ("presence_penalty", -2.1),
        ("presence_penalty", 2.1),
        ("frequency_penalty", -2.1),
        ("frequency_penalty", math.nan),
        ("seed", 2**63),
        ("seed", -(2**63) - 1),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("stop", ("a",) * 17),
        ("stop", ("",)),
        ("stop", ("x" * 257,)),
        ("stop_token_ids", (0,) * 65),
        ("stop_token_ids", (VOCAB,)),
        ("stop_token_ids", (-1,)),
        ("logprobs", -1),
        ("logprobs", 21),
    ],
)
def test_validate_rejects_an_out_of_range_field_naming_it(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate(VOCAB)


def test_validate_rejects_min_tokens_above_max_tokens() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5).validate(VOCAB)


def test_argmax_rows_is_torchs_argmax_including_ties_and_nan():
    x = torch.randn(6, 1000, generator=torch.Generator().manual_seed(3))
    x[1, [10, 500]] = 50.0                                      # a tie: the first index wins
    x[2, 7] = float("nan")                                      # NaN counts as the maximum
    x[3] = 0.0                                                  # all equal
    x[4, 999] = float("inf")
    got = argmax_rows(x)
    assert got.dtype == torch.int64
    assert torch.equal(got, x.argmax(dim=-1))
    assert got[1] == 10 and got[2] == 7 and got[3] == 0 and got[4] == 999
    assert torch.equal(argmax_rows(x.t().contiguous().t()), x.argmax(dim=-1))          # non-contiguous input
    assert torch.equal(argmax_rows(x.double()), x.double().argmax(dim=-1))             # other dtypes: torch's
