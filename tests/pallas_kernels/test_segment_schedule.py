"""segment_schedule and band_schedule against the brute-force construction from the token mask,
and the sorted layout's block count against a closed-form bound."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import band_schedule, segment_schedule
# schedule: build_schedule jitted (eager, every shape compiled each of its ops)
from block_oracle import brute_force
from test_block_schedule import schedule, unpack

segments = jax.jit(segment_schedule, static_argnames=("block_q", "block_k"))
band = jax.jit(band_schedule, static_argnums=(0, 1, 2),
               static_argnames=("window", "sink_tokens", "block_q", "block_k"))


def sorted_ids(rng, batch, heads, seq, clusters):
    """Ids drawn per token at random, then sorted per head (as routed_attention sorts them);
    spread over int32, negatives included."""
    ids = np.sort(rng.integers(0, clusters, (batch, heads, seq)), axis=-1)
    return np.asarray(ids * 7919 - 40000, np.int32)


def dense_flags(s, nq, nk):
    s = jax.tree.map(np.asarray, s)
    rows = unpack(s.kv_indices, s.kv_num_blocks, s.kv_num_masked, nq, nk)
    cols = unpack(s.q_indices, s.q_num_blocks, s.q_num_masked, nk, nq)
    np.testing.assert_array_equal(np.swapaxes(cols[0], -1, -2), rows[0])
    np.testing.assert_array_equal(np.swapaxes(cols[1], -1, -2), rows[1])
    return rows


@pytest.mark.parametrize("seq, bq, bk", [(1, 16, 16), (37, 16, 16), (100, 16, 32),
                                         (257, 32, 16), (300, 32, 32), (128, 64, 16)])
@pytest.mark.parametrize("clusters", [1, 3, 20, 1000])
def test_segment_schedule_matches_brute_force(seq, bq, bk, clusters):
    """Same visited and full blocks as the explicit mask (window = sink = 0): full never claims
    a block holding a disallowed pair; lists obey the masked-first and padding rules."""
    rng = np.random.default_rng(seq * 31 + clusters)
    ids = sorted_ids(rng, 2, 3, seq, clusters)
    s = segments(jnp.asarray(ids), block_q=bq, block_k=bk)
    visited, full, density = brute_force(ids, ids, window=0, sink=0, q_offset=0, bq=bq, bk=bk)
    got_visited, got_full = dense_flags(s, *visited.shape[-2:])
    np.testing.assert_array_equal(got_visited, visited)
    np.testing.assert_array_equal(got_full, full)
    assert float(s.density) == pytest.approx(density, abs=1e-6)
    general = jax.tree.map(np.asarray, schedule(jnp.asarray(ids), jnp.asarray(ids), window=0,
                                                sink_tokens=0, block_q=bq, block_k=bk))
    np.testing.assert_array_equal(np.asarray(s.kv_num_blocks), general.kv_num_blocks)
    np.testing.assert_array_equal(np.asarray(s.q_num_masked), general.q_num_masked)


@pytest.mark.parametrize("seq, bq, bk", [(1, 16, 16), (100, 16, 32), (257, 32, 16)])
@pytest.mark.parametrize("window, sink", [(0, 0), (5, 1), (0, 40), (20, 0), (1000, 4)])
def test_band_schedule_lists_the_window_and_sink_blocks(seq, bq, bk, window, sink):
    """Visited: the blocks holding a pair allowed by the window or the sink alone (ids that
    never match); no block is full (the pass runs the "other cluster" token mask)."""
    qc = np.arange(seq, dtype=np.int32)[None, None].repeat(2, 1)
    visited, _, _ = brute_force(qc, -1 - qc, window=window, sink=sink, q_offset=0, bq=bq, bk=bk)
    s = band(1, 2, seq, window=min(window, seq), sink_tokens=min(sink, seq), block_q=bq,
             block_k=bk)
    got_visited, got_full = dense_flags(s, *visited.shape[-2:])
    np.testing.assert_array_equal(got_visited, visited)
    assert not got_full.any()


@pytest.mark.parametrize("clusters", [8, 32])
def test_sorted_layout_visits_far_fewer_blocks(clusters):
    """Ids drawn per token at random: the natural schedule visits every causal block, the sorted
    one at most sum_c (m_c + 1)(m_c + 2) / 2 with m_c = ceil(n_c / block), n_c the tokens of
    cluster c (a visited block pairs a query block and a key block of one segment, key block
    not after the query block; a segment meets at most m_c + 1 blocks)."""
    seq, block = 4096, 64
    rng = np.random.default_rng(clusters)
    ids = rng.integers(0, clusters, (1, 2, seq)).astype(np.int32)
    natural = schedule(jnp.asarray(ids), jnp.asarray(ids), window=0, sink_tokens=0,
                       block_q=block, block_k=block)
    nq = seq // block
    assert int(jnp.sum(natural.kv_num_blocks)) == 2 * nq * (nq + 1) // 2
    sorted_s = segments(jnp.sort(jnp.asarray(ids), axis=-1), block_q=block, block_k=block)
    visited = np.asarray(sorted_s.kv_num_blocks).sum(axis=-1)[0]             # per head
    for head in range(2):
        m = -(-np.bincount(ids[0, head], minlength=clusters) // block)
        bound = int(np.sum((m + 1) * (m + 2) // 2))
        assert visited[head] <= bound
        assert bound <= 0.2 * nq * (nq + 1) // 2
    assert float(sorted_s.density) <= 0.2 * float(natural.density)


@pytest.mark.parametrize("ids, kwargs, error, match", [
    (jnp.zeros((2, 8), jnp.int32), {}, ValueError, r"sorted_ids must be integer ids \[B, H, S\]"),
    (jnp.zeros((1, 2, 8)), {}, ValueError, r"sorted_ids must be integer ids \[B, H, S\], got "
     "float32"),
    (jnp.zeros((1, 2, 8), jnp.int32), dict(block_k=0), ValueError, "block_k must be a positive"),
])
def test_segment_schedule_bad_arguments_raise(ids, kwargs, error, match):
    with pytest.raises(error, match=match):
        segment_schedule(ids, **kwargs)
