"""Heap settings for running the networks on the CPU (glibc ``mallopt``).

Every PyTorch CPU operator allocates its output with ``malloc``. With glibc's defaults, blocks above
32 MB (and, after frees, many smaller ones) are fresh ``mmap`` regions that are unmapped again on
``free``: the next allocation of the same size faults in and zeroes every page anew. The
reconstruction U-Net at 256 x 768 allocates activations of 50 MB per operator, the multi-view UNet
and VAE many of 10-400 MB, so a forward pass spends seconds of system time in page faults (measured
on the 2-core CPU machines: about 1.5 million minor faults and 3 s of system time per
reconstruction U-Net forward).

`tune_cpu_allocator()` keeps freed memory in the heap for reuse instead: blocks up to 1 GiB are
served from the heap (``M_MMAP_THRESHOLD``), the heap is not trimmed back to the system after each
free (``M_TRIM_THRESHOLD``), and it grows in 256 MB steps (``M_TOP_PAD``). Operators then reuse
warm pages. The resident set stays at the high-water mark of the run instead of shrinking between
operators, which does not raise the peak. It changes nothing but speed: same operators, same results.

Process-wide and idempotent. glibc (Linux) only; elsewhere, or with
``CRM_CPU_ALLOCATOR=system``, it does nothing.

`release_free_heap()` (``malloc_trim``) is the other direction, for any long-lived process: it hands
the free pages of every arena back to the system (the batch driver calls it periodically).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["ENV_VAR", "SETTINGS", "release_free_heap", "trim_cpu_heap", "tune_cpu_allocator"]

ENV_VAR = "CRM_CPU_ALLOCATOR"
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
#: (mallopt parameter, value) pairs applied by `tune_cpu_allocator`.
SETTINGS: tuple[tuple[str, int, int], ...] = (
    ("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD, 1 << 30),
    ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, (1 << 31) - 1),
    ("M_TOP_PAD", _M_TOP_PAD, 256 << 20),
)
_applied: bool | None = None


def tune_cpu_allocator() -> bool:
    """Apply `SETTINGS` to glibc's allocator once per process; returns whether they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV_VAR, "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    mallopt = _glibc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None:
        return False
    for name, param, value in SETTINGS:
        if mallopt(param, value) != 1:  # not glibc, or a value it refuses
            log.debug("mallopt(%s) refused; CPU allocator left at its defaults", name)
            return False
    _applied = True
    return True


def trim_cpu_heap() -> bool:
    """Give the heap's free memory back to the system (glibc ``malloc_trim(0)``), once a stage ends.

    With `tune_cpu_allocator` in effect freed operator outputs stay in the heap; between stages
    whose activations differ in size and number (multi-view UNet, VAE, reconstruction U-Net, bake)
    that memory is of no use to the next stage and would add to its peak. The next stage faults
    in what it needs once (its first operator calls). Does nothing unless the settings are applied.
    """
    if not _applied:
        return False
    return release_free_heap()


def release_free_heap() -> bool:
    """glibc ``malloc_trim(0)``: return the free pages of every malloc arena (the main heap and each
    thread's) to the system, whatever the settings. For long-lived processes whose many threads free
    memory in arenas that glibc would otherwise keep resident (a batch driver's Ray client threads).
    Returns whether any memory was released; False where this is not glibc."""
    trim = _glibc_function("malloc_trim", (ctypes.c_size_t,))
    return bool(trim(0)) if trim is not None else False


@functools.cache
def _glibc_function(name: str, argtypes: tuple[type, ...]) -> Any:
    """The C library's function ``name`` (returning int), loaded once per process; None where the
    library or the function is missing (not glibc). The batch driver calls `release_free_heap`
    periodically: the lookup (~1.7 ms, ``find_library`` may run ``ldconfig``) is not repeated."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn
