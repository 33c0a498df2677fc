"""Sampling: per-request parameters (params.py, plain Python) and the batched sampler (sampler.py, torch:
imported from there, so that what only needs the parameters, such as the scheduler, never loads torch)."""

from services.inference.sampling.params import ResponseFormat, SamplingParams

__all__ = ["ResponseFormat", "SamplingParams"]
