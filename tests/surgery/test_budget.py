"""The density budget: soft density against numpy, the penalty and the dual ascent in closed
form, and both moving the hard density of a tiny routed problem from collapsed (~1) to a
target of 0.3 by gradient descent on free router logits."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ultrametric_jax.model import llama
from ultrametric_jax.surgery import budget as bud
from ultrametric_jax.surgery import soft_distance as sd
from ultrametric_jax.surgery import tree as um


def test_soft_density_matches_numpy_and_its_gradient_is_one_over_the_pair_count():
    seq = 8
    positions = jnp.broadcast_to(jnp.arange(seq), (2, seq))
    valid = jnp.ones((2, seq), bool).at[1, :3].set(False)
    causal = llama.causal_mask(positions, positions, valid)          # [2, 1, S, S]
    m = jax.random.uniform(jax.random.key(0), (2, 3, seq, seq))
    rho, grad = jax.value_and_grad(bud.soft_density)(m, causal, valid)
    v = np.asarray(valid)
    pairs = np.zeros((2, 3, seq, seq), bool)
    for b in range(2):
        for i in range(seq):
            for j in range(i + 1):
                pairs[b, :, i, j] = v[b, i] and v[b, j]
    np.testing.assert_allclose(float(rho), np.asarray(m, np.float64)[pairs].mean(), rtol=1e-6)
    np.testing.assert_allclose(grad, pairs / pairs.sum(), rtol=1e-6)
    # A 0/1 mask gives the hard density: the kept fraction of the causal real pairs.
    hard = (np.asarray(m) > 0.5)
    np.testing.assert_allclose(float(bud.soft_density(jnp.asarray(hard, jnp.float32), causal,
                                                      valid)), hard[pairs].mean(), rtol=1e-6)


def test_penalty_closed_form_global_and_per_layer():
    rho = jnp.array([0.5, 0.2, 0.35])
    np.testing.assert_allclose(float(bud.density_penalty(rho, 0.3, 10.0)),
                               10.0 * (0.35 - 0.3) ** 2, rtol=1e-5)
    np.testing.assert_allclose(float(bud.density_penalty(rho, 0.3, 10.0, per_layer=True)),
                               10.0 * (0.2 ** 2 + 0 + 0.05 ** 2) / 3, rtol=1e-5)
    targets = jnp.array([0.6, 0.1, 0.3])
    np.testing.assert_allclose(float(bud.density_penalty(rho, targets, 2.0, per_layer=True)),
                               2.0 * (0 + 0.1 ** 2 + 0.05 ** 2) / 3, rtol=1e-5)
    assert float(bud.density_penalty(rho, 0.5, 10.0)) == 0.0
    grad = jax.grad(bud.density_penalty)(rho, 0.3, 10.0, True)
    np.testing.assert_allclose(grad, 10.0 * 2 * np.array([0.2, 0.0, 0.05]) / 3, rtol=1e-5)


def test_dual_ascent_closed_form():
    rho = jnp.array([0.5, 0.2, 0.35])
    nu = bud.init_dual_state(3, per_layer=True)
    assert nu.shape == (3,) and bud.init_dual_state(3).shape == ()
    nu = bud.dual_ascent_update(nu, rho, 0.3, 2.0, per_layer=True)
    np.testing.assert_allclose(nu, [0.4, 0.0, 0.1], rtol=1e-5)      # clamped at 0
    nu = bud.dual_ascent_update(nu, jnp.array([0.1, 0.4, 0.3]), 0.3, 2.0, per_layer=True)
    np.testing.assert_allclose(nu, [0.0, 0.2, 0.1], rtol=1e-5, atol=1e-7)
    total = bud.dual_ascent_update(jnp.float32(1.0), rho, 0.2, 0.5)  # mean 0.35
    np.testing.assert_allclose(float(total), 1.0 + 0.5 * 0.15, rtol=1e-6)
    term, grad = jax.value_and_grad(bud.dual_budget_term, argnums=1)(
        jnp.array([2.0, 0.0, 1.0]), rho, True)
    np.testing.assert_allclose(float(term), (1.0 + 0.35) / 3, rtol=1e-6)
    np.testing.assert_allclose(grad, [2 / 3, 0, 1 / 3], rtol=1e-6)
    assert not np.any(np.asarray(jax.grad(bud.dual_budget_term)(jnp.array([2.0, 0, 1]), rho,
                                                                True)))


def test_budget_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"rho must hold one density per layer, shape "
                                         r"\[layers\], got \(\)"):
        bud.density_penalty(jnp.float32(0.5), 0.3, 1.0)
    with pytest.raises(ValueError, match=r"nu has shape \(\) but the constraint has shape "
                                         r"\(2,\) \(per_layer=True\)"):
        bud.dual_ascent_update(jnp.float32(0.0), jnp.ones(2), 0.3, 1.0, per_layer=True)


SEQ, LEVELS, D_MAX, T, WINDOW, SINK = 32, 5, 2, 0.5, 2, 1


def routed_density(logits):
    """The bridged density of one layer [1, 2, S, L, 2] of router logits: forward the hard
    density evaluation sees (argmax routes), backward through the soft tree mask."""
    positions = jnp.broadcast_to(jnp.arange(SEQ), (1, SEQ))
    causal = llama.causal_mask(positions, positions)
    never = jnp.zeros((1, 1, SEQ), jnp.int32)
    routed = causal & ~um.allowed_mask(positions, positions, never, never + 1, WINDOW, SINK)
    hard = um.hard_assignment(logits)
    assign = um.straight_through(hard, jax.nn.softmax(logits, axis=-1))
    clusters = um.cluster_ids(um.hard_digits(hard), 2, LEVELS - D_MAX)
    allowed = um.allowed_mask(positions, positions, clusters, clusters, WINDOW, SINK)
    m = sd.bridged_tree_mask(assign, allowed, routed, D_MAX, T)
    return bud.soft_density(m, causal)


def collapsed_logits(layers, seed=0):
    """Near-collapse router logits (child 0 by a margin of 1, token-dependent noise)."""
    shape = (layers, 1, 2, SEQ, LEVELS, 2)
    margin = jnp.zeros(shape).at[..., 0].set(1.0)
    return margin + 0.3 * jax.random.normal(jax.random.key(seed), shape)


def descend(loss_of_rho, logits, steps, opt, dual=None):
    """`opt` on the logits; dual=(target, eta, per_layer) also updates the multipliers."""
    densities = jax.vmap(routed_density)
    state = opt.init(logits)
    nu = None if dual is None else bud.init_dual_state(logits.shape[0], dual[2])

    @jax.jit
    def step(logits, state, nu):
        rho, grad = jax.value_and_grad(lambda lg: loss_of_rho(densities(lg), nu))(logits)
        updates, state = opt.update(grad, state)
        return optax.apply_updates(logits, updates), state, densities(logits)

    for _ in range(steps):
        logits, state, rho = step(logits, state, nu)
        if dual is not None:
            nu = bud.dual_ascent_update(nu, rho, dual[0], dual[1], dual[2])
    return np.asarray(jax.jit(densities)(logits))


@pytest.mark.slow
def test_penalty_moves_density_from_collapsed_to_the_target():
    logits = collapsed_logits(layers=1)
    start = float(jax.jit(routed_density)(logits[0]))
    assert start > 0.9
    # Plain SGD: the penalty is one-sided, and Adam's momentum would carry the routes on
    # below the target after its gradient has vanished.
    rho = descend(lambda r, nu: bud.density_penalty(r, 0.3, 100.0), logits, steps=60,
                  opt=optax.sgd(3.0))
    assert abs(rho[0] - 0.3) < 0.05, rho


@pytest.mark.slow
def test_dual_ascent_moves_density_from_collapsed_to_the_target():
    logits = collapsed_logits(layers=1, seed=1)
    rho = descend(lambda r, nu: bud.dual_budget_term(nu, r), logits, steps=40,
                  opt=optax.adam(0.05), dual=(0.3, 1.0, False))
    assert abs(rho[0] - 0.3) < 0.05, rho


@pytest.mark.slow
def test_per_layer_penalty_reaches_each_layer_target():
    targets = jnp.array([0.3, 0.6])
    logits = collapsed_logits(layers=2, seed=2)
    rho = descend(lambda r, nu: bud.density_penalty(r, targets, 100.0, per_layer=True),
                  logits, steps=60, opt=optax.sgd(3.0))
    np.testing.assert_allclose(rho, targets, atol=0.05)


def _numpy_route_density_grad(logits, tau, cut, window, sink, valid):
    """float64 oracle of d/dlogits of (#bypass + sum over routed pairs (i, j) of
    prod_l <h_il, h_jl>) / #pairs, with h the straight-through routes (one-hot argmax forward,
    softmax(logits / tau) backward): the product rule through the one-hots, then the softmax
    Jacobian."""
    x = np.asarray(logits, np.float64)[..., :cut, :]
    p = np.exp(x / tau - (x / tau).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    h = np.eye(x.shape[-1])[x.argmax(-1)]                      # [B, H, S, cut, p]
    g = np.zeros_like(h)
    b_, h_, s_ = x.shape[:3]
    total = 0
    for b in range(b_):
        for i in range(s_):
            for j in range(i + 1):
                if not (valid[b, i] and valid[b, j]):
                    continue
                total += 1
                if j < sink or i - j < window:
                    continue
                for hd in range(h_):
                    dots = [h[b, hd, i, l] @ h[b, hd, j, l] for l in range(cut)]
                    for l in range(cut):
                        rest = np.prod([dots[m] for m in range(cut) if m != l])
                        g[b, hd, i, l] += h[b, hd, j, l] * rest
                        g[b, hd, j, l] += h[b, hd, i, l] * rest
    g /= total * h_
    grad = p * (g - np.sum(g * p, -1, keepdims=True)) / tau
    full = np.zeros(np.shape(logits))
    full[..., :cut, :] = grad
    return full


def _route_density_inputs(logits, valid, window, sink):
    seq = logits.shape[2]
    positions = jnp.broadcast_to(jnp.arange(seq), valid.shape)
    causal = llama.causal_mask(positions, positions, valid)
    never = jnp.zeros((valid.shape[0], 1, seq), jnp.int32)
    routed = causal & ~um.allowed_mask(positions, positions, never, never + 1, window, sink,
                                       valid)
    return causal, routed


def test_route_density_is_the_argmax_density_forward_and_the_expected_density_backward():
    """Forward: the hard density of the argmax routes (tree.pair_counts). Gradient: that of the
    pair count through straight-through routes, against a float64 numpy product rule."""
    window, sink, cut, tau, seq = 3, 1, 2, 0.7, 9
    logits = jax.random.normal(jax.random.key(3), (2, 2, seq, 4, 2))
    valid = jnp.ones((2, seq), bool).at[1, :2].set(False)
    causal, routed = _route_density_inputs(logits, valid, window, sink)
    clusters = um.cluster_ids(um.hard_digits(logits), 2, cut)
    _, kept, pairs = um.pair_counts(clusters, window, sink, valid[:, None])
    hard = jnp.sum(kept) / jnp.sum(pairs)

    def density(lg):
        return bud.route_density(lg, tau, cut, routed, causal, valid, hard)

    value, grad = jax.value_and_grad(density)(logits)
    np.testing.assert_allclose(float(value), float(hard), rtol=1e-6)
    # The oracle's own hard density, from the argmax digits.
    digits = np.asarray(logits).argmax(-1)[..., :cut]
    v = np.asarray(valid)
    num = den = 0
    for b in range(2):
        for h in range(2):
            for i in range(seq):
                for j in range(i + 1):
                    if v[b, i] and v[b, j]:
                        den += 1
                        num += (j < sink or i - j < window
                                or bool(np.all(digits[b, h, i] == digits[b, h, j])))
    np.testing.assert_allclose(float(value), num / den, rtol=1e-6)
    want = _numpy_route_density_grad(logits, tau, cut, window, sink, v)
    assert np.abs(want).max() > 1e-4
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-7)
    # Levels below the cut decide nothing: no gradient reaches them.
    assert not np.any(np.asarray(grad)[..., cut:, :])


def test_route_agreement_is_the_argmax_cluster_equality():
    logits = jax.random.normal(jax.random.key(4), (1, 2, 6, 3, 3))
    got = np.asarray(bud.route_agreement(logits, 0.5, 2))
    digits = np.asarray(logits).argmax(-1)[0, :, :, :2]                  # [H, S, 2]
    want = np.all(digits[:, :, None, :] == digits[:, None, :, :], axis=-1)
    np.testing.assert_array_equal(got[0], want.astype(np.float32))


def argmax_route_density(logits, tau=0.5):
    """The noise-free budget density of one layer [1, 2, S, L, 2] of router logits."""
    valid = jnp.ones((1, SEQ), bool)
    causal, routed = _route_density_inputs(logits, valid, WINDOW, SINK)
    clusters = um.cluster_ids(um.hard_digits(logits), 2, LEVELS - D_MAX)
    _, kept, pairs = um.pair_counts(clusters, WINDOW, SINK)
    return bud.route_density(logits, tau, LEVELS - D_MAX, routed, causal, None,
                             jnp.sum(kept) / jnp.sum(pairs))


@pytest.mark.slow
def test_penalty_on_the_argmax_routes_moves_their_density_to_the_target():
    """The noise-free budget drives the density evaluation sees (argmax routes, counted by
    tree.pair_counts) from collapsed to the target."""
    logits = collapsed_logits(layers=1, seed=5)
    densities = jax.vmap(argmax_route_density)
    assert float(densities(logits)[0]) > 0.9
    opt = optax.sgd(3.0)
    state = opt.init(logits)

    @jax.jit
    def step(logits, state):
        grad = jax.grad(lambda lg: bud.density_penalty(densities(lg), 0.3, 100.0))(logits)
        updates, state = opt.update(grad, state)
        return optax.apply_updates(logits, updates), state

    for _ in range(60):
        logits, state = step(logits, state)
    clusters = um.cluster_ids(um.hard_digits(logits[0]), 2, LEVELS - D_MAX)
    _, kept, pairs = um.pair_counts(clusters, WINDOW, SINK)
    assert abs(float(jnp.sum(kept) / jnp.sum(pairs)) - 0.3) < 0.05
