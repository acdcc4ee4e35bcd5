"""Hand the memory a long-lived flow process has freed back to the system.

Two allocators keep what the process freed resident: Arrow's memory pool (mimalloc in the pyarrow
wheels) keeps the pages of freed buffers, and glibc keeps what threads freed inside their arenas.
Measured on the project's CPU machine: validating a 10^6-row manifest left 88 MB resident in Arrow's
pool after every buffer was freed; a batch driver's Ray client threads left tens of MB in glibc's
arenas. :func:`release_free_memory` returns both; the manifest reader calls it after validation and
the batch driver every ``heap_trim_s``.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.weights.cpu_allocator import release_free_heap

__all__ = ["release_free_memory"]


def release_free_memory() -> None:
    """Arrow's pool ``release_unused()``, then glibc ``malloc_trim(0)``; live data is untouched."""
    pa.default_memory_pool().release_unused()
    release_free_heap()
