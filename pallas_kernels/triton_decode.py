"""decode_attention's Triton kernel: split-K decoding (flash-decoding) over the read plan.

One decode step reads, per (batch, query head), the R key positions of its read plan
(decode.decode_read_plan: its cluster's pages, the sink, the window). The jnp path gathers
them into [B, Hq, R, D] arrays first; this kernel reads the rows where they lie instead.
Program (b * Hq + h, split) owns a contiguous slice of the slots, walks it BLOCK_R slots at
a time, gathers those key and value rows of kv head h // (Hq / Hkv) straight from the cache
([B, S_max, Hkv, D], the cache's dtype) by pointer arithmetic, and keeps an online softmax in
float32 (base 2). Slots without a key carry position -1 and are masked (no load). The plan's
pages are bucketed (a power of two of them, the largest cluster's over batch and heads): the
slots past the row's own cluster count are skipped, and the splits share the rest evenly.

Each split writes its partial (out [B, Hq, SPLITS, D] float32 normalised over its own keys,
lse [B, Hq, SPLITS] natural log, -inf for a split without a key); merge() combines them by
log-sum-exp. A decode step has one query row per (batch, head), too few programs to fill a
GPU: the splits supply the rest (choose_splits).

Compiled through jax_triton on a GPU; with interpret=True in triton's interpreter on CPU
(triton_backend.call_launch, which needs TRITON_INTERPRET=1 before triton's first import).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from pallas_kernels.common import cdiv
from pallas_kernels.masking import LOG2E, safe_max
from pallas_kernels.triton_backend import Launch, call_launch

BLOCK_R = 64        # plan slots per loop step (key rows gathered at once)
MIN_PROGRAMS = 264  # two programs per SM of an H100 / H200 (132 SMs)
NUM_WARPS = 4
NUM_STAGES = 2


@triton.jit
def decode_kernel(Q, K, V, POS, USED, O, LSE, HQ: tl.constexpr, GROUP: tl.constexpr,
                  S: tl.constexpr, R: tl.constexpr, PREFIX: tl.constexpr, D: tl.constexpr,
                  BD: tl.constexpr, BLOCK_R: tl.constexpr, SPLITS: tl.constexpr,
                  C: tl.constexpr):
    """Q [B, HQ, D]; K, V [B, S, HKV, D]; POS [B, HQ, R] int32 (-1: no key), of which the
    first PREFIX slots are used up to USED [B, HQ] int32 (the cluster's pages past its last
    token are skipped, not walked); O [B, HQ, SPLITS, D] float32; LSE [B, HQ, SPLITS] float32.
    C = scale * log2(e)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    HKV: tl.constexpr = HQ // GROUP
    ROW: tl.constexpr = HKV * D  # elements between consecutive positions of one kv head
    cols = tl.arange(0, BD)
    d_ok = cols < D
    q = tl.load(Q + bh.to(tl.int64) * D + cols, mask=d_ok, other=0.0).to(tl.float32)
    kv_off = b.to(tl.int64) * (S * ROW) + (h // GROUP) * D
    k_ptr = K + kv_off
    v_ptr = V + kv_off
    pos_ptr = POS + bh.to(tl.int64) * R
    # The used slots: USED of the prefix, then all R - PREFIX others, split evenly.
    used = tl.load(USED + bh)
    total = used + (R - PREFIX)
    per = tl.cdiv(total, SPLITS)
    start = split * per
    stop = tl.minimum(start + per, total)
    acc = tl.zeros((BD,), tl.float32)
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.full((), 0.0, tl.float32)
    for first in range(start, stop, BLOCK_R):
        slots = first + tl.arange(0, BLOCK_R)
        index = tl.where(slots < used, slots, slots - used + PREFIX)
        pos = tl.load(pos_ptr + index, mask=slots < stop, other=-1)
        ok = pos >= 0
        at = pos.to(tl.int64)[:, None] * ROW + cols[None, :]
        tile_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + at, mask=tile_ok, other=0.0).to(tl.float32)
        s = tl.where(ok, tl.sum(k * q[None, :], 1) * C, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: exp2(-inf) = 0
        alpha = tl.math.exp2(m - m_use)
        p = tl.math.exp2(s - m_use)
        v = tl.load(v_ptr + at, mask=tile_ok, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        l = l * alpha + tl.sum(p, 0)
        m = m_new
    empty = l == 0.0  # a split without a key (past the used slots, or only masked ones)
    out = acc / tl.where(empty, 1.0, l)
    part = bh.to(tl.int64) * SPLITS + split
    tl.store(O + part * D + cols, out, mask=d_ok)
    lse = tl.where(empty, float("-inf"), (m + tl.math.log2(tl.where(empty, 1.0, l)))
                   * 0.6931471805599453)
    tl.store(LSE + part, lse)


def choose_splits(programs: int, slots: int, block_r: int = BLOCK_R,
                  min_programs: int = MIN_PROGRAMS) -> int:
    """Splits per (batch, head): enough that programs * splits >= min_programs, none
    shorter than block_r slots."""
    return max(1, min(cdiv(slots, block_r), cdiv(min_programs, programs)))


def decode_launch(q_shape, k_shape, slots: int, *, scale: float, splits: int, block_r: int,
                  prefix: int = 0, num_warps: int = NUM_WARPS,
                  num_stages: int = NUM_STAGES) -> Launch:
    """The launch for q [B, Hq, D], k [B, S, Hkv, D] and a plan of `slots` slots (the first
    `prefix` used up to a per-row count) in `splits` parts (parts past the used slots write
    empty partials)."""
    batch, hq, d = q_shape
    _, s_max, hkv, _ = k_shape
    if block_r < 1 or block_r & (block_r - 1):
        raise ValueError(f"block_r must be a positive power of two, got {block_r}")
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if not 0 <= prefix <= slots:
        raise ValueError(f"prefix must lie in [0, {slots}], got {prefix}")
    meta = dict(HQ=hq, GROUP=hq // hkv, S=s_max, R=slots, PREFIX=prefix, D=d,
                BD=max(16, 1 << (d - 1).bit_length()), BLOCK_R=block_r, SPLITS=splits,
                C=scale * LOG2E)
    out_shapes = (jax.ShapeDtypeStruct((batch, hq, splits, d), jnp.float32),
                  jax.ShapeDtypeStruct((batch, hq, splits), jnp.float32))
    return Launch(decode_kernel, (batch * hq, splits), out_shapes, meta, num_warps, num_stages,
                  "route_decode_attention")


def merge(out, lse):
    """Split partials out [..., SPLITS, D], lse [..., SPLITS] -> [..., D] by log-sum-exp
    (splits with lse -inf weigh 0; a row without any key gives 0)."""
    m = safe_max(jnp.max(lse, axis=-1, keepdims=True))
    w = jnp.exp(lse - m)
    total = jnp.sum(w, axis=-1)
    merged = jnp.einsum("...s,...sd->...d", w, out, precision=jax.lax.Precision.HIGHEST)
    return merged / jnp.where(total == 0, 1.0, total)[..., None]


def decode_attention_triton(q, k, v, positions, *, scale: float, prefix: int = 0,
                            used=None, interpret: bool = False, splits: int | None = None,
                            block_r: int = BLOCK_R, num_warps: int = NUM_WARPS,
                            num_stages: int = NUM_STAGES):
    """q [B, 1, Hq, D], k, v [B, S, Hkv, D] and positions [B, Hq, R] int32 (-1: no key) ->
    attention [B, 1, Hq, D] in q's dtype. Of the first `prefix` slots only the first
    used [B, Hq] (int32, default all) are read: decode_attention's cluster pages, whose
    slots past the cluster's count hold no key."""
    batch, _, hq, d = q.shape
    slots = positions.shape[-1]
    if used is None:
        used = jnp.full((batch, hq), prefix, jnp.int32)
    if splits is None:
        splits = choose_splits(batch * hq, slots, block_r)
    launch = decode_launch((batch, hq, d), k.shape, slots, scale=scale, splits=splits,
                           block_r=block_r, prefix=prefix, num_warps=num_warps,
                           num_stages=num_stages)
    out, lse = call_launch(launch, interpret, q[:, 0], k, v, positions.astype(jnp.int32),
                           jnp.minimum(used, prefix).astype(jnp.int32))
    return merge(out, lse)[:, None].astype(q.dtype)


# True when triton was imported with TRITON_INTERPRET=1 (the kernel can only be interpreted).
INTERPRETED = not isinstance(decode_kernel, triton.runtime.JITFunction)
