"""Self-attention on learned routes: the kernels in token order or on a cluster-sorted layout.

Learned routes scatter each cluster over the sequence, so in token order nearly every key block
holds some query's cluster and the natural schedule visits them all. The sorted layout
(sorted_layout.py) makes every cluster contiguous, runs the same-cluster pairs there, the window
pairs as a band in token order and the sink pairs as a small jnp partial, and merges them.
routed_attention picks the layout per call (layout="auto": from a cheap upper bound on the natural
schedule's density, so that the sorted layout does not pay for a schedule it never runs).
"""
from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from pallas_kernels.ops import attention_with_schedule, make_config, pick_backend
from pallas_kernels.reference import dense_attention
from pallas_kernels.schedule import build_schedule, density_bound_of_checked
from pallas_kernels.sorted_layout import sorted_attention
from pallas_kernels.validation import check_attention_args, check_block_size

LAYOUTS = ("auto", "natural", "sorted")
# layout="auto" runs the sorted layout when the natural schedule visits more than this share of
# the causal blocks. The sorted layout costs about 1/clusters of the causal blocks for the tree
# pass, the band (window / block_k + 2 blocks per row), and four memory-bound passes (gathers of
# q, k, v and the un-permute); on the contiguous routes that the natural schedule handles at a
# few percent it is slower, on scattered routes (natural density near 1) it is many times faster.
SORTED_ABOVE = 0.25


def _natural(q, k, v, qc, cfg, backend, schedule=None):
    if schedule is None:
        schedule = build_schedule(qc, qc, window=cfg.window, sink_tokens=cfg.sink_tokens,
                                  block_q=cfg.block_q, block_k=cfg.block_k, num_ids=cfg.num_ids)
    return attention_with_schedule(q, k, v, qc, qc, schedule, backend=backend, config=cfg)


def prefer_sorted(natural_density, sorted_above: float = SORTED_ABOVE):
    """layout="auto"'s rule: the sorted layout when the natural schedule's density (visited /
    causal blocks, BlockSchedule.density, or natural_density_bound's bound on it) is above
    sorted_above."""
    return natural_density > sorted_above


def _check_num_clusters(num_clusters, clusters):
    """num_clusters: None, or an int >= 1 that the ids lie below (checked where they are
    concrete; under jit a broken promise makes NaN rows on backend="triton")."""
    if num_clusters is None:
        return 0
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, numbers.Integral) \
            or num_clusters < 1:
        raise ValueError(f"num_clusters must be an integer >= 1 or None, got {num_clusters!r}")
    if not isinstance(clusters, jax.core.Tracer):  # one transfer for both ends
        lo, hi = (int(x) for x in jnp.stack([jnp.min(clusters), jnp.max(clusters)]))
        if lo < 0 or hi >= num_clusters:
            raise ValueError(f"clusters must lie in [0, num_clusters = {num_clusters}), got ids "
                             f"from {lo} to {hi}")
    return int(num_clusters)


def _check_options(layout, sorted_above, q, k, clusters):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if (isinstance(sorted_above, bool) or not isinstance(sorted_above, numbers.Real)
            or not 0.0 <= sorted_above <= 1.0):
        raise ValueError(f"sorted_above must be a number in [0, 1], got {sorted_above!r}")
    if q.ndim == 4 and k.ndim == 4 and q.shape[1] != k.shape[1]:
        raise ValueError("routed_attention is self-attention: q and k must hold the same "
                         f"positions, got Sq={q.shape[1]} and Sk={k.shape[1]}")
    if q.ndim == 4 and tuple(clusters.shape) != (q.shape[0], q.shape[2], q.shape[1]):
        raise ValueError(f"clusters must have shape [B, Hq, S] = "
                         f"{(q.shape[0], q.shape[2], q.shape[1])}, got {tuple(clusters.shape)}")
    if not jnp.issubdtype(clusters.dtype, jnp.integer):
        raise TypeError(f"clusters must hold integer cluster ids, got dtype {clusters.dtype}")


def routed_attention(q, k, v, clusters, *, window, sink_tokens, scale=None, layout="auto",
                     sorted_above=SORTED_ABOVE, backend="auto", interpret=False, block_q=None,
                     block_k=None, return_lse=False, num_clusters=None, gpu_tuning=None):
    """Causal self-attention restricted to the allowed pairs of one set of cluster ids (the
    mask of block_sparse_attention with q_clusters = k_clusters = clusters, q_offset 0).

    q [B, S, Hq, D]; k, v [B, S, Hkv, D]; clusters [B, Hq, S] integer ids. layout: "natural"
    runs the kernels in token order; "sorted" runs the tree pairs on the cluster-sorted layout,
    the window pairs as a band and the sink pairs as a jnp partial (module docstring); "auto"
    takes the sorted layout where prefer_sorted(natural_density_bound(...), sorted_above) holds
    (a lax.cond: both paths are compiled, one runs; the natural one builds its schedule).
    num_clusters: the ids lie in [0, num_clusters) (a surgical model's p ** cut); it lets
    backend="triton" sort by counting, and the natural layout's schedule take its signature
    path, without checking their range on the device. Where the ids are concrete a broken
    promise raises; under jit its rows come out NaN on the sorted layout, and the natural
    layout visits more blocks than it needs (still exact). Returns out
    [B, S, Hq, D] in q's dtype and, with return_lse, the natural-log LSE [B, Hq, S] float32.
    Differentiable in q, k, v. gpu_tuning: as block_sparse_attention's.
    """
    _check_options(layout, sorted_above, q, k, clusters)
    num_ids = _check_num_clusters(num_clusters, clusters)
    qc, _, window, sink_tokens, _ = check_attention_args(q, k, v, clusters, clusters, window,
                                                         sink_tokens, 0)
    backend, gpu_tuning = pick_backend(backend, q, k, window=window, sink_tokens=sink_tokens,
                                       block_q=block_q, block_k=block_k, gpu_tuning=gpu_tuning)
    if backend == "xla":
        check_block_size("block_q", block_q)
        check_block_size("block_k", block_k)
        return dense_attention(q, k, v, qc, qc, window=window, sink_tokens=sink_tokens,
                               q_offset=0, scale=scale, return_lse=return_lse)
    cfg = make_config(q, k, window=window, sink_tokens=sink_tokens, q_offset=0, scale=scale,
                      backend=backend, interpret=interpret, block_q=block_q, block_k=block_k,
                      gpu_tuning=gpu_tuning)
    cfg = dataclasses.replace(cfg, num_ids=num_ids)
    if layout == "natural":
        out, lse = _natural(q, k, v, qc, cfg, backend)
    elif layout == "sorted":
        out, lse = sorted_attention(q, k, v, qc, cfg, backend)
    else:
        # The bound, not the schedule: building the natural schedule costs more than the
        # sorted attention itself on trained routes, which always take the sorted layout.
        bound = density_bound_of_checked(qc, window, sink_tokens, cfg.block_q, cfg.block_k)
        out, lse = jax.lax.cond(
            prefer_sorted(bound, sorted_above),
            lambda q, k, v, qc: sorted_attention(q, k, v, qc, cfg, backend),
            lambda q, k, v, qc: _natural(q, k, v, qc, cfg, backend),
            q, k, v, qc)
    return (out, lse) if return_lse else out
