"""Llama in Flax NNX, numerically equal to transformers' `LlamaForCausalLM`.

Parameter paths mirror transformers' names (model.layers.N.self_attn.q_proj.kernel <->
model.layers.N.self_attn.q_proj.weight, transposed), so checkpoint conversion is a table.
Every parameter carries logical axis names (`out_sharding` metadata, applied lazily):
vocab, embed, heads (fused heads*head_dim), kv_heads (fused kv_heads*head_dim), mlp; None for
norms.

Attention layers are called as `self_attn(x_normed, positions, attention_mask=..., cache=...)`
where `attention_mask` is the [B, S] padding mask of the new tokens (True = real token), so any
module with that signature can replace `layer.self_attn`. positions=None (what the model passes
when its caller gives none) means the default positions of `default_positions`; a layer can
then rely on token i sitting at position i (after the cache's slots).

KV cache: `model.init_cache(batch, max_len)` returns one dict per layer,
  {"k": [B,T,G,D], "v": [B,T,G,D], "positions": [B,T] int32, "valid": [B,T] bool,
   "length": int32 scalar (slots written so far)}.
With a cache, `attention_mask` covers only the new tokens; earlier keys keep their own flags.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ultrametric_jax.model.config import LlamaConfig
from ultrametric_jax.model.rope import apply_rope, inverse_frequencies, rope_cos_sin

_INIT = nnx.initializers.normal(stddev=0.02)


def _axes(*names):
    """Sharding metadata: logical axis names, applied when a mesh is given, never eagerly."""
    return {"out_sharding": tuple(names), "eager_sharding": False}


def _linear(d_in, d_out, axes, *, use_bias, dtype, param_dtype, rngs):
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=_INIT, rngs=rngs, kernel_metadata=_axes(*axes),
                      bias_metadata=_axes(axes[1]))


# ----------------------------------------------------------------------------- attention math

def default_positions(x, cache=None):
    """Positions [B, S] int32 of new tokens x [B, S, ...] given none: 0..S-1, shifted by the
    cache's `length` (the slots written before them)."""
    batch, seq = x.shape[:2]
    start = 0 if cache is None else cache["length"]
    return jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), (batch, seq))


def causal_mask(q_positions, k_positions, attention_mask=None):
    """bool [B, 1, Sq, Sk]: key position <= query position, and the key is a real token."""
    mask = k_positions[:, None, None, :] <= q_positions[:, None, :, None]
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, None, :]
    return mask


def grouped_attention(q, k, v, scale, probabilities):
    """Grouped-query attention with the row probabilities left to `probabilities`.

    q [B,Sq,H,D], k/v [B,Sk,G,D]; query head h reads kv head h // (H // G). Scores are computed
    in float32 and handed to probabilities(scores [B,H,Sq,Sk] float32) -> [B,H,Sq,Sk]; the
    output [B,Sq,H,D] is in v's dtype. Every attention of the model goes through here: the
    masked softmax of evaluation and the straight-through bridge of surgery training.
    """
    batch, sq, heads, dim = q.shape
    sk, groups = k.shape[1], k.shape[2]
    rep = heads // groups
    qg = q.reshape(batch, sq, groups, rep, dim)
    scores = jnp.einsum("bqgrd,bkgd->bgrqk", qg, k, preferred_element_type=jnp.float32)
    scores = (scores * jnp.float32(scale)).reshape(batch, heads, sq, sk)
    probs = probabilities(scores).reshape(batch, groups, rep, sq, sk)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs.astype(v.dtype), v)
    return out.reshape(batch, sq, heads, dim)


def masked_softmax(scores, mask):
    """Softmax over the last axis restricted to `mask` (bool, broadcastable to scores). Masked
    scores take the lowest finite value, not -inf, so a fully masked row yields the (finite)
    uniform distribution instead of NaN."""
    scores = jnp.where(jnp.asarray(mask, bool), scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def masked_attention(q, k, v, mask, scale):
    """Softmax attention restricted to `mask` (bool broadcastable to [B,H,Sq,Sk]), grouped kv
    heads as in grouped_attention."""
    return grouped_attention(q, k, v, scale, lambda scores: masked_softmax(scores, mask))


def project_qkv(config: LlamaConfig, q_proj, k_proj, v_proj, x, positions):
    """q [B,S,H,D], k [B,S,G,D], v [B,S,G,D] from the attention input x [B,S,d], RoPE applied
    to q and k: the projection every attention layer (base or surgical) shares."""
    c = config
    batch, seq = x.shape[:2]
    q = q_proj(x).reshape(batch, seq, c.num_attention_heads, c.head_dim)
    k = k_proj(x).reshape(batch, seq, c.num_key_value_heads, c.head_dim)
    v = v_proj(x).reshape(batch, seq, c.num_key_value_heads, c.head_dim)
    # Frequencies are a trace-time constant derived from the config, not state.
    cos, sin = rope_cos_sin(positions, inverse_frequencies(c))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def append_to_cache(cache, k, v, positions, attention_mask=None):
    """Write the new keys/values at slot `cache["length"]`.

    Returns (new_cache, k_all, v_all, key_positions [B,T], key_valid [B,T]). Any extra keys of
    `cache` are carried over untouched. The caller keeps length + S <= T.
    """
    start = cache["length"]
    batch, seq = k.shape[:2]
    # dynamic_update_slice would clamp the start and silently overwrite earlier keys.
    if seq > cache["k"].shape[1]:
        raise ValueError(f"{seq} new tokens do not fit in a KV cache of length "
                         f"{cache['k'].shape[1]}; init_cache with a larger max_len")
    valid = (jnp.ones((batch, seq), bool) if attention_mask is None
             else attention_mask.astype(bool))
    zero = jnp.zeros((), jnp.int32)
    new = dict(cache)
    new["k"] = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype),
                                            (zero, start, zero, zero))
    new["v"] = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype),
                                            (zero, start, zero, zero))
    new["positions"] = jax.lax.dynamic_update_slice(
        cache["positions"], positions.astype(jnp.int32), (zero, start))
    new["valid"] = jax.lax.dynamic_update_slice(cache["valid"], valid, (zero, start))
    new["length"] = start + seq
    return new, new["k"], new["v"], new["positions"], new["valid"]


# ----------------------------------------------------------------------------- modules

class RMSNorm(nnx.Module):
    """transformers' LlamaRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim, eps, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **_axes(None))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + jnp.float32(self.eps))).astype(x.dtype)
        return self.weight[...] * normed


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.layer_idx = layer_idx
        c = config
        kw = dict(use_bias=c.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = _linear(c.hidden_size, c.num_attention_heads * c.head_dim, ("embed", "heads"), **kw)
        self.k_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim, ("embed", "kv_heads"), **kw)
        self.v_proj = _linear(c.hidden_size, c.num_key_value_heads * c.head_dim, ("embed", "kv_heads"), **kw)
        self.o_proj = _linear(c.num_attention_heads * c.head_dim, c.hidden_size, ("heads", "embed"), **kw)
        self.scale = c.head_dim ** -0.5

    def __call__(self, x, positions, attention_mask=None, cache=None):
        if positions is None:
            positions = default_positions(x, cache)
        q, k, v = project_qkv(self.config, self.q_proj, self.k_proj, self.v_proj, x, positions)
        if cache is None:
            k_pos, k_valid = positions, attention_mask
        else:
            cache, k, v, k_pos, k_valid = append_to_cache(cache, k, v, positions, attention_mask)
        mask = causal_mask(positions, k_pos, k_valid)
        out = masked_attention(q, k, v, mask, self.scale)
        out = self.o_proj(out.reshape(*out.shape[:2], -1))
        return out if cache is None else (out, cache)


class LlamaMLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        c = config
        kw = dict(use_bias=c.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = _linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = _linear(c.intermediate_size, c.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(config, layer_idx, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                                param_dtype=param_dtype)
        self.mlp = LlamaMLP(config, **kw)

    def __call__(self, x, positions, attention_mask=None, cache=None):
        attn = self.self_attn(self.input_layernorm(x), positions, attention_mask=attention_mask,
                              cache=cache)
        if cache is not None:
            attn, cache = attn
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x if cache is None else (x, cache)


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                      param_dtype=param_dtype, embedding_init=_INIT, rngs=rngs,
                                      embedding_metadata=_axes("vocab", "embed"))
        self.layers = nnx.List([
            LlamaDecoderLayer(config, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, input_ids, positions, attention_mask=None, cache=None):
        x = self.embed_tokens(input_ids)
        new_cache = None if cache is None else []
        for i, layer in enumerate(self.layers):
            if cache is None:
                x = layer(x, positions, attention_mask=attention_mask)
            else:
                x, layer_cache = layer(x, positions, attention_mask=attention_mask, cache=cache[i])
                new_cache.append(layer_cache)
        return self.norm(x), new_cache


class LlamaForCausalLM(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, ("embed", "vocab"),
                                   use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids, *, positions=None, attention_mask=None, cache=None):
        """logits [B,S,V] float32; with a cache, (logits, new_cache)."""
        input_ids = jnp.asarray(input_ids)
        if positions is not None:      # None reaches the layers: see default_positions
            positions = jnp.asarray(positions, jnp.int32)
        hidden, new_cache = self.model(input_ids, positions, attention_mask=attention_mask,
                                       cache=cache)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)

    def logits(self, hidden):
        """Project final hidden states [B,S,d] to float32 vocabulary logits."""
        if self.lm_head is None:
            emb = self.model.embed_tokens.embedding[...]
            out = jnp.einsum("bsd,vd->bsv", hidden, emb.astype(hidden.dtype))
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        """An empty KV cache: one dict per layer (see the module docstring)."""
        c = self.config
        dtype = dtype or self.dtype
        shape = (batch, max_len, c.num_key_value_heads, c.head_dim)
        return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                 "positions": jnp.zeros((batch, max_len), jnp.int32),
                 "valid": jnp.zeros((batch, max_len), bool),
                 "length": jnp.zeros((), jnp.int32)}
                for _ in range(c.num_hidden_layers)]
