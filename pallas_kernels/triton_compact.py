"""The schedule's lists as one Triton kernel (build_schedule(compaction="triton")).

schedule._compact turns per-block flags into lists with a cumsum and a scatter per row, a
handful of XLA passes over [B, H, nq, nk] that cost 2.3 ms at 128k tokens whatever the density.
Here one program per row reads its flags once to count, once to write each visited block at its
place (masked entries first, then full ones, both in ascending order) and pads the tail with the
last entry: the same lists, in two reads of one byte per block pair.

On the signature path (every id in [0, SIGNATURE_IDS), a window of at least one token) the
kernel does not read flags at all: it decides each block pair itself, from the two blocks'
id signatures, their positions and where their ids change (schedule._block_facts; the same
tests as schedule._block_flags), so the whole schedule is a few O(S) reductions and one launch
per list direction, with no [nq, nk] array in memory.

Compiled through jax_triton.triton_call on a CUDA GPU; interpreted (triton's interpreter on CPU
torch tensors, TRITON_INTERPRET=1) for tests on hosts without one, like triton_backend.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

# Flags per block pair, one byte each: what lists_kernel reads (or computes).
NOT_VISITED, MASKED, FULL = 0, 1, 2
# Largest chunk of a row read at once (a power of two).
MAX_CHUNK = 1024


@triton.jit
def _signature_flags(row, cols, N: tl.constexpr, QB, KB, TRANSPOSED: tl.constexpr,
                     NQ: tl.constexpr, NK: tl.constexpr, Q_LEN: tl.constexpr,
                     KV_LEN: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                     Q_OFFSET: tl.constexpr, WINDOW: tl.constexpr, SINK: tl.constexpr,
                     WORDS: tl.constexpr):
    """Flags of the block pairs (row, cols) of one head: query block row and key blocks cols,
    or TRANSPOSED key block row and query blocks cols (the row's quantities stay scalars).
    Columns past N read column N - 1 (the caller masks them). schedule._block_flags with its
    straddle shortcut (WINDOW >= 1), from per-block facts QB / KB [WORDS + 2, blocks]
    (schedule._block_facts: signature words, then _query_run_facts / _key_run_facts)."""
    col = tl.minimum(cols, N - 1)
    if TRANSPOSED:
        i = col
        j = row
    else:
        i = row
        j = col
    q_first = Q_OFFSET + i * BQ
    q_last = Q_OFFSET + tl.minimum((i + 1) * BQ, Q_LEN) - 1
    k_first = j * BK
    k_last = tl.minimum((j + 1) * BK, KV_LEN) - 1
    causal = k_first <= q_last
    straddle = causal & (k_last > q_first)
    below = causal & (k_last <= q_first)
    common = tl.load(QB + i) & tl.load(KB + j)
    for w in tl.static_range(1, WORDS):
        common = common | (tl.load(QB + w * NQ + i) & tl.load(KB + w * NK + j))
    visited = straddle | (below & ((k_first < SINK) | (q_first - k_last < WINDOW)
                                   | (common != 0)))
    # Full: the keys neither the sink nor the window allow (k_lo..k_hi, a range that starts
    # at the block's first key past the sink) and the rows that meet them (from k_lo + WINDOW
    # to the block's last row, a suffix) hold one id, the same (schedule._block_flags).
    k_lo = tl.maximum(k_first, SINK)
    k_hi = tl.minimum(k_last, q_last - WINDOW)
    rows_from = tl.maximum(q_first, k_lo + WINDOW) - q_first
    one_id = ((tl.load(QB + WORDS * NQ + i) <= rows_from)
              & (tl.load(KB + WORDS * NK + j) > k_hi - k_first)
              & (tl.load(QB + (WORDS + 1) * NQ + i) == tl.load(KB + (WORDS + 1) * NK + j)))
    full = below & ((j + 1) * BK <= KV_LEN) & ((k_lo > k_hi) | one_id)
    return tl.where(full, 2, tl.where(visited, 1, 0))


@triton.jit
def _chunk_flags(FLAGS, QB, KB, r, cols, N: tl.constexpr, FROM_SIGNATURES: tl.constexpr,
                 ROWS: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr,
                 TRANSPOSED: tl.constexpr, Q_LEN: tl.constexpr, KV_LEN: tl.constexpr,
                 BQ: tl.constexpr, BK: tl.constexpr, Q_OFFSET: tl.constexpr,
                 WINDOW: tl.constexpr, SINK: tl.constexpr, WORDS: tl.constexpr):
    """Flags (int32) of row r's columns cols, 0 past N: read from FLAGS, or decided from the
    blocks' signatures (row r is row r % ROWS of head r // ROWS)."""
    if FROM_SIGNATURES:
        h = r // ROWS
        f = _signature_flags((r % ROWS).to(tl.int32), cols, N, QB + h * ((WORDS + 2) * NQ),
                             KB + h * ((WORDS + 2) * NK), TRANSPOSED, NQ, NK, Q_LEN, KV_LEN,
                             BQ, BK, Q_OFFSET, WINDOW, SINK, WORDS)
        return tl.where(cols < N, f, 0)
    else:
        return tl.load(FLAGS + r * N + cols, mask=cols < N, other=0).to(tl.int32)


@triton.jit
def _place(idx_ptr, f, j, seen_masked, seen_full, n_masked, N: tl.constexpr):
    """Writes the visited columns j of flags f at their places in the row's list."""
    is_masked = (f == 1).to(tl.int32)
    is_full = (f == 2).to(tl.int32)
    dest = tl.where(is_masked == 1, seen_masked + tl.cumsum(is_masked, 0) - 1,
                    n_masked + seen_full + tl.cumsum(is_full, 0) - 1)
    tl.store(idx_ptr + dest, j, mask=(f > 0) & (j < N))
    return seen_masked + tl.sum(is_masked, 0), seen_full + tl.sum(is_full, 0)


@triton.jit
def _tally(f, j):
    """(masked, full, last masked column, last full column) of flags f at columns j."""
    return (tl.sum((f == 1).to(tl.int32), 0), tl.sum((f == 2).to(tl.int32), 0),
            tl.max(tl.where(f == 1, j, -1), 0), tl.max(tl.where(f == 2, j, -1), 0))


@triton.jit
def lists_kernel(FLAGS, QB, KB, IDX, NUM, NMASKED,
                 N: tl.constexpr, CHUNK: tl.constexpr, FROM_SIGNATURES: tl.constexpr,
                 ROWS: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr,
                 TRANSPOSED: tl.constexpr, Q_LEN: tl.constexpr, KV_LEN: tl.constexpr,
                 BQ: tl.constexpr, BK: tl.constexpr, Q_OFFSET: tl.constexpr,
                 WINDOW: tl.constexpr, SINK: tl.constexpr, WORDS: tl.constexpr):
    """Row r's flags (FLAGS [R, N] int8, or decided from signatures) -> IDX[r] int32 (masked
    blocks, then full ones, then the last entry repeated; 0 for an empty row), NUM[r] visited
    count, NMASKED[r] masked count. A row of one chunk decides its flags once; a longer one
    twice (count, then place)."""
    r = tl.program_id(0).to(tl.int64)
    idx_ptr = IDX + r * N
    offs = tl.arange(0, CHUNK)
    zero = tl.zeros((), tl.int32)
    if N <= CHUNK:
        f = _chunk_flags(FLAGS, QB, KB, r, offs, N, FROM_SIGNATURES, ROWS, NQ, NK, TRANSPOSED,
                         Q_LEN, KV_LEN, BQ, BK, Q_OFFSET, WINDOW, SINK, WORDS)
        n_masked, n_full, last_masked, last_full = _tally(f, offs)
        _place(idx_ptr, f, offs, zero, zero, n_masked, N)
    else:
        n_masked = zero
        n_full = zero
        last_masked = zero - 1
        last_full = zero - 1
        for c in range(0, N, CHUNK):
            j = c + offs
            f = _chunk_flags(FLAGS, QB, KB, r, j, N, FROM_SIGNATURES, ROWS, NQ, NK, TRANSPOSED,
                             Q_LEN, KV_LEN, BQ, BK, Q_OFFSET, WINDOW, SINK, WORDS)
            m, u, lm, lu = _tally(f, j)
            n_masked += m
            n_full += u
            last_masked = tl.maximum(last_masked, lm)
            last_full = tl.maximum(last_full, lu)
        seen_masked = zero
        seen_full = zero
        for c in range(0, N, CHUNK):
            j = c + offs
            f = _chunk_flags(FLAGS, QB, KB, r, j, N, FROM_SIGNATURES, ROWS, NQ, NK, TRANSPOSED,
                             Q_LEN, KV_LEN, BQ, BK, Q_OFFSET, WINDOW, SINK, WORDS)
            seen_masked, seen_full = _place(idx_ptr, f, j, seen_masked, seen_full, n_masked, N)
    count = n_masked + n_full
    last = tl.where(n_full > 0, last_full, tl.where(n_masked > 0, last_masked, 0))
    for c in range(0, N, CHUNK):
        j = c + offs
        tl.store(idx_ptr + j, tl.zeros((CHUNK,), tl.int32) + last, mask=(j >= count) & (j < N))
    tl.store(NUM + r, count)
    tl.store(NMASKED + r, n_masked)


# The constexprs of the flags-reading launch: the signature ones unused.
_NO_SIGNATURES = dict(FROM_SIGNATURES=False, ROWS=1, NQ=1, NK=1, TRANSPOSED=False, Q_LEN=1,
                      KV_LEN=1, BQ=1, BK=1, Q_OFFSET=0, WINDOW=0, SINK=0, WORDS=1)


def _launch(rows: int, n: int, **signature_meta):
    from pallas_kernels.triton_backend import Launch
    chunk = min(MAX_CHUNK, max(16, 1 << (n - 1).bit_length()))
    meta = dict(N=n, CHUNK=chunk, **(signature_meta or _NO_SIGNATURES))
    return Launch(lists_kernel, (rows,),
                  (jax.ShapeDtypeStruct((rows, n), jnp.int32),
                   jax.ShapeDtypeStruct((rows,), jnp.int32),
                   jax.ShapeDtypeStruct((rows,), jnp.int32)),
                  meta, num_warps=4 if chunk >= 512 else 1, num_stages=1,
                  name="block_schedule_signature_lists" if signature_meta
                  else "block_schedule_compact")


def compact(masked, full, *, interpret: bool = False):
    """schedule._compact's (indices, count, masked_count) for disjoint flags [..., n] bool
    (build_schedule's: masked = visited & ~full), by lists_kernel."""
    from pallas_kernels.triton_backend import call_launch
    lead, n = masked.shape[:-1], masked.shape[-1]
    flags = jnp.where(masked, jnp.int8(MASKED), jnp.where(full, jnp.int8(FULL),
                                                          jnp.int8(NOT_VISITED)))
    rows = math.prod(lead)
    flat = flags.reshape(rows, n)
    idx, num, n_masked = call_launch(_launch(rows, n), interpret, *[flat] * 3)
    return idx.reshape(*lead, n), num.reshape(lead), n_masked.reshape(lead)


def signature_lists(q_facts, k_facts, *, block_q: int, block_k: int, q_offset: int,
                    q_len: int, kv_len: int, window: int, sink_tokens: int, transposed: bool,
                    interpret: bool = False):
    """(indices, count, masked_count) of build_schedule's key-block lists per query block
    (transposed: query-block lists per key block), decided in the kernel from per-block facts
    q_facts [B, H, W + 2, nq] and k_facts [B, H, W + 2, nk] int32 (schedule._block_facts: W
    id-signature words, then where the ids change and which id).
    Needs window >= 1 (every block crossing the diagonal is visited)."""
    from pallas_kernels.triton_backend import call_launch
    if window < 1:
        raise ValueError(f"signature_lists needs a window of at least one token, got {window}")
    batch, heads, words, nq = q_facts.shape
    nk = k_facts.shape[-1]
    rows, n = (nk, nq) if transposed else (nq, nk)
    meta = dict(FROM_SIGNATURES=True, ROWS=rows, NQ=nq, NK=nk, TRANSPOSED=transposed,
                Q_LEN=q_len, KV_LEN=kv_len, BQ=block_q, BK=block_k, Q_OFFSET=q_offset,
                WINDOW=window, SINK=sink_tokens, WORDS=words - 2)
    lead = (batch, heads)
    dummy = jnp.zeros((1,), jnp.int8)  # the flags pointer, unread on this path
    idx, num, n_masked = call_launch(_launch(batch * heads * rows, n, **meta), interpret,
                                     dummy, q_facts.astype(jnp.int32), k_facts.astype(jnp.int32))
    return idx.reshape(*lead, rows, n), num.reshape(*lead, rows), n_masked.reshape(*lead, rows)
