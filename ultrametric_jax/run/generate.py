"""Autoregressive decoding with a KV cache: greedy or sampled (temperature, top-k).

Two caches, picked per model (`cache="auto"`):
- dense (base models, and surgical ones on request): prompts of different lengths are
  left-padded; padding is masked out and positions count real tokens only, so every row
  decodes exactly as it would alone. Every step reads the whole cache. Without logits to
  return, the whole decode is one on-device loop (no host round trip per token).
- route (surgical models in evaluation mode): each layer keeps a route cache
  (surgery/route_cache.py) and a step reads only its token's cluster pages, the window and the
  sink. Prompts are written in chunks of `prefill_chunk` tokens (the rest in power-of-two
  chunks, so any length reuses a few compiles). A route cache holds no padding, so prompts of
  different lengths decode as separate batches, one per length; each row is exact.

The jitted functions compile once per shape; prompt widths and cache lengths are rounded up to
a multiple of CACHE_BUCKET so that nearby lengths share one compile.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.io.tokenizer import decode, encode
from ultrametric_jax.surgery.route_cache import (init_route_caches, largest_cluster, pages_for,
                                                 route_cache_problem, with_read_pages)

CACHE_KINDS = ("auto", "route", "dense")
PREFILL_CHUNK = 256


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1,
             width: int | None = None):
    """(ids [B,S] int32, mask [B,S] bool) with every prompt right-aligned; S is the longest
    prompt's length (or `width` when larger) rounded up to a multiple of `multiple`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    width = max(width or 0, max(len(p) for p in prompts))
    width = -(-width // multiple) * multiple
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

    def one_step(state, token, positions, cache, key):
        mask = jnp.ones(token.shape, bool)
        logits, cache = nnx.merge(graphdef, state)(token, positions=positions,
                                                   attention_mask=mask, cache=cache)
        return select_token(logits[:, -1], key, temperature, top_k), logits[:, -1], cache

    @functools.partial(jax.jit, static_argnames="steps")
    def decode(state, token, positions, cache, key, eos, steps):
        """tokens [B, steps] from the first choice token [B] (at positions [B, 1] - 1), every
        step on the device: no host round trip per token. Rows that produced an EOS repeat
        it; the loop ends once every row has one."""
        out = jnp.zeros((token.shape[0], steps), jnp.int32).at[:, 0].set(token)

        def unfinished(carry):
            t, _, _, _, done, _ = carry
            return (t < steps) & ~jnp.all(done)

        def advance(carry):
            t, token, positions, cache, done, out = carry
            nxt, _, cache = one_step(state, token[:, None], positions, cache,
                                     jax.random.fold_in(key, t))
            nxt = jnp.where(done, token, nxt)
            return (t + 1, nxt, positions + 1, cache, done | jnp.isin(nxt, eos),
                    out.at[:, t].set(nxt))

        t, token, _, _, _, out = jax.lax.while_loop(
            unfinished, advance, (1, token, positions, cache, jnp.isin(token, eos), out))
        return jnp.where(jnp.arange(steps)[None] >= t, token[:, None], out)

    return prefill, jax.jit(one_step), decode


def _route_steps(graphdef, temperature, top_k):

    @jax.jit
    def advance(state, ids, caches, key):
        """The next token after ids [B, T] (a prefill chunk or one token), the caches with
        them, and the largest cluster's size (for the next step's read bound)."""
        logits, caches = nnx.merge(graphdef, state)(ids, cache=caches)
        token = select_token(logits[:, -1], key, temperature, top_k)
        return token, logits[:, -1], caches, largest_cluster(caches)

    return advance


def _compiled_route(model, temperature, top_k):
    """(state, advance) of the route cache, jitted once per model structure and sampling."""
    graphdef, state = nnx.split(model)
    key = (graphdef, "route", temperature, top_k)
    if key not in _COMPILED:
        if len(_COMPILED) > 16:
            _COMPILED.clear()
        _COMPILED[key] = _route_steps(graphdef, temperature, top_k)
    return state, _COMPILED[key]


def cache_kind(model, max_len: int, requested: str = "auto") -> str:
    """"route" or "dense": the cache a generation of max_len tokens uses. auto: the route
    cache for a surgical model in evaluation mode, the dense cache otherwise."""
    if requested not in CACHE_KINDS:
        raise ConfigError(f"unknown cache {requested!r}; expected one of {CACHE_KINDS}")
    if requested == "dense":
        return "dense"
    problem = route_cache_problem(model, max_len)
    if problem and requested == "route":
        raise ConfigError(f"cache='route' cannot serve this model: {problem}")
    return "dense" if problem else "route"


def prefill_chunks(length: int, chunk: int) -> list[int]:
    """Chunk sizes that write a prompt of `length` tokens: whole chunks, then the rest as
    powers of two (largest first), so every prompt length reuses the same few shapes."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"prefill_chunk must be a whole number >= 1, got {chunk!r}")
    sizes = [chunk] * (length // chunk)
    rest = length % chunk
    while rest:
        sizes.append(1 << (rest.bit_length() - 1))
        rest -= sizes[-1]
    return sizes


def _decode_loop(token, logits, advance, max_new_tokens, eos, return_logits):
    """(tokens [B, N], logits [B, N, V] or None) from the first choice and advance(host
    tokens [B], t) -> (token, logits) of step t + 1; stops once every row has an EOS."""
    tokens, all_logits = [], []
    done = np.zeros(np.shape(token)[0], bool)
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
        token, logits = advance(host, t)
    out = np.stack(tokens, axis=1)
    if out.shape[1] < max_new_tokens:  # stopped early: pad with the final (EOS) tokens
        out = np.concatenate([out, np.repeat(out[:, -1:], max_new_tokens - out.shape[1], 1)], 1)
    return out, (np.stack(all_logits, axis=1) if return_logits else None)


def _generate_dense(model, prompts, max_new_tokens, temperature, top_k, key, eos, pad_id,
                    return_logits, width):
    ids, mask = left_pad(prompts, pad_id, multiple=CACHE_BUCKET, width=width)
    batch, width = ids.shape
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    state, prefill, step, decode = _compiled(model, temperature, top_k)
    cache = model.init_cache(batch, -(-(width + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET)
    token, logits, cache = prefill(state, jnp.asarray(ids), jnp.asarray(positions),
                                   jnp.asarray(mask), cache, jax.random.fold_in(key, 0))
    if not return_logits:
        # -1 pads the EOS ids: a row never holds it, and an empty set keeps a shape
        eos_ids = jnp.asarray(sorted(eos) or [-1], jnp.int32)
        return np.asarray(decode(state, token, jnp.asarray(positions[:, -1:] + 1), cache,
                                 key, eos_ids, steps=max_new_tokens)), None
    held = {"cache": cache, "pos": jnp.asarray(positions[:, -1:] + 1)}

    def advance(host, t):
        token, logits, held["cache"] = step(state, jnp.asarray(host)[:, None], held["pos"],
                                            held["cache"], jax.random.fold_in(key, t + 1))
        held["pos"] = held["pos"] + 1
        return token, logits

    return _decode_loop(token, logits, advance, max_new_tokens, eos, return_logits)


def _generate_route(model, prompts, max_new_tokens, temperature, top_k, key, eos, max_len,
                    prefill_chunk, return_logits):
    """Equal-length prompts [B, n] through the route cache."""
    ids = np.asarray(prompts, np.int32)
    state, advance_fn = _compiled_route(model, temperature, top_k)
    held = {"caches": init_route_caches(model, ids.shape[0], max_len), "fill": 0}

    def run(chunk, step_key):
        # A one-token call decodes: its read bound covers the largest cluster plus itself.
        pages = pages_for(int(held["fill"]) + 1, held["caches"]) if chunk.shape[1] == 1 else 1
        token, logits, held["caches"], held["fill"] = advance_fn(
            state, jnp.asarray(chunk), with_read_pages(held["caches"], pages), step_key)
        return token, logits

    start = 0
    for size in prefill_chunks(ids.shape[1], prefill_chunk):
        token, logits = run(ids[:, start:start + size], jax.random.fold_in(key, 0))
        start += size
    return _decode_loop(token, logits,
                        lambda host, t: run(host[:, None], jax.random.fold_in(key, t + 1)),
                        max_new_tokens, eos, return_logits)


def _merge_logits(parts, batch):
    """[B, N, V] from per-batch (rows, logits [b, n, V]); a batch that stopped early (every
    row at its EOS) repeats its last logits, as its rows repeat their EOS."""
    steps = max(p.shape[1] for _, p in parts)
    merged = np.zeros((batch, steps, parts[0][1].shape[-1]), np.float32)
    for rows, p in parts:
        merged[rows] = np.concatenate([p, np.repeat(p[:, -1:], steps - p.shape[1], 1)], 1)
    return merged


def generate(model, prompts, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, eos_token_id=None, pad_id: int = 0,
             return_logits: bool = False, cache: str = "auto",
             prefill_chunk: int = PREFILL_CHUNK, width: int | None = None):
    """Continue each prompt (a list of token ids, or a [B,S] array) by max_new_tokens.

    Returns new tokens [B, max_new_tokens] (after an EOS, rows repeat the EOS id), and with
    return_logits also the float32 logits [B, max_new_tokens, V] each token was chosen from.
    Decoding stops early once every row has produced an EOS. cache: "auto" (the route cache
    for a surgical model in evaluation mode, else the dense one), "route" or "dense" (see the
    module docstring); prefill_chunk: prompt tokens written per call with the route cache;
    width: with the dense cache, left-pad the prompts to at least this many tokens, so that
    calls with shorter prompts reuse one compiled prefill and decode (a compile of a 30-layer
    model costs tens of seconds; a few padded columns cost far less on an accelerator).
    """
    check_sampling(temperature, top_k)
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if hasattr(prompts, "shape"):  # a [B,S] array of equal-length prompts
        prompts = np.asarray(prompts).tolist()
    prompts = [list(map(int, p)) for p in prompts]
    left_pad(prompts, pad_id)                                # every prompt has a token
    longest = max(map(len, prompts))
    if width is not None and (isinstance(width, bool) or int(width) != width or width < 1):
        raise ConfigError(f"width must be a whole number >= 1 (or None), got {width!r}")
    check_context(longest, max_new_tokens, model.config.max_position_embeddings)
    eos = set() if eos_token_id is None else set(np.atleast_1d(eos_token_id).tolist())
    key = jax.random.PRNGKey(seed)
    temperature = float(temperature)
    max_len = -(-(longest + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    if cache_kind(model, max_len, cache) == "dense":
        out, logits = _generate_dense(model, prompts, max_new_tokens, temperature, top_k, key,
                                      eos, pad_id, return_logits, width)
    else:
        prefill_chunks(1, prefill_chunk)                     # a bad chunk fails first
        out = np.zeros((len(prompts), max_new_tokens), np.int32)
        parts = []
        for length in sorted({len(p) for p in prompts}):     # one batch per prompt length
            rows = [i for i, p in enumerate(prompts) if len(p) == length]
            part, part_logits = _generate_route(
                model, [prompts[i] for i in rows], max_new_tokens, temperature, top_k, key, eos,
                max_len, prefill_chunk, return_logits)
            out[rows] = part
            parts.append((rows, part_logits))
        logits = _merge_logits(parts, len(prompts)) if return_logits else None
    return (out, logits) if return_logits else out


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """Decode a continuation of `prompt` with the given tokenizer (a `tokenizers.Tokenizer`)."""
    ids = encode(tokenizer, prompt)
    eos = kwargs.pop("eos_token_id", model.config.eos_token_id)
    new = generate(model, [ids], max_new_tokens, eos_token_id=eos, **kwargs)[0]
    if eos is not None:
        stops = [i for i, t in enumerate(new) if t in set(np.atleast_1d(eos).tolist())]
        new = new[: stops[0]] if stops else new
    return decode(tokenizer, new)
