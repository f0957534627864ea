"""Host memory of CPU runs: where a run's resident memory goes beyond what it holds live.

- glibc gives every thread that allocates its own malloc arena (up to 8 per core), and XLA's
  CPU thread pool frees its buffers into all of them; freed memory stays mapped in each arena,
  so the resident set grows with the thread count, not with the live buffers.
  limit_malloc_arenas() caps the arenas before any thread starts (the `ultrametric` command
  calls it first thing); MALLOC_ARENA_MAX in the environment, if set, wins.
- glibc serves an allocation above its mmap threshold with its own mapping, returned to the
  system on free, but raises that threshold (up to 32 MiB) each time such a block is freed:
  from then on XLA's per-layer buffers come from the heap, and every batch of an evaluation
  leaves them there, fragmented (a 1k-token evaluation of SmolLM2 grew by 1 GB in 4 batches).
  fix_mmap_threshold() pins the threshold at 1 MiB; MALLOC_MMAP_THRESHOLD_ in the environment,
  if set, wins.
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

M_ARENA_MAX = -8         # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
DEFAULT_ARENAS = 2
DEFAULT_MMAP_THRESHOLD = 1 << 20


def limit_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """Cap glibc's malloc arenas at `arenas` (True when set). A no-op returning False where
    MALLOC_ARENA_MAX is already set or the C library is not glibc (musl, macOS)."""
    if arenas < 1:
        raise ValueError(f"arenas must be >= 1, got {arenas}")
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    return _mallopt(M_ARENA_MAX, arenas)


def fix_mmap_threshold(threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold at `threshold` bytes, switching off its dynamic growth (True
    when set). A no-op returning False where MALLOC_MMAP_THRESHOLD_ is already set or the C
    library is not glibc."""
    if not 0 < threshold <= 32 << 20:
        raise ValueError(f"the mmap threshold must lie in (0, 32 MiB], got {threshold}")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return _mallopt(M_MMAP_THRESHOLD, threshold)


def _mallopt(parameter: int, value: int) -> bool:
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(parameter, value) == 1


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
