"""The density budget: the soft attention density of a layer, and the two ways of holding the
total density at a target, a quadratic penalty or a Lagrange multiplier per layer updated by
dual ascent.

rho_l = sum over the causal pairs between real tokens of m_ij / their count, pooled over batch
and heads. With the bridged mask m (forward exactly the hard mask) its forward value is the hard
density of the layer, the same number `forward_with_aux` reports as "density", and its gradient
reaches the router through the soft tree mask. Every layer has the same causal pairs, so the
total density is the mean of rho_l over layers.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

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
