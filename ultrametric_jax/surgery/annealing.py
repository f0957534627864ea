"""Optax schedules of a surgery run: the Gumbel temperature tau and the balance-loss weight.

tau anneals exponentially tau_start -> tau_end over tau_steps and stays at tau_end afterwards;
lambda ramps linearly 0 -> lambda_max over lambda_ramp_steps.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from ultrametric_jax.surgery.config import SurgeryConfig


def tau_schedule(config: SurgeryConfig) -> optax.Schedule:
    """step -> tau."""
    start, end, steps = float(config.tau_start), float(config.tau_end), int(config.tau_steps)
    if steps == 0 or start == end:
        return optax.constant_schedule(end)
    ratio = end / start

    def exponential(step):
        # tau_start * (tau_end / tau_start) ** (t / T), held at tau_end for t >= T.
        t = jnp.clip(jnp.asarray(step, jnp.float32), 0.0, float(steps))
        return start * jnp.power(jnp.float32(ratio), t / steps)

    return exponential


def lambda_schedule(config: SurgeryConfig) -> optax.Schedule:
    """step -> lambda (the weight of the balance loss)."""
    if config.lambda_ramp_steps == 0:
        return optax.constant_schedule(float(config.lambda_max))
    return optax.linear_schedule(init_value=0.0, end_value=float(config.lambda_max),
                                 transition_steps=int(config.lambda_ramp_steps))
