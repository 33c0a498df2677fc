"""Micro-batching: concurrent embedding requests share one forward pass.

Callers await `embed(text)`. A worker takes whatever is queued (up to `max_batch`), waits up to
`max_wait_ms` for more only when the batch is not full, and runs the model on a worker thread so
the event loop keeps serving. While a batch runs, the next one accumulates by itself. With `workers`
> 1 that many batches run at once, each on its own thread (give each its share of the cores: on a
small machine two single-threaded forwards beat one two-threaded forward, which stalls whenever the
event loop takes a core from one of its threads).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from services.common.aio import cancel_and_wait


class MicroBatcher:
    def __init__(self, embed_fn: Callable[[Sequence[str]], np.ndarray], max_batch: int = 64,
                 max_wait_ms: float = 2.0, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self._embed_fn = embed_fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray]]] | None = None
        self._workers: list[asyncio.Task] = []
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="strata-embed")
        self.workers = workers
        self._closed = False
        self.batches = 0
        self.items = 0

    async def embed(self, text: str) -> np.ndarray:
        if self._closed:
            raise RuntimeError("the embedding batcher is closed")
        if not self._workers:
            self._queue = asyncio.Queue()
            self._workers = [asyncio.create_task(self._run(), name=f"strata-embed-batcher-{i}")
                             for i in range(self.workers)]
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put((text, fut))
        return await fut

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        target = 1   # this worker's last batch size: under steady load the same callers come back
        while not self._closed:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if len(batch) >= target or remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        batch.append(await self._queue.get())
                except TimeoutError:
                    break
            target = len(batch)
            live = [(t, f) for t, f in batch if not f.done()]   # callers that gave up are skipped
            if not live:
                continue
            try:
                vectors = await loop.run_in_executor(self._pool, self._embed_fn, [t for t, _ in live])
            except BaseException as exc:  # noqa: BLE001 - every caller of the batch gets the error
                _fail([f for _, f in live], exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            self.batches += 1
            self.items += len(live)
            for (_, f), v in zip(live, vectors):
                if not f.done():
                    f.set_result(v)

    async def close(self) -> None:
        self._closed = True
        await cancel_and_wait(self._workers)
        self._workers = []
        while self._queue is not None and not self._queue.empty():   # callers still queued get an answer too
            _fail([self._queue.get_nowait()[1]], RuntimeError("the embedding batcher is closed"))
        self._pool.shutdown(wait=False, cancel_futures=True)


def _fail(futures: list[asyncio.Future], exc: BaseException) -> None:
    for f in futures:
        if not f.done():
            if isinstance(exc, asyncio.CancelledError):
                f.cancel()
            else:
                f.set_exception(exc)
