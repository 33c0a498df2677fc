"""Micro-batching: concurrent embedding requests share one forward pass.

Callers await `embed(text)`. One worker takes whatever is queued (up to `max_batch`), waits up to
`max_wait_ms` for more only when the batch is not full, and runs the model on a worker thread so
the event loop keeps serving. While a batch runs, the next one accumulates by itself.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np


class MicroBatcher:
    def __init__(self, embed_fn: Callable[[Sequence[str]], np.ndarray], max_batch: int = 64,
                 max_wait_ms: float = 2.0) -> None:
        self._embed_fn = embed_fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray]]] | None = None
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="strata-embed")
        self.batches = 0
        self.items = 0

    async def embed(self, text: str) -> np.ndarray:
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run(), name="strata-embed-batcher")
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put((text, fut))
        return await fut

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except TimeoutError:
                        break
            live = [(t, f) for t, f in batch if not f.done()]   # callers that gave up are skipped
            if not live:
                continue
            try:
                vectors = await loop.run_in_executor(self._pool, self._embed_fn, [t for t, _ in live])
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                for _, f in live:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(live)
            for (_, f), v in zip(live, vectors):
                if not f.done():
                    f.set_result(v)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        self._pool.shutdown(wait=False, cancel_futures=True)
