"""Per-stage wall-clock timings, accumulated into a ``{stage: seconds}`` dict."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds spent in the block to ``timings[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
