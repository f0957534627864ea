"""Condensed far history: attention over the sink, the exact window and per-cluster summaries.

For query i the keys split in three: the sink (j < sink_tokens) and the window (i - j < window)
stay exact; the far history, far(i) = {j : sink_tokens <= j <= i - window}, is replaced by one
summary slot per route cluster (the hard route ids at the cut level, as in the surgical mask):

  key   the medoid: the member key closest (Euclidean) to the members' mean key, or with
        medoid="recent" the newest member's key. A real key keeps a valid RoPE rotation,
        which a mean of rotated keys does not;
  value the members' values averaged with weights gamma ** (n - j), n the newest member
        (temporal decay; the normalised weights equal gamma ** (i - j) normalised);

and only `capacity` slots are kept per query: the clusters with the most far members
(keep="largest", ties to the newest member) or with the newest members (keep="recent"). A query
reads every kept slot (own_cluster=False) or only its own cluster's slot (own_cluster=True).

Grouped-query attention: the key j of kv head g is shared by the query heads of group g, and
each query head groups those shared keys by its own route ids, so summaries are per query head.
The summaries of query i depend on i (the far set grows by one key per query), so they are
virtual keys per query: `condensed_attention` is a mask over the real keys plus C extra keys
per query.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KEEP = ("largest", "recent")
MEDOIDS = ("closest", "recent")
TIE = 1e-5          # relative tolerance of a tie between medoid candidates


def check_options(*, window, sink_tokens, capacity, gamma, keep, medoid, num_clusters,
                  max_capacity):
    """Raises ValueError naming the first bad option (traced window / capacity: unchecked)."""
    if isinstance(window, int) and window < 1:
        raise ValueError(f"window must be >= 1 (the query's own key stays exact), got {window}")
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
    if isinstance(capacity, int) and capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    if max_capacity < 0:
        raise ValueError(f"max_capacity must be >= 0, got {max_capacity}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    if medoid not in MEDOIDS:
        raise ValueError(f"medoid must be one of {MEDOIDS}, got {medoid!r}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")


def per_query_head(x, heads):
    """[B,S,G,D] -> [B,H,S,D]: query head h reads kv head h // (H // G)."""
    groups = x.shape[2]
    if heads % groups:
        raise ValueError(f"{heads} query heads do not split into {groups} kv head groups")
    return jnp.repeat(jnp.swapaxes(x, 1, 2), heads // groups, axis=1)


def _decayed_sums(v, onehot, positions, gamma):
    """Prefix states over keys j: A[t, c] = sum_{j <= t, member} gamma**(n - j) v_j, Z the same
    weights' sum, n the newest member (-1: none). An associative scan keeps every weight <= 1
    (relative to the newest member), so nothing overflows whatever the length."""
    log_gamma = jnp.float32(np.log(gamma))
    newest = jnp.where(onehot > 0, positions[:, None], -1)                    # [B,H,S,N]

    def combine(left, right):
        a_l, z_l, n_l = left
        a_r, z_r, n_r = right
        scale = jnp.where((n_r >= 0) & (n_l >= 0),
                          jnp.exp((n_r - n_l).astype(jnp.float32) * log_gamma), 1.0)
        return scale[..., None] * a_l + a_r, scale * z_l + z_r, jnp.maximum(n_l, n_r)

    a = onehot[..., None] * v[:, :, :, None, :]                               # [B,H,S,N,D]
    return jax.lax.associative_scan(combine, (a, onehot, newest), axis=2)


def cluster_summaries(k, v, clusters, *, window, sink_tokens, num_clusters, gamma,
                      medoid="closest"):
    """Every cluster's summary of far(i), for every query i.

    k, v: [B,S,G,D]; clusters: int [B,H,S] in [0, num_clusters) (query head h's route ids).
    Returns keys, values [B,H,S,N,D] float32, counts [B,H,S,N] int32 (far members) and
    newest [B,H,S,N] int32 (the newest far member, -1 when there is none). Rows with no member
    hold finite junk (counts 0); callers mask them.
    """
    heads, seq = clusters.shape[1], clusters.shape[2]
    kh = per_query_head(k, heads).astype(jnp.float32)                         # [B,H,S,D]
    vh = per_query_head(v, heads).astype(jnp.float32)
    pos = jnp.arange(seq, dtype=jnp.int32)
    eligible = pos >= sink_tokens
    onehot = ((clusters[..., None] == jnp.arange(num_clusters)) & eligible[:, None]
              ).astype(jnp.float32)                                           # [B,H,S,N]
    # far(i) is the prefix [sink, i - window]: every statistic is a prefix one read at t_i.
    t = pos - window                                                          # [S]
    has_far = t >= 0
    t = jnp.maximum(t, 0)
    counts = jnp.cumsum(onehot, axis=2).astype(jnp.int32)[:, :, t]
    counts = jnp.where(has_far[:, None], counts, 0)
    a, z, newest = _decayed_sums(vh, onehot, pos, gamma)
    values = a[:, :, t] / jnp.maximum(z[:, :, t], jnp.finfo(jnp.float32).tiny)[..., None]
    newest = jnp.where(has_far[:, None], newest[:, :, t], -1)
    if medoid == "recent":
        index = newest
    else:
        index = _closest_to_mean(kh, clusters, counts, t, has_far, eligible, num_clusters)
    keys = jnp.take_along_axis(kh[:, :, None], jnp.maximum(index, 0)[..., None], axis=3)
    return keys, values, counts, newest


def _closest_to_mean(kh, clusters, counts, t, has_far, eligible, num_clusters):
    """int32 [B,H,S,N]: per query i and cluster c, the far member j of c minimising
    |k_j - mean|^2 = |k_j|^2 - 2 k_j . mean + const; k_j . mean = P[j, t_i] / n with
    P[j, t] = sum_{j' <= t, same cluster} k_j . k_j' (a prefix sum of a same-cluster Gram
    matrix), so no [S, N, D] mean is needed. Near ties (within TIE * |k_j|^2, e.g. the two
    members of a pair, equidistant from their mean) go to the newest member."""
    seq = kh.shape[2]
    same = (clusters[..., :, None] == clusters[..., None, :]) & eligible
    gram = jnp.where(same, jnp.einsum("bhjd,bhkd->bhjk", kh, kh), 0.0)
    prefix = jnp.cumsum(gram, axis=-1)[..., t]                                # [B,H,Sj,Si]
    prefix = jnp.swapaxes(prefix, -1, -2)                                     # [B,H,Si,Sj]
    n_j = jnp.take_along_axis(counts, jnp.broadcast_to(clusters[:, :, None, :], prefix.shape),
                              axis=-1)
    norm2 = jnp.sum(kh * kh, -1)                                              # [B,H,Sj]
    score = norm2[:, :, None, :] - 2.0 * prefix / jnp.maximum(n_j, 1)
    pos = jnp.arange(seq)
    far = has_far[:, None] & eligible & (pos[None, :] <= t[:, None])          # [Si,Sj]
    score = jnp.where(far, score, jnp.inf)

    def per_head(score, ids, norm2):                                  # [Si,Sj], [Sj], [Sj]
        best = jax.ops.segment_min(score.T, ids, num_segments=num_clusters)  # [N, Si]
        hit = (score.T <= best[ids] + TIE * norm2[:, None]) & jnp.isfinite(score.T)
        idx = jnp.where(hit, pos[:, None], -1)
        return jax.ops.segment_max(idx, ids, num_segments=num_clusters).T    # [Si, N]

    return jax.vmap(jax.vmap(per_head))(score, clusters, norm2).astype(jnp.int32)


def select_clusters(counts, newest, capacity, keep="largest", max_capacity=None):
    """(cluster indices [B,H,S,M], kept [B,H,S,M] bool), M = min(max_capacity, N) slots of
    which the first `capacity` (an int or a traced scalar <= max_capacity) can be kept: the
    non-empty clusters of every query ranked by `keep` (see the module docstring)."""
    max_capacity = capacity if max_capacity is None else max_capacity
    slots = min(max_capacity, counts.shape[-1])
    seq = counts.shape[2]
    rank = newest if keep == "recent" else counts * (seq + 1) + newest
    rank = jnp.where(counts > 0, rank, -1)
    top, index = jax.lax.top_k(rank, slots)                 # best first
    return index.astype(jnp.int32), (top >= 0) & (jnp.arange(slots) < capacity)


def condensed_attention(q, k, v, clusters, *, window, sink_tokens, capacity, gamma,
                        num_clusters, own_cluster, keep="largest", medoid="closest",
                        scale=None, max_capacity=None):
    """Attention over sink + window (exact) + at most `capacity` cluster summaries per query.

    q [B,S,H,D], k, v [B,S,G,D], clusters int [B,H,S] (route ids at the cut level, query
    head h's for both its queries and the keys it reads). Returns [B,S,H,D] in q's dtype.
    capacity 0 is the plain sink + window cache. window, capacity and own_cluster may be traced
    (one compiled function for many caches) when max_capacity, a static bound on capacity,
    is given.
    """
    if max_capacity is None:
        if not isinstance(capacity, int):
            raise ValueError("a traced capacity needs a static max_capacity")
        max_capacity = capacity
    check_options(window=window, sink_tokens=sink_tokens, capacity=capacity, gamma=gamma,
                  keep=keep, medoid=medoid, num_clusters=num_clusters,
                  max_capacity=max_capacity)
    batch, seq, heads, dim = q.shape
    if clusters.shape != (batch, heads, seq):
        raise ValueError(f"clusters must be [B,H,S] = {(batch, heads, seq)}, got "
                         f"{clusters.shape}")
    scale = dim ** -0.5 if scale is None else scale
    qh = jnp.swapaxes(q, 1, 2).astype(jnp.float32)                            # [B,H,S,D]
    kh = per_query_head(k, heads).astype(jnp.float32)
    vh = per_query_head(v, heads).astype(jnp.float32)
    i, j = jnp.arange(seq)[:, None], jnp.arange(seq)[None, :]
    exact = (j <= i) & ((j < sink_tokens) | (i - j < window))                 # [S,S]
    scores = [jnp.einsum("bhid,bhjd->bhij", qh, kh) * scale]
    masks = [jnp.broadcast_to(exact, scores[0].shape)]
    values = [vh]
    if max_capacity > 0:
        s_keys, s_values, counts, newest = cluster_summaries(
            k, v, clusters, window=window, sink_tokens=sink_tokens,
            num_clusters=num_clusters, gamma=gamma, medoid=medoid)
        index, kept = select_clusters(counts, newest, capacity, keep, max_capacity)
        s_keys = jnp.take_along_axis(s_keys, index[..., None], axis=3)        # [B,H,S,M,D]
        s_values = jnp.take_along_axis(s_values, index[..., None], axis=3)
        kept = kept & (jnp.logical_not(own_cluster) | (index == clusters[..., None]))
        scores.append(jnp.einsum("bhid,bhicd->bhic", qh, s_keys) * scale)
        masks.append(kept)
        values.append(s_values)
    logits = jnp.where(jnp.concatenate(masks, -1), jnp.concatenate(scores, -1), -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)                # the query's own key: never empty
    out = jnp.einsum("bhij,bhjd->bhid", probs[..., :seq], values[0])
    if max_capacity > 0:
        out = out + jnp.einsum("bhic,bhicd->bhid", probs[..., seq:], values[1])
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)
