"""Speculative decoding: proposers (n-gram prompt lookup) and the verification of their proposals
(greedy exact match, rejection sampling) inside the continuous batch."""

from services.inference.spec_decode.ngram import NgramProposer
from services.inference.spec_decode.rejection import greedy_verify, rejection_sample

__all__ = ["NgramProposer", "greedy_verify", "rejection_sample"]
