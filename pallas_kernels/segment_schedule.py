"""Block schedules in closed form for the two passes of routed attention (routed.py).

segment_schedule: self-attention on ids in which every cluster is one contiguous segment (the
cluster-sorted layout), window = sink = 0. A pair is allowed when key t' <= query t and both lie
in one segment, so query block i (rows r0..r1) visits exactly the contiguous key blocks from the
one holding the start of r0's segment up to its diagonal block r1 // block_k: every block of
that range holds an allowed pair (keys before r0 are in r0's segment; a key k in r0..r1 pairs
with query k itself), and none outside does. Transposed, key block j (keys k0..k1) is visited by
the query blocks from k0 // block_q up to the one holding the end of k1's segment. A block is
full when it lies below the diagonal (k1 <= r0) and rows and keys share one segment
(start of r1's segment <= k0), which again is a contiguous range on each side. Work: one pass
over the ids for segment starts and ends, O(1) per list entry.

band_schedule: the window and sink blocks of natural-order self-attention, the same for every
(batch, head); every block is listed as masked (the pass runs the "other cluster" token mask).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import cdiv
from pallas_kernels.schedule import BlockSchedule, _compact, _run_starts
from pallas_kernels.validation import check_block_size


def _run_ends(ids):
    """Index where the run of equal consecutive ids containing each position ends."""
    n = ids.shape[0]
    return n - 1 - _run_starts(ids[::-1])[::-1]


def _range_lists(lo, hi, f_lo, f_hi, n):
    """Block lists [..., n] for visited ranges [lo, hi] holding full ranges [f_lo, f_hi] (empty
    when f_lo > f_hi): the masked entries lo..f_lo-1 and f_hi+1..hi first, then the full ones;
    entries past the count repeat the last. Returns (indices, count, masked_count)."""
    n_full = jnp.maximum(f_hi - f_lo + 1, 0)
    f_lo = jnp.where(n_full > 0, f_lo, hi + 1)   # no full block: one masked run lo..hi
    f_hi = jnp.where(n_full > 0, f_hi, hi)
    before, n_masked = f_lo - lo, (f_lo - lo) + (hi - f_hi)
    count = n_masked + n_full
    t = jnp.arange(n, dtype=jnp.int32)
    t = jnp.minimum(t, (count - 1)[..., None])  # padding repeats the last entry
    before, n_masked, lo, f_lo, f_hi = (x[..., None] for x in (before, n_masked, lo, f_lo, f_hi))
    idx = jnp.where(t < before, lo + t,
                    jnp.where(t < n_masked, f_hi + 1 + t - before, f_lo + t - n_masked))
    return idx.astype(jnp.int32), count.astype(jnp.int32), n_masked[..., 0].astype(jnp.int32)


def _segment_ranges(ids, bq, bk):
    """Per head of sorted ids [S]: (rows, cols), each (lo, hi, f_lo, f_hi) block ranges."""
    seq = ids.shape[0]
    nq, nk = cdiv(seq, bq), cdiv(seq, bk)
    start, end = _run_starts(ids), _run_ends(ids)

    i = jnp.arange(nq, dtype=jnp.int32)
    r0, r1 = i * bq, jnp.minimum((i + 1) * bq, seq) - 1
    rows = (start[r0] // bk, r1 // bk,
            cdiv(start[r1], bk),                                 # keys from r1's segment start
            jnp.minimum((r0 + 1) // bk, seq // bk) - 1)          # whole key blocks up to r0

    j = jnp.arange(nk, dtype=jnp.int32)
    k0, k1 = j * bk, (j + 1) * bk - 1                            # k1 < seq for whole blocks
    whole = k1 < seq
    seg_end = end[k0]
    f_hi = jnp.where(seg_end == seq - 1, nq - 1, (seg_end + 1) // bq - 1)
    cols = (k0 // bq, end[jnp.minimum(k1, seq - 1)] // bq,
            cdiv(k1, bq),                                        # rows from k1 on
            jnp.where(whole, f_hi, -1))                          # rows inside k0's segment
    return rows, cols


def segment_starts(sorted_ids):
    """[B, H, S] int32: the slot where each slot's segment (run of equal ids) begins."""
    return jax.vmap(jax.vmap(_run_starts))(sorted_ids)


def segment_schedule(sorted_ids, *, block_q: int = 128, block_k: int = 128) -> BlockSchedule:
    """Self-attention schedule (window = sink = 0, q_offset = 0) for ids [B, H, S] in which
    equal ids are contiguous, e.g. cluster ids after a stable argsort. Equal to
    build_schedule(sorted_ids, sorted_ids, window=0, sink_tokens=0) without its general work."""
    if sorted_ids.ndim != 3 or not jnp.issubdtype(sorted_ids.dtype, jnp.integer):
        raise ValueError("sorted_ids must be integer ids [B, H, S], got "
                         f"{sorted_ids.dtype} {tuple(sorted_ids.shape)}")
    bq = check_block_size("block_q", block_q, power_of_two=False)
    bk = check_block_size("block_k", block_k, power_of_two=False)
    seq = sorted_ids.shape[-1]
    nq, nk = cdiv(seq, bq), cdiv(seq, bk)
    rows, cols = jax.vmap(jax.vmap(lambda ids: _segment_ranges(ids, bq, bk)))(sorted_ids)
    kv_indices, kv_num, kv_masked = _range_lists(*rows, nk)
    q_indices, q_num, q_masked = _range_lists(*cols, nq)
    r1 = jnp.minimum((jnp.arange(nq) + 1) * bq, seq) - 1
    causal = jnp.sum(r1 // bk + 1) * sorted_ids.shape[0] * sorted_ids.shape[1]
    density = (jnp.sum(kv_num) / jnp.maximum(causal, 1)).astype(jnp.float32)
    return BlockSchedule(kv_indices, kv_num, kv_masked, q_indices, q_num, q_masked, density)


def band_schedule(batch: int, heads: int, seq: int, *, window: int, sink_tokens: int,
                  block_q: int = 128, block_k: int = 128) -> BlockSchedule:
    """Natural-order self-attention schedule of the window and sink blocks: query block i visits
    the key blocks holding keys r0 - window + 1 .. r1 and 0 .. sink_tokens - 1 (causal ones).
    All blocks are masked; the lists are [nq, nk] work, shared by every (batch, head)."""
    bq = check_block_size("block_q", block_q, power_of_two=False)
    bk = check_block_size("block_k", block_k, power_of_two=False)
    nq, nk = cdiv(seq, bq), cdiv(seq, bk)
    # Static shapes only: computed once while tracing (constants of [nq, nk]), not per call.
    with jax.ensure_compile_time_eval():
        i = jnp.arange(nq)[:, None]
        j = jnp.arange(nk)[None, :]
        r0, r1 = i * bq, jnp.minimum((i + 1) * bq, seq) - 1
        k0, k1 = j * bk, jnp.minimum((j + 1) * bk, seq) - 1
        causal = k0 <= r1
        in_window = (window > 0) & (k1 >= r0 - window + 1)
        in_sink = k0 < sink_tokens
        visited = causal & (in_window | in_sink)
        none = jnp.zeros_like(visited)
        kv_indices, kv_num, kv_masked = _compact(visited, none)
        q_indices, q_num, q_masked = _compact(visited.T, none.T)
        density = (jnp.sum(visited) / jnp.maximum(jnp.sum(causal), 1)).astype(jnp.float32)

    def per_head(x):
        return jnp.broadcast_to(x, (batch, heads, *x.shape))

    return BlockSchedule(per_head(kv_indices), per_head(kv_num), per_head(kv_masked),
                         per_head(q_indices), per_head(q_num), per_head(q_masked), density)
