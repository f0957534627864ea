"""surgery.condense against a float64 numpy reference that loops over batch, query head and
query, on tiny random inputs (grouped kv heads, few clusters so that they repeat)."""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from ultrametric_jax.model.llama import causal_mask, masked_attention
from ultrametric_jax.surgery.condense import TIE, condensed_attention

B, S, H, G, D, N = 2, 26, 4, 2, 8, 4
WINDOW, SINK = 3, 1


def inputs(seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, S, H, D))
    k = rng.standard_normal((B, S, G, D))
    v = rng.standard_normal((B, S, G, D))
    clusters = rng.integers(0, N, (B, H, S))
    return q, k, v, clusters


def reference(q, k, v, clusters, *, window, sink, capacity, gamma, own, keep, medoid):
    """Output [B,S,H,D] float64, and how often the closest medoid differs from the newest."""
    out = np.zeros(q.shape)
    differs = 0
    for b, h, i in itertools.product(range(B), range(H), range(S)):
        g = h // (H // G)
        keys = [k[b, j, g] for j in range(i + 1) if j < sink or i - j < window]
        vals = [v[b, j, g] for j in range(i + 1) if j < sink or i - j < window]
        slots = []                                  # (rank, cluster, key, value)
        for c in range(N):
            members = [j for j in range(sink, i - window + 1) if clusters[b, h, j] == c]
            if not members:
                continue
            mean = np.mean([k[b, j, g] for j in members], axis=0)
            dist = [np.sum((k[b, j, g] - mean) ** 2) for j in members]
            # near ties (a pair is equidistant from its mean) go to the newest member
            closest = max(j for j, d in zip(members, dist)
                          if d - min(dist) <= TIE * np.sum(k[b, j, g] ** 2))
            newest = members[-1]
            differs += closest != newest
            key = k[b, closest if medoid == "closest" else newest, g]
            w = np.array([gamma ** (newest - j) for j in members])
            value = (w[:, None] * np.array([v[b, j, g] for j in members])).sum(0) / w.sum()
            rank = newest if keep == "recent" else len(members) * (S + 1) + newest
            slots.append((rank, c, key, value))
        slots.sort(key=lambda s: -s[0])
        for _, c, key, value in slots[:capacity]:
            if not own or c == clusters[b, h, i]:
                keys.append(key)
                vals.append(value)
        logits = np.array(keys) @ q[b, i, h] / np.sqrt(D)
        p = np.exp(logits - logits.max())
        out[b, i, h] = (p / p.sum()) @ np.array(vals)
    return out, differs


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
    ref, differs = reference(q, k, v, clusters, **kw)
    assert differs > 0                  # the medoid is not simply the newest member
    got = run(q, k, v, clusters, window=WINDOW, sink_tokens=SINK, capacity=capacity,
              gamma=gamma, own_cluster=own, keep=keep, medoid=medoid)
    assert rel_err(got, ref) < 2e-5
    # The summaries matter: the sink + window cache alone is far from it.
    plain, _ = reference(q, k, v, clusters, **{**kw, "capacity": 0})
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
    ref, _ = reference(q, k, v, clusters, **kw)
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
