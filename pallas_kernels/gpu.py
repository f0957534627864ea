"""Block-sparse flash attention for GPUs: Pallas kernels lowered through Triton.

Inputs arrive padded to whole blocks (ops.py) in the [B, S, heads, D] layout; the head dim is
padded here to a power of two >= 16 (what Triton's dot needs). One program handles one query
block (forward, dq) or one key sub-tile (dk/dv, all query heads of its kv head in turn) and
loops over the blocks its schedule lists: first those needing the token mask, then the full
ones without it. Scores live in base 2 (exp2); the LSE leaves in natural log.
"""
from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import NT, dot, pad_axis
from pallas_kernels.config import AttentionConfig
from pallas_kernels.masking import LOG2E, mask_scores, safe_max

# jax >= 0.11 warns at every lowering that the Triton backend of Pallas is deprecated; this
# module chooses it on purpose (it runs on every CUDA GPU from sm80 on).
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*",
                        category=DeprecationWarning)


def _two_loops(cnt_ref, step, carry, *idx):
    """Runs step over the masked list entries, then over the full ones."""
    masked, total = cnt_ref[(*idx, 0)], cnt_ref[(*idx, 1)]
    carry = lax.fori_loop(0, masked, functools.partial(step, masked=True), carry)
    return lax.fori_loop(masked, total, functools.partial(step, masked=False), carry)


# ----------------------------------------------------------------------------- forward

def _fwd_kernel(q_ref, k_ref, v_ref, qc_ref, kc_ref, idx_ref, cnt_ref, o_ref, lse_ref, *,
                cfg: AttentionConfig, tk: int):
    bq, bk = cfg.block_q, cfg.block_k
    i = cfg.num_q_blocks - 1 - pl.program_id(0)  # the longest rows (last blocks) start first
    q = q_ref[...]
    q_ids = qc_ref[...][:, None]
    q_pos = (cfg.q_offset + i * bq + jnp.arange(bq))[:, None]
    c = cfg.scale * LOG2E

    def step(t, carry, masked):
        m, l, acc = carry
        for r in range(bk // tk):
            ks = pl.multiple_of(idx_ref[t] * bk + r * tk, tk)
            s = dot(q, k_ref[pl.ds(ks, tk), :], NT) * c
            if masked:
                s = mask_scores(cfg, s, q_pos, (ks + jnp.arange(tk))[None, :], q_ids,
                                kc_ref[pl.ds(ks, tk)][None, :])
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            m_use = safe_max(m_new) if masked else m_new
            alpha = jnp.exp2(m - m_use)
            p = jnp.exp2(s - m_use[:, None])
            v = v_ref[pl.ds(ks, tk), :]
            acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
            m, l = m_new, l * alpha + jnp.sum(p, axis=1)
        return m, l, acc

    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, l, acc = _two_loops(cnt_ref, step, init)
    empty = l == 0.0  # no allowed key: output 0, LSE -inf
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) / LOG2E)


def _pad_head_dim(*xs):
    dp = max(16, pl.next_power_of_2(xs[0].shape[-1]))
    return tuple(pad_axis(x, dp, axis=-1) for x in xs)


def forward(q, k, v, qc, kc, sched, cfg: AttentionConfig):
    """out [B, Sqp, Hq, D] (q.dtype), lse [B, Hq, Sqp] float32 (natural log)."""
    d = q.shape[-1]
    q, k, v = _pad_head_dim(q, k, v)
    batch, sqp, hq, dp = q.shape
    skp, hkv = k.shape[1], k.shape[2]
    group, nq, nk, bq = hq // hkv, cfg.num_q_blocks, cfg.num_k_blocks, cfg.block_q
    counts = jnp.stack([sched.kv_num_masked, sched.kv_num_blocks], axis=-1)

    def qmap(p, bh):
        return bh // hq, nq - 1 - p, bh % hq, 0

    def kvmap(p, bh):
        return bh // hq, 0, (bh % hq) // group, 0

    def idmap(p, bh):
        return bh // hq, bh % hq, nq - 1 - p, 0

    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, tk=min(cfg.gpu.fwd_tile_k, cfg.block_k)),
        grid=(nq, batch * hq),
        in_specs=[
            pl.BlockSpec((None, bq, None, dp), qmap),
            pl.BlockSpec((None, skp, None, dp), kvmap),
            pl.BlockSpec((None, skp, None, dp), kvmap),
            pl.BlockSpec((None, None, bq), lambda p, bh: (bh // hq, bh % hq, nq - 1 - p)),
            pl.BlockSpec((None, None, skp), lambda p, bh: (bh // hq, bh % hq, 0)),
            pl.BlockSpec((None, None, None, nk), idmap),
            pl.BlockSpec((None, None, None, 2), idmap),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, dp), qmap),
            pl.BlockSpec((None, None, bq), lambda p, bh: (bh // hq, bh % hq, nq - 1 - p)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, hq, sqp), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=cfg.gpu.fwd_warps,
                                                num_stages=cfg.gpu.fwd_stages),
        interpret=cfg.interpret,
        name="block_sparse_attention_fwd",
    )(q, k, v, qc, kc, sched.kv_indices, counts)
    return out[..., :d], lse


# ----------------------------------------------------------------------------- backward

def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qc_ref, kc_ref, idx_ref,
               cnt_ref, dq_ref, *, cfg: AttentionConfig, tq: int, tk: int):
    bk = cfg.block_k
    sub = pl.num_programs(0) - 1 - pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse2, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_ids = qc_ref[...][:, None]
    q_pos = (cfg.q_offset + sub * tq + jnp.arange(tq))[:, None]
    c = cfg.scale * LOG2E

    def step(t, dq, masked):
        for r in range(bk // tk):
            ks = pl.multiple_of(idx_ref[t] * bk + r * tk, tk)
            k, v = k_ref[pl.ds(ks, tk), :], v_ref[pl.ds(ks, tk), :]
            s = dot(q, k, NT) * c
            if masked:
                s = mask_scores(cfg, s, q_pos, (ks + jnp.arange(tk))[None, :], q_ids,
                                kc_ref[pl.ds(ks, tk)][None, :])
            p = jnp.exp2(s - lse2)
            ds = p * (dot(do, v, NT) - delta)
            dq = dq + dot(ds.astype(k.dtype), k)
        return dq

    dq = _two_loops(cnt_ref, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qc_ref, kc_ref, idx_ref,
                cnt_ref, dk_ref, dv_ref, *, cfg: AttentionConfig, tq: int, tk: int, group: int):
    bq = cfg.block_q
    sub = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    k_pos = (sub * tk + jnp.arange(tk))[:, None]
    c = cfg.scale * LOG2E

    def head(hh, carry):
        k_ids = kc_ref[hh, :][:, None]

        def step(t, carry, masked):
            dk, dv = carry
            for r in range(bq // tq):
                qs = pl.multiple_of(idx_ref[hh, t] * bq + r * tq, tq)
                q, do = q_ref[pl.ds(qs, tq), hh, :], do_ref[pl.ds(qs, tq), hh, :]
                s = dot(k, q, NT) * c                                     # [tk, tq]
                if masked:
                    q_pos = (cfg.q_offset + qs + jnp.arange(tq))[None, :]
                    s = mask_scores(cfg, s, q_pos, k_pos, qc_ref[hh, pl.ds(qs, tq)][None, :],
                                    k_ids)
                p = jnp.exp2(s - lse_ref[hh, pl.ds(qs, tq)][None, :])
                dv = dv + dot(p.astype(do.dtype), do)
                ds = p * (dot(v, do, NT) - delta_ref[hh, pl.ds(qs, tq)][None, :])
                dk = dk + dot(ds.astype(q.dtype), q)
            return dk, dv

        return _two_loops(cnt_ref, step, carry, hh)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, do, lse, delta, qc, kc, sched, cfg: AttentionConfig):
    """dq, dk, dv for padded inputs. lse [B, Hq, Sqp] is the natural-log LSE with +inf on rows
    without keys (so their probabilities are 0); delta = rowsum(out * dout) - dlse."""
    d = q.shape[-1]
    lse2 = lse * LOG2E  # the kernels' scores are in base 2; +inf stays +inf
    q, k, v, do = _pad_head_dim(q, k, v, do)
    batch, sqp, hq, dp = q.shape
    skp, hkv = k.shape[1], k.shape[2]
    group, nq, nk = hq // hkv, cfg.num_q_blocks, cfg.num_k_blocks
    t = cfg.gpu
    tq, tk = min(t.dq_tile_q, cfg.block_q), min(t.dq_tile_k, cfg.block_k)
    nsub, per_block = sqp // tq, cfg.block_q // tq
    kv_counts = jnp.stack([sched.kv_num_masked, sched.kv_num_blocks], axis=-1)
    q_counts = jnp.stack([sched.q_num_masked, sched.q_num_blocks], axis=-1)

    def rows(p, bh):
        return bh // hq, bh % hq, nsub - 1 - p

    def full_seq(p, bh):
        return bh // hq, 0, (bh % hq) // group, 0

    def sched_row(p, bh):
        return bh // hq, bh % hq, (nsub - 1 - p) // per_block, 0

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, tq=tq, tk=tk),
        grid=(nsub, batch * hq),
        in_specs=[
            pl.BlockSpec((None, tq, None, dp), lambda p, bh: (bh // hq, nsub - 1 - p, bh % hq, 0)),
            pl.BlockSpec((None, skp, None, dp), full_seq),
            pl.BlockSpec((None, skp, None, dp), full_seq),
            pl.BlockSpec((None, tq, None, dp), lambda p, bh: (bh // hq, nsub - 1 - p, bh % hq, 0)),
            pl.BlockSpec((None, None, tq), rows),
            pl.BlockSpec((None, None, tq), rows),
            pl.BlockSpec((None, None, tq), rows),
            pl.BlockSpec((None, None, skp), lambda p, bh: (bh // hq, bh % hq, 0)),
            pl.BlockSpec((None, None, None, nk), sched_row),
            pl.BlockSpec((None, None, None, 2), sched_row),
        ],
        out_specs=pl.BlockSpec((None, tq, None, dp),
                               lambda p, bh: (bh // hq, nsub - 1 - p, bh % hq, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=t.dq_warps, num_stages=t.dq_stages),
        interpret=cfg.interpret,
        name="block_sparse_attention_dq",
    )(q, k, v, do, lse2, delta, qc, kc, sched.kv_indices, kv_counts)

    tq, tk = min(t.dkv_tile_q, cfg.block_q), min(t.dkv_tile_k, cfg.block_k)
    nsub, per_block = skp // tk, cfg.block_k // tk

    def group_seq(p, bg):
        return bg // hkv, 0, bg % hkv, 0

    def group_rows(p, bg):
        return bg // hkv, bg % hkv, 0

    def own_keys(p, bg):
        return bg // hkv, p, bg % hkv, 0

    def group_sched(p, bg):
        return bg // hkv, bg % hkv, p // per_block, 0

    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, tq=tq, tk=tk, group=group),
        grid=(nsub, batch * hkv),
        in_specs=[
            pl.BlockSpec((None, sqp, group, dp), group_seq),
            pl.BlockSpec((None, tk, None, dp), own_keys),
            pl.BlockSpec((None, tk, None, dp), own_keys),
            pl.BlockSpec((None, sqp, group, dp), group_seq),
            pl.BlockSpec((None, group, sqp), group_rows),
            pl.BlockSpec((None, group, sqp), group_rows),
            pl.BlockSpec((None, group, sqp), group_rows),
            pl.BlockSpec((None, group, tk), lambda p, bg: (bg // hkv, bg % hkv, p)),
            pl.BlockSpec((None, group, None, nq), group_sched),
            pl.BlockSpec((None, group, None, 2), group_sched),
        ],
        out_specs=[pl.BlockSpec((None, tk, None, dp), own_keys),
                   pl.BlockSpec((None, tk, None, dp), own_keys)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltriton.CompilerParams(num_warps=t.dkv_warps, num_stages=t.dkv_stages),
        interpret=cfg.interpret,
        name="block_sparse_attention_dkv",
    )(q, k, v, do, lse2, delta, qc, kc, sched.q_indices, q_counts)
    return dq[..., :d], dk[..., :d], dv[..., :d]
