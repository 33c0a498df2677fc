"""What the gateway knows of the served models' replicas, from the router's ListBackends polled every
`interval_s`: per model, its replicas and how many are healthy, whether it serves chat (its chat template),
and its load (pending tokens, queued and running requests as the replicas last reported them, requests in
flight as the router counts them now). Admission reads it to refuse a chat request to a
completions-only model, to keep `auto`, splits and cascades on models able to serve the request, and to shed
the lowest tiers when a model is overloaded; ListModels shows it.

No answer from the router yet, or none for a model: its state is unknown and nothing is refused on its
account (the router and the replica still check). A router that stops answering keeps the last view for
`stale_s`, then the view is dropped (unknown) rather than trusted.

A view is up to `interval_s` old (and the replicas' own figures up to the router's --load-interval-s older):
callers refused together retry together, and a stale view let them all in at once. So admission also counts
what it let in since the last poll was sent (`admitted`), and `in_flight` adds it to the router's count."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Sequence

from services.common.aio import cancel_and_wait

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """One replica as the router reported it."""

    model: str                    # "" until the router learned it
    healthy: bool
    chat: bool
    pending_tokens: int
    waiting: int
    running: int
    in_flight: int = 0            # the router's own count of requests it has sent there and not seen end


@dataclass(frozen=True, slots=True)
class ModelState:
    name: str
    replicas: int = 0
    healthy: int = 0
    chat: bool = False
    pending_tokens: int = 0
    waiting: int = 0
    running: int = 0
    in_flight: int = 0            # the router's count when polled, plus what this gateway let in since

    @property
    def state(self) -> str:
        return "serving" if self.healthy else "down"


class ModelDirectory:
    def __init__(self, fetch: Callable[[], Awaitable[Sequence[ReplicaView]]], interval_s: float = 0.25,
                 stale_s: float = 5.0) -> None:
        self.fetch, self.interval_s, self.stale_s = fetch, interval_s, stale_s
        self._models: dict[str, ModelState] = {}
        self._at = float("-inf")              # monotonic time of the last answer
        self._admitted: dict[str, int] = {}    # model -> requests let in since the last poll was sent
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name="gateway-model-directory")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])

    async def refresh(self) -> None:
        admitted, self._admitted = self._admitted, {}
        try:
            replicas = await self.fetch()
        except BaseException:
            for model, n in admitted.items():     # no new view: they still count
                self._admitted[model] = self._admitted.get(model, 0) + n
            raise
        models: dict[str, list[ReplicaView]] = {}
        for r in replicas:
            if r.model:
                models.setdefault(r.model, []).append(r)
        self._models = {name: ModelState(name, len(rs), sum(r.healthy for r in rs), any(r.chat for r in rs),
                                         sum(r.pending_tokens for r in rs if r.healthy),
                                         sum(r.waiting for r in rs if r.healthy), sum(r.running for r in rs if r.healthy),
                                         sum(r.in_flight for r in rs if r.healthy))
                        for name, rs in models.items()}
        self._at = time.monotonic()

    async def _poll(self) -> None:
        failing = False
        while True:
            try:
                await self.refresh()
                failing = False
            except Exception as exc:  # noqa: BLE001 - the router may be away; keep polling
                if not failing:
                    log.warning("router ListBackends failed; model states unknown for now",
                                extra={"error": type(exc).__name__})
                failing = True
            await asyncio.sleep(self.interval_s)

    @property
    def known(self) -> bool:
        return time.monotonic() - self._at <= self.stale_s

    def get(self, model: str) -> ModelState | None:
        """The model's state; None when unknown (no recent router answer, or the router has no replica of it).
        Its in_flight includes what this gateway let in since the view was asked for."""
        s = self._models.get(model) if self.known else None
        extra = self._admitted.get(model, 0)
        return replace(s, in_flight=s.in_flight + extra) if s is not None and extra else s

    def admitted(self, model: str) -> None:
        """A request for `model` was let in: counted as in flight until the next view includes it."""
        self._admitted[model] = self._admitted.get(model, 0) + 1

    def serves_chat(self, model: str) -> bool | None:
        s = self.get(model)
        return None if s is None else s.chat
