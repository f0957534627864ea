"""pallas_kernels.ring on 8 host CPU devices (the root conftest's XLA flag): output, LSE and
gradients against the masked dense reference, and the pruning plan against explicit masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from pallas_kernels import ring
from pallas_kernels.reference import dense_attention

B, S, HQ, HKV, D = 2, 64, 4, 2, 8


def mesh_of(n):
    assert jax.device_count() >= n, "tests need XLA_FLAGS=--xla_force_host_platform_device_count=8"
    return Mesh(np.array(jax.devices()[:n]), ("seq",))


def routes(rng, seq=S, heads=HQ, batch=B, scatter=0.05):
    """Contiguous runs (a different count per head) with a share of tokens sent to the next
    run: near chunk pairs hold route pairs, far ones none."""
    runs = rng.integers(4, 9, size=(batch, heads, 1))
    ids = np.arange(seq) * runs // seq
    return (ids + (rng.random((batch, heads, seq)) < scatter)).astype(np.int32)


def inputs(rng):
    q, ct = (jnp.asarray(rng.normal(size=(B, S, HQ, D)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(B, S, HKV, D)), jnp.float32) for _ in range(2))
    return q, k, v, ct


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def oracle_counts(qc, kc, n, window, sink):
    """[B, H, N, N] route pairs per chunk pair (a > b) from explicit S x S masks."""
    seq = qc.shape[-1]
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    local = (j < sink) | (i - j < window)
    route = (j <= i) & ~local & (qc[..., :, None] == kc[..., None, :])
    c = seq // n
    counts = route.reshape(*qc.shape[:2], n, c, n, c).sum(axis=(3, 5))
    return counts * np.tri(n, k=-1, dtype=int)


@pytest.mark.parametrize("n, window, sink, plan_kind", [
    (4, 5, 2, "exact"), (8, 3, 1, "exact"), (8, 0, 0, "exact"), (4, 9, 0, None),
    (8, 4, 8, "causal")])
def test_ring_matches_the_masked_reference_forward_and_backward(n, window, sink, plan_kind):
    rng = np.random.default_rng(n * 100 + window * 10 + sink)
    q, k, v, ct = inputs(rng)
    ids = jnp.asarray(routes(rng))
    plan = {"exact": lambda: ring.pruning_plan(ids, ids, n, window=window, sink_tokens=sink),
            "causal": lambda: ring.causal_plan(n), None: lambda: None}[plan_kind]()
    if plan_kind == "exact":   # the routes leave something to prune and something to send
        below = plan[np.tril_indices(n, -1)]
        assert below.any() and not below.all()
    mesh = mesh_of(n)

    def ring_loss(q, k, v):
        out, lse = ring.ring_attention(q, k, v, ids, ids, mesh=mesh, window=window,
                                       sink_tokens=sink, plan=plan, return_lse=True)
        return jnp.sum(out * ct) + jnp.sum(jnp.sin(lse)), (out, lse)

    def ref_loss(q, k, v):
        out, lse = dense_attention(q, k, v, ids, ids, window=window, sink_tokens=sink,
                                   q_offset=0, scale=None, return_lse=True)
        return jnp.sum(out * ct) + jnp.sum(jnp.sin(lse)), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(ring_loss, (0, 1, 2), has_aux=True))(
        q, k, v)
    (_, (ref, ref_lse)), ref_grads = jax.value_and_grad(ref_loss, (0, 1, 2), has_aux=True)(
        q, k, v)
    assert rel(out, ref) < 1e-5 and rel(lse, ref_lse) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert np.abs(np.asarray(r)).max() > 0
        assert rel(g, r) < 1e-5


def test_a_plan_that_drops_a_needed_pair_changes_the_result():
    rng = np.random.default_rng(7)
    q, k, v, _ = inputs(rng)
    ids = jnp.asarray(routes(rng))
    n, window, sink = 4, 3, 1
    plan = ring.pruning_plan(ids, ids, n, window=window, sink_tokens=sink)
    ref = dense_attention(q, k, v, ids, ids, window=window, sink_tokens=sink, q_offset=0,
                          scale=None, return_lse=False)
    a, b = [(a, b) for a, b in zip(*np.tril_indices(n, -1)) if plan[a, b]][0]
    cut = plan.copy()
    cut[a, b] = False
    out = jax.jit(lambda q, k, v: ring.ring_attention(
        q, k, v, ids, ids, mesh=mesh_of(n), window=window, sink_tokens=sink, plan=cut))(q, k, v)
    c = S // n
    diff = np.abs(np.asarray(out) - np.asarray(ref)).max(axis=(0, 2, 3))
    assert diff[a * c:(a + 1) * c].max() > 1e-3          # the rows of chunk a lost pairs
    assert np.delete(diff, np.s_[a * c:(a + 1) * c]).max() < 1e-5


@pytest.mark.parametrize("n, window, sink, clusters", [
    (2, 4, 1, 3), (4, 1, 0, 2), (8, 8, 3, 5), (4, 0, 5, 4), (8, 9, 8, 2)])
def test_route_pair_counts_and_plan_match_explicit_masks(n, window, sink, clusters):
    rng = np.random.default_rng(n + window + clusters)
    qc = rng.integers(0, clusters, size=(3, 2, S)).astype(np.int32)
    kc = np.where(rng.random(qc.shape) < 0.3, rng.integers(0, clusters, qc.shape), qc)
    expected = oracle_counts(qc, kc, n, window, sink)
    assert expected.sum() > 0
    counts = ring.route_pair_counts(qc, kc, n, window=window, sink_tokens=sink)
    np.testing.assert_array_equal(counts, expected)
    plan = ring.pruning_plan(qc, kc, n, window=window, sink_tokens=sink, per_head=True)
    np.testing.assert_array_equal(plan, (expected.sum(0) > 0) | np.eye(n, dtype=bool))
    np.testing.assert_array_equal(
        ring.pruning_plan(qc, kc, n, window=window, sink_tokens=sink), plan.any(0))


def test_bad_arguments_name_the_problem():
    rng = np.random.default_rng(3)
    q, k, v, _ = inputs(rng)
    ids = jnp.asarray(routes(rng))
    mesh = mesh_of(4)
    with pytest.raises(ring.RingError, match="must not exceed the chunk length 16"):
        ring.ring_attention(q, k, v, ids, ids, mesh=mesh, window=18, sink_tokens=0)
    with pytest.raises(ring.RingError, match="bool"):
        ring.ring_attention(q, k, v, ids, ids, mesh=mesh, window=2, sink_tokens=0,
                            plan=np.ones((2, 2), bool))
    with pytest.raises(ring.RingError, match="no axis 'tokens'"):
        ring.ring_attention(q, k, v, ids, ids, mesh=mesh, axis="tokens", window=2,
                            sink_tokens=0)
    with pytest.raises(ring.RingError, match="equal chunks"):
        ring.route_pair_counts(np.zeros((1, 1, 10), int), np.zeros((1, 1, 10), int), 4,
                               window=0, sink_tokens=0)
