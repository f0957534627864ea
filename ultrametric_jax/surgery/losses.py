"""The next-token cross-entropy over real tokens, reduced in float32. The training loss that
combines it with distillation, the balance loss and the density budget is
surgery/objectives.py's combine_objectives."""
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
