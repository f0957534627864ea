"""Distillation objectives against float64 numpy on tiny layers with padding, sink and window
pairs; their gradients reach the router and never the frozen teacher; ObjectiveConfig."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.model import llama
from ultrametric_jax.surgery import objectives as obj
from ultrametric_jax.surgery import soft_distance as sd
from ultrametric_jax.surgery import tree as um

B, H, S, L, P, D_MAX, T, WINDOW, SINK = 2, 2, 9, 4, 2, 2, 0.5, 2, 1


def np_allowed(digits, valid, cut):
    """bool [B, H, S, S]: j <= i, key real, (first `cut` digits equal or sink or window)."""
    out = np.zeros((B, H, S, S), bool)
    for b, h, i, j in itertools.product(range(B), range(H), range(S), range(S)):
        same = np.array_equal(digits[b, h, i, :cut], digits[b, h, j, :cut])
        out[b, h, i, j] = j <= i and valid[b, j] and (same or j < SINK or i - j < WINDOW)
    return out


def np_dense_probs(scores, valid):
    """float64 softmax over the causal real keys."""
    probs = np.zeros((B, H, S, S))
    for b, h, i in itertools.product(range(B), range(H), range(S)):
        keys = [j for j in range(i + 1) if valid[b, j]]
        if keys:
            z = np.asarray(scores[b, h, i, keys], np.float64)
            e = np.exp(z - z.max())
            probs[b, h, i, keys] = e / e.sum()
    return probs


def layer(seed=0):
    """One training layer: router logits, the bridged mask m and the dense scores; batch row 1
    has two padding tokens in front."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    logits = 1.5 * jax.random.normal(k1, (B, H, S, L, P))
    scores = 2.0 * jax.random.normal(k2, (B, H, S, S))
    positions = jnp.broadcast_to(jnp.arange(S), (B, S))
    valid = jnp.ones((B, S), bool).at[1, :2].set(False)
    causal = llama.causal_mask(positions, positions, valid)
    never = jnp.zeros((B, 1, S), jnp.int32)
    routed = causal & ~um.allowed_mask(positions, positions, never, never + 1, WINDOW, SINK,
                                       valid)

    def bridged(lg):
        hard = um.hard_assignment(lg)
        assign = um.straight_through(hard, jax.nn.softmax(lg, axis=-1))
        clusters = um.cluster_ids(um.hard_digits(hard), P, L - D_MAX)
        allowed = um.allowed_mask(positions, positions, clusters, clusters, WINDOW, SINK, valid)
        return sd.bridged_tree_mask(assign, allowed, routed, D_MAX, T), allowed

    return dict(logits=logits, scores=scores, valid=valid, causal=causal, bridged=bridged,
                digits=np.asarray(jnp.argmax(logits, -1)))


def np_recall(scores, mask, valid):
    probs = np_dense_probs(np.asarray(scores), np.asarray(valid))
    recall = np.sum(np.asarray(mask, np.float64) * probs, axis=-1)
    rows = np.broadcast_to(np.asarray(valid)[:, None, :], recall.shape)
    return probs, recall, rows


def test_attention_recall_matches_numpy():
    x = layer()
    m, allowed = jax.jit(x["bridged"])(x["logits"])
    mask = np_allowed(x["digits"], np.asarray(x["valid"]), L - D_MAX)
    np.testing.assert_array_equal(np.asarray(m), mask)
    _, recall, rows = np_recall(x["scores"], mask, x["valid"])
    assert 0.01 < recall[rows].min() < 0.5                   # some rows lose real mass
    expected = -np.log(recall[rows]).mean()
    got = obj.attention_recall_loss(x["scores"], m, x["causal"], x["valid"])
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    # With a 0/1 mask it is the KL from the masked renormalised distribution Q to P.
    probs = np_dense_probs(np.asarray(x["scores"]), np.asarray(x["valid"]))
    q = mask * probs / np.where(recall > 0, recall, 1.0)[..., None]
    reverse_kl = np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1) /
                                                   np.where(probs > 0, probs, 1)), 0), -1)
    np.testing.assert_allclose(float(got), reverse_kl[rows].mean(), rtol=1e-6)


def test_attention_recall_gradient_closed_form_and_none_to_the_scores():
    x = layer()
    m = jax.jit(x["bridged"])(x["logits"])[0]
    probs, recall, rows = np_recall(x["scores"], m, x["valid"])
    grad_m, grad_scores = jax.grad(obj.attention_recall_loss, argnums=(1, 0))(
        x["scores"], m, x["causal"], x["valid"])
    # d/dm_ij of -mean log r_i: -P_ij / (r_i N) on real rows, dropped pairs included.
    safe = np.where(rows, recall, 1.0)[..., None]
    expected = np.where(rows[..., None], -probs / safe, 0.0) / rows.sum()
    np.testing.assert_allclose(grad_m, expected, rtol=1e-5, atol=1e-9)
    assert np.any((np.asarray(m) == 0) & (np.abs(expected) > 1e-4))
    assert not np.any(np.asarray(grad_scores))


def test_attention_recall_is_finite_when_a_row_keeps_almost_nothing():
    x = layer()
    m = jnp.zeros((B, H, S, S)).at[..., 0].set(1.0)          # only the sink; 0 elsewhere
    scores = x["scores"].at[..., 0].set(-200.0)              # ... which carries no mass
    loss, grad = jax.value_and_grad(obj.attention_recall_loss, argnums=1)(
        scores, m, x["causal"], x["valid"])
    _, recall, rows = np_recall(scores, np.asarray(m), x["valid"])
    expected = -np.log(np.maximum(recall[rows], obj.RECALL_FLOOR)).mean()
    assert np.all(recall[1, :, 2:][rows[1, :, 2:]] == 0)      # row 1's first real key is 2
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_attention_kl_matches_numpy():
    x = layer(seed=1)
    key = jax.random.key(5)
    soft = jax.random.uniform(key, (B, H, S, S), minval=0.05, maxval=1.0)
    soft = soft.at[..., 3].set(0.0).at[..., 0].set(1.0)        # exact zeros, the sink at 1
    loss, grad_scores = jax.value_and_grad(obj.attention_kl_loss)(
        x["scores"], soft, x["causal"], x["valid"])
    probs = np_dense_probs(np.asarray(x["scores"]), np.asarray(x["valid"]))
    w = np.maximum(np.asarray(soft, np.float64), obj.RECALL_FLOOR)
    kept = np.sum(probs * w, -1, keepdims=True)
    q = probs * w / np.where(kept > 0, kept, 1.0)
    ratio = np.divide(probs, q, out=np.ones_like(probs), where=probs > 0)
    kl = np.sum(probs * np.log(ratio), -1)
    rows = np.broadcast_to(np.asarray(x["valid"])[:, None, :], kl.shape)
    np.testing.assert_allclose(float(loss), kl[rows].mean(), rtol=1e-5)
    assert not np.any(np.asarray(grad_scores))


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_output_distillation_matches_numpy_in_float32_from_bfloat16():
    k1, k2 = jax.random.split(jax.random.key(2))
    dense = (3.0 * jax.random.normal(k1, (B, 7, 11))).astype(jnp.bfloat16)
    surgical = (dense.astype(jnp.float32)
                + jax.random.normal(k2, dense.shape)).astype(jnp.bfloat16)
    valid = jnp.ones((B, 7), bool).at[0, 5:].set(False)
    loss, (grad_dense, grad_surgical) = jax.value_and_grad(
        obj.output_distillation_loss, argnums=(0, 1))(dense, surgical, valid)
    assert loss.dtype == jnp.float32
    lp, lq = np_log_softmax(np.asarray(dense, np.float32)), np_log_softmax(
        np.asarray(surgical, np.float32))
    kl = np.sum(np.exp(lp) * (lp - lq), -1)
    v = np.asarray(valid)
    np.testing.assert_allclose(float(loss), kl[v].mean(), rtol=1e-5)
    expected = (np.exp(lq) - np.exp(lp)) * v[..., None] / v.sum()
    np.testing.assert_allclose(np.asarray(grad_surgical, np.float32), expected,
                               rtol=2e-2, atol=2e-4)              # a bfloat16 gradient
    assert not np.any(np.asarray(grad_dense, np.float32))


def test_output_distillation_is_finite_on_a_masked_vocabulary_entry():
    dense = jnp.array([[[0.0, 1.0, -jnp.inf]]])
    surgical = jnp.array([[[0.5, 0.2, 3.0]]])
    loss, grad = jax.value_and_grad(obj.output_distillation_loss, argnums=1)(dense, surgical)
    lp, lq = np_log_softmax([[0.0, 1.0]]), np_log_softmax([[0.5, 0.2, 3.0]])
    np.testing.assert_allclose(float(loss), np.sum(np.exp(lp) * (lp - lq[:, :2])), rtol=1e-6)
    assert bool(jnp.all(jnp.isfinite(grad)))
    with pytest.raises(ValueError, match=r"dense logits \(1, 1, 3\) and surgical logits "
                                         r"\(1, 1, 2\) must have the same shape"):
        obj.output_distillation_loss(dense, surgical[..., :2])


def test_distillation_gradients_reach_the_router_and_never_the_teacher():
    x = layer(seed=3)
    values = jax.random.normal(jax.random.key(8), (B, H, S, 4))
    vocab = jax.random.normal(jax.random.key(9), (4, 6))
    dense_probs = obj.dense_attention_probs(x["scores"], x["causal"])
    dense_logits = jnp.einsum("bhqk,bhkd->bqd", dense_probs, values) @ vocab

    def losses(router_logits, scores, teacher_logits):
        m, allowed = x["bridged"](router_logits)
        probs = um.bridged_softmax(scores, m, allowed)
        logits = jnp.einsum("bhqk,bhkd->bqd", probs, values) @ vocab
        return (obj.attention_recall_loss(scores, m, x["causal"], x["valid"]),
                obj.output_distillation_loss(teacher_logits, logits, x["valid"]))

    for index in range(2):
        grads = jax.jit(jax.grad(lambda *a: losses(*a)[index], argnums=(0, 2)))(
            x["logits"], x["scores"], dense_logits)
        assert bool(jnp.all(jnp.isfinite(grads[0]))) and float(jnp.abs(grads[0]).max()) > 1e-5
        assert not np.any(np.asarray(grads[1]))
    recall_grad_scores = jax.grad(lambda s: losses(x["logits"], s, dense_logits)[0])(
        x["scores"])
    assert not np.any(np.asarray(recall_grad_scores))


@pytest.mark.parametrize("field,value,message", [
    ("ce_weight", -1.0, r"ObjectiveConfig.ce_weight=-1.0: must be a finite number >= 0"),
    ("kd_weight", float("nan"), r"ObjectiveConfig.kd_weight=nan: must be a finite number"),
    ("recall_weight", "1", r"ObjectiveConfig.recall_weight='1': must be a finite number"),
    ("recall_form", "mass", r"ObjectiveConfig.recall_form='mass': must be one of"),
    ("density_target", 0.0, r"ObjectiveConfig.density_target=0.0: must lie in \(0, 1\]"),
    ("density_target", 1.5, r"ObjectiveConfig.density_target=1.5: must lie in \(0, 1\]"),
    ("budget", "lagrange", r"ObjectiveConfig.budget='lagrange': must be one of"),
    ("budget_mu", 0.0, r"ObjectiveConfig.budget_mu=0.0: must be > 0"),
    ("dual_eta", -0.1, r"ObjectiveConfig.dual_eta=-0.1: must be > 0"),
    ("per_layer", 1, r"ObjectiveConfig.per_layer=1: must be True or False"),
])
def test_objective_config_errors_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        obj.ObjectiveConfig(**{field: value})


def test_objective_config_all_zero_weights_and_unknown_fields():
    with pytest.raises(ConfigError, match="ce_weight, kd_weight and recall_weight are all 0"):
        obj.ObjectiveConfig(ce_weight=0.0)
    with pytest.raises(ConfigError, match=r"unknown ObjectiveConfig fields: \['kl_weight'\]"):
        obj.ObjectiveConfig.from_dict({"kl_weight": 1.0})
    config = obj.ObjectiveConfig(kd_weight=0.5, density_target=0.2, budget="dual")
    assert obj.ObjectiveConfig.from_dict(config.to_dict()) == config


def test_combine_objectives_closed_form():
    rho = jnp.array([0.5, 0.3])
    config = obj.ObjectiveConfig(ce_weight=0.5, kd_weight=2.0, recall_weight=0.25,
                                 density_target=0.3, budget_mu=10.0)
    total, terms = obj.combine_objectives(config, cross_entropy=3.0, balance=1.5, lam=0.1,
                                          kd=0.4, recall=1.2, rho=rho)
    penalty = 10.0 * (0.4 - 0.3) ** 2                            # the total density is 0.4
    np.testing.assert_allclose(float(total), 1.5 + 0.8 + 0.3 + 0.15 + penalty, rtol=1e-6)
    np.testing.assert_allclose(float(terms["budget"]), penalty, rtol=1e-6)
    dual = obj.ObjectiveConfig(density_target=0.3, budget="dual", per_layer=True)
    total, _ = obj.combine_objectives(dual, cross_entropy=3.0, balance=1.0, lam=0.0, rho=rho,
                                      nu=jnp.array([2.0, 4.0]))
    np.testing.assert_allclose(float(total), 3.0 + (2.0 * 0.5 + 4.0 * 0.3) / 2, rtol=1e-6)
    plain, terms = obj.combine_objectives(obj.ObjectiveConfig(), cross_entropy=3.0,
                                          balance=1.0, lam=0.5)
    assert float(plain) == 3.5 and set(terms) == {"cross_entropy", "balance"}


def test_combine_objectives_names_a_missing_term():
    with pytest.raises(ValueError, match="the kd term is missing but its weight is 1.0"):
        obj.combine_objectives(obj.ObjectiveConfig(kd_weight=1.0), cross_entropy=1.0,
                               balance=1.0, lam=1.0)
    with pytest.raises(ValueError, match="density_target is set but the per-layer densities"):
        obj.combine_objectives(obj.ObjectiveConfig(density_target=0.2), cross_entropy=1.0,
                               balance=1.0, lam=1.0)
    with pytest.raises(ValueError, match=r"budget='dual' needs the multipliers nu"):
        obj.combine_objectives(obj.ObjectiveConfig(density_target=0.2, budget="dual"),
                               cross_entropy=1.0, balance=1.0, lam=1.0, rho=jnp.ones(2))
