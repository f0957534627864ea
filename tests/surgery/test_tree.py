"""Closed forms, properties and float64 oracles of the ultrametric math."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ultrametric_jax.surgery import tree as um


def one_hot_routes(digits, arity):
    """int digits [..., S, L] -> float32 one-hot [..., S, L, p]."""
    return jax.nn.one_hot(jnp.asarray(digits), arity, dtype=jnp.float32)


def np_hard_distance(digits):
    """L minus the number of leading (root-first) digits on which two routes agree."""
    digits = np.asarray(digits)
    s, levels = digits.shape
    out = np.zeros((s, s), np.int64)
    for i, j in itertools.product(range(s), range(s)):
        agree = 0
        while agree < levels and digits[i, agree] == digits[j, agree]:
            agree += 1
        out[i, j] = levels - agree
    return out


def np_allowed(q_clusters, k_clusters, window, sink, q_offset=0):
    sq, sk = len(q_clusters), len(k_clusters)
    out = np.zeros((sq, sk), bool)
    for a in range(sq):
        i = a + q_offset
        for j in range(sk):
            out[a, j] = j <= i and (q_clusters[a] == k_clusters[j] or j < sink or i - j < window)
    return out


# ---------------------------------------------------------------- closed forms

CLOSED_FORM_DIGITS = [[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]]  # t0..t3, level 0 = root


@pytest.mark.parametrize("depth_op", um.DEPTH_OPS)
def test_closed_form_distances(depth_op):
    d = um.ultrametric_distance(one_hot_routes(CLOSED_FORM_DIGITS, 2), depth_op)
    d = np.asarray(d)
    np.testing.assert_array_equal(d[0], [0, 1, 2, 3])
    assert d[1, 2] == 2 and d[1, 3] == 3 and d[2, 3] == 3
    np.testing.assert_array_equal(d, d.T)


def test_closed_form_soft_mask():
    d = um.ultrametric_distance(one_hot_routes(CLOSED_FORM_DIGITS, 2))
    soft = np.asarray(um.soft_tree_mask(d[0], d_max=1, temperature=0.5), np.float64)
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    np.testing.assert_allclose(soft, [sig(2.0), 0.5, sig(-2.0), sig(-4.0)], rtol=1e-6)


def test_soft_depth_closed_form():
    # Two tokens with child probabilities (a, 1-a) and (b, 1-b) at both of 2 levels:
    # M = ab + (1-a)(1-b); cumprod depth = M + M^2, cummin depth = 2M.
    a, b = 0.3, 0.8
    assign = jnp.array([[[a, 1 - a]] * 2, [[b, 1 - b]] * 2], jnp.float32)
    m = a * b + (1 - a) * (1 - b)
    np.testing.assert_allclose(um.expected_depth(assign, "cumprod")[0, 1], m + m * m, rtol=1e-6)
    np.testing.assert_allclose(um.expected_depth(assign, "cummin")[0, 1], 2 * m, rtol=1e-6)


def test_hard_digits_and_cluster_ids():
    logits = one_hot_routes([[2, 0, 1], [1, 2, 2]], 3) * 3.0 - 1.0
    digits = um.hard_digits(logits)
    assert digits.dtype == jnp.int32
    np.testing.assert_array_equal(digits, [[2, 0, 1], [1, 2, 2]])
    np.testing.assert_array_equal(um.hard_digits(one_hot_routes(digits, 3)), digits)
    np.testing.assert_array_equal(um.cluster_ids(digits, 3, 2), [2 * 3 + 0, 1 * 3 + 2])
    np.testing.assert_array_equal(um.cluster_ids(digits, 3, 3), [2 * 9 + 0 + 1, 9 + 6 + 2])
    np.testing.assert_array_equal(um.cluster_ids(digits, 3, 0), [0, 0])
    assert um.cluster_ids(digits, 3, 2).dtype == jnp.int32


@pytest.mark.parametrize("arity", [2, 3, 4, 8])
def test_small_argmax_equals_numpy_argmax_with_ties_nans_and_infinities(arity):
    rng = np.random.default_rng(arity)
    # Few distinct values, so ties are common; NaN and +-inf sprinkled in.
    x = rng.integers(-2, 3, size=(7, 33, 5, arity)).astype(np.float32)
    special = rng.random(x.shape)
    x[special < 0.05] = np.nan
    x[(special >= 0.05) & (special < 0.08)] = np.inf
    x[(special >= 0.08) & (special < 0.11)] = -np.inf
    got = np.asarray(jax.jit(um.small_argmax)(jnp.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert np.isnan(x).any(axis=-1).any() and (got > 0).any()


def test_hard_digits_run_without_a_reduction():
    # A reduction over the p children is what was slow on the GPU: the digits are elementwise.
    jaxpr = jax.make_jaxpr(um.hard_digits)(jnp.zeros((2, 16, 4, 3)))
    names = {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}
    assert not names & {"argmax", "reduce_max", "reduce"}, names
    slow = jax.make_jaxpr(lambda x: jnp.argmax(x, -1))(jnp.zeros((2, 16, 4, 3)))
    assert "argmax" in {eqn.primitive.name for eqn in slow.jaxpr.eqns}


def test_cluster_ids_errors():
    digits = jnp.zeros((4, 3), jnp.int32)
    with pytest.raises(ValueError, match="cut_level=4 must lie in"):
        um.cluster_ids(digits, 2, 4)
    with pytest.raises(ValueError, match="do not fit in int32"):
        um.cluster_ids(jnp.zeros((4, 40), jnp.int32), 2, 32)
    with pytest.raises(ValueError, match="arity=1 must be >= 2"):
        um.cluster_ids(digits, 1, 2)
    with pytest.raises(ValueError, match="unknown depth_op"):
        um.expected_depth(one_hot_routes(digits, 2), "cumsum")
    with pytest.raises(ValueError, match=r"assign must have shape \[..., S, L, p\], got \(3, 2\)"):
        um.expected_depth(jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="unknown ste"):
        um.bridged_softmax(jnp.zeros((2, 2)), jnp.ones((2, 2)), jnp.ones((2, 2), bool), "soft")


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4), st.integers(1, 5), st.integers(1, 5), st.data())
def test_hard_distance_matches_prefix_rule_and_cluster_ids(arity, levels, cut, data):
    cut = min(cut, levels)
    digits = np.array(data.draw(st.lists(st.lists(st.integers(0, arity - 1), min_size=levels,
                                                  max_size=levels), min_size=2, max_size=7)))
    d = np.asarray(um.ultrametric_distance(one_hot_routes(digits, arity)))
    np.testing.assert_array_equal(d, np_hard_distance(digits))
    ids = np.asarray(um.cluster_ids(jnp.asarray(digits), arity, cut))
    # Same cluster at cut level k  <=>  d <= L - k.
    np.testing.assert_array_equal(ids[:, None] == ids[None, :], d <= levels - cut)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 3), st.integers(1, 5), st.data())
def test_hard_distances_are_ultrametric(arity, levels, data):
    digits = data.draw(st.lists(st.lists(st.integers(0, arity - 1), min_size=levels,
                                         max_size=levels), min_size=3, max_size=8))
    d = np.asarray(um.ultrametric_distance(one_hot_routes(digits, arity)))
    assert (np.diag(d) == 0).all() and (d == d.T).all()
    # d(x, z) <= max(d(x, y), d(y, z)) for every triple.
    strong = d[:, None, :] <= np.maximum(d[:, :, None], d[None, :, :])  # [x, y, z]
    assert strong.all()


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4), st.integers(1, 6), st.data())
def test_cumprod_equals_cummin_on_one_hot(arity, levels, data):
    digits = data.draw(st.lists(st.lists(st.integers(0, arity - 1), min_size=levels,
                                         max_size=levels), min_size=1, max_size=6))
    a = one_hot_routes(digits, arity)
    np.testing.assert_array_equal(um.expected_depth(a, "cumprod"), um.expected_depth(a, "cummin"))


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 4), st.integers(1, 6), st.integers(0, 2**31 - 1), st.floats(0.05, 20.0))
def test_soft_depth_within_bounds(arity, levels, seed, scale):
    logits = scale * jax.random.normal(jax.random.key(seed), (5, levels, arity))
    a = jax.nn.softmax(logits, axis=-1)
    for op in um.DEPTH_OPS:
        depth = np.asarray(um.expected_depth(a, op), np.float64)
        # float32 products of probabilities can exceed 1 by a rounding unit per level.
        assert depth.min() >= 0.0
        assert depth.max() <= levels * (1 + 4 * np.finfo(np.float32).eps)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 4), st.integers(1, 6), st.data())
def test_gradients_finite_on_exact_one_hot(arity, levels, data):
    digits = data.draw(st.lists(st.lists(st.integers(0, arity - 1), min_size=levels,
                                         max_size=levels), min_size=2, max_size=6))
    a = one_hot_routes(digits, arity)
    weights = jax.random.normal(jax.random.key(len(digits)), (len(digits), len(digits)))
    for op in um.DEPTH_OPS:
        def loss(x):
            d = um.ultrametric_distance(x, op)
            return jnp.sum(weights * um.soft_tree_mask(d, levels // 2, 0.5))
        g = np.asarray(jax.grad(loss)(a))
        assert np.isfinite(g).all()
    # Zero rows (all children probability 0) are also finite.
    zeros = jnp.zeros_like(a)
    for op in um.DEPTH_OPS:
        g = jax.grad(lambda x: jnp.sum(um.expected_depth(x, op) * weights))(zeros)
        assert np.isfinite(np.asarray(g)).all()


def test_cumprod_gradient_closed_form_on_one_hot():
    # Two tokens, L=2, p=2, both on child 0: depth(0,1) = M0 + M0*M1 with M_l = sum_c a0c a1c.
    # d depth / d a_{0,l=0,c} = a_{1,0,c} (1 + M1) = [2, 0];
    # d depth / d a_{0,1,c} = M0 a_{1,1,c} = [1, 0].
    a = one_hot_routes([[0, 0], [0, 0]], 2)
    g = jax.grad(lambda x: um.expected_depth(x, "cumprod")[0, 1])(a)
    np.testing.assert_array_equal(np.asarray(g[0]), [[2.0, 0.0], [1.0, 0.0]])


# ---------------------------------------------------------------- Gumbel relaxation

def test_gumbel_softmax_hard_is_one_hot_with_soft_gradient():
    logits = jax.random.normal(jax.random.key(0), (6, 3, 4))
    rng = jax.random.key(1)
    tau = 0.7
    y = um.gumbel_softmax(logits, tau, rng, hard=True)
    assert set(np.unique(np.asarray(y))) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.asarray(y).sum(-1), 1.0)
    soft = um.gumbel_softmax(logits, tau, rng, hard=False)
    np.testing.assert_array_equal(np.argmax(np.asarray(y), -1), np.argmax(np.asarray(soft), -1))
    # The straight-through gradient is the soft sample's gradient.
    w = jax.random.normal(jax.random.key(2), logits.shape)
    g_hard = jax.grad(lambda x: jnp.sum(w * um.gumbel_softmax(x, tau, rng, hard=True)))(logits)
    g_soft = jax.grad(lambda x: jnp.sum(w * um.gumbel_softmax(x, tau, rng, hard=False)))(logits)
    np.testing.assert_allclose(g_hard, g_soft, rtol=1e-6, atol=1e-7)
    # Oracle: softmax((logits + g) / tau) in float64 with the same noise.
    g = np.asarray(jax.random.gumbel(rng, logits.shape, jnp.float32), np.float64)
    z = (np.asarray(logits, np.float64) + g) / tau
    ref = np.exp(z - z.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(soft), ref, rtol=1e-5, atol=1e-6)


def test_scaled_gumbel_noise_against_numpy_and_zero_noise_is_the_argmax():
    logits = jax.random.normal(jax.random.key(3), (5, 4, 3))
    rng, tau = jax.random.key(4), 0.6
    g = np.clip(np.asarray(jax.random.gumbel(rng, logits.shape, jnp.float32), np.float64),
                -1.5, 1.5)
    soft = um.gumbel_softmax(logits, tau, rng, hard=False, noise_bound=1.5, noise_scale=0.3)
    z = (np.asarray(logits, np.float64) + 0.3 * g) / tau
    ref = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(soft), ref / ref.sum(-1, keepdims=True), rtol=1e-5,
                               atol=1e-6)
    # No noise: the routes evaluation runs, with the gradient of softmax(logits / tau).
    hard = um.gumbel_softmax(logits, tau, rng, hard=True, noise_scale=0.0)
    np.testing.assert_array_equal(np.asarray(hard), np.asarray(um.hard_assignment(logits)))
    w = np.asarray(jax.random.normal(jax.random.key(5), logits.shape), np.float64)
    grad = jax.grad(lambda x: jnp.sum(w * um.gumbel_softmax(x, tau, rng, noise_scale=0.0)))(
        logits)
    p = np.exp(np.asarray(logits, np.float64) / tau)
    p /= p.sum(-1, keepdims=True)
    want = p * (w - np.sum(w * p, -1, keepdims=True)) / tau
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-6)


def test_bounded_noise_never_overturns_the_collapse_margin():
    margin = 5.0
    logits = jnp.broadcast_to(jnp.array([margin, -margin, -margin]), (64, 13, 3))
    for seed in range(200):
        y = um.gumbel_softmax(logits, 1.0, jax.random.key(seed), noise_bound=margin)
        assert (np.asarray(y)[..., 0] == 1.0).all()
    # Unbounded noise strays (probability 1/(1+e^10) per choice): seen over these draws.
    strays = sum(int((np.asarray(um.gumbel_softmax(logits, 1.0, jax.random.key(s)))[..., 0]
                      == 0).sum()) for s in range(200))
    assert strays > 0


def test_straight_through_forward_is_exact():
    hard = jnp.array([0.0, 1.0, 1.0])
    soft = jnp.array([0.1, 0.3, 0.9999999])
    np.testing.assert_array_equal(um.straight_through(hard, soft), hard)
    g = jax.grad(lambda s: jnp.sum(jnp.array([1.0, 2.0, 3.0]) * um.straight_through(hard, s)))(soft)
    np.testing.assert_array_equal(g, [1.0, 2.0, 3.0])


# ---------------------------------------------------------------- masks

@pytest.mark.parametrize("window,sink,q_offset", [(0, 0, 0), (2, 1, 0), (3, 2, 4), (0, 3, 2)])
def test_allowed_mask_matches_loop_oracle(window, sink, q_offset):
    rng = np.random.default_rng(window * 10 + sink)
    for _ in range(5):
        q = rng.integers(0, 3, size=6)
        k = rng.integers(0, 3, size=6 + q_offset)
        q_pos = jnp.asarray(q_offset + np.arange(6))[None]
        k_pos = jnp.asarray(np.arange(6 + q_offset))[None]
        got = um.allowed_mask(q_pos, k_pos, jnp.asarray(q)[None, None], jnp.asarray(k)[None, None],
                              window, sink)
        want = np_allowed(q, k, window, sink, q_offset)
        np.testing.assert_array_equal(np.asarray(got)[0, 0], want)


def test_allowed_mask_batched_heads_and_padding():
    c = jnp.array([[[0, 1, 0, 1], [2, 2, 2, 2]], [[0, 0, 1, 1], [3, 1, 3, 1]]])  # [B=2, H=2, S=4]
    pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
    valid = jnp.array([[True] * 4, [True, True, True, False]])
    got = np.asarray(um.allowed_mask(pos, pos, c, c, 1, 0, valid))
    assert got.shape == (2, 2, 4, 4)
    for b in range(2):
        for h in range(2):
            want = np_allowed(np.asarray(c[b, h]), np.asarray(c[b, h]), 1, 0)
            np.testing.assert_array_equal(got[b, h], want & np.asarray(valid[b])[None, :])
    # Cluster ids broadcast over heads: [B, 1, S] gives [B, 1, Sq, Sk].
    assert um.allowed_mask(pos, pos, c[:, :1], c[:, :1], 1, 0).shape == (2, 1, 4, 4)


@pytest.mark.parametrize("window,sink,seq", [(0, 0, 9), (2, 1, 9), (3, 4, 9), (12, 2, 9),
                                             (0, 12, 9), (4, 0, 1)])
def test_pair_counts_match_loop_oracle(window, sink, seq):
    rng = np.random.default_rng(window + 7 * sink + seq)
    clusters = rng.integers(0, 3, size=(2, 3, seq))
    tree, allowed, causal = (np.asarray(a) for a in um.pair_counts(
        jnp.asarray(clusters, jnp.int32), window, sink))
    assert tree.shape == allowed.shape == causal.shape == (2, 3)
    for b in range(2):
        for h in range(3):
            c = clusters[b, h]
            causal_pairs = np.tril(np.ones((seq, seq), bool))
            assert tree[b, h] == (causal_pairs & (c[:, None] == c[None, :])).sum()
            assert allowed[b, h] == np_allowed(c, c, window, sink).sum()
            assert causal[b, h] == causal_pairs.sum()
    with pytest.raises(ValueError, match="window=-1 and sink_tokens=0 must be >= 0"):
        um.pair_counts(jnp.asarray(clusters), -1, 0)
    # Without padding no running sum is left for XLA to fold as a constant at compile time.
    jaxpr = str(jax.make_jaxpr(lambda c: um.pair_counts(c, window, sink))(
        jnp.asarray(clusters, jnp.int32)))
    assert "cumsum" not in jaxpr and "cumlogsumexp" not in jaxpr


# ---------------------------------------------------------------- straight-through bridge

def np_masked_softmax(scores, allowed):
    s = np.where(allowed, scores.astype(np.float64), -np.inf)
    mx = s.max(-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.where(allowed, np.exp(s - mx), 0.0)
    tot = e.sum(-1, keepdims=True)
    return e / np.where(tot > 0, tot, 1.0)


def random_bridge_inputs(seed, s=7):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(2, 3, s, s)).astype(np.float32) * 3
    hard = rng.random((2, 3, s, s)) < 0.5
    soft = rng.random((2, 3, s, s)).astype(np.float32)
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    causal = np.broadcast_to(j <= i, scores.shape)
    fixed = np.broadcast_to((j < 1) | (i - j < 2), scores.shape)       # sink 1, window 2
    allowed = causal & (hard | fixed)
    return scores, hard, soft, causal, fixed, allowed


@pytest.mark.parametrize("ste", um.STE_FORMS)
def test_bridge_forward_equals_masked_softmax(ste):
    for seed in range(3):
        scores, hard, soft, causal, fixed, allowed = random_bridge_inputs(seed)
        m = um.straight_through_mask(jnp.asarray(allowed), jnp.asarray(soft), causal & ~fixed)
        np.testing.assert_array_equal(np.asarray(m), allowed.astype(np.float32))
        p = um.bridged_softmax(jnp.asarray(scores), m, jnp.asarray(allowed), ste)
        np.testing.assert_allclose(np.asarray(p), np_masked_softmax(scores, allowed),
                                   rtol=1e-5, atol=1e-7)


def test_bridge_gradient_reaches_masked_pairs_only_with_gate():
    scores, hard, soft, causal, fixed, allowed = random_bridge_inputs(5)
    cot = np.random.default_rng(9).normal(size=scores.shape).astype(np.float32)
    masked_tree = causal & ~fixed & ~hard
    grads = {}
    for ste in um.STE_FORMS:
        def loss(soft_values):
            m = um.straight_through_mask(jnp.asarray(allowed), soft_values, causal & ~fixed)
            return jnp.sum(cot * um.bridged_softmax(jnp.asarray(scores), m, allowed, ste))
        grads[ste] = np.asarray(jax.grad(loss)(jnp.asarray(soft)))
    assert np.isfinite(grads["gate"]).all() and np.isfinite(grads["renorm"]).all()
    assert masked_tree.any()
    assert (np.abs(grads["gate"][masked_tree]) > 0).all()
    assert (grads["renorm"][masked_tree] == 0).all()
    # Fixed (sink/window) and non-causal pairs carry constants: no gradient in either form.
    for g in grads.values():
        assert (g[fixed | ~causal] == 0).all()
    # Gate gradient at a masked pair, closed form: dL/dm_ij = e^{s_ij}/Z (c_ij - sum_k p_ik c_ik).
    p = np_masked_softmax(scores, allowed)
    s64 = scores.astype(np.float64)
    mx = np.where(allowed, s64, -np.inf).max(-1, keepdims=True)
    z = np.where(allowed, np.exp(s64 - mx), 0).sum(-1, keepdims=True)
    dm = np.exp(s64 - mx) / z * (cot - (p * cot).sum(-1, keepdims=True))
    np.testing.assert_allclose(grads["gate"][masked_tree], dm[masked_tree], rtol=1e-4, atol=1e-6)


def test_bridge_survives_extreme_masked_scores():
    scores = jnp.array([[0.0, -1e4, 0.0], [500.0, 0.0, 0.0], [1e4, 0.0, -3.0]])
    allowed = jnp.array([[True, False, False], [False, True, False], [False, True, True]])
    m = allowed.astype(jnp.float32)
    for ste in um.STE_FORMS:
        p, vjp = jax.vjp(lambda mm: um.bridged_softmax(scores, mm, allowed, ste), m)
        np.testing.assert_allclose(p, np_masked_softmax(np.asarray(scores), np.asarray(allowed)),
                                   rtol=1e-6)
        assert np.isfinite(np.asarray(vjp(jnp.ones_like(p))[0])).all()


def test_fully_masked_row_gives_zeros():
    scores = jnp.ones((2, 3))
    allowed = jnp.array([[False] * 3, [True, False, True]])
    for ste in um.STE_FORMS:
        p = np.asarray(um.bridged_softmax(scores, allowed.astype(jnp.float32), allowed, ste))
        np.testing.assert_array_equal(p[0], 0.0)
        np.testing.assert_allclose(p[1], [0.5, 0.0, 0.5])


# ---------------------------------------------------------------- load balancing

def test_load_balance_uniform_collapsed_and_padding():
    b, h, s, levels, p = 2, 3, 8, 4, 4
    # Uniform: soft probabilities 1/p and hard children spread evenly over the tokens.
    soft = jnp.full((b, h, s, levels, p), 1.0 / p)
    hard = jax.nn.one_hot(jnp.broadcast_to(jnp.arange(s)[:, None] % p, (b, h, s, levels)), p)
    np.testing.assert_allclose(um.load_balance_loss(soft, hard, p), 1.0, rtol=1e-6)
    # Collapsed: everything on child 0.
    collapsed = jax.nn.one_hot(jnp.zeros((b, h, s, levels), jnp.int32), p)
    np.testing.assert_allclose(um.load_balance_loss(collapsed, collapsed, p), float(p), rtol=1e-6)
    # Padding is excluded: the padded tokens (collapsed) would unbalance a uniform batch.
    mixed = jnp.concatenate([hard[:, :, :4], collapsed[:, :, 4:]], axis=2)
    mixed_soft = jnp.concatenate([soft[:, :, :4], collapsed[:, :, 4:]], axis=2)
    valid = jnp.broadcast_to(jnp.arange(s) < 4, (b, 1, s))
    np.testing.assert_allclose(um.load_balance_loss(mixed_soft, mixed, p, valid), 1.0, rtol=1e-6)
    assert float(um.load_balance_loss(mixed_soft, mixed, p)) > 1.5
    # A row that is all padding is left out of the mean.
    valid2 = jnp.stack([jnp.arange(s) < 4, jnp.zeros(s, bool)])[:, None]
    np.testing.assert_allclose(um.load_balance_loss(mixed_soft, mixed, p, valid2), 1.0, rtol=1e-6)


def test_load_balance_matches_float64_oracle_and_gradient():
    rng = np.random.default_rng(0)
    b, h, s, levels, p = 2, 2, 9, 3, 3
    logits = rng.normal(size=(b, h, s, levels, p))
    soft = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    hard = np.eye(p)[rng.integers(0, p, size=(b, h, s, levels))]
    valid = rng.random((b, 1, s)) < 0.7
    vals = []
    for bi in range(b):
        for hi in range(h):
            keep = valid[bi, 0]
            for li in range(levels):
                f = hard[bi, hi, keep, li].mean(0)
                pp = soft[bi, hi, keep, li].mean(0)
                vals.append(p * (f * pp).sum())
    got = um.load_balance_loss(jnp.asarray(soft, jnp.float32), jnp.asarray(hard, jnp.float32), p,
                               jnp.asarray(valid))
    np.testing.assert_allclose(got, np.mean(vals), rtol=1e-5)
    # No gradient flows into the hard fractions.
    g = jax.grad(lambda hd: um.load_balance_loss(jnp.asarray(soft, jnp.float32), hd, p))(
        jnp.asarray(hard, jnp.float32))
    assert (np.asarray(g) == 0).all()


def test_load_balance_errors():
    a = jnp.ones((2, 3, 2))
    with pytest.raises(ValueError, match="must have the same shape"):
        um.load_balance_loss(a, jnp.ones((2, 3, 3)), 2)
    with pytest.raises(ValueError, match="must equal arity=3"):
        um.load_balance_loss(a, a, 3)
