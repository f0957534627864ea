"""Cluster ids wider than int32 are refused when they would alias after the int32 cast."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from pallas_kernels import block_sparse_attention, reference_attention

INTERPRET = jax.default_backend() == "cpu"


def _inputs(seed=0, b=1, s=16, h=2, d=8):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(3))
    ids = rng.integers(0, 3, (b, h, s))
    return q, k, v, ids


@pytest.mark.parametrize("entry", ["reference", "kernel"])
def test_ids_beyond_int32_are_refused(entry):
    q, k, v, ids = _inputs()
    wide = ids.astype(np.int64)
    wide[0, 1, 4] = 2**32 + 5          # would equal 5 after the cast
    attend = (reference_attention if entry == "reference" else
              lambda *a, **kw: block_sparse_attention(*a, backend="gpu" if INTERPRET else "auto",
                                                      interpret=INTERPRET, **kw))
    with pytest.raises(ValueError, match=r"q_clusters holds ids outside the int32 range "
                       r"\[-2\*\*31, 2\*\*31 - 1\] \(min 0, max 4294967301\)"):
        attend(q, k, v, wide, ids, window=4, sink_tokens=1)
    negative = ids.astype(np.int64)
    negative[0, 0, 0] = -(2**31) - 1
    with pytest.raises(ValueError, match=r"k_clusters holds ids outside the int32 range"):
        attend(q, k, v, ids, negative, window=4, sink_tokens=1)
    big_unsigned = ids.astype(np.uint32)
    big_unsigned[0, 0, 3] = 2**31      # -2**31 after the cast
    with pytest.raises(ValueError, match=r"k_clusters holds ids outside the int32 range"):
        attend(q, k, v, ids, big_unsigned, window=4, sink_tokens=1)


def test_int64_ids_within_range_equal_int32_ids():
    """In-range 64-bit ids are accepted and give the int32 result; the oracle is a float64
    numpy softmax over the allowed pairs (causal, and same cluster, in the window or a sink)."""
    q, k, v, ids = _inputs(seed=3)
    ids64 = ids.astype(np.int64) + (2**31 - 10)        # large but in range
    out = np.asarray(reference_attention(q, k, v, ids64, ids64, window=5, sink_tokens=1))
    s = q.shape[1]
    pos = np.arange(s)
    causal = pos[None, :] <= pos[:, None]
    near = (pos[:, None] - pos[None, :] < 5) | (pos[None, :] < 1)
    expected = np.zeros_like(out, dtype=np.float64)
    for h in range(q.shape[2]):
        allowed = causal & (near | (ids64[0, h][:, None] == ids64[0, h][None, :]))
        logits = q[0, :, h].astype(np.float64) @ k[0, :, h].T.astype(np.float64) / np.sqrt(8)
        logits = np.where(allowed, logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        expected[0, :, h] = w @ v[0, :, h].astype(np.float64)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)
