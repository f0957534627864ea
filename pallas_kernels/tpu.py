"""Block-sparse flash attention for TPUs: Pallas Mosaic kernels with the schedule prefetched
into SMEM (as in jax's splash attention).

The grid's last axis walks a block list; the index maps read the list, so the pipeline DMAs
exactly the scheduled key (or query) blocks, and list padding repeats the last block, which
costs no copy. Steps past the list's count do nothing; steps inside its masked prefix apply
the token mask. Arrays are moved to the head-major layout [B, heads, S, D] here.

interpret=True runs these kernels with Pallas' generic interpreter (a jitted scan over the
grid, scalar prefetch and VMEM scratch included); pltpu.InterpretParams, which simulates the
TPU's memories step by step through host callbacks, is about 100x slower on these grids.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import NT, TN, dot
from pallas_kernels.config import AttentionConfig
from pallas_kernels.masking import mask_scores, safe_max


def _masked(cfg, s, q_start, k_start, q_ids, k_ids):
    """Applies the token mask to a [bq, bk] score tile (2-D iotas: Mosaic wants no 1-D ones)."""
    q_pos = cfg.q_offset + q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    return mask_scores(cfg, s, q_pos, k_pos, q_ids, k_ids)


def _run_entry(t, cnt, body):
    """Calls body(masked) when list entry t is visited."""
    pl.when(t < cnt[0])(lambda: body(True))
    pl.when((t >= cnt[0]) & (t < cnt[1]))(lambda: body(False))


def _params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


# ----------------------------------------------------------------------------- forward

def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, qc_ref, kc_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, cfg: AttentionConfig):
    b, h, i, t = (pl.program_id(a) for a in range(4))

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def body(masked):
        s = dot(q_ref[...], k_ref[...], NT) * cfg.scale
        if masked:
            s = _masked(cfg, s, i * cfg.block_q, idx_ref[b, h, i, t] * cfg.block_k,
                        qc_ref[...], kc_ref[...])
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_use = safe_max(m_new) if masked else m_new
        alpha = jnp.exp(m_prev - m_use)
        p = jnp.exp(s - m_use)
        l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = acc_sc[...] * alpha + dot(p.astype(v_ref.dtype), v_ref[...])
        m_sc[...] = m_new

    _run_entry(t, (cnt_ref[b, h, i, 0], cnt_ref[b, h, i, 1]), body)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0  # no allowed key: output 0, LSE -inf
        o_ref[...] = (acc_sc[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_sc[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _head_major(q, k, v, qc, kc):
    return (q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
            qc[..., None], kc[..., None, :])


def _query_block_maps(group):
    """Index maps of a grid over (batch, query head, query block, scheduled entry): the query
    block itself, the scheduled key block of the head's kv head, and that block's cluster ids."""

    def rows(b, h, i, t, idx, cnt):
        return b, h, i, 0

    def keys(b, h, i, t, idx, cnt):
        return b, h // group, idx[b, h, i, t], 0

    def key_ids(b, h, i, t, idx, cnt):
        return b, h, 0, idx[b, h, i, t]

    return rows, keys, key_ids


def forward(q, k, v, qc, kc, sched, cfg: AttentionConfig):
    """out [B, Sqp, Hq, D] (q.dtype), lse [B, Hq, Sqp] float32 (natural log)."""
    batch, sqp, hq, d = q.shape
    group = hq // k.shape[2]
    bq, bk, nq, nk = cfg.block_q, cfg.block_k, cfg.num_q_blocks, cfg.num_k_blocks
    q, k, v, qc, kc = _head_major(q, k, v, qc, kc)
    counts = jnp.stack([sched.kv_num_masked, sched.kv_num_blocks], axis=-1)

    rows, keys, key_ids = _query_block_maps(group)

    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, hq, nq, nk),
            in_specs=[pl.BlockSpec((None, None, bq, d), rows),
                      pl.BlockSpec((None, None, bk, d), keys),
                      pl.BlockSpec((None, None, bk, d), keys),
                      pl.BlockSpec((None, None, bq, 1), rows),
                      pl.BlockSpec((None, None, 1, bk), key_ids)],
            out_specs=[pl.BlockSpec((None, None, bq, d), rows),
                       pl.BlockSpec((None, None, bq, 1), rows)],
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((batch, hq, sqp, d), q.dtype),
                   jax.ShapeDtypeStruct((batch, hq, sqp, 1), jnp.float32)],
        compiler_params=_params(),
        interpret=cfg.interpret,
        name="block_sparse_attention_fwd",
    )(sched.kv_indices, counts, q, k, v, qc, kc)
    return out.transpose(0, 2, 1, 3), lse[..., 0]


# ----------------------------------------------------------------------------- backward

def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qc_ref,
               kc_ref, dq_ref, dq_sc, *, cfg: AttentionConfig):
    b, h, i, t = (pl.program_id(a) for a in range(4))

    @pl.when(t == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def body(masked):
        k = k_ref[...]
        s = dot(q_ref[...], k, NT) * cfg.scale
        if masked:
            s = _masked(cfg, s, i * cfg.block_q, idx_ref[b, h, i, t] * cfg.block_k,
                        qc_ref[...], kc_ref[...])
        p = jnp.exp(s - lse_ref[...])
        ds = p * (dot(do_ref[...], v_ref[...], NT) - delta_ref[...])
        dq_sc[...] += dot(ds.astype(k.dtype), k)

    _run_entry(t, (cnt_ref[b, h, i, 0], cnt_ref[b, h, i, 1]), body)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dq_sc_val = dq_sc[...] * cfg.scale
        dq_ref[...] = dq_sc_val.astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qc_ref,
                kc_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, cfg: AttentionConfig, group: int):
    b, g, j, t = (pl.program_id(a) for a in range(4))
    nq = cfg.num_q_blocks
    h, e = g * group + t // nq, t % nq  # query head of the group, entry of its list

    @pl.when(t == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def body(masked):
        q, do = q_ref[...], do_ref[...]
        s = dot(q, k_ref[...], NT) * cfg.scale                        # [bq, bk]
        if masked:
            s = _masked(cfg, s, idx_ref[b, h, j, e] * cfg.block_q, j * cfg.block_k,
                        qc_ref[...], kc_ref[...])
        p = jnp.exp(s - lse_ref[...])
        dv_sc[...] += dot(p.astype(do.dtype), do, TN)
        ds = p * (dot(do, v_ref[...], NT) - delta_ref[...])
        dk_sc[...] += dot(ds.astype(q.dtype), q, TN)

    _run_entry(e, (cnt_ref[b, h, j, 0], cnt_ref[b, h, j, 1]), body)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward_in_specs(q_map, kv_map, key_ids_map, bq, bk, d):
    """Blocks of (q, k, v, do, lse, delta, q cluster ids, k cluster ids) for a backward pass
    whose grid visits query blocks through q_map and key blocks through kv_map."""
    return [pl.BlockSpec((None, None, bq, d), q_map),
            pl.BlockSpec((None, None, bk, d), kv_map),
            pl.BlockSpec((None, None, bk, d), kv_map),
            pl.BlockSpec((None, None, bq, d), q_map),
            pl.BlockSpec((None, None, bq, 1), q_map),
            pl.BlockSpec((None, None, bq, 1), q_map),
            pl.BlockSpec((None, None, bq, 1), q_map),
            pl.BlockSpec((None, None, 1, bk), key_ids_map)]


def backward(q, k, v, do, lse, delta, qc, kc, sched, cfg: AttentionConfig):
    """dq, dk, dv for padded inputs; lse is the natural-log LSE (+inf on rows without keys)."""
    batch, sqp, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    bq, bk, nq, nk = cfg.block_q, cfg.block_k, cfg.num_q_blocks, cfg.num_k_blocks
    q, k, v, qc, kc = _head_major(q, k, v, qc, kc)
    do = do.transpose(0, 2, 1, 3)
    lse = lse[..., None]
    delta = delta[..., None]
    kv_counts = jnp.stack([sched.kv_num_masked, sched.kv_num_blocks], axis=-1)
    q_counts = jnp.stack([sched.q_num_masked, sched.q_num_blocks], axis=-1)

    rows, keys, key_ids = _query_block_maps(group)

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, hq, nq, nk),
            in_specs=_backward_in_specs(rows, keys, key_ids, bq, bk, d),
            out_specs=pl.BlockSpec((None, None, bq, d), rows),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((batch, hq, sqp, d), q.dtype),
        compiler_params=_params(),
        interpret=cfg.interpret,
        name="block_sparse_attention_dq",
    )(sched.kv_indices, kv_counts, q, k, v, do, lse, delta, qc, kc)

    def q_rows(b, g, j, t, idx, cnt):
        h = g * group + t // nq
        return b, h, idx[b, h, j, t % nq], 0

    def own_keys(b, g, j, t, idx, cnt):
        return b, g, j, 0

    def own_key_ids(b, g, j, t, idx, cnt):
        return b, g * group + t // nq, 0, j

    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, group=group),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, hkv, nk, group * nq),
            in_specs=_backward_in_specs(q_rows, own_keys, own_key_ids, bq, bk, d),
            out_specs=[pl.BlockSpec((None, None, bk, d), own_keys),
                       pl.BlockSpec((None, None, bk, d), own_keys)],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((batch, hkv, k.shape[2], d), k.dtype),
                   jax.ShapeDtypeStruct((batch, hkv, k.shape[2], d), v.dtype)],
        compiler_params=_params(),
        interpret=cfg.interpret,
        name="block_sparse_attention_dkv",
    )(sched.q_indices, q_counts, q, k, v, do, lse, delta, qc, kc)
    back = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))
    return back(dq), back(dk), back(dv)
