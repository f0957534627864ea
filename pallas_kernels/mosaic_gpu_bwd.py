"""The backward of backend="mosaic" on Hopper: dq and dk/dv kernels on the schedule's lists.

Both are warp-specialised like the forward (mosaic_gpu.py): two consumer warpgroups of 64 rows
and a producer warpgroup that streams the listed blocks into a ring of shared-memory slots.
- dq: one CTA per 128-row query block; the producer streams its key blocks (K, V and, for
  masked blocks, the key cluster ids); each consumer recomputes p from the saved LSE and adds
  ds @ K to its dq rows.
- dk, dv: one CTA per 128-row key block and kv head; the producer walks the query-block lists
  of every query head of the group in turn (Q, dO, LSE, delta and the query ids), so the group's
  gradients add up in registers, without atomics; each consumer owns 64 key rows.
Scores are base 2; lse arrives base 2 with +inf on rows without keys (their p is 0). Selected
with MosaicTuning(backward="mosaic"); 128 x 128 blocks, 2-byte inputs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import pad_axis
from pallas_kernels.config import AttentionConfig
from pallas_kernels.masking import LOG2E, allowed_pairs
from pallas_kernels.mosaic_gpu import (ROWS, WarpgroupOps, drain, free_slot, interpret_params,
                                       mask_rows, ring_depth, stream_keys)

BLOCK = 128  # both block sizes: two warpgroups of 64 rows on either side


def unavailable(cfg: AttentionConfig) -> str | None:
    """Why the Mosaic backward cannot run this call's blocks; None when it can."""
    if (cfg.block_q, cfg.block_k) != (BLOCK, BLOCK):
        return (f"the Mosaic GPU backward runs {BLOCK} x {BLOCK} blocks, got "
                f"{cfg.block_q} x {cfg.block_k}")
    return None


# ----------------------------------------------------------------------------- dq

def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qc_ref, kc_ref, idx_ref, cnt_ref,
               dq_ref, q_smem, do_smem, ids_smem, stats_smem, k_smem, v_smem, kc_smem,
               row_bar, k_bar, v_bar, kc_bar, k_free, v_free, *, cfg: AttentionConfig,
               group: int, stages: int):
    bk, nq = cfg.block_k, cfg.num_q_blocks
    b, h = lax.axis_index("batch"), lax.axis_index("heads")
    i = nq - 1 - lax.axis_index("q_blocks")
    wg = lax.axis_index("wg")
    n_masked, n_total = cnt_ref[b, h, i, 0], cnt_ref[b, h, i, 1]
    ops = WarpgroupOps(cfg.interpret)
    row_vec = plgpu.Layout.WGMMA.reduce(1)
    c = cfg.scale * LOG2E

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        row0 = i * BLOCK + wg * ROWS
        rows = pl.ds(row0, ROWS)
        # this warpgroup's query rows: q, dO, ids, lse and delta (one barrier each)
        copies = ((q_ref.at[b, rows, h], q_smem.at[wg]), (do_ref.at[b, rows, h], do_smem.at[wg]),
                  (qc_ref.at[b, h, rows], ids_smem.at[wg]),
                  (lse_ref.at[b, h, rows], stats_smem.at[wg, 0]),
                  (delta_ref.at[b, h, rows], stats_smem.at[wg, 1]))
        for n, (src, dst) in enumerate(copies):
            plgpu.copy_gmem_to_smem(src, dst, row_bar.at[wg * 5 + n])
        for n in range(5):
            plgpu.barrier_wait(row_bar.at[wg * 5 + n])
        shape = (ROWS, bk)
        q_ids = lax.broadcast_in_dim(ops.load(ids_smem.at[wg], row_vec), shape, [0])
        lse = lax.broadcast_in_dim(ops.load(stats_smem.at[wg, 0], row_vec), shape, [0])
        delta = lax.broadcast_in_dim(ops.load(stats_smem.at[wg, 1], row_vec), shape, [0])
        q_pos = cfg.q_offset + row0 + ops.iota(shape, 0)
        q_tile, do_tile = q_smem.at[wg], do_smem.at[wg]

        def step(t, dq, masked):
            slot = lax.rem(t, stages)
            plgpu.barrier_wait(k_bar.at[slot])
            s = ops.scores(q_tile, k_smem.at[slot]) * c
            if masked:
                s = mask_rows(ops, cfg, s, kc_smem.at[slot], kc_bar.at[slot], q_pos, q_ids,
                              idx_ref[b, h, i, t] * bk)
            p = jnp.exp2(s - lse)
            plgpu.barrier_wait(v_bar.at[slot])
            dp = ops.scores(do_tile, v_smem.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            ds = p * (dp - delta)
            dq = ops.accumulate(dq, ds.astype(q_ref.dtype), k_smem.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            return dq

        dq = ops.cast(jnp.zeros((ROWS, q_smem.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)
        dq = lax.fori_loop(0, n_masked, functools.partial(step, masked=True), dq)
        dq = lax.fori_loop(n_masked, n_total, functools.partial(step, masked=False), dq)
        q_tile[...] = (dq * cfg.scale).astype(q_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[b, rows, h])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        total = stream_keys((k_ref, v_ref, kc_ref, idx_ref),
                            (k_smem, v_smem, kc_smem, k_bar, v_bar, kc_bar, k_free, v_free),
                            b=b, h=h, i=i, kvh=lax.div(h, group), n_masked=n_masked,
                            n_total=n_total, base=0, stages=stages, block_k=bk)
        drain(total, stages, k_free, v_free)


# ----------------------------------------------------------------------------- dk, dv

def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qc_ref, kc_ref, idx_ref,
                cnt_ref, dk_ref, dv_ref, k_smem, v_smem, kc_smem, q_smem, do_smem, ids_smem,
                stats_smem, key_bar, kc_bar, q_bar, do_bar, cols_bar, free, *,
                cfg: AttentionConfig,
                group: int, stages: int):
    bq = cfg.block_q
    b, kvh = lax.axis_index("batch"), lax.axis_index("kv_heads")
    j = lax.axis_index("k_blocks")
    wg = lax.axis_index("wg")
    ops = WarpgroupOps(cfg.interpret)
    row_vec, col_vec = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    c = cfg.scale * LOG2E

    def counts(hh):
        h = kvh * group + hh
        return h, cnt_ref[b, h, j, 0], cnt_ref[b, h, j, 1]

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        row0 = j * BLOCK + wg * ROWS
        rows = pl.ds(row0, ROWS)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh], k_smem.at[wg], key_bar.at[wg * 2])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], v_smem.at[wg], key_bar.at[wg * 2 + 1])
        plgpu.barrier_wait(key_bar.at[wg * 2])
        plgpu.barrier_wait(key_bar.at[wg * 2 + 1])
        shape = (ROWS, bq)  # key rows x query columns
        k_pos = row0 + ops.iota(shape, 0)
        q_off = cfg.q_offset + ops.iota(shape, 1)
        k_tile, v_tile = k_smem.at[wg], v_smem.at[wg]

        def head(hh, carry):
            dk, dv, base = carry
            h, n_masked, n_total = counts(hh)
            # this head's ids of the key rows (a query head's own routes)
            plgpu.copy_gmem_to_smem(kc_ref.at[b, h, rows], kc_smem.at[wg], kc_bar.at[wg])
            plgpu.barrier_wait(kc_bar.at[wg])
            k_ids = lax.broadcast_in_dim(ops.load(kc_smem.at[wg], row_vec), shape, [0])

            def step(t, carry, masked):
                dk, dv = carry
                slot = lax.rem(base + t, stages)
                plgpu.barrier_wait(q_bar.at[slot])
                plgpu.barrier_wait(cols_bar.at[slot * 3])
                s = ops.scores(k_tile, q_smem.at[slot]) * c  # [keys, queries]
                if masked:
                    plgpu.barrier_wait(cols_bar.at[slot * 3 + 2])
                    q_ids = lax.broadcast_in_dim(ops.load(ids_smem.at[slot], col_vec), shape,
                                                 [1])
                    ok = allowed_pairs(idx_ref[b, h, j, t] * bq + q_off, k_pos, q_ids, k_ids,
                                       window=cfg.window, sink_tokens=cfg.sink_tokens,
                                       kv_len=cfg.kv_len,
                                       exclude_same_cluster=cfg.exclude_same_cluster)
                    s = jnp.where(ok, s, -jnp.inf)
                lse = ops.load(stats_smem.at[slot, 0], col_vec)
                p = jnp.exp2(s - lax.broadcast_in_dim(lse, shape, [1]))
                plgpu.barrier_wait(do_bar.at[slot])
                dv = ops.accumulate(dv, p.astype(q_ref.dtype), do_smem.at[slot])
                dp = ops.scores(v_tile, do_smem.at[slot])
                plgpu.barrier_wait(cols_bar.at[slot * 3 + 1])
                delta = ops.load(stats_smem.at[slot, 1], col_vec)
                ds = p * (dp - lax.broadcast_in_dim(delta, shape, [1]))
                dk = ops.accumulate(dk, ds.astype(q_ref.dtype), q_smem.at[slot])
                plgpu.barrier_arrive(free.at[slot])
                return dk, dv

            carry = lax.fori_loop(0, n_masked, functools.partial(step, masked=True), (dk, dv))
            dk, dv = lax.fori_loop(n_masked, n_total, functools.partial(step, masked=False),
                                   carry)
            return dk, dv, base + n_total

        zeros = ops.cast(jnp.zeros((ROWS, k_smem.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)
        dk, dv, _ = lax.fori_loop(0, group, head, (zeros, zeros, jnp.int32(0)))
        k_tile[...] = (dk * cfg.scale).astype(k_ref.dtype)
        v_tile[...] = dv.astype(v_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[b, rows, kvh])
        plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[b, rows, kvh])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def head(hh, base):
            h, n_masked, n_total = counts(hh)

            def fetch(t, carry):
                g = base + t
                slot = lax.rem(g, stages)
                queries = pl.ds(idx_ref[b, h, j, t] * bq, bq)
                free_slot(g, stages, free)
                plgpu.copy_gmem_to_smem(q_ref.at[b, queries, h], q_smem.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, queries], stats_smem.at[slot, 0],
                                        cols_bar.at[slot * 3])
                plgpu.copy_gmem_to_smem(do_ref.at[b, queries, h], do_smem.at[slot],
                                        do_bar.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, queries], stats_smem.at[slot, 1],
                                        cols_bar.at[slot * 3 + 1])

                @pl.when(t < n_masked)
                def _():
                    plgpu.copy_gmem_to_smem(qc_ref.at[b, h, queries], ids_smem.at[slot],
                                            cols_bar.at[slot * 3 + 2])
                return carry

            lax.fori_loop(0, n_total, fetch, None)
            return base + n_total

        total = lax.fori_loop(0, group, head, jnp.int32(0))
        drain(total, stages, free)


# ----------------------------------------------------------------------------- launch

def backward(q, k, v, do, lse, delta, qc, kc, sched, cfg: AttentionConfig):
    """dq, dk, dv for padded inputs; lse natural-log with +inf on rows without keys."""
    reason = unavailable(cfg)
    if reason:
        raise ValueError(reason)
    d = q.shape[-1]
    dp = -(-d // ROWS) * ROWS
    q, k, v, do = (pad_axis(x, dp, axis=-1) for x in (q, k, v, do))
    batch, sqp, hq, _ = q.shape
    hkv = k.shape[2]
    group, nq, nk = hq // hkv, cfg.num_q_blocks, cfg.num_k_blocks
    item = q.dtype.itemsize
    lse2, delta = lse * LOG2E, delta.astype(jnp.float32)  # +inf stays +inf
    swizzled = (plgpu.TilingTransform((8, ROWS)), plgpu.SwizzleTransform(128))
    tile = functools.partial(plgpu.SMEM, dtype=q.dtype, transforms=swizzled)
    params = dict(num_threads=3, thread_name="wg",
                  compiler_params=plgpu.CompilerParams(approx_math=True),
                  interpret=interpret_params() if cfg.interpret else None)

    stages = ring_depth(cfg, 2 * BLOCK * dp * item + 3 * BLOCK * 4,   # q, dO, ids, lse, delta
                        2 * cfg.block_k * dp * item + cfg.block_k * 4, cfg.mosaic.stages)
    kv_counts = jnp.stack([sched.kv_num_masked, sched.kv_num_blocks], axis=-1)
    dq = plgpu.kernel(
        functools.partial(_dq_kernel, cfg=cfg, group=group, stages=stages),
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_types=[
            tile((2, ROWS, dp)), tile((2, ROWS, dp)), plgpu.SMEM((2, ROWS), jnp.int32),
            plgpu.SMEM((2, 2, ROWS), jnp.float32),
            tile((stages, cfg.block_k, dp)), tile((stages, cfg.block_k, dp)),
            plgpu.SMEM((stages, cfg.block_k), jnp.int32),
            plgpu.Barrier(num_barriers=10), plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages)],
        grid=(hq, nq, batch), grid_names=("heads", "q_blocks", "batch"), **params,
    )(q, k, v, do, lse2, delta, qc, kc, sched.kv_indices, kv_counts)

    stages = ring_depth(cfg, 2 * BLOCK * dp * item + BLOCK * 4,   # K, V, key ids
                        2 * cfg.block_q * dp * item + 3 * cfg.block_q * 4, cfg.mosaic.stages)
    q_counts = jnp.stack([sched.q_num_masked, sched.q_num_blocks], axis=-1)
    dk, dv = plgpu.kernel(
        functools.partial(_dkv_kernel, cfg=cfg, group=group, stages=stages),
        out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_types=[
            tile((2, ROWS, dp)), tile((2, ROWS, dp)), plgpu.SMEM((2, ROWS), jnp.int32),
            tile((stages, cfg.block_q, dp)), tile((stages, cfg.block_q, dp)),
            plgpu.SMEM((stages, cfg.block_q), jnp.int32),
            plgpu.SMEM((stages, 2, cfg.block_q), jnp.float32),
            plgpu.Barrier(num_barriers=4), plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=3 * stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages)],
        grid=(hkv, nk, batch), grid_names=("kv_heads", "k_blocks", "batch"), **params,
    )(q, k, v, do, lse2, delta, qc, kc, sched.q_indices, q_counts)
    return dq[..., :d], dk[..., :d], dv[..., :d]
