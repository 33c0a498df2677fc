"""Speculative decoding's pieces that need no model: the proposer interface and its counters
(proposer.py), n-gram prompt lookup (ngram.py), how many tokens to propose (policy.py), and the verification
of proposals, greedy exact match and rejection sampling (rejection.py, torch: imported from there). The
draft-model proposer runs a model, so it lives with the engine (engine/draft_proposer.py). Nothing here
imports the engine."""

from services.inference.spec_decode.ngram import NgramProposer
from services.inference.spec_decode.proposer import ProposalRequest, Proposer, SpecDecodeStats

__all__ = ["NgramProposer", "ProposalRequest", "Proposer", "SpecDecodeStats"]
