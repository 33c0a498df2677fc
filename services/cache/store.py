"""Cache entries in Redis: one hash per entry, exact-key pointers, a last-hit ordered set per
namespace, and a stream of inserts and deletes that every cache replica tails.

Keys (prefix `strata:cache:` by default):
  e:{ns}:{id}    hash   model, partition, exact, question, response, token_ids, usage, emb, created,
                        last_hit, ttl. Expires with the entry's TTL.
  x:{ns}:{exact} string the entry id of an exact key. Same TTL.
  lru:{ns}       zset   entry id -> last hit (ms); the size cap evicts its lowest first.
  namespaces     set    every namespace with entries.
  events         stream op=put|del, ns, id; capped at about 100k events.
Store, delete, eviction and a hit (read the entry, record the hit) run as Lua scripts, so each is
atomic across replicas and a hit costs one round trip.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from services.common import redis_client

STREAM_MAXLEN = 100_000

# KEYS: entry, exact, lru, namespaces, events. ARGV: id, ns, ttl_s, cap, now_ms, key prefix, then field/value pairs
_STORE = """
local entry, exact, lru, namespaces, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, ns, ttl, cap, now, prefix = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
local evicted = {}
local function drop(old)
  local okey = prefix .. 'e:' .. ns .. ':' .. old
  local oexact = redis.call('HGET', okey, 'exact')
  redis.call('DEL', okey)
  if oexact then
    local xkey = prefix .. 'x:' .. ns .. ':' .. oexact
    if redis.call('GET', xkey) == old then redis.call('DEL', xkey) end
  end
  redis.call('ZREM', lru, old)
  redis.call('XADD', events, 'MAXLEN', '~', ARGV[7], '*', 'op', 'del', 'ns', ns, 'id', old)
  table.insert(evicted, old)
end
local previous = redis.call('GET', exact)
if previous and previous ~= id then drop(previous) end
local fields = {}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('DEL', entry)
redis.call('HSET', entry, unpack(fields))
redis.call('SET', exact, id)
if ttl > 0 then
  redis.call('EXPIRE', entry, ttl)
  redis.call('EXPIRE', exact, ttl)
end
redis.call('ZADD', lru, now, id)
redis.call('SADD', namespaces, ns)
redis.call('XADD', events, 'MAXLEN', '~', ARGV[7], '*', 'op', 'put', 'ns', ns, 'id', id)
if cap > 0 then
  local excess = redis.call('ZCARD', lru) - cap
  if excess > 0 then
    for _, old in ipairs(redis.call('ZRANGE', lru, 0, excess - 1)) do
      if old ~= id then drop(old) end
    end
  end
end
return evicted
"""

# KEYS: lru, events. ARGV: id, ns, prefix, maxlen
_DELETE = """
local id, ns, prefix = ARGV[1], ARGV[2], ARGV[3]
local entry = prefix .. 'e:' .. ns .. ':' .. id
local exact = redis.call('HGET', entry, 'exact')
local existed = redis.call('DEL', entry)
if exact then
  local xkey = prefix .. 'x:' .. ns .. ':' .. exact
  if redis.call('GET', xkey) == id then redis.call('DEL', xkey) end
end
local listed = redis.call('ZREM', KEYS[1], id)
if existed + listed > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'op', 'del', 'ns', ns, 'id', id)
end
return existed
"""

# KEYS: lru. ARGV: prefix, ns, id ('' = the id the exact key points to), exact, now_ms, refresh (0/1), fields
_EXIST = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('EXISTS', key) end
return out
"""

_HIT = """
local prefix, ns, id, now = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
if id == '' then
  id = redis.call('GET', prefix .. 'x:' .. ns .. ':' .. ARGV[4])
  if not id then return false end
end
local entry = prefix .. 'e:' .. ns .. ':' .. id
local fields = {}
for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
local values = redis.call('HMGET', entry, unpack(fields))
if not values[1] then return {id} end
redis.call('HSET', entry, 'last_hit', now)
redis.call('ZADD', KEYS[1], 'XX', now, id)
if ARGV[6] == '1' then
  local ttl = tonumber(redis.call('HGET', entry, 'ttl')) or 0
  if ttl > 0 then
    redis.call('EXPIRE', entry, ttl)
    local exact = redis.call('HGET', entry, 'exact')
    if exact then redis.call('EXPIRE', prefix .. 'x:' .. ns .. ':' .. exact, ttl) end
  end
end
return {id, values}
"""
# what a hit reads back (not the embedding); "model" first: it is always set, so nil means the entry is gone
_HIT_FIELDS = ("model", "partition", "exact", "question", "response", "token_ids", "prompt_tokens",
               "completion_tokens", "cached_prompt_tokens", "finish_reason", "created", "ttl")
_HIT_KEYS = tuple(f.encode() for f in _HIT_FIELDS)


@dataclass(frozen=True, slots=True)
class Entry:
    entry_id: str
    namespace: str
    model: str
    partition: str
    exact: str
    question: str
    response: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    finish_reason: int
    created_ms: int
    ttl_s: int

    @classmethod
    def from_hash(cls, entry_id: str, namespace: str, h: dict[bytes, bytes]) -> "Entry":
        s = lambda k: h.get(k, b"").decode()  # noqa: E731
        i = lambda k: int(h.get(k, b"0") or 0)  # noqa: E731
        return cls(entry_id, namespace, s(b"model"), s(b"partition"), s(b"exact"), s(b"question"), s(b"response"),
                   np.frombuffer(h.get(b"token_ids", b""), np.int32).tolist(), i(b"prompt_tokens"),
                   i(b"completion_tokens"), i(b"cached_prompt_tokens"), i(b"finish_reason"), i(b"created"), i(b"ttl"))


class RedisStore:
    def __init__(self, url: str, prefix: str = "strata:cache:", timeout_s: float = 0.5) -> None:
        # one immediate retry on a connection error: after a Redis restart the pool still holds
        # connections to the old process, and the first command on each of them fails
        self.redis = redis_client.connect(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                          retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError],
                                          health_check_interval=0)
        self.prefix = redis_client.keyspace(self.redis, prefix)    # on a cluster, one slot: the scripts span keys
        self._store = self.redis.register_script(_STORE)
        self._delete = self.redis.register_script(_DELETE)
        self._hit = self.redis.register_script(_HIT)
        self._exist = self.redis.register_script(_EXIST)

    def _entry_key(self, ns: str, entry_id: str) -> str:
        return f"{self.prefix}e:{ns}:{entry_id}"

    def _exact_key(self, ns: str, exact: str) -> str:
        return f"{self.prefix}x:{ns}:{exact}"

    def _lru_key(self, ns: str) -> str:
        return f"{self.prefix}lru:{ns}"

    @property
    def events_key(self) -> str:
        return f"{self.prefix}events"

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def put(self, *, entry_id: str, namespace: str, model: str, partition: str, exact: str, question: str,
                  response: str, token_ids: list[int], prompt_tokens: int, completion_tokens: int,
                  cached_prompt_tokens: int, finish_reason: int, embedding: np.ndarray | None, ttl_s: int,
                  max_entries: int) -> list[str]:
        """Store one entry (replacing any entry with the same exact key); returns the evicted ids."""
        now = int(time.time() * 1000)
        fields = {
            "model": model, "partition": partition, "exact": exact, "question": question, "response": response,
            "token_ids": np.asarray(token_ids, np.int32).tobytes(), "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "cached_prompt_tokens": cached_prompt_tokens,
            "finish_reason": finish_reason, "emb": b"" if embedding is None else np.asarray(embedding, np.float32).tobytes(),
            "created": now, "last_hit": now, "ttl": ttl_s,
        }
        flat = [x for kv in fields.items() for x in kv]
        evicted = await self._store(
            keys=[self._entry_key(namespace, entry_id), self._exact_key(namespace, exact), self._lru_key(namespace),
                  f"{self.prefix}namespaces", self.events_key],
            args=[entry_id, namespace, ttl_s, max_entries, now, self.prefix, STREAM_MAXLEN, *flat])
        return [e.decode() for e in evicted]

    async def hit(self, namespace: str, refresh_ttl: bool, *, exact: str = "", entry_id: str = "") -> Entry | None:
        """The entry with this exact key (or id), its hit recorded (last-hit time; TTL refreshed if asked),
        in one round trip; None when there is none. An exact pointer that outlived its entry is deleted
        (and the replicas told)."""
        r = await self._hit(keys=[self._lru_key(namespace)],
                            args=[self.prefix, namespace, entry_id, exact, int(time.time() * 1000), int(refresh_ttl),
                                  *_HIT_FIELDS])
        if r is None:
            return None
        found = r[0].decode()
        if len(r) == 1:                     # expired between the pointer and the entry
            if exact:
                await self.delete(namespace, found)
            return None
        return Entry.from_hash(found, namespace, {k: v for k, v in zip(_HIT_KEYS, r[1]) if v is not None})

    async def delete(self, namespace: str, entry_id: str) -> bool:
        return bool(await self._delete(keys=[self._lru_key(namespace), self.events_key],
                                       args=[entry_id, namespace, self.prefix, STREAM_MAXLEN]))

    async def namespaces(self) -> list[str]:
        return sorted(m.decode() for m in await self.redis.smembers(f"{self.prefix}namespaces"))

    async def entry_ids(self, namespace: str) -> list[str]:
        return [m.decode() for m in await self.redis.zrange(self._lru_key(namespace), 0, -1)]

    async def count(self, namespace: str) -> int:
        return int(await self.redis.zcard(self._lru_key(namespace)))

    async def index_fields(self, namespace: str, entry_ids: list[str]) -> list[tuple[str, str, str, str, bytes] | None]:
        """(id, model, partition, question, emb) per id, None where the entry is gone (expired)."""
        async with self.redis.pipeline(transaction=False) as p:
            for entry_id in entry_ids:
                p.hmget(self._entry_key(namespace, entry_id), "model", "partition", "question", "emb")
            rows = await p.execute()
        out: list[tuple[str, str, str, str, bytes] | None] = []
        for entry_id, (model, partition, question, emb) in zip(entry_ids, rows):
            out.append(None if model is None else (entry_id, model.decode(), partition.decode(), question.decode(), emb or b""))
        return out

    async def existing(self, namespace: str, entry_ids: list[str]) -> list[bool]:
        """Whether each entry is still there, in one script call: the sweep asks this of every entry, and a
        pipeline of single EXISTS would cost the event loop a command object and a reply per entry."""
        if not entry_ids:
            return []
        found = await self._exist(keys=[self._entry_key(namespace, e) for e in entry_ids])
        return [bool(x) for x in found]

    async def last_event_id(self) -> str:
        last = await self.redis.xrevrange(self.events_key, count=1)
        return last[0][0].decode() if last else "0-0"

    async def read_events(self, after: str, block_ms: int, count: int = 500) -> list[tuple[str, dict[str, str]]]:
        resp = await self.redis.xread({self.events_key: after}, count=count, block=block_ms)
        out = []
        for _stream, events in resp or []:
            for event_id, fields in events:
                out.append((event_id.decode(), {k.decode(): v.decode() for k, v in fields.items()}))
        return out
