"""Giving the C heap's free pages back to the OS (glibc's malloc_trim): once a model has loaded
(engine/factory.py), and each time a serving engine goes idle after a burst (engine/async_engine.py)."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):       # not glibc: nothing to do
        return None


def release_freed_memory() -> None:
    """glibc keeps freed pages in its heap once its mmap threshold has grown past the blocks freed: the parsed
    GGUF metadata after loading (gguf-py's reader keeps a numpy array per vocabulary entry and merge), the
    dense weights an int8 pass replaced, a burst's activations (prefill chunks, large batches). A replica
    kept 90 MiB more after 64 streams of 128 + 128 tokens without this. Costs a few ms."""
    trim = _trim()
    if trim is not None:
        trim(0)
