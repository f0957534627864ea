"""Fitting the key selectors of a surgical model (surgery/key_selector.py): each layer's score
projections are the rank-r bilinear estimate of its scores fitted on training rows (their
queries' second moment and keys' covariance, per query head); then one threshold,
shared by every layer, is calibrated by bisection so that the total attention density of
calibration rows meets a target. Nothing is trained and the base weights are untouched; a
layer's density (and which heads and rows get it) follows from where its attention
concentrates.

  fitted = fit_key_selectors(model, train_batches, calibration_batches, target=0.25)
"""
from __future__ import annotations

import warnings
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultrametric_jax.model import llama
from ultrametric_jax.run.evaluate import evaluate_surgical
from ultrametric_jax.run.metrics import progress_bar
from ultrametric_jax.run.restricted_attention import restricted_logits
from ultrametric_jax.surgery.inject import surgical_layers
from ultrametric_jax.surgery.key_selector import bilinear_factors, key_gram

LOWEST_LOG_THRESHOLD = -40.0          # exp(-40) = 4e-18: below any probability that matters


def selector_layers(model) -> list:
    """The surgical layers of `model`, each with a key selector; a clear error otherwise."""
    layers = surgical_layers(model)
    if not layers:
        raise ValueError("the model carries no surgical topology: inject_topology first")
    if any(layer.selector is None for layer in layers):
        raise ValueError("the model's surgery has key_rank=0: no key selector to fit (set "
                         "surgery.key_rank to the rank of the score estimate, e.g. 32)")
    return layers


@nnx.jit
def score_moments(model, input_ids, mask):
    """Sums over the real tokens of a batch, from the base weights (no selector plays a part):
    float32 ([layers, H, D, D] q q^T per query head, queries scaled so that q . k is the score;
    [layers, G, D, D] k k^T and [layers, G, D] k per kv head, RoPE applied; the token count)."""
    q_grams, k_grams, k_sums = [], [], []
    real = mask.astype(bool)

    def probabilities(_layer, scores, causal, q, k):
        queries = jnp.where(real[:, :, None, None], q, 0.0)
        q_grams.append(jnp.einsum("bshd,bshe->hde", queries, queries))
        k_grams.append(jnp.sum(key_gram(k, real), 0))
        k_sums.append(jnp.sum(jnp.where(real[:, :, None, None], k, 0.0), (0, 1)))
        return llama.masked_softmax(scores, causal)

    restricted_logits(model, input_ids, mask, probabilities, with_qk=True)
    return (jnp.stack(q_grams), jnp.stack(k_grams), jnp.stack(k_sums),
            jnp.sum(real, dtype=jnp.float32))


def score_factors(model, batches: Sequence[dict], rank: int):
    """(W_q, W_k), float32 [layers, H, D, rank] each: per layer and query head, the
    bilinear_factors of the queries' second moment and the keys' covariance on `batches`."""
    if not batches:
        raise ValueError("key selection: no training rows to fit the score estimates on")
    moments = [score_moments(model, jnp.asarray(b["input_ids"]),
                             jnp.asarray(b["attention_mask"], bool)) for b in batches]
    q_gram, k_gram, k_sum, count = (sum(m[i] for m in moments) for i in range(4))
    mean = k_sum / count
    k_cov = k_gram / count - mean[..., :, None] * mean[..., None, :]
    heads = q_gram.shape[1]
    k_cov = jnp.repeat(k_cov, heads // k_cov.shape[1], axis=1)                   # per q head
    return bilinear_factors(q_gram / count, k_cov, rank)


def fit_projections(model, batches: Sequence[dict]) -> None:
    """Sets every layer's selector projections to score_factors of `batches` (training
    rows)."""
    layers = selector_layers(model)
    w_q, w_k = score_factors(model, batches, layers[0].selector.rank)
    for index, layer in enumerate(layers):
        layer.selector.query_proj[...] = w_q[index]
        layer.selector.key_proj[...] = w_k[index]


def set_threshold(model, log_threshold: float) -> None:
    """Every layer's selector keeps the keys of probability >= exp(log_threshold)."""
    for layer in selector_layers(model):
        layer.selector.log_threshold[...] = jnp.asarray(log_threshold, jnp.float32)


def calibrate_threshold(model, batches: Sequence[dict], target: float, steps: int = 14,
                        progress: bool = True) -> dict:
    """{"log_threshold", "density"}: the strictest shared threshold found (bisection on log t
    in [LOWEST_LOG_THRESHOLD, 0], `steps` halvings, one evaluation each) whose total density
    over `batches` is at or above target; the model keeps it. Raises ValueError when even the
    most permissive threshold falls short of target."""
    layers = selector_layers(model)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"the target density must lie in (0, 1], got {target!r}")
    if steps < 0:
        raise ValueError(f"calibration steps must be >= 0, got {steps}")
    surgery = layers[0].surgery_config
    bar = progress_bar(steps + 1, desc="key selection: threshold", enabled=progress)

    def density(log_t):
        set_threshold(model, log_t)
        at = evaluate_surgical(model, batches, surgery)["density"]
        bar.update()
        bar.set_postfix(log_t=f"{log_t:.3f}", density=f"{at:.4f}")
        return at

    try:
        permissive, strict = LOWEST_LOG_THRESHOLD, 0.0
        reached = density(permissive)
        if reached < target:
            raise ValueError(f"key selection: even at p >= exp({LOWEST_LOG_THRESHOLD}) the "
                             f"density {reached:.4f} stays below the target {target}")
        for _ in range(steps):
            mid = (permissive + strict) / 2
            at = density(mid)
            if at >= target:
                permissive, reached = mid, at
            else:
                strict = mid
    finally:
        bar.close()
    set_threshold(model, permissive)
    if steps and strict == 0.0 and reached > target:
        # Every threshold tried, up to the strictest, kept more than the target: what is left
        # is what the selector keeps whatever the threshold.
        warnings.warn(f"key selection: the target density {target} lies below what the sink, "
                      f"the window and each query's own and most probable key keep "
                      f"({reached:.4f}); the selectors keep that floor (lower surgery.window "
                      f"or surgery.sink_tokens to go lower)", RuntimeWarning, stacklevel=2)
    return {"log_threshold": permissive, "density": reached}


def fit_key_selectors(model, train_batches: Sequence[dict], calibration_batches: Sequence[dict],
                      target: float, steps: int = 14, progress: bool = True) -> dict:
    """Fits every layer's key selector: the score projections on train_batches, then the
    shared threshold on calibration_batches for `target` total density. Returns
    {"log_threshold", "density", "fit_rows"} (density: on the calibration rows)."""
    fit_projections(model, train_batches)
    result = calibrate_threshold(model, calibration_batches, target, steps, progress)
    return {**result, "fit_rows": int(sum(np.shape(b["input_ids"])[0] for b in train_batches))}

