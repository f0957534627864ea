"""Stage-by-stage times of routed_attention's sorted layout (bench_routed.py --breakdown).

Each stage of pallas_kernels.routed (sort, schedules, gathers, tree kernel, un-permute, band
kernel, sink partial, merge) is jitted alone on inputs computed beforehand, so its median time
is its own; the backward stages are the vjp of each forward stage alone, on random cotangents
of the right shapes. The same run times routed_attention end to end and cuDNN's causal
attention, forward and forward + backward (backward = the difference), so the shares add up
against a measured whole. Rows outside the sums: the gathers' backward as autodiff alone would
run it (a scatter-add into the token order) next to the inverse-order gathers routed.py runs,
and the band kernel with the sink column in its schedule, as the sorted layout ran it before
the sink partial (every query block reaches key block 0, whose dK/dV program walks them all
serially).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from bench_attention import timed
from pallas_kernels import (band_schedule, build_schedule, routed_attention,
                            segment_schedule)
from pallas_kernels.ops import attention_with_schedule, make_config
from pallas_kernels.sorted_layout import (_gather_heads, _permute_heads, band_pass,
                                          band_sink_tokens, has_sink_pairs, merge_partials,
                                          permute_inputs, sink_pass, sort_by_cluster,
                                          sorted_attention_autodiff, sorted_plan, tree_pass,
                                          unpermute)


def _apply(f, *args):
    """Calls a vjp function (a pytree) under jit."""
    return f(*args)


_apply_jit = jax.jit(_apply)


def _like(x, key):
    """Random values of x's shape and dtype (finite where x's dtype is float)."""
    return jax.random.normal(key, x.shape, jnp.float32).astype(x.dtype)


def _cudnn(smoke):
    impl = "xla" if smoke else "cudnn"
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl,
                                                        is_causal=True)


def breakdown_case(q, k, v, ct, ids, *, window, sink, block, reps, smoke):
    """[(stage, seconds, whole)] for one input: whole names the end-to-end time the stage is
    a share of ("fwd", "bwd" or None)."""
    backend = "gpu"
    cfg = make_config(q, k, window=window, sink_tokens=sink, q_offset=0, scale=None,
                      backend=backend, interpret=smoke, block_q=block, block_k=block)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 32))
    rows = []

    def add(name, fn, *args, whole=None):
        fn = jax.jit(fn)
        rows.append((name, timed(fn, *args, reps=reps), whole))
        return fn(*args)

    def add_bwd(name, fn, *args):
        """Times fn's vjp alone; returns fn(*args)."""
        out, vjp = jax.vjp(fn, *args)
        cts = jax.tree.map(lambda x: _like(x, next(keys)), out)
        rows.append((name, timed(_apply_jit, vjp, cts, reps=reps), "bwd"))
        return out

    order, sorted_ids, _ = add("fwd: sort (argsort, sorted ids, inverse)", sort_by_cluster, ids,
                               whole="fwd")
    add("fwd: segment schedule (tree pass)",
        lambda s: segment_schedule(s, block_q=block, block_k=block), sorted_ids, whole="fwd")
    batch, heads, seq = ids.shape
    band_sink = band_sink_tokens(sink)
    add("fwd: band schedule" + (" (window + sink)" if band_sink else " (window)"),
        lambda: band_schedule(batch, heads, seq, window=window, sink_tokens=band_sink,
                              block_q=block, block_k=block), whole="fwd")
    plan = jax.jit(lambda ids: sorted_plan(ids, cfg))(ids)
    group = q.shape[2] // k.shape[2]
    add("fwd: gather q", lambda q, p: _permute_heads(q, p.order, p.inverse, 1), q, plan,
        whole="fwd")
    add("fwd: gather k, v per query head",
        lambda k, v, p: (_permute_heads(k, p.order, p.inverse, group),
                         _permute_heads(v, p.order, p.inverse, group)), k, v, plan, whole="fwd")
    qs, ks, vs = jax.jit(permute_inputs)(q, k, v, plan)
    out_t, lse_t = add("fwd: tree kernel", lambda a, b, c, p: tree_pass(a, b, c, p, cfg, backend),
                       qs, ks, vs, plan, whole="fwd")
    nat_t = add("fwd: un-permute (out, lse)", unpermute, out_t, lse_t, plan, whole="fwd")
    parts = [*nat_t]
    if plan.band is not None:
        parts += add("fwd: band kernel",
                     lambda q, k, v, ids, p: band_pass(q, k, v, ids, p, cfg, backend),
                     q, k, v, ids, plan, whole="fwd")
    sinks = has_sink_pairs(cfg)
    if sinks:
        parts += add("fwd: sink partial (jnp)",
                     lambda q, k, v, ids: sink_pass(q, k, v, ids, cfg), q, k, v, ids,
                     whole="fwd")
    if len(parts) > 2:
        add("fwd: merge (log-sum-exp)",
            lambda *parts: merge_partials(*parts)[0].astype(q.dtype), *parts, whole="fwd")
    rows.append(("fwd: sum of the stages above", sum(r[1] for r in rows), "fwd"))
    add("layout auto only: natural schedule (its rule's input)",
        lambda ids: build_schedule(ids, ids, window=window, sink_tokens=sink, block_q=block,
                                   block_k=block), ids)

    if len(parts) > 2:
        add_bwd("bwd: merge", merge_partials, *parts)
    if plan.band is not None:
        add_bwd("bwd: band kernel", lambda q, k, v: band_pass(q, k, v, ids, plan, cfg, backend),
                q, k, v)
    if sinks:
        add_bwd("bwd: sink partial (jnp, autodiff)",
                lambda q, k, v: sink_pass(q, k, v, ids, cfg), q, k, v)
    add_bwd("bwd: un-permute (out, lse)", lambda o, l: unpermute(o, l, plan), out_t, lse_t)
    add_bwd("bwd: tree kernel", lambda a, b, c: tree_pass(a, b, c, plan, cfg, backend), qs, ks, vs)
    add_bwd("bwd: gathers of q, k, v (inverse-order gathers)",
            lambda q, k, v: permute_inputs(q, k, v, plan), q, k, v)
    rows.append(("bwd: sum of the stages above",
                 sum(r[1] for r in rows if r[0].startswith("bwd:")), "bwd"))
    add_bwd("bwd: the same gathers by autodiff (scatter-add)",
            lambda q, k, v: (_gather_heads(q, plan.order, 1), _gather_heads(k, plan.order, group),
                             _gather_heads(v, plan.order, group)), q, k, v)
    rows[-1] = (rows[-1][0], rows[-1][1], None)
    if sink and not band_sink:
        before = jax.jit(lambda: band_schedule(batch, heads, seq, window=window,
                                               sink_tokens=sink, block_q=block,
                                               block_k=block))()
        before_cfg = dataclasses.replace(cfg, exclude_same_cluster=True)

        def band_with_sinks(q, k, v, ids, sched):
            return attention_with_schedule(q, k, v, ids, ids, sched, backend=backend,
                                           config=before_cfg)

        add("fwd: band kernel with sink column (old layout)", band_with_sinks,
            q, k, v, ids, before)
        add_bwd("bwd: band kernel with sink column (old layout)",
                lambda q, k, v: band_with_sinks(q, k, v, ids, before), q, k, v)
        rows[-1] = (rows[-1][0], rows[-1][1], None)

    def routed(q, k, v, ids):
        return routed_attention(q, k, v, ids, window=window, sink_tokens=sink, layout="sorted",
                                backend=backend, interpret=smoke, block_q=block, block_k=block)

    def autodiff(q, k, v, ids):  # the previous backward: the merge and gathers differentiated
        return sorted_attention_autodiff(q, k, v, ids, cfg, backend)[0]

    cudnn = _cudnn(smoke)
    for label, fn, args in (("end to end (sorted layout)", routed, (q, k, v, ids)),
                            ("end to end, autodiff through the merge", autodiff, (q, k, v, ids)),
                            ("cuDNN causal", lambda q, k, v, ids: cudnn(q, k, v), (q, k, v, ids))):
        fwd = timed(jax.jit(fn), *args, reps=reps)

        def fwd_bwd(q, k, v, ct, ids, fn=fn):
            _, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, ids), q, k, v)
            return vjp(ct)

        fb = timed(jax.jit(fwd_bwd), q, k, v, ct, ids, reps=reps)
        rows += [(f"fwd: {label}", fwd, None), (f"bwd: {label} (f+b - f)", fb - fwd, None),
                 (f"f+b: {label}", fb, None)]
    return rows


def run_breakdown(shape, seqs, clusters_list, *, reps, smoke, inputs, routes, window, sink,
                  block):
    """[{label, seq, clusters, stages: [{stage, ms, share}]}] for every (seq, clusters)."""
    cases = []
    for seq in seqs:
        q, k, v, ct = inputs(seq, shape["hq"], shape["hkv"], shape["d"], jnp.bfloat16, seed=seq)
        for clusters in clusters_list:
            ids = routes(seq, shape["hq"], clusters, seed=seq + clusters)
            rows = breakdown_case(q, k, v, ct, ids, window=window, sink=sink, block=block,
                                  reps=reps, smoke=smoke)
            whole = {r[0].split(":")[0]: r[1] for r in rows
                     if r[0] in ("fwd: end to end (sorted layout)",
                                 "bwd: end to end (sorted layout) (f+b - f)")}
            stages = [dict(stage=name, ms=1e3 * t,
                           share=None if w is None else t / whole[w]) for name, t, w in rows]
            label = f"S={seq} c={clusters}"
            for r in stages:
                print(f"{label} {r['stage']}: {r['ms']:.3f} ms", flush=True)
            cases.append(dict(label=label, seq=seq, clusters=clusters, stages=stages))
        del q, k, v, ct
    return cases
