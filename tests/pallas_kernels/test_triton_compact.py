"""The schedule's Triton list compaction (triton_compact) against a numpy construction of the
lists, and build_schedule through it against the brute-force schedule.

Two runners, as test_triton_backend: triton's interpreter on hosts without a GPU, the compiled
kernel through jax_triton on a GPU host; each host runs one and skips the other, saying why.
"""
from __future__ import annotations

# First: test_triton_backend sets TRITON_INTERPRET before triton's first import on a host
# without a GPU, and holds the runner fixture.
from test_triton_backend import ON_GPU, interpret  # noqa: F401

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from test_block_schedule import assert_matches_brute_force, cluster_variants  # noqa: E402

from pallas_kernels import build_schedule  # noqa: E402
from pallas_kernels.schedule import resolve_compaction  # noqa: E402


@pytest.fixture
def compaction(interpret):  # noqa: F811
    """build_schedule's compaction for the runner: the interpreter or the compiled kernel."""
    return "triton_interpret" if interpret else "triton"


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
        s = build_schedule(jnp.asarray(qc, jnp.int32), jnp.asarray(kc, jnp.int32),
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
