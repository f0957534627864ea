"""The sink + window baseline: the dense model with only the always-allowed part of the
surgical mask (key j visible to query i iff j <= i and (i - j < window or j < sink_tokens)),
no tree. It answers whether the tree earns its pairs: at the same total density as a surgical
model, is a plain sliding window (plus sinks) better or worse?

The window that matches a density is computed in closed form: over a full row of S tokens the
allowed pairs are a quadratic in the window w (while S - w >= sink), so the real root is solved
for and the nearer of its two integer neighbours kept.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultrametric_jax.model import llama
from ultrametric_jax.run.evaluate import _held_out_loss
from ultrametric_jax.run.restricted_attention import restricted_logits
from ultrametric_jax.surgery.losses import token_cross_entropy
from ultrametric_jax.surgery.tree import allowed_mask, pair_counts


# ----------------------------------------------------------------------------- counting

def local_pairs(seq_len: int, window: int, sink: int) -> int:
    """Causal pairs (j <= i < seq_len) with i - j < window or j < sink, exactly."""
    if seq_len < 1 or window < 1 or sink < 0:
        raise ValueError(f"need seq_len >= 1, window >= 1, sink >= 0; got {seq_len}, {window}, "
                         f"{sink}")
    w = min(window, seq_len)
    in_window = w * (w + 1) // 2 + (seq_len - w) * w       # sum_k min(k, w), k = 1..S
    n = seq_len - w                                        # rows with keys beyond the window
    s = min(sink, n)
    beyond = s * (s + 1) // 2 + (n - s) * sink if n > 0 else 0   # sum_m min(m, sink), m = 1..n
    return in_window + beyond


def local_density(seq_len: int, window: int, sink: int) -> float:
    """Share of the causal pairs of a full row of seq_len tokens the window and sink allow."""
    return local_pairs(seq_len, window, sink) / (seq_len * (seq_len + 1) // 2)


def window_for_density(density: float, seq_len: int, sink: int) -> int:
    """The window w >= 1 whose sink + window mask is closest to `density` over seq_len tokens.

    For w <= S - sink the allowed pairs are A(w) = -w^2/2 + b w + c with b = S + 1/2 - sink,
    c = S sink - sink (sink - 1) / 2; A(w) = T gives w = b - sqrt(b^2 - 2 (T - c)).
    """
    if not 0.0 <= density <= 1.0 or math.isnan(density):
        raise ValueError(f"density must lie in [0, 1], got {density!r}")
    if seq_len < 1 or sink < 0:
        raise ValueError(f"need seq_len >= 1 and sink >= 0; got {seq_len}, {sink}")
    total = seq_len * (seq_len + 1) / 2
    target = density * total
    b = seq_len + 0.5 - sink
    c = seq_len * sink - sink * (sink - 1) / 2
    disc = b * b - 2.0 * (target - c)
    root = b - math.sqrt(disc) if disc >= 0 else float(seq_len)
    root = min(max(root, 1.0), float(seq_len))
    candidates = {max(1, math.floor(root)), min(seq_len, math.ceil(root))}
    return min(sorted(candidates),
               key=lambda w: abs(local_pairs(seq_len, w, sink) - target))


# ----------------------------------------------------------------------------- forward

def local_mask(positions, attention_mask, window: int, sink: int):
    """bool [B, 1, S, S]: causal, a real key, and within the window or a sink: the surgical
    mask under cluster ids that never agree (as the training bridge's bypass)."""
    never = jnp.zeros(positions.shape, jnp.int32)[:, None]
    return allowed_mask(positions, positions, never, never + 1, window, sink, attention_mask)


def local_logits(model, input_ids, attention_mask, *, window: int, sink: int):
    """float32 logits [B, S, V] of `model`'s base parameters (plain or surgical Llama: the
    routers are not used) with every attention layer restricted to local_mask."""
    mask = local_mask(llama.default_positions(input_ids), attention_mask, window, sink)
    return restricted_logits(model, input_ids, attention_mask,
                             lambda _, scores, causal: llama.masked_softmax(scores, mask))


@functools.partial(nnx.jit, static_argnames=("window", "sink"))
def _local_cross_entropy(model, input_ids, mask, *, window, sink):
    logits = local_logits(model, input_ids, mask, window=window, sink=sink)
    return token_cross_entropy(logits, input_ids, mask), None


def measured_density(batches: Sequence[dict], window: int, sink: int) -> float:
    """Share of the causal pairs of real tokens the mask allows on these batches, counted by
    the project's pair counter (every token its own cluster: tree pairs are the diagonal)."""
    allowed = causal = 0.0
    for batch in batches:
        mask = np.asarray(batch["attention_mask"], bool)
        ids = jnp.broadcast_to(jnp.arange(mask.shape[1], dtype=jnp.int32), mask.shape)
        _, a, c = pair_counts(ids, window, sink, jnp.asarray(mask))
        allowed += float(np.sum(np.asarray(a, np.float64)))
        causal += float(np.sum(np.asarray(c, np.float64)))
    return allowed / max(causal, 1.0)


def local_perplexity(model, batches: Sequence[dict], *, window: int, sink: int) -> dict:
    """Held-out loss and perplexity of the sink + window model, with its window, sink and
    measured density."""
    if window < 1 or sink < 0:
        raise ValueError(f"the baseline needs window >= 1 and sink >= 0; got {window}, {sink}")
    forward = functools.partial(_local_cross_entropy, window=window, sink=sink)
    result = _held_out_loss(forward, model, batches)
    return {**result, "window": window, "sink": sink,
            "density": measured_density(batches, window, sink)}


def matched_baseline(model, batches: Sequence[dict], density: float, sink: int) -> dict:
    """local_perplexity at the window whose density over the batches' length matches
    `density` (a surgical model's total density)."""
    seq_len = int(np.asarray(batches[0]["input_ids"]).shape[1])
    window = window_for_density(density, seq_len, sink)
    return {**local_perplexity(model, batches, window=window, sink=sink),
            "target_density": density}
