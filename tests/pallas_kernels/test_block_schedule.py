"""build_schedule against a brute-force numpy construction from the full token mask."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from block_oracle import brute_force
from pallas_kernels import build_schedule

schedule = jax.jit(build_schedule, static_argnames=(
    "window", "sink_tokens", "q_offset", "block_q", "block_k"))


def unpack(indices, count, masked, n_rows, n_cols):
    """Dense (visited, full) flags from block lists; also checks the list invariants."""
    lead = indices.shape[:-2]
    visited = np.zeros((*lead, n_rows, n_cols), bool)
    full = np.zeros_like(visited)
    for idx in np.ndindex(*lead, n_rows):
        entries = indices[idx][:count[idx]]
        assert len(set(entries.tolist())) == len(entries), "a block is listed twice"
        assert np.all(indices[idx][count[idx]:] == (entries[-1] if len(entries) else 0))
        assert 0 <= masked[idx] <= count[idx]
        visited[idx][entries] = True
        full[idx][entries[masked[idx]:]] = True
    return visited, full


def cluster_variants(rng, batch, heads, q_len, kv_len, q_offset):
    total = max(kv_len, q_offset + q_len)
    pos = np.arange(total)
    for clusters in (1, 2, 7):  # contiguous runs, the same cut for queries and keys
        ids = np.broadcast_to(pos * clusters // total, (batch, heads, total))
        yield ids[..., q_offset:q_offset + q_len], ids[..., :kv_len]
    for clusters in (2, 7, 50):  # interleaved, queries and keys drawn independently
        yield (rng.integers(0, clusters, (batch, heads, q_len)),
               rng.integers(0, clusters, (batch, heads, kv_len)))
    ids = np.broadcast_to(pos * 5 // total, (batch, heads, total)).copy()
    ids[:, 1] = rng.integers(0, 5, (batch, total))  # one contiguous head, one interleaved
    yield ids[..., q_offset:q_offset + q_len], ids[..., :kv_len]


# (Sq, Sk, block_q, block_k, q_offset) x (window, sink) settings; each of the five main settings
# meets three geometries. Window 1000 exceeds every sequence; window 2**31 ("no window") and
# 2**40 sinks exceed int32 as well.
GEOMETRIES = [
    ((1, 1, 16, 16, 0), [(0, 0), (5, 1)]),
    ((100, 100, 16, 32, 0), [(1000, 4), (20, 0)]),
    ((257, 257, 32, 16, 0), [(0, 0), (1000, 4)]),
    ((37, 100, 16, 16, 63), [(5, 1), (20, 0), (2**31, 2**40)]),
    ((64, 300, 32, 32, 200), [(0, 0), (20, 0)]),
    ((200, 150, 16, 32, 10), [(5, 1), (1000, 4)]),
]


def assert_matches_brute_force(s, qc, kc, *, window, sink, q_offset, bq, bk):
    visited, full, density = brute_force(qc, kc, window=window, sink=sink, q_offset=q_offset,
                                         bq=bq, bk=bk)
    nq, nk = visited.shape[-2:]
    s = jax.tree.map(np.asarray, s)
    rows = unpack(s.kv_indices, s.kv_num_blocks, s.kv_num_masked, nq, nk)
    cols = unpack(s.q_indices, s.q_num_blocks, s.q_num_masked, nk, nq)
    np.testing.assert_array_equal(rows[0], visited)
    np.testing.assert_array_equal(rows[1], full)
    np.testing.assert_array_equal(np.swapaxes(cols[0], -1, -2), visited)
    np.testing.assert_array_equal(np.swapaxes(cols[1], -1, -2), full)
    assert float(s.density) == pytest.approx(density, abs=1e-6)


@pytest.mark.parametrize("geometry, window, sink", [
    (g, w, s) for g, settings in GEOMETRIES for w, s in settings])
def test_schedule_matches_brute_force(geometry, window, sink):
    q_len, kv_len, bq, bk, q_offset = geometry
    rng = np.random.default_rng(q_len * 1000 + kv_len + window)
    for qc, kc in cluster_variants(rng, 1, 2, q_len, kv_len, q_offset):
        # small ids (the signature path) and arbitrary int32 ids (the sorted-table path)
        for qc, kc in ((qc, kc), (np.asarray(qc, np.int32) * 7919 - 5,
                                  np.asarray(kc, np.int32) * 7919 - 5)):
            s = schedule(jnp.asarray(qc, jnp.int32), jnp.asarray(kc, jnp.int32), window=window,
                         sink_tokens=sink, q_offset=q_offset, block_q=bq, block_k=bk)
            assert_matches_brute_force(s, qc, kc, window=window, sink=sink, q_offset=q_offset,
                                       bq=bq, bk=bk)


@pytest.mark.parametrize("geometry, window, sink", [
    (g, w, s) for g, settings in GEOMETRIES for w, s in settings])
def test_signature_branch_matches_brute_force(geometry, window, sink):
    """The signature branch of the shared-cluster test called directly (the schedule's
    lax.cond takes it for ids in [0, SIGNATURE_IDS)), on ids in [0, 50)."""
    from pallas_kernels.schedule import _block_flags
    q_len, kv_len, bq, bk, q_offset = geometry
    rng = np.random.default_rng(q_len + 7 * kv_len + window)
    # jitted: one compile for every variant (eager, each call dispatched hundreds of ops)
    flags = jax.jit(jax.vmap(jax.vmap(lambda a, b: _block_flags(
        a, b, bq=bq, bk=bk, q_offset=q_offset, window=min(window, 2**31 - 1),
        sink_tokens=min(sink, 2**31 - 1), small_ids=True))))
    for qc, kc in cluster_variants(rng, 1, 2, q_len, kv_len, q_offset):
        visited, full = flags(jnp.asarray(qc, jnp.int32), jnp.asarray(kc, jnp.int32))
        want_visited, want_full, _ = brute_force(qc, kc, window=window, sink=sink,
                                                 q_offset=q_offset, bq=bq, bk=bk)
        np.testing.assert_array_equal(np.asarray(visited), want_visited)
        np.testing.assert_array_equal(np.asarray(full), want_full)


def cut_range_ids():
    """[1, 2, 768] ids in blocks of 128 whose key or row ranges a window of 200 cuts (offsets
    0..55 of the key block before the diagonal, rows 72..127 of the query block) change id
    inside the range (not full: query block 1, changes at 80 and 90; key block 2, at 40) or
    only outside it (full: key block 4, at 60; query block 5, at 10); with a one-token sink,
    key block 0 is cut past it."""
    a, b = 3, 9
    ids = np.array([a] * 128 + [a] * 80 + [b] * 10 + [a] * 38 + [a] * 40 + [b] * 88 + [a] * 128
                   + [a] * 60 + [b] * 68 + [b] * 10 + [a] * 118)
    return np.broadcast_to(ids, (1, 2, ids.size))


@pytest.mark.parametrize("sink", [0, 1])
def test_cut_ranges_see_every_change_of_id(sink):
    """The full-block test on ranges the window cuts, on both shared-cluster paths."""
    ids = cut_range_ids()
    for shift in (0, 1000):  # signature path, sorted-table path
        s = schedule(jnp.asarray(ids + shift, jnp.int32), jnp.asarray(ids + shift, jnp.int32),
                     window=200, sink_tokens=sink, block_q=128, block_k=128)
        assert_matches_brute_force(s, ids, ids, window=200, sink=sink, q_offset=0, bq=128,
                                   bk=128)


@pytest.mark.parametrize("geometry", [(100, 100, 16, 32, 0), (37, 100, 16, 16, 63),
                                      (120, 120, 32, 16, 0), (64, 300, 32, 32, 200)])
def test_window_of_one_keeps_exactly_the_diagonal_blocks(geometry):
    """With window >= 1 the schedule visits every block crossing the diagonal without testing
    its tokens. Window 1, no sink and ids that never repeat leave only the pairs (t, t): the
    schedule must list exactly the blocks holding one, on both shared-cluster paths."""
    q_len, kv_len, bq, bk, q_offset = geometry
    rng = np.random.default_rng()
    total = max(kv_len, q_offset + q_len)
    for ids in (rng.permutation(total) % 128 if total <= 128 else None,   # signature path
                rng.permutation(total) * 7 + 1000):                       # sorted-table path
        if ids is None:
            continue
        ids = np.broadcast_to(ids.astype(np.int32), (1, 2, total))
        qc, kc = ids[..., q_offset:q_offset + q_len], ids[..., :kv_len]
        s = schedule(jnp.asarray(qc), jnp.asarray(kc), window=1, sink_tokens=0,
                     q_offset=q_offset, block_q=bq, block_k=bk)
        assert_matches_brute_force(s, qc, kc, window=1, sink=0, q_offset=q_offset, bq=bq, bk=bk)


def test_contiguous_clusters_density_closed_form():
    """8 runs of 4 blocks, no sink or window: 8 * (4 * 5 / 2) of 32 * 33 / 2 causal blocks."""
    ids = jnp.repeat(jnp.arange(8, dtype=jnp.int32), 128)[None, None]
    s = schedule(ids, ids, window=0, sink_tokens=0, block_q=32, block_k=32)
    assert float(s.density) == pytest.approx(80 / 528)
    # every visited block is full except the 32 diagonal ones, which hold non-causal pairs
    assert int(jnp.sum(s.kv_num_masked)) == 32 and int(jnp.sum(s.kv_num_blocks)) == 80


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(window=-2), ValueError, "window must be >= 0"),
    (dict(block_q=0), ValueError, "block_q must be a positive"),
    (dict(q_clusters=jnp.zeros((1, 2, 8))), TypeError, "q_clusters must hold integer"),
    (dict(k_clusters=jnp.zeros((1, 3, 8), jnp.int32)), ValueError, "the same B and H"),
    (dict(k_clusters=jnp.zeros((1, 2, 8), jnp.float16)), TypeError, "k_clusters must hold integer"),
    (dict(q_offset=2**31 - 16), ValueError, r"q_offset \+ Sq \+ Sk must be < 2\*\*31"),
])
def test_bad_arguments_raise(kwargs, error, match):
    args = dict(q_clusters=jnp.zeros((1, 2, 8), jnp.int32), k_clusters=jnp.zeros((1, 2, 8),
                jnp.int32), window=1, sink_tokens=0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        build_schedule(**args)
