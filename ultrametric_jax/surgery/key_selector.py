"""The key selector of a surgical attention layer: per query, the keys whose attention
probability under scores estimated at low rank passes a threshold, beside the sink and window
and within the tree's pairs.

Per query head, queries and keys are projected to `rank` dimensions, (W_q^T q) . (W_k^T k):
the rank-r bilinear estimate of the scores q . k with the least expected squared error over
training rows (bilinear_factors of their queries' second moment and keys' covariance; fitted
by ultrametric_jax.run.key_selection, never trained). The probability is the softmax of the
estimated scores over the query's causal keys; the threshold is one log-probability per layer,
calibrated for a target density. The choice of query i reads q_i and the keys j <= i only: it
is causal, so cached decoding selects what a full forward selects. A row keeps its most
probable key and, in the layer, its own key whatever the threshold (it never goes empty: the
tree's cluster holds the query itself). At initialisation the threshold selects every key, so
a model with a selector equals the model without one until the selector is fitted.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

SELECT_ALL = -1e30              # a log threshold below every log-probability: every key passes


class ScoreProjection(nnx.Variable):
    """[H, D, rank] per query head: the query or key side of the fitted score estimate."""


class SelectionThreshold(nnx.Variable):
    """The selector's log-probability threshold (a scalar): calibrated, never trained."""


def key_gram(k, real):
    """float32 [B, G, D, D]: sum over the real positions (bool [B, S]) of k_j k_j^T, per kv head
    (k [B, S, G, D]): the keys' second moment, from which their covariance is read."""
    keys = jnp.where(real[:, :, None, None], k.astype(jnp.float32), 0.0)
    return jnp.einsum("bsgd,bsge->bgde", keys, keys)


def bilinear_factors(query_gram, key_cov, rank: int, ridge: float = 1e-6):
    """(W_q, W_k), float32 [..., D, rank] each: the factors of the rank-r matrix
    A = W_q W_k^T minimising the expected squared error of the estimate q^T A k of the scores
    q . k, for queries of second moment query_gram = E[q q^T] and keys of covariance key_cov
    (centred: a shift of every key's score by the same amount leaves the softmax unchanged),
    both [..., D, D]: A = Cq^-1/2 [Cq^1/2 Ck^1/2]_r Ck^-1/2, [.]_r the rank-r truncated SVD
    U S V^T, W_q = Cq^-1/2 U S^1/2, W_k = Ck^-1/2 V S^1/2 (ridge * trace / D is added to both
    diagonals so that they invert)."""
    dim = query_gram.shape[-1]
    if not 1 <= rank <= dim:
        raise ValueError(f"bilinear_factors: rank must lie in [1, {dim}] (the head "
                         f"dimension), got {rank}")

    def roots(c):
        c = (c + jnp.swapaxes(c, -1, -2)) / 2
        c = c + ridge * jnp.trace(c, axis1=-2, axis2=-1)[..., None, None] / dim * jnp.eye(dim)
        w, v = jnp.linalg.eigh(c)
        w = jnp.maximum(w, 1e-30)
        return ((v * jnp.sqrt(w)[..., None, :]) @ jnp.swapaxes(v, -1, -2),
                (v / jnp.sqrt(w)[..., None, :]) @ jnp.swapaxes(v, -1, -2))

    q_root, q_inverse = roots(query_gram.astype(jnp.float32))
    k_root, k_inverse = roots(key_cov.astype(jnp.float32))
    u, s, vt = jnp.linalg.svd(q_root @ k_root)
    half = jnp.sqrt(s[..., None, :rank])
    return (q_inverse @ (u[..., :, :rank] * half),
            k_inverse @ (jnp.swapaxes(vt, -1, -2)[..., :, :rank] * half))


def projected_scores(q, k, query_proj, key_proj):
    """float32 [B, H, Sq, Sk]: (W_q^T q_i) . (W_k^T k_j) per query head h, W = query_proj[h],
    key_proj[h] [H, D, r]; q [B, Sq, H, D] (scaled), k [B, Sk, G, D], query head h reading kv
    head h // (H // G)."""
    heads, groups = q.shape[2], k.shape[2]
    qp = jnp.einsum("bshd,hdr->bhsr", q.astype(jnp.float32), query_proj)
    kp = jnp.einsum("bjhd,hdr->bhjr", jnp.repeat(k.astype(jnp.float32), heads // groups, 2),
                    key_proj)
    return jnp.einsum("bhsr,bhjr->bhsj", qp, kp)


def selected_keys(scores, causal, log_threshold):
    """bool [B, H, Sq, Sk]: the causal pairs (causal bool, broadcast to scores' shape) whose
    probability, the softmax of `scores` over the row's causal keys, is at least
    exp(log_threshold), and each row's most probable key."""
    causal = jnp.broadcast_to(causal, scores.shape)
    logp = jax.nn.log_softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    top = logp >= jnp.max(logp, -1, keepdims=True)
    return causal & ((logp >= log_threshold) | top)


KERNEL_BLOCK = 64     # the query and key block of a block-sparse kernel (what visits count)


def visited_blocks(allowed, causal, block: int = KERNEL_BLOCK):
    """float32 (blocks holding an allowed pair, blocks holding a causal pair): allowed
    [B, H, Sq, Sk] and causal (broadcast to it; real queries and keys only) cut into block x
    block tiles, counted over B and H. A block-sparse kernel that runs the mask visits the
    first count of tiles where dense causal attention visits the second."""
    causal = jnp.broadcast_to(causal, allowed.shape)
    batch, heads, q_len, k_len = allowed.shape
    pad = ((0, 0), (0, 0), (0, -q_len % block), (0, -k_len % block))

    def tiles(mask):
        mask = jnp.pad(mask, pad)
        shape = (batch, heads, mask.shape[2] // block, block, mask.shape[3] // block, block)
        return jnp.sum(jnp.any(mask.reshape(shape), axis=(3, 5)), dtype=jnp.float32)

    return tiles(allowed & causal), tiles(causal)


class KeySelector(nnx.Module):
    """The per-query key choice of one attention layer (see the module docstring)."""

    def __init__(self, heads: int, head_dim: int, rank: int):
        if not 1 <= rank <= head_dim:
            raise ValueError(f"the key selector's rank must lie in [1, {head_dim}] (the head "
                             f"dimension), got {rank}")
        self.rank = rank
        # the first `rank` coordinates until fitted: the threshold selects every key meanwhile
        first = jnp.broadcast_to(jnp.eye(head_dim, rank, dtype=jnp.float32),
                                 (heads, head_dim, rank))
        self.query_proj = ScoreProjection(first)
        self.key_proj = ScoreProjection(first)
        self.log_threshold = SelectionThreshold(jnp.asarray(SELECT_ALL, jnp.float32))

    def __call__(self, q, k, causal, scale):
        """bool [B, H, Sq, Sk]: the selected pairs of queries q [B, Sq, H, D] (unscaled) over
        keys k [B, Sk, G, D] within causal [B, 1, Sq, Sk]."""
        scores = projected_scores(q.astype(jnp.float32) * scale, k, self.query_proj[...],
                                  self.key_proj[...])
        return selected_keys(scores, causal, self.log_threshold[...])
