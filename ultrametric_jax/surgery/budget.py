"""The density budget: the soft attention density of a layer, and the two ways of holding the
total density at a target, a quadratic penalty or a Lagrange multiplier per layer updated by
dual ascent.

rho_l = sum over the causal pairs between real tokens of m_ij / their count, pooled over batch
and heads. With the bridged mask m (forward exactly the hard mask) its forward value is the hard
density of the layer, the same number `forward_with_aux` reports as "density", and its gradient
reaches the router through the soft tree mask. Every layer has the same causal pairs, so the
total density is the mean of rho_l over layers.

That rho binds the densities of the Gumbel routes training samples. Evaluation runs the argmax
routes, which are denser (noise scatters tokens the router holds near a boundary), so a budget
met in training is missed held out. `route_density` binds the evaluation routes instead: its
value is the argmax routes' hard density and its gradient that of the same count through
straight-through routes (argmax forward, the router's softmax backward). The forward rewards
nothing but fewer kept pairs: an expected density over the router's probabilities would instead
be lowered by making every route uncertain, which leaves the argmax routes dense and scatters
the sampled ones (measured: 37% held-out density against 9% in training). The softmax is taken
at temperature 1, not at the annealed Gumbel tau: at tau -> 0.1 it saturates and the gradient
vanishes for every token not already near a boundary.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from ultrametric_jax.surgery.tree import small_argmax, straight_through

BUDGETS = ("penalty", "dual")


class DensityMultiplier(nnx.Variable):
    """The dual-ascent multipliers nu of a training run ([layers], or a scalar for a total
    target): state the step updates, checkpointed with the run, never trained by gradient."""


def attach_density_multiplier(model, num_layers: int, per_layer: bool = False) -> None:
    """Gives `model` its DensityMultiplier (zeros), so that it travels with the model's mutable
    state through the compiled step and the run checkpoints."""
    model.density_multiplier = DensityMultiplier(init_dual_state(num_layers, per_layer))


def density_multiplier(model) -> Optional[jax.Array]:
    """The model's multipliers nu, or None when it has none."""
    variable = getattr(model, "density_multiplier", None)
    return None if variable is None else variable[...]


def soft_density(m: jax.Array, causal: jax.Array,
                 q_valid: Optional[jax.Array] = None) -> jax.Array:
    """rho of one layer, a float32 scalar.

    m: the bridged mask [B, H, Sq, Sk] (float, forward 0/1); causal: bool broadcastable to
    [B, H, Sq, Sk], the causal pairs with a real key (llama.causal_mask); q_valid: bool [B, Sq]
    (False = padding query) or None when every query is real.
    """
    pairs = jnp.broadcast_to(causal, m.shape)
    if q_valid is not None:
        pairs = pairs & q_valid.astype(bool)[:, None, :, None]
    kept = jnp.sum(jnp.where(pairs, m.astype(jnp.float32), 0.0))
    return kept / jnp.maximum(jnp.sum(pairs, dtype=jnp.float32), 1.0)


def route_agreement(logits: jax.Array, tau, cut_level: int) -> jax.Array:
    """float32 [B, H, S, S]: 1 where tokens i and j share their first `cut_level` argmax route
    digits (the same tree cluster), 0 elsewhere; the gradient is that of the straight-through
    routes one_hot(argmax) + softmax(logits / tau) - sg(softmax(logits / tau)) at every level.
    logits: the router's [B, H, S, L, p]."""
    logits = logits[..., :cut_level, :].astype(jnp.float32)
    hard = jax.nn.one_hot(small_argmax(logits), logits.shape[-1], dtype=jnp.float32)
    routes = straight_through(hard, jax.nn.softmax(logits / tau, axis=-1))
    agree = jnp.ones(routes.shape[:3] + routes.shape[2:3], jnp.float32)
    for level in range(cut_level):
        r = routes[..., level, :]
        agree = agree * jnp.einsum("bhic,bhjc->bhij", r, r,
                                   precision=jax.lax.Precision.HIGHEST)
    return agree


def route_density(logits: jax.Array, tau, cut_level: int, routed: jax.Array,
                  causal: jax.Array, q_valid: Optional[jax.Array],
                  hard_density: jax.Array) -> jax.Array:
    """The noise-free density of one layer, a float32 scalar: forward `hard_density` (that of
    the argmax routes, tree.pair_counts), gradient that of

        (#bypass pairs + sum over routed pairs of route_agreement_ij) / #causal pairs,

    whose forward value is the same density counted pair by pair.

    routed: bool [B, H|1, S, S], the causal pairs between real tokens whose fate the routes
    decide (outside sink and window); causal, q_valid as in soft_density. The S x S agreement
    is recomputed in the backward pass (jax.checkpoint): O(S^2) memory whatever cut_level.
    """
    pairs = jnp.broadcast_to(causal, routed.shape[:1] + (logits.shape[1],) + routed.shape[2:])
    if q_valid is not None:
        pairs = pairs & q_valid.astype(bool)[:, None, :, None]
    routed = routed & pairs
    count = jnp.maximum(jnp.sum(pairs, dtype=jnp.float32), 1.0)
    bypass = jnp.sum(pairs & ~routed, dtype=jnp.float32)

    @jax.checkpoint
    def expected_tree_pairs(logits):
        return jnp.sum(jnp.where(routed, route_agreement(logits, tau, cut_level), 0.0))

    expected = (bypass + expected_tree_pairs(logits)) / count
    return expected + jax.lax.stop_gradient(jnp.asarray(hard_density, jnp.float32) - expected)


def _constrained(rho: jax.Array, per_layer: bool) -> jax.Array:
    """The densities under the constraint: rho [layers] per layer, or the total (their mean)."""
    rho = jnp.asarray(rho, jnp.float32)
    if rho.ndim != 1:
        raise ValueError(f"rho must hold one density per layer, shape [layers], got {rho.shape}")
    return rho if per_layer else jnp.mean(rho)


def density_penalty(rho: jax.Array, target, mu, per_layer: bool = False) -> jax.Array:
    """mu * relu(rho - target)^2: on the total density (per_layer=False), or the mean over
    layers of each layer's term (per_layer=True; target a float or one per layer). rho:
    float [layers] of soft_density values. Zero at or below the target: the budget caps the
    density, the other objectives decide how far below it to go."""
    excess = jax.nn.relu(_constrained(rho, per_layer) - jnp.asarray(target, jnp.float32))
    return jnp.asarray(mu, jnp.float32) * jnp.mean(excess ** 2)


def init_dual_state(num_layers: int, per_layer: bool = False) -> jax.Array:
    """The multipliers nu at the start: zeros, float32 [num_layers] per layer or [] for the
    total density."""
    return jnp.zeros((num_layers,) if per_layer else (), jnp.float32)


def dual_ascent_update(nu: jax.Array, rho: jax.Array, target, eta,
                       per_layer: bool = False) -> jax.Array:
    """nu <- max(0, nu + eta (rho - target)), with the densities rho [layers] of the step just
    taken (no gradient flows through the update). nu as from init_dual_state."""
    rho = jax.lax.stop_gradient(_constrained(rho, per_layer))
    step = jnp.asarray(eta, jnp.float32) * (rho - jnp.asarray(target, jnp.float32))
    if jnp.shape(nu) != jnp.shape(step):
        raise ValueError(f"nu has shape {jnp.shape(nu)} but the constraint has shape "
                         f"{jnp.shape(step)} (per_layer={per_layer})")
    return jnp.maximum(nu + step, 0.0)


def dual_budget_term(nu: jax.Array, rho: jax.Array, per_layer: bool = False) -> jax.Array:
    """The Lagrangian's loss term: nu * rho (mean over layers per layer), nu held constant."""
    nu = jax.lax.stop_gradient(jnp.asarray(nu, jnp.float32))
    return jnp.mean(nu * _constrained(rho, per_layer))
