"""The schedule's Triton list compaction (triton_compact) against a numpy construction of the
lists, and build_schedule through it against the brute-force schedule.

Two runners, as test_triton_backend: triton's interpreter on hosts without a GPU, the compiled
kernel through jax_triton on a GPU host; each host runs one and skips the other, saying why.
"""
from __future__ import annotations

# First: test_triton_backend sets TRITON_INTERPRET before triton's first import on a host
# without a GPU, and holds the runner fixture.
from test_triton_backend import ON_GPU, interpret  # noqa: F401

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from block_oracle import brute_force  # noqa: E402
from test_block_schedule import (  # noqa: E402
    GEOMETRIES, assert_matches_brute_force, cluster_variants, cut_range_ids, unpack)

from pallas_kernels import build_schedule  # noqa: E402
from pallas_kernels.schedule import resolve_compaction  # noqa: E402


@pytest.fixture
def compaction(interpret):  # noqa: F811
    """build_schedule's compaction for the runner: the interpreter or the compiled kernel."""
    return "triton_interpret" if interpret else "triton"


# jitted: one compile per setting for every variant (eager, each call compiles a lax.cond)
jitted_schedule = jax.jit(build_schedule, static_argnames=(
    "window", "sink_tokens", "q_offset", "block_q", "block_k", "compaction", "num_ids"))


def numpy_lists(flags):
    """(indices, count, masked) per row of int flags [R, n] (1 masked, 2 full): the masked
    block indices ascending, then the full ones, then the last entry repeated (0 if none)."""
    rows, n = flags.shape
    idx = np.zeros((rows, n), np.int64)
    count = np.zeros(rows, np.int64)
    masked = np.zeros(rows, np.int64)
    for r in range(rows):
        entries = list(np.flatnonzero(flags[r] == 1)) + list(np.flatnonzero(flags[r] == 2))
        masked[r] = np.sum(flags[r] == 1)
        count[r] = len(entries)
        idx[r] = entries + [entries[-1] if entries else 0] * (n - len(entries))
    return idx, count, masked


# Rows longer than the kernel's chunk (1024) are read in several chunks; odd widths, empty
# rows, rows of only full or only masked blocks.
@pytest.mark.parametrize("rows, n, p_masked, p_full", [
    (7, 5, 0.3, 0.3), (3, 40, 0.1, 0.6), (2, 1500, 0.05, 0.05), (4, 17, 0.0, 0.0),
    (3, 33, 0.0, 1.0), (3, 64, 1.0, 0.0)])
def test_lists_match_numpy(compaction, rows, n, p_masked, p_full):
    from pallas_kernels.triton_compact import compact
    rng = np.random.default_rng(rows * 10_000 + n)
    u = rng.random((rows, n))
    masked, full = u < p_masked, (u >= p_masked) & (u < p_masked + p_full)
    got = compact(jnp.asarray(masked), jnp.asarray(full),
                  interpret=compaction == "triton_interpret")
    want = numpy_lists(masked.astype(np.int8) + 2 * full.astype(np.int8))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w)


# The lists themselves are checked above; these show build_schedule wired to the kernel
# (row lists and the transposed column lists; no window; a query offset with sinks).
@pytest.mark.parametrize("geometry, window, sink", [
    ((257, 257, 32, 16, 0), 0, 0), ((37, 100, 16, 16, 63), 5, 1)])
def test_schedule_through_kernel_matches_brute_force(compaction, geometry, window, sink):
    q_len, kv_len, bq, bk, q_offset = geometry
    rng = np.random.default_rng(q_len + kv_len + window)
    for qc, kc in cluster_variants(rng, 1, 2, q_len, kv_len, q_offset):
        s = jitted_schedule(jnp.asarray(qc, jnp.int32), jnp.asarray(kc, jnp.int32),
                            window=window, sink_tokens=sink, q_offset=q_offset, block_q=bq,
                            block_k=bk, compaction=compaction)
        assert_matches_brute_force(s, qc, kc, window=window, sink=sink, q_offset=q_offset,
                                   bq=bq, bk=bk)


def test_compaction_choices():
    from pallas_kernels.triton_backend import unavailable
    assert resolve_compaction("xla") == "xla"
    want = "triton" if ON_GPU and unavailable(False) is None else "xla"
    assert resolve_compaction("auto") == want
    with pytest.raises(ValueError, match="compaction must be one of"):
        resolve_compaction("cuda")


# The signature path decided inside the kernel: every window >= 1 setting of test_block_schedule's
# geometries (odd lengths, partial blocks, query offsets, sinks, windows past the sequence).
# Blocks of 64 and 128 positions as well.
SIGNATURE_SETTINGS = [(g, w, s) for g, settings in GEOMETRIES for w, s in settings if w >= 1] + [
    ((600, 600, 64, 128, 0), 20, 1), ((700, 650, 128, 64, 37), 100, 2)]


@pytest.mark.parametrize("geometry, window, sink", SIGNATURE_SETTINGS)
def test_signature_lists_match_brute_force(compaction, geometry, window, sink):
    """build_schedule with the lists decided in the kernel, both through the ids' range check
    and with the range promised (num_ids), on ids in [0, 50): seven contiguous runs, 50 ids
    drawn at random, and one head of each (the interpreter takes a while per program)."""
    q_len, kv_len, bq, bk, q_offset = geometry
    rng = np.random.default_rng(q_len * 31 + kv_len + window)
    variants = list(cluster_variants(rng, 1, 2, q_len, kv_len, q_offset))
    for n, (qc, kc) in enumerate(variants[i] for i in (2, 5, 6)):
        s = jitted_schedule(jnp.asarray(qc, jnp.int32), jnp.asarray(kc, jnp.int32),
                            window=window, sink_tokens=sink, q_offset=q_offset, block_q=bq,
                            block_k=bk, compaction=compaction, num_ids=50 * (n % 2))
        assert_matches_brute_force(s, qc, kc, window=window, sink=sink, q_offset=q_offset,
                                   bq=bq, bk=bk)


def test_signature_lists_call_the_kernel(compaction):
    """The in-kernel path is the one that ran: signature_lists gives build_schedule's lists."""
    from pallas_kernels.schedule import _signature_lists
    rng = np.random.default_rng(5)
    qc = jnp.asarray(rng.integers(0, 100, (2, 3, 90)), jnp.int32)
    got = _signature_lists(qc, qc, bq=16, bk=16, q_offset=0, window=3, sink_tokens=2,
                           interpret=compaction == "triton_interpret")
    want = build_schedule(qc, qc, window=3, sink_tokens=2, block_q=16, block_k=16,
                          compaction="xla")
    for g, w in zip(got, want[:6]):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_broken_promise_visits_a_superset(compaction):
    """Ids past num_ids alias other ids' signature bits: the schedule may list blocks the
    mask leaves empty (as masked ones), never miss one, and its full blocks stay exact."""
    q_len, bq = 300, 16
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 1000, (1, 2, q_len))  # many ids share a bit (id mod 128)
    s = build_schedule(jnp.asarray(ids, jnp.int32), jnp.asarray(ids, jnp.int32), window=4,
                       sink_tokens=1, block_q=bq, block_k=bq, compaction=compaction,
                       num_ids=100)
    visited, full, _ = brute_force(ids, ids, window=4, sink=1, q_offset=0, bq=bq, bk=bq)
    n = visited.shape[-1]
    got_visited, got_full = unpack(*(np.asarray(x) for x in s[:3]), n, n)
    assert np.all(got_visited >= visited) and np.any(got_visited > visited)
    np.testing.assert_array_equal(got_full, full)


def test_signature_lists_need_a_window():
    from pallas_kernels.triton_compact import signature_lists
    z = jnp.zeros((1, 1, 6, 2), jnp.int32)
    with pytest.raises(ValueError, match="needs a window of at least one token, got 0"):
        signature_lists(z, z, block_q=4, block_k=4, q_offset=0, q_len=8, kv_len=8, window=0,
                        sink_tokens=0, transposed=False)


@pytest.mark.parametrize("num_ids", [-1, 2.5, True])
def test_bad_num_ids_raise(num_ids):
    ids = jnp.zeros((1, 1, 8), jnp.int32)
    with pytest.raises(ValueError, match="num_ids .* must be an integer >= 0"):
        build_schedule(ids, ids, window=1, sink_tokens=0, num_ids=num_ids)


@pytest.mark.parametrize("geometry, window, sink", [((257, 257, 32, 16, 0), 1000, 4),
                                                    ((300, 300, 16, 16, 5), 20, 1)])
def test_signature_lists_over_several_chunks(compaction, geometry, window, sink, monkeypatch):
    """Rows longer than the kernel's chunk decide their flags twice (count, then place): with
    16-column chunks, rows of 17-19 blocks take that path in both directions."""
    from pallas_kernels import triton_compact
    monkeypatch.setattr(triton_compact, "MAX_CHUNK", 16)
    q_len, kv_len, bq, bk, q_offset = geometry
    rng = np.random.default_rng(q_len + window)
    variants = list(cluster_variants(rng, 1, 2, q_len, kv_len, q_offset))
    for qc, kc in (variants[2], variants[5]):
        s = build_schedule(jnp.asarray(qc, jnp.int32), jnp.asarray(kc, jnp.int32),
                           window=window, sink_tokens=sink, q_offset=q_offset, block_q=bq,
                           block_k=bk, compaction=compaction, num_ids=50)
        assert_matches_brute_force(s, qc, kc, window=window, sink=sink, q_offset=q_offset,
                                   bq=bq, bk=bk)


@pytest.mark.parametrize("sink", [0, 1])
def test_cut_ranges_see_every_change_of_id(compaction, sink):
    """test_block_schedule's cut ranges, decided in the kernel."""
    ids = cut_range_ids()
    s = build_schedule(jnp.asarray(ids, jnp.int32), jnp.asarray(ids, jnp.int32), window=200,
                       sink_tokens=sink, block_q=128, block_k=128, compaction=compaction,
                       num_ids=16)
    assert_matches_brute_force(s, ids, ids, window=200, sink=sink, q_offset=0, bq=128, bk=128)
