"""Losses of a surgery run: next-token cross-entropy over real tokens, plus the balance term.

total = CE + lambda * L_bal, where L_bal is the mean over layers of the Switch-style balance loss
the surgery reports (`aux["balance_loss"]`). Everything is reduced in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, input_ids: jax.Array,
                        attention_mask: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array]:
    """Summed next-token CE and the number of predicted tokens.

    Position t predicts token t + 1; a prediction counts only when its target is a real token
    (attention_mask True). logits [B, S, V], input_ids [B, S] -> (sum, count), float32 scalars.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    if attention_mask is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    else:
        weights = attention_mask[:, 1:].astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(nll * weights), jnp.sum(weights)


def mean_cross_entropy(logits: jax.Array, input_ids: jax.Array,
                       attention_mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token CE over real targets (0 when there are none)."""
    total, count = token_cross_entropy(logits, input_ids, attention_mask)
    return total / jnp.maximum(count, 1.0)


def total_loss(cross_entropy: jax.Array, balance_loss: jax.Array, lam: jax.Array) -> jax.Array:
    """CE + lambda * L_bal."""
    return cross_entropy + jnp.asarray(lam, jnp.float32) * balance_loss.astype(jnp.float32)
