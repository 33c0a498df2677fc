"""Speculative decoding: proposers (n-gram prompt lookup, a draft model) and the verification of their proposals
(greedy exact match, rejection sampling) inside the continuous batch."""

from services.inference.spec_decode.ngram import NgramProposer
from services.inference.spec_decode.rejection import greedy_verify, rejection_sample

# the draft proposer (spec_decode.draft) builds on the engine's model runner: imported from there, not here
__all__ = ["NgramProposer", "greedy_verify", "rejection_sample"]
