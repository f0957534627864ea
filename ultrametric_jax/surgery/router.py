"""The per-layer topology router and the Variable type that marks trainable surgery state.

logits = gelu_exact(x W1 + b1) W2 + b2, reshaped to [B, H, S, L, p]; all in float32 whatever
the model's dtype. On a GPU the float32 matmuls run on the tensor cores as bfloat16 pieces
(router_matmul), whose products float32 holds exactly, instead of on the CUDA cores.
Collapse initialisation (W2 = 0, b2 = +margin for child 0, -margin for the others) routes
every token to child 0 at every level, so the injected topology starts as the dense model.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

ROUTER_HIDDEN = "router_hidden"
ROUTER_OUT = "router_out"
_HIGHEST = jax.lax.Precision.HIGHEST


def bf16_pieces(x: jax.Array, pieces: int = 3) -> list:
    """bfloat16 arrays whose float32 sum is x: each piece the leading 8 significant bits of
    what the earlier ones left, cut from the bit pattern. Three pieces hold a float32 exactly.
    Cut, not rounded by a cast: XLA on a GPU may drop a float32 -> bfloat16 -> float32 round
    trip as excess precision, which left every piece but the first zero."""
    out, rest = [], x.astype(jnp.float32)
    for _ in range(pieces):
        bits = jax.lax.bitcast_convert_type(rest, jnp.uint32) & jnp.uint32(0xFFFF0000)
        piece = jax.lax.bitcast_convert_type(bits, jnp.float32)
        out.append(piece.astype(jnp.bfloat16))          # exact: the low 16 bits are zero
        rest = rest - piece                             # exact: the bits left
    return out


def split_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w in float32 from one bfloat16 matmul: w cut into three pieces (bf16_pieces) laid
    side by side, [d, 3 o]; x one piece if it is bfloat16, else three stacked on a leading
    axis; float32 accumulation; then the partial products summed. A bfloat16 product is exact
    in float32, so this is the float32 matmul up to the order of its sums (no TF32, no dropped
    terms), on tensor cores."""
    o = w.shape[-1]
    xs = jnp.stack([x] if x.dtype == jnp.bfloat16 else bf16_pieces(x))   # [n, ..., d]
    y = jnp.dot(xs, jnp.concatenate(bf16_pieces(w), axis=-1),
                preferred_element_type=jnp.float32)                      # [n, ..., 3 o]
    y = jnp.sum(y, axis=0)
    return (y[..., :o] + y[..., o:2 * o]) + y[..., 2 * o:]


def _highest_matmul(x, w):
    return jnp.dot(x.astype(jnp.float32), w, precision=_HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def router_matmul(x: jax.Array, w: jax.Array, split=None) -> jax.Array:
    """float32 x @ w [d, o] of the router: split_matmul on a GPU (the float32 HIGHEST matmul
    ran on CUDA cores there, 0.2 ms per layer at 8k tokens), the HIGHEST matmul elsewhere;
    split=True/False forces one. The backward is float32 HIGHEST either way."""
    if split is None:
        return jax.lax.platform_dependent(x, w, cuda=split_matmul, default=_highest_matmul)
    return split_matmul(x, w) if split else _highest_matmul(x, w)


def _router_matmul_fwd(x, w, split):
    return router_matmul(x, w, split), (x, w)


def _router_matmul_bwd(split, residuals, g):
    x, w = residuals
    dx = jnp.dot(g, w.T, precision=_HIGHEST).astype(x.dtype)
    dw = jnp.einsum("...i,...o->io", x.astype(jnp.float32), g, precision=_HIGHEST)
    return dx, dw


router_matmul.defvjp(_router_matmul_fwd, _router_matmul_bwd)


class RouterParam(nnx.Param):
    """A router parameter: the only state a surgery run trains (the base model stays frozen)."""


def _router_param(value: jax.Array, axes: tuple) -> RouterParam:
    # Logical axis names as sharding metadata; placement is left to the sharding rules, so the
    # variable is not sharded eagerly at creation.
    return RouterParam(value, out_sharding=axes, eager_sharding=False)


class RouterLinear(nnx.Module):
    """x @ kernel + bias in float32 (kernel [in, out], HF layout transposed; router_matmul)."""

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
        return router_matmul(x, self.kernel[...]) + self.bias[...]


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
