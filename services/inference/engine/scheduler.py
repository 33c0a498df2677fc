"""Continuous-batching scheduler. Never imports torch: it decides, the model runner computes.

Each step has one token budget shared by running requests (decodes, unfinished prompt chunks)
and waiting ones (chunked prefill), `max_num_seqs` running at most. Waiting requests are taken by
(priority, arrival). When KV blocks run out, the lowest-priority, latest running request is
preempted: its blocks are freed and it is recomputed later (its full blocks may still be cached). When
the batch is full (`max_num_seqs` running) and a waiting request has a strictly more urgent priority than
the least urgent running one, that one is preempted the same way to make room (vLLM's priority policy):
the gateway caps the priority a key's tier may ask for, so only a higher tier can do this to a lower one.
A waiting request strictly more urgent than every running one is scheduled in a step of its own (its first
prompt chunk, with any waiting request as urgent), so that its first token does not wait on the batch.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from services.inference.config import SchedulerConfig
from services.inference.engine.kv_cache_manager import KVCacheManager
from services.inference.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledChunk:
    request: Request
    start: int             # first position computed this step (= num_computed_tokens before the step)
    num_tokens: int        # tokens computed this step (a decode with proposals: 1 + len(spec_token_ids))
    samples: bool          # the chunk reaches the end of the known tokens: sample the next one
    spec_token_ids: list[int] = field(default_factory=list)   # proposals verified by this chunk


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # what the runner computes this step
    preempted: list[Request] = field(default_factory=list)      # freed this step, to be recomputed
    num_batched_tokens: int = 0                                  # sum of chunk sizes

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        """config: the batch limits; kv: the block tables over the KV pool the model runner holds."""
        self.config = config
        self.kv = kv
        self.waiting: list[Request] = []    # sorted by (priority, arrival_seq)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

    # queue
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request_id {req.request_id!r}")
        self.requests[req.request_id] = req
        bisect.insort(self.waiting, req, key=lambda r: r.sort_key)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Stop a request (abort, stop string, error) and free its blocks. None if unknown/finished."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = status
        return req

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def num_pending_tokens(self) -> int:
        return sum(r.num_pending_tokens for r in self.requests.values())

    # scheduling
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self.running.sort(key=lambda r: r.sort_key)

        # a full batch: more urgent waiting requests take the places of the least urgent running ones
        while (self.waiting and len(self.running) >= self.config.max_num_seqs
               and self.waiting[0].priority < self.running[-1].priority):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
        by_priority = len(out.preempted)
        # a waiting request more urgent than every running one gets a step to itself (with any others that
        # urgent): its first token does not wait on the running batch's work, which waits one step instead
        floor = self.running[0].priority if self.running else None
        urgent = bool(self.waiting and floor is not None and self.waiting[0].priority < floor)

        # running requests: decodes (with their proposals, if any) and unfinished prompt chunks
        i = 0
        while i < len(self.running) and budget > 0 and not urgent:
            req = self.running[i]
            pending = req.num_tokens - req.num_computed_tokens
            if pending != 1:
                req.spec_token_ids = []
            num_new = min(pending + len(req.spec_token_ids), budget)
            del req.spec_token_ids[max(0, num_new - pending):]          # what the budget leaves room for
            while not self.kv.allocate_slots(req, num_new):
                victim = self.running.pop()        # lowest priority, latest: not yet scheduled
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                self._schedule(out, req, num_new)
                budget -= num_new
                i += 1

        # waiting requests (none while this step had to preempt for KV blocks)
        while self.waiting and budget > 0 and len(out.preempted) == by_priority \
                and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if urgent and req.priority >= floor:
                break
            computed = self.kv.get_computed_blocks(req) if req.num_computed_tokens == 0 else []
            num_hit = len(computed) * self.kv.block_size
            num_new = min(req.num_tokens - req.num_computed_tokens - num_hit, budget)
            if not self.kv.allocate_slots(req, num_new, computed):
                break
            self.waiting.pop(0)
            req.num_computed_tokens += num_hit
            if req.num_cached_tokens is None:
                req.num_cached_tokens = num_hit
                req.first_scheduled_time = time.monotonic()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._schedule(out, req, num_new)
            budget -= num_new
        return out

    def _schedule(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        start = req.num_computed_tokens
        spec = list(req.spec_token_ids) if req.status == RequestStatus.RUNNING and num_new > 1 and \
            start + 1 == req.num_tokens else []
        out.chunks.append(ScheduledChunk(req, start, num_new, start + num_new - len(spec) == req.num_tokens, spec))
        out.num_batched_tokens += num_new

    def _preempt(self, req: Request) -> None:
        req.spec_token_ids = []
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        bisect.insort(self.waiting, req, key=lambda r: r.sort_key)

    def update_after_step(self, out: SchedulerOutput, num_accepted: dict[str, int] | None = None) -> None:
        """Advance progress of every scheduled chunk (the sampled tokens are appended by the engine). A
        chunk with proposals keeps the K/V of its first token and of the accepted proposals; the slots of
        rejected ones are released."""
        for chunk in out.chunks:
            req = chunk.request
            rejected = len(chunk.spec_token_ids) - (num_accepted or {}).get(req.request_id, 0)
            req.num_computed_tokens = chunk.start + chunk.num_tokens - rejected
            req.spec_token_ids = []
            if rejected:
                # the next step writes the position after the accepted run: keep its block
                self.kv.trim(req, req.num_computed_tokens + 1)
