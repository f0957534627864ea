"""The token-level attention mask, shared by the reference, the schedule and every kernel.

A query at absolute position i may attend to a key at position j when

    j <= i  and  (q_cluster[i] == k_cluster[j]  or  j < sink_tokens  or  i - j < window)

and the key exists (j < kv_len). Arguments broadcast against each other, so the same
function builds a [S, S] reference mask, a [block_q, block_k] kernel tile or its transpose.

With exclude_same_cluster the mask keeps only the local pairs of other clusters,

    j <= i  and  (j < sink_tokens  or  i - j < window)  and  q_cluster[i] != k_cluster[j]

the complement of the same-cluster pairs within the allowed set (routed.py runs the two sets as
separate passes).
"""
from __future__ import annotations

import jax.numpy as jnp

# Scores are kept in base 2 inside the kernels (exp2 is one instruction on GPUs).
LOG2E = 1.4426950408889634


def allowed_pairs(q_pos, k_pos, q_cluster, k_cluster, *, window: int, sink_tokens: int,
                  kv_len: int | None = None, exclude_same_cluster: bool = False):
    """Boolean mask of allowed (query, key) pairs; all array arguments broadcast."""
    local = (k_pos < sink_tokens) | (q_pos - k_pos < window)
    # != rather than ~(==): Mosaic GPU cannot lower a boolean not (it converts to 1-bit regs)
    ok = (k_pos <= q_pos) & ((local & (q_cluster != k_cluster)) if exclude_same_cluster
                             else ((q_cluster == k_cluster) | local))
    if kv_len is not None:
        ok = ok & (k_pos < kv_len)
    return ok


def mask_scores(cfg, scores, q_pos, k_pos, q_ids, k_ids):
    """scores with -inf where the pair is not allowed under cfg (an AttentionConfig)."""
    ok = allowed_pairs(q_pos, k_pos, q_ids, k_ids, window=cfg.window,
                       sink_tokens=cfg.sink_tokens, kv_len=cfg.kv_len,
                       exclude_same_cluster=cfg.exclude_same_cluster)
    return jnp.where(ok, scores, -jnp.inf)


def safe_max(m):
    """The running maximum with -inf (a row that has seen only masked keys) replaced by 0,
    so that exp(s - m) stays 0 for masked scores instead of becoming NaN."""
    return jnp.where(m == -jnp.inf, 0.0, m)
