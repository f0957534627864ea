"""Host memory of CPU runs: where a run's resident memory goes beyond what it holds live.

- glibc gives every thread that allocates its own malloc arena (up to 8 per core), and XLA's
  CPU thread pool frees its buffers into all of them; freed memory stays mapped in each arena,
  so the resident set grows with the thread count, not with the live buffers.
  limit_malloc_arenas() caps the arenas before any thread starts (the `ultrametric` command
  calls it first thing); MALLOC_ARENA_MAX in the environment, if set, wins.
- Every compiled program stays cached with its code and constants: the dense baseline's, the
  train step's, each task's prefill and decode loops. release_compiled() drops them between
  the phases of a run, which never reuse the previous phase's programs, and hands the freed
  pages back to the system (malloc_trim).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

M_ARENA_MAX = -8         # glibc's mallopt parameter number (malloc.h)
DEFAULT_ARENAS = 2


def limit_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """Cap glibc's malloc arenas at `arenas` (True when set). A no-op returning False where
    MALLOC_ARENA_MAX is already set or the C library is not glibc (musl, macOS)."""
    if arenas < 1:
        raise ValueError(f"arenas must be >= 1, got {arenas}")
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_ARENA_MAX, arenas) == 1


def release_compiled() -> None:
    """Drop every cached compiled program (jax.jit's and nnx.jit's caches), collect, and return
    the free heap pages to the system where the C library can (glibc's malloc_trim)."""
    import jax
    jax.clear_caches()
    gc.collect()
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
        trim(0)


def _libc_function(name: str):
    """The C library's function `name`, or None where it has none (not glibc)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
