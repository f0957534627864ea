"""The schedule's list compaction as one Triton kernel (build_schedule(compaction="triton")).

schedule._compact turns per-block flags into lists with a cumsum and a scatter per row, a
handful of XLA passes over [B, H, nq, nk] that cost 2.3 ms at 128k tokens whatever the density.
Here one program per row reads its flags once to count, once to write each visited block at its
place (masked entries first, then full ones, both in ascending order) and pads the tail with the
last entry: the same lists, in two reads of one byte per block pair.

Compiled through jax_triton.triton_call on a CUDA GPU; interpreted (triton's interpreter on CPU
torch tensors, TRITON_INTERPRET=1) for tests on hosts without one, like triton_backend.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

# Flags per block pair, one byte each: what compact_kernel reads.
NOT_VISITED, MASKED, FULL = 0, 1, 2
# Largest chunk of a row read at once (a power of two).
MAX_CHUNK = 1024


@triton.jit
def compact_kernel(FLAGS, IDX, NUM, NMASKED, N: tl.constexpr, CHUNK: tl.constexpr):
    """Row r of FLAGS [R, N] int8 -> IDX[r] int32 (masked blocks, then full ones, then the last
    entry repeated; 0 for an empty row), NUM[r] visited count, NMASKED[r] masked count."""
    r = tl.program_id(0).to(tl.int64)
    flags_ptr = FLAGS + r * N
    idx_ptr = IDX + r * N
    offs = tl.arange(0, CHUNK)
    n_masked = tl.zeros((), tl.int32)
    n_full = tl.zeros((), tl.int32)
    last_masked = tl.full((), -1, tl.int32)
    last_full = tl.full((), -1, tl.int32)
    for c in range(0, N, CHUNK):
        j = c + offs
        f = tl.load(flags_ptr + j, mask=j < N, other=0)
        n_masked += tl.sum((f == 1).to(tl.int32), 0)
        n_full += tl.sum((f == 2).to(tl.int32), 0)
        last_masked = tl.maximum(last_masked, tl.max(tl.where(f == 1, j, -1), 0))
        last_full = tl.maximum(last_full, tl.max(tl.where(f == 2, j, -1), 0))
    seen_masked = tl.zeros((), tl.int32)
    seen_full = tl.zeros((), tl.int32)
    for c in range(0, N, CHUNK):
        j = c + offs
        f = tl.load(flags_ptr + j, mask=j < N, other=0)
        is_masked = (f == 1).to(tl.int32)
        is_full = (f == 2).to(tl.int32)
        dest = tl.where(is_masked == 1, seen_masked + tl.cumsum(is_masked, 0) - 1,
                        n_masked + seen_full + tl.cumsum(is_full, 0) - 1)
        tl.store(idx_ptr + dest, j, mask=(f > 0) & (j < N))
        seen_masked += tl.sum(is_masked, 0)
        seen_full += tl.sum(is_full, 0)
    count = n_masked + n_full
    last = tl.where(n_full > 0, last_full, tl.where(n_masked > 0, last_masked, 0))
    for c in range(0, N, CHUNK):
        j = c + offs
        tl.store(idx_ptr + j, tl.zeros((CHUNK,), tl.int32) + last, mask=(j >= count) & (j < N))
    tl.store(NUM + r, count)
    tl.store(NMASKED + r, n_masked)


def _launch(rows: int, n: int):
    from pallas_kernels.triton_backend import Launch
    chunk = min(MAX_CHUNK, max(16, 1 << (n - 1).bit_length()))
    return Launch(compact_kernel, (rows,),
                  (jax.ShapeDtypeStruct((rows, n), jnp.int32),
                   jax.ShapeDtypeStruct((rows,), jnp.int32),
                   jax.ShapeDtypeStruct((rows,), jnp.int32)),
                  dict(N=n, CHUNK=chunk), num_warps=4 if chunk >= 512 else 1, num_stages=1,
                  name="block_schedule_compact")


def compact(masked, full, *, interpret: bool = False):
    """schedule._compact's (indices, count, masked_count) for disjoint flags [..., n] bool
    (build_schedule's: masked = visited & ~full), by compact_kernel."""
    from pallas_kernels.triton_backend import call_launch
    lead, n = masked.shape[:-1], masked.shape[-1]
    flags = jnp.where(masked, jnp.int8(MASKED), jnp.where(full, jnp.int8(FULL),
                                                          jnp.int8(NOT_VISITED)))
    rows = math.prod(lead)
    idx, num, n_masked = call_launch(_launch(rows, n), interpret, flags.reshape(rows, n))
    return idx.reshape(*lead, n), num.reshape(lead), n_masked.reshape(lead)
