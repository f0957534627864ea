"""The per-layer topology router and the Variable type that marks trainable surgery state.

logits = gelu_exact(x W1 + b1) W2 + b2, reshaped to [B, H, S, L, p]; all in float32 whatever
the model's dtype. Collapse initialisation (W2 = 0, b2 = +margin for child 0, -margin for the
others) routes every token to child 0 at every level, so the injected topology starts as the
dense model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

ROUTER_HIDDEN = "router_hidden"
ROUTER_OUT = "router_out"


class RouterParam(nnx.Param):
    """A router parameter: the only state a surgery run trains (the base model stays frozen)."""


def _router_param(value: jax.Array, axes: tuple) -> RouterParam:
    # Logical axis names as sharding metadata; placement is left to the sharding rules, so the
    # variable is not sharded eagerly at creation.
    return RouterParam(value, out_sharding=axes, eager_sharding=False)


class RouterLinear(nnx.Module):
    """x @ kernel + bias in float32 (kernel [in, out], HF layout transposed)."""

    def __init__(self, in_features: int, out_features: int, kernel: jax.Array, bias: jax.Array,
                 axes: tuple):
        if kernel.shape != (in_features, out_features) or bias.shape != (out_features,):
            raise ValueError(f"router kernel {kernel.shape} / bias {bias.shape} do not match "
                             f"({in_features}, {out_features})")
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = _router_param(kernel.astype(jnp.float32), axes)
        self.bias = _router_param(bias.astype(jnp.float32), (axes[1],))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(jnp.float32), self.kernel[...],
                    precision=jax.lax.Precision.HIGHEST)
        return y + self.bias[...]


def collapse_bias(num_heads: int, levels: int, arity: int, margin: float) -> jax.Array:
    """b2 of the collapse initialisation: +margin for child 0, -margin for the others,
    laid out head-major, then level, then child."""
    per_choice = jnp.full((arity,), -margin, jnp.float32).at[0].set(margin)
    return jnp.tile(per_choice, num_heads * levels)


class DynamicTopologyRouter(nnx.Module):
    """Routes every token, for every query head, down a p-ary tree of depth L."""

    def __init__(self, hidden_size: int, num_heads: int, levels: int, arity: int,
                 init_margin: float, *, rngs: nnx.Rngs):
        if min(hidden_size, num_heads, levels) < 1 or arity < 2:
            raise ValueError(f"invalid router shape: hidden_size={hidden_size}, "
                             f"num_heads={num_heads}, levels={levels}, arity={arity}")
        if not init_margin > 0:
            raise ValueError(f"init_margin={init_margin} must be > 0")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.levels = levels
        self.arity = arity
        out = num_heads * levels * arity
        w1 = nnx.initializers.lecun_normal()(rngs.params(), (hidden_size, hidden_size), jnp.float32)
        self.fc1 = RouterLinear(hidden_size, hidden_size, w1, jnp.zeros((hidden_size,)),
                                ("embed", ROUTER_HIDDEN))
        self.fc2 = RouterLinear(hidden_size, out, jnp.zeros((hidden_size, out)),
                                collapse_bias(num_heads, levels, arity, init_margin),
                                (ROUTER_HIDDEN, ROUTER_OUT))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, S, d] (the attention input, after the input RMSNorm) -> logits [B, H, S, L, p]."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"router input has width {x.shape[-1]}, expected {self.hidden_size}")
        h = jax.nn.gelu(self.fc1(x), approximate=False)
        logits = self.fc2(h)
        batch, seq = x.shape[:2]
        logits = logits.reshape(batch, seq, self.num_heads, self.levels, self.arity)
        return jnp.transpose(logits, (0, 2, 1, 3, 4))
