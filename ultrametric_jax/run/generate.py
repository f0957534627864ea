"""Autoregressive decoding with the KV cache: greedy or sampled (temperature, top-k).

Prompts of different lengths are left-padded; padding is masked out and positions count real
tokens only, so every row decodes exactly as it would alone. The prefill and the one-token
step are jitted once per shape; prompt widths and cache lengths are rounded up to a multiple
of CACHE_BUCKET so that nearby lengths share one compile.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.io.tokenizer import decode, encode


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1):
    """(ids [B,S] int32, mask [B,S] bool) with every prompt right-aligned; S is the longest
    prompt's length rounded up to a multiple of `multiple`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    width = -(-max(len(p) for p in prompts) // multiple) * multiple
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = True
    return ids, mask


def select_token(logits, key, temperature: float, top_k: int | None):
    """Next token ids [B] from logits [B,V]: argmax when temperature == 0, else a sample."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / jnp.float32(temperature)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_sampling(temperature: float, top_k: int | None) -> None:
    """Sampling settings that decode as asked (NaN would sample garbage, top_k 0 nothing)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature must be >= 0 and finite, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise ConfigError(f"top_k must be a whole number >= 1 (or None: no limit), got {top_k}")


def check_context(prompt_len: int, max_new_tokens: int, context: int) -> None:
    """A prompt and its continuation must fit in the model's context: beyond the positions
    it was trained on a Llama decodes garbage."""
    if prompt_len > context:
        raise ConfigError(f"the prompt has {prompt_len} tokens, more than the model's context "
                          f"of {context} tokens")
    if prompt_len + max_new_tokens > context:
        raise ConfigError(f"the prompt ({prompt_len} tokens) plus {max_new_tokens} new tokens "
                          f"exceed the model's context of {context} tokens; ask for at most "
                          f"{context - prompt_len} new tokens")


_COMPILED: dict = {}
CACHE_BUCKET = 32


def _compiled(model, temperature, top_k):
    """(state, prefill, step), jitted once per model structure and sampling setting."""
    graphdef, state = nnx.split(model)
    key = (graphdef, temperature, top_k)
    if key not in _COMPILED:
        if len(_COMPILED) > 16:
            _COMPILED.clear()
        _COMPILED[key] = _build_steps(graphdef, temperature, top_k)
    return (state, *_COMPILED[key])


def _build_steps(graphdef, temperature, top_k):

    @jax.jit
    def prefill(state, ids, positions, mask, cache, key):
        logits, cache = nnx.merge(graphdef, state)(ids, positions=positions,
                                                   attention_mask=mask, cache=cache)
        return select_token(logits[:, -1], key, temperature, top_k), logits[:, -1], cache

    @jax.jit
    def step(state, token, positions, cache, key):
        mask = jnp.ones(token.shape, bool)
        logits, cache = nnx.merge(graphdef, state)(token, positions=positions,
                                                   attention_mask=mask, cache=cache)
        return select_token(logits[:, -1], key, temperature, top_k), logits[:, -1], cache

    return prefill, step


def generate(model, prompts, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, eos_token_id=None, pad_id: int = 0,
             return_logits: bool = False):
    """Continue each prompt (a list of token ids, or a [B,S] array) by max_new_tokens.

    Returns new tokens [B, max_new_tokens] (after an EOS, rows repeat the EOS id), and with
    return_logits also the float32 logits [B, max_new_tokens, V] each token was chosen from.
    Decoding stops early once every row has produced an EOS.
    """
    check_sampling(temperature, top_k)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if hasattr(prompts, "shape"):  # a [B,S] array of equal-length prompts
        prompts = np.asarray(prompts).tolist()
    prompts = [list(map(int, p)) for p in prompts]
    ids, mask = left_pad(prompts, pad_id, multiple=CACHE_BUCKET)
    check_context(max(map(len, prompts)), max_new_tokens, model.config.max_position_embeddings)
    batch, width = ids.shape
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    eos = set() if eos_token_id is None else set(np.atleast_1d(eos_token_id).tolist())

    state, prefill, step = _compiled(model, float(temperature), top_k)
    cache = model.init_cache(batch, -(-(width + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET)
    key = jax.random.PRNGKey(seed)
    token, logits, cache = prefill(state, jnp.asarray(ids), jnp.asarray(positions),
                                   jnp.asarray(mask), cache, jax.random.fold_in(key, 0))
    next_pos = jnp.asarray(positions[:, -1:] + 1)
    tokens, all_logits = [], []
    done = np.zeros(batch, bool)
    for t in range(max_new_tokens):
        host = np.asarray(token)
        if t > 0:
            host = np.where(done, tokens[-1], host)  # finished rows repeat their EOS
        tokens.append(host)
        if return_logits:
            all_logits.append(np.asarray(logits))
        done |= np.isin(host, list(eos))
        if t == max_new_tokens - 1 or done.all():
            break
        token, logits, cache = step(state, jnp.asarray(host)[:, None], next_pos, cache,
                                    jax.random.fold_in(key, t + 1))
        next_pos = next_pos + 1
    out = np.stack(tokens, axis=1)
    if out.shape[1] < max_new_tokens:  # stopped early: pad with the final (EOS) tokens
        out = np.concatenate([out, np.repeat(out[:, -1:], max_new_tokens - out.shape[1], 1)], 1)
    if return_logits:
        return out, np.stack(all_logits, axis=1)
    return out


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """Decode a continuation of `prompt` with the given tokenizer (a `tokenizers.Tokenizer`)."""
    ids = encode(tokenizer, prompt)
    eos = kwargs.pop("eos_token_id", model.config.eos_token_id)
    new = generate(model, [ids], max_new_tokens, eos_token_id=eos, **kwargs)[0]
    if eos is not None:
        stops = [i for i, t in enumerate(new) if t in set(np.atleast_1d(eos).tolist())]
        new = new[: stops[0]] if stops else new
    return decode(tokenizer, new)
