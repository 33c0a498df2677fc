"""The semantic cache's logic (no grpc): lookup, store, delete, invalidate, replica sync, health.

Lookup order: not cacheable (temperature > 0 without opt-in) → exact key in Redis → semantic search
in this replica's in-memory index (only entries of the same partition) → the hit decision → the
entry read back from Redis (an entry gone meanwhile is forgotten and the next candidate tried).
Redis down: lookups answer a fast miss (`degraded`), stores raise UNAVAILABLE, health reports
NOT_SERVING for the cache service; when Redis is back the index is rebuilt and serving resumes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
from redis.exceptions import RedisError

from services.cache.decision import HitDecider
from services.cache.index import ANN_MIN_ROWS, NamespaceIndex
from services.cache.keys import CacheKey, make_key, validate_entry_id, validate_namespace
from services.cache.store import Entry, RedisStore
from services.common.aio import cancel_and_wait
from services.common.errors import InvalidArgumentError, UnavailableError
from services.embedding.batcher import MicroBatcher

log = logging.getLogger(__name__)
T = TypeVar("T")
_REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
MAX_EMBED_TEXTS = 2048        # texts in one Embed call (OpenAI's bound for one embeddings request)
GRAPH_SLICE_S = 0.02          # a graph build slice on the index thread: what a search may wait behind it


@dataclass(frozen=True, slots=True)
class CacheConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "strata:cache:"
    default_ttl_s: int = 86_400            # 0 = entries never expire
    refresh_ttl_on_hit: bool = True
    max_entries_per_namespace: int = 100_000
    max_question_chars: int = 16_000
    max_response_chars: int = 1_000_000
    top_k: int = 5
    ann_min_rows: int = ANN_MIN_ROWS       # a partition this large is searched through its graph (index.py)
    similarity_threshold: float | None = None   # plain cosine instead of the calibrated classifier
    hit_threshold: float | None = None     # the classifier's hit probability (None: the one it was trained with)
    redis_timeout_s: float = 0.5
    health_interval_s: float = 1.0
    sweep_interval_s: float = 30.0
    embed_max_batch: int = 64
    embed_max_wait_ms: float = 2.0
    embed_workers: int = 1                 # embedding batches in flight at once (one thread each)


@dataclass(slots=True)
class Query:
    namespace: str
    model: str
    prompt: str | None = None
    messages: Sequence[tuple[str, str]] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LookupResult:
    hit: bool
    layer: str = ""                   # "exact" | "semantic" | ""
    score: float = 0.0
    confidence: float = 0.0
    entry: Entry | None = None
    degraded: bool = False
    miss_reason: str = ""


@dataclass(slots=True)
class Counters:
    lookups: int = 0
    hits_exact: int = 0
    hits_semantic: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    embedded: int = 0         # texts embedded for Embed callers (not lookups)


class SemanticCacheService:
    def __init__(self, config: CacheConfig, embedder: Any, decider: HitDecider | None = None,
                 replica_id: str = "") -> None:
        self.config = config
        self.embedder = embedder
        self.decider = decider or (HitDecider(None, config.similarity_threshold)
                                   if config.similarity_threshold is not None else HitDecider.default(config.hit_threshold))
        self.replica_id = replica_id or uuid.uuid4().hex[:8]
        self.store = RedisStore(config.redis_url, config.key_prefix, config.redis_timeout_s)
        self.batcher = MicroBatcher(embedder.embed, config.embed_max_batch, config.embed_max_wait_ms, config.embed_workers)
        self.indexes: dict[str, NamespaceIndex] = {}
        self._index_thread = ThreadPoolExecutor(1, thread_name_prefix="strata-index")
        self.counters = Counters()
        self.redis_ok = False
        self._tasks: list[asyncio.Task] = []
        self._last_event = "0-0"
        self._health_listeners: list[Any] = []
        self._synced = asyncio.Event()

    # lifecycle
    async def start(self) -> None:
        """Rebuild from Redis (if reachable) and start tailing events, health checks and sweeps."""
        try:
            await self.rebuild()
            self._set_redis_ok(True)
        except _REDIS_ERRORS as exc:
            log.warning("redis unreachable at start; serving misses until it is back", extra={"error": type(exc).__name__})
            self._set_redis_ok(False)
        self._tasks = [asyncio.create_task(self._tail(), name="cache-tail"),
                       asyncio.create_task(self._grow_graphs(), name="cache-graphs"),
                       asyncio.create_task(self._watch_redis(), name="cache-health"),
                       asyncio.create_task(self._sweep(), name="cache-sweep")]

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        await self.batcher.close()
        await self.store.close()
        self._index_thread.shutdown(wait=False, cancel_futures=True)

    def on_health_change(self, callback: Any) -> None:
        """callback(ok: bool) is called (as a task if a coroutine) whenever Redis reachability flips."""
        self._health_listeners.append(callback)

    def _set_redis_ok(self, ok: bool) -> None:
        changed = ok != self.redis_ok
        self.redis_ok = ok
        if changed:
            log.info("redis reachable" if ok else "redis unreachable: cache degraded")
            for cb in self._health_listeners:
                res = cb(ok)
                if asyncio.iscoroutine(res):
                    asyncio.ensure_future(res)

    async def rebuild(self) -> None:
        """The in-memory indexes from Redis; events after the captured stream position are replayed."""
        last = await self.store.last_event_id()
        indexes: dict[str, NamespaceIndex] = {}
        t0 = time.monotonic()
        next_log = t0 + 5.0
        for ns in await self.store.namespaces():
            ids = await self.store.entry_ids(ns)
            loaded = 0
            for start in range(0, len(ids), 1000):
                chunk = ids[start:start + 1000]
                found = []
                for entry_id, row in zip(chunk, await self.store.index_fields(ns, chunk)):
                    if row is None:
                        await self.store.delete(ns, entry_id)
                    elif row[4]:
                        found.append((entry_id, row[2], row[3], np.frombuffer(row[4], np.float32)))
                if found:
                    ids_, parts, questions, vectors = zip(*found)
                    await self._on_index(self._index(indexes, ns).add_many, ids_, parts, questions, np.stack(vectors),
                                         False)
                loaded += len(chunk)
                if time.monotonic() >= next_log:
                    log.info("cache index rebuild in progress", extra={"namespace_entries_read": loaded, "of": len(ids),
                                                                       "elapsed_s": round(time.monotonic() - t0, 1)})
                    next_log = time.monotonic() + 5.0
        for idx in indexes.values():             # large partitions search exactly until _grow_graphs fills them
            await self._on_index(idx.start_graphs)
        self.indexes = indexes
        self._last_event = last
        self._synced.set()
        log.info("cache index rebuilt", extra={"namespaces": len(indexes), "entries": sum(len(i) for i in indexes.values()),
                                               "elapsed_s": round(time.monotonic() - t0, 1)})

    async def _on_index(self, fn: Callable[..., T], *args: Any) -> T:
        """Every index call runs on the index's own thread, one at a time: the event loop never waits on a scan,
        a graph insert or a rebuild's bulk add, and the index needs no lock."""
        return await asyncio.get_running_loop().run_in_executor(self._index_thread, fn, *args)

    @staticmethod
    def _store_in_index(idx: NamespaceIndex, evicted: Sequence[str], entry_id: str, key: CacheKey,
                        embedding: np.ndarray | None) -> None:
        for old in evicted:
            idx.remove(old)
        if embedding is not None:
            idx.add(entry_id, key.partition, key.question, embedding)

    def _index(self, indexes: dict[str, NamespaceIndex], ns: str) -> NamespaceIndex:
        idx = indexes.get(ns)
        if idx is None:
            idx = indexes[ns] = NamespaceIndex(self.embedder.dim, ann_min_rows=self.config.ann_min_rows)
        return idx

    async def _tail(self) -> None:
        """Apply every replica's inserts and deletes to this replica's index."""
        while True:
            if not self.redis_ok:
                await asyncio.sleep(self.config.health_interval_s / 2)
                continue
            try:
                events = await self.store.read_events(self._last_event, block_ms=int(self.config.redis_timeout_s * 400))
                for event_id, ev in events:
                    await self._apply(ev)
                    self._last_event = event_id
            except _REDIS_ERRORS:
                await asyncio.sleep(self.config.health_interval_s / 2)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the tail must survive a malformed event
                log.exception("cache event tail failed")
                await asyncio.sleep(1.0)

    async def _apply(self, ev: dict[str, str]) -> None:
        ns, entry_id = ev.get("ns", ""), ev.get("id", "")
        if ev.get("op") == "del":
            idx = self.indexes.get(ns)
            if idx is not None:
                await self._on_index(idx.remove, entry_id)
        elif ev.get("op") == "put" and entry_id not in self.indexes.get(ns, ()):
            row = (await self.store.index_fields(ns, [entry_id]))[0]
            if row is not None and row[4]:
                await self._on_index(self._index(self.indexes, ns).add, entry_id, row[2], row[3],
                                     np.frombuffer(row[4], np.float32))

    async def _grow_graphs(self) -> None:
        """Fill the graphs being built, a slice per index-thread call, so lookups interleave with the build
        (a 1M-entry graph takes about a minute of both cores). A slice stops after GRAPH_SLICE_S: measured at 1M,
        slices of 2,000 rows took 0.4 to 0.8 s in the service, and a search queued behind one waited as long."""
        while True:
            building = [idx for idx in self.indexes.values() if idx.building]
            if not building:
                await asyncio.sleep(0.2)
                continue
            for idx in building:
                t0 = time.monotonic()
                try:
                    while await self._on_index(idx.grow_graphs, 1_000_000, GRAPH_SLICE_S):
                        await asyncio.sleep(0)
                except Exception:  # noqa: BLE001 - exact search keeps serving; the build is tried again
                    log.exception("cache index graph build failed")
                    await asyncio.sleep(5.0)
                    continue
                log.info("cache index graph built", extra={"entries": len(idx), "graphs": idx.graphs,
                                                           "elapsed_s": round(time.monotonic() - t0, 1)})

    async def _watch_redis(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self.store.ping()
                if not self.redis_ok:
                    await self.rebuild()   # events may have been missed while it was away
                    self._set_redis_ok(True)
            except _REDIS_ERRORS:
                self._set_redis_ok(False)

    async def _sweep(self) -> None:
        """Drop index rows whose Redis entry expired (TTL) without anyone looking it up."""
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            if not self.redis_ok:
                continue
            try:
                for ns, idx in list(self.indexes.items()):
                    ids = await self._on_index(idx.ids)
                    for start in range(0, len(ids), 1000):
                        chunk = ids[start:start + 1000]
                        for entry_id, alive in zip(chunk, await self.store.existing(ns, chunk)):
                            if not alive:
                                await self._on_index(idx.remove, entry_id)
                                await self.store.delete(ns, entry_id)
            except _REDIS_ERRORS:
                continue

    # requests
    def key(self, q: Query) -> CacheKey:
        return make_key(q.namespace, q.model, q.prompt, q.messages, q.sampling, self.config.max_question_chars)

    def _semantic_ok(self, key: CacheKey) -> bool:
        """Questions longer than the embedding model's window would be compared by their start only."""
        return self.embedder.fits(key.question)

    async def embed(self, texts: Sequence[str], truncate: bool = False) -> tuple[np.ndarray, list[int]]:
        """The texts' embeddings ([n, dim] float32, unit rows) and the tokens the model read of each, through the
        lookups' micro-batcher (so callers' texts and lookups share forward passes). A text past the model's
        window is INVALID_ARGUMENT unless `truncate` (then it is cut there, as sentence-transformers does)."""
        if not 1 <= len(texts) <= MAX_EMBED_TEXTS:
            raise InvalidArgumentError(f"embed 1 to {MAX_EMBED_TEXTS} texts, not {len(texts)}")
        for i, t in enumerate(texts):
            if not t:
                raise InvalidArgumentError(f"text {i} is empty")
        window = self.embedder.max_seq_len
        counts = (self.embedder.count_tokens(texts) if len(texts) <= 8
                  else await asyncio.to_thread(self.embedder.count_tokens, texts))
        if not truncate:
            over = next((i for i, n in enumerate(counts) if n > window), None)
            if over is not None:
                raise InvalidArgumentError(f"text {over} has {counts[over]} tokens; the embedding model reads at most "
                                           f"{window} (ask to truncate to cut it there)")
        vectors = await asyncio.gather(*(self.batcher.embed(t) for t in texts))
        self.counters.embedded += len(texts)
        return np.stack(vectors).astype(np.float32, copy=False), [min(n, window) for n in counts]

    async def lookup(self, q: Query, semantic: bool = True, min_similarity: float | None = None,
                     allow_sampled: bool = False) -> LookupResult:
        key = self.key(q)
        if min_similarity is not None and not 0.0 <= min_similarity <= 1.0:
            raise InvalidArgumentError("min_similarity must be in [0, 1]")
        self.counters.lookups += 1
        if not key.deterministic and not allow_sampled:
            return self._miss("not_cacheable")
        if not self.redis_ok:
            return self._miss("degraded", degraded=True)
        try:
            entry = await self.store.hit(key.namespace, self.config.refresh_ttl_on_hit, exact=key.exact)
            if entry is not None:
                self.counters.hits_exact += 1
                return LookupResult(True, "exact", 1.0, 1.0, entry)
            idx = self.indexes.get(key.namespace)
            if not semantic or idx is None or not len(idx) or not self._semantic_ok(key):
                return self._miss("not_found")
            vector = await self.batcher.embed(key.question)
            candidates = await self._on_index(idx.search, vector, key.partition, self.config.top_k)
            if not candidates:
                return self._miss("not_found")
            ranked = self.decider.ranked(key.question, [(c.question, c.score) for c in candidates], min_similarity)
            for i, decision in ranked:       # the most confident first; an entry gone meanwhile gives way to the next
                chosen = candidates[i]
                entry = await self.store.hit(key.namespace, self.config.refresh_ttl_on_hit, entry_id=chosen.entry_id)
                if entry is not None:
                    self.counters.hits_semantic += 1
                    return LookupResult(True, "semantic", chosen.score, decision.confidence, entry)
                await self._on_index(idx.remove, chosen.entry_id)       # expired: forget it
                await self.store.delete(key.namespace, chosen.entry_id)
            if not ranked:
                return self._miss("below_threshold", score=candidates[0].score)
            return self._miss("not_found")
        except _REDIS_ERRORS as exc:
            log.warning("redis failed during lookup: answering a miss", extra={"error": type(exc).__name__})
            self._set_redis_ok(False)
            return self._miss("degraded", degraded=True)

    def _miss(self, reason: str, degraded: bool = False, score: float = 0.0) -> LookupResult:
        self.counters.misses += 1
        return LookupResult(False, score=score, degraded=degraded, miss_reason=reason)

    async def store_answer(self, q: Query, response: str, *, token_ids: Sequence[int] = (), prompt_tokens: int = 0,
                           completion_tokens: int = 0, cached_prompt_tokens: int = 0, finish_reason: int = 0,
                           ttl_s: int | None = None, allow_sampled: bool = False) -> tuple[str | None, str]:
        """Returns (entry id, "") when stored, (None, reason) when the request is not cacheable."""
        key = self.key(q)
        if not key.deterministic and not allow_sampled:
            return None, "not_cacheable"
        if len(response) > self.config.max_response_chars:
            raise InvalidArgumentError(f"response is longer than {self.config.max_response_chars} characters")
        if min(prompt_tokens, completion_tokens, cached_prompt_tokens) < 0:
            raise InvalidArgumentError("token counts must be >= 0")
        ttl = self.config.default_ttl_s if ttl_s is None else ttl_s
        if ttl < 0:
            raise InvalidArgumentError("ttl_s must be >= 0 (0 = no expiry)")
        if not self.redis_ok:
            raise UnavailableError("cache store (redis) is unreachable")
        embedding = await self.batcher.embed(key.question) if self._semantic_ok(key) else None
        entry_id = uuid.uuid4().hex
        try:
            evicted = await self.store.put(
                entry_id=entry_id, namespace=key.namespace, model=key.model, partition=key.partition, exact=key.exact,
                question=key.question, response=response, token_ids=list(token_ids), prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens, cached_prompt_tokens=cached_prompt_tokens,
                finish_reason=finish_reason, embedding=embedding, ttl_s=ttl,
                max_entries=self.config.max_entries_per_namespace)
        except _REDIS_ERRORS as exc:
            self._set_redis_ok(False)
            raise UnavailableError("cache store (redis) is unreachable") from exc
        await self._on_index(self._store_in_index, self._index(self.indexes, key.namespace), evicted, entry_id, key,
                             embedding)
        self.counters.stores += 1
        self.counters.evictions += len(evicted)
        return entry_id, ""

    async def delete(self, namespace: str, entry_id: str) -> bool:
        validate_namespace(namespace)
        validate_entry_id(entry_id)
        try:
            deleted = await self.store.delete(namespace, entry_id)
        except _REDIS_ERRORS as exc:
            self._set_redis_ok(False)
            raise UnavailableError("cache store (redis) is unreachable") from exc
        idx = self.indexes.get(namespace)
        if idx is not None:
            await self._on_index(idx.remove, entry_id)
        return deleted

    async def invalidate(self, namespace: str, model: str = "") -> int:
        validate_namespace(namespace)
        deleted = 0
        try:
            ids = await self.store.entry_ids(namespace)
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                rows = await self.store.index_fields(namespace, chunk)
                for entry_id, row in zip(chunk, rows):
                    if row is None or not model or row[1] == model:
                        deleted += await self.delete(namespace, entry_id)
        except _REDIS_ERRORS as exc:
            self._set_redis_ok(False)
            raise UnavailableError("cache store (redis) is unreachable") from exc
        return deleted

    async def stats(self, namespace: str = "") -> dict[str, Any]:
        if namespace:
            validate_namespace(namespace)
        entries = -1
        if self.redis_ok:
            try:
                names = [namespace] if namespace else await self.store.namespaces()
                entries = sum([await self.store.count(ns) for ns in names])
            except _REDIS_ERRORS:
                self._set_redis_ok(False)
        c = self.counters
        return {"entries": entries, "lookups": c.lookups, "hits_exact": c.hits_exact, "hits_semantic": c.hits_semantic,
                "misses": c.misses, "stores": c.stores, "evictions": c.evictions, "redis_ok": self.redis_ok,
                "namespaces": len(self.indexes), "decision": self.decider.describe()}

