"""Draft-model proposals: a smaller (or quantized) model sharing the target's tokenizer proposes k tokens
greedily; the target verifies them. A greedy draft is a point-mass proposal, so the verification rules
(exact match for greedy requests, rejection sampling with q = one-hot for sampled ones) keep the target's
output distribution whatever the draft says; a good draft only makes more proposals accepted.

The draft keeps its own paged KV cache: one shadow request per target request (its tokens mirrored, its
own blocks from its own pool, no prefix caching), stepped through a ModelRunner of the draft model. Each
engine step the draft first catches up on the tokens the target accepted since (one chunk), then
proposes one token per draft step, for all speculating requests in one batch. After verification the
shadow keeps the K/V of the verified tokens only; rejected positions are overwritten later."""

from __future__ import annotations

from collections.abc import Sequence

from services.inference.engine.kv_cache_manager import KVCacheManager
from services.inference.engine.model_runner import ModelRunner
from services.inference.engine.request import Request
from services.inference.engine.scheduler import ScheduledChunk, SchedulerOutput
from services.inference.models.registry import CausalLM
from services.inference.sampling import SamplingParams
from services.inference.spec_decode import ProposalRequest

_GREEDY = SamplingParams(temperature=0.0)


class DraftProposer:
    """A Proposer (spec_decode/proposer.py) that runs a draft model over shadow copies of the requests."""

    def __init__(self, model: CausalLM, num_kv_blocks: int, block_size: int, vocab_size: int) -> None:
        if model.hp.vocab_size != vocab_size:
            raise ValueError(f"the draft's vocabulary ({model.hp.vocab_size}) differs from the target's ({vocab_size})")
        self.model = model
        self.kv = KVCacheManager(num_kv_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(model, num_kv_blocks, block_size)
        self._shadows: dict[str, Request] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks

    def _shadow(self, req: ProposalRequest) -> Request:
        shadow = self._shadows.get(req.request_id)
        if shadow is None:
            shadow = self._shadows[req.request_id] = Request(req.request_id, list(req.all_token_ids), _GREEDY,
                                                            max_tokens=1 << 30)
        else:                       # mirror the target's tokens; keep K/V only where they still agree
            common = 0
            limit = min(shadow.num_computed_tokens, len(req.all_token_ids))
            while common < limit and shadow.all_token_ids[common] == req.all_token_ids[common]:
                common += 1
            shadow.all_token_ids = list(req.all_token_ids)
            shadow.num_computed_tokens = common
            self.kv.trim(shadow, common + 1)
        return shadow

    def release(self, request_id: str) -> None:
        """Free a finished, aborted or preempted request's draft blocks."""
        shadow = self._shadows.pop(request_id, None)
        if shadow is not None:
            self.kv.free(shadow)
            self.runner.release(request_id)

    def propose(self, requests: Sequence[ProposalRequest], ks: Sequence[int]) -> list[list[int]]:
        """Up to ks[i] greedy draft tokens for requests[i] (fewer, or none, when the draft's KV pool is full)."""
        proposals: list[list[int]] = [[] for _ in requests]
        live = [(i, self._shadow(r), k) for i, (r, k) in enumerate(zip(requests, ks)) if k > 0]
        for step in range(max((k for _, _, k in live), default=0)):
            chunks = []
            for i, shadow, k in live:
                if step >= k or (step > 0 and not proposals[i]):
                    continue
                n = shadow.num_tokens - shadow.num_computed_tokens          # catch-up chunk, then 1 a step
                if not self.kv.allocate_slots(shadow, n):
                    continue                                                 # no room: propose less
                chunks.append(ScheduledChunk(shadow, shadow.num_computed_tokens, n, True))
            if not chunks:
                break
            out = self.runner.execute(SchedulerOutput(chunks=chunks, num_batched_tokens=sum(c.num_tokens for c in chunks)))
            index = {shadow.request_id: i for i, shadow, _ in live}
            for chunk in chunks:
                shadow = chunk.request
                shadow.num_computed_tokens = chunk.start + chunk.num_tokens
                token = out.sampled[shadow.request_id][0].token_id
                shadow.all_token_ids.append(token)
                proposals[index[shadow.request_id]].append(token)
        return proposals
