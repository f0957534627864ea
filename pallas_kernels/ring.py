"""Ring attention over a 1-D device mesh axis, with the transfers that routes make useless left
out.

The sequence is split in N contiguous chunks, chunk r on device r of `axis`. The allowed pairs
(masking.allowed_pairs) split into two disjoint sets:

  local: j <= i and (j < sink_tokens or i - j < window)            whatever the clusters
  route: j <= i and q_cluster[i] == k_cluster[j] and not local

The local set needs no ring: device r reads its own chunk (full allowed mask), the last
window - 1 keys of chunk r - 1 (one ppermute of a halo) and the sink keys (an all_gather of
sink_tokens rows). The route set across chunks is what the ring carries: at step t device r
needs key chunk r - t. Both sets run through one online softmax (running max, sum and output
in float32), so the result is the masked softmax over all allowed pairs, exactly.

Two schedules:

- plan=None, the plain ring: N - 1 steps, each a ppermute of (k, v, k_clusters) by one device
  around the ring; every device computes every block (blocks above the diagonal are fully
  masked by causality: the usual ring's idle half).
- plan=[N, N] bool (query chunk a, key chunk b), host-side, from `pruning_plan`: at step t the
  chunk goes straight from device b to device b + t (a ppermute with shift t), and only for the
  pairs (b, b + t) the plan keeps. A ppermute is one collective with a static list of
  (source, target) pairs: the pairs left out of the list are not sent at all (their targets
  receive zeros), and a step with no pair left is no collective at all. The compute of a pruned
  block is skipped with lax.cond on the device's own entry. Causality alone keeps only
  b < a: N (N - 1) / 2 of the N (N - 1) transfers; the routes prune further.

What is saved, honestly: whole (device, device) chunk transfers and their blocks, union over
batch and heads. A pair is kept as soon as one head of one sequence has one route pair across
it; the per-head table of `pruning_plan` says what a transfer of only the needed kv heads could
save (not done here: it would be one collective per head). Every device still waits for the
slowest step, so the time saved is that of steps no device needs and of the bytes not sent;
a block is computed densely in XLA (scores of one chunk pair at a time), not by a flash kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels.masking import allowed_pairs, safe_max


class RingError(ValueError):
    """The arguments cannot run as ring attention over this mesh axis."""


# ----------------------------------------------------------------------------- host-side plan

def _chunk_of(positions, chunk):
    return positions // chunk


def route_pair_counts(q_clusters, k_clusters, num_chunks: int, *, window: int,
                      sink_tokens: int) -> np.ndarray:
    """int64 [B, H, N, N]: per (sequence, query head, query chunk a, key chunk b) the number of
    route pairs (j <= i, same cluster, j >= sink_tokens, i - j >= window) with i in chunk a and
    j in chunk b < a; zero on and above the diagonal. Numpy, host-side: O(S (window + sink) +
    N^2 U) per row with U distinct ids, never S x S."""
    qc, kc = np.asarray(q_clusters), np.asarray(k_clusters)
    if qc.shape != kc.shape or qc.ndim != 3:
        raise RingError(f"q_clusters {qc.shape} and k_clusters {kc.shape} must both be [B, H, S]")
    batch, heads, seq = qc.shape
    chunk = _check_chunks(seq, num_chunks)
    counts = np.zeros((batch, heads, num_chunks, num_chunks), np.int64)
    pos = np.arange(seq)
    below = np.tril(np.ones((num_chunks, num_chunks), bool), -1)
    for b in range(batch):
        for h in range(heads):
            ids, inverse = np.unique(np.concatenate([qc[b, h], kc[b, h]]), return_inverse=True)
            per_q = np.zeros((num_chunks, ids.size), np.int64)
            per_k = np.zeros((num_chunks, ids.size), np.int64)
            np.add.at(per_q, (pos // chunk, inverse[:seq]), 1)
            np.add.at(per_k, (pos // chunk, inverse[seq:]), 1)
            counts[b, h] = np.where(below, per_q @ per_k.T, 0)   # every same-cluster pair
    return counts - _local_same_pairs(qc, kc, chunk, num_chunks, window, sink_tokens)


def _local_same_pairs(qc, kc, chunk, num_chunks, window, sink_tokens):
    """[B, H, N, N]: same-cluster local pairs (sink or window) across chunks (b < a)."""
    batch, heads, seq = qc.shape
    rows = np.arange(batch * heads)[:, None]
    flat_q, flat_k = qc.reshape(-1, seq), kc.reshape(-1, seq)
    out = np.zeros(batch * heads * num_chunks * num_chunks, np.int64)

    def add(i, j):                          # pairs (i, j) of every row, counted where they hit
        hit = (flat_q[:, i] == flat_k[:, j]) & (j // chunk < i // chunk)
        cell = (rows * num_chunks + i // chunk) * num_chunks + j // chunk
        out[:] += np.bincount(cell[hit], minlength=out.size)

    for d in range(1, min(window, seq)):              # the band i - j = d < window
        i = np.arange(d, seq)
        add(i, i - d)
    for j in range(min(sink_tokens, seq)):             # sink keys outside the band
        i = np.arange(j + max(window, 1), seq)
        add(i, np.full(i.size, j))
    return out.reshape(batch, heads, num_chunks, num_chunks)


def pruning_plan(q_clusters, k_clusters, num_chunks: int, *, window: int, sink_tokens: int,
                 per_head: bool = False) -> np.ndarray:
    """bool [N, N] (or [H, N, N] with per_head): query chunk a needs key chunk b's transfer.
    The exact criterion: some route pair (see route_pair_counts) lies across the pair, in some
    sequence of the batch; the diagonal is True (the own chunk, never transferred)."""
    needed = route_pair_counts(q_clusters, k_clusters, num_chunks, window=window,
                               sink_tokens=sink_tokens).sum(axis=0) > 0      # [H, N, N]
    needed |= np.eye(num_chunks, dtype=bool)
    return needed if per_head else needed.any(axis=0)


def causal_plan(num_chunks: int) -> np.ndarray:
    """bool [N, N]: every pair causality allows (b <= a): the ring without route pruning."""
    return np.tril(np.ones((num_chunks, num_chunks), bool))


# ----------------------------------------------------------------------------- checks

def _check_chunks(seq, num_chunks):
    if num_chunks < 1 or seq % num_chunks:
        raise RingError(f"the sequence length {seq} must split into {num_chunks} equal chunks")
    return seq // num_chunks


def _check_args(mesh, axis, q, k, v, q_clusters, k_clusters, window, sink_tokens, plan):
    if axis not in mesh.shape:
        raise RingError(f"mesh has no axis {axis!r} (axes: {tuple(mesh.shape)})")
    n = mesh.shape[axis]
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise RingError(f"q {q.shape}, k {k.shape}, v {v.shape} must be [B, S, heads, D] with "
                        "k and v alike")
    batch, seq, hq, _ = q.shape
    if k.shape[:2] != (batch, seq) or hq % k.shape[2]:
        raise RingError(f"k {k.shape} must share q's batch and length {q.shape[:2]}, and its "
                        f"kv heads must divide the {hq} query heads")
    for name, ids in (("q_clusters", q_clusters), ("k_clusters", k_clusters)):
        if tuple(ids.shape) != (batch, hq, seq) or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise RingError(f"{name} must be integer [B, Hq, S] = {(batch, hq, seq)}, got "
                            f"{ids.dtype} {tuple(ids.shape)}")
    chunk = _check_chunks(seq, n)
    if window < 0 or sink_tokens < 0:
        raise RingError(f"window={window} and sink_tokens={sink_tokens} must be >= 0")
    if n > 1 and (window - 1 > chunk or sink_tokens > chunk):
        raise RingError(f"window - 1 ({window - 1}) and sink_tokens ({sink_tokens}) must not "
                        f"exceed the chunk length {chunk} (S={seq} over {n} devices)")
    if plan is None:
        return n, chunk, None
    if isinstance(plan, jax.core.Tracer):
        raise RingError("plan must be a concrete host array (it decides the collectives)")
    plan = np.asarray(plan)
    if plan.dtype != bool or plan.shape[-2:] != (n, n):
        raise RingError(f"plan must be bool [..., {n}, {n}], got {plan.dtype} {plan.shape}")
    return n, chunk, plan.reshape(-1, n, n).any(axis=0)


# ----------------------------------------------------------------------------- the ring

def _attend(acc, q, k, v, mask, scale):
    """One online-softmax step: acc (m, l, o) over keys k, v with mask [B, G, R, Cq, Ck]."""
    m, l, o = acc
    hi = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = jnp.einsum("bqgrd,bkgd->bgrqk", q, k, precision=hi,
                   preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, -jnp.inf)
    # The result does not depend on the running max: no gradient through it (as the reference).
    m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
    shift = safe_max(m_new)
    p = jnp.exp(s - shift[..., None])
    corr = jnp.exp(m - shift)                         # 0 while m is still -inf
    l = l * corr + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bgrqk,bkgd->bgrqd", p.astype(v.dtype), v, precision=hi,
                    preferred_element_type=jnp.float32)
    return m_new, l, o * corr[..., None] + pv


def _grouped(ids, groups):
    """[B, Hq, C] -> [B, G, R, C] (query head h = g R + r reads kv head g)."""
    b, hq, c = ids.shape
    return ids.reshape(b, groups, hq // groups, c)


def _local_pass(q, k, v, qc, kc, *, axis, n, chunk, window, sink, scale):
    """Accumulators after the local set: own chunk, halo of chunk r - 1, sink keys."""
    r = jax.lax.axis_index(axis)
    start = r * chunk
    q_pos = start + jnp.arange(chunk)
    groups = k.shape[2]
    qg = _grouped(qc, groups)
    keys, values, ids = [k], [v], [kc]
    masks = [allowed_pairs(q_pos[:, None], q_pos[None, :], qg[..., :, None],
                           _grouped(kc, groups)[..., None, :], window=window,
                           sink_tokens=sink)]
    halo = min(max(window - 1, 0), chunk) if n > 1 else 0
    if halo:
        pairs = [(i, i + 1) for i in range(n - 1)]
        hk, hv, hc = jax.lax.ppermute((k[:, -halo:], v[:, -halo:], kc[..., -halo:]), axis, pairs)
        pos = start - halo + jnp.arange(halo)
        near = (pos >= 0) & ((q_pos[:, None] - pos < window) | (pos < sink))
        keys, values, ids = keys + [hk], values + [hv], ids + [hc]
        masks.append(jnp.broadcast_to(near, qg.shape + (halo,)))
    if sink and n > 1:
        sk, sv, sc = (jax.lax.all_gather(x, axis)[0]
                      for x in (k[:, :sink], v[:, :sink], kc[..., :sink]))
        pos = jnp.arange(sink)
        fresh = (pos < start - halo)[None, :] & (pos[None, :] <= q_pos[:, None])
        keys, values, ids = keys + [sk], values + [sv], ids + [sc]
        masks.append(jnp.broadcast_to(fresh, qg.shape + (sink,)))
    qs = q.reshape(q.shape[0], chunk, groups, -1, q.shape[-1])
    shape = qg.shape
    acc = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
           jnp.zeros(shape + (q.shape[-1],), jnp.float32))
    return _attend(acc, qs, jnp.concatenate(keys, 1), jnp.concatenate(values, 1),
                   jnp.concatenate(masks, -1), scale), qs, qg


def _route_mask(q_pos, k_pos, qg, kc_g, window, sink):
    """Route pairs only (same cluster, causal, outside sink and window)."""
    same = allowed_pairs(q_pos[:, None], k_pos[None, :], qg[..., :, None], kc_g[..., None, :],
                         window=0, sink_tokens=0)
    local = (k_pos[None, :] < sink) | (q_pos[:, None] - k_pos[None, :] < window)
    return same & ~local


def _ring_body(q, k, v, qc, kc, *, axis, n, chunk, window, sink, scale, plan, return_lse):
    r = jax.lax.axis_index(axis)
    q_pos = r * chunk + jnp.arange(chunk)
    groups = k.shape[2]
    acc, qs, qg = _local_pass(q, k, v, qc, kc, axis=axis, n=n, chunk=chunk, window=window,
                              sink=sink, scale=scale)

    def step(acc, kb, vb, cb, src):
        k_pos = src * chunk + jnp.arange(chunk)
        mask = _route_mask(q_pos, k_pos, qg, _grouped(cb, groups), window, sink)
        return _attend(acc, qs, kb, vb, mask, scale)

    if plan is None:                                  # the plain ring: pass on, compute all
        kb, vb, cb = k, v, kc
        ring = [(i, (i + 1) % n) for i in range(n)]
        for t in range(1, n):
            kb, vb, cb = jax.lax.ppermute((kb, vb, cb), axis, ring)
            acc = step(acc, kb, vb, cb, (r - t) % n)
    else:                                             # direct shifts, pruned pairs left out
        for t in range(1, n):
            pairs = [(b, b + t) for b in range(n - t) if plan[b + t, b]]
            if not pairs:
                continue                              # no device needs this step
            kb, vb, cb = jax.lax.ppermute((k, v, kc), axis, pairs)
            need = jnp.asarray([a >= t and bool(plan[a, a - t]) for a in range(n)])[r]
            acc = jax.lax.cond(need, lambda acc, kb, vb, cb, t=t: step(acc, kb, vb, cb, r - t),
                               lambda acc, *_: acc, acc, kb, vb, cb)
    m, l, o = acc
    has = l > 0
    o = o / jnp.where(has, l, 1.0)[..., None]                    # [B, G, R, C, D]
    out = jnp.moveaxis(o, 3, 1).reshape(q.shape).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(has, safe_max(m) + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)
    return out, lse.reshape(qc.shape)


def ring_attention(q, k, v, q_clusters, k_clusters, *, mesh: Mesh, axis: str = "seq",
                   window: int, sink_tokens: int, plan=None, scale=None,
                   return_lse: bool = False):
    """Masked attention of q [B, S, Hq, D] over k, v [B, S, Hkv, D] with cluster ids
    q_clusters, k_clusters [B, Hq, S] (query head h reads kv head h // (Hq // Hkv)), the
    sequence split over mesh axis `axis` in contiguous chunks. Equal to
    reference.dense_attention on the same arguments (q_offset 0).

    plan: None for the plain ring, or a host bool [..., N, N] table (pruning_plan; leading axes
    are OR-ed) of the (query chunk, key chunk) pairs to transfer and compute. A pair the plan
    drops must hold no route pair, or its pairs are lost (that is the approximation a threshold
    plan makes on purpose). Returns out [B, S, Hq, D] in q's dtype and, with return_lse, the
    natural-log LSE [B, Hq, S] float32.
    """
    n, chunk, plan = _check_args(mesh, axis, q, k, v, q_clusters, k_clusters, window,
                                 sink_tokens, plan)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    body = functools.partial(_ring_body, axis=axis, n=n, chunk=chunk, window=window,
                             sink=sink_tokens, scale=scale, plan=plan, return_lse=return_lse)
    act, ids = PartitionSpec(None, axis, None, None), PartitionSpec(None, None, axis)
    out_specs = (act, ids) if return_lse else act
    return jax.shard_map(body, mesh=mesh, in_specs=(act, act, act, ids, ids),
                         out_specs=out_specs, check_vma=False)(
        q, k, v, q_clusters.astype(jnp.int32), k_clusters.astype(jnp.int32))
