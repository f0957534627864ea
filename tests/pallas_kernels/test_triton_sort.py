"""The counting sort of backend="triton" (triton_sort.py) against numpy's stable argsort.

The runners of test_triton_backend.py: triton's interpreter on a host without a GPU (outputs
start at -1, so a slot the kernels forget shows), jax_triton compiled on a GPU host.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_triton_backend import interpret  # noqa: F401  (the runner fixture)

from pallas_kernels import routed_attention
from pallas_kernels.reference import reference_attention
from pallas_kernels.sorted_layout import COUNTING_BINS, sort_clusters
from pallas_kernels.triton_backend import counting_sort


def numpy_sort(ids, length=None):
    """(order, starts, sorted ids, inverse) in float64-free numpy: a stable argsort per row,
    ids padded to length with a value past all of them; starts by walking each sorted row."""
    ids = np.asarray(ids, np.int64)
    if length is not None:
        pad = np.full((*ids.shape[:-1], length - ids.shape[-1]), ids.max() + 1)
        ids = np.concatenate([ids, pad], axis=-1)
    order = np.argsort(ids, axis=-1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, axis=-1)
    starts = np.zeros_like(order)
    for row, srow in zip(starts.reshape(-1, ids.shape[-1]), sorted_ids.reshape(-1, ids.shape[-1])):
        for t in range(1, len(srow)):
            row[t] = row[t - 1] if srow[t] == srow[t - 1] else t
    inverse = np.argsort(order, axis=-1)
    return order, starts, sorted_ids, inverse


class TestCountingSort:
    @pytest.mark.parametrize("shape, bins, tile, used, lo, length", [
        ((2, 3, 77), 16, 16, 9, 0, None),      # rows off the tile, a few ids unused
        ((1, 2, 300), 256, 64, 255, -3, 320),  # every bin, padded past the ids
        ((1, 1, 1000), 64, 128, 5, 7, None),   # long runs: ranks up to the tile
        ((3, 1, 40), 32, 64, 31, 0, 50),       # one tile, most of it past the row
        ((1, 4, 257), 2, 16, 1, 2, None)])     # one id: the order is the identity
    def test_matches_a_stable_argsort(self, interpret, shape, bins, tile, used, lo,  # noqa: F811
                                      length):
        rng = np.random.default_rng(sum(shape) * bins + tile)
        ids = (rng.integers(0, used, shape) + lo).astype(np.int32)
        order, starts, inverse = jax.jit(lambda ids: counting_sort(
            ids, bins, lo=jnp.int32(lo), length=length, tile=tile,
            interpret=interpret))(jnp.asarray(ids))
        want = numpy_sort(ids, length)
        np.testing.assert_array_equal(order, want[0])
        np.testing.assert_array_equal(starts, want[1])
        np.testing.assert_array_equal(inverse, want[3])

    def test_sorted_layout_sort_counts_narrow_ids_and_argsorts_wide_ones(self, interpret):  # noqa: F811
        """sort_clusters(backend="triton") equals numpy for ids at an offset (negative ids),
        padded to a longer length, and for ids too wide to count (the argsort branch), down to
        both ends of int32."""
        rng = np.random.default_rng(3)
        narrow = rng.integers(-7, 40, (2, 3, 90)).astype(np.int32)
        wide = narrow * 1000
        extreme = narrow.copy()
        extreme[0, 0, :2] = np.iinfo(np.int32).min, np.iinfo(np.int32).max
        # The widest span counted (the padding takes one more bin), and one past it.
        counted = rng.integers(0, COUNTING_BINS - 1, (1, 2, 600)).astype(np.int32)
        counted[..., :2] = 0, COUNTING_BINS - 2
        too_wide = counted.copy()
        too_wide[..., 2] = COUNTING_BINS - 1
        for ids, length in ((narrow, 96), (narrow, None), (wide, 128), (extreme, None),
                            (counted, 640), (too_wide, 640)):
            got = jax.jit(lambda ids, length=length: sort_clusters(
                ids, backend="triton", interpret=interpret, length=length))(jnp.asarray(ids))
            want = numpy_sort(ids, length)
            for name, g, w in zip(("order", "starts", "sorted ids", "inverse"), got, want):
                if name == "sorted ids":  # the padding holds int32's max, numpy's max + 1
                    g, w = g[..., :ids.shape[-1]], w[..., :ids.shape[-1]]
                np.testing.assert_array_equal(np.asarray(g), w, err_msg=name)

    def test_the_forward_sort_leaves_the_rest_out(self, interpret):  # noqa: F811
        ids = jnp.asarray(np.random.default_rng(5).integers(0, 6, (1, 2, 50)), jnp.int32)
        got = sort_clusters(ids, backend="triton", interpret=interpret, length=64, full=False)
        want = numpy_sort(ids, 64)
        assert got.sorted_ids is None and got.inverse is None
        np.testing.assert_array_equal(got.order, want[0])
        np.testing.assert_array_equal(got.starts, want[1])

    def test_wide_routes_run_through_the_argsort(self, interpret):  # noqa: F811
        """Cluster ids too wide to count (hashes, say): the fused forward takes the argsort
        branch and still equals the reference."""
        rng = np.random.default_rng(11)
        seq, hq, hkv, d = 45, 2, 1, 16
        q, k, v = (jnp.asarray(rng.standard_normal((1, seq, h, d)), jnp.float32)
                   for h in (hq, hkv, hkv))
        ids = jnp.asarray(rng.integers(0, 4, (1, hq, seq)) * 100_003 - 7, jnp.int32)
        kw = dict(window=5, sink_tokens=1)
        out = routed_attention(q, k, v, ids, **kw, layout="sorted", backend="triton",
                               interpret=interpret, block_q=16, block_k=16)
        want = reference_attention(q, k, v, ids, ids, **kw)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_bad_sort_arguments_are_refused():
    ids = jnp.zeros((1, 1, 8), jnp.int32)
    with pytest.raises(ValueError, match="bins must be a positive power of two, got 48"):
        counting_sort(ids, 48)
    with pytest.raises(ValueError, match="overflow int32"):
        counting_sort(jnp.zeros((1, 1, 4096), jnp.int32), 1 << 21, tile=1024)
    with pytest.raises(ValueError, match="shorter than the ids"):
        counting_sort(ids, 64, length=4)
    with pytest.raises(ValueError, match=r"num_ids must lie in \[0, bins = 64\), got 64"):
        counting_sort(ids, 64, num_ids=64)
    with pytest.raises(ValueError, match="tile must be a positive power of two, got 24"):
        counting_sort(jnp.zeros((1, 1, 4096), jnp.int32), 64, tile=24)
    with pytest.raises(ValueError, match="shorter than the ids"):
        sort_clusters(ids, backend="triton", length=4)


class TestPromisedClusterCount:
    """num_clusters (a surgical model's p ** cut): the ids counted without a range check."""

    def test_sort_counts_promised_ids_and_flags_the_rest(self, interpret):  # noqa: F811
        rng = np.random.default_rng(21)
        ids = rng.integers(0, 12, (2, 2, 70)).astype(np.int32)
        got = sort_clusters(jnp.asarray(ids), backend="triton", interpret=interpret, length=80,
                            num_ids=12)
        want = numpy_sort(ids, 80)
        for name, g, w in zip(("order", "starts", "inverse"), got[:2] + got[3:],
                              want[:2] + want[3:]):
            np.testing.assert_array_equal(np.asarray(g), w, err_msg=name)
        bad = ids.copy()
        bad[0, 1, [3, 40]] = 12, -1
        got = sort_clusters(jnp.asarray(bad), backend="triton", interpret=interpret,
                            num_ids=12)
        flagged = np.take_along_axis(np.asarray(got.starts) < 0, np.asarray(got.inverse), -1)
        assert sorted(zip(*np.nonzero(flagged))) == [(0, 1, 3), (0, 1, 40)]

    def test_promised_routes_match_the_reference_and_broken_ones_show(self, interpret):  # noqa: F811
        """Through routed_attention: equal to the reference under the promise; under jit, a
        token outside it makes its own row NaN and leaves every other row exact."""
        rng = np.random.default_rng(8)
        seq, hq, hkv, d = 70, 2, 1, 16
        q, k, v = (jnp.asarray(rng.standard_normal((1, seq, h, d)), jnp.float32)
                   for h in (hq, hkv, hkv))
        ids = rng.integers(0, 6, (1, hq, seq)).astype(np.int32)
        kw = dict(window=4, sink_tokens=1)
        run = jax.jit(lambda q, k, v, ids: routed_attention(
            q, k, v, ids, **kw, layout="sorted", backend="triton", interpret=interpret,
            block_q=16, block_k=16, num_clusters=6))
        want = reference_attention(q, k, v, jnp.asarray(ids), jnp.asarray(ids), **kw)
        np.testing.assert_allclose(np.asarray(run(q, k, v, ids)), np.asarray(want), atol=2e-5,
                                   rtol=2e-5)
        bad = ids.copy()
        bad[0, 1, 33] = 6
        out = np.asarray(run(q, k, v, bad))
        nan_rows = np.isnan(out).any(-1)            # [B, S, Hq]
        assert list(zip(*np.nonzero(nan_rows))) == [(0, 33, 1)]
        # the other rows: the reference with token 33 in a cluster of its own
        alone = bad.copy()
        alone[0, 1, 33] = 99
        want = np.asarray(reference_attention(q, k, v, jnp.asarray(alone), jnp.asarray(alone),
                                              **kw))
        keep = ~nan_rows
        np.testing.assert_allclose(out[keep], want[keep], atol=2e-5, rtol=2e-5)


def test_a_broken_cluster_count_is_refused_where_the_ids_are_concrete():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((1, 20, 2, 16)), jnp.float32)
    k = v = q[:, :, :1]
    ids = jnp.asarray(rng.integers(0, 5, (1, 2, 20)), jnp.int32)
    with pytest.raises(ValueError, match=r"clusters must lie in \[0, num_clusters = 4\)"):
        routed_attention(q, k, v, ids, window=2, sink_tokens=1, num_clusters=4)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="num_clusters must be an integer >= 1"):
            routed_attention(q, k, v, ids, window=2, sink_tokens=1, num_clusters=bad)
    from pallas_kernels.config import AttentionConfig
    with pytest.raises(ValueError, match="num_ids .* must be an integer >= 0, got -1"):
        AttentionConfig(q_len=20, kv_len=20, q_offset=0, window=2, sink_tokens=1, scale=0.25,
                        block_q=16, block_k=16, num_ids=-1)
