"""The soft tree mask for training with O(S^2) memory per layer, whatever the tree depth L.

Differentiating tree.expected_depth keeps every level's running product (or minimum) and
agreement, about 2 L arrays of [..., S, S], for the backward pass. Here the depth has a custom
VJP whose only residual is the assignment itself ([..., S, L, p], no S x S array): the backward
pass walks the levels from the leaf to the root and recomputes the running value it needs at
each level from the root. Reversing a running product without storing it would need a division
by the agreement, which is 0 on exact zeros; recomputing costs L (L - 1) / 2 level products
instead of L, in exchange for memory that does not grow with L.

Values and gradients equal tree.expected_depth's (the same operations in the same order for the
forward; the chain rule of jnp.multiply / jnp.minimum, ties of the minimum split in halves as
JAX does, for the backward). Every function here works under jit, vmap and grad.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from ultrametric_jax.surgery import tree as um
from ultrametric_jax.surgery.config import DEPTH_OPS

_HIGHEST = jax.lax.Precision.HIGHEST


def _agreement(routes: jax.Array) -> jax.Array:
    """M(i, j) = sum_c a_ic a_jc for one level's routes [..., S, p] -> [..., S, S]."""
    return jnp.einsum("...ic,...jc->...ij", routes, routes, precision=_HIGHEST)


def _combine(running: jax.Array, agree: jax.Array, depth_op: str) -> jax.Array:
    return running * agree if depth_op == "cumprod" else jnp.minimum(running, agree)


def _combine_partials(running, agree, depth_op):
    """(d/d running, d/d agree) of _combine, elementwise: JAX's own rules, ties of the minimum
    sharing the derivative half and half."""
    if depth_op == "cumprod":
        return agree, running
    result = jnp.minimum(running, agree)
    hit_running = (running == result).astype(running.dtype)
    hit_agree = (agree == result).astype(running.dtype)
    share = 1.0 / (hit_running + hit_agree)           # 1/2 on ties, 1 otherwise
    return hit_running * share, hit_agree * share


def _by_level(assign: jax.Array) -> jax.Array:
    """[..., S, L, p] -> [L, ..., S, p] (level-major, for scans over levels)."""
    return jnp.moveaxis(assign, -2, 0)


def _check(assign: jax.Array, depth_op: str) -> None:
    if depth_op not in DEPTH_OPS:
        raise ValueError(f"unknown depth_op {depth_op!r}; expected one of {DEPTH_OPS}")
    if assign.ndim < 3:
        raise ValueError(f"assign must have shape [..., S, L, p], got {assign.shape}")


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _depth(assign: jax.Array, depth_op: str) -> jax.Array:
    levels = _by_level(assign)
    first = _agreement(levels[0])

    def step(carry, routes):
        running, depth = carry
        running = _combine(running, _agreement(routes), depth_op)
        return (running, depth + running), None

    (_, depth), _ = jax.lax.scan(step, (first, first), levels[1:])
    return depth


def _depth_fwd(assign, depth_op):
    return _depth(assign, depth_op), assign


def _depth_bwd(depth_op, assign, g):
    levels = _by_level(assign)
    num_levels = levels.shape[0]

    def running_before(level):
        """The running value after levels 0..level-1, recomputed from the root."""
        return jax.lax.fori_loop(
            1, level, lambda m, r: _combine(r, _agreement(levels[m]), depth_op),
            _agreement(levels[0]))

    def pull_back(routes, agree_bar):
        # M = a a^T: both factors carry the cotangent.
        both = agree_bar + jnp.swapaxes(agree_bar, -1, -2)
        return jnp.einsum("...ij,...jc->...ic", both, routes, precision=_HIGHEST)

    def step(k, carry):
        running_bar, grads = carry                    # running_bar: cotangent of R_level
        level = num_levels - 1 - k
        before = running_before(level)
        d_running, d_agree = _combine_partials(before, _agreement(levels[level]), depth_op)
        grads = grads.at[level].set(pull_back(levels[level], running_bar * d_agree))
        return g + running_bar * d_running, grads

    running_bar, grads = jax.lax.fori_loop(0, num_levels - 1, step,
                                           (g, jnp.zeros_like(levels)))
    grads = grads.at[0].set(pull_back(levels[0], running_bar))
    return (jnp.moveaxis(grads, 0, -2),)


_depth.defvjp(_depth_fwd, _depth_bwd)


def expected_depth_remat(assign: jax.Array, depth_op: str = "cumprod") -> jax.Array:
    """tree.expected_depth, [..., S, L, p] -> [..., S, S], whose backward pass keeps only the
    assignment (memory O(S^2) at any L; see the module docstring)."""
    _check(assign, depth_op)
    return _depth(assign, depth_op)


def soft_tree_mask_remat(assign: jax.Array, d_max, temperature,
                         depth_op: str = "cumprod") -> jax.Array:
    """sigmoid((d_max - d) / T) with d = L - depth, [..., S, L, p] -> [..., S, S]: equal to
    tree.soft_tree_mask(tree.ultrametric_distance(assign, depth_op), d_max, temperature)."""
    distance = assign.shape[-2] - expected_depth_remat(assign, depth_op)
    return um.soft_tree_mask(distance, d_max, temperature)


def bridged_tree_mask(assign: jax.Array, allowed: jax.Array, routed: jax.Array, d_max,
                      temperature, depth_op: str = "cumprod") -> jax.Array:
    """The bridge's m, float32 [B, H, S, S]: forward exactly `allowed`, backward the soft tree
    mask on the `routed` pairs (tree.straight_through_mask), with O(S^2) training memory.

    assign [B, H, S, L, p] (Gumbel routes, hard forward / soft backward); allowed bool
    [B, H, S, S] (the hard mask of the same routes); routed bool broadcastable to [B, H, S, S]:
    the causal pairs between real tokens outside the sink and the window.
    """
    soft = soft_tree_mask_remat(assign, d_max, temperature, depth_op)
    return um.straight_through_mask(allowed, soft, routed)
