"""The route-aware decode cache: pages against numpy, decode steps against the reference over
the full history, and the read plan against the attended set."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference_attention
from pallas_kernels.decode import (append, decode_attention, decode_read_plan, init_route_cache,
                                   pages_to_read)
from test_kernels import TOL, assert_close

step = jax.jit(decode_attention, static_argnames=("window", "sink_tokens", "max_pages"))
plan = jax.jit(decode_read_plan, static_argnames=("window", "sink_tokens", "max_pages"))
add = jax.jit(append)


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
