"""Small array helpers shared by the schedule, the dispatch and the kernels of both backends."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

NN = (((1,), (0,)), ((), ()))  # a @ b
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b


def cdiv(a, b):
    return -(-a // b)


def pad_axis(x, length, axis=0, value=0):
    """x padded with value at the end of axis, up to length."""
    if length == x.shape[axis]:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def dot(a, b, dims=NN):
    """A float32-accumulating matmul; float32 inputs get full precision (no TF32 passes)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)
