"""Block schedule: which key blocks each query block must visit, built from cluster ids alone.

For every (batch, query head, query block) the schedule lists the key blocks holding at least
one allowed pair (FlexAttention's kv_num_blocks / kv_indices), and the transposed lists for the
dk/dv pass. Visited blocks whose every pair is causal and allowed are "full": the kernels skip
the token mask there. Each list holds the masked blocks first, then the full ones; entries past
the count repeat the last visited block (a TPU pipeline then fetches nothing new).

Nothing here is S x S. Work and memory, per head:
  - shared clusters, ignoring causality: key ids are sorted and each distinct id gets a bitmap of
    the key blocks holding it; a query block ORs the bitmaps of its tokens' ids.
    O(S log S + Sq * nk / 32).
  - blocks straddling the diagonal (at most block_q // block_k + 2 per query block) are decided
    token by token: O(Sq * block_k).
  - window and sink blocks and the "full" test are structural, O(1) per block pair, using where
    each block's ids change (O(S) reductions, no scan).
  - the block-level lists themselves: O(nq * nk), compacted from the flags by XLA passes or,
    on a GPU with jax-triton, by one Triton kernel (triton_compact.py; compaction="auto"). On
    the signature path with a window, that kernel decides the flags itself from a few facts
    per block (O(S) reductions, no scan): one launch per direction, no [nq, nk] flags.
When every id lies in [0, SIGNATURE_IDS) (routes cut at a depth of at most 7 for p = 2, or any
user's small cluster count), the shared-cluster test runs on per-block bit signatures instead:
O(S + nq * nk), no sort, no scatter. A lax.cond picks that path from the ids' range, so the
schedule is the same either way; build_schedule(num_ids=n <= SIGNATURE_IDS), a promise about
the ids, skips that check. With a window of at least one token the straddle test is
skipped: every block crossing the diagonal holds some token's pair with itself (i - j = 0),
which the window allows whatever the ids.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import cdiv, pad_axis
from pallas_kernels.masking import allowed_pairs
from pallas_kernels.validation import (check_block_size, check_clusters, check_mask_params,
                                       check_num_ids)

# Ids the signature path covers exactly: one bit each in SIGNATURE_IDS / 32 words per block.
SIGNATURE_IDS = 128


class BlockSchedule(NamedTuple):
    kv_indices: jax.Array     # [B, H, nq, nk] int32: key blocks per query block, masked first
    kv_num_blocks: jax.Array  # [B, H, nq] int32: how many entries of kv_indices are visited
    kv_num_masked: jax.Array  # [B, H, nq] int32: the first ones that need the token mask
    q_indices: jax.Array      # [B, H, nk, nq] int32: query blocks per key block (dk/dv pass)
    q_num_blocks: jax.Array   # [B, H, nk] int32
    q_num_masked: jax.Array   # [B, H, nk] int32
    density: jax.Array        # float32 scalar: visited blocks / blocks holding a causal pair


def _run_starts(ids):
    """Index where the run of equal consecutive ids containing each position begins."""
    t = jnp.arange(ids.shape[0], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
    return jax.lax.cummax(jnp.where(starts, t, 0))


def _shared_cluster_blocks(qc, kc, bq, bk, nq, nk):
    """[nq, nk] bool: query block i and key block j hold a common cluster id (any positions)."""
    kv_len = kc.shape[0]
    order = jnp.argsort(kc, stable=True)  # equal ids stay in position (hence block) order
    ids = kc[order]
    blk = (order // bk).astype(jnp.int32)
    row = _run_starts(ids)  # each id's table row: where its run of sorted keys begins
    new_id = row == jnp.arange(kv_len)
    new_pair = new_id | jnp.concatenate([jnp.ones((1,), bool), blk[1:] != blk[:-1]])
    words = cdiv(nk, 32)
    bit = jnp.left_shift(jnp.uint32(1), (blk % 32).astype(jnp.uint32))
    # One add per distinct (id, block) pair, so adding bits is an exact OR.
    table = jnp.zeros((kv_len, words), jnp.uint32).at[row, blk // 32].add(
        jnp.where(new_pair, bit, jnp.uint32(0)))
    at = jnp.minimum(jnp.searchsorted(ids, qc), kv_len - 1)
    rows = jnp.where((ids[at] == qc)[:, None], table[at], jnp.uint32(0))
    rows = jnp.pad(rows, ((0, nq * bq - rows.shape[0]), (0, 0))).reshape(nq, bq, words)
    rows = jax.lax.reduce(rows, jnp.uint32(0), jax.lax.bitwise_or, (1,))
    j = jnp.arange(nk)
    return (jnp.right_shift(rows[:, j // 32], (j % 32).astype(jnp.uint32)) & 1).astype(bool)


def _straddle_blocks(qc, kc, bq, bk, nq, nk, q_offset, window, sink_tokens):
    """Token-exact visit test for the key blocks that cross each query block's diagonal.
    Returns [nq, nk] bool, meaningful only where the geometry says the block straddles."""
    q_len, kv_len = qc.shape[0], kc.shape[0]
    nd = min(nk, bq // bk + 2)
    i = jnp.arange(nq)
    q_first = q_offset + i * bq
    q_last = q_offset + jnp.minimum((i + 1) * bq, q_len) - 1
    js = (q_first + 1) // bk
    js = js[:, None] + jnp.arange(nd)[None, :]
    valid = js <= jnp.minimum(q_last // bk, nk - 1)[:, None]
    js = jnp.minimum(js, nk - 1)
    q_idx = jnp.arange(nq * bq).reshape(nq, bq)
    q_ids = pad_axis(qc, nq * bq).reshape(nq, bq)
    k_ids = pad_axis(kc, nk * bk).reshape(nk, bk)[js]            # [nq, nd, bk]
    k_pos = jnp.arange(nk * bk).reshape(nk, bk)[js]
    ok = allowed_pairs((q_offset + q_idx)[:, None, :, None], k_pos[:, :, None, :],
                       q_ids[:, None, :, None], k_ids[:, :, None, :],
                       window=window, sink_tokens=sink_tokens, kv_len=kv_len)
    ok = ok & (q_idx < q_len)[:, None, :, None]
    hit = jnp.any(ok, axis=(2, 3)) & valid                             # [nq, nd]
    dense = (js[:, :, None] == jnp.arange(nk)[None, None, :]) & hit[:, :, None]
    return jnp.any(dense, axis=1)


def _block_geometry(q_len, kv_len, bq, bk, q_offset):
    """Block bounds and the causal classes of [nq, nk] blocks: (q_first, q_last, k_first,
    k_last, causal, straddle (crosses the diagonal), below (every real pair causal))."""
    nq, nk = cdiv(q_len, bq), cdiv(kv_len, bk)
    i = jnp.arange(nq)[:, None]
    j = jnp.arange(nk)[None, :]
    q_first = q_offset + i * bq
    q_last = q_offset + jnp.minimum((i + 1) * bq, q_len) - 1
    k_first = j * bk
    k_last = jnp.minimum((j + 1) * bk, kv_len) - 1
    causal = k_first <= q_last
    straddle = causal & (k_last > q_first)
    return q_first, q_last, k_first, k_last, causal, straddle, causal & ~straddle


def _block_flags(qc, kc, *, bq, bk, q_offset, window, sink_tokens, small_ids):
    """(visited, full) [nq, nk] bool for one head (full blocks are visited ones). small_ids:
    every id lies in [0, SIGNATURE_IDS) (signatures decide shared clusters)."""
    q_len, kv_len = qc.shape[0], kc.shape[0]
    nq, nk = cdiv(q_len, bq), cdiv(kv_len, bk)
    j = jnp.arange(nk)[None, :]
    q_first, q_last, k_first, k_last, _, straddle, below = _block_geometry(
        q_len, kv_len, bq, bk, q_offset)

    if small_ids:
        shared = _shares_a_bit(_block_signatures(qc, bq, SIGNATURE_IDS // 32),
                               _block_signatures(kc, bk, SIGNATURE_IDS // 32))
    else:
        shared = _shared_cluster_blocks(qc, kc, bq, bk, nq, nk)
    visited = below & ((k_first < sink_tokens) | (q_first - k_last < window) | shared)
    if window >= 1:  # a straddling block holds a pair (t, t), inside any window
        visited = visited | straddle
    else:
        visited = jnp.where(straddle, _straddle_blocks(qc, kc, bq, bk, nq, nk, q_offset, window,
                                                       sink_tokens), visited)

    # Full: the pairs that neither the sink nor the window allow (keys [k_lo, k_hi] against
    # rows [r_lo, q_last]) must all share one cluster id. Row q_last meets every such key and
    # key k_lo every such row, so both ranges must hold one id each, and the same one. The
    # keys start at the block's first key past the sink and the rows run to the block's end,
    # so per-block facts decide it (_query_run_facts, _key_run_facts; the kernel's test too).
    q_change, q_id = _query_run_facts(qc, bq)
    k_change, k_id = _key_run_facts(kc, bk, sink_tokens)
    k_lo = jnp.maximum(k_first, sink_tokens)
    k_hi = jnp.minimum(k_last, q_last - window)
    rows_from = jnp.maximum(q_first, k_lo + window) - q_first
    one_id = ((q_change[:, None] <= rows_from) & (k_change[None, :] > k_hi - k_first)
              & (q_id[:, None] == k_id[None, :]))
    no_padding = (j + 1) * bk <= kv_len
    full = below & no_padding & ((k_lo > k_hi) | one_id)
    return visited, full


def _block_signatures(ids, block, words=2):
    """[n_blocks, words] uint32 per block of ids [S]: bit (id mod 32 * words) set for every id
    it holds (padding past S sets nothing)."""
    h = jnp.mod(ids, 32 * words).astype(jnp.uint32)
    bits = jnp.where((h // 32)[:, None] == jnp.arange(words, dtype=jnp.uint32)[None, :],
                     jnp.left_shift(jnp.uint32(1), h % 32)[:, None], jnp.uint32(0))
    bits = pad_axis(bits, cdiv(ids.shape[0], block) * block).reshape(-1, block, words)
    return jax.lax.reduce(bits, jnp.uint32(0), jax.lax.bitwise_or, (1,))


def _shares_a_bit(sq, sk):
    """[nq, nk] bool: query block i's and key block j's signatures have a bit in common."""
    return jnp.any((sq[:, None, :] & sk[None, :, :]) != 0, axis=-1)


def natural_density_bound(clusters, *, window, sink_tokens, block_q=128, block_k=128):
    """An upper bound on build_schedule(clusters, clusters, ...).density, exact when every id
    lies in [0, 64), from one 64-bit signature per block (ids hashed mod 64) instead of the
    schedule's sorts and compactions: cheap enough to decide a layout with. clusters
    [B, H, S]; self-attention (q_offset 0). Blocks crossing the diagonal hold a query's own
    key, so they are visited whatever the ids."""
    batch, heads, seq = clusters.shape
    ids = check_clusters(clusters, clusters, batch, heads, seq, seq)[0]
    window, sink_tokens, _ = check_mask_params(window, sink_tokens, 0, seq, seq)
    return density_bound_of_checked(ids, window, sink_tokens,
                                    check_block_size("block_q", block_q, power_of_two=False),
                                    check_block_size("block_k", block_k, power_of_two=False))


def density_bound_of_checked(ids, window, sink_tokens, bq, bk):
    """natural_density_bound of int32 ids [B, H, S] and settings already validated (the
    caller's own checks, e.g. routed_attention's, are not repeated)."""
    batch, heads, seq = ids.shape
    q_first, _, k_first, k_last, causal, straddle, below = _block_geometry(seq, seq, bq, bk, 0)
    local = (k_first < sink_tokens) | (q_first - k_last < window)

    def visited(ids):
        maybe_shared = _shares_a_bit(_block_signatures(ids, bq), _block_signatures(ids, bk))
        return straddle | (below & (local | maybe_shared))

    hits = jnp.sum(jax.vmap(jax.vmap(visited))(ids))
    return (hits / jnp.maximum(batch * heads * jnp.sum(causal), 1)).astype(jnp.float32)


def _compact(masked, full):
    """Per row of [..., n] flags: the indices of masked entries, then of full ones; padding
    repeats the last entry. Returns (indices, count, masked_count)."""
    n = masked.shape[-1]
    n_masked = jnp.sum(masked, axis=-1, dtype=jnp.int32)
    count = n_masked + jnp.sum(full, axis=-1, dtype=jnp.int32)
    dest = jnp.where(masked, jnp.cumsum(masked, axis=-1) - 1,
                     jnp.where(full, n_masked[..., None] + jnp.cumsum(full, axis=-1) - 1, n))
    lead = dest.shape[:-1]
    flat = dest.reshape(-1, n)
    src = jnp.arange(n, dtype=jnp.int32)
    idx = jax.vmap(lambda d: jnp.zeros((n,), jnp.int32).at[d].set(src, mode="drop"))(flat)
    idx = idx.reshape(*lead, n)
    last = jnp.take_along_axis(idx, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    idx = jnp.where(src < count[..., None], idx, last)
    return idx, count, n_masked


COMPACTIONS = ("auto", "xla", "triton", "triton_interpret")


def resolve_compaction(compaction: str) -> str:
    """The list compaction build_schedule runs: "xla" (_compact, any device), "triton"
    (triton_compact's kernel through jax_triton, a CUDA GPU) or "triton_interpret" (the same
    kernel in triton's interpreter, for tests). "auto": "triton" where jax's default backend is
    a GPU and jax_triton runs, else "xla" (BENCHMARKS.md times both)."""
    if compaction not in COMPACTIONS:
        raise ValueError(f"compaction must be one of {COMPACTIONS}, got {compaction!r}")
    if compaction != "auto":
        return compaction
    if jax.default_backend() != "gpu":
        return "xla"
    from pallas_kernels.triton_backend import unavailable
    return "xla" if unavailable(False) else "triton"


def compact_lists(masked, full, compaction: str = "auto"):
    """(indices, count, masked_count) of per-row flags [..., n]: masked entries, then full
    ones, padding repeating the last (_compact), by the resolved compaction."""
    how = resolve_compaction(compaction)
    if how == "xla":
        return _compact(masked, full)
    from pallas_kernels.triton_compact import compact
    return compact(masked, full, interpret=how == "triton_interpret")


def causal_block_count(q_len: int, kv_len: int, bq: int, bk: int, q_offset: int) -> int:
    """How many [nq, nk] blocks of one head hold a causal pair: the density's denominator."""
    nk = cdiv(kv_len, bk)
    q_last = q_offset + np.minimum(np.arange(1, cdiv(q_len, bq) + 1) * bq, q_len) - 1
    return int(np.sum(np.minimum(q_last // bk + 1, nk)))


def _block_changes(ids, block):
    """(offsets within its block [S] int32, whether each position's id differs from the one
    before it in its block [S] bool)."""
    t = jnp.arange(ids.shape[0], dtype=jnp.int32)
    offset = t % block
    return offset, (offset != 0) & (ids != jnp.roll(ids, 1))


def _block_reduce(x, block, init, op):
    return jax.lax.reduce(pad_axis(x, cdiv(x.shape[0], block) * block, value=init)
                          .reshape(-1, block), init, op, (1,))


def _signature_words(ids, block):
    """[SIGNATURE_IDS // 32, n_blocks] int32: the blocks' id signatures, word-major."""
    sig = _block_signatures(ids, block, SIGNATURE_IDS // 32)
    return jax.lax.bitcast_convert_type(sig, jnp.int32).T


def _query_run_facts(ids, block):
    """([n_blocks], [n_blocks]) int32 of one head's query ids [S], per block: the last offset
    where the id changes (-1: one id) and its last id. Rows from offset r to the block's end
    hold one id exactly when that offset is <= r."""
    offset, change = _block_changes(ids, block)
    last_change = _block_reduce(jnp.where(change, offset, -1), block, jnp.int32(-1),
                                jax.lax.max)
    last = jnp.minimum(jnp.arange(cdiv(ids.shape[0], block), dtype=jnp.int32) * block + block,
                       ids.shape[0]) - 1
    return last_change, ids[last].astype(jnp.int32)


def _key_run_facts(ids, block, sink_tokens):
    """([n_blocks], [n_blocks]) int32 of one head's key ids [S], per block: the first offset
    past the sink keys where the id changes (block: none) and the id of its first key past
    the sink. Keys from that first one to offset k hold one id exactly when that change offset
    is > k."""
    n = ids.shape[0]
    offset, change = _block_changes(ids, block)
    past_sink = jnp.arange(n, dtype=jnp.int32) > sink_tokens
    first_change = _block_reduce(jnp.where(change & past_sink, offset, block), block,
                                 jnp.int32(block), jax.lax.min)
    first = jnp.arange(cdiv(n, block), dtype=jnp.int32) * block
    return first_change, ids[jnp.clip(jnp.maximum(first, sink_tokens), 0, n - 1)].astype(jnp.int32)


def _block_facts(ids, block, run_facts):
    """[SIGNATURE_IDS // 32 + 2, n_blocks] int32: the blocks' signature words, then their run
    facts (what triton_compact's kernel reads)."""
    return jnp.concatenate([_signature_words(ids, block), jnp.stack(run_facts)])


def _signature_lists(qc, kc, *, bq, bk, q_offset, window, sink_tokens, interpret):
    """Both directions' lists on the signature path, each decided and written by one Triton
    launch (triton_compact.signature_lists) from per-block facts."""
    from pallas_kernels.triton_compact import signature_lists
    facts = (jax.vmap(jax.vmap(lambda x: _block_facts(x, bq, _query_run_facts(x, bq))))(qc),
             jax.vmap(jax.vmap(lambda x: _block_facts(
                 x, bk, _key_run_facts(x, bk, sink_tokens))))(kc))
    geometry = dict(block_q=bq, block_k=bk, q_offset=q_offset, q_len=qc.shape[-1],
                    kv_len=kc.shape[-1], window=window, sink_tokens=sink_tokens,
                    interpret=interpret)
    return (*signature_lists(*facts, transposed=False, **geometry),
            *signature_lists(*facts, transposed=True, **geometry))


def build_schedule(q_clusters, k_clusters, *, window, sink_tokens, q_offset=0,
                   block_q=128, block_k=128, compaction: str = "auto",
                   num_ids: int = 0) -> BlockSchedule:
    """Block schedule for clusters q_clusters [B, H, Sq] and k_clusters [B, H, Sk] (int ids),
    queries at positions q_offset .. q_offset + Sq - 1 and keys at 0 .. Sk - 1. compaction:
    how the flags become lists (resolve_compaction); every choice gives the same schedule.
    num_ids: a promise that every id lies in [0, num_ids) (0: none). Up to SIGNATURE_IDS it
    skips the device-side range check (a lax.cond, a host round trip on a GPU): the signature
    path runs directly. Ids that break the promise alias others' signature bits, so the
    schedule may visit blocks it need not (never fewer): the attention stays exact."""
    if q_clusters.ndim != 3 or k_clusters.ndim != 3 or q_clusters.shape[:2] != k_clusters.shape[:2]:
        raise ValueError("q_clusters and k_clusters must be [B, H, S] with the same B and H, got "
                         f"{tuple(q_clusters.shape)} and {tuple(k_clusters.shape)}")
    (batch, heads, q_len), kv_len = q_clusters.shape, k_clusters.shape[2]
    qc, kc = check_clusters(q_clusters, k_clusters, batch, heads, q_len, kv_len)
    window, sink_tokens, q_offset = check_mask_params(window, sink_tokens, q_offset, q_len, kv_len)
    block_q = check_block_size("block_q", block_q, power_of_two=False)
    block_k = check_block_size("block_k", block_k, power_of_two=False)
    num_ids = check_num_ids(num_ids)
    how = resolve_compaction(compaction)
    # One Triton launch per direction decides and writes the lists (no straddle test to run).
    in_kernel = how != "xla" and window >= 1

    def lists(small_ids):
        def build(qc, kc):
            if small_ids and in_kernel:
                return _signature_lists(qc, kc, bq=block_q, bk=block_k, q_offset=q_offset,
                                        window=window, sink_tokens=sink_tokens,
                                        interpret=how == "triton_interpret")
            per_head = functools.partial(
                _block_flags, bq=block_q, bk=block_k, q_offset=q_offset, window=window,
                sink_tokens=sink_tokens, small_ids=small_ids)
            visited, full = jax.vmap(jax.vmap(per_head))(qc, kc)
            masked = visited & ~full
            return (*compact_lists(masked, full, how),
                    *compact_lists(jnp.swapaxes(masked, -1, -2), jnp.swapaxes(full, -1, -2),
                                   how))
        return build

    if 0 < num_ids <= SIGNATURE_IDS:
        parts = lists(True)(qc, kc)
    else:
        small = ((jnp.min(qc) >= 0) & (jnp.max(qc) < SIGNATURE_IDS)
                 & (jnp.min(kc) >= 0) & (jnp.max(kc) < SIGNATURE_IDS))
        parts = jax.lax.cond(small, lists(True), lists(False), qc, kc)
    kv_indices, kv_num, kv_masked, q_indices, q_num, q_masked = parts
    # Full blocks are visited ones, so the visited blocks are what the lists count.
    causal = batch * heads * causal_block_count(q_len, kv_len, block_q, block_k, q_offset)
    density = jnp.sum(kv_num) / max(causal, 1)
    return BlockSchedule(kv_indices, kv_num, kv_masked, q_indices, q_num, q_masked,
                         density.astype(jnp.float32))
