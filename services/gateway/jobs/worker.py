"""The jobs' consumers, one per gateway: items run through the gateway's own pipeline (its key, limits, budget,
cache, usage) at JOB_PRIORITY, after every interactive request; webhooks delivered when a job ends.

An item's life: `begin` counts the run (or ends the item at once when its job was cancelled or is past its
window) → the pipeline → `commit` writes the result, the usage of that run and the message's acknowledgement in
one script. A transient failure (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, ...) is acknowledged and scheduled
again after base * 2^(attempt-1) seconds, jittered, at most backoff_max_s; after `max_attempts` runs, or at once
for a request that cannot succeed (INVALID_ARGUMENT, PERMISSION_DENIED, ...), the item's result is the error, and
a transient one also goes to the dead-letter stream with its reason. A throttled run (RESOURCE_EXHAUSTED with a
retry-after: the key's rate limits, shedding under interactive load, the gateway's capacity, a budget that resets)
is not a failure: it waits the retry-after (jittered, at most backoff_max_s, then asks again) and does not count
among the attempts, so a large job on a rate-limited key runs at the key's rate instead of failing. Only the run
whose result is written is charged: a run cut short by a retry or a worker's death is not.

A worker that dies leaves its messages pending; the others take them over after `claim_idle_s` (a live worker
renews its own every third of that), and run them again: the result is written once (the first commit wins) and
charged once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import time
import uuid
from dataclasses import replace

import httpx

from services.common.aio import cancel_and_wait
from services.common.errors import StrataError, UnauthenticatedError
from services.common.metrics import GatewayMetrics
from services.gateway.errors import REDIS_ERRORS
from services.gateway.jobs import JobsConfig
from services.gateway.jobs.codecs import CODECS, ItemCodec
from services.gateway.jobs.store import GROUP, SENDERS, Job, JobStore, Message, Outcome
from services.gateway.jobs.webhooks import deliver
from services.gateway.keys import KeyStore
from services.gateway.service import Gateway
from services.gateway.stages.admit import JobCall
from services.gateway.usage import Row

log = logging.getLogger(__name__)
RETRYABLE = {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "ABORTED", "CANCELLED"}
WEBHOOK_SLOTS = 4                     # webhooks one worker delivers at once
COMMIT_PATIENCE_S = 30.0              # how long a finished item's commit is retried while Redis is away


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """The wait before run `attempt + 1`: base * 2^(attempt-1) capped at max_s, of which the upper half is random
    ("equal jitter": retries of many items spread out, none comes back at once)."""
    d = min(max_s, base_s * 2 ** (attempt - 1))
    return d / 2 + random.uniform(0, d / 2)


def throttled_wait_s(retry_after_s: float, max_s: float) -> float:
    """A throttled item's wait: the retry-after and up to half again (items throttled together come back spread
    out), at most max_s."""
    return min(max_s, retry_after_s * (1 + random.uniform(0, 0.5)))


class JobWorker:
    def __init__(self, store: JobStore, gateway: Gateway, keys: KeyStore, config: JobsConfig,
                 metrics: GatewayMetrics | None = None, consumer: str = "") -> None:
        self.store, self.gateway, self.keys, self.config = store, gateway, keys, config
        self.metrics = metrics or gateway.metrics
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._items: dict[str, asyncio.Task] = {}       # message id -> its run
        self._sends: dict[str, asyncio.Task] = {}
        self._cursors: dict[str, str] = {}              # stream -> where the next claim goes on in its pending list
        self._loop: asyncio.Task | None = None
        self._stopping = False
        self._http = httpx.AsyncClient()

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run())

    async def stop(self, grace_s: float = 5.0) -> None:
        """Take no more work; give the running items `grace_s` to finish. Those still running are cancelled and their
        messages stay pending, for another worker to take over."""
        self._stopping = True
        if self._loop is not None:
            await cancel_and_wait([self._loop])
        running = list(self._items.values()) + list(self._sends.values())
        if running:
            await asyncio.wait(running, timeout=grace_s)
            await cancel_and_wait(running)
        await self._http.aclose()

    # --- the loop -----------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        cfg, store = self.config, self.store
        claim_every = max(cfg.poll_s, cfg.claim_idle_s / 4)
        last_claim = last_renew = last_resume = 0.0
        failing, groups = False, False
        while not self._stopping:
            try:
                if failing or not groups:      # made once; again after a Redis that lost them (no persistence)
                    await store.ensure_groups()
                    groups = True
                now = time.monotonic()
                await store.promote()
                if now - last_renew >= cfg.claim_idle_s / 3:
                    last_renew = now
                    await store.renew(store.queue, GROUP, self.consumer, list(self._items))
                    await store.renew(store.webhooks, SENDERS, self.consumer, list(self._sends))
                # a claim turn waits for a free slot (it is not used up while every slot is busy)
                claim = now - last_claim >= claim_every and (len(self._items) < cfg.workers
                                                             or len(self._sends) < WEBHOOK_SLOTS)
                if claim:
                    last_claim = now
                if now - last_resume >= claim_every:          # a gateway stopped while it queued a job's items
                    last_resume = now
                    await store.resume_submits(cfg.claim_idle_s)
                got = await self._take(store.queue, GROUP, cfg.workers - len(self._items), claim, self._items,
                                       self._item)
                got += await self._take(store.webhooks, SENDERS, WEBHOOK_SLOTS - len(self._sends), claim, self._sends,
                                        self._send)
                if failing:
                    log.info("jobs: the store is back")
                failing = False
                if not got:
                    await asyncio.sleep(cfg.poll_s)
            except REDIS_ERRORS:
                if not failing:
                    log.warning("jobs: the store is unreachable; retrying")
                failing = True
                await asyncio.sleep(min(2.0, 5 * cfg.poll_s))

    async def _take(self, stream: str, group: str, free: int, claim: bool, tasks: dict[str, asyncio.Task], run) -> int:
        if free <= 0:
            return 0
        msgs: list[Message] = []
        if claim:                             # before new messages: a dead worker's items are the oldest
            msgs, self._cursors[stream] = await self.store.claim(stream, group, self.consumer, self.config.claim_idle_s,
                                                                 free, self._cursors.get(stream, "0-0"))
            msgs = [m for m in msgs if m.id not in tasks]
        if len(msgs) < free:
            msgs += await self.store.read(stream, group, self.consumer, free - len(msgs))
        for m in msgs:
            task = asyncio.create_task(run(m))
            tasks[m.id] = task
            task.add_done_callback(lambda _, mid=m.id: tasks.pop(mid, None))
        return len(msgs)

    # --- an item ------------------------------------------------------------------------------------------------

    async def _item(self, msg: Message) -> None:
        store, cfg = self.store, self.config
        try:
            attempt, job = await store.begin(msg.job_id, msg.n)
            if job is None:                   # its result is written, or the job is gone
                await store.ack(store.queue, GROUP, msg)
                return
            codec = CODECS[job.format]
            item = await store.item(msg.job_id, msg.n) or b""
            if attempt == -2:                 # cancelled, or its window ended, before it ran
                if job.cancel_requested:
                    out, code, why = Outcome.CANCELLED, "CANCELLED", "the job was cancelled before this request ran"
                else:
                    out, code, why = Outcome.EXPIRED, "DEADLINE_EXCEEDED", "the job's completion window ended first"
                await self._commit(msg, codec.failure(msg.n, item, code, why, 0), False, out, {})
                return
            if attempt > cfg.max_attempts:    # its runs never finished: the workers running it stopped
                why = f"{attempt - 1} runs did not finish (their workers stopped)"
                await self._commit(msg, codec.failure(msg.n, item, "ABORTED", why, attempt - 1), False, Outcome.FAILED,
                                   {}, dead_reason=why)
                return
            await self._run_item(msg, job, codec, item, attempt)
        except REDIS_ERRORS:
            log.warning("jobs: an item's state could not be read or written; it will be run again",
                        extra={"job": msg.job_id, "item": msg.n})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: retried as a transient failure, then given up
            log.exception("jobs: an item failed unexpectedly", extra={"job": msg.job_id, "item": msg.n})
            await self._unexpected(msg, exc)

    async def _run_item(self, msg: Message, job: Job, codec: ItemCodec, item: bytes, attempt: int) -> None:
        """Run `attempt` of the item through the pipeline; then its result is committed, or its retry scheduled."""
        store, cfg = self.store, self.config
        call = None
        try:
            key = await self.keys.get(job.key_id)
            if key.revoked or key.expired():
                raise UnauthenticatedError("the job's API key was revoked or has expired")
            call = JobCall(key)
            request = codec.request(item)
            result = await self.gateway.generate(request, "", timeout_s=cfg.item_timeout_s, job=call)
        except StrataError as exc:
            retry_after = getattr(exc, "retry_after_s", None)
            if exc.status == "RESOURCE_EXHAUSTED" and retry_after is not None:      # throttled, not failed
                await store.retry(store.queue, GROUP, msg, time.time() + throttled_wait_s(retry_after, cfg.backoff_max_s),
                                  "i", refund=True)
                self.metrics.job_throttled.inc()
                return
            if exc.status in RETRYABLE and attempt < cfg.max_attempts:
                await store.retry(store.queue, GROUP, msg,
                                  time.time() + backoff_s(attempt, cfg.backoff_base_s, cfg.backoff_max_s), "i")
                self.metrics.job_retries.inc()
                return
            dead = f"{exc.status}: {exc} (after {attempt} runs)" if exc.status in RETRYABLE else ""
            await self._commit(msg, codec.failure(msg.n, item, exc.status, str(exc), attempt), False,
                               Outcome.FAILED, call.charges if call else {}, dead)
            return
        await self._commit(msg, codec.answer(msg.n, item, result, attempt), True, Outcome.COMPLETED, call.charges)

    async def _unexpected(self, msg: Message, exc: Exception) -> None:
        store, cfg = self.store, self.config
        try:
            attempt = (await store.attempts(msg.job_id)).get(msg.n, 0)
            if attempt < cfg.max_attempts:
                await store.retry(store.queue, GROUP, msg,
                                  time.time() + backoff_s(max(1, attempt), cfg.backoff_base_s, cfg.backoff_max_s), "i")
                return
            job = await store.job(msg.job_id)
            if job is None:
                await store.ack(store.queue, GROUP, msg)
                return
            why = f"INTERNAL: {type(exc).__name__} (after {attempt} runs)"
            item = await store.item(msg.job_id, msg.n) or b""
            await self._commit(msg, CODECS[job.format].failure(msg.n, item, "INTERNAL", "internal error", attempt),
                               False, Outcome.FAILED, {}, dead_reason=why)
        except REDIS_ERRORS:              # left pending: taken over after claim_idle_s
            pass

    async def _commit(self, msg: Message, result: bytes, ok: bool, outcome: Outcome, charges: dict[Row, list[int]],
                      dead_reason: str = "") -> None:
        deadline = time.monotonic() + COMMIT_PATIENCE_S
        delay = 0.1
        while True:
            try:
                written = await self.store.commit(msg, result, ok, outcome, charges, dead_reason)
                break
            except REDIS_ERRORS:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)
        if written > 0:
            self.metrics.job_items.labels(outcome.value).inc()
            if dead_reason:
                self.metrics.job_dead_letters.inc()
                log.warning("jobs: an item was given up", extra={"job": msg.job_id, "item": msg.n,
                                                                 "reason": dead_reason})
        if written == 2:
            log.info("jobs: a job ended", extra={"job": msg.job_id})

    # --- a webhook ----------------------------------------------------------------------------------------------

    async def _send(self, msg: Message) -> None:
        store, cfg = self.store, self.config
        try:
            job = await store.job(msg.job_id)
            if job is None or not job.webhook_url:
                await store.ack(store.webhooks, SENDERS, msg)
                return
            body = json.dumps(job.view()).encode()
            t0 = time.perf_counter()
            status, error = await deliver(self._http, job.webhook_url, job.webhook_secret, job.id, body,
                                          cfg.webhook_timeout_s, cfg.webhook_private)
            await store.record_delivery(job.id, {"attempt": msg.n, "at": time.time(), "status_code": status,
                                                 "error": error, "duration_ms": round(1000 * (time.perf_counter() - t0), 1)})
            if 200 <= status < 300:
                self.metrics.webhook_deliveries.labels("ok").inc()
                await store.ack(store.webhooks, SENDERS, msg)
            elif msg.n < cfg.webhook_attempts:
                self.metrics.webhook_deliveries.labels("retry").inc()
                due = time.time() + backoff_s(msg.n, cfg.webhook_backoff_s, cfg.backoff_max_s)
                await store.retry(store.webhooks, SENDERS, replace(msg, n=msg.n + 1), due, "w")
            else:
                self.metrics.webhook_deliveries.labels("given_up").inc()
                log.warning("jobs: a webhook was given up", extra={"job": job.id, "attempts": msg.n, "error": error})
                await store.ack(store.webhooks, SENDERS, msg)
        except REDIS_ERRORS:
            log.warning("jobs: a webhook's state could not be read or written; it will be sent again",
                        extra={"job": msg.job_id})
