"""Dense masked attention in jnp, float32: the oracle every kernel is tested against.

It builds the full [B, Hq, Sq, Sk] score matrix, so it is meant for small sequences only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.masking import allowed_pairs, safe_max
from pallas_kernels.validation import check_attention_args


def reference_attention(q, k, v, q_clusters, k_clusters, *, window, sink_tokens, q_offset=0,
                        scale=None, return_lse=False):
    """The arguments and results of block_sparse_attention, without its kernel options.
    Returns out [B, Sq, Hq, D] in q's dtype and, with return_lse, the natural-log LSE
    [B, Hq, Sq] in float32 (-inf for rows with no allowed key)."""
    qc, kc, window, sink_tokens, q_offset = check_attention_args(
        q, k, v, q_clusters, k_clusters, window, sink_tokens, q_offset)
    return dense_attention(q, k, v, qc, kc, window=window, sink_tokens=sink_tokens,
                           q_offset=q_offset, scale=scale, return_lse=return_lse)


def dense_attention(q, k, v, qc, kc, *, window, sink_tokens, q_offset, scale, return_lse):
    """reference_attention on arguments already checked by check_attention_args."""
    q_len, q_heads, head_dim = q.shape[1:]
    kv_len, kv_heads = k.shape[1], k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    group = q_heads // kv_heads
    hi = jax.lax.Precision.HIGHEST  # no TF32 on GPUs: this is the float32 oracle

    kf = jnp.repeat(k.astype(jnp.float32), group, axis=2)  # query head h reads kv head h // group
    vf = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf, precision=hi) * scale
    q_pos = q_offset + jnp.arange(q_len)
    k_pos = jnp.arange(kv_len)
    mask = allowed_pairs(q_pos[:, None], k_pos[None, :], qc[..., :, None], kc[..., None, :],
                         window=window, sink_tokens=sink_tokens)
    s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(safe_max(jnp.max(s, axis=-1, keepdims=True)))
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bkhd->bqhd", p / jnp.where(denom == 0, 1.0, denom), vf, precision=hi)
    out = out.astype(q.dtype)
    if not return_lse:
        return out
    has_key = denom[..., 0] > 0
    lse = jnp.where(has_key, jnp.log(jnp.where(has_key, denom[..., 0], 1.0)) + m[..., 0], -jnp.inf)
    return out, lse
