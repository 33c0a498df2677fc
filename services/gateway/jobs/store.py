"""Jobs in Redis. Keys (prefix `strata:jobs:`):

    job:{id}              hash: the job (owner key, state, counts, times, webhook, metadata)
    job:{id}:items        hash: index -> the item's request (its codec's bytes)
    job:{id}:results      hash: index -> b"1" + result (answered) or b"0" + result (failed, cancelled, expired)
    job:{id}:done         stream: indexes in the order their results were written (followers read it)
    job:{id}:attempts     hash: index -> runs started
    job:{id}:deliveries   list: the webhook's delivery records (JSON)
    job:{id}:retries      set: the job's item retries ever put in `delayed` (a cancel brings those still there
                          forward without reading every job's retries)
    by-key:{key id}       sorted set: the key's jobs by creation time
    idem:{key id}:{hash}  string: an idempotency key's job (24 h)
    queue                 stream, group "workers": one message per item to run (job, item)
    submitting            sorted set: jobs whose items are still being queued, by when that began (see submit)
    webhooks              stream, group "senders": one message per webhook to deliver (job, attempt)
    delayed               sorted set: retries by due time ("i|job|item" and "w|job|attempt")
    dead                  stream: items given up, with the reason (capped at 100,000 entries)
    file:{id}             hash: an uploaded file (content and metadata); files:{key id}: the key's files

A job never loses an item: its messages stay pending in the group until a worker acknowledges them in the same
script that writes the result (`commit`), and a worker that died leaves them to be claimed by another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import httpx
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from services.common import redis_client
from services.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.gateway.jobs import JobsConfig
from services.gateway.jobs.webhooks import literal_refused

log = logging.getLogger(__name__)
from services.gateway.usage import USAGE_ROWS_LUA, USAGE_TTL_S, Row, rows_keys_args

GROUP = "workers"
SENDERS = "senders"
IDEMPOTENCY_TTL_S = 86_400
DEAD_LETTERS_KEPT = 100_000
MAX_METADATA = 16


class JobState(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self in (JobState.COMPLETED, JobState.CANCELLED, JobState.EXPIRED)


class Outcome(StrEnum):
    """How an item ended: the job's counter it adds to."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    key_id: str
    state: JobState
    format: str                           # the items' codec: "pb" (GatewayRequest) or "openai" (batch lines)
    total: int
    completed: int
    failed: int
    cancelled: int
    expired: int
    created: float
    started: float                        # 0: no item has started
    finished: float                       # 0: not ended
    expires: float                        # the end of the completion window
    cancel_requested: float               # 0: not cancelled
    webhook_url: str
    webhook_secret: str = field(repr=False)
    metadata: dict[str, str]
    endpoint: str                         # an OpenAI batch's endpoint ("" for pb)
    input_file_id: str
    queued: int = 0                       # items put in the queue so far (total once the submit has finished)

    @classmethod
    def from_hash(cls, job_id: str, d: dict[str, str]) -> Job:
        n = lambda name: int(d.get(name) or 0)          # noqa: E731
        t = lambda name: float(d.get(name) or 0)        # noqa: E731
        return cls(job_id, d.get("key_id", ""), JobState(d.get("state", "queued")), d.get("format", "pb"), n("total"),
                   n("completed"), n("failed"), n("cancelled"), n("expired"), t("created"), t("started"), t("finished"),
                   t("expires"), t("cancel_at"), d.get("webhook_url", ""), d.get("webhook_secret", ""),
                   json.loads(d.get("metadata") or "{}"), d.get("endpoint", ""), d.get("input_file_id", ""),
                   n("queued") if "queued" in d else n("total"))

    def view(self) -> dict[str, Any]:
        """The job as its webhook delivers it (no secret)."""
        return {"id": self.id, "object": "job", "state": self.state.value, "total": self.total,
                "completed": self.completed, "failed": self.failed, "cancelled": self.cancelled,
                "expired": self.expired, "created_at": self.created, "started_at": self.started or None,
                "finished_at": self.finished or None, "expires_at": self.expires, "metadata": self.metadata,
                "endpoint": self.endpoint or None}


@dataclass(frozen=True, slots=True)
class Message:
    """One queue message: an item to run (or a webhook to deliver)."""

    id: str
    job_id: str
    n: int                                # the item's index (a webhook's attempt)


# KEYS: job, idem, queue, by-key, items. ARGV: job id, items, created, idempotency TTL (0: no key), then the job's
# fields. The items were written before, with an expiry (a submit that fails leaves nothing for long): kept now.
RETRIES_TTL_S = 31 * 86_400       # a job's retries set outlives the longest completion window; then the retention

QUEUE_CHUNK = 2_000               # items queued per script: a 50,000-item job in one script held Redis 46 ms

# KEYS: job, idempotency key, queue, the key's jobs, items, submitting. ARGV: job id, items to queue now (the first
# chunk; the job hash's 'queued'), now, idempotency TTL (0: none), more to queue ('1': the job joins `submitting`),
# then the job hash's fields. The job's id, or an earlier submit's (same idempotency key).
_SUBMIT = """
if ARGV[4] ~= '0' then
  local existing = redis.call('GET', KEYS[2])
  if existing then return existing end
  redis.call('SET', KEYS[2], ARGV[1], 'EX', tonumber(ARGV[4]))
end
redis.call('PERSIST', KEYS[5])
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
for i = 0, tonumber(ARGV[2]) - 1 do redis.call('XADD', KEYS[3], '*', 'job', ARGV[1], 'n', i) end
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
if ARGV[5] == '1' then redis.call('ZADD', KEYS[6], ARGV[3], ARGV[1]) end
return ARGV[1]
"""

# KEYS: job, queue, submitting. ARGV: job id, from, to, total. Queues items [from, to) if the job's 'queued' is
# `from` (so that two callers resuming one job queue each chunk once) and returns the job's 'queued' after; -1: no
# such job. The last chunk takes the job out of `submitting`.
_QUEUE_MORE = """
local q = redis.call('HGET', KEYS[1], 'queued')
if not q then redis.call('ZREM', KEYS[3], ARGV[1]) return -1 end
if tonumber(q) ~= tonumber(ARGV[2]) then return tonumber(q) end
for i = tonumber(ARGV[2]), tonumber(ARGV[3]) - 1 do redis.call('XADD', KEYS[2], '*', 'job', ARGV[1], 'n', i) end
redis.call('HSET', KEYS[1], 'queued', ARGV[3])
if tonumber(ARGV[3]) >= tonumber(ARGV[4]) then redis.call('ZREM', KEYS[3], ARGV[1]) end
return tonumber(ARGV[3])
"""

# KEYS: job, attempts, results. ARGV: item, now. {-1}: no such job; {0}: its result is written; {-2, job}: it is
# cancelled or past its window (end the item without running it); {attempt, job}: run it (attempt counts runs).
_BEGIN = """
local job = redis.call('HGETALL', KEYS[1])
if #job == 0 then return {-1} end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return {0} end
local m = redis.call('HMGET', KEYS[1], 'cancel_at', 'expires', 'state')
if (m[1] and m[1] ~= '') or tonumber(ARGV[2]) > tonumber(m[2]) then return {-2, job} end
local n = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
if m[3] == 'queued' then redis.call('HSET', KEYS[1], 'state', 'in_progress', 'started', ARGV[2]) end
return {n, job}
"""

# KEYS: job, results, done, queue, webhooks, dead, items, attempts, then the usage rows' keys. ARGV: item, result,
# outcome, message id, group, retention, now, dead-letter reason ("" = none), usage TTL, job id, then the usage rows'
# arguments. -1: the job is gone; 0: the item's result was already written (nothing charged again); 1: written;
# 2: written, and it was the job's last (the job ended: its keys expire after the retention, its webhook queued).
_COMMIT = USAGE_ROWS_LUA + """
redis.call('XACK', KEYS[4], ARGV[5], ARGV[4])
redis.call('XDEL', KEYS[4], ARGV[4])
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[3], '*', 'n', ARGV[1])
redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
if ARGV[8] ~= '' then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', %d, '*', 'job', ARGV[10], 'n', ARGV[1], 'reason', ARGV[8], 'at', ARGV[7])
end
apply_usage(9, 11, tonumber(ARGV[9]))
local c = redis.call('HMGET', KEYS[1], 'total', 'completed', 'failed', 'cancelled', 'expired', 'cancel_at', 'webhook_url')
local ended = 0
for i = 2, 5 do ended = ended + (tonumber(c[i]) or 0) end
if ended < tonumber(c[1]) then return 1 end
local state = 'completed'
if c[6] and c[6] ~= '' then state = 'cancelled' elseif (tonumber(c[5]) or 0) > 0 then state = 'expired' end
redis.call('HSET', KEYS[1], 'state', state, 'finished', ARGV[7])
for k = 1, 3 do redis.call('EXPIRE', KEYS[k], tonumber(ARGV[6])) end
for k = 7, 8 do redis.call('EXPIRE', KEYS[k], tonumber(ARGV[6])) end
if c[7] and c[7] ~= '' then redis.call('XADD', KEYS[5], '*', 'job', ARGV[10], 'n', 1) end
return 2
""" % DEAD_LETTERS_KEPT

# KEYS: the stream, delayed, the job, its attempts, its retries. ARGV: group, message id, due, member, the item (""
# for a webhook), refund ("1": the run was throttled, not failed: it does not count among the item's attempts), the
# retries set's TTL. The message is acknowledged and its retry scheduled; at once when the job has been cancelled
# meanwhile (it then ends).
_RETRY = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
local due = ARGV[3]
if ARGV[5] ~= '' and (redis.call('HGET', KEYS[3], 'cancel_at') or '') ~= '' then due = 0 end
if ARGV[6] == '1' then redis.call('HINCRBY', KEYS[4], ARGV[5], -1) end
redis.call('ZADD', KEYS[2], due, ARGV[4])
if ARGV[5] ~= '' then
  redis.call('SADD', KEYS[5], ARGV[4])
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[7]))
end
return 1
"""

# KEYS: delayed, queue, webhooks. ARGV: now, at most: the retries now due, moved to their streams.
_PROMOTE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  local kind, job, n = string.match(m, '^(%a)|([^|]+)|(%d+)$')
  if kind == 'i' then redis.call('XADD', KEYS[2], '*', 'job', job, 'n', n)
  elseif kind == 'w' then redis.call('XADD', KEYS[3], '*', 'job', job, 'n', n) end
end
return #due
"""

# KEYS: job, delayed, the job's retries. ARGV: now. The job's state after: cancelling (its retries still waiting
# brought forward, so that they end now; ZADD XX touches only members still in `delayed`), or the final state it
# already had. nil: no such job. It reads this job's retries only, not every job's.
_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'completed' or state == 'cancelled' or state == 'expired' then return state end
if (redis.call('HGET', KEYS[1], 'cancel_at') or '') == '' then
  redis.call('HSET', KEYS[1], 'cancel_at', ARGV[1], 'state', 'cancelling')
end
for _, m in ipairs(redis.call('SMEMBERS', KEYS[3])) do redis.call('ZADD', KEYS[2], 'XX', 0, m) end
return 'cancelling'
"""


class JobStore:
    def __init__(self, redis: aioredis.Redis, config: JobsConfig = JobsConfig(), usage_prefix: str = "strata:gw:") -> None:
        """usage_prefix: the gateway's keyspace (usage is written with each result). On a Redis Cluster the jobs'
        keys join its hash slot, so that the commit script's keys share one slot."""
        prefix = usage_prefix + "jobs:" if redis_client.is_cluster(redis) else "strata:jobs:"
        self.redis, self.config, self.prefix, self.usage_prefix = redis, config, prefix, usage_prefix
        self.queue, self.webhooks = prefix + "queue", prefix + "webhooks"
        self.delayed, self.dead = prefix + "delayed", prefix + "dead"
        self._submit = redis.register_script(_SUBMIT)
        self._queue_more = redis.register_script(_QUEUE_MORE)
        self.submitting = prefix + "submitting"
        self._begin = redis.register_script(_BEGIN)
        self._commit = redis.register_script(_COMMIT)
        self._retry = redis.register_script(_RETRY)
        self._promote = redis.register_script(_PROMOTE)
        self._cancel = redis.register_script(_CANCEL)

    def key(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}job:{job_id}" + (f":{part}" if part else "")

    # --- the front doors' side ------------------------------------------------------------------------------------

    async def submit(self, key_id: str, tenant: str, items: list[bytes], fmt: str, *, idempotency_key: str = "",
                     webhook_url: str = "", webhook_secret: str = "", window_s: int = 0,
                     metadata: dict[str, str] | None = None, endpoint: str = "", input_file_id: str = "") -> tuple[Job, str]:
        """A new job (or, for an idempotency key seen in the last 24 h, that key's job) and the webhook secret the
        gateway made for it ("" when the caller gave one or there is no webhook)."""
        cfg = self.config
        if not 1 <= len(items) <= cfg.max_items:
            raise InvalidArgumentError(f"a job holds 1 to {cfg.max_items} requests, not {len(items)}")
        window_s = window_s or cfg.default_window_s
        if not 60 <= window_s <= 30 * 86_400:
            raise InvalidArgumentError("completion_window_s must be 60 s to 30 days")
        metadata = metadata or {}
        if len(metadata) > MAX_METADATA or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
            raise InvalidArgumentError(f"metadata: at most {MAX_METADATA} pairs, keys up to 64 and values up to 512 "
                                       "characters")
        if len(idempotency_key) > 256:
            raise InvalidArgumentError("idempotency_key is at most 256 characters")
        made = ""
        if webhook_url:
            check_webhook_url(webhook_url, cfg.webhook_private)
            if not webhook_secret:
                webhook_secret = made = "whsec_" + secrets.token_urlsafe(32)
            elif len(webhook_secret) < 16:
                raise InvalidArgumentError("webhook_secret must be at least 16 characters")
        job_id = "batch_" + uuid.uuid4().hex[:24]
        now = time.time()
        # the items first: inert until the script below writes the job and queues them
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(items), 1000):
            pipe.hset(self.key(job_id, "items"), mapping={str(start + i): b for i, b in enumerate(items[start:start + 1000])})
        pipe.expire(self.key(job_id, "items"), 3600)
        await pipe.execute()
        first = min(len(items), QUEUE_CHUNK)
        fields = {"key_id": key_id, "tenant": tenant, "state": JobState.QUEUED.value, "format": fmt,
                  "total": len(items), "queued": first, "created": now, "expires": now + window_s, "webhook_url": webhook_url,
                  "webhook_secret": webhook_secret, "secret_made": "1" if made else "", "metadata": json.dumps(metadata),
                  "endpoint": endpoint, "input_file_id": input_file_id}
        idem = self.prefix + f"idem:{key_id}:" + _digest(idempotency_key) if idempotency_key else self.prefix + "idem:-"
        got = (await self._submit(keys=[self.key(job_id), idem, self.queue, self.prefix + f"by-key:{key_id}",
                                        self.key(job_id, "items"), self.submitting],
                                  args=[job_id, first, now, IDEMPOTENCY_TTL_S if idempotency_key else 0,
                                        "1" if first < len(items) else "0",
                                        *[x for kv in fields.items() for x in kv]])).decode()
        if got == job_id:
            await self.queue_rest(job_id, len(items), first)
        else:                                 # an earlier submit with this idempotency key: its job
            await self.redis.delete(self.key(job_id, "items"))
            job = await self.get(key_id, got)
            if job.queued < job.total:        # ... whose submitter stopped while queueing: carried on here
                await self.queue_rest(job.id, job.total, job.queued)
            if job.format != fmt:
                raise FailedPreconditionError("this idempotency key named another kind of job (a batch or a job)")
            # a retried submit whose answer was lost gets the secret the gateway made, as the first one did
            made = job.webhook_secret if await self.redis.hget(self.key(got), "secret_made") else ""
            return job, made
        return await self.get(key_id, job_id), made

    async def queue_rest(self, job_id: str, total: int, queued: int) -> None:
        """Queue a job's items from `queued` on, QUEUE_CHUNK per script, so that no script holds Redis for long.
        A submitter that stops part way leaves the job in `submitting`, where `resume_submits` finds it."""
        while 0 <= queued < total:
            to = min(total, queued + QUEUE_CHUNK)
            got = int(await self._queue_more(keys=[self.key(job_id), self.queue, self.submitting],
                                             args=[job_id, queued, to, total]))
            queued = got                     # `to`, or how far another caller got meanwhile (-1: the job is gone)

    async def resume_submits(self, older_than_s: float, limit: int = 10) -> int:
        """Carry on queueing the jobs whose submit began over `older_than_s` ago and has not finished (its gateway
        stopped part way); how many were resumed. The workers call it once per claim period."""
        ids = await self.redis.zrangebyscore(self.submitting, "-inf", time.time() - older_than_s, start=0, num=limit)
        for raw in ids:
            job_id = raw.decode()
            queued, total = await self.redis.hmget(self.key(job_id), ["queued", "total"])
            if queued is None or total is None:
                await self.redis.zrem(self.submitting, job_id)
                continue
            log.info("jobs: queueing the rest of a job whose submit stopped part way", extra={"job": job_id})
            await self.queue_rest(job_id, int(total), int(queued))
        return len(ids)

    async def get(self, key_id: str, job_id: str) -> Job:
        """The key's job (another key's, or one past its retention: NotFoundError)."""
        if not job_id.isascii() or not 1 <= len(job_id) <= 64:
            raise InvalidArgumentError("a job id is up to 64 ASCII characters")
        raw = await self.redis.hgetall(self.key(job_id))
        d = {k.decode(): v.decode() for k, v in raw.items()}
        if not d or d.get("key_id") != key_id:
            raise NotFoundError(f"no job {job_id!r} for this API key")
        return Job.from_hash(job_id, d)

    async def list(self, key_id: str, limit: int = 20, after: str = "", fmt: str = "") -> tuple[list[Job], bool]:
        """The key's jobs, newest first, created before `after` (a job id), `fmt`'s only when given; whether there
        are more."""
        if not 1 <= limit <= 100:
            raise InvalidArgumentError("limit must be 1 to 100")
        index = self.prefix + f"by-key:{key_id}"
        top = "+inf"
        if after:
            score = await self.redis.zscore(index, after)
            if score is None:
                raise NotFoundError(f"no job {after!r} for this API key")
            top = f"({score}"
        out: list[Job] = []
        offset = 0
        while len(out) <= limit:
            ids = await self.redis.zrevrangebyscore(index, top, "-inf", start=offset, num=2 * limit)
            if not ids:
                break
            offset += len(ids)
            for raw_id in ids:
                job_id = raw_id.decode()
                try:
                    job = await self.get(key_id, job_id)
                except NotFoundError:         # past its retention
                    await self.redis.zrem(index, job_id)
                    offset -= 1
                    continue
                if not fmt or job.format == fmt:
                    out.append(job)
        return out[:limit], len(out) > limit

    async def cancel(self, key_id: str, job_id: str) -> Job:
        await self.get(key_id, job_id)
        await self._cancel(keys=[self.key(job_id), self.delayed, self.key(job_id, "retries")], args=[time.time()])
        return await self.get(key_id, job_id)

    async def results(self, job_id: str, after: str = "0-0", count: int = 500) -> tuple[list[tuple[int, bytes]], str]:
        """Results written after stream id `after`, in the order they were written, and the last id read."""
        entries = await self.redis.xrange(self.key(job_id, "done"), f"({after}" if after != "0-0" else "-", "+",
                                          count=count)
        if not entries:
            return [], after
        ns = [int(e[1][b"n"]) for e in entries]
        values = await self.redis.hmget(self.key(job_id, "results"), [str(n) for n in ns])
        return [(n, v) for n, v in zip(ns, values) if v is not None], entries[-1][0].decode()

    async def all_results(self, job: Job) -> list[tuple[int, bytes]]:
        """Every result written so far, by index (read by index: a scan may return a field twice)."""
        out: list[tuple[int, bytes]] = []
        for start in range(0, job.total, 1000):
            ns = list(range(start, min(job.total, start + 1000)))
            values = await self.redis.hmget(self.key(job.id, "results"), [str(n) for n in ns])
            out += [(n, v) for n, v in zip(ns, values) if v is not None]
        return out

    async def attempts(self, job_id: str) -> dict[int, int]:
        return {int(k): int(v) for k, v in (await self.redis.hgetall(self.key(job_id, "attempts"))).items()}

    async def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(d) for d in await self.redis.lrange(self.key(job_id, "deliveries"), 0, -1)]

    # --- uploaded files (OpenAI's /v1/files, purpose "batch") ------------------------------------------------------

    async def put_file(self, key_id: str, filename: str, content: bytes, purpose: str) -> dict[str, Any]:
        if len(content) > self.config.max_file_bytes:
            raise InvalidArgumentError(f"the file is larger than {self.config.max_file_bytes} bytes")
        file_id = "file-" + uuid.uuid4().hex[:24]
        meta = {"id": file_id, "key_id": key_id, "filename": filename[:256], "bytes": len(content),
                "created_at": int(time.time()), "purpose": purpose}
        name, ttl = self.prefix + f"file:{file_id}", int(self.config.retention_s)
        await (self.redis.pipeline(transaction=True)
               .hset(name, mapping={"meta": json.dumps(meta), "content": content}).expire(name, ttl)
               .zadd(self.prefix + f"files:{key_id}", {file_id: time.time()}).execute())
        return meta

    async def file(self, key_id: str, file_id: str, content: bool = False) -> tuple[dict[str, Any], bytes]:
        """An uploaded file's metadata (and content when asked); another key's is NotFoundError."""
        name = self.prefix + f"file:{file_id}"
        meta, data = await self.redis.hmget(name, ["meta", "content"] if content else ["meta", "-"])
        d = json.loads(meta) if meta else None
        if d is None or d["key_id"] != key_id:
            raise NotFoundError(f"no file {file_id!r} for this API key")
        return d, data or b""

    async def files(self, key_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The key's files, newest first (those past their retention dropped)."""
        index = self.prefix + f"files:{key_id}"
        out = []
        for raw in await self.redis.zrevrange(index, 0, limit - 1):
            try:
                out.append((await self.file(key_id, raw.decode()))[0])
            except NotFoundError:
                await self.redis.zrem(index, raw)
        return out

    async def delete_file(self, key_id: str, file_id: str) -> None:
        await self.file(key_id, file_id)
        await (self.redis.pipeline(transaction=True).delete(self.prefix + f"file:{file_id}")
               .zrem(self.prefix + f"files:{key_id}", file_id).execute())

    # --- the workers' side -------------------------------------------------------------------------------------------

    async def ensure_groups(self) -> None:
        for stream, group in ((self.queue, GROUP), (self.webhooks, SENDERS)):
            try:
                await self.redis.xgroup_create(stream, group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read(self, stream: str, group: str, consumer: str, count: int) -> list[Message]:
        """New messages for `consumer` (not blocking: an idle worker polls)."""
        try:
            got = await self.redis.xreadgroup(group, consumer, {stream: ">"}, count=count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):     # Redis came back without the group (no persistence): made again
                raise
            await self.ensure_groups()
            return []
        return [_message(mid, f) for _, entries in got for mid, f in entries]

    async def claim(self, stream: str, group: str, consumer: str, idle_s: float, count: int,
                    start: str = "0-0") -> tuple[list[Message], str]:
        """Messages another worker took and has not renewed for `idle_s` (it died): now `consumer`'s; and where the
        next claim goes on in the pending list ("0-0": it was all scanned)."""
        try:
            cursor, entries, *_ = await self.redis.xautoclaim(stream, group, consumer, int(idle_s * 1000), start,
                                                             count=count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_groups()
            return [], "0-0"
        return [_message(mid, f) for mid, f in entries if f], cursor.decode() if isinstance(cursor, bytes) else cursor

    async def renew(self, stream: str, group: str, consumer: str, ids: list[str]) -> None:
        """Keep the messages being worked on from looking abandoned."""
        if ids:
            await self.redis.xclaim(stream, group, consumer, 0, ids, justid=True)

    async def promote(self, limit: int = 200) -> int:
        return int(await self._promote(keys=[self.delayed, self.queue, self.webhooks], args=[time.time(), limit]))

    async def begin(self, job_id: str, n: int) -> tuple[int, Job | None]:
        got = await self._begin(keys=[self.key(job_id), self.key(job_id, "attempts"), self.key(job_id, "results")],
                                args=[n, time.time()])
        if len(got) < 2:
            return int(got[0]), None
        raw = got[1]
        d = {raw[i].decode(): raw[i + 1].decode() for i in range(0, len(raw), 2)}
        return int(got[0]), Job.from_hash(job_id, d)

    async def item(self, job_id: str, n: int) -> bytes | None:
        return await self.redis.hget(self.key(job_id, "items"), str(n))

    async def commit(self, msg: Message, result: bytes, ok: bool, outcome: Outcome, charges: dict[Row, list[int]],
                     dead_reason: str = "") -> int:
        """Write an item's result, its usage and the acknowledgement of its message in one script (see _COMMIT)."""
        job = msg.job_id
        keys, args = rows_keys_args(self.usage_prefix, charges)
        return int(await self._commit(
            keys=[self.key(job), self.key(job, "results"), self.key(job, "done"), self.queue, self.webhooks, self.dead,
                  self.key(job, "items"), self.key(job, "attempts"), *keys],
            args=[msg.n, (b"1" if ok else b"0") + result, outcome.value, msg.id, GROUP, int(self.config.retention_s),
                  time.time(), dead_reason, USAGE_TTL_S, job, *args]))

    async def retry(self, stream: str, group: str, msg: Message, due: float, kind: str, refund: bool = False) -> None:
        """Acknowledge `msg` and run it again at `due` (kind "i": an item, "w": a webhook, msg.n its next attempt);
        `refund`: the item's run was throttled and does not count among its attempts."""
        await self._retry(keys=[stream, self.delayed, self.key(msg.job_id), self.key(msg.job_id, "attempts"),
                                self.key(msg.job_id, "retries")],
                          args=[group, msg.id, due, f"{kind}|{msg.job_id}|{msg.n}", msg.n if kind == "i" else "",
                                "1" if refund else "0", RETRIES_TTL_S + int(self.config.retention_s)])

    async def ack(self, stream: str, group: str, msg: Message) -> None:
        await self.redis.pipeline(transaction=True).xack(stream, group, msg.id).xdel(stream, msg.id).execute()

    async def job(self, job_id: str) -> Job | None:
        raw = await self.redis.hgetall(self.key(job_id))
        return Job.from_hash(job_id, {k.decode(): v.decode() for k, v in raw.items()}) if raw else None

    async def record_delivery(self, job_id: str, record: dict[str, Any]) -> None:
        name = self.key(job_id, "deliveries")
        await (self.redis.pipeline(transaction=True).rpush(name, json.dumps(record))
               .expire(name, int(self.config.retention_s)).execute())

    async def backlog(self) -> tuple[int, int, int]:
        """(items queued or running, retries scheduled, dead letters kept)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.queue).zcard(self.delayed).xlen(self.dead)
        return tuple(int(x) for x in await pipe.execute())   # type: ignore[return-value]


def check_webhook_url(url: str, allow_private: bool = False) -> None:
    """An http(s) URL that the webhook client can send to, without credentials in it (the signature is the
    credential; a URL's user and password would show in delivery records), and not at a private address unless
    `allow_private` (a name is resolved and checked at each delivery: `webhooks.resolve_allowed`)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        parsed = None
    if (parsed is None or parsed.scheme not in ("http", "https") or not parsed.host or len(url) > 2048
            or not url.isascii() or not url.isprintable()):
        raise InvalidArgumentError("webhook_url must be an http(s) URL of at most 2048 printable ASCII characters")
    if parsed.userinfo:
        raise InvalidArgumentError("webhook_url must not carry a user or password: the signature authenticates it")
    why = literal_refused(parsed.host, allow_private)
    if why:
        raise InvalidArgumentError(f"webhook_url points at {why}; this gateway sends webhooks to public addresses "
                                   "only (--webhook-allow-private lifts that)")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _message(mid: bytes, f: dict[bytes, bytes]) -> Message:
    return Message(mid.decode(), f[b"job"].decode(), int(f[b"n"]))
