"""Prompt-lookup (n-gram) proposals: the longest suffix of a request's tokens, n from max_n down to min_n,
that occurred earlier in its prompt or output proposes the k tokens that followed its latest earlier
occurrence (llama.cpp's lookup decoding, vLLM's `ngram`). Input-grounded generations (summaries,
extraction, edits of given text or code) copy long runs of their input and get most proposals accepted;
open-ended chat finds few matches and proposes little, so it costs little."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.inference.spec_decode.proposer import ProposalRequest

# Only the last this-many tokens are searched (bounded cost per step; long inputs keep their recent part).
MAX_LOOKBACK = 4096


class NgramProposer:
    """A Proposer (spec_decode/proposer.py) that keeps nothing between steps."""

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= ngram min ({min_n}) <= ngram max ({max_n})")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: Sequence[ProposalRequest], ks: Sequence[int]) -> list[list[int]]:
        return [self.lookup(r.all_token_ids, k) for r, k in zip(requests, ks)]

    def release(self, request_id: str) -> None:
        pass

    def lookup(self, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to k tokens continuing token_ids, [] when no suffix of min_n..max_n tokens recurs."""
        if k < 1 or len(token_ids) <= self.min_n:
            return []
        tokens = np.asarray(token_ids[-MAX_LOOKBACK:], dtype=np.int64)
        total = len(tokens)
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            suffix = tokens[total - n:]
            # windows starting at 0 .. total - n - 1: every earlier occurrence (the suffix itself excluded)
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:total - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n                  # the tokens after the latest earlier occurrence
                return tokens[start:start + k].tolist()
        return []
