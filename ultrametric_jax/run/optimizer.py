"""The optimiser of the routers: AdamW with a linear warm-up, after global-norm clipping."""
from __future__ import annotations

import optax

from ultrametric_jax.run.settings import TrainConfig


def build_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """AdamW with a linear warm-up to train.lr, after optional global-norm clipping."""
    if train.warmup_steps > 0:
        lr = optax.linear_schedule(0.0, train.lr, int(train.warmup_steps))
    else:
        lr = optax.constant_schedule(train.lr)
    adamw = optax.adamw(lr, weight_decay=train.weight_decay)
    if train.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train.clip_norm), adamw)
    return adamw
