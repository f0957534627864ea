"""Route-aware decode cache: a new token reads its cluster's pages, the window and the sink only.

Keys and values stay once, in position order ([B, S_max, Hkv, D], as any KV cache). Per
(batch, query head, cluster) a block table lists pages of key positions (as paged attention
keeps one block table per sequence); pages come from one pool per (batch, head), so a cluster
wastes at most one partial page. A decode step at position i with cluster c reads

  tree   the positions in c's pages (every j <= i with c_j == c, the token itself included)
  local  the sink 0 .. sink-1 and the window i-window+1 .. i, those of other clusters

which are disjoint, so one softmax over the gathered rows is the exact masked attention. The
read plan holds max_pages * page_size + sink + window positions per (batch, head): work and
memory traffic grow with the tokens attended (the largest cluster read, bucketed to whole
pages), not with S, and no array is S x S. Slots without a key (past a cluster's count, before
position 0, same-cluster window keys) point at position i, so nothing outside the attended set
is ever read, and are masked.

append() writes a chunk of tokens (one token while decoding, a prefill chunk otherwise) in
O(T log T) scatters. decode_attention runs the plan through XLA gathers (backend "jnp", GPU or
TPU alike) or a split-K Triton kernel that reads the plan's rows in place (triton_decode.py).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import cdiv
from pallas_kernels.masking import safe_max
from pallas_kernels.schedule import _run_starts
from pallas_kernels.validation import _nonnegative_int, check_block_size


class RouteCache(NamedTuple):
    k: jax.Array           # [B, S_max, Hkv, D] keys in position order
    v: jax.Array           # [B, S_max, Hkv, D]
    ids: jax.Array         # [B, Hq, S_max] int32 cluster of each stored key (per query head)
    length: jax.Array      # int32 scalar: tokens stored (positions 0 .. length - 1)
    pages: jax.Array       # [B, Hq, num_pages, page] int32 key positions
    table: jax.Array       # [B, Hq, clusters, S_max / page] int32 page ids per cluster
    counts: jax.Array      # [B, Hq, clusters] int32 tokens per cluster
    next_page: jax.Array   # [B, Hq] int32 first free page of the pool

    @property
    def page_size(self):
        return self.pages.shape[-1]


def init_route_cache(batch: int, max_len: int, kv_heads: int, head_dim: int, q_heads: int,
                     num_clusters: int, *, page_size: int = 64, dtype=jnp.bfloat16):
    """An empty cache for max_len tokens and cluster ids 0 .. num_clusters - 1."""
    page_size = check_block_size("page_size", page_size)
    for name, value in (("max_len", max_len), ("num_clusters", num_clusters),
                        ("q_heads", q_heads), ("kv_heads", kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    table_len = cdiv(max_len, page_size)
    lead = (batch, q_heads)
    return RouteCache(
        k=jnp.zeros((batch, max_len, kv_heads, head_dim), dtype),
        v=jnp.zeros((batch, max_len, kv_heads, head_dim), dtype),
        ids=jnp.full((*lead, max_len), -1, jnp.int32),
        length=jnp.zeros((), jnp.int32),
        pages=jnp.zeros((*lead, table_len + num_clusters, page_size), jnp.int32),
        table=jnp.zeros((*lead, num_clusters, table_len), jnp.int32),
        counts=jnp.zeros((*lead, num_clusters), jnp.int32),
        next_page=jnp.zeros(lead, jnp.int32))


def _append_pages(pages, table, counts, next_page, ids, start):
    """One (batch, head): positions start .. start + T - 1 with clusters ids [T] into the pages."""
    page = pages.shape[-1]
    t = jnp.arange(ids.shape[0], dtype=jnp.int32)
    order = jnp.argsort(ids, stable=True)
    rank = jnp.zeros_like(t).at[order].set(t - _run_starts(ids[order]))  # rank in its cluster
    slot = counts[ids] + rank
    opens = slot % page == 0                                  # the token starts a new page
    opened_before = jnp.cumsum(opens[order]) - opens[order]   # pages opened earlier, by cluster
    fresh = next_page + jnp.zeros_like(t).at[order].set(opened_before)
    drop = table.shape[-1]                                    # out of bounds: not written
    table = table.at[ids, jnp.where(opens, slot // page, drop)].set(fresh, mode="drop")
    phys = table[ids, slot // page]
    pages = pages.at[phys, slot % page].set(start + t)
    counts = counts.at[ids].add(1)
    return pages, table, counts, next_page + jnp.sum(opens, dtype=jnp.int32)


def _check_concrete_ids(ids, num_clusters):
    if isinstance(ids, jax.core.Tracer):
        return  # inside jit the caller guarantees the range
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= num_clusters):
        raise ValueError(f"cluster ids must lie in [0, {num_clusters}), got "
                         f"[{ids.min()}, {ids.max()}]")


def append(cache: RouteCache, k, v, ids) -> RouteCache:
    """The cache with T more tokens: k, v [B, T, Hkv, D], ids [B, Hq, T] in [0, clusters)."""
    batch, max_len, kv_heads, head_dim = cache.k.shape
    steps = k.shape[1]
    if k.shape != (batch, steps, kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k and v must be [B, T, Hkv, D] = [{batch}, T, {kv_heads}, "
                         f"{head_dim}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if tuple(ids.shape) != (batch, cache.ids.shape[1], steps):
        raise ValueError(f"ids must be [B, Hq, T] = {(batch, cache.ids.shape[1], steps)}, got "
                         f"{tuple(ids.shape)}")
    if not isinstance(cache.length, jax.core.Tracer) and int(cache.length) + steps > max_len:
        raise ValueError(f"the cache holds {max_len} tokens: {int(cache.length)} stored, "
                         f"{steps} more do not fit")
    _check_concrete_ids(ids, cache.counts.shape[-1])
    ids = ids.astype(jnp.int32)
    start = cache.length
    write = jax.vmap(jax.vmap(_append_pages, in_axes=(0, 0, 0, 0, 0, None)),
                     in_axes=(0, 0, 0, 0, 0, None))
    pages, table, counts, next_page = write(cache.pages, cache.table, cache.counts,
                                            cache.next_page, ids, start)
    zero = jnp.zeros((), jnp.int32)
    return RouteCache(
        k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (zero, start, zero, zero)),
        v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (zero, start, zero, zero)),
        ids=jax.lax.dynamic_update_slice(cache.ids, ids, (zero, zero, start)),
        length=start + steps, pages=pages, table=table, counts=counts, next_page=next_page)


def pages_to_read(cache: RouteCache, bucket: bool = True) -> int:
    """Host-side max_pages for the next decode step (the last token's cluster, over batch and
    heads), rounded up to a power of two with bucket (fewer recompilations)."""
    last = int(cache.length) - 1
    if last < 0:
        raise ValueError("the cache is empty: append the token to decode first")
    own = np.asarray(cache.ids[..., last])
    n = np.take_along_axis(np.asarray(cache.counts), own[..., None], axis=-1).max()
    pages = cdiv(int(n), cache.page_size)
    return 1 << (pages - 1).bit_length() if bucket else pages


def decode_read_plan(cache: RouteCache, *, window: int, sink_tokens: int, max_pages: int):
    """(positions, valid) [B, Hq, max_pages * page + sink + window] int32 / bool: the key
    positions the step of the last stored token reads (invalid slots point at that token)."""
    max_len = cache.k.shape[1]
    window = min(_nonnegative_int("window", window), max_len)
    sink = min(_nonnegative_int("sink_tokens", sink_tokens), max_len)
    i = cache.length - 1

    def one(pages, table, counts, ids):
        own = ids[i]
        n = counts[own]
        pos = pages[table[own, :max_pages]].reshape(-1)        # the cluster's pages, in order
        tree_ok = jnp.arange(pos.shape[0]) < n
        sink_pos = jnp.arange(sink, dtype=jnp.int32)
        win_pos = i - window + 1 + jnp.arange(window, dtype=jnp.int32)
        local = jnp.concatenate([sink_pos, win_pos])
        in_range = jnp.concatenate([sink_pos <= i, (win_pos >= sink) & (win_pos >= 0)])
        local_ok = in_range & (ids[jnp.clip(local, 0, max_len - 1)] != own)
        valid = jnp.concatenate([tree_ok, local_ok])
        return jnp.where(valid, jnp.concatenate([pos, local]), i), valid

    return jax.vmap(jax.vmap(one))(cache.pages, cache.table, cache.counts, cache.ids)


DECODE_BACKENDS = ("auto", "jnp", "triton")


@functools.cache
def _auto_backend() -> str:
    """backend="auto": the Triton kernel where it compiles (a GPU with triton and jax_triton),
    else the jnp gathers. Decided once per process; on other hosts triton is never imported
    (so that a later interpreted run can still set TRITON_INTERPRET first)."""
    if jax.default_backend() != "gpu":
        return "jnp"
    from pallas_kernels.triton_backend import unavailable
    return "jnp" if unavailable(False) else "triton"


def resolve_decode_backend(backend: str, interpret: bool = False) -> str:
    """"jnp" or "triton" for a backend argument; "triton" that cannot run here says why."""
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")
    if backend == "jnp":
        return backend
    from pallas_kernels.triton_backend import unavailable
    if backend == "auto":
        if not interpret:
            return _auto_backend()
        return "jnp" if unavailable(True) else "triton"
    why = unavailable(interpret)
    if why:
        raise RuntimeError(f"decode_attention: {why}")
    return backend


def decode_attention(cache: RouteCache, q, *, window: int, sink_tokens: int, max_pages: int,
                     scale=None, backend: str = "auto", interpret: bool = False):
    """Attention of the last stored token, q [B, 1, Hq, D], over its allowed keys (the mask of
    block_sparse_attention at q_offset = length - 1). Returns [B, 1, Hq, D] in q's dtype.

    backend "jnp" gathers the plan's keys and values ([B, Hq, R, D], the cache's dtype);
    "triton" reads them in place (triton_decode.py; interpret=True runs it in triton's
    interpreter on CPU); "auto" takes "triton" where it compiles (a GPU with jax_triton), "jnp"
    elsewhere, and the interpreter when interpret=True."""
    batch, _, q_heads, head_dim = q.shape
    kv_heads = cache.k.shape[2]
    want = (cache.k.shape[0], 1, cache.ids.shape[1], cache.k.shape[3])
    if tuple(q.shape) != want:
        raise ValueError(f"q must be [B, 1, Hq, D] = {want}, got {tuple(q.shape)}")
    max_pages = check_block_size("max_pages", max_pages, power_of_two=False)
    max_pages = min(max_pages, cache.table.shape[-1])
    scale = head_dim ** -0.5 if scale is None else float(scale)
    backend = resolve_decode_backend(backend, interpret)
    positions, valid = decode_read_plan(cache, window=window, sink_tokens=sink_tokens,
                                        max_pages=max_pages)
    if backend == "triton":
        from pallas_kernels.triton_decode import decode_attention_triton
        prefix = max_pages * cache.page_size  # the cluster's pages: keys up to its count
        used = jnp.sum(valid[..., :prefix], axis=-1, dtype=jnp.int32)
        return decode_attention_triton(q, cache.k, cache.v, jnp.where(valid, positions, -1),
                                       scale=scale, prefix=prefix, used=used,
                                       interpret=interpret)
    b = jnp.arange(batch)[:, None, None]
    h = (jnp.arange(q_heads) // (q_heads // kv_heads))[None, :, None]
    # Gathered in the cache's dtype and multiplied with float32 accumulation: no float32 copy
    # of the [B, Hq, R, D] rows (q is read in that dtype too).
    keys = cache.k[b, positions, h]                            # [B, Hq, R, D]
    values = cache.v[b, positions, h]
    f32 = dict(preferred_element_type=jnp.float32, precision=(
        jax.lax.Precision.HIGHEST if keys.dtype == jnp.float32 else None))  # no TF32
    s = jnp.einsum("bhd,bhrd->bhr", q[:, 0].astype(keys.dtype), keys, **f32) * scale
    s = jnp.where(valid, s, -jnp.inf)
    p = jnp.exp(s - safe_max(jnp.max(s, axis=-1, keepdims=True))).astype(values.dtype)
    out = jnp.einsum("bhr,bhrd->bhd", p, values, **f32)
    out = out / jnp.sum(p.astype(jnp.float32), axis=-1, keepdims=True)  # the rounded p's sum
    return out[:, None].astype(q.dtype)
