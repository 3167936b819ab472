"""Handing the C heap's free pages back to the system between the phases of an actor's work."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`), after a weight load, a step, a
    publish or a save: each frees many blocks of a few MB (an engine's repacked copies, gradients, cast
    copies, serialized parts) that glibc keeps resident, scattered, beside the next phase. A no-op where the
    C library has no `malloc_trim` (not glibc)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))
