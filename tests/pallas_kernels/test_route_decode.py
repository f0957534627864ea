"""The route-aware decode cache: pages against numpy, decode steps against the reference over
the full history, and the read plan against the attended set. decode_attention's backends
("jnp", the Triton kernel interpreted on CPU or compiled on a GPU) in one test class."""
from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import sys

import jax

# Before triton's first import: without a GPU its kernels can only run interpreted.
ON_GPU = jax.default_backend() == "gpu"
if not ON_GPU and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from test_kernels import TOL, assert_close  # noqa: E402

from pallas_kernels import reference_attention  # noqa: E402
from pallas_kernels.decode import (append, decode_attention, decode_read_plan,  # noqa: E402
                                   init_route_cache, pages_to_read)

step = jax.jit(decode_attention, static_argnames=("window", "sink_tokens", "max_pages",
                                                  "backend", "interpret"))
plan = jax.jit(decode_read_plan, static_argnames=("window", "sink_tokens", "max_pages"))
add = jax.jit(append)
reference = jax.jit(reference_attention, static_argnames=("window", "sink_tokens", "q_offset"))


def history(seed, batch, seq, q_heads, kv_heads, clusters, dtype=jnp.float32, dim=8):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, seq, q_heads, dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, dim)), dtype)
    ids = rng.integers(0, clusters, (batch, q_heads, seq)).astype(np.int32)  # scattered routes
    return q, k, v, ids


def attended(ids, i, window, sink):
    """Positions key i's query may read, per (batch, head): the mask of the reference."""
    j = np.arange(i + 1)
    same = ids[..., :i + 1] == ids[..., i:i + 1]
    return same | (j < sink) | (i - j < window)


def poisoned_cache(batch, max_len, kv_heads, q_heads, clusters, page, dtype=jnp.float32, dim=8):
    """An empty cache whose unwritten keys and values are NaN: a read of them shows."""
    cache = init_route_cache(batch, max_len, kv_heads, dim, q_heads, clusters, page_size=page,
                             dtype=dtype)
    return cache._replace(k=jnp.full_like(cache.k, jnp.nan), v=jnp.full_like(cache.v, jnp.nan))


@pytest.mark.parametrize("page, window, sink, prefill, q_heads, kv_heads, dtype", [
    (4, 3, 1, 0, 4, 2, "float32"),
    (8, 0, 0, 17, 2, 2, "float32"),
    (4, 16, 4, 5, 4, 2, "bfloat16"),
    (16, 2**31, 0, 9, 4, 1, "float32"),
])
def test_decode_equals_reference_token_by_token(page, window, sink, prefill, q_heads, kv_heads,
                                                dtype):
    """A prefill chunk, then one token at a time: each step's output equals row i of the dense
    reference over the whole sequence (a causal row depends on positions <= i only)."""
    batch, seq, clusters = 2, 40, 5
    q, k, v, ids = history(page + prefill, batch, seq, q_heads, kv_heads, clusters,
                           jnp.dtype(dtype))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = reference_attention(*f32, jnp.asarray(ids), jnp.asarray(ids), window=window,
                               sink_tokens=sink)
    cache = poisoned_cache(batch, seq, kv_heads, q_heads, clusters, page, jnp.dtype(dtype))
    if prefill:
        cache = add(cache, k[:, :prefill], v[:, :prefill], jnp.asarray(ids[..., :prefill]))
    for i in range(prefill, seq):
        cache = add(cache, k[:, i:i + 1], v[:, i:i + 1], jnp.asarray(ids[..., i:i + 1]))
        got = step(cache, q[:, i:i + 1], window=window, sink_tokens=sink,
                   max_pages=pages_to_read(cache))
        assert got.dtype == q.dtype
        assert_close(f"step {i}", got, want[:, i:i + 1], TOL[dtype])


def test_chunked_prefill_fills_the_same_pages():
    """Chunks of any size leave each cluster's pages listing exactly its positions, in order."""
    batch, seq, q_heads, clusters, page = 2, 60, 3, 4, 8
    _, k, v, ids = history(1, batch, seq, q_heads, 1, clusters)
    cache = init_route_cache(batch, seq, 1, 8, q_heads, clusters, page_size=page,
                             dtype=jnp.float32)
    start = 0
    for size in (7, 1, 13, 32, 7):
        cache = add(cache, k[:, start:start + size], v[:, start:start + size],
                    jnp.asarray(ids[..., start:start + size]))
        start += size
    pages, table, counts = (np.asarray(x) for x in (cache.pages, cache.table, cache.counts))
    for b, h, c in np.ndindex(batch, q_heads, clusters):
        want = np.flatnonzero(ids[b, h] == c)
        n = counts[b, h, c]
        got = pages[b, h, table[b, h, c, :-(-n // page)]].reshape(-1)[:n]
        np.testing.assert_array_equal(got, want)
    assert np.all(np.asarray(cache.next_page) <= -(-seq // page) + clusters)
    np.testing.assert_array_equal(np.asarray(cache.k), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(cache.ids), ids)


@pytest.mark.parametrize("window, sink", [(5, 2), (0, 0), (2**31, 3)])
def test_read_plan_reads_the_attended_set_only(window, sink):
    """Every position the step gathers (padding slots included) is attended; the valid ones are
    the attended set exactly, once each; the plan's length does not depend on S."""
    batch, seq, q_heads, clusters, page = 1, 48, 2, 3, 4
    q, k, v, ids = history(2, batch, seq, q_heads, 1, clusters)
    cache = init_route_cache(batch, seq, 1, 8, q_heads, clusters, page_size=page,
                             dtype=jnp.float32)
    for i in range(seq):
        cache = add(cache, k[:, i:i + 1], v[:, i:i + 1], jnp.asarray(ids[..., i:i + 1]))
        max_pages = pages_to_read(cache)
        positions, valid = (np.asarray(x) for x in plan(cache, window=window, sink_tokens=sink,
                                                        max_pages=max_pages))
        assert positions.shape[-1] == max_pages * page + min(sink, seq) + min(window, seq)
        allowed = attended(ids, i, window, sink)
        for b, h in np.ndindex(batch, q_heads):
            assert np.all(allowed[b, h, positions[b, h]]), f"step {i} reads outside its set"
            read = positions[b, h][valid[b, h]]
            assert len(read) == len(set(read.tolist()))
            np.testing.assert_array_equal(np.sort(read), np.flatnonzero(allowed[b, h]))


def test_decode_reads_nothing_else_and_builds_no_s_by_s_array():
    """Keys and values outside the attended set poisoned with NaN leave the output exact; no
    intermediate of the step is larger than the cache's own key store."""
    batch, seq, q_heads, clusters, page, window, sink = 1, 512, 4, 8, 16, 16, 1
    q, k, v, ids = history(3, batch, seq, q_heads, 2, clusters)
    cache = init_route_cache(batch, seq, 2, 8, q_heads, clusters, page_size=page,
                             dtype=jnp.float32)
    cache = add(cache, k, v, jnp.asarray(ids))
    i = seq - 1
    allowed = attended(ids, i, window, sink)
    # a key row is read by some head of its kv head's group: keep the union, poison the rest
    keep = allowed.reshape(batch, 2, q_heads // 2, seq).any(axis=2).transpose(0, 2, 1)
    poisoned = cache._replace(k=jnp.where(keep[..., None], cache.k, jnp.nan),
                              v=jnp.where(keep[..., None], cache.v, jnp.nan))
    max_pages = pages_to_read(cache)
    got = step(poisoned, q[:, i:i + 1], window=window, sink_tokens=sink, max_pages=max_pages)
    want = reference_attention(q[:, i:i + 1], k, v, jnp.asarray(ids[..., i:i + 1]),
                               jnp.asarray(ids), window=window, sink_tokens=sink, q_offset=i)
    assert_close("out", got, want, TOL["float32"])
    jaxpr = jax.make_jaxpr(lambda c, q: decode_attention(
        c, q, window=window, sink_tokens=sink, max_pages=max_pages))(cache, q[:, i:i + 1])
    largest = max(np.prod(var.aval.shape) for eqn in jaxpr.jaxpr.eqns for var in eqn.outvars)
    assert largest <= cache.k.size < seq * seq


def _cache():
    return init_route_cache(1, 8, 1, 4, 2, 3, page_size=4, dtype=jnp.float32)


@pytest.mark.parametrize("call, error, match", [
    (lambda: init_route_cache(1, 8, 2, 4, 3, 3), ValueError,
     r"q_heads \(3\) must be a multiple of kv_heads \(2\)"),
    (lambda: init_route_cache(1, 0, 1, 4, 2, 3), ValueError, "max_len must be a positive int"),
    (lambda: init_route_cache(1, 8, 1, 4, 2, 3, page_size=6), ValueError,
     "page_size must be a positive power of two"),
    (lambda: append(_cache(), jnp.ones((1, 2, 1, 4)), jnp.ones((1, 2, 1, 4)),
                    jnp.full((1, 2, 2), 3)), ValueError, r"cluster ids must lie in \[0, 3\)"),
    (lambda: append(_cache(), jnp.ones((1, 9, 1, 4)), jnp.ones((1, 9, 1, 4)),
                    jnp.zeros((1, 2, 9), jnp.int32)), ValueError,
     "the cache holds 8 tokens: 0 stored, 9 more do not fit"),
    (lambda: append(_cache(), jnp.ones((1, 2, 1, 4)), jnp.ones((1, 2, 1, 4)),
                    jnp.zeros((1, 1, 2), jnp.int32)), ValueError,
     r"ids must be \[B, Hq, T\] = \(1, 2, 2\)"),
    (lambda: append(_cache(), jnp.ones((1, 2, 2, 4)), jnp.ones((1, 2, 2, 4)),
                    jnp.zeros((1, 2, 2), jnp.int32)), ValueError,
     r"k and v must be \[B, T, Hkv, D\]"),
    (lambda: pages_to_read(_cache()), ValueError, "the cache is empty"),
    (lambda: decode_attention(_cache(), jnp.ones((1, 2, 2, 4)), window=1, sink_tokens=0,
                              max_pages=1), ValueError, r"q must be \[B, 1, Hq, D\]"),
    (lambda: decode_attention(_cache(), jnp.ones((1, 1, 2, 4)), window=-1, sink_tokens=0,
                              max_pages=1), ValueError, "window must be >= 0"),
    (lambda: decode_attention(_cache(), jnp.ones((1, 1, 2, 4)), window=1, sink_tokens=0,
                              max_pages=0), ValueError, "max_pages must be a positive"),
])
def test_bad_arguments_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------- backends

BACKENDS = {"jnp": ("jnp", False), "triton_interpreter": ("triton", True),
            "triton": ("triton", False)}  # name -> (backend, interpret)


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    """(backend, interpret) of decode_attention; each host runs the Triton kernel one way:
    triton fixes interpreted vs compiled at its first import."""
    from pallas_kernels.triton_backend import unavailable
    name, interpret = BACKENDS[request.param]
    if name == "triton":
        if interpret and ON_GPU:
            pytest.skip("the interpreter runs on hosts without a GPU (a GPU host imports "
                        "triton compiled, and it cannot interpret in the same process)")
        if not interpret and not ON_GPU:
            pytest.skip(f"the compiled kernel needs a GPU (jax's default backend is "
                        f"{jax.default_backend()!r})")
        reason = unavailable(interpret)
        if reason:
            pytest.skip(reason)
    return name, interpret


# (batch, stored, max_len, q_heads, kv_heads, dim, clusters, page, window, sink, dtype, routes,
#  max_pages): GQA 1-4; head dims 8-32 (24 padded to 32 in the kernel); pages read exactly,
# bucketed (empty pages past the cluster) or the whole table; window 0 and sink 0; a window
# longer than the cache; a cluster of whole pages ("cyclic": 40 tokens over 5 clusters, 8 each).
CASES = [
    (2, 37, 48, 4, 2, 24, 3, 4, 3, 1, "float32", "random", "exact"),
    (2, 30, 32, 4, 1, 16, 4, 8, 0, 0, "bfloat16", "random", "bucket"),
    (1, 20, 24, 2, 2, 8, 2, 4, 64, 3, "float32", "random", "table"),
    (2, 40, 40, 4, 2, 16, 5, 4, 5, 0, "float32", "cyclic", "table"),
    (1, 50, 64, 8, 2, 32, 6, 8, 2**31, 2, "bfloat16", "random", "bucket"),
]


@functools.cache
def _filled(case, seed):
    """q of the last stored token, its cache (unwritten keys NaN), and the reference's row
    (shared by the backends: one cache per case)."""
    batch, stored, max_len, hq, hkv, dim, clusters, page, window, sink, dtype, routes = case
    dtype = jnp.dtype(dtype)
    q, k, v, ids = history(seed, batch, stored, hq, hkv, clusters, dtype, dim)
    if routes == "cyclic":
        ids = np.broadcast_to((np.arange(stored) + np.arange(hq)[:, None]) % clusters,
                              ids.shape).astype(np.int32)
    cache = poisoned_cache(batch, max_len, hkv, hq, clusters, page, dtype, dim)
    cache = add(cache, k, v, jnp.asarray(ids))  # the token to decode is the last stored
    f32 = [x.astype(jnp.float32) for x in (q[:, -1:], k, v)]
    want = reference(*f32, jnp.asarray(ids[..., -1:]), jnp.asarray(ids), window=window,
                     sink_tokens=sink, q_offset=stored - 1)
    assert np.abs(np.asarray(want)).max() > 0.1  # a real comparison, not zeros
    return q[:, -1:], cache, want


def _max_pages(cache, how):
    return {"exact": lambda: pages_to_read(cache, bucket=False),
            "bucket": lambda: 2 * pages_to_read(cache),
            "table": lambda: cache.table.shape[-1]}[how]()


class TestDecodeBackends:

    @pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
    def test_step_matches_reference(self, backend, case):
        """One decode step after a prefill chunk against the masked dense reference (float32
        copies of the whole history at q_offset = the token's position)."""
        q, cache, want = _filled(case[:12], seed=sum(case[:10]) % 1000)
        name, interpret = backend
        window, sink, dtype, how = case[8], case[9], case[10], case[12]
        got = step(cache, q, window=window, sink_tokens=sink,
                   max_pages=_max_pages(cache, how), backend=name, interpret=interpret)
        assert got.dtype == q.dtype
        assert_close("out", got, want, TOL[dtype])

    @pytest.mark.parametrize("splits, block_r, prefix", [(40, 16, 48), (3, 16, 0), (2, 4, 48)])
    def test_splits_and_skipped_pages(self, backend, splits, block_r, prefix):
        """More splits than used slots (the empty ones, outputs poisoned with NaN by the
        interpreter's launch, weigh nothing); the whole plan walked (prefix 0: the padding
        slots masked instead of skipped); several chunks per split."""
        name, interpret = backend
        if name != "triton":
            pytest.skip("splits are the Triton kernel's")
        from pallas_kernels.triton_decode import decode_attention_triton
        case = CASES[0]  # its cache, shared with test_step_matches_reference
        q, cache, want = _filled(case[:12], seed=sum(case[:10]) % 1000)
        positions, valid = plan(cache, window=3, sink_tokens=1, max_pages=12)
        assert positions.shape[-1] == 52  # 12 pages of 4, sink 1, window 3
        used = jnp.sum(valid[..., :prefix], axis=-1, dtype=jnp.int32)
        assert 0 < int(used.max()) < prefix or prefix == 0
        got = decode_attention_triton(q, cache.k, cache.v, jnp.where(valid, positions, -1),
                                      scale=24 ** -0.5, prefix=prefix, used=used,
                                      interpret=interpret, splits=splits, block_r=block_r)
        assert_close("out", got, want, TOL["float32"])


def test_jnp_step_keeps_the_cache_dtype():
    """The jnp path gathers bf16 rows and accumulates in float32: no float32 array of the
    gathered size [B, Hq, R, D] exists in the step."""
    case = CASES[-1]
    q, cache, _ = _filled(case[:12], seed=sum(case[:10]) % 1000)
    max_pages = pages_to_read(cache)
    jaxpr = jax.make_jaxpr(lambda c, q: decode_attention(
        c, q, window=16, sink_tokens=2, max_pages=max_pages, backend="jnp"))(cache, q)
    gathered = 8 * (max_pages * 8 + 2 + 16) * 32
    sizes = [(np.prod(v.aval.shape), v.aval.dtype) for e in jaxpr.jaxpr.eqns for v in e.outvars]
    assert (gathered, jnp.bfloat16) in sizes
    assert not [s for s, dtype in sizes if s >= gathered and dtype == jnp.float32]


def test_backend_errors_name_the_problem():
    """Raised before the cache is read."""
    cache, q = _cache(), jnp.ones((1, 1, 2, 4))
    kw = dict(window=1, sink_tokens=0, max_pages=1)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'jnp', 'triton'\)"):
        decode_attention(cache, q, **kw, backend="pallas")
    if not ON_GPU:
        with pytest.raises(RuntimeError, match=r"^decode_attention: .*(GPU|TRITON_INTERPRET)"):
            decode_attention(cache, q, **kw, backend="triton")


# Builds the decode kernel for a GPU target without a GPU (triton ships ptxas) in a process
# that imports triton compiled; prints its shared memory.
_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pallas_kernels.triton_decode import choose_splits, decode_launch

slots = 32 * 64 + 1 + 128  # Llama-3-8B decode: 32 pages of 64, sink 1, window 128
launch = decode_launch((1, 32, 128), (1, 32768, 8, 128), slots, scale=128 ** -0.5,
                       splits=choose_splits(32, slots), block_r=64, prefix=32 * 64)
dtypes = ["*bf16"] * 3 + ["*i32", "*i32", "*fp32", "*fp32"]
sig = dict(zip(launch.kernel.arg_names, dtypes)) | {m: "constexpr" for m in launch.meta}
src = ASTSource(launch.kernel, sig, constexprs=dict(launch.meta),
                attrs={(i,): [["tt.divisibility", 16]] for i in range(len(dtypes))})
kernel = triton.compile(src, target=GPUTarget("cuda", int(sys.argv[1]), 32),
                        options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
assert kernel.asm["cubin"]
print(kernel.metadata.shared)
"""


@pytest.mark.parametrize("cc", [90])
def test_decode_kernel_compiles_for_nvidia_gpus(cc):
    """The Llama-shaped bf16 decode kernel builds to cubin for Hopper (H100, H200): the
    interpreter runs the Python, not the compiler."""
    import subprocess
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _COMPILE, str(cc)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 0 <= int(proc.stdout.split()[-1]) <= 48 * 1024
