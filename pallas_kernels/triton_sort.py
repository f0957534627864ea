"""A stable counting sort of cluster ids in Triton: the sorted layout's order without a sort.

Per row r (a (batch, head)) of ids in [lo, lo + BINS), the stable sort by (id, position)
places the token at position i, in tile t, at slot

  base[r, id, t] + rank_i,   rank_i = the equal ids before i in tile t,

base being the exclusive prefix sum of the per-tile counts in (id, tile) order. Two launches
and small prefix sums between them (triton_backend.counting_sort): count each tile's ids
(a histogram), then place each tile: sorted inside the tile by (id, position), its k-th token
goes to slot offset[r, t, id] + k, where offset = base - (the tile's tokens of smaller ids).
A tile's tokens of one id land on consecutive slots, so the stores come in runs, not one
scattered word per token.

Positions N_IDS .. N - 1 (padding) take id lo + BINS - 1, past every real id, so they form
the last segment in position order. This module needs only triton; triton_backend.py
launches it.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_ids(IDS, LO, r, t, N_IDS: tl.constexpr, N: tl.constexpr, TILE: tl.constexpr,
              BINS: tl.constexpr, NUM_IDS: tl.constexpr):
    """(local ids in [0, BINS], positions, local positions) of row r's tile t: id - lo below
    N_IDS, BINS - 1 for padding below N, BINS past N (no token). NUM_IDS > 0: the ids were
    promised in [0, NUM_IDS); one outside joins the padding's segment, so no promised row
    attends to it in the tree pass (and the place kernel's START poisons its own row)."""
    p = tl.arange(0, TILE)
    pos = t * TILE + p
    ids = tl.load(IDS + r.to(tl.int64) * N_IDS + pos, mask=pos < N_IDS, other=0) - tl.load(LO)
    if NUM_IDS > 0:
        ids = tl.where((ids >= 0) & (ids < NUM_IDS), ids, BINS - 1)
    ids = tl.where(pos < N_IDS, ids, BINS - 1)
    return tl.where(pos < N, ids, BINS), pos, p


@triton.jit
def cluster_count_kernel(IDS, LO, COUNTS, N_IDS: tl.constexpr, N: tl.constexpr,
                         TILE: tl.constexpr, BINS: tl.constexpr, NUM_IDS: tl.constexpr):
    """COUNTS[r, t, c] (int32, [rows, tiles, BINS]): the tokens of row r's tile t whose
    local id is c."""
    t = tl.program_id(0)
    r = tl.program_id(1)
    ids, pos, _ = _tile_ids(IDS, LO, r, t, N_IDS, N, TILE, BINS, NUM_IDS)
    counts = tl.histogram(tl.minimum(ids, BINS - 1), BINS, mask=pos < N)
    tl.store(COUNTS + (r.to(tl.int64) * tl.num_programs(0) + t) * BINS + tl.arange(0, BINS),
             counts)


@triton.jit
def cluster_place_kernel(IDS, LO, OFFSET, FIRST, ORDER, START, INVERSE, N_IDS: tl.constexpr,
                         N: tl.constexpr, TILE: tl.constexpr, BINS: tl.constexpr,
                         INVERT: tl.constexpr, NUM_IDS: tl.constexpr):
    """Places row r's tile t. Its tokens sorted by (local id c, position): the k-th goes to
    slot d = OFFSET[r, t, c] + k, ORDER[r, d] = its position and START[r, d] = FIRST[r, c],
    the first slot of id c; with INVERT, INVERSE[r, position] = d. NUM_IDS > 0: a token
    whose id lies outside [0, NUM_IDS) gets START -1, which segment_fwd_kernel turns into a
    NaN row: a broken promise shows instead of passing for an answer."""
    t = tl.program_id(0)
    r = tl.program_id(1)
    ids, pos, p = _tile_ids(IDS, LO, r, t, N_IDS, N, TILE, BINS, NUM_IDS)
    keys = tl.sort(ids * TILE + p)  # unique keys: the stable order within the tile
    c = keys // TILE
    at = t * TILE + keys % TILE
    ok = c < BINS
    dest = tl.load(OFFSET + (r.to(tl.int64) * tl.num_programs(0) + t) * BINS + c, mask=ok,
                   other=0) + tl.arange(0, TILE)
    row = r.to(tl.int64) * N
    tl.store(ORDER + row + dest, at, mask=ok)
    first = tl.load(FIRST + r.to(tl.int64) * BINS + c, mask=ok, other=0)
    if NUM_IDS > 0:
        real = ok & (at < N_IDS)
        raw = tl.load(IDS + r.to(tl.int64) * N_IDS + at, mask=real, other=0)
        first = tl.where(real & ((raw < 0) | (raw >= NUM_IDS)), -1, first)
    tl.store(START + row + dest, first, mask=ok)
    if INVERT:
        tl.store(INVERSE + row + at, dest, mask=ok)
