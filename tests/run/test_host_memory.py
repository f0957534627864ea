"""run/host_memory.py: the malloc arena cap counted from glibc's own malloc_info report (one
<heap> per arena) in fresh processes, the pinned mmap threshold from glibc's mallinfo2 count of
mapped bytes, and release_compiled against jit's cache size."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from ultrametric_jax.run.host_memory import (fix_mmap_threshold, limit_malloc_arenas,
                                             release_compiled)

ROOT = Path(__file__).resolve().parents[2]
THREADS = 6

# Six threads each malloc once (glibc gives a new thread a new arena while under the cap), then
# glibc's malloc_info lists one <heap> per arena.
PROBE = textwrap.dedent(f"""
    import ctypes, ctypes.util, re, sys, tempfile, threading
    from ultrametric_jax.run.host_memory import limit_malloc_arenas
    if sys.argv[1] == "limit":
        print("set", limit_malloc_arenas(2))
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.fopen.restype = ctypes.c_void_p
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    barrier = threading.Barrier({THREADS})
    def work():
        barrier.wait()
        libc.malloc(4096)
    threads = [threading.Thread(target=work) for _ in range({THREADS})]
    [t.start() for t in threads]
    [t.join() for t in threads]
    path = tempfile.mktemp()
    fp = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    print("heaps", len(re.findall(r"<heap nr=", open(path).read())))
""")


def probe(mode: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    environ.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=environ, check=True,
                         capture_output=True, text=True).stdout
    return {k: v for k, v in re.findall(r"^(\w+) (\w+)$", out, re.M)}


needs_glibc = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="glibc's malloc arenas")


@needs_glibc
def test_the_cap_holds_the_arenas_that_threads_would_otherwise_open():
    # without the cap every thread opens its own arena (the main one plus one per thread)
    assert probe("none")["heaps"] == str(THREADS + 1)
    capped = probe("limit")
    assert capped == {"set": "True", "heaps": "2"}


@needs_glibc
def test_the_users_malloc_arena_max_wins():
    assert probe("limit", MALLOC_ARENA_MAX="3") == {"set": "False", "heaps": "3"}


# glibc raises its mmap threshold to the size of a freed mapped block: after an 8 MiB block
# is freed, a 4 MiB one comes from the heap (no mapped bytes for it) unless the threshold is
# pinned, when it gets its own mapping (mallinfo2's hblkhd: bytes in mapped blocks).
MMAP_PROBE = textwrap.dedent("""
    import ctypes, sys
    from ultrametric_jax.run.host_memory import fix_mmap_threshold
    if sys.argv[1] == "pin":
        print("set", fix_mmap_threshold())
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                    "keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblkhd
    libc.free(libc.malloc(8 << 20))
    block = libc.malloc(4 << 20)
    print("mapped", int(libc.mallinfo2().hblkhd - before >= 4 << 20))
""")


def mmap_probe(mode: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    environ.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", MMAP_PROBE, mode], env=environ, check=True,
                         capture_output=True, text=True).stdout
    return dict(re.findall(r"^(\w+) (\w+)$", out, re.M))


@needs_glibc
def test_the_pinned_mmap_threshold_keeps_large_blocks_off_the_heap():
    assert mmap_probe("none") == {"mapped": "0"}        # glibc's own, raised threshold
    assert mmap_probe("pin") == {"set": "True", "mapped": "1"}
    # the user's setting wins (here one that keeps 4 MiB on the heap)
    assert mmap_probe("pin", MALLOC_MMAP_THRESHOLD_=str(16 << 20)) == {"set": "False",
                                                                     "mapped": "0"}
    with pytest.raises(ValueError, match=r"the mmap threshold must lie in \(0, 32 MiB\]"):
        fix_mmap_threshold(0)


def test_a_cap_below_one_is_refused():
    with pytest.raises(ValueError, match="arenas must be >= 1, got 0"):
        limit_malloc_arenas(0)


def test_release_compiled_empties_the_jit_caches():
    f = jax.jit(lambda x: x * 2 + 1)
    assert int(f(jnp.int32(3))) == 7
    assert f._cache_size() == 1
    release_compiled()
    assert f._cache_size() == 0
    assert int(f(jnp.int32(4))) == 9
