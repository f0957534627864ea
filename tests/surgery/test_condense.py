"""surgery.condense against a float64 numpy reference that loops over batch, query head and
query, on tiny random inputs (grouped kv heads, few clusters so that they repeat)."""
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from ultrametric_jax.model.llama import causal_mask, masked_attention
from condense_reference import reference
from ultrametric_jax.surgery.condense import condensed_attention

B, S, H, G, D, N = 2, 26, 4, 2, 8, 4
WINDOW, SINK = 3, 1


def inputs(seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, S, H, D))
    k = rng.standard_normal((B, S, G, D))
    v = rng.standard_normal((B, S, G, D))
    clusters = rng.integers(0, N, (B, H, S))
    return q, k, v, clusters


def run(q, k, v, clusters, **kw):
    return np.asarray(condensed_attention(
        jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
        jnp.asarray(clusters, jnp.int32), num_clusters=N, **kw), np.float64)


CASES = [  # (capacity, own_cluster, keep, medoid, gamma)
    (1, False, "largest", "closest", 0.8),
    (2, False, "largest", "closest", 0.8),
    (2, True, "largest", "closest", 0.8),
    (3, False, "recent", "closest", 0.5),
    (3, True, "recent", "recent", 1.0),
    (N, False, "largest", "recent", 0.9),
    (N + 3, True, "largest", "closest", 0.9),          # more slots than clusters
]


@pytest.mark.parametrize("capacity,own,keep,medoid,gamma", CASES)
def test_matches_the_numpy_reference(capacity, own, keep, medoid, gamma):
    q, k, v, clusters = inputs(seed=capacity + 10 * own)
    kw = dict(window=WINDOW, sink=SINK, capacity=capacity, gamma=gamma, own=own, keep=keep,
              medoid=medoid)
    ref, differs = reference(q, k, v, clusters, N, **kw)
    assert differs > 0                  # the medoid is not simply the newest member
    got = run(q, k, v, clusters, window=WINDOW, sink_tokens=SINK, capacity=capacity,
              gamma=gamma, own_cluster=own, keep=keep, medoid=medoid)
    assert rel_err(got, ref) < 2e-5
    # The summaries matter: the sink + window cache alone is far from it.
    plain, _ = reference(q, k, v, clusters, N, **{**kw, "capacity": 0})
    assert rel_err(plain, ref) > 1e-2


def test_capacity_zero_is_the_masked_sink_and_window_attention():
    q, k, v, clusters = inputs(seed=3)
    got = run(q, k, v, clusters, window=5, sink_tokens=2, capacity=0, gamma=1.0,
              own_cluster=False)
    pos = np.arange(S)
    i, j = pos[:, None], pos[None, :]
    mask = causal_mask(jnp.asarray(pos[None]), jnp.asarray(pos[None])) & ((j < 2) | (i - j < 5))
    want = masked_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), mask, D ** -0.5)
    assert rel_err(got, np.asarray(want)) < 1e-5


def test_long_decay_does_not_underflow():
    """gamma ** S underflows float32; the weights relative to the newest member do not."""
    q, k, v, clusters = inputs(seed=5)
    kw = dict(window=WINDOW, sink=SINK, capacity=2, gamma=0.01, own=False, keep="largest",
              medoid="closest")
    ref, _ = reference(q, k, v, clusters, N, **kw)
    got = run(q, k, v, clusters, window=WINDOW, sink_tokens=SINK, capacity=2, gamma=0.01,
              own_cluster=False)
    assert np.isfinite(got).all() and rel_err(got, ref) < 2e-5


@pytest.mark.parametrize("option,value,message", [
    ("window", 0, "window must be >= 1"),
    ("capacity", -1, "capacity must be >= 0"),
    ("gamma", 0.0, r"gamma must lie in \(0, 1\]"),
    ("gamma", 1.5, r"gamma must lie in \(0, 1\]"),
    ("keep", "oldest", "keep must be one of"),
    ("medoid", "mean", "medoid must be one of"),
])
def test_bad_options_are_named(option, value, message):
    q, k, v, clusters = inputs(seed=0)
    kw = dict(window=WINDOW, sink_tokens=SINK, capacity=2, gamma=0.9, own_cluster=False)
    kw[option] = value
    with pytest.raises(ValueError, match=message):
        run(q, k, v, clusters, **kw)


def test_cluster_shape_is_checked():
    q, k, v, clusters = inputs(seed=0)
    with pytest.raises(ValueError, match=r"clusters must be \[B,H,S\]"):
        run(q, k, v, clusters[:, :2], window=WINDOW, sink_tokens=SINK, capacity=2, gamma=0.9,
            own_cluster=False)


def test_traced_window_capacity_and_read_rule_match_static_ones():
    """One compiled function serves every cache: window, capacity and own_cluster traced."""
    import jax
    q, k, v, clusters = inputs(seed=7)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)] + [jnp.asarray(clusters, jnp.int32)]
    fn = jax.jit(lambda q, k, v, c, window, capacity, own: condensed_attention(
        q, k, v, c, window=window, sink_tokens=SINK, capacity=capacity, gamma=0.8,
        num_clusters=N, own_cluster=own, max_capacity=3))
    for window, capacity, own in [(WINDOW, 2, False), (WINDOW, 3, True), (WINDOW + 2, 0, False)]:
        ref, _ = reference(q, k, v, clusters, N, window=window, sink=SINK, capacity=capacity,
                           gamma=0.8, own=own, keep="largest", medoid="closest")
        assert rel_err(np.asarray(fn(*args, window, capacity, own), np.float64), ref) < 2e-5
