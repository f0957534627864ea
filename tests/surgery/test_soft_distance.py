"""The O(S^2)-memory soft tree mask: float64 values and gradients equal to the level-by-level
implementation of tree.py and to a numpy oracle, finite on exact zeros, and compiled training
memory that does not grow with the tree depth L."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultrametric_jax.model import llama
from ultrametric_jax.surgery import soft_distance as sd
from ultrametric_jax.surgery import tree as um

D_MAX, TEMPERATURE = 2, 0.5


def np_depth(assign, depth_op):
    """float64 depth(i, j) = sum_l prod_{m<=l} M_m (or min), pair by pair."""
    a = np.asarray(assign, np.float64)
    *lead, s, levels, _ = a.shape
    out = np.zeros((*lead, s, s))
    for idx in itertools.product(*map(range, lead)):
        for i, j in itertools.product(range(s), range(s)):
            agree = [float(a[idx][i, l] @ a[idx][j, l]) for l in range(levels)]
            running = np.cumprod(agree) if depth_op == "cumprod" else np.minimum.accumulate(agree)
            out[idx][i, j] = running.sum()
    return out


def mixed_routes(key, shape, dtype):
    """Soft routes [B, H, S, L, p] with one-hot tokens mixed in (exact zeros and ties)."""
    k1, k2 = jax.random.split(key)
    soft = jax.nn.softmax(2.0 * jax.random.normal(k1, shape, dtype), axis=-1)
    digits = jax.random.randint(k2, shape[:-1], 0, shape[-1])
    hard = jax.nn.one_hot(digits, shape[-1], dtype=dtype)
    use_hard = (jnp.arange(shape[2]) % 3 == 0)[:, None, None]
    return jnp.where(use_hard, hard, soft)


@pytest.mark.parametrize("depth_op", ["cumprod", "cummin"])
@pytest.mark.parametrize("levels,arity", [(1, 2), (2, 3), (5, 2)])
def test_value_and_gradient_match_tree_in_float64(depth_op, levels, arity):
    with jax.enable_x64(True):
        assign = mixed_routes(jax.random.key(levels), (2, 2, 8, levels, arity), jnp.float64)
        weights = jax.random.normal(jax.random.key(7), (2, 2, 8, 8), jnp.float64)

        def reference(a):
            distance = um.ultrametric_distance(a, depth_op)
            return jnp.sum(weights * um.soft_tree_mask(distance, D_MAX, TEMPERATURE))

        def remat(a):
            return jnp.sum(weights * sd.soft_tree_mask_remat(a, D_MAX, TEMPERATURE, depth_op))

        depth = jax.jit(sd.expected_depth_remat, static_argnums=1)(assign, depth_op)
        assert depth.dtype == jnp.float64
        np.testing.assert_allclose(depth, np_depth(assign, depth_op), rtol=0, atol=1e-13)
        np.testing.assert_allclose(jax.jit(remat)(assign), jax.jit(reference)(assign),
                                   rtol=1e-14)
        expected = jax.jit(jax.grad(reference))(assign)
        got = jax.jit(jax.grad(remat))(assign)
        assert float(jnp.abs(expected).max()) > 1e-3       # a gradient worth comparing
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("depth_op", ["cumprod", "cummin"])
def test_depth_gradient_against_finite_differences(depth_op):
    """An oracle independent of JAX's autodiff: central differences in float64 on soft routes
    (away from the ties where the minimum has no derivative)."""
    with jax.enable_x64(True):
        assign = jax.nn.softmax(jax.random.normal(jax.random.key(3), (1, 1, 5, 4, 2),
                                                  jnp.float64), axis=-1)
        weights = np.asarray(jax.random.normal(jax.random.key(4), (1, 1, 5, 5), jnp.float64))
        grad = np.asarray(jax.jit(jax.grad(
            lambda a: jnp.sum(weights * sd.expected_depth_remat(a, depth_op))))(assign))
        base = np.asarray(assign)
        eps = 1e-6
        numeric = np.zeros_like(base)
        for idx in itertools.product(*map(range, base.shape)):
            up, down = base.copy(), base.copy()
            up[idx] += eps
            down[idx] -= eps
            numeric[idx] = np.sum(weights * (np_depth(up, depth_op)
                                             - np_depth(down, depth_op))) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=0, atol=1e-7)


@pytest.mark.parametrize("depth_op", ["cumprod", "cummin"])
def test_gradient_is_finite_on_one_hot_routes(depth_op):
    """Exact zeros everywhere (distinct one-hot routes agree on 0 at some level): no division
    by the agreement, so no nan or inf."""
    digits = jnp.array([[0, 1, 1], [1, 0, 1], [0, 0, 0], [0, 1, 0]])
    assign = jax.nn.one_hot(digits, 2, dtype=jnp.float32)[None, None]
    weights = jax.random.normal(jax.random.key(0), (1, 1, 4, 4))
    grad = jax.jit(jax.grad(lambda a: jnp.sum(weights * sd.soft_tree_mask_remat(
        a, 1, TEMPERATURE, depth_op))))(assign)
    expected = jax.jit(jax.grad(lambda a: jnp.sum(weights * um.soft_tree_mask(
        um.ultrametric_distance(a, depth_op), 1, TEMPERATURE))))(assign)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)


def tiny_layer(levels, seq=10, window=2, sink_tokens=1, seed=0):
    """Routes, hard mask, routed pairs and scores of one training layer with padding."""
    key_logits, key_scores = jax.random.split(jax.random.key(seed))
    logits = jax.random.normal(key_logits, (2, 2, seq, levels, 2))
    hard = um.hard_assignment(logits)
    assign = um.straight_through(hard, jax.nn.softmax(logits, axis=-1))
    positions = jnp.broadcast_to(jnp.arange(seq), (2, seq))
    valid = jnp.ones((2, seq), bool).at[1, :3].set(False)
    clusters = um.cluster_ids(um.hard_digits(hard), 2, levels - D_MAX)
    allowed = um.allowed_mask(positions, positions, clusters, clusters, window, sink_tokens,
                              valid)
    never = jnp.zeros((2, 1, seq), jnp.int32)
    bypass = um.allowed_mask(positions, positions, never, never + 1, window, sink_tokens, valid)
    routed = llama.causal_mask(positions, positions, valid) & ~bypass
    scores = 3.0 * jax.random.normal(key_scores, (2, 2, seq, seq))
    return logits, allowed, routed, scores


def test_bridged_tree_mask_is_the_hard_mask_forward_and_the_tree_bridge_backward():
    logits, allowed, routed, scores = tiny_layer(levels=5)
    assert bool(jnp.any(routed & ~allowed)) and bool(jnp.any(routed & allowed))

    def attention(bridge):
        def f(lg):
            assign = um.straight_through(um.hard_assignment(lg), jax.nn.softmax(lg, axis=-1))
            m = bridge(assign)
            return jnp.sum(jnp.cos(um.bridged_softmax(scores, m, allowed))), m
        return f

    new = attention(lambda a: sd.bridged_tree_mask(a, allowed, routed, D_MAX, TEMPERATURE))
    old = attention(lambda a: um.straight_through_mask(
        allowed, um.soft_tree_mask(um.ultrametric_distance(a), D_MAX, TEMPERATURE), routed))
    np.testing.assert_array_equal(jax.jit(new)(logits)[1], allowed.astype(np.float32))
    grad_new = jax.jit(jax.grad(lambda lg: new(lg)[0]))(logits)
    grad_old = jax.jit(jax.grad(lambda lg: old(lg)[0]))(logits)
    assert float(jnp.abs(grad_old).max()) > 1e-4
    np.testing.assert_allclose(grad_new, grad_old, rtol=1e-5, atol=1e-7)


def training_temp_bytes(levels, remat, seq=128):
    """Compiled temp memory of the gradient of a training attention's probabilities with
    respect to the router logits, through the bridged mask."""
    logits, allowed, routed, scores = tiny_layer(levels, seq=seq, window=4)
    weights = jax.random.normal(jax.random.key(9), scores.shape)

    def loss(lg, scores, allowed, routed, weights):
        assign = um.straight_through(um.hard_assignment(lg), jax.nn.softmax(lg, axis=-1))
        if remat:
            m = sd.bridged_tree_mask(assign, allowed, routed, D_MAX, TEMPERATURE)
        else:
            soft = um.soft_tree_mask(um.ultrametric_distance(assign), D_MAX, TEMPERATURE)
            m = um.straight_through_mask(allowed, soft, routed)
        return jnp.sum(weights * um.bridged_softmax(scores, m, allowed))

    # Everything an argument: closed-over arrays would be constant-folded at compile time.
    compiled = jax.jit(jax.grad(loss)).lower(logits, scores, allowed, routed, weights).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_training_memory_does_not_grow_with_levels():
    """At fixed S the level-by-level implementation keeps ~2 [B,H,S,S] arrays per level for the
    backward pass; the remat one keeps the same few whatever L (the routes [B,H,S,L,p] grow,
    but they are S / (2 L p) times smaller than one S x S array)."""
    seq = 128
    square = 2 * 2 * seq * seq * 4                                 # one float32 [B,H,S,S]
    old = {levels: training_temp_bytes(levels, remat=False, seq=seq) for levels in (4, 8, 16)}
    new = {levels: training_temp_bytes(levels, remat=True, seq=seq) for levels in (4, 8, 16)}
    # The old grows by at least one S x S array per added level...
    assert old[8] - old[4] >= 4 * square and old[16] - old[8] >= 8 * square, old
    # ...the new by less than one S x S array from L = 4 to L = 16, and stays below the old.
    assert new[16] - new[4] < square, new
    assert new[16] < old[4], (new, old)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown depth_op 'cumsum'"):
        sd.soft_tree_mask_remat(jnp.ones((4, 2, 2)), 1, 0.5, "cumsum")
    with pytest.raises(ValueError, match=r"assign must have shape \[..., S, L, p\]"):
        sd.expected_depth_remat(jnp.ones((4, 2)))
