"""Rotary position embeddings as transformers computes them for Llama.

Frequencies are computed in float32 (like `LlamaRotaryEmbedding`), cos/sin in float32 and cast
to the activation dtype before rotating, so float32 models match transformers to rounding.
Supported scalings: none ("default"), "linear" (positions divided by `factor`), and "llama3"
(Llama 3.1's frequency-dependent interpolation).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ultrametric_jax.model.config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """inv_freq [head_dim // 2] float32, with the config's rope scaling applied."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
    scaling = config.rope_scaling  # validated by LlamaConfig: rope_type and its fields exist
    if not scaling:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    return _llama3_frequencies(inv_freq, scaling, config.max_position_embeddings)


def _llama3_frequencies(inv_freq: np.ndarray, scaling: dict, max_positions: int) -> np.ndarray:
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    # transformers falls back to max_position_embeddings when the original length is absent.
    old_len = float(scaling.get("original_max_position_embeddings", max_positions))
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between blended.
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    blended = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_cos_sin(positions, inv_freq):
    """cos, sin [B, S, head_dim] float32 for integer positions [B, S]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
    """Rotate x [B, S, N, D] by cos/sin [B, S, D] (half-split layout, as transformers)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + _rotate_half(x) * sin
