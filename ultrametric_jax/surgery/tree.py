"""The ultrametric topology: relaxed routes, tree depth and distance, the soft tree mask,
cluster ids, pair counts, the straight-through bridge into attention and the load-balancing
loss. The hard allowed-pair rule itself is pallas_kernels.masking.allowed_pairs.

Conventions: an assignment has shape [..., S, L, p] (token, level, child); level 0 is the root.
Every function here is pure jnp and works under jit, vmap and grad.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from pallas_kernels.masking import allowed_pairs
from ultrametric_jax.surgery.config import DEPTH_OPS, INT32_MAX, STE_FORMS

# In the "gate" bridge a masked pair's weight is m * exp(s - row_max); its forward value is 0,
# but exp() of a masked score far above every allowed one would overflow (and 0 * inf = nan).
# Capping the exponent keeps the forward exact and the gradient finite.
GATE_EXPONENT_CAP = 20.0


@jax.custom_jvp
def straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
    """Forward value exactly `hard`; derivative that of `soft` (hard is treated as a constant).

    Unlike `soft + stop_gradient(hard - soft)` the forward value is bit-exact, so a one-hot
    stays exactly one-hot and a 0/1 mask exactly 0/1.
    """
    return hard


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    hard, _ = primals
    _, soft_dot = tangents
    return hard, soft_dot


def gumbel_softmax(logits: jax.Array, tau, rng: jax.Array, hard: bool = True,
                   noise_bound: Optional[float] = None, noise_scale: float = 1.0) -> jax.Array:
    """Gumbel-softmax over the last axis, in float32.

    hard=True: one-hot(argmax(logits + g)) forward, softmax((logits + g) / tau) backward.
    noise_bound: clip the Gumbel noise to [-noise_bound, noise_bound]. A bounded noise can
    never overturn a logit gap larger than 2 * noise_bound, so a router initialised with a
    collapse margin m and bound m samples exactly the collapsed routes for every seed (the
    unbounded noise strays with probability 1 / (1 + e^(2m)) per choice).
    noise_scale: multiplies the (clipped) noise; 0 gives the argmax routes evaluation runs,
    with the same straight-through gradient.
    """
    logits = logits.astype(jnp.float32)
    noise = jax.random.gumbel(rng, logits.shape, jnp.float32)
    if noise_bound is not None:
        noise = jnp.clip(noise, -noise_bound, noise_bound)
    perturbed = logits + noise_scale * noise
    soft = jax.nn.softmax(perturbed / tau, axis=-1)
    if not hard:
        return soft
    # argmax of the perturbed logits, not of the tempered ones: dividing by tau can round two
    # distinct values into a tie.
    one_hot = jax.nn.one_hot(small_argmax(perturbed), logits.shape[-1], dtype=jnp.float32)
    return straight_through(one_hot, soft)


def hard_assignment(logits: jax.Array) -> jax.Array:
    """One-hot(argmax) over the last axis, float32 (evaluation routes, no noise)."""
    return jax.nn.one_hot(small_argmax(logits), logits.shape[-1], dtype=jnp.float32)


def _check_depth_op(depth_op: str) -> None:
    if depth_op not in DEPTH_OPS:
        raise ValueError(f"unknown depth_op {depth_op!r}; expected one of {DEPTH_OPS}")


def expected_depth(assign: jax.Array, depth_op: str = "cumprod") -> jax.Array:
    """Expected depth of the lowest common ancestor, [..., S, L, p] -> [..., S, S].

    depth(i, j) = sum_l prod_{m <= l} M_m(i, j) with M_l(i, j) = sum_c a_{i,l,c} a_{j,l,c}
    (cummin replaces the running product by a running minimum). The levels are accumulated one
    at a time, so memory is O(S^2) per level, never [..., S, S, L]; the running product and
    minimum are plain multiplications / minimums, whose gradients stay finite on exact zeros.
    """
    _check_depth_op(depth_op)
    if assign.ndim < 3:
        raise ValueError(f"assign must have shape [..., S, L, p], got {assign.shape}")
    running = None
    depth = None
    for level in range(assign.shape[-2]):
        routes = assign[..., level, :]
        agree = jnp.einsum("...ic,...jc->...ij", routes, routes,
                           precision=jax.lax.Precision.HIGHEST)
        if running is None:
            running = agree
        elif depth_op == "cumprod":
            running = running * agree
        else:
            running = jnp.minimum(running, agree)
        depth = running if depth is None else depth + running
    return depth


def ultrametric_distance(assign: jax.Array, depth_op: str = "cumprod") -> jax.Array:
    """d(i, j) = L - depth(i, j), [..., S, L, p] -> [..., S, S]."""
    return assign.shape[-2] - expected_depth(assign, depth_op)


def small_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over a short last axis (the p children): the first index of the maximum, a
    NaN counting as the maximum, int32. Computed in p - 1 elementwise steps, because XLA's GPU
    reduction of rows of p = 2..8 elements was slower than the routers' matmuls (two such
    reductions per layer cost 0.1 ms each at 8k tokens on an H200)."""
    best = x[..., 0]
    index = jnp.zeros(x.shape[:-1], jnp.int32)
    for child in range(1, x.shape[-1]):
        value = x[..., child]
        take = (value > best) | (jnp.isnan(value) & ~jnp.isnan(best))
        best = jnp.where(take, value, best)
        index = jnp.where(take, jnp.int32(child), index)
    return index


def hard_digits(scores: jax.Array) -> jax.Array:
    """The hard route digits argmax_c of logits or one-hot routes, [..., S, L, p] -> int32
    [..., S, L]."""
    return small_argmax(scores)


def cluster_ids(digits: jax.Array, arity: int, cut_level: int) -> jax.Array:
    """The first `cut_level` digits packed in base `arity` (digit 0 most significant), int32.

    Two tokens share a cluster iff their hard distance is <= L - cut_level.
    """
    levels = digits.shape[-1]
    if not 0 <= cut_level <= levels:
        raise ValueError(f"cut_level={cut_level} must lie in [0, L={levels}]")
    if arity < 2:
        raise ValueError(f"arity={arity} must be >= 2")
    if arity ** cut_level - 1 > INT32_MAX:
        raise ValueError(f"arity**cut_level = {arity}**{cut_level} cluster ids do not fit in int32")
    ids = jnp.zeros(digits.shape[:-1], jnp.int32)
    for level in range(cut_level):
        ids = ids * arity + digits[..., level].astype(jnp.int32)
    return ids


def allowed_mask(q_pos: jax.Array, k_pos: jax.Array, q_clusters: jax.Array,
                 k_clusters: jax.Array, window: int, sink_tokens: int,
                 k_valid: Optional[jax.Array] = None) -> jax.Array:
    """bool [B, H, Sq, Sk]: pallas_kernels.masking.allowed_pairs for queries at positions
    q_pos [B, Sq] and keys at k_pos [B, Sk] with cluster ids q_clusters [B, H, Sq] and
    k_clusters [B, H, Sk] (H may be 1), restricted to real keys (k_valid [B, Sk], or None when
    every key is real). Materialises S x S: for the dense and training paths."""
    ok = allowed_pairs(q_pos[:, None, :, None], k_pos[:, None, None, :],
                       q_clusters[..., :, None], k_clusters[..., None, :],
                       window=window, sink_tokens=sink_tokens)
    return ok if k_valid is None else ok & k_valid.astype(bool)[:, None, None, :]


def pair_counts(clusters: jax.Array, window: int, sink_tokens: int,
                valid: Optional[jax.Array] = None):
    """(tree, allowed, causal) float32 [...]: per row of cluster ids [..., S] for tokens at
    positions 0..S-1 (valid: bool broadcastable to [..., S], False for padding; None when every
    token is real), the number of causal pairs (j <= i) between real tokens in the same
    cluster, of those allowed (same cluster, j < sink_tokens or i - j < window), and of all of
    them. The one pair counter of the project: training metrics, the kernel path and the
    evaluation report all count with it. The counts are float32 (S^2 / 2 outgrows int32 at
    S = 64k; ratios keep float32 accuracy).

    Time O(S log S + S (window + sink_tokens)); never materialises S x S.
    """
    if window < 0 or sink_tokens < 0:
        raise ValueError(f"window={window} and sink_tokens={sink_tokens} must be >= 0")
    seq = clusters.shape[-1]
    axis = clusters.ndim - 1
    token = jnp.arange(seq)
    real = (jnp.ones(clusters.shape, bool) if valid is None
            else jnp.broadcast_to(jnp.asarray(valid, bool), clusters.shape))
    # A real token pairs causally with itself and the earlier real members of its cluster: a
    # stable sort keeps each cluster's members in position order, so that is the number of real
    # tokens from the start of its run of equal ids up to it.
    order = jnp.argsort(clusters, axis=-1, stable=True)
    ordered = jnp.take_along_axis(clusters, order, axis=-1)
    starts = jnp.concatenate([jnp.ones_like(ordered[..., :1], bool),
                              ordered[..., 1:] != ordered[..., :-1]], axis=-1)
    run_start = jax.lax.cummax(jnp.where(starts, token, 0), axis=axis)
    # Without padding the running counts are closed forms. A cumulative sum of a constant
    # would be folded at compile time, which XLA does slowly (a minute per model at 8k).
    if valid is None:
        real_sorted = jnp.ones(clusters.shape, jnp.int32)
        seen = jnp.broadcast_to(token + 1, clusters.shape)
    else:
        real_sorted = jnp.take_along_axis(real, order, axis=-1).astype(jnp.int32)
        seen = jnp.cumsum(real_sorted, axis=-1)
    before_run = jnp.take_along_axis(seen - real_sorted, run_start, axis=-1)
    tree = jnp.sum(real_sorted * (seen - before_run), axis=-1, dtype=jnp.float32)
    # The keys a query reaches whatever the routes: the window (i - d for d < window) and the
    # sink tokens before the window.
    offsets = jnp.arange(min(window, seq))
    sinks = jnp.arange(min(sink_tokens, seq))
    keys = jnp.concatenate([token[:, None] - offsets,
                            jnp.broadcast_to(sinks, (seq, sinks.size))], axis=1)   # [S, W + K]
    keys = jnp.maximum(keys, 0)
    reached = jnp.concatenate([token[:, None] >= offsets,
                               sinks <= token[:, None] - window], axis=1)
    reached = reached & real[..., :, None] & real[..., keys]
    same = clusters[..., :, None] == clusters[..., keys]
    bypass = jnp.sum(reached, axis=(-2, -1), dtype=jnp.float32)
    bypass_in_tree = jnp.sum(same & reached, axis=(-2, -1), dtype=jnp.float32)
    if valid is None:
        # Behind a barrier: a constant divisor would become a multiplication by its rounded
        # reciprocal, and a fully allowed layer would report a density of 0.99999994.
        causal = jax.lax.optimization_barrier(
            jnp.full(clusters.shape[:-1], seq * (seq + 1) / 2, jnp.float32))
    else:
        real_before = jnp.cumsum(real, axis=-1, dtype=jnp.float32)
        causal = jnp.sum(jnp.where(real, real_before, 0.0), axis=-1)
    return tree, tree + bypass - bypass_in_tree, causal


def soft_tree_mask(distance: jax.Array, d_max, temperature) -> jax.Array:
    """sigmoid((d_max - d) / T)."""
    return jax.nn.sigmoid((d_max - distance) / temperature)


def straight_through_mask(allowed: jax.Array, soft_tree: jax.Array,
                          routed: jax.Array) -> jax.Array:
    """m of the bridge, forward exactly `allowed` (0/1): sg(hard - soft) + soft on the pairs
    whose fate the routes decide (`routed`: causal pairs between real tokens outside the sink
    and window), where `allowed` is the hard tree mask; the constant `allowed` elsewhere (1 on
    sink and window pairs, 0 on non-causal and padding pairs)."""
    hard = allowed.astype(jnp.float32)
    return jnp.where(routed, straight_through(hard, soft_tree.astype(jnp.float32)), hard)


def bridged_softmax(scores: jax.Array, m: jax.Array, allowed: jax.Array,
                    ste: str = "gate") -> jax.Array:
    """Attention probabilities over the last axis with the straight-through mask m.

    Forward: the softmax of `scores` restricted to `allowed` (rows with no allowed key give
    zeros). `allowed` must equal the forward value of m > 0.
      gate:   p_ij = m_ij exp(s_ij) / sum_k m_ik exp(s_ik); the gradient reaches masked pairs.
      renorm: q = masked softmax(s); p = q m / sum_k q_ik m_ik; masked pairs get no gradient.
    """
    if ste not in STE_FORMS:
        raise ValueError(f"unknown ste {ste!r}; expected one of {STE_FORMS}")
    scores = scores.astype(jnp.float32)
    row_max = jnp.max(jnp.where(allowed, scores, -jnp.inf), axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    shifted = scores - row_max
    if ste == "gate":
        weights = m * jnp.exp(jnp.minimum(shifted, GATE_EXPONENT_CAP))
    else:
        masked = jnp.where(allowed, jnp.exp(jnp.where(allowed, shifted, 0.0)), 0.0)
        total = jnp.sum(masked, axis=-1, keepdims=True)
        weights = m * (masked / jnp.where(total > 0, total, 1.0))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


def load_balance_loss(assign: jax.Array, hard: jax.Array, arity: int,
                      valid: Optional[jax.Array] = None) -> jax.Array:
    """Switch-style balance loss p * mean_{rows, l} sum_c f_{l,c} P_{l,c}.

    assign: soft child probabilities [..., S, L, p]; hard: the hard one-hot routes, same shape
    (used without gradient); valid: bool broadcastable to [..., S] (False = padding), or None.
    f and P are token averages over the valid tokens of each row (every leading index);
    rows without a valid token are left out. 1 for a uniform assignment, p for a collapsed one.
    """
    if assign.shape != hard.shape:
        raise ValueError(f"assign {assign.shape} and hard {hard.shape} must have the same shape")
    if assign.shape[-1] != arity:
        raise ValueError(f"the last axis of assign ({assign.shape[-1]}) must equal arity={arity}")
    assign = assign.astype(jnp.float32)
    hard = jax.lax.stop_gradient(hard.astype(jnp.float32))
    if valid is None:
        valid = jnp.ones(assign.shape[:-2], bool)
    weight = jnp.broadcast_to(valid, assign.shape[:-2]).astype(jnp.float32)[..., None, None]
    count = jnp.sum(weight, axis=-3)                                  # [..., 1, 1]
    denom = jnp.maximum(count, 1.0)
    fraction = jnp.sum(hard * weight, axis=-3) / denom                # [..., L, p]
    prob = jnp.sum(assign * weight, axis=-3) / denom                  # [..., L, p]
    per_level = arity * jnp.sum(fraction * prob, axis=-1)             # [..., L]
    present = jnp.broadcast_to((count[..., 0] > 0).astype(jnp.float32), per_level.shape)
    return jnp.sum(per_level * present) / jnp.maximum(jnp.sum(present), 1.0)
