"""Self-attention on learned routes: the kernels on a cluster-sorted layout.

Learned routes scatter each cluster over the sequence, so in token order nearly every key block
holds some query's cluster and the natural schedule visits them all. The allowed pairs split in
two disjoint sets:

  tree set   j <= i and c_i == c_j
  local set  j <= i and (j < sink or i - j < window) and c_i != c_j

Per (batch, head) a stable argsort of the ids makes every cluster one contiguous segment in
position order, so the tree set is causal attention within segments (as packed sequences): the
kernels run it on the sorted layout with window = sink = 0 and segment_schedule's lists, which
visit about sum_c n_c^2 / (2 block_q block_k) blocks instead of all of them. The local set is a
band plus the sink columns in natural order (band_schedule, "other cluster" token mask). Each
pass gives (o_X, lse_X); they merge by log-sum-exp and the tree output is un-permuted. Every
query keeps (i, i) in the tree set, so no row is empty. Gradients flow through the gathers and
the kernels' custom VJP (which takes the LSE cotangent of the merge).

GQA: the sorted keys and values are gathered per query head (head h reads kv head
h // (Hq // Hkv) at its own order), so the sorted pass holds [B, S, Hq, D] keys and values:
Hq / Hkv times the K/V memory (4x for Llama-3-8B's 32 / 8), plus sorted copies of q and of the
tree output.

Every permutation here is a bijection per head, so its transpose is the gather by the inverse
order (then, for keys and values, a sum over the query heads of each kv group): the backward
pass gathers instead of letting autodiff scatter-add into the token order (_permute_heads).

The stages (sorted_plan, permute_inputs, tree_pass, unpermute, band_pass, sink_pass,
merge_partials) are public so that a benchmark can time each one alone.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.masking import safe_max
from pallas_kernels.ops import attention_with_schedule, make_config, pick_backend
from pallas_kernels.reference import dense_attention
from pallas_kernels.schedule import BlockSchedule, build_schedule
from pallas_kernels.segment_schedule import band_schedule, segment_schedule
from pallas_kernels.validation import check_attention_args, check_block_size

LAYOUTS = ("auto", "natural", "sorted")
# layout="auto" runs the sorted layout when the natural schedule visits more than this share of
# the causal blocks. The sorted layout costs about 1/clusters of the causal blocks for the tree
# pass, the band (window / block_k + 2 blocks per row), and four memory-bound passes (gathers of
# q, k, v and the un-permute); on the contiguous routes that the natural schedule handles at a
# few percent it is slower, on scattered routes (natural density near 1) it is many times faster.
SORTED_ABOVE = 0.25
# The sorted layout runs up to this many sink keys as a jnp partial (sink_pass); its scores are
# [B, Hq, S, sink] float32, a small fraction of the outputs' memory at this width.
SINK_PARTIAL_MAX = 16


def merge_partials(*outs_and_lses):
    """Softmax attention over the union of disjoint key sets from each set's (out, lse), given
    flat as out_a, lse_a, out_b, lse_b, ...; an lse of -inf (no key) weighs 0, with finite
    gradients. Returns (out, lse) float32."""
    if len(outs_and_lses) < 4 or len(outs_and_lses) % 2:
        raise ValueError("merge_partials takes (out, lse) pairs, at least two, got "
                         f"{len(outs_and_lses)} arrays")
    outs, lses = outs_and_lses[0::2], outs_and_lses[1::2]
    top = jax.lax.stop_gradient(functools.reduce(jnp.maximum, lses))
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = [jnp.exp(lse - top) for lse in lses]
    total = functools.reduce(jnp.add, weights)
    safe = jnp.where(total > 0, total, 1.0)
    lse = jnp.where(total > 0, top + jnp.log(safe), -jnp.inf)

    def weigh(out, w):
        return out.astype(jnp.float32) * jnp.swapaxes(w / safe, 1, 2)[..., None]

    return functools.reduce(jnp.add, [weigh(o, w) for o, w in zip(outs, weights)]), lse


def sort_by_cluster(clusters):
    """(order, sorted_ids, inverse) of ids [B, H, S]: sorted_ids = ids[order] is grouped by id
    with positions ascending inside a group; inverse undoes order."""
    order = jnp.argsort(clusters, axis=-1, stable=True).astype(jnp.int32)
    sorted_ids = jnp.take_along_axis(clusters, order, axis=-1)
    seq = clusters.shape[-1]
    inverse = jax.vmap(jax.vmap(lambda o: jnp.zeros_like(o).at[o].set(
        jnp.arange(seq, dtype=o.dtype))))(order)
    return order, sorted_ids, inverse


def _gather_heads(x, order, group):
    """x [B, S, Hx, D] read at order [B, H, S] per head h (from head h // group): [B, S, H, D]."""
    batch, heads = order.shape[:2]
    b = jnp.arange(batch)[:, None, None]
    h = (jnp.arange(heads) // group)[None, None, :]
    return x[b, jnp.swapaxes(order, 1, 2), h]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _permute_heads(x, order, inverse, group):
    """_gather_heads(x, order, group), inverse being order's inverse per head. Backward: the
    cotangent gathered back by inverse, summed over each group of heads in float32."""
    return _gather_heads(x, order, group)


def _permute_heads_fwd(x, order, inverse, group):
    return _gather_heads(x, order, group), (order, inverse)


def _permute_heads_bwd(group, res, ct):
    order, inverse = res
    back = _gather_heads(ct, inverse, 1)                  # [B, S, H, D] in token order
    if group > 1:
        batch, seq, heads, dim = back.shape
        back = jnp.sum(back.reshape(batch, seq, heads // group, group, dim), axis=3,
                       dtype=jnp.float32).astype(ct.dtype)
    return back, None, None


_permute_heads.defvjp(_permute_heads_fwd, _permute_heads_bwd)


@jax.custom_vjp
def _permute_rows(x, order, inverse):
    """x [B, H, S] read at order [B, H, S] (take_along_axis); backward gathers by inverse."""
    return jnp.take_along_axis(x, order, axis=-1)


def _permute_rows_fwd(x, order, inverse):
    return jnp.take_along_axis(x, order, axis=-1), (order, inverse)


def _permute_rows_bwd(res, ct):
    return jnp.take_along_axis(ct, res[1], axis=-1), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def _natural(q, k, v, qc, cfg, backend, schedule=None):
    if schedule is None:
        schedule = build_schedule(qc, qc, window=cfg.window, sink_tokens=cfg.sink_tokens,
                                  block_q=cfg.block_q, block_k=cfg.block_k)
    return attention_with_schedule(q, k, v, qc, qc, schedule, backend=backend, config=cfg)


def band_sink_tokens(sink_tokens: int) -> int:
    """The sink keys that the sorted layout's band kernel runs: none when sink_pass takes
    them (up to SINK_PARTIAL_MAX), else all of them."""
    return 0 if sink_tokens <= SINK_PARTIAL_MAX else sink_tokens


def has_sink_pairs(cfg) -> bool:
    """Whether sink_pass has any pair: sink keys it runs, and a query window or more past key 0
    (cfg.window is already clamped to the sequence)."""
    return band_sink_tokens(cfg.sink_tokens) == 0 < cfg.sink_tokens and cfg.window < cfg.q_len


class SortedPlan(NamedTuple):
    """What the sorted layout derives from the ids alone (no q, k, v)."""
    order: jax.Array         # [B, H, S] int32: token at each sorted slot
    sorted_ids: jax.Array    # [B, H, S]: ids[order]
    inverse: jax.Array       # [B, H, S] int32: sorted slot of each token
    tree: BlockSchedule      # segment_schedule of sorted_ids
    band: Optional[BlockSchedule]  # band_schedule of the window (None: no band pair)


def sorted_plan(qc, cfg) -> SortedPlan:
    """The permutation and both schedules of the sorted layout for ids qc [B, H, S]."""
    order, sorted_ids, inverse = sort_by_cluster(qc)
    tree = segment_schedule(sorted_ids, block_q=cfg.block_q, block_k=cfg.block_k)
    band = None
    sink = band_sink_tokens(cfg.sink_tokens)
    if cfg.window > 0 or sink > 0:
        batch, heads, seq = qc.shape
        band = band_schedule(batch, heads, seq, window=cfg.window, sink_tokens=sink,
                             block_q=cfg.block_q, block_k=cfg.block_k)
    return SortedPlan(order, sorted_ids, inverse, tree, band)


def permute_inputs(q, k, v, plan: SortedPlan):
    """q, k, v on the sorted layout, [B, S, Hq, D] each (k and v per query head)."""
    group = q.shape[2] // k.shape[2]
    return (_permute_heads(q, plan.order, plan.inverse, 1),
            _permute_heads(k, plan.order, plan.inverse, group),
            _permute_heads(v, plan.order, plan.inverse, group))


def tree_pass(qs, ks, vs, plan: SortedPlan, cfg, backend):
    """(out, lse) of the same-cluster pairs on the sorted layout (sorted order)."""
    tree_cfg = dataclasses.replace(cfg, window=0, sink_tokens=0)
    return attention_with_schedule(qs, ks, vs, plan.sorted_ids, plan.sorted_ids, plan.tree,
                                   backend=backend, config=tree_cfg)


def unpermute(out_t, lse_t, plan: SortedPlan):
    """The tree pass's (out, lse) back in token order."""
    return (_permute_heads(out_t, plan.inverse, plan.order, 1),
            _permute_rows(lse_t, plan.inverse, plan.order))


def band_pass(q, k, v, qc, plan: SortedPlan, cfg, backend):
    """(out, lse) of the window pairs of other clusters (and the sink pairs when
    band_sink_tokens keeps them), in token order."""
    local_cfg = dataclasses.replace(cfg, sink_tokens=band_sink_tokens(cfg.sink_tokens),
                                    exclude_same_cluster=True)
    return attention_with_schedule(q, k, v, qc, qc, plan.band, backend=backend,
                                   config=local_cfg)


def sink_pass(q, k, v, qc, cfg):
    """(out float32 [B, S, Hq, D], lse [B, Hq, S]) of the sink pairs outside the window and
    the tree set (j < sink, i - j >= window, c_i != c_j), in token order, by dense jnp over
    the cfg.sink_tokens first keys; lse -inf (out 0) where a query has none."""
    sink, window = cfg.sink_tokens, cfg.window
    batch, seq, q_heads, dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    # query head h reads kv head h // group: split h into (kv head, member of its group)
    qg = q.reshape(batch, seq, kv_heads, group, dim)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k[:, :sink], precision=precision,
                   preferred_element_type=jnp.float32) * cfg.scale
    s = s.reshape(batch, q_heads, seq, sink)
    i, j = jnp.arange(seq)[:, None], jnp.arange(sink)[None, :]
    ok = (j <= i) & (i - j >= window) & (qc[..., :, None] != qc[..., None, :sink])
    s = jnp.where(ok, s, -jnp.inf)
    m = jax.lax.stop_gradient(safe_max(jnp.max(s, axis=-1, keepdims=True)))
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1)
    has_key = total > 0
    safe = jnp.where(has_key, total, 1.0)
    lse = jnp.where(has_key, jnp.log(safe) + m[..., 0], -jnp.inf)
    p = (p / safe[..., None]).reshape(batch, kv_heads, group, seq, sink)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v[:, :sink].astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(batch, seq, q_heads, dim), lse


def _sorted(q, k, v, qc, cfg, backend):
    plan = sorted_plan(qc, cfg)
    parts = [*unpermute(*tree_pass(*permute_inputs(q, k, v, plan), plan, cfg, backend), plan)]
    if plan.band is not None:
        parts += band_pass(q, k, v, qc, plan, cfg, backend)
    if has_sink_pairs(cfg):
        parts += sink_pass(q, k, v, qc, cfg)
    if len(parts) == 2:  # the tree set alone
        return tuple(parts)
    out, lse = merge_partials(*parts)
    return out.astype(q.dtype), lse


def prefer_sorted(natural_density, sorted_above: float = SORTED_ABOVE):
    """layout="auto"'s rule: the sorted layout when the natural schedule's density (visited /
    causal blocks, BlockSchedule.density) is above sorted_above."""
    return natural_density > sorted_above


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
                     block_k=None, return_lse=False):
    """Causal self-attention restricted to the allowed pairs of one set of cluster ids (the
    mask of block_sparse_attention with q_clusters = k_clusters = clusters, q_offset 0).

    q [B, S, Hq, D]; k, v [B, S, Hkv, D]; clusters [B, Hq, S] integer ids. layout: "natural"
    runs the kernels in token order; "sorted" runs the tree pairs on the cluster-sorted layout,
    the window pairs as a band and the sink pairs as a jnp partial (module docstring); "auto"
    builds the natural schedule and takes the sorted layout where prefer_sorted(its density,
    sorted_above) holds (a lax.cond: both paths are compiled, one runs). Returns out
    [B, S, Hq, D] in q's dtype and, with return_lse, the natural-log LSE [B, Hq, S] float32.
    Differentiable in q, k, v.
    """
    _check_options(layout, sorted_above, q, k, clusters)
    qc, _, window, sink_tokens, _ = check_attention_args(q, k, v, clusters, clusters, window,
                                                         sink_tokens, 0)
    backend = pick_backend(backend, q, k, window=window, sink_tokens=sink_tokens, block_q=block_q,
                           block_k=block_k)
    if backend == "xla":
        check_block_size("block_q", block_q)
        check_block_size("block_k", block_k)
        return dense_attention(q, k, v, qc, qc, window=window, sink_tokens=sink_tokens,
                               q_offset=0, scale=scale, return_lse=return_lse)
    cfg = make_config(q, k, window=window, sink_tokens=sink_tokens, q_offset=0, scale=scale,
                      backend=backend, interpret=interpret, block_q=block_q, block_k=block_k)
    if layout == "natural":
        out, lse = _natural(q, k, v, qc, cfg, backend)
    elif layout == "sorted":
        out, lse = _sorted(q, k, v, qc, cfg, backend)
    else:
        natural = build_schedule(qc, qc, window=window, sink_tokens=sink_tokens,
                                 block_q=cfg.block_q, block_k=cfg.block_k)
        out, lse = jax.lax.cond(
            prefer_sorted(natural.density, sorted_above),
            lambda q, k, v, qc, natural: _sorted(q, k, v, qc, cfg, backend),
            lambda q, k, v, qc, natural: _natural(q, k, v, qc, cfg, backend, natural),
            q, k, v, qc, natural)
    return (out, lse) if return_lse else out
