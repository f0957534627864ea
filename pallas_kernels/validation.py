"""Argument checks shared by every entry point; each error names the offending argument."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_INT32_MAX = 2**31 - 1
_INT32_MIN = -(2**31)


def _nonnegative_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def check_num_ids(num_ids):
    """A promise that cluster ids lie in [0, num_ids), 0 for none: an int >= 0."""
    if isinstance(num_ids, bool) or not isinstance(num_ids, (int, np.integer)) or num_ids < 0:
        raise ValueError(f"num_ids (the number of cluster ids, 0 for unknown) must be an "
                         f"integer >= 0, got {num_ids!r}")
    return int(num_ids)


def check_mask_params(window, sink_tokens, q_offset, q_len, kv_len):
    """Checked (window, sink_tokens, q_offset). The window is clamped to q_offset + Sq (it then
    holds every causal pair) and sink_tokens to Sk (every key is then a sink): the mask is
    unchanged, and a "no window" such as 2**31 stays within int32 arithmetic."""
    window = _nonnegative_int("window", window)
    sink_tokens = _nonnegative_int("sink_tokens", sink_tokens)
    q_offset = _nonnegative_int("q_offset", q_offset)
    # The schedule adds a key position to the window, which may reach q_offset + q_len.
    if q_offset + q_len + kv_len > _INT32_MAX:
        raise ValueError(f"q_offset + Sq + Sk must be < 2**31 (int32 positions), got "
                         f"{q_offset} + {q_len} + {kv_len}")
    return min(window, q_offset + q_len), min(sink_tokens, kv_len), q_offset


def check_block_size(name, value, *, power_of_two=True):
    if value is None:
        return None
    value = _nonnegative_int(name, value)
    if value == 0 or (power_of_two and value & (value - 1)):
        raise ValueError(f"{name} must be a positive power of two, got {value}")
    return value


def check_clusters(q_clusters, k_clusters, batch, q_heads, q_len, kv_len):
    for name, ids, length in (("q_clusters", q_clusters, q_len),
                              ("k_clusters", k_clusters, kv_len)):
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"{name} must hold integer cluster ids, got dtype {ids.dtype}")
        if tuple(ids.shape) != (batch, q_heads, length):
            raise ValueError(f"{name} must have shape [B, Hq, S] = {(batch, q_heads, length)}, "
                             f"got {tuple(ids.shape)}")
        _check_int32_range(name, ids)
    return q_clusters.astype(jnp.int32), k_clusters.astype(jnp.int32)


def _check_int32_range(name, ids):
    """The kernels compare int32 ids: a wider id outside int32 would alias another after the
    cast (2**32 + 5 -> 5). Checked when the ids are concrete; traced ids cannot be."""
    dtype = jnp.dtype(ids.dtype)
    if dtype.itemsize < 4 or (dtype.itemsize == 4 and dtype.kind == "i"):
        return
    try:
        values = np.asarray(ids)
    except jax.errors.TracerArrayConversionError:
        return
    if values.size and (values.min() < _INT32_MIN or values.max() > _INT32_MAX):
        raise ValueError(f"{name} holds ids outside the int32 range [-2**31, 2**31 - 1] "
                         f"(min {values.min()}, max {values.max()}); renumber them, e.g. with "
                         "np.unique(ids, return_inverse=True)")


def check_attention_args(q, k, v, q_clusters, k_clusters, window, sink_tokens, q_offset):
    """Validates shapes and dtypes; returns int32 clusters and the checked mask parameters."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("q, k and v must be rank 4 [B, S, heads, D], got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, q_len, q_heads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must be [B={batch}, Sk, Hkv, D={head_dim}], got {tuple(k.shape)}")
    kv_heads = k.shape[2]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of kv heads ({kv_heads})")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q_len == 0 or k.shape[1] == 0:
        raise ValueError("sequence lengths must be positive")
    qc, kc = check_clusters(q_clusters, k_clusters, batch, q_heads, q_len, k.shape[1])
    return (qc, kc) + check_mask_params(window, sink_tokens, q_offset, q_len, k.shape[1])
