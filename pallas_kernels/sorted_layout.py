"""The cluster-sorted layout of routed_attention: its stages and its VJP.

The allowed pairs of one set of cluster ids split in disjoint sets:

  tree set   j <= i and c_i == c_j                        (the sorted layout's kernels)
  local set  j <= i and i - j < window and c_i != c_j     (a band in token order)
  sink set   j < sink, i - j >= window and c_i != c_j     (band kernel's forward; jnp backward)

Per (batch, head) a stable sort of the ids (sort_clusters: a counting sort on
backend="triton", an argsort elsewhere) makes every cluster one contiguous segment in
position order, so the tree set is causal attention within segments (as packed sequences): the
kernels run it on the sorted layout with window = sink = 0 and segment_schedule's lists, which
visit about sum_c n_c^2 / (2 block_q block_k) blocks instead of all of them. Each set gives
(o_X, lse_X); they merge by log-sum-exp and the tree output is un-permuted. Every query keeps
(i, i) in the tree set, so no row is empty.

GQA: the sorted keys and values are gathered per query head (head h reads kv head
h // (Hq // Hkv) at its own order), so the sorted pass holds [B, S, Hq, D] keys and values:
Hq / Hkv times the K/V memory (4x for Llama-3-8B's 32 / 8), plus sorted copies of q and of the
tree output.

On backend="triton" the forward is two launches, no copy and no schedule (_fused_forward): the
tree kernel (segment_fwd_kernel) walks each query block's key blocks from its segment's start to
its diagonal, reading q, k and v through the order and writing in token order; band_fwd_kernel
runs the window and sink sets (its key tiles from each query tile's window, plus tiles of the
sink keys alone) and starts its softmax from the tree's result, which merges the two. With
GpuTuning.band_by_position the two split the pairs another way: the band takes every window
and sink pair whatever the clusters (it reads no ids, its mask is positions alone) and the tree
leaves them out (its walk then ends at its rows' windows). Only the backward builds the
schedules.

sorted_attention's backward does not differentiate the merge: with the merged softmax's lse and
delta = rowsum(dout * out), each set's pairs have p_ij = exp(s_ij - lse_i) and
ds_ij = p_ij (dp_ij - delta_i), so every pass runs its own backward kernel on its own layout
with the global statistics (permuted for the tree set) and the gradients add. Every permutation
is a bijection per head, so its transpose is the gather by the inverse order (then, for keys
and values, a sum over the query heads of each kv group). sorted_attention_autodiff composes
the same stages under autodiff (the merge and the gathers differentiated): the oracle of the
VJP's tests, and what routed_breakdown times stage by stage.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.common import pad_axis
from pallas_kernels.masking import safe_max
from pallas_kernels.ops import (attention_with_schedule, kernel_backward, kernel_forward,
                                output_delta, prepare_schedule)
from pallas_kernels.schedule import BlockSchedule
from pallas_kernels.segment_schedule import band_schedule, segment_schedule, segment_starts

# Up to this many sink keys run as a jnp partial (sink_pass); its scores are
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
    order, sorted_ids = cluster_order(clusters)
    return order, sorted_ids, _invert(order)


def _invert(order):
    seq = order.shape[-1]
    return jax.vmap(jax.vmap(lambda o: jnp.zeros_like(o).at[o].set(
        jnp.arange(seq, dtype=o.dtype))))(order)


def cluster_order(ids):
    """(order, ids[order]): the stable argsort of ids [B, H, S] along S."""
    order = jnp.argsort(ids, axis=-1, stable=True).astype(jnp.int32)
    return order, jnp.take_along_axis(ids, order, axis=-1)


# On backend="triton", ids spanning fewer than this many values less one (the padding's) sort
# by counting (triton_sort.py); wider ranges take the argsort. 0: always the argsort.
COUNTING_BINS = 256
# Promised ids (num_ids) count in bins up to this many; more take the range-checked path (the
# per-tile counts grow with the bins).
COUNTING_BINS_MAX = 1024


class ClusterSort(NamedTuple):
    """The stable sort of ids [B, H, N] by (id, position); None where not asked for."""
    order: jax.Array                  # [B, H, N] int32: token at each sorted slot
    starts: jax.Array                 # [B, H, N] int32: first slot of each slot's segment
    sorted_ids: Optional[jax.Array]   # [B, H, N]: ids[order]
    inverse: Optional[jax.Array]      # [B, H, N] int32: sorted slot of each token


def sort_clusters(ids, *, backend: str = "xla", interpret: bool = False,
                  length: Optional[int] = None, full: bool = True,
                  num_ids: int = 0) -> ClusterSort:
    """The sorted layout's permutation of ids [B, H, S]. length: the ids padded to this many
    positions with an id past all of them, so the padding is the last segment, in position
    order (the fused forward's padded layout). full=False leaves sorted_ids and inverse out.
    backend="triton" sorts by counting: with num_ids > 0 (ids promised in [0, num_ids); a
    token outside gets start -1, a NaN row in the tree kernel) in bins enough for them;
    otherwise where the ids span fewer than COUNTING_BINS - 1 values (a lax.cond on their
    range: both branches compile, one runs). Wider ids, and the other backends, take a stable
    argsort."""
    seq = ids.shape[-1]
    length = seq if length is None else length
    if length < seq:
        raise ValueError(f"sort_clusters pads to length {length}, shorter than the ids' {seq}")
    if backend == "triton" and 0 < num_ids < COUNTING_BINS_MAX and COUNTING_BINS:
        return _counting_clusters(ids, None, length, full, interpret, num_ids)
    if backend != "triton" or not COUNTING_BINS:
        return _argsort_clusters(ids, length, full)
    lo, hi = jnp.min(ids), jnp.max(ids)
    # unsigned, so ids at both ends of int32 cannot overflow the span
    span = hi.astype(jnp.uint32) - lo.astype(jnp.uint32)
    return jax.lax.cond(span < COUNTING_BINS - 1,
                        lambda ids: _counting_clusters(ids, lo, length, full, interpret),
                        lambda ids: _argsort_clusters(ids, length, full), ids)


def _argsort_clusters(ids, length, full):
    top = jnp.iinfo(ids.dtype).max
    padded = pad_axis(ids, length, 2, value=top)
    order, sorted_ids = cluster_order(padded)
    return ClusterSort(order, segment_starts(sorted_ids), sorted_ids if full else None,
                       _invert(order) if full else None)


def _counting_clusters(ids, lo, length, full, interpret, num_ids=0):
    from pallas_kernels.triton_backend import counting_sort
    bins = 1 << num_ids.bit_length() if num_ids else COUNTING_BINS  # > num_ids: the padding's
    order, starts, inverse = counting_sort(ids, bins, lo=lo, length=length, invert=full,
                                           num_ids=num_ids, interpret=interpret)
    if not full:
        return ClusterSort(order, starts, None, None)
    padded = pad_axis(ids, length, 2, value=jnp.iinfo(ids.dtype).max)
    return ClusterSort(order, starts, jnp.take_along_axis(padded, order, axis=-1), inverse)


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
    starts: jax.Array        # [B, H, S] int32: first slot of each slot's segment
    tree: BlockSchedule      # segment_schedule of sorted_ids
    band: Optional[BlockSchedule]  # band_schedule of the window (None: no band pair)


def sorted_plan(qc, cfg, backend: str = "xla") -> SortedPlan:
    """The permutation and both schedules of the sorted layout for ids qc [B, H, S]
    (the permutation by sort_clusters on this backend)."""
    order, starts, sorted_ids, inverse = sort_clusters(qc, backend=backend,
                                                       interpret=cfg.interpret,
                                                       num_ids=cfg.num_ids)
    tree = segment_schedule(sorted_ids, block_q=cfg.block_q, block_k=cfg.block_k)
    band = None
    sink = band_sink_tokens(cfg.sink_tokens)
    if cfg.window > 0 or sink > 0:
        batch, heads, seq = qc.shape
        band = band_schedule(batch, heads, seq, window=cfg.window, sink_tokens=sink,
                             block_q=cfg.block_q, block_k=cfg.block_k)
    return SortedPlan(order, sorted_ids, inverse, starts, tree, band)


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
    sink = cfg.sink_tokens
    batch, seq, q_heads, dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    s = _sink_scores(q, k, qc, cfg)[0].reshape(batch, q_heads, seq, sink)
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


def sorted_attention_autodiff(q, k, v, qc, cfg, backend):
    """The sorted layout's (out, lse) composed of its stages, differentiated by autodiff
    through the merge, the gathers and each pass's own VJP."""
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


def _tree_args(plan, cfg, backend, qs, ks, vs):
    tree_cfg = dataclasses.replace(cfg, window=0, sink_tokens=0)
    return prepare_schedule(qs, ks, vs, plan.sorted_ids, plan.sorted_ids, plan.tree,
                            backend=backend, config=tree_cfg)


def _band_args(q, k, v, qc, cfg, backend, sink_tokens):
    """The band kernel's arguments for the local set of other clusters plus the sink keys
    below sink_tokens. The forward passes cfg.sink_tokens: the sink set as one more key block,
    cheaper than sink_pass and its merge operand. The backward passes band_sink_tokens: a
    column every query block writes to would serialise the key-block accumulation there, so
    _sink_backward takes the sink set. The schedule is built while tracing (shapes only)."""
    batch, heads, seq = qc.shape
    band = band_schedule(batch, heads, seq, window=cfg.window, sink_tokens=sink_tokens,
                         block_q=cfg.block_q, block_k=cfg.block_k)
    local_cfg = dataclasses.replace(cfg, sink_tokens=sink_tokens, exclude_same_cluster=True)
    return prepare_schedule(q, k, v, qc, qc, band, backend=backend, config=local_cfg)


def _sink_scores(q, k, qc, cfg):
    """(s [B, Hkv, G, S, sink] float32 with -inf outside the sink set, grouped q)."""
    sink, window = cfg.sink_tokens, cfg.window
    batch, seq, q_heads, dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    qg = q.reshape(batch, seq, kv_heads, group, dim)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k[:, :sink], precision=precision,
                   preferred_element_type=jnp.float32) * cfg.scale
    i, j = jnp.arange(seq)[:, None], jnp.arange(sink)[None, :]
    ok = (j <= i) & (i - j >= window) & (qc[..., :, None] != qc[..., None, :sink])
    ok = ok.reshape(batch, kv_heads, group, seq, sink)
    return jnp.where(ok, s, -jnp.inf), qg


def _sink_backward(q, k, v, qc, cfg, dout, lse, delta):
    """(dq, dk, dv) float32 of the sink set's pairs under the merged softmax (lse, delta)."""
    sink = cfg.sink_tokens
    batch, seq, q_heads, dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    s, qg = _sink_scores(q, k, qc, cfg)
    grouped = lambda x: x.reshape(batch, kv_heads, group, seq)[..., None]  # noqa: E731
    p = jnp.where(jnp.isfinite(s), jnp.exp(s - grouped(lse)), 0.0)
    hi = jax.lax.Precision.HIGHEST
    dog = dout.astype(jnp.float32).reshape(batch, seq, kv_heads, group, dim)
    ks, vs = k[:, :sink].astype(jnp.float32), v[:, :sink].astype(jnp.float32)
    dp = jnp.einsum("bqhgd,bkhd->bhgqk", dog, vs, precision=hi)
    ds = p * (dp - grouped(delta)) * cfg.scale
    dq = jnp.einsum("bhgqk,bkhd->bqhgd", ds, ks, precision=hi).reshape(q.shape)
    dk_sink = jnp.einsum("bhgqk,bqhgd->bkhd", ds, qg.astype(jnp.float32), precision=hi)
    dv_sink = jnp.einsum("bhgqk,bqhgd->bkhd", p, dog, precision=hi)
    pad = ((0, 0), (0, k.shape[1] - sink), (0, 0), (0, 0))
    return dq, jnp.pad(dk_sink, pad), jnp.pad(dv_sink, pad)


def _group_sum(x, group):
    """[B, S, H, D] per query head -> [B, S, H / group, D] per kv head, in float32."""
    if group == 1:
        return x.astype(jnp.float32)
    batch, seq, heads, dim = x.shape
    return jnp.sum(x.reshape(batch, seq, heads // group, group, dim), axis=3,
                   dtype=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def sorted_attention(q, k, v, qc, cfg, backend):
    """The sorted layout's (out in q's dtype, lse float32), with the global-statistics VJP."""
    if backend == "triton":  # nothing to keep for a backward: no sorted copies at all
        srt = sort_clusters(qc, backend=backend, interpret=cfg.interpret,
                            length=cfg.num_q_blocks * cfg.block_q, full=False,
                            num_ids=cfg.num_ids)
        return _fused_forward(q, k, v, qc, srt.order, srt.starts, cfg)
    return _sorted_fwd(q, k, v, qc, cfg, backend)[0]


def _fused_forward(q, k, v, qc, order, starts, cfg):
    """(out, lse) of the sorted layout in two Triton launches (backend="triton"), both in
    closed form, without a schedule: the tree pass (forward_segment) reads q, k and v through
    the order and writes its result in token order; the band pass (forward_band: window and
    sink keys) starts its softmax from that result. No permuted copy, no un-permute and no
    merge pass exist; the sum is the same as merge_partials'."""
    from pallas_kernels.triton_backend import forward_band, forward_segment
    seq = q.shape[1]
    sp = cfg.num_q_blocks * cfg.block_q
    qp, kp, vp = (pad_axis(x, sp, 1) for x in (q, k, v))
    out, lse = forward_segment(qp, kp, vp, order, starts, cfg)
    if cfg.window > 0 or cfg.sink_tokens > 0:
        out, lse = forward_band(qp, kp, vp, pad_axis(qc, sp, 2), cfg, init=(out, lse))
    return out[:, :seq], lse[..., :seq]


def _sorted_fwd(q, k, v, qc, cfg, backend):
    plan = sorted_plan(qc, cfg, backend)
    group = q.shape[2] // k.shape[2]
    # The sorted copies: the kernels' inputs, except on the fused Triton path, where they are
    # only the backward's residuals.
    qs, ks, vs = (_gather_heads(q, plan.order, 1), _gather_heads(k, plan.order, group),
                  _gather_heads(v, plan.order, group))
    if backend == "triton":
        out, lse = _fused_forward(q, k, v, qc, plan.order, plan.starts, cfg)
        return (out, lse), (q, k, v, qc, plan, qs, ks, vs, out, lse)
    tqc, tkc, tsched, tcfg = _tree_args(plan, cfg, backend, qs, ks, vs)
    out_t, lse_t = kernel_forward(qs, ks, vs, tqc, tkc, tsched, backend, tcfg)
    parts = [_gather_heads(out_t, plan.inverse, 1),
             jnp.take_along_axis(lse_t, plan.inverse, axis=-1)]
    if plan.band is not None or has_sink_pairs(cfg):
        bqc, bkc, bsched, bcfg = _band_args(q, k, v, qc, cfg, backend, cfg.sink_tokens)
        parts += kernel_forward(q, k, v, bqc, bkc, bsched, backend, bcfg)
    if len(parts) == 2:
        out, lse = parts
    else:
        out, lse = merge_partials(*parts)
    out = out.astype(q.dtype)
    return (out, lse), (q, k, v, qc, plan, qs, ks, vs, out, lse)


def _sorted_bwd(cfg, backend, res, cotangents):
    q, k, v, qc, plan, qs, ks, vs, out, lse = res
    dout, dlse = cotangents
    group = q.shape[2] // k.shape[2]
    delta = output_delta(out, dout, dlse)
    # The tree set on the sorted layout, with the merged softmax's statistics permuted there.
    tqc, tkc, tsched, tcfg = _tree_args(plan, cfg, backend, qs, ks, vs)
    dqs, dks, dvs = kernel_backward(
        qs, ks, vs, tqc, tkc, tsched, backend, tcfg, _gather_heads(dout, plan.order, 1),
        jnp.take_along_axis(lse, plan.order, axis=-1),
        jnp.take_along_axis(delta, plan.order, axis=-1))
    dq = _gather_heads(dqs, plan.inverse, 1).astype(jnp.float32)
    dk = _group_sum(_gather_heads(dks, plan.inverse, 1), group)
    dv = _group_sum(_gather_heads(dvs, plan.inverse, 1), group)
    if plan.band is not None:
        bqc, bkc, bsched, bcfg = _band_args(q, k, v, qc, cfg, backend,
                                            band_sink_tokens(cfg.sink_tokens))
        grads = kernel_backward(q, k, v, bqc, bkc, bsched, backend, bcfg, dout, lse, delta)
        dq, dk, dv = (a + b.astype(jnp.float32) for a, b in zip((dq, dk, dv), grads))
    if has_sink_pairs(cfg):
        grads = _sink_backward(q, k, v, qc, cfg, dout, lse, delta)
        dq, dk, dv = (a + b for a, b in zip((dq, dk, dv), grads))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


sorted_attention.defvjp(_sorted_fwd, _sorted_bwd)
