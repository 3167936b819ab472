"""Handing the C heap's free pages back to the system after a generator loads a weight version."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`), after a weight load: an engine's
    load frees many blocks of a few MB (vLLM's repacked copies) that glibc would keep resident, scattered,
    for the rest of the run. A no-op where the C library has no `malloc_trim` (not glibc). The trainer's
    step, publish and save gained nothing from it at the 0.5B shape."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))
