"""Sampling: per-request parameters and the batched sampler."""

from services.inference.sampling.params import SamplingParams
from services.inference.sampling.sampler import (
    SamplerOutput,
    SamplingMetadata,
    SamplingRow,
    build_sampling_metadata,
    make_generator,
    sample,
    target_distribution,
)

__all__ = [
    "SamplerOutput",
    "SamplingMetadata",
    "SamplingParams",
    "SamplingRow",
    "build_sampling_metadata",
    "make_generator",
    "sample",
    "target_distribution",
]
