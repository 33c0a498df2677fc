"""asyncio helpers shared by the services."""

from __future__ import annotations

import asyncio
from typing import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task], retry_s: float = 0.1) -> None:
    """Cancel tasks and wait until every one has finished. A task can swallow one cancellation when it
    races with a result it was waiting for (asyncio.wait_for and client libraries built on it, bpo-42130),
    so the cancellation is repeated until the task really ends, instead of waiting forever."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_s)
